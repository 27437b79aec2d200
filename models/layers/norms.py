"""LayerNorm and RMSNorm written from their formulas.

Statistics are computed in float32 whatever the input dtype; the result is cast to the
module's compute `dtype`. Parameters carry the logical axis name `embed`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias, over the last axis (Ba et al. 2016)."""

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            scale = self.param(
                "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (D,), self.param_dtype
            )
            y = y * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (D,), self.param_dtype
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (scale_offset + scale) (Zhang & Sennrich 2019).

    `scale_offset=1.0` with a zero-initialised scale gives Gemma's parameterisation.
    """

    epsilon: float = 1e-6
    scale_offset: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D = x.shape[-1]
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("embed",)), (D,), self.param_dtype)
        return (y * (self.scale_offset + scale.astype(jnp.float32))).astype(self.dtype)


NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, *, epsilon: float, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True,
              name: str | None = None) -> nn.Module:
    """Builds a norm by name: "layernorm" (bias optional) or "rmsnorm"."""
    if kind == "layernorm":
        return LayerNorm(epsilon=epsilon, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")
