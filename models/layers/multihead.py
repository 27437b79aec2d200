"""Multi-head attention module (self and cross) with grouped K/V heads.

Axis letters: B batch, T query length, S key length, D model width, N query heads,
K key/value heads, H head dim.

Parameters are stored per head, `query` [D, N, H], `key`/`value` [D, K, H],
`out` [N, H, D], so that the head axes can be sharded by name (Megatron column- and
row-parallel projections).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import linear
from models.layers.adapters import prefix_key_value, prepend_prefix
from models.layers.attention import ATTENTION_IMPLS, attend
from models.layers.kv_cache import cache_length, check_quant, fake_quantize, update_cache
from models.layers.peft import LoraConfig, PrefixConfig, lora_project
from models.layers.positional import RopeConfig, apply_rope

Dtype = Any


def _fan_init(in_axis, out_axis) -> Callable:
    """Xavier-uniform over the given fan-in and fan-out axes of a multi-axis kernel."""
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


class MultiHeadAttention(nn.Module):
    """Multi-head / grouped-query / multi-query attention.

    Attributes:
      num_heads: N.
      num_kv_heads: K (default N). N must be a multiple of K.
      head_dim: H (default D // N).
      use_bias: biases on the q, k, v and output projections.
      qkv_bias: biases on q, k and v only (None: follow `use_bias`); Qwen2 has them, with
        no output bias.
      out_bias: bias on the output projection (None: follow `use_bias`).
      qk_norm: RMSNorm over H of each query and key head before RoPE (Qwen3, OLMo 2),
        with scales `query_norm` [H] and `key_norm` [H].
      qk_norm_eps: that norm's epsilon.
      dropout_rate: dropout on the attention weights.
      rope: apply rotary embeddings to q and k (self-attention) if set.
      sliding_window: restrict each query to the last `sliding_window` keys.
      lora: LoRA on the projections its `targets` regex matches (`models.layers.peft`).
      prefix: prefix tuning (`models.layers.adapters`): self-attention also attends to
        learned keys and values `prefix_key` / `prefix_value` [P, K, H], visible to every
        query, placed before the cache's (or the sequence's) keys; never cached.
      kv_cache_quant: "" (keys and values cached in the compute dtype), "int8" or "fp8"
        (`models.layers.kv_cache`): self-attention's keys and values are quantized per
        position and kv head, in the cache and in a forward pass without one.
      attention_impl: how the attention itself is computed (`attention.attend`): "xla"
        (the weight matrix), "blockwise" (O(T) memory), "pallas" or "cudnn". Decoding
        with a KV cache and sowing the weights always use "xla" (a decode step has T = 1,
        so the weight matrix is only [B, N, 1, S]); attention dropout in training needs
        "xla" (the others raise).

    When the `cache` collection is mutable (`apply(..., mutable=["cache"])`, not at
    init), self-attention decodes with a KV cache: `cache/key` and `cache/value`
    [B, S, K, H] (keys after QK-norm and RoPE) receive this call's T keys and values at
    slots `q_positions` (`attention.write_cache`), and the queries attend to all S slots
    under the causal mask over positions, which also hides the unwritten ones. A missing
    cache is created with S = T; `inference.kv_cache.init_cache` preallocates one.
    ("dynamic" RoPE scaling then sizes its frequencies for S, the same for every token.)
    A paged cache (`inference.paged`) holds `cache/key_pages`, `cache/value_pages`
    [P, Z, K, H] and `cache/block_table` [B, M] instead: the keys are written into the
    rows' blocks (`attention.write_pages`) and attention reads a gathered [B, M * Z, K, H]
    view (`attention.gather_pages`), then runs as with a contiguous cache of S = M * Z.
    With `kv_cache_quant` set, the cache stores int8 or fp8 codes plus a float32 scale per
    position and kv head (`cache/key_scale`, `cache/value_scale` [B, S, K]; paged:
    `key_scale_pages`, `value_scale_pages` [P, Z, K]) and attention reads them dequantized
    (`models.layers.kv_cache`); self-attention without a cache attends over the same
    quantized-then-dequantized keys and values, so cached decoding equals a recompute.

    When the `layer_inputs` collection is mutable (calibration, `compress.calibration`), the
    input of each projection is sown there under the '+'-joined names of the kernels that
    read it: `query+key+value` [B, T, D] (self-attention; `query` and `key+value` for
    cross-attention) and `out` [B, T, N * H].

    When the `intermediates` collection is mutable, the attention weights [B, N, T, S]
    are sown there as `attention_weights`, a 1-tuple (flax's sow appends), for
    inspection and plots. In the Transformer they sit at, e.g.,
    `intermediates['decoder_1']['cross_attention']['attention_weights'][0]`.

    When the `attention_qkv` collection is mutable (not at init), the projected (q [B, T, N, H], k [B, S, K, H],
    v [B, S, K, H]) (after the biases and QK-norm, before RoPE and any cache) are sown there as
    `qkv`, a 1-tuple: what MiniLM-style distillation compares (`train.distill_losses`). It
    does not change how attention is computed.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    use_bias: bool = False
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    rope: RopeConfig | None = None
    sliding_window: int | None = None
    lora: LoraConfig | None = None
    prefix: PrefixConfig | None = None
    attention_impl: str = "xla"
    kv_cache_quant: str = ""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _param(self, name, shape, axes, init):
        return linear.kernel_param(self, name, init, shape, self.param_dtype, axes)

    def _head_rms_norm(self, name: str, x_BTNH: jax.Array) -> jax.Array:
        """RMSNorm over the head dim with a shared [H] scale; float32 statistics."""
        scale_H = self._param(name, (x_BTNH.shape[-1],), ("head_dim",), nn.initializers.ones)
        x32 = x_BTNH.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.qk_norm_eps)
        return (y * scale_H.astype(jnp.float32)).astype(self.dtype)

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        causal: bool = False,
        q_positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
        q_segment_ids: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
        mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Attends from `inputs_q` [B, T, D] to `inputs_kv` [B, S, D'] (itself if None)."""
        self_attention = inputs_kv is None
        x_BTD = inputs_q.astype(self.dtype)
        y_BSD = x_BTD if self_attention else inputs_kv.astype(self.dtype)
        B, T, D = x_BTD.shape
        S = y_BSD.shape[1]
        N = self.num_heads
        K = self.num_kv_heads or N
        H = self.head_dim or D // N
        if N % K:
            raise ValueError(f"num_heads={N} must be a multiple of num_kv_heads={K}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")

        w_q = self._param("query", (D, N, H), ("embed", "heads", "head_dim"), _fan_init(0, (1, 2)))
        w_k = self._param("key", (y_BSD.shape[-1], K, H), ("embed", "kv_heads", "head_dim"), _fan_init(0, (1, 2)))
        w_v = self._param("value", (y_BSD.shape[-1], K, H), ("embed", "kv_heads", "head_dim"), _fan_init(0, (1, 2)))
        w_o = self._param("out", (N, H, D), ("heads", "head_dim", "embed"), _fan_init((0, 1), 2))

        # Calibration (`compress.calibration`) reads each kernel's input when `layer_inputs` is mutable.
        if self_attention:
            linear.sow_input(self, "query+key+value", x_BTD)
        else:
            linear.sow_input(self, "query", x_BTD)
            linear.sow_input(self, "key+value", y_BSD)
        q_BTNH = linear.project(x_BTD, w_q.astype(self.dtype))  # einsum("BTD,DNH->BTNH")
        k_BSKH = linear.project(y_BSD, w_k.astype(self.dtype))  # einsum("BSD,DKH->BSKH")
        v_BSKH = linear.project(y_BSD, w_v.astype(self.dtype))
        lora = functools.partial(lora_project, self, n_in=1, lora=self.lora, deterministic=deterministic)
        q_BTNH = lora("query", w_q, x_BTD, q_BTNH, names=("embed", "heads", "head_dim"))
        k_BSKH = lora("key", w_k, y_BSD, k_BSKH, names=("embed", "kv_heads", "head_dim"))
        v_BSKH = lora("value", w_v, y_BSD, v_BSKH, names=("embed", "kv_heads", "head_dim"))
        qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias
        out_bias = self.use_bias if self.out_bias is None else self.out_bias
        if qkv_bias:
            zeros = nn.initializers.zeros
            q_BTNH += self._param("query_bias", (N, H), ("heads", "head_dim"), zeros).astype(self.dtype)
            k_BSKH += self._param("key_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(self.dtype)
            v_BSKH += self._param("value_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(self.dtype)
        if self.qk_norm:
            q_BTNH = self._head_rms_norm("query_norm", q_BTNH)
            k_BSKH = self._head_rms_norm("key_norm", k_BSKH)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("act_batch", "act_seq", "act_heads", None))
        k_BSKH = nn.with_logical_constraint(k_BSKH, ("act_batch", "act_seq", "act_kv_heads", None))
        v_BSKH = nn.with_logical_constraint(v_BSKH, ("act_batch", "act_seq", "act_kv_heads", None))
        # MiniLM-style distillation reads them; never at init, whose variables (every collection
        # is mutable there) some callers take whole (models.random_params).
        if self.is_mutable_collection("attention_qkv") and not self.is_initializing():
            self.sow("attention_qkv", "qkv", (q_BTNH, k_BSKH, v_BSKH))

        if q_positions is None:
            q_positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        if kv_positions is None:
            kv_positions = q_positions if self_attention else jnp.broadcast_to(jnp.arange(S), (B, S))
        decoding = self_attention and self.is_mutable_collection("cache") and not self.is_initializing()
        check_quant(self.kv_cache_quant)
        rope_len = None
        if decoding:
            if not causal:
                raise ValueError("a KV cache needs causal self-attention: its unwritten slots are hidden by the "
                                 "causal mask over positions")
            # One length for q and every cached k, so that dynamic RoPE rotates them alike.
            rope_len = cache_length(self, "key", T)
        if self.rope is not None:
            q_BTNH = apply_rope(q_BTNH, q_positions, self.rope, seq_len=rope_len)
            k_BSKH = apply_rope(k_BSKH, kv_positions, self.rope, seq_len=rope_len)
        if decoding:
            # Keys are cached after RoPE and QK-norm: a decode step only rotates its own key.
            # The cache is contiguous [B, S, K, H] or a block pool (`inference.paged`), quantized or not.
            quant = self.kv_cache_quant
            k_BSKH = update_cache(self, "key", k_BSKH.astype(self.dtype), q_positions, quant=quant)
            v_BSKH = update_cache(self, "value", v_BSKH.astype(self.dtype), q_positions, quant=quant)
            S = k_BSKH.shape[1]
            kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))  # slot s holds position s
        elif self_attention and self.kv_cache_quant:  # what a cache would hold
            k_BSKH = fake_quantize(k_BSKH, self.kv_cache_quant)
            v_BSKH = fake_quantize(v_BSKH, self.kv_cache_quant)

        want_weights = self.is_mutable_collection("intermediates")
        dropout_rng = None
        if self.dropout_rate > 0.0 and not deterministic:
            dropout_rng = self.make_rng("dropout")
        masks = {"causal": causal, "q_positions": q_positions, "kv_positions": kv_positions, "kv_mask": kv_mask,
                 "q_segment_ids": q_segment_ids, "kv_segment_ids": kv_segment_ids,
                 "sliding_window": self.sliding_window, "mask": mask}
        if self.prefix is not None and self_attention:
            prefix_k, prefix_v = prefix_key_value(self, self.prefix, D, K, H, self.param_dtype)
            k_BSKH, v_BSKH, masks = prepend_prefix(k_BSKH, v_BSKH, prefix_k, prefix_v, T, masks)
        result = attend(
            q_BTNH, k_BSKH, v_BSKH, **masks, impl="xla" if want_weights or decoding else self.attention_impl,
            dropout_rate=0.0 if deterministic else self.dropout_rate, dropout_rng=dropout_rng,
            return_weights=want_weights,
        )
        if want_weights:
            out_BTNH, weights_BNTS = result
            self.sow("intermediates", "attention_weights", weights_BNTS)
        else:
            out_BTNH = result

        linear.sow_input(self, "out", out_BTNH.reshape(B, T, N * H))
        out_BTD = linear.project(out_BTNH, w_o.astype(self.dtype), in_dims=2)  # einsum("BTNH,NHD->BTD")
        out_BTD = lora_project(self, "out", w_o, out_BTNH, out_BTD, n_in=2, names=("heads", "head_dim", "embed"),
                               lora=self.lora, deterministic=deterministic)
        if out_bias:
            out_BTD += self._param("out_bias", (D,), ("embed",), nn.initializers.zeros).astype(self.dtype)
        return out_BTD
