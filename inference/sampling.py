"""Logits filters for sampling, as pure functions, and the sampler that chains them.

Axis letters: B batch (rows decoded together), V vocabulary.

Every filter maps float32 logits [B, V] to logits [B, V] with the removed tokens set to
-inf, and matches transformers' logits processor of the same name (ties and the
keep-at-least-one rule included); `process_logits` applies them in transformers' order:

    repetition penalty -> temperature -> top-k -> top-p -> min-p

Temperature 0 means greedy decoding: the argmax of the (penalised) logits, the other
filters being irrelevant to it, as in transformers' `do_sample=False`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits (frozen: a static argument of `jit`).

    Attributes:
      temperature: 0 for greedy; otherwise logits are divided by it before sampling.
      top_k: keep the k most likely tokens (None: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (nucleus sampling; None: all).
      min_p: keep tokens whose probability is at least min_p times the top token's.
      repetition_penalty: divide positive (multiply negative) logits of the tokens already
        in the prompt or the generated text by this (None or 1: no penalty).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be a positive integer or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] or None")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] or None")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalises_repetition(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0


def repetition_penalty(logits_BV: Array, seen_BV: Array, penalty: float) -> Array:
    """CTRL's penalty (Keskar et al. 2019) as transformers applies it: for each token already
    seen (`seen_BV` True), a positive logit is divided by `penalty`, a negative one
    multiplied, so that penalty > 1 always makes it less likely."""
    penalised = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def top_k_filter(logits_BV: Array, k: int) -> Array:
    """Keeps the tokens whose logit is at least the k-th largest (ties with it stay)."""
    k = min(k, logits_BV.shape[-1])
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: Array, p: float) -> Array:
    """Nucleus filter: removes the least likely tokens whose probabilities sum to at most 1 - p.

    As transformers: sort ascending, remove while the running probability is <= 1 - p, and
    always keep the most likely token.
    """
    B = logits_BV.shape[0]
    order_BV = jnp.argsort(logits_BV, axis=-1)  # ascending
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    remove_sorted_BV = (cumulative_BV <= 1 - p).at[:, -1].set(False)
    remove_BV = jnp.zeros_like(remove_sorted_BV).at[jnp.arange(B)[:, None], order_BV].set(remove_sorted_BV)
    return jnp.where(remove_BV, -jnp.inf, logits_BV)


def min_p_filter(logits_BV: Array, min_p: float) -> Array:
    """Removes tokens whose probability is below min_p times the most likely token's (which stays)."""
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    threshold_B1 = min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
    keep_BV = (probs_BV >= threshold_B1) | (jnp.arange(logits_BV.shape[-1]) == jnp.argmax(probs_BV, -1)[:, None])
    return jnp.where(keep_BV, logits_BV, -jnp.inf)


def process_logits(logits_BV: Array, config: SamplingConfig, seen_BV: Array | None = None) -> Array:
    """The filters of `config` in transformers' order; temperature 0 skips the sampling filters.

    Args:
      logits_BV: [B, V] next-token logits.
      config: the sampling settings.
      seen_BV: [B, V] bool, the tokens already in each row (for the repetition penalty).

    Returns:
      float32 [B, V] logits; removed tokens are -inf.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if config.penalises_repetition:
        if seen_BV is None:
            raise ValueError("repetition_penalty needs seen_BV, the tokens already present in each row")
        logits_BV = repetition_penalty(logits_BV, seen_BV, config.repetition_penalty)
    if config.greedy:
        return logits_BV
    logits_BV = logits_BV / config.temperature
    if config.top_k is not None:
        logits_BV = top_k_filter(logits_BV, config.top_k)
    if config.top_p is not None and config.top_p < 1.0:
        logits_BV = top_p_filter(logits_BV, config.top_p)
    if config.min_p is not None:
        logits_BV = min_p_filter(logits_BV, config.min_p)
    return logits_BV


def sample(logits_BV: Array, config: SamplingConfig, rng: Array, seen_BV: Array | None = None) -> Array:
    """Next tokens [B] (int32): the argmax if greedy, else a draw from the filtered softmax."""
    logits_BV = process_logits(logits_BV, config, seen_BV)
    if config.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


class RowSampling(NamedTuple):
    """Sampling settings as data, one per row ([B] arrays), for a step that serves rows with
    different settings and compiles once (`inference/engine.py`). A row's "off" values leave
    its logits unchanged: top_k = V, top_p = 1, min_p = 0, repetition_penalty = 1."""

    temperature_B: Array
    top_k_B: Array
    top_p_B: Array
    min_p_B: Array
    repetition_penalty_B: Array

    @classmethod
    def of(cls, configs: Sequence[SamplingConfig], vocab_size: int) -> RowSampling:
        """Stacks per-row `SamplingConfig`s as numpy columns (None settings become the off values)."""
        def column(name, off, dtype):
            return np.asarray([off if getattr(c, name) is None else getattr(c, name) for c in configs], dtype)

        return cls(column("temperature", 0.0, np.float32),
                   np.minimum(column("top_k", vocab_size, np.int32), vocab_size),
                   column("top_p", 1.0, np.float32), column("min_p", 0.0, np.float32),
                   column("repetition_penalty", 1.0, np.float32))


def sample_rows(logits_BV: Array, rows: RowSampling, keys_B: Array, seen_BV: Array) -> Array:
    """Next tokens [B] with each row's own settings and random key.

    The same filters as `process_logits`, with the settings as [B, 1] arrays; a row
    draws as `sample` would for that row alone with its key (the same Gumbel noise: a
    [1, V] draw and a [V] draw from one key are the same numbers).

    Args:
      logits_BV: [B, V] next-token logits.
      rows: the settings of each row; temperature 0 rows take the argmax.
      keys_B: [B] PRNG keys, one per row.
      seen_BV: [B, V] bool, the tokens already in each row (repetition penalty).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    logits_BV = repetition_penalty(logits_BV, seen_BV, rows.repetition_penalty_B[:, None])
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    temperature_B1 = rows.temperature_B[:, None]
    logits_BV = logits_BV / jnp.where(temperature_B1 > 0, temperature_B1, 1.0)
    # top-k with k as data: the k-th largest logit from a full sort (lax.top_k needs a static k).
    kth_B1 = jnp.take_along_axis(-jnp.sort(-logits_BV, axis=-1), rows.top_k_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    top_p_B1 = rows.top_p_B[:, None]
    logits_BV = jnp.where(top_p_B1 < 1.0, top_p_filter(logits_BV, top_p_B1), logits_BV)
    logits_BV = min_p_filter(logits_BV, rows.min_p_B[:, None])
    sampled_B = jax.vmap(lambda key, row_V: jax.random.categorical(key, row_V))(keys_B, logits_BV)
    return jnp.where(rows.temperature_B > 0, sampled_B.astype(jnp.int32), greedy_B)
