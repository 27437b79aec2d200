"""Positional encodings: sinusoidal, learned, and rotary (RoPE).

Axis letters: B batch, T length, D model width, N heads, H head dim.

RoPE's frequencies come from `rope_frequencies`, which looks the scaling kind up in
`ROPE_SCALINGS`. A long-context scaling is one more entry there: a function
(inv_freq, config, head_dim, seq_len) -> (inv_freq, attention_factor). The entries
"linear", "llama3", "yarn" and "dynamic" follow Hugging Face transformers'
`modeling_rope_utils` formula for formula; `rope_config_from_hf` maps a transformers
config's `rope_parameters` (or legacy `rope_scaling`) onto `RopeConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

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
      factor: context extension factor for the scalings that use it (all but "default").
      original_max_len: the pre-training context length, for "llama3", "yarn" and
        "dynamic" (HF's `original_max_position_embeddings`; for "dynamic" HF uses the
        config's `max_position_embeddings`, which `rope_config_from_hf` puts here).
      low_freq_factor, high_freq_factor: "llama3" only. Wavelengths above
        original_max_len / low_freq_factor are divided by `factor`, those below
        original_max_len / high_freq_factor are kept, and the band between is smoothed.
      beta_fast, beta_slow: "yarn" only; the rotation counts bounding the NTK-by-parts ramp.
      mscale, mscale_all_dim: "yarn" only; when both are set (non-zero), the attention
        factor is (0.1 mscale ln f + 1) / (0.1 mscale_all_dim ln f + 1) (DeepSeek-V3).
      attention_factor: "yarn" only; overrides the derived factor (default
        0.1 ln(factor) + 1) that multiplies cos and sin.
      truncate: "yarn" only; round the ramp's bounds outward to whole dims.
    """

    theta: float = 10000.0
    interleaved: bool = False
    fraction: float = 1.0
    scaling: str = "default"
    factor: float = 1.0
    original_max_len: int = 2048
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


ScalingFn = Callable[[np.ndarray, RopeConfig, int, int | None], tuple[np.ndarray, float]]


def _no_scaling(inv_freq: np.ndarray, config: RopeConfig, head_dim: int,
                seq_len: int | None) -> tuple[np.ndarray, float]:
    return inv_freq, 1.0


def _linear_scaling(inv_freq: np.ndarray, config: RopeConfig, head_dim: int,
                    seq_len: int | None) -> tuple[np.ndarray, float]:
    """Position interpolation (Chen et al. 2023): positions divided by `factor`."""
    return inv_freq / config.factor, 1.0


