"""objective=grpo through the trainer's loop (`train.trainer.run`) on the addition task with LoRA
under fsdp (8 devices): the objective's rollout batches and evaluation plug into the loop
(eval_before / eval_after in the summary, the RL metrics, a checkpoint at the rollout boundary,
only the adapters train); bad rl keys fail in one line before any work. A run stopped at a
rollout boundary and resumed equals an uninterrupted one: tests/train/test_grpo_multihost.py
(2 processes, resumed, against 1 process straight through)."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.loader import load_config
from data.tokenizer import ByteLevelBPE
from tests.cli_output import REPO, assert_one_line_error, run_module
from train import trainer, validate

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
         "checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "tokenizer"
    ByteLevelBPE([bytes([b]) for b in range(256)], [], ("<|endoftext|>",)).save(path)
    return path


def _config(tokenizer_dir, *overrides):
    # A constant learning rate: the trajectory does not depend on config.steps (stopped vs straight).
    return load_config(os.path.join(REPO, "configs/llama.py:tiny"), [
        "objective=grpo", "data.source=task:addition", f"tokenizer.path={tokenizer_dir}", "verifiable.num_train=32",
        "verifiable.num_eval=8", "data.seq_len=24", "rl.max_new_tokens=8", "data.batch_size=8",
        "rl.num_generations=2", "rl.minibatches=2", "rl.epochs=1", "finetune.method=lora", "sharding.strategy=fsdp",
        "schedule.name=constant", "schedule.warmup_steps=0", "checkpoint.save_interval_steps=2", "eval.max_batches=1",
        "rl.rewards=accuracy,tests.train.rl_helpers:digit_reward", "optimizer.eps=1e-5", *QUIET, *overrides])


def _params(workdir, step):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


@pytest.fixture(scope="module")
def run(tokenizer_dir, tmp_path_factory):
    """One rollout (two minibatch steps) of a new run."""
    workdir = tmp_path_factory.mktemp("grpo") / "run"
    return workdir, trainer.run(_config(tokenizer_dir, "steps=2"), str(workdir))


def test_the_summary_holds_the_evaluation_before_and_after(run):
    workdir, summary = run
    for key in ("eval_before", "eval_after"):
        assert set(summary[key]) == {"loss", "exact_match", "mean_reward", "mean_length"}
        assert 0 < summary[key]["mean_length"] <= 8 and 0 <= summary[key]["exact_match"] <= 1
    assert summary["val_exact_match"] == summary["eval_after"]["exact_match"]
    assert (workdir / "eval_before.json").is_file()
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [x for x in lines if "reward" in x]
    assert trained and {"kl", "entropy", "clip_low", "clip_high", "reward_std", "completion_length"} <= set(trained[-1])


def test_the_rollout_boundary_checkpoint_holds_the_trained_adapters(run):
    workdir, _ = run
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    params = _params(workdir, 2)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert paths and all("lora" in p for p in paths)
    # LoRA's B starts at 0: the two updates moved it.
    assert any("lora_b" in p and np.abs(np.asarray(x)).max() > 0
               for p, x in zip(paths, jax.tree.leaves(params)))


@pytest.mark.parametrize(("overrides", "message"), [
    (["rl.num_generations=1"], "config key `rl.num_generations`=1"),
    (["objective=rloo", "rl.num_generations=1"], "config key `rl.num_generations`=1"),
    (["rl.loss_type=ppo"], "config key `rl.loss_type`='ppo'"),
    (["rl.minibatches=3"], "config key `rl.minibatches`=3"),
    (["rl.temperature=0"], "config key `rl.temperature`=0"),
])
def test_bad_rl_keys_fail_before_any_work(tokenizer_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        validate.check(_config(tokenizer_dir, *overrides), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_the_cli_refuses_one_generation_in_one_line(tokenizer_dir, tmp_path):
    result = run_module("train", "--config=configs/llama.py:tiny", f"--workdir={tmp_path / 'run'}",
                        "--config.objective=grpo", "--config.data.source=task:addition",
                        f"--config.tokenizer.path={tokenizer_dir}", "--config.rl.num_generations=1")
    assert_one_line_error(result, "config key `rl.num_generations`=1", "2 or more")
    assert not (tmp_path / "run").exists()
