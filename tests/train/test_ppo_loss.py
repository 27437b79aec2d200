"""The PPO objective's loss on hand-made experience batches: value and gradient against an
independent float64 torch computation (TRL's PPOTrainer loss, written out), the accumulation
contract, the experience assembly against float64 numpy, and the value-head variants."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import base
from models.policy_value import PolicyWithValueModel, policy_model, policy_params, with_value_model
from train import build
from train import trainable as trainable_lib
from train.objectives import ppo

EPS32 = float(np.finfo(np.float32).eps)
B, T, V = 6, 10, 13


def _batch(rng, logps):
    """A hand-made minibatch whose ratios and value moves are either well inside or well
    outside the clip ranges (no float32-vs-float64 branch flips)."""
    mask = np.zeros((B, T), np.int32)
    for b in range(B):
        start = rng.integers(2, 5)
        mask[b, start:rng.integers(start + 1, T + 1)] = 1
    moves = rng.choice([-0.5, -0.05, 0.05, 0.5], (B, T))
    values = rng.normal(0, 1, (B, T))
    return {
        "completion_mask": mask,
        "old_logps": ((logps + rng.choice([-0.5, -0.05, 0.05, 0.5], (B, T))) * mask).astype(np.float32),
        "old_values": ((values + moves) * mask).astype(np.float32),
        "advantages": (rng.normal(0, 1, (B, T)) * mask).astype(np.float32),
        "returns": (rng.normal(0, 1, (B, T)) * mask).astype(np.float32),
        **{k: rng.normal(0, 1, B).astype(np.float32) for k in ppo.ROLLOUT_KEYS},
    }


def _torch_loss(logits, scores, ids, batch, s):
    """TRL PPOTrainer's loss in float64: token log-probs from the logits one position back,
    values from the value head one position back, masked means over the completion tokens."""
    lg = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    sc = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    t = {k: torch.tensor(np.asarray(v), dtype=torch.float64) for k, v in batch.items()}
    logp_all = torch.log_softmax(lg[:, :-1] * s.logit_scale, dim=-1)
    new = torch.gather(logp_all, 2, torch.tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0]
    new = torch.cat([torch.zeros(B, 1, dtype=torch.float64), new], dim=1)
    vpred = torch.cat([torch.zeros(B, 1, dtype=torch.float64), sc[:, :-1, 0]], dim=1)
    m = t["completion_mask"]
    ratio = torch.exp(new - t["old_logps"])
    pg = torch.max(-t["advantages"] * ratio, -t["advantages"] * torch.clamp(ratio, 1 - s.clip_eps, 1 + s.clip_eps))
    vclipped = torch.max(torch.min(vpred, t["old_values"] + s.vf_clip), t["old_values"] - s.vf_clip)
    vf = 0.5 * torch.max((vpred - t["returns"]) ** 2, (vclipped - t["returns"]) ** 2)
    loss = (pg * m).sum() / m.sum() + s.vf_coef * (vf * m).sum() / m.sum()
    loss.backward()
    return loss.item(), lg.grad.numpy(), sc.grad.numpy()


def test_loss_and_gradient_match_float64_torch():
    rng = np.random.default_rng(0)
    settings = ppo.PPOSettings(clip_eps=0.2, vf_clip=0.2, vf_coef=0.3, logit_scale=1 / 0.7)
    objective = ppo.PPOObjective(model=None, settings=settings)
    logits = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    scores = rng.normal(0, 1, (B, T, 1)).astype(np.float32)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    logps, _, _ = ppo.from_outputs(jnp.asarray(logits), jnp.asarray(scores), jnp.asarray(ids), settings.logit_scale)
    batch = {"ids": ids, **_batch(rng, np.asarray(logps))}
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    totals = objective.totals(jbatch)

    def loss_fn(lg, sc):
        return objective.loss_of_outputs(lg, sc, jbatch, totals)

    (loss, stats), (g_lg, g_sc) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        jnp.asarray(logits), jnp.asarray(scores))
    want, want_lg, want_sc = _torch_loss(logits, scores, ids, {k: v for k, v in batch.items() if k != "ids"},
                                         settings)
    n = batch["completion_mask"].sum()
    assert abs(float(loss) - want) <= 16 * EPS32 * np.sqrt(n) * max(abs(want), 1.0)
    for got, ref in ((g_lg, want_lg), (g_sc, want_sc)):
        scale = np.abs(ref).max()
        np.testing.assert_allclose(np.asarray(got), ref, atol=16 * EPS32 * np.sqrt(V) * scale + 1e-12, rtol=0)
    # Both branches of both clips occur, so the test exercises each.
    assert 0.1 < float(stats["clip_fraction"]) < 0.9 and 0.1 < float(stats["value_clip_fraction"]) < 0.9
    np.testing.assert_allclose(float(stats["reward"]), batch["reward"].mean(), rtol=1e-6)


def test_micro_batch_shares_sum_to_the_whole():
    rng = np.random.default_rng(1)
    objective = ppo.PPOObjective(model=None, settings=ppo.PPOSettings(vf_coef=0.5))
    logits = jnp.asarray(rng.normal(0, 1, (B, T, V)), jnp.float32)
    scores = jnp.asarray(rng.normal(0, 1, (B, T, 1)), jnp.float32)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    logps, _, _ = ppo.from_outputs(logits, scores, jnp.asarray(ids))
    batch = {k: jnp.asarray(v) for k, v in {"ids": ids, **_batch(rng, np.asarray(logps))}.items()}
    totals = objective.totals(batch)
    whole, whole_stats = objective.loss_of_outputs(logits, scores, batch, totals)
    parts = [objective.loss_of_outputs(logits[sl], scores[sl], {k: v[sl] for k, v in batch.items()}, totals)
             for sl in (slice(0, 2), slice(2, B))]
    assert abs(float(parts[0][0] + parts[1][0]) - float(whole)) <= 1e-6 * max(abs(float(whole)), 1)
    for key in ("entropy", "kl", "clip_fraction"):
        assert abs(float(parts[0][1][key] + parts[1][1][key]) - float(whole_stats[key])) <= 1e-5


def _tiny_config(value_head="shared", method="full"):
    config = base.get_config()
    config.objective = "ppo"
    config.model.update(family="llama", num_layers=1, max_len=16, positional="rope", tie_embeddings=False)
    config.model.block.update(d_model=16, num_heads=2, num_kv_heads=1, d_ff=32, mlp_activation="swiglu",
                              norm="rmsnorm", use_bias=False)
    config.data.update(seq_len=12, batch_size=4)
    config.rl.value_head = value_head
    config.finetune.method = method
    return config


def test_experience_batch_matches_float64_numpy():
    """Rewards, GAE and whitened advantages of one rollout against float64 loops on the same
    model outputs (TRL's order: shaped rewards, optional reward whitening, GAE, advantage whitening)."""
    config = _tiny_config()
    model = build.model(config, 20)
    params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 20, (4, 12)).astype(np.int32)
    mask = np.zeros((4, 12), np.int32)
    for b, (start, stop) in enumerate([(3, 12), (2, 6), (5, 9), (4, 5)]):
        mask[b, start:stop] = 1
    ref = (rng.normal(-3, 0.3, (4, 12)) * mask).astype(np.float32)
    score = rng.normal(0, 1, 4).astype(np.float32)
    for whiten in (False, True):
        s = ppo.PPOSettings(gamma=0.95, lam=0.9, whiten_rewards=whiten, logit_scale=1.25)
        experience = jax.jit(functools.partial(ppo.experience_batch, model=model, settings=s))
        batch, kl_mean = experience(nn_unbox(params), {}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(ref),
                                    jnp.asarray(score), 0.07)
        logps, _, values = jax.jit(functools.partial(ppo.policy_outputs, model, logit_scale=1.25))(
            nn_unbox(params), jnp.asarray(ids))
        logps, values = np.asarray(logps, np.float64) * mask, np.asarray(values, np.float64) * mask
        kl = (logps - ref) * mask
        rewards = -0.07 * kl
        for b in range(4):
            rewards[b, np.flatnonzero(mask[b])[-1]] += score[b]
        if whiten:
            mu = rewards[mask > 0].mean()
            rewards = ((rewards - mu) / np.sqrt(rewards[mask > 0].var(ddof=1) + 1e-8) + mu) * mask
        adv = np.zeros((4, 12))
        for b in range(4):
            last = 0.0
            for t in reversed(range(12)):
                if not mask[b, t]:
                    continue
                next_v = values[b, t + 1] if t + 1 < 12 and mask[b, t + 1] else 0.0
                last = rewards[b, t] + 0.95 * next_v - values[b, t] + 0.95 * 0.9 * last
                adv[b, t] = last
        returns = (adv + values) * mask
        a = adv[mask > 0]
        whitened = (adv - a.mean()) / np.sqrt(a.var(ddof=1) + 1e-8) * mask
        tol = 32 * EPS32 * 12 * max(np.abs(returns).max(), 1.0)
        np.testing.assert_allclose(np.asarray(batch["returns"]), returns, atol=tol)
        np.testing.assert_allclose(np.asarray(batch["advantages"]), whitened, atol=tol * 10)
        np.testing.assert_allclose(np.asarray(batch["kl"]), kl.sum(1), atol=tol)
        assert abs(float(kl_mean) - kl.sum(1).mean()) <= tol
        m = mask > 0
        ev = 1 - np.var(returns[m] - values[m]) / np.var(returns[m])
        np.testing.assert_allclose(np.asarray(batch["explained_variance"]), ev, atol=1e-4)


