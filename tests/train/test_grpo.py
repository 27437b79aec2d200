"""GRPO / RLOO math against TRL (trl 1.16): the losses of `GRPOTrainer._compute_loss` (called with
a minimal stand-in for the trainer it reads a few settings from) and their gradients with respect
to the token log-probs, for each loss type, with and without accumulation; the advantages against
TRL's formulas in float64; the bad-config errors."""

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from train.objectives import grpo

EPS32 = float(np.finfo(np.float32).eps)
B, C, G = 8, 7, 4


class _Accelerator:
    """What `_compute_loss` asks of accelerate with one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(inputs, logps, *, loss_type, beta, eps_low, eps_high, accumulation, steps_per_generation):
    """TRL's loss of one micro-batch and its gradient with respect to the token log-probs (float64)."""
    logps_t = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps_per_generation),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation,
        max_completion_length=C, accelerator=_Accelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps_t, torch.zeros_like(logps_t), None))
    rows = len(logps)
    full = {"prompt_ids": torch.zeros((rows, 1), dtype=torch.long), "prompt_mask": torch.ones((rows, 1)),
            "completion_ids": torch.zeros((rows, C), dtype=torch.long)}
    full.update({k: torch.tensor(v, dtype=torch.float64) for k, v in inputs.items()})
    loss = GRPOTrainer._compute_loss(trainer, None, full)
    loss.backward()
    return loss.item(), logps_t.grad.numpy(), trainer._metrics["train"]


def _example(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, C + 1, B)
    mask = (np.arange(C) < lengths[:, None]).astype(np.float64)
    old = -rng.uniform(0.5, 3.0, (B, C))
    logps = old + rng.normal(0, 0.3, (B, C))  # ratios spread across both clip edges
    ref = old + rng.normal(0, 0.2, (B, C))
    advantages = rng.normal(0, 1, B)
    return logps, {"completion_mask": mask, "old_per_token_logps": old, "ref_per_token_logps": ref,
                   "advantages": advantages}


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("accumulation", [1, 2])
def test_losses_and_gradients_equal_trl(loss_type, accumulation):
    logps, inputs = _example()
    minibatches, beta, eps, eps_high = 2, 0.04, 0.2, 0.28
    rollout_tokens = 2.0 * inputs["completion_mask"].sum() + 5  # a rollout of `minibatches` steps
    objective = grpo.GRPOObjective(None, num_generations=G, max_new_tokens=C, epochs=2, minibatches=minibatches,
                                   clip_eps=eps, clip_eps_high=eps_high, kl_coef=beta, loss_type=loss_type)
    batch = {"completion_mask": inputs["completion_mask"].astype(np.int32),
             "old_logps": inputs["old_per_token_logps"], "ref_logps": inputs["ref_per_token_logps"],
             "advantages": inputs["advantages"], "rewards": np.zeros(B), "group_std": np.zeros(B),
             "tokens_per_step": np.full(B, rollout_tokens / minibatches), "ids": np.zeros((B, C), np.int32)}
    batch = {k: jnp.asarray(v, jnp.int32 if v.dtype == np.int32 else jnp.float32) for k, v in batch.items()}
    totals = {**objective.totals(batch), "micro_batches": accumulation}
    got_loss, got_grad, got_stats = 0.0, [], defaultdict(float)
    want_loss, want_grad = 0.0, []
    for micro in np.split(np.arange(B), accumulation):
        part = jax.tree.map(lambda x, rows=micro: x[rows], batch)

        def share(lp, part=part):
            return objective.policy_loss(lp, jnp.zeros_like(lp), part, totals)

        (loss, stats), grad = jax.value_and_grad(share, has_aux=True)(jnp.asarray(logps[micro], jnp.float32))
        got_loss += float(loss)
        got_grad.append(np.asarray(grad))
        for k, v in stats.items():
            got_stats[k] += float(v)
        loss, grad, _ = _trl_loss({k: v[micro] for k, v in inputs.items()} | {"num_items_in_batch": rollout_tokens},
                                  logps[micro], loss_type=loss_type, beta=beta, eps_low=eps, eps_high=eps_high,
                                  accumulation=accumulation, steps_per_generation=minibatches * accumulation)
        want_loss += loss
        want_grad.append(grad)
    # float32: exp/log per token and sums of B x C = 56 terms of magnitude ~1.
    tolerance = 30 * EPS32 * np.sqrt(B * C)
    np.testing.assert_allclose(got_loss, want_loss, rtol=tolerance, atol=tolerance)
    scale = np.abs(np.concatenate(want_grad)).max()
    np.testing.assert_allclose(np.concatenate(got_grad), np.concatenate(want_grad), atol=tolerance * scale)
    # TRL's metrics of the whole batch (one micro-batch): token means of k3 and the clipped fractions.
    if accumulation == 1:
        _, _, metrics = _trl_loss(inputs | {"num_items_in_batch": rollout_tokens}, logps, loss_type=loss_type,
                                  beta=beta, eps_low=eps, eps_high=eps_high, accumulation=1,
                                  steps_per_generation=minibatches)
        for ours, theirs in (("kl", "kl"), ("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean")):
            np.testing.assert_allclose(got_stats[ours], metrics[theirs][0], rtol=tolerance, atol=tolerance)
        assert got_stats["clip_low"] > 0 and got_stats["clip_high"] > 0  # both edges were exercised


