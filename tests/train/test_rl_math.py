"""train/rl_math.py against float64 numpy loops written from the formulas (TRL's PPOTrainer
loops, transliterated) and TRL's own functions where trl 1.16 exposes them."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.utils import entropy_from_logits

from train import logprobs, rl_math

EPS32 = float(np.finfo(np.float32).eps)


def _layout(rng, B=5, T=12):
    """Rows of prompt (varied length) + completion (varied length, some ending at T) + padding."""
    mask = np.zeros((B, T), np.int32)
    for b in range(B):
        start = rng.integers(1, 5)
        end = T if b == 0 else rng.integers(start + 1, T + 1)
        mask[b, start:end] = 1
    return mask


def _tol(magnitude, n):
    return 8 * EPS32 * np.sqrt(n) * magnitude + 1e-30


def np_masked_whiten(x, m, shift_mean=True):
    """TRL's masked_mean / masked_var(unbiased) / masked_whiten in float64."""
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n * n / (n - 1)
    out = (x - mean) / np.sqrt(var + 1e-8)
    return out if shift_mean else out + mean


def np_gae_trl(rewards, values, gamma, lam):
    """TRL PPOTrainer's loop over one row's completion (rewards/values [L])."""
    last, out = 0.0, []
    L = len(rewards)
    for t in reversed(range(L)):
        next_v = values[t + 1] if t < L - 1 else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = np.array(out[::-1])
    return adv, adv + values


def test_masked_whiten_matches_trl_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (4, 9))
    m = (rng.random((4, 9)) > 0.3).astype(np.int32)
    for shift in (True, False):
        got = np.asarray(rl_math.masked_whiten(jnp.asarray(x, jnp.float32), jnp.asarray(m), shift_mean=shift))
        want = np_masked_whiten(x, m, shift)
        np.testing.assert_allclose(got * m, want * m, atol=_tol(8.0, m.sum()), rtol=0)
    mean = float(rl_math.masked_mean(jnp.asarray(x, jnp.float32), jnp.asarray(m)))
    assert abs(mean - (x * m).sum() / m.sum()) < _tol(10.0, m.sum())


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0)])
def test_gae_matches_trl_loop_per_row(gamma, lam):
    rng = np.random.default_rng(1)
    mask = _layout(rng)
    B, T = mask.shape
    rewards, values = rng.normal(0, 1, (B, T)), rng.normal(0, 1, (B, T))
    adv, ret = rl_math.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                           jnp.asarray(mask), gamma, lam)
    adv, ret = np.asarray(adv), np.asarray(ret)
    for b in range(B):
        cols = np.flatnonzero(mask[b])
        want_adv, want_ret = np_gae_trl(rewards[b, cols], values[b, cols], gamma, lam)
        tol = _tol(4.0 * len(cols), len(cols))
        np.testing.assert_allclose(adv[b, cols], want_adv, atol=tol, rtol=0)
        np.testing.assert_allclose(ret[b, cols], want_ret, atol=tol, rtol=0)
        off = mask[b] == 0
        assert np.all(adv[b, off] == 0) and np.all(ret[b, off] == 0)


def test_gae_lambda_one_is_discounted_return_minus_value():
    """lambda = 1: A_t = sum_k gamma^k r_{t+k} - V_t (Monte Carlo), an identity independent of the loop."""
    rng = np.random.default_rng(2)
    mask = _layout(rng)
    rewards, values = rng.normal(0, 1, mask.shape), rng.normal(0, 1, mask.shape)
    gamma = 0.9
    adv, _ = rl_math.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask),
                         gamma, 1.0)
    for b in range(mask.shape[0]):
        cols = np.flatnonzero(mask[b])
        r = rewards[b, cols]
        mc = np.array([sum(gamma ** k * r[t + k] for k in range(len(r) - t)) for t in range(len(r))])
        np.testing.assert_allclose(np.asarray(adv)[b, cols], mc - values[b, cols], atol=_tol(8.0 * len(r), len(r)))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_shaped_rewards_score_at_last_token(estimator):
    rng = np.random.default_rng(3)
    mask = _layout(rng)
    B, T = mask.shape
    logps, ref = -rng.random((B, T)) * 3, -rng.random((B, T)) * 3
    score, beta = rng.normal(0, 1, B), 0.07
    rewards, kl = rl_math.shaped_rewards(jnp.asarray(score, jnp.float32), jnp.asarray(logps, jnp.float32),
                                         jnp.asarray(ref, jnp.float32), jnp.asarray(mask), beta, estimator)
    d = logps - ref
    want_kl = (d if estimator == "k1" else np.exp(-d) - 1 + d) * mask
    want = -beta * want_kl
    for b in range(B):
        want[b, np.flatnonzero(mask[b])[-1]] += score[b]
    np.testing.assert_allclose(np.asarray(kl), want_kl, atol=_tol(10.0, 1))
    np.testing.assert_allclose(np.asarray(rewards), want, atol=_tol(10.0, 1))


