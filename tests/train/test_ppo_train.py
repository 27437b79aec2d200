"""PPO through `train.trainer.run` on a tiny byte-level LLaMA and the verifiable addition
prompts: it learns what its reward asks (greedy held-out reward up), writes the PPO metrics
and eval_before/eval_after; a run stopped after two rollouts and resumed ends with the same
parameters and the same adaptive KL coefficient as an uninterrupted one; the separate value
model trains through the trainer and keeps the policy's params where a plain GPT has them."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base
from data.tokenizer import ByteLevelBPE
from models.policy_value import policy_params
from train import trainer

PPO_METRICS = ("reward", "kl", "kl_coef", "clip_fraction", "value_clip_fraction", "explained_variance", "entropy",
               "policy_loss", "value_loss", "approx_kl", "completion_length")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo_tokenizer")
    ByteLevelBPE([bytes([b]) for b in range(256)], [], ("<|endoftext|>",)).save(path)
    return str(path)


def _config(tokenizer_dir, steps, value_head="shared"):
    c = base.get_config()
    c.objective, c.steps, c.seed = "ppo", steps, 0
    c.model.update(family="llama", num_layers=1, max_len=32, positional="rope", tie_embeddings=False)
    c.model.block.update(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, mlp_activation="swiglu", norm="rmsnorm",
                         use_bias=False)
    c.data.update(source="task:addition", seq_len=24, batch_size=32)
    c.tokenizer.path = tokenizer_dir
    c.verifiable.update(num_train=64, num_eval=8)
    # A dense reward (the share of printable ASCII) a random byte-level policy can raise in a few rollouts.
    c.rl.update(max_new_tokens=6, rewards="tests.train.ppo_rewards:ascii_fraction", epochs=2, minibatches=2,
                kl_coef=0.05, kl_target=1.0, kl_horizon=100, value_head=value_head)
    c.optimizer.update(lr=3e-2, weight_decay=0.0)
    c.schedule.update(name="constant", warmup_steps=0)  # a stopped run is the start of a longer one
    c.sharding.update(strategy="dp", mesh="data=8")
    c.logging.update(log_every_steps=1, progress_bar=False)
    c.checkpoint.save_interval_steps = 4
    c.eval.update(every_steps=0, max_batches=1)
    return c


def _checkpoint(workdir, step):
    directory = os.path.join(workdir, "checkpoints", str(step))
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "state"))["params"]
    with open(os.path.join(directory, "data", "metadata")) as f:
        data = json.load(f)
    return params, data


def _assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_ppo_learns_writes_metrics_and_resumes(tokenizer_dir, tmp_path):
    whole = tmp_path / "whole"
    summary = trainer.run(_config(tokenizer_dir, 16), str(whole))
    lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "policy_loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 17))
    for key in PPO_METRICS:
        assert all(np.isfinite(x[key]) for x in steps), key
    before, after = summary["eval_before"], summary["eval_after"]
    assert set(before) == set(after) == {"loss", "exact_match", "mean_reward", "mean_length"}
    # Learning: the greedy completions of the held-out prompts became more printable.
    assert after["mean_reward"] >= before["mean_reward"] + 0.1, (before, after)
    # The adaptive coefficient follows the measured KL (Ziegler's rule, one update per rollout).
    coefs = [x["kl_coef"] for x in steps[::4]]
    assert coefs[0] == pytest.approx(0.05) and len(set(np.round(coefs, 7))) == 4, coefs
    # Clipping happens in the later epochs, never on the first minibatch of a rollout (ratio 1).
    assert all(x["clip_fraction"] == 0 for x in steps[::4]) and max(x["clip_fraction"] for x in steps) > 0

    stopped = tmp_path / "stopped"
    trainer.run(_config(tokenizer_dir, 8), str(stopped))
    resumed = trainer.run(_config(tokenizer_dir, 16), str(stopped))
    assert resumed["eval_before"] == summary["eval_before"]  # kept from the first part
    params, data = _checkpoint(stopped, 16)
    want_params, want_data = _checkpoint(whole, 16)
    _assert_trees_equal(params, want_params)
    assert data == want_data and data["kl_coef"] != 0.05  # the coefficient survived the resume


def test_separate_value_model_trains_through_the_trainer(tokenizer_dir, tmp_path):
    """One update per rollout (epochs = minibatches = 1: every step a boundary, the ratio 1)."""
    config = _config(tokenizer_dir, 3, value_head="separate")
    config.rl.update(epochs=1, minibatches=1)
    config.checkpoint.save_interval_steps = 1
    summary = trainer.run(config, str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in lines if "value_loss" in x]) == 3 and "eval_after" in summary
    assert all(x["clip_fraction"] == 0 for x in lines if "clip_fraction" in x)  # on-policy: ratio 1
    first, _ = _checkpoint(tmp_path, 1)
    last, _ = _checkpoint(tmp_path, 3)
    # The policy's leaves are a plain GPT's; both it and the value model's own trunk train.
    assert set(policy_params(last)) == {"embed", "layer_0", "final_norm", "lm_head"}
    for name, a, b in (("policy", policy_params(first), policy_params(last)),
                       ("value trunk", first["value_model"]["layer_0"], last["value_model"]["layer_0"])):
        assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b))), name
