"""The arithmetic of PPO for language models, pure and jittable (float32 in, float32 out).

Axis letters: B batch (rollout rows), T sequence.

Every [B, T] array is indexed like the row's token ids (`train.logprobs`): entry t belongs to
token t, the action taken from the state ids[< t]. So `logps[t]` is log pi(ids[t] | ids[< t])
and `values[t]` is V(ids[< t]), the value head's output at position t - 1. `mask[t]` is 1 on the
completion's tokens (the stop token included), 0 on the prompt and the padding; a row's
completion is contiguous (the prompt, then the completion, then padding).

The per-token reward of Ziegler et al. (2019) / Stiennon et al. (2020), as TRL's PPOTrainer
shapes it:

    kl_t      = logps_t - ref_logps_t                      (k1; k3: exp(-d) - 1 + d, d = logps - ref)
    reward_t  = -beta * kl_t  +  [t = last completion token] * score

(TRL adds the score one token after the last one, into the padding, whose value it keeps;
here the score lands on the last completion token itself, where the episode ends.)

GAE(gamma, lambda) (Schulman et al., 2016) over the masked tokens, the episode ending after the
last one (V = 0 beyond it):

    delta_t = reward_t + gamma * V_{t+1} * mask_{t+1} - V_t
    A_t     = mask_t * (delta_t + gamma * lambda * A_{t+1})
    R_t     = A_t + V_t                                     (the value targets, "returns")

The losses of one token (Schulman et al., 2017; TRL's PPOTrainer), ratio = exp(logps - old_logps):

    policy  max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    value   0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

and the KL controllers of Ziegler et al.: fixed (beta constant) or adaptive,

    beta <- beta * (1 + clip(KL / KL_target - 1, -0.2, 0.2) * n / horizon)

with KL the rollout's mean over rows of the summed per-token KL and n its rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KL_ESTIMATORS = ("k1", "k3")
WHITEN_EPS = 1e-8  # TRL's masked_whiten


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask) over `axis` (None: all), in float32."""
    return jnp.sum(x.astype(jnp.float32) * mask.astype(jnp.float32), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask) / sum(mask) over `axis` (None: all); TRL's `masked_mean` (0 where the mask is empty)."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask.astype(jnp.float32), axis=axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """The variance of the masked entries (TRL's `masked_var`):

        var = mean_m((x - mean_m(x))^2) * (n / (n - 1) if unbiased),   n = sum(mask)
    """
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered * centered, mask)
    if unbiased:
        n = jnp.sum(mask.astype(jnp.float32))
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """TRL's `masked_whiten`: (x - mean) / sqrt(var + 1e-8) over the masked entries (unbiased
    variance); `shift_mean=False` adds the mean back (rewards keep their sign). Every entry is
    transformed; zero the unmasked ones yourself if they must stay 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


def last_token_index(mask_BT: jax.Array) -> jax.Array:
    """[B] the index of each row's last masked token (T - 1 for a row with none: check `any`)."""
    T = mask_BT.shape[1]
    return T - 1 - jnp.argmax(mask_BT[:, ::-1] > 0, axis=1)