def test_on_policy_ratio_is_one_and_the_loss_is_the_advantage_weighted_log_prob_gradient():
    logps, inputs = _example(1)
    objective = grpo.GRPOObjective(None, num_generations=G, max_new_tokens=C, kl_coef=0.0, loss_type="grpo")
    assert objective.on_policy
    batch = {"completion_mask": jnp.asarray(inputs["completion_mask"], jnp.int32),
             "old_logps": jnp.zeros((B, C)), "ref_logps": jnp.zeros((B, C)),
             "advantages": jnp.asarray(inputs["advantages"], jnp.float32), "rewards": jnp.zeros(B),
             "group_std": jnp.zeros(B), "tokens_per_step": jnp.ones(B), "ids": jnp.zeros((B, C), jnp.int32)}
    totals = {**objective.totals(batch), "micro_batches": 1}
    (loss, stats), grad = jax.value_and_grad(lambda lp: objective.policy_loss(lp, jnp.zeros_like(lp), batch, totals),
                                             has_aux=True)(jnp.asarray(logps, jnp.float32))
    mask, adv = inputs["completion_mask"], inputs["advantages"]
    lengths = mask.sum(1)
    np.testing.assert_allclose(float(loss), -np.mean(adv), rtol=1e-6, atol=1e-6)  # ratio 1 everywhere
    np.testing.assert_allclose(np.asarray(grad), -adv[:, None] * mask / lengths[:, None] / B, atol=1e-7)
    assert float(stats["clip_low"]) == float(stats["clip_high"]) == 0.0 and "kl" not in stats


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_equal_trl(scale):
    rewards = np.random.default_rng(2).normal(0, 2, 4 * G)
    rewards[:G] = 1.0  # a group of equal rewards: advantage 0, std 0
    got, std = grpo.group_advantages(jnp.asarray(rewards, jnp.float32), G, scale=scale)
    r = torch.tensor(rewards, dtype=torch.float64)
    mean = r.view(-1, G).mean(1).repeat_interleave(G)
    want_std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G)  # TRL's (unbiased)
    want = (r - mean) / (want_std + 1e-4) if scale else r - mean
    # float32: r - mean carries a few eps32 x max|r|; scaling divides it by std + 1e-4 (std >= 0.1 here
    # outside the constant group, whose advantage is exactly 0).
    error = 20 * EPS32 * np.abs(rewards).max()
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=error / (0.1 if scale else 1.0))
    np.testing.assert_allclose(np.asarray(std), want_std.numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[:G] == 0)


def test_leave_one_out_advantages_equal_trl_rloo():
    rewards = np.random.default_rng(3).normal(0, 2, 3 * G)
    got = grpo.leave_one_out_advantages(jnp.asarray(rewards, jnp.float32), G)
    grouped = rewards.reshape(-1, G)
    baseline = (grouped.sum(1, keepdims=True) - grouped) / (G - 1)  # TRL RLOOTrainer's baseline
    np.testing.assert_allclose(np.asarray(got), (grouped - baseline).reshape(-1), rtol=1e-5, atol=1e-5)
    # Equivalently G / (G - 1) times GRPO's unscaled advantage.
    unscaled, _ = grpo.group_advantages(jnp.asarray(rewards, jnp.float32), G, scale=False)
    np.testing.assert_allclose(np.asarray(got), G / (G - 1) * np.asarray(unscaled), rtol=1e-5, atol=1e-5)
