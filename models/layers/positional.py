"""Positional encodings: sinusoidal, learned, and rotary (RoPE).

Axis letters: B batch, T length, D model width, N heads, H head dim.

RoPE's frequencies come from `rope_frequencies`, which looks the scaling kind up in
`ROPE_SCALINGS`. A long-context scaling (NTK, YaRN, Llama 3, ...) is one more entry
there: a function (inv_freq, config, head_dim) -> (inv_freq, attention_factor).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def sinusoidal_embedding(positions_BT: jax.Array, d_model: int, base: float = 10000.0) -> jax.Array:
    """The fixed encoding of Vaswani et al. 2017, computed for any integer positions.

    PE[pos, 2i] = sin(pos / base^(2i/D)),  PE[pos, 2i+1] = cos(pos / base^(2i/D)).

    Returns:
      float32 [..., D] (same leading shape as `positions_BT`).
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal encoding needs an even d_model, got {d_model}")
    inv_freq = base ** (-np.arange(0, d_model, 2, dtype=np.float32) / d_model)
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    # Interleave sin and cos: [..., D/2, 2] -> [..., D].
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], d_model)


class LearnedPositionalEmbedding(nn.Module):
    """A trained table of `max_len` position vectors (BERT, GPT-2)."""

    max_len: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, positions_BT: jax.Array) -> jax.Array:
        table = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, (None, "embed")),
            (self.max_len, self.features), self.param_dtype,
        )
        return jnp.take(table, positions_BT, axis=0).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (Su et al. 2021).

    Attributes:
      theta: the base of the frequencies, theta^(-2i/H).
      interleaved: rotate adjacent pairs (x0, x1), (x2, x3)... (the paper, GPT-J); if
        False rotate the two halves (x_i, x_{i+H/2}) as Hugging Face LLaMA/Qwen do.
      fraction: the share of each head's dims that is rotated (GPT-NeoX partial RoPE).
      scaling: a key of ROPE_SCALINGS.
      factor: context extension factor for the scalings that use it.
      original_max_len: the pre-training context length, for the scalings that use it.
    """

    theta: float = 10000.0
    interleaved: bool = False
    fraction: float = 1.0
    scaling: str = "default"
    factor: float = 1.0
    original_max_len: int = 2048


def _no_scaling(inv_freq: np.ndarray, config: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    return inv_freq, 1.0


def _linear_scaling(inv_freq: np.ndarray, config: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Position interpolation (Chen et al. 2023): positions divided by `factor`."""
    return inv_freq / config.factor, 1.0


ROPE_SCALINGS: dict[str, Callable[[np.ndarray, RopeConfig, int], tuple[np.ndarray, float]]] = {
    "default": _no_scaling,
    "linear": _linear_scaling,
}


def rope_frequencies(config: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [R/2] (R = rotated dims) and the attention factor of a scaling.

    Computed in float64 numpy at trace time: they are constants of the model.
    """
    if config.scaling not in ROPE_SCALINGS:
        raise ValueError(f"unknown RoPE scaling {config.scaling!r}; expected one of {tuple(ROPE_SCALINGS)}")
    rotary_dim = int(head_dim * config.fraction)
    if rotary_dim % 2 or rotary_dim == 0:
        raise ValueError(f"RoPE needs an even, non-zero number of rotated dims, got {rotary_dim}")
    inv_freq = config.theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    return ROPE_SCALINGS[config.scaling](inv_freq, config, head_dim)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, config: RopeConfig) -> jax.Array:
    """Rotates queries or keys by their positions; the math runs in float32.

    Args:
      x_BTNH: [B, T, N, H] queries or keys.
      positions_BT: [B, T] integer positions.
      config: the RoPE settings.

    Returns:
      The rotated array, same shape and dtype as `x_BTNH`. The scaling's attention
      factor (YaRN's mscale) multiplies both q and k, as in the reference code.
    """
    H = x_BTNH.shape[-1]
    inv_freq, attention_factor = rope_frequencies(config, H)
    R = 2 * inv_freq.shape[0]
    angles_BTR = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    sin = jnp.sin(angles_BTR)[:, :, None, :] * attention_factor
    cos = jnp.cos(angles_BTR)[:, :, None, :] * attention_factor
    x = x_BTNH.astype(jnp.float32)
    rot, rest = x[..., :R], x[..., R:]
    if config.interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = rot[..., : R // 2], rot[..., R // 2 :]
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated, rest], axis=-1).astype(x_BTNH.dtype)
