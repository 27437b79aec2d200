"""Prefix tuning and bottleneck adapters: the layer pieces of `PeftConfig.prefix` and `.adapter`.

Axis letters: B batch, T query length, S key length, P prefix length, D model width,
K key/value heads, H head dim, R adapter width, M the prefix MLP's hidden width.

Prefix tuning (Li & Liang 2021; `peft`'s PREFIX_TUNING): every self-attention layer holds P
learned keys and values per kv head, `prefix_key` / `prefix_value` [P, K, H], placed before
the sequence's own keys. Every query attends to them, whatever the causal, padding, segment or
window masks say, and they carry no position: no RoPE and no QK-norm touch them (as `peft`
hands them to transformers as `past_key_values`, which hold keys after both). The tokens'
own positions still start at 0. (Under transformers a `peft` prefix shifts the tokens'
positions by P; with RoPE that only rotates the learned prefix keys, a reparameterization.)
They are added where attention reads its keys, after the KV cache, so a cache holds only
the tokens' keys and a cached decode sees the same prefix as a full recompute.

With `mlp_hidden` = M > 0 the prefix is reparameterized while training (Li & Liang's
stabilizer, `peft`'s prefix_projection): an embedding `prefix_embedding` [P, D] goes through
`prefix_mlp_in` [D, M], tanh and `prefix_mlp_out` [M, 2, K, H] (with biases) to the keys and
values. Each layer has its own (`peft` shares one MLP whose output is split over the layers).
`fold_prefix` computes them once and drops the MLP, for inference and export.

Bottleneck adapters (`BottleneckAdapter`): h -> scale * up(act(down(h))), `up` zero at init
so a fresh adapter leaves the model exactly as it was. Houlsby et al. 2019 put one serially
on the output of each sub-layer (attention and MLP), before the residual add; He et al. 2022
put one in parallel with the MLP sub-layer, reading the same (normed) input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers.attention import make_attention_mask
from models.layers.feedforward import ACTIVATIONS
from models.layers.peft import AdapterConfig, PeftConfig, PrefixConfig

Dtype = Any
PREFIX_MLP = ("prefix_embedding", "prefix_mlp_in", "prefix_mlp_in_bias", "prefix_mlp_out", "prefix_mlp_out_bias")


def _param(module: nn.Module, name: str, shape, axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def prefix_key_value(module: nn.Module, cfg: PrefixConfig, d_model: int, kv_heads: int, head_dim: int,
                     param_dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """Creates (in `module`, an attention layer) and returns its prefix keys and values [P, K, H].

    Initialized as `peft`'s: a standard normal embedding; with `mlp_hidden`, the MLP's
    kernels Lecun-normal (torch Linear's scale) and biases zero.
    """
    P, K, H = cfg.length, kv_heads, head_dim
    if not cfg.mlp_hidden:
        init = nn.initializers.normal(1.0)
        axes = (None, "kv_heads", "head_dim")
        return (_param(module, "prefix_key", (P, K, H), axes, init, param_dtype),
                _param(module, "prefix_value", (P, K, H), axes, init, param_dtype))
    M, zeros = cfg.mlp_hidden, nn.initializers.zeros
    mlp = {
        "prefix_embedding": _param(module, "prefix_embedding", (P, d_model), (None, "embed"),
                                   nn.initializers.normal(1.0), param_dtype),
        "prefix_mlp_in": _param(module, "prefix_mlp_in", (d_model, M), ("embed", "mlp"),
                                nn.initializers.lecun_normal(), param_dtype),
        "prefix_mlp_in_bias": _param(module, "prefix_mlp_in_bias", (M,), ("mlp",), zeros, param_dtype),
        "prefix_mlp_out": _param(module, "prefix_mlp_out", (M, 2, K, H), ("mlp", None, "kv_heads", "head_dim"),
                                 nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3)), param_dtype),
        "prefix_mlp_out_bias": _param(module, "prefix_mlp_out_bias", (2, K, H), (None, "kv_heads", "head_dim"),
                                      zeros, param_dtype),
    }
    return prefix_from_mlp(mlp)


def prefix_from_mlp(mlp: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The prefix keys and values [..., P, K, H] of the MLP reparameterization's params (a
    leading layers axis, as under `scan_layers`, is carried through), in their dtype."""
    hidden_PM = jnp.tanh(jnp.einsum("...PD,...DM->...PM", mlp["prefix_embedding"], mlp["prefix_mlp_in"])
                         + mlp["prefix_mlp_in_bias"][..., None, :])
    kv_P2KH = (jnp.einsum("...PM,...MCKH->...PCKH", hidden_PM, mlp["prefix_mlp_out"])
               + mlp["prefix_mlp_out_bias"][..., None, :, :, :])
    return kv_P2KH[..., 0, :, :], kv_P2KH[..., 1, :, :]


def prepend_prefix(k_BSKH: jax.Array, v_BSKH: jax.Array, prefix_k_PKH: jax.Array, prefix_v_PKH: jax.Array,
                   q_len: int, masks: dict) -> tuple[jax.Array, jax.Array, dict]:
    """Keys and values with the prefix in front, and the attention mask arguments that let
    every query see the P prefix slots and the rest as `masks` said.

    Args:
      k_BSKH, v_BSKH: the layer's keys and values (after RoPE and the KV cache).
      prefix_k_PKH, prefix_v_PKH: the prefix, cast to the keys' dtype here.
      q_len: T.
      masks: the keyword arguments `dot_product_attention` would have got for the mask
        (causal, q_positions, kv_positions, kv_mask, segment ids, sliding_window, mask).

    Returns:
      keys [B, P + S, K, H], values [B, P + S, K, H], and {"mask": [B, 1 or N, T, P + S]}.
    """
    B, S = k_BSKH.shape[:2]
    P = prefix_k_PKH.shape[0]
    mask_BNTS = make_attention_mask(B, q_len, S, **masks)
    if mask_BNTS is None:
        mask_BNTS = jnp.ones((B, 1, q_len, S), bool)
    mask_BNTS = jnp.broadcast_to(mask_BNTS, (B, mask_BNTS.shape[1], q_len, S))
    seen_BNTP = jnp.ones((B, mask_BNTS.shape[1], q_len, P), bool)

    def prepend(prefix_PKH, x_BSKH):
        prefix_BPKH = jnp.broadcast_to(prefix_PKH.astype(x_BSKH.dtype), (B, *prefix_PKH.shape))
        return jnp.concatenate([prefix_BPKH, x_BSKH], axis=1)

    return (prepend(prefix_k_PKH, k_BSKH), prepend(prefix_v_PKH, v_BSKH),
            {"mask": jnp.concatenate([seen_BNTP, mask_BNTS], axis=-1)})


class BottleneckAdapter(nn.Module):
    """scale * up(act(down(h))) [B, T, D]: `down` [D, R], `up` [R, D] (zero at init), biases.

    Attributes:
      config: the adapter's width, activation and scale.
      dtype: compute dtype; param_dtype: storage dtype.
    """

    config: AdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h_BTD: jax.Array) -> jax.Array:
        cfg, D = self.config, h_BTD.shape[-1]
        R, zeros = cfg.hidden, nn.initializers.zeros
        down = _param(self, "down", (D, R), ("embed", None), nn.initializers.lecun_normal(), self.param_dtype)
        down_bias = _param(self, "down_bias", (R,), (None,), zeros, self.param_dtype)
        up = _param(self, "up", (R, D), (None, "embed"), zeros, self.param_dtype)
        up_bias = _param(self, "up_bias", (D,), ("embed",), zeros, self.param_dtype)
        x_BTD = h_BTD.astype(self.dtype)
        z_BTR = jnp.einsum("BTD,DR->BTR", x_BTD, down.astype(self.dtype)) + down_bias.astype(self.dtype)
        z_BTR = ACTIVATIONS[cfg.activation](z_BTR)
        out_BTD = jnp.einsum("BTR,RD->BTD", z_BTR, up.astype(self.dtype)) + up_bias.astype(self.dtype)
        return (cfg.scale * out_BTD).astype(self.dtype)