def nn_unbox(tree):
    import flax.linen as nn

    return nn.unbox(tree)


def test_separate_value_model_keeps_the_policy_tree():
    config = _tiny_config("separate")
    model = build.model(config, 20)
    assert isinstance(model, PolicyWithValueModel)
    assert with_value_model(model) is model  # init_from's model is wrapped once, not twice
    ids = jnp.asarray(np.random.default_rng(3).integers(1, 20, (2, 12)), jnp.int32)
    params = nn_unbox(model.init(jax.random.key(0), ids)["params"])
    plain = build.model(_tiny_config("shared").copy_and_resolve_references(), 20)
    plain = policy_model(plain)  # the LM-head GPT of the same architecture
    lm_only = jax.eval_shape(lambda: nn_unbox(plain.init(jax.random.key(0), ids)["params"]))
    # The policy's leaves sit exactly where a plain GPT keeps them.
    assert jax.tree.structure(policy_params(params)) == jax.tree.structure(lm_only)
    logits, values = model.apply({"params": params}, ids)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain.apply({"params": policy_params(params)}, ids)))
    assert values.shape == (2, 12, 1)
    # A value model of its own: its trunk differs from the policy's.
    assert not np.allclose(np.asarray(params["value_model"]["embed"]["embedding"]),
                           np.asarray(params["embed"]["embedding"]))