def _llama3_scaling(inv_freq: np.ndarray, config: RopeConfig, head_dim: int,
                    seq_len: int | None) -> tuple[np.ndarray, float]:
    """Llama 3.1: interpolate long wavelengths, keep short ones, smooth the band between."""
    L, factor = config.original_max_len, config.factor
    low, high = config.low_freq_factor, config.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > L / low, inv_freq / factor, inv_freq)
    smooth = (L / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < L / high) & ~(wavelen > L / low)
    return np.where(is_medium, smoothed, scaled), 1.0


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scaling(inv_freq: np.ndarray, config: RopeConfig, head_dim: int,
                  seq_len: int | None) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al. 2023): NTK-by-parts interpolation plus an attention factor."""
    R, factor = 2 * inv_freq.shape[0], config.factor
    if config.attention_factor is not None:
        attention_factor = config.attention_factor
    elif config.mscale and config.mscale_all_dim:  # truthiness, as in HF: 0 means unset
        attention_factor = _yarn_mscale(factor, config.mscale) / _yarn_mscale(factor, config.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # The dim whose wavelength fits `num_rotations` times in the original context.
        return R * math.log(config.original_max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(config.theta))

    low, high = correction_dim(config.beta_fast), correction_dim(config.beta_slow)
    if config.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, R - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(R // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # 1 for the fast dims, which keep their frequency
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def _dynamic_ntk_scaling(inv_freq: np.ndarray, config: RopeConfig, head_dim: int,
                         seq_len: int | None) -> tuple[np.ndarray, float]:
    """Dynamic NTK: the base grows once the sequence is longer than `original_max_len`.

    `seq_len` None or at most original_max_len leaves the frequencies unscaled.
    """
    R, L, factor = 2 * inv_freq.shape[0], config.original_max_len, config.factor
    seq_len = max(seq_len or L, L)
    base = config.theta * ((factor * seq_len / L) - (factor - 1)) ** (R / (R - 2))
    return base ** (-np.arange(0, R, 2, dtype=np.float64) / R), 1.0


ROPE_SCALINGS: dict[str, ScalingFn] = {
    "default": _no_scaling,
    "linear": _linear_scaling,
    "llama3": _llama3_scaling,
    "yarn": _yarn_scaling,
    "dynamic": _dynamic_ntk_scaling,
}


def _check_scaling(config: RopeConfig, rotary_dim: int) -> None:
    """Raises ValueError naming the first RopeConfig field its scaling cannot use."""
    if config.scaling not in ROPE_SCALINGS:
        raise ValueError(f"unknown RoPE scaling {config.scaling!r}; expected one of {tuple(ROPE_SCALINGS)}")
    if rotary_dim % 2 or rotary_dim == 0:
        raise ValueError(f"RoPE needs an even, non-zero number of rotated dims, got {rotary_dim}")
    if config.scaling == "default":
        return
    if not config.factor >= 1.0:
        raise ValueError(f"RopeConfig.factor must be >= 1 for scaling {config.scaling!r}, got {config.factor}")
    if config.scaling in ("llama3", "yarn", "dynamic") and not config.original_max_len > 0:
        raise ValueError(f"RopeConfig.original_max_len must be a positive length, got {config.original_max_len}")
    if config.scaling == "llama3" and not 0 < config.low_freq_factor < config.high_freq_factor:
        raise ValueError(
            "RopeConfig.low_freq_factor and high_freq_factor must satisfy 0 < low_freq_factor < high_freq_factor, "
            f"got {config.low_freq_factor} and {config.high_freq_factor}")
    if config.scaling == "yarn":
        for name in ("beta_fast", "beta_slow"):
            if not getattr(config, name) > 0:
                raise ValueError(f"RopeConfig.{name} must be > 0, got {getattr(config, name)}")
        if config.attention_factor is not None and not config.attention_factor > 0:
            raise ValueError(f"RopeConfig.attention_factor must be > 0 or None, got {config.attention_factor}")
    if config.scaling == "dynamic" and rotary_dim <= 2:
        raise ValueError(f"dynamic RoPE needs more than 2 rotated dims (its exponent is R/(R-2)), got {rotary_dim}")


def rope_frequencies(config: RopeConfig, head_dim: int, *, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [R/2] (R = rotated dims) and the attention factor of a scaling.

    Computed in float64 numpy at trace time: they are constants of the model.

    Args:
      config: the RoPE settings.
      head_dim: H; R = int(H * config.fraction) dims are rotated.
      seq_len: the sequence length, used only by "dynamic" (HF's `seq_len`); None means
        at most `original_max_len`, i.e. no scaling.

    Returns:
      (inv_freq float64 [R/2], attention_factor).
    """
    rotary_dim = int(head_dim * config.fraction)
    _check_scaling(config, rotary_dim)
    inv_freq = config.theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    return ROPE_SCALINGS[config.scaling](inv_freq, config, head_dim, seq_len)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, config: RopeConfig, *,
               seq_len: int | None = None) -> jax.Array:
    """Rotates queries or keys by their positions; the math runs in float32.

    Args:
      x_BTNH: [B, T, N, H] queries or keys.
      positions_BT: [B, T] integer positions.
      config: the RoPE settings.
      seq_len: the length "dynamic" scaling sizes its base for; other scalings ignore
        it. None means T, the positions' last axis: frequencies are trace-time
        constants, so the length must be static. HF instead uses max(positions) + 1 at
        run time; the two agree for a prefill of positions 0..T-1. Callers that rotate
        queries and keys of different lengths (a KV cache) must pass the same seq_len to
        both, e.g. the cache length.

    Returns:
      The rotated array, same shape and dtype as `x_BTNH`. The scaling's attention
      factor (YaRN's mscale) multiplies both q and k, as in the reference code.
    """
    H = x_BTNH.shape[-1]
    if seq_len is None:
        seq_len = positions_BT.shape[-1]
    inv_freq, attention_factor = rope_frequencies(config, H, seq_len=seq_len)
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


