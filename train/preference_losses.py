"""The offline preference losses, as pure functions of sequence log-probs (one value per row).

Axis letters: B batch. Inputs are [B] float32: the policy's (and the reference's) summed
log-probs of each response (`train.logprobs.sequence_logprobs`), or their per-token means
where a method length-normalizes. Each function returns the per-row loss [B]; the objective
(`train.objectives.dpo`) averages over rows and reports the rewards.

    sigmoid (DPO, Rafailov et al. 2023), conservative with label smoothing eps (cDPO):
        d = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        loss = -(1 - eps) log sigmoid(d) - eps log sigmoid(-d)
    ipo (Azar et al. 2023, eq. 17; log-ratios per response token, as TRL normalizes them):
        loss = ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2
    simpo (Meng et al. 2024; reference-free, on per-token mean log-probs, margin gamma):
        d = beta * (mean_c - mean_r) - gamma;   loss as sigmoid's (with eps, as TRL's CPO)
    orpo (Hong et al. 2024; on per-token mean log-probs):
        log_odds = (mean_c - mean_r) - (log(1 - exp(mean_c)) - log(1 - exp(mean_r)))
        loss = NLL(chosen) - beta * log sigmoid(log_odds)      (the NLL is the objective's)
    kto (Ethayarajh et al. 2024, eq. 7; unpaired, z = KL estimate, not differentiated):
        desirable:   w_d * (1 - sigmoid(beta * ((pi - ref) - z)))
        undesirable: w_u * (1 - sigmoid(beta * (z - (pi - ref))))

Rewards (TRL's `rewards/*`): beta * (pi - ref) for sigmoid, ipo and kto; beta * the mean
log-prob for simpo and orpo (TRL's CPO and ORPO trainers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("sigmoid", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")  # no reference model is built for these
LENGTH_NORMALIZED = ("simpo", "orpo")  # on per-token mean log-probs


def _smoothed(logits_B: jax.Array, label_smoothing: float) -> jax.Array:
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B) - label_smoothing * jax.nn.log_sigmoid(-logits_B)


def dpo_sigmoid(chosen_logratios_B: jax.Array, rejected_logratios_B: jax.Array, *, beta: float,
                label_smoothing: float = 0.0) -> jax.Array:
    """DPO's loss (conservative DPO with `label_smoothing` > 0), per row.

    Args:
      chosen_logratios_B, rejected_logratios_B: log pi(y|x) - log ref(y|x) of each response.
      beta: the KL coefficient.
      label_smoothing: eps, the probability that a label is flipped.
    """
    return _smoothed(beta * (chosen_logratios_B - rejected_logratios_B), label_smoothing)


def ipo(chosen_logratios_B: jax.Array, rejected_logratios_B: jax.Array, chosen_tokens_B: jax.Array,
        rejected_tokens_B: jax.Array, *, beta: float) -> jax.Array:
    """IPO's squared loss on per-token log-ratios (`beta` is the paper's tau), per row."""
    chosen = chosen_logratios_B / jnp.maximum(chosen_tokens_B, 1.0)
    rejected = rejected_logratios_B / jnp.maximum(rejected_tokens_B, 1.0)
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2


def simpo(chosen_mean_logps_B: jax.Array, rejected_mean_logps_B: jax.Array, *, beta: float, gamma: float,
          label_smoothing: float = 0.0) -> jax.Array:
    """SimPO's loss on per-token mean log-probs with target margin `gamma`, per row."""
    return _smoothed(beta * (chosen_mean_logps_B - rejected_mean_logps_B) - gamma, label_smoothing)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_log_odds(chosen_mean_logps_B: jax.Array, rejected_mean_logps_B: jax.Array) -> jax.Array:
    """ORPO's log odds ratio log(odds(chosen) / odds(rejected)), odds(y) = p / (1 - p), per row."""
    return (chosen_mean_logps_B - rejected_mean_logps_B) - (
        log1mexp(chosen_mean_logps_B) - log1mexp(rejected_mean_logps_B))


def kto(logratios_B: jax.Array, desirable_B: jax.Array, kl: jax.Array, *, beta: float,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> jax.Array:
    """KTO's loss of unpaired rows, per row.

    Args:
      logratios_B: log pi(y|x) - log ref(y|x).
      desirable_B: 1 for a desirable completion, 0 for an undesirable one.
      kl: the reference point z (a scalar, held constant: `kl_estimate`).
      beta, desirable_weight, undesirable_weight: KTO's beta, lambda_D and lambda_U.
    """
    kl = jax.lax.stop_gradient(kl)
    desirable = desirable_B.astype(jnp.float32)
    chosen = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratios_B - kl)))
    rejected = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - logratios_B)))
    return desirable * chosen + (1.0 - desirable) * rejected


def kl_estimate(kl_logratios_B: jax.Array, valid_B: jax.Array) -> jax.Array:
    """KTO's reference point: the mean over valid rows of the log-ratios of mismatched
    (prompt, completion) pairs, at least 0, without gradient (TRL's `kl`)."""
    valid = valid_B.astype(jnp.float32)
    mean = jnp.sum(kl_logratios_B * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))
