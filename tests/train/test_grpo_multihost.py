"""Multi-host LoRA + GRPO through `python -m train`: two processes of two CPU devices each (gloo),
fsdp over the 4-device mesh, train one rollout and save (only process 0 writes the run's files),
a second 2-process job resumes from that checkpoint and trains a second rollout, and the result
equals one process with the 4 devices trained straight through; then `python -m train.export`
merges the adapters of the 2-process run's checkpoint into a Hugging Face directory.

Each process scores only its own rows' completions (`train.rollout.process_rows`) and the
rewards are assembled into one global array, so both jobs draw the same rollouts."""

import json
import os

import jax
import numpy as np
import pytest

from data.tokenizer import ByteLevelBPE
from tests.cli_output import run_module
from tests.train import rl_helpers as h
from tests.train.test_multihost_train import _committed_steps, _Jobs, _params, _wait

# The same SPMD program on a 4-device mesh either way; only the order in which cross-device
# sums add their partial sums differs (gloo between processes vs in-process): a few eps32 in the
# gradients, which Adam (eps 1e-5) carries into the steps unamplified for |g| >> eps: the
# tolerance of tests/train/test_multihost_train (measured here: 6.7e-7 for the worst adapter).
TOLERANCE = 1e-5
GRPO = ["--config.objective=grpo", "--config.data.source=task:addition", "--config.verifiable.num_train=32",
        "--config.verifiable.num_eval=8", "--config.data.seq_len=24", "--config.rl.max_new_tokens=8",
        "--config.data.batch_size=8", "--config.rl.num_generations=2", "--config.rl.minibatches=2",
        "--config.finetune.method=lora", "--config.sharding.strategy=fsdp", "--config.eval.max_batches=1",
        "--config.rl.rewards=accuracy,tests.train.rl_helpers:digit_reward", "--config.checkpoint.save_interval_steps=2",
        "--config.checkpoint.max_to_keep=5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_multihost")
    tokenizer = root / "tokenizer"
    ByteLevelBPE([bytes([b]) for b in range(256)], [], ("<|endoftext|>",)).save(tokenizer)
    flags = [*GRPO, f"--config.tokenizer.path={tokenizer}"]
    jobs = _Jobs()
    log = root / "rewards.log"
    try:
        two, one = root / "lora_2x2", root / "lora_1x4"
        os.environ[h.REWARD_LOG] = str(log)  # the first 2-process job logs who scores how many rows
        first = _wait(jobs.two_processes(two, *flags, "--config.steps=2"))
        del os.environ[h.REWARD_LOG]
        second = _wait(jobs.two_processes(two, *flags, "--config.steps=4"))
        _wait([jobs.start(one, 4, *flags, "--config.steps=4")])
    finally:
        os.environ.pop(h.REWARD_LOG, None)
        jobs.kill_all()
    return {"two": two, "one": one, "first": first, "second": second, "root": root, "log": log}


def test_two_processes_train_save_and_resume(runs):
    two = runs["two"]
    (out0, _), (out1, _) = runs["first"]
    assert "new run in" in out0 and "new run in" not in out1  # only the lead prints and writes
    (resumed_out, _), _ = runs["second"]
    assert "resumed from step 2" in resumed_out
    assert _committed_steps(two) == [2, 4]
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "reward" in x] == [1, 2, 3, 4]  # one line per step, not per process
    summary = json.loads((two / "summary.json").read_text())
    assert summary["final_step"] == 4 and set(summary["eval_before"]) == set(summary["eval_after"])


def test_each_process_scores_only_its_own_rows(runs):
    calls = [tuple(map(int, line.split())) for line in runs["log"].read_text().splitlines()]
    # Evaluation before and after (4 of the 8 held-out prompts each, greedy) and one rollout of
    # 8 prompts x 2 completions (8 rows each): every call scores half the rows, on both processes.
    assert sorted(calls) == [(0, 4), (0, 4), (0, 8), (1, 4), (1, 4), (1, 8)], calls


def test_two_processes_resumed_equal_one_process_straight(runs):
    got, want, start = _params(runs["two"], 4), _params(runs["one"], 4), _params(runs["two"], 2)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    moved = 0
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                               jax.tree.leaves(start)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert "lora" in jax.tree_util.keystr(path)  # only the adapters train (and are in `params`)
        assert np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12) < TOLERANCE, jax.tree_util.keystr(path)
        moved += not np.array_equal(a, np.asarray(s))
    assert moved
    s2, s1 = (json.loads((runs[k] / "summary.json").read_text()) for k in ("two", "one"))
    assert s2["eval_before"] == s1["eval_before"]


def test_export_merges_the_two_process_runs_adapters(runs):
    out = runs["root"] / "hf"
    result = run_module("train.export", f"--workdir={runs['two']}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not any(name.endswith(".partial") or "partial-" in name for name in os.listdir(runs["root"]))