def test_whiten_rewards_keeps_mean_zeroes_padding():
    rng = np.random.default_rng(4)
    mask = _layout(rng)
    r = rng.normal(2.0, 3.0, mask.shape)
    got = np.asarray(rl_math.whiten_rewards(jnp.asarray(r, jnp.float32), jnp.asarray(mask)))
    np.testing.assert_allclose(got, np_masked_whiten(r, mask, shift_mean=False) * mask, atol=_tol(10.0, mask.sum()))


def test_clipped_losses_and_fractions():
    rng = np.random.default_rng(5)
    shape = (6, 10)
    logps, old = -rng.random(shape) * 2, -rng.random(shape) * 2
    adv = rng.normal(0, 1, shape)
    eps = 0.2
    loss, clipped = rl_math.clipped_surrogate(jnp.asarray(logps, jnp.float32), jnp.asarray(old, jnp.float32),
                                              jnp.asarray(adv, jnp.float32), eps)
    ratio = np.exp(logps - old)
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
    np.testing.assert_allclose(np.asarray(loss), np.maximum(l1, l2), rtol=_tol(4.0, 1), atol=_tol(4.0, 1))
    # Fractions compare float32 against float64 only where the two terms are not within rounding.
    decided = np.abs(l1 - l2) > 1e-5
    assert np.array_equal(np.asarray(clipped)[decided], (l2 > l1)[decided])
    assert 0 < np.asarray(clipped).mean() < 1

    values, old_v, returns, c = rng.normal(0, 1, shape), rng.normal(0, 1, shape), rng.normal(0, 1, shape), 0.2
    vloss, vclipped = rl_math.clipped_value_loss(jnp.asarray(values, jnp.float32), jnp.asarray(old_v, jnp.float32),
                                                 jnp.asarray(returns, jnp.float32), c)
    v1, v2 = (values - returns) ** 2, (np.clip(values, old_v - c, old_v + c) - returns) ** 2
    np.testing.assert_allclose(np.asarray(vloss), 0.5 * np.maximum(v1, v2), rtol=_tol(4.0, 1), atol=_tol(20.0, 1))
    decided = np.abs(v1 - v2) > 1e-5
    assert np.array_equal(np.asarray(vclipped)[decided], (v2 > v1)[decided])


def test_explained_variance():
    rng = np.random.default_rng(6)
    mask = _layout(rng)
    returns = rng.normal(0, 2, mask.shape)
    values = returns + rng.normal(0, 0.5, mask.shape)
    got = float(rl_math.explained_variance(jnp.asarray(values, jnp.float32), jnp.asarray(returns, jnp.float32),
                                           jnp.asarray(mask)))
    m = mask.astype(bool)
    want = 1 - np.var(returns[m] - values[m]) / np.var(returns[m])
    assert abs(got - want) < _tol(20.0, m.sum())
    assert float(rl_math.explained_variance(jnp.asarray(returns, jnp.float32), jnp.asarray(returns, jnp.float32),
                                            jnp.asarray(mask))) == pytest.approx(1.0, abs=1e-6)


def test_entropy_matches_trl():
    logits = np.random.default_rng(7).normal(0, 3, (3, 7, 11)).astype(np.float32)
    ours = np.asarray(logprobs.token_entropy(jnp.asarray(logits)))[:, 1:]  # token t from logits t - 1
    theirs = entropy_from_logits(torch.tensor(logits, dtype=torch.float64)).numpy()[:, :-1]
    np.testing.assert_allclose(ours, theirs, atol=_tol(np.log(11) * 4, 11))


def test_adaptive_kl_controller():
    """Ziegler et al.'s controller (TRL's old AdaptiveKLController.update) in float64, step by step."""
    ctl = rl_math.KLController(init=0.1, target=6.0, horizon=10000)
    coef, ref = ctl.init, 0.1
    for kl, n in [(12.0, 256), (6.6, 256), (1.0, 512), (6.0, 64)]:
        coef = ctl.update(coef, kl, n)
        ref *= 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * n / 10000
        assert coef == pytest.approx(ref, rel=1e-15)
    assert coef != 0.1
    fixed = rl_math.KLController(init=0.1)
    assert not fixed.adaptive and fixed.update(0.1, 100.0, 256) == 0.1