def adapt(peft: PeftConfig | None, role: str, fn, h_BTD: jax.Array, *, dtype: Dtype, param_dtype: Dtype):
    """A sub-layer's function output fn(h) with the config's adapter on it (called inside the
    sub-layer, which owns the adapter's params as `adapter_houlsby` / `adapter_parallel`).

    Args:
      peft: the block's PEFT config (None or no adapter: fn(h) unchanged).
      role: "attention" or "mlp": houlsby adapts both, parallel only the MLP.
      fn: the sub-layer's function; h_BTD its input (normed, for pre-LN).

    Returns:
      houlsby: y + adapter(y) with y = fn(h); parallel (MLP): fn(h) + adapter(h).
    """
    adapter = None if peft is None else peft.adapter
    if adapter is None or (adapter.kind == "parallel" and role != "mlp"):
        return fn(h_BTD)
    module = BottleneckAdapter(adapter, dtype=dtype, param_dtype=param_dtype, name=f"adapter_{adapter.kind}")
    if adapter.kind == "houlsby":
        y_BTD = fn(h_BTD)
        return y_BTD + module(y_BTD)
    return fn(h_BTD) + module(h_BTD)


def fold_prefix(model: nn.Module, params: Mapping) -> tuple[nn.Module, dict]:
    """Folds every layer's prefix MLP into plain `prefix_key` / `prefix_value` (for inference
    and export): the returned model (its `config.block.peft.prefix.mlp_hidden` = 0) gives the
    same outputs with the returned params, which hold the MLP's keys and values instead of it.

    Args:
      model: a GPT or BERT model (any module whose `config.block` is a BlockConfig).
      params: its unboxed params.

    Returns:
      (model, params); unchanged when the model has no reparameterized prefix.
    """
    block = model.config.block
    prefix = None if block.peft is None else block.peft.prefix
    if prefix is None or not prefix.mlp_hidden:
        return model, dict(params)

    def fold(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: fold(v) for k, v in tree.items() if k not in PREFIX_MLP}
        if "prefix_embedding" in tree:
            out["prefix_key"], out["prefix_value"] = prefix_from_mlp(tree)
        return out

    peft = dataclasses.replace(block.peft, prefix=dataclasses.replace(prefix, mlp_hidden=0))
    config = dataclasses.replace(model.config, block=dataclasses.replace(block, peft=peft))
    return model.clone(config=config), fold(params)
