"""objective=grpo / rloo through the trainer's loop (`train.trainer.run`) on the addition task with
LoRA under fsdp (8 devices): the objective's rollout batches and evaluation plug into the loop
(eval_before / eval_after in the summary, checkpoints at rollout boundaries), a run stopped at a
boundary and resumed ends with the parameters of an uninterrupted one, bad rl keys fail in one line
before any work."""

import json
import os

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
def runs(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    straight = trainer.run(_config(tokenizer_dir, "steps=4"), str(root / "straight"))
    trainer.run(_config(tokenizer_dir, "steps=2"), str(root / "resumed"))  # one rollout, saved at its boundary
    resumed = trainer.run(_config(tokenizer_dir, "steps=4"), str(root / "resumed"))
    return root, straight, resumed


def test_the_summary_holds_the_evaluation_before_and_after(runs):
    root, straight, _ = runs
    for key in ("eval_before", "eval_after"):
        assert set(straight[key]) == {"loss", "exact_match", "mean_reward", "mean_length"}
        assert 0 < straight[key]["mean_length"] <= 8 and 0 <= straight[key]["exact_match"] <= 1
    assert straight["val_exact_match"] == straight["eval_after"]["exact_match"]
    lines = [json.loads(x) for x in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    trained = [x for x in lines if "reward" in x]
    assert trained and {"kl", "entropy", "clip_low", "clip_high", "reward_std", "completion_length"} <= set(trained[-1])
    assert (root / "straight" / "eval_before.json").is_file()


def test_a_run_resumed_at_a_rollout_boundary_equals_an_uninterrupted_one(runs):
    root, straight, resumed = runs
    assert sorted(os.listdir(root / "resumed" / "checkpoints")) == ["2", "4"]
    got, want = _params(root / "resumed", 4), _params(root / "straight", 4)
    start = _params(root / "resumed", 2)
    import jax

    moved = 0
    for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same programs on the same devices
        moved += not np.array_equal(np.asarray(a), np.asarray(s))
    assert moved  # the second rollout's updates moved the adapters
    assert resumed["eval_before"] == straight["eval_before"]  # kept from the first start (eval_before.json)
    assert resumed["eval_after"] == straight["eval_after"]


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