def test_value_heads_train_under_lora():
    for head, wanted in (("shared", {"score"}), ("separate", {"value_model/score"})):
        config = _tiny_config(head, method="lora")
        config.finetune.lora.update(rank=2)
        model = build.model(config, 20)
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
        objective = ppo.make(config, model, None)
        trainable, _ = trainable_lib.split(params, config, objective_head=objective.trainable_head)
        paths = set(trainable_lib.paths(trainable))
        assert wanted <= paths, paths
        assert all("lora" in p or p in wanted for p in paths), paths
        if head == "separate":  # the value model's trunk trains through adapters of its own
            assert any(p.startswith("value_model/") and "lora" in p for p in paths)
            assert any(not p.startswith("value_model/") and "lora" in p for p in paths)


def test_bad_config_is_one_line():
    import pytest

    config = _tiny_config()
    for key, value, words in (("value_head", "both", "rl.value_head"), ("minibatches", 3, "rl.minibatches"),
                              ("epochs", 0, "rl.epochs"), ("temperature", 0.0, "rl.temperature"),
                              ("kl_target", -1.0, "rl.kl_target"), ("gamma", 1.5, "rl.gamma")):
        bad = config.copy_and_resolve_references()
        bad.rl[key] = value
        with pytest.raises(ValueError, match=words.replace(".", r"\.")) as e:
            ppo.check_config(bad, None)
        assert "\n" not in str(e.value)


def test_policy_model_is_the_lm_head():
    model = build.model(_tiny_config(), 20)
    assert model.config.head == "lm_score" and policy_model(model).config.head == "lm"
    assert dataclasses.replace(policy_model(model).config, head="lm_score") == model.config