# Hugging Face `rope_parameters` keys that `rope_config_from_hf` understands.
_HF_ROPE_KEYS = frozenset({
    "rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
    "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor", "truncate",
})


def rope_config_from_hf(hf_config: dict[str, Any], head_dim: int, *,
                        max_position_embeddings: int | None = None) -> RopeConfig:
    """Maps a transformers config's RoPE settings onto a (rotate-half) RopeConfig.

    Args:
      hf_config: either a whole transformers config as a dict (`config.json` or
        `PretrainedConfig.to_dict()`), whose `rope_parameters` or legacy `rope_scaling`
        is read together with top-level `rope_theta`, `partial_rotary_factor`,
        `max_position_embeddings` and (Phi-3 style) `original_max_position_embeddings`;
        or just the `rope_parameters` dict itself.
      head_dim: H, to check that the rotated dims are even and non-zero.
      max_position_embeddings: the model's context length, where `hf_config` does not
        carry it; "dynamic" needs it, and "yarn" without a `factor` derives one from it.

    Returns:
      The RopeConfig whose `apply_rope` matches HF's `apply_rotary_pos_emb`.

    Raises:
      ValueError: naming an unsupported rope_type (e.g. "longrope") or key, or a
        missing value.
    """
    is_rope_params = "rope_type" in hf_config or "type" in hf_config
    params = dict(hf_config if is_rope_params else
                  hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    top = {} if is_rope_params else hf_config
    unknown = sorted(set(params) - _HF_ROPE_KEYS)
    if unknown:
        raise ValueError(f"rope_parameters key(s) {unknown} are not supported; known keys: {sorted(_HF_ROPE_KEYS)}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_type {kind!r} is not supported; expected one of {tuple(ROPE_SCALINGS)}")
    max_len = top.get("max_position_embeddings", max_position_embeddings)

    fields: dict[str, Any] = {
        "scaling": kind,
        "theta": float(params.get("rope_theta", top.get("rope_theta", RopeConfig.theta))),
        "fraction": float(params.get("partial_rotary_factor") or top.get("partial_rotary_factor") or 1.0),
    }
    if kind == "dynamic":
        if max_len is None:
            raise ValueError("dynamic RoPE needs max_position_embeddings (its original length in HF); pass it")
        fields["original_max_len"] = int(max_len)
    elif kind in ("llama3", "yarn"):
        # As HF's standardize_rope_params: a top-level value wins (Phi-3), then the
        # dict's, then max_position_embeddings.
        original = (top.get("original_max_position_embeddings")
                    or params.get("original_max_position_embeddings") or max_len)
        if original is None:
            raise ValueError(f"{kind} RoPE needs original_max_position_embeddings; none was given")
        fields["original_max_len"] = int(original)
    factor = params.get("factor")
    if kind == "yarn" and factor is None:  # DeepSeek-V3 style: the context-length ratio
        if max_len is None:
            raise ValueError("yarn RoPE without `factor` needs max_position_embeddings to derive it")
        factor = max_len / fields["original_max_len"]
    if kind != "default":
        if factor is None:
            raise ValueError(f"{kind} RoPE needs rope_parameters `factor`; none was given")
        fields["factor"] = float(factor)
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise ValueError(f"llama3 RoPE needs rope_parameters `{key}`; none was given")
            fields[key] = float(params[key])
    if kind == "yarn":
        # HF reads `beta_fast or 32`, `beta_slow or 1`: None and 0 both mean the default.
        fields["beta_fast"] = float(params.get("beta_fast") or 32)
        fields["beta_slow"] = float(params.get("beta_slow") or 1)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if params.get(key) is not None:
                fields[key] = float(params[key])
        fields["truncate"] = bool(params.get("truncate", True))
    config = RopeConfig(**fields)
    _check_scaling(config, int(head_dim * config.fraction))
    return config