def per_token_kl(logps_BT: jax.Array, ref_logps_BT: jax.Array, estimator: str = "k1") -> jax.Array:
    """[B, T] the sampled tokens' KL estimate to the reference: k1 = d, k3 = exp(-d) - 1 + d
    with d = logps - ref_logps (Schulman's estimators; TRL's `kl_estimator`)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    d = logps_BT - ref_logps_BT
    return d if estimator == "k1" else jnp.expm1(-d) + d


def shaped_rewards(score_B: jax.Array, logps_BT: jax.Array, ref_logps_BT: jax.Array, mask_BT: jax.Array,
                   kl_coef, estimator: str = "k1") -> tuple[jax.Array, jax.Array]:
    """(rewards [B, T], kl [B, T]) of the module docstring: -kl_coef * KL on every completion
    token, the sequence's score added at its last one; 0 off the mask.

    Args:
      score_B: each row's reward (the reward functions' weighted sum).
      logps_BT, ref_logps_BT: the sampled tokens' log-probs under the policy that sampled them
        and under the reference.
      mask_BT: the completion tokens.
      kl_coef: beta (a float or a traced scalar).
      estimator: k1 | k3 (`per_token_kl`).
    """
    m = mask_BT.astype(jnp.float32)
    kl_BT = per_token_kl(logps_BT, ref_logps_BT, estimator) * m
    T = mask_BT.shape[1]
    last_BT = (jnp.arange(T)[None, :] == last_token_index(mask_BT)[:, None]) & (mask_BT > 0)
    rewards_BT = -kl_coef * kl_BT + jnp.where(last_BT, score_B.astype(jnp.float32)[:, None], 0.0)
    return rewards_BT, kl_BT


def whiten_rewards(rewards_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """TRL's `whiten_rewards`: the masked rewards scaled to unit variance, their mean kept
    (`masked_whiten(shift_mean=False)`), 0 off the mask."""
    return masked_whiten(rewards_BT, mask_BT, shift_mean=False) * mask_BT.astype(jnp.float32)


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """(advantages [B, T], returns [B, T]) by GAE(gamma, lambda) over the masked tokens (module
    docstring); both 0 off the mask. A reverse `lax.scan` over T."""
    m_BT = mask_BT.astype(jnp.float32)
    r_BT, v_BT = rewards_BT.astype(jnp.float32) * m_BT, values_BT.astype(jnp.float32) * m_BT
    # The next token's value (0 past the sequence's end or the completion's).
    next_v_BT = jnp.pad(v_BT[:, 1:], ((0, 0), (0, 1)))
    delta_BT = (r_BT + gamma * next_v_BT - v_BT) * m_BT

    def back(carry_B, xs):
        delta_B, m_B = xs
        a_B = m_B * (delta_B + gamma * lam * carry_B)
        return a_B, a_B

    _, adv_TB = jax.lax.scan(back, jnp.zeros(rewards_BT.shape[0], jnp.float32), (delta_BT.T, m_BT.T), reverse=True)
    adv_BT = adv_TB.T
    return adv_BT, (adv_BT + v_BT) * m_BT


def clipped_surrogate(logps_BT: jax.Array, old_logps_BT: jax.Array, advantages_BT: jax.Array,
                      clip_eps: float) -> tuple[jax.Array, jax.Array]:
    """(per-token policy loss [B, T], clipped [B, T] float 0/1) of PPO's clipped surrogate:
    max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logps - old_logps); clipped where the
    clipped term is the larger (TRL's `pg_clipfrac`)."""
    ratio_BT = jnp.exp(logps_BT - old_logps_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps)
    return jnp.maximum(unclipped_BT, clipped_BT), (clipped_BT > unclipped_BT).astype(jnp.float32)


def clipped_value_loss(values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array,
                       vf_clip: float) -> tuple[jax.Array, jax.Array]:
    """(per-token value loss [B, T], clipped [B, T] float 0/1):
    0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) (TRL's `vf_loss` before its mean);
    clipped where the clipped error is the larger (`vf_clipfrac`)."""
    clipped_values_BT = jnp.clip(values_BT, old_values_BT - vf_clip, old_values_BT + vf_clip)
    plain_BT = jnp.square(values_BT - returns_BT)
    clipped_BT = jnp.square(clipped_values_BT - returns_BT)
    return 0.5 * jnp.maximum(plain_BT, clipped_BT), (clipped_BT > plain_BT).astype(jnp.float32)


def explained_variance(values_BT: jax.Array, returns_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """1 - Var(R - V) / Var(R) over the masked tokens (1: the values predict the returns; 0: no
    better than their mean); 0 when the returns do not vary."""
    var_r = masked_var(returns_BT, mask_BT, unbiased=False)
    var_d = masked_var(returns_BT - values_BT, mask_BT, unbiased=False)
    return jnp.where(var_r > 0, 1.0 - var_d / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def approx_kl(logps_BT: jax.Array, old_logps_BT: jax.Array) -> jax.Array:
    """[B, T] 0.5 (logps - old_logps)^2, TRL's `approxkl` term: how far an update moved the policy."""
    return 0.5 * jnp.square(logps_BT - old_logps_BT)


@dataclasses.dataclass(frozen=True)
class KLController:
    """The KL coefficient beta between rollouts (Ziegler et al., 2019).

    Attributes:
      init: beta of the first rollout (`rl.kl_coef`).
      target: the KL (nats per sequence) the adaptive controller steers to (`rl.kl_target`);
        0: fixed, beta stays `init`.
      horizon: its time constant in rollout rows (`rl.kl_horizon`).
    """

    init: float
    target: float = 0.0
    horizon: float = 10000.0

    @property
    def adaptive(self) -> bool:
        return self.target > 0

    def update(self, coef: float, kl: float, num_rows: int) -> float:
        """beta after a rollout of `num_rows` rows whose mean sequence KL was `kl` (host floats):
        beta * (1 + clip(kl / target - 1, -0.2, 0.2) * num_rows / horizon), or beta if fixed."""
        if not self.adaptive:
            return float(coef)
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        return float(coef) * (1.0 + error * num_rows / self.horizon)
