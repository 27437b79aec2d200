"""Multi-head latent attention (MLA), DeepSeek-V2/V3 (DeepSeek-AI 2024).

Axis letters: B batch, T query length, S key length, D model width, N heads,
L query latent (q_lora_rank), C key/value latent (kv_lora_rank), P per-head key/query
dims without position (qk_nope_head_dim), R rotary dims (qk_rope_head_dim, one key
shared by all heads), Q = P + R the query/key head dim, H value head dim (v_head_dim).

Keys and values are not projected from x directly: x is compressed to a latent c_BSC,
RMS-normalised, and expanded per head into position-free keys k_BSNP and values v_BSNH.
Position enters only through R extra dims: a rotary query per head and a single
rotary key k_BSR shared by all heads (as in multi-query attention). So

  logits_BNTS = (q_nope . k_nope + q_rope . k_rope) * scale,

and all an inference cache needs per token is (c, k_rope): C + R numbers per layer
(see `MultiHeadLatentAttention.latent_kv`).

Parameters (per head where there are heads, as in `multihead.py`):
  query [D, N, P+R]            (q_lora_rank falsy), or
  query_down [D, L], query_norm [L], query_up [L, N, P+R]
  latent_kv/kv_down [D, C], latent_kv/kv_norm [C], latent_kv/key_rope [D, R]
  key_up [C, N, P], value_up [C, N, H], out [N, H, D]
With `use_bias`, biases sit where transformers' `attention_bias` puts them: on
query_down, kv_down, key_rope and out.

Hugging Face mapping (`DeepseekV3Attention`, torch Linear weight [out, in]):
  q_proj -> query, q_a_proj -> query_down, q_a_layernorm -> query_norm,
  q_b_proj -> query_up, kv_a_proj_with_mqa -> [kv_down | key_rope] (its first C outputs,
  then R), kv_a_layernorm -> kv_norm, kv_b_proj -> per head [key_up | value_up]
  (outputs laid out head-major, P then H within a head), o_proj -> out.
transformers' `rope_interleave=True` (DeepSeek-V3's default) rotates the adjacent pairs
(x0, x1), (x2, x3)...; that is `RopeConfig(interleaved=True)`. HF writes the rotated
pairs out de-interleaved (evens then odds) while `apply_rope` keeps them in place; the
same permutation of q_rope and k_rope leaves every logit unchanged, but a latent cache
copied from HF would need its k_rope dims permuted.

Why not `dot_product_attention`: it needs keys and values of one shape, while MLA's keys
have P + R dims and its values H (and its rotary key is shared across heads). The
contraction is written here; the mask comes from the shared `make_attention_mask`, and
softmax runs in float32 with fully masked rows zeroed, as there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers.attention import make_attention_mask
from models.layers.kv_cache import check_quant, fake_quantize, update_cache
from models.layers.positional import RopeConfig, apply_rope

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """The sizes of multi-head latent attention (the heads N come from the block).

    Attributes:
      q_lora_rank: L; None or 0 for a plain `query` projection (DeepSeek-V2-Lite).
      kv_lora_rank: C.
      qk_nope_head_dim: P.
      qk_rope_head_dim: R.
      v_head_dim: H.
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLAConfig.{name}={getattr(self, name)} must be >= 1")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")

    def weights(self, d_model: int, num_heads: int) -> int:
        """Projection weights of one attention sub-layer (each multiplies every token once)."""
        D, N, L, C = d_model, num_heads, self.q_lora_rank, self.kv_lora_rank
        P, R, H = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        query = D * L + L * N * (P + R) if L else D * N * (P + R)
        return query + D * (C + R) + C * N * (P + H) + N * H * D

    def params(self, d_model: int, num_heads: int, *, use_bias: bool = False) -> int:
        """`weights` plus the latent RMSNorm scales and (with `use_bias`) the biases."""
        L, C, R = self.q_lora_rank or 0, self.kv_lora_rank, self.qk_rope_head_dim
        biases = L + C + R + d_model if use_bias else 0
        return self.weights(d_model, num_heads) + L + C + biases

    def score_flops(self, num_heads: int, seq_len: int) -> int:
        """Per-query FLOPs of the logits (P + R dims) and the value sum (H dims) over seq_len keys."""
        N, Q, H = num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        return 2 * N * Q * seq_len + 2 * N * H * seq_len


def _fan_init(in_axis, out_axis) -> Callable:
    """Xavier-uniform over the given fan-in and fan-out axes of a multi-axis kernel."""
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


def mla_softmax_scale(qk_head_dim: int, rope: RopeConfig) -> float:
    """(P + R)^-0.5, times mscale^2 under a non-default RoPE with `mscale_all_dim` set.

    mscale = 0.1 * mscale_all_dim * ln(factor) + 1 (1 when factor <= 1), as transformers'
    `yarn_apply_mscale`; YaRN's own attention factor on cos/sin is applied by `apply_rope`.
    """
    scale = qk_head_dim**-0.5
    if rope.scaling != "default" and rope.mscale_all_dim:
        mscale = 1.0 if rope.factor <= 1 else 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale *= mscale * mscale
    return scale


def _rms_norm(module: nn.Module, name: str, x: jax.Array, axis_name: str, eps: float,
              dtype: Dtype) -> jax.Array:
    """RMSNorm over the last axis with a [last] scale named `name`; float32 statistics.

    Written here rather than with `norms.RMSNorm` so that the scale carries the latent's
    logical axis name (`q_lora` / `kv_lora`), not `embed`.
    """
    scale = module.param(name, nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
                         (x.shape[-1],), module.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(dtype)


def _masked_softmax(logits_BNTS: jax.Array, mask_BNTS: jax.Array | None) -> jax.Array:
    """float32 softmax over S; masked entries get weight 0, a fully masked row all zeros."""
    if mask_BNTS is None:
        return jax.nn.softmax(logits_BNTS, axis=-1)
    # A finite fill, not -inf, so that a fully masked row stays finite before it is zeroed.
    logits_BNTS = jnp.where(mask_BNTS, logits_BNTS, jnp.finfo(jnp.float32).min)
    return jnp.where(mask_BNTS, jax.nn.softmax(logits_BNTS, axis=-1), 0.0)


class LatentKVProjection(nn.Module):
    """x [B, S, D] -> (normalised KV latent c [B, S, C], rotated shared key [B, S, R]).

    Attributes: see `MultiHeadLatentAttention`.
    """

    kv_lora_rank: int
    qk_rope_head_dim: int
    rope: RopeConfig
    norm_eps: float = 1e-6
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _param(self, name, shape, axes, init):
        return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

    @nn.compact
    def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
        x_BSD = x_BSD.astype(self.dtype)
        D, C, R = x_BSD.shape[-1], self.kv_lora_rank, self.qk_rope_head_dim
        w_down = self._param("kv_down", (D, C), ("embed", "kv_lora"), _fan_init(0, 1))
        w_rope = self._param("key_rope", (D, R), ("embed", "head_dim"), _fan_init(0, 1))
        c_BSC = jnp.einsum("BSD,DC->BSC", x_BSD, w_down.astype(self.dtype))
        k_rope_BSR = jnp.einsum("BSD,DR->BSR", x_BSD, w_rope.astype(self.dtype))
        if self.use_bias:
            zeros = nn.initializers.zeros
            c_BSC += self._param("kv_down_bias", (C,), ("kv_lora",), zeros).astype(self.dtype)
            k_rope_BSR += self._param("key_rope_bias", (R,), ("head_dim",), zeros).astype(self.dtype)
        c_BSC = _rms_norm(self, "kv_norm", c_BSC, "kv_lora", self.norm_eps, self.dtype)
        k_rope_BSR = apply_rope(k_rope_BSR[:, :, None, :], positions_BS, self.rope)[:, :, 0, :]
        return c_BSC, k_rope_BSR


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V3 multi-head latent attention (self-attention), equal to transformers'
    `DeepseekV3Attention`.

    Attributes:
      num_heads: N.
      q_lora_rank: L; 0 or None gives a plain `query` projection (DeepSeek-V2-Lite).
      kv_lora_rank: C, the width of the cached key/value latent.
      qk_nope_head_dim: P, per-head query/key dims without position.
      qk_rope_head_dim: R, rotary query dims per head and the width of the shared key.
      v_head_dim: H.
      rope: the rotary settings for the R dims (DeepSeek-V3: `interleaved=True`, YaRN).
      norm_eps: epsilon of the query and KV latent RMSNorms. transformers builds both
        with its default 1e-6, not the config's `rms_norm_eps`.
      use_bias: biases on query_down, kv_down/key_rope and out (HF `attention_bias`).
      dropout_rate: dropout on the attention weights.
      kv_cache_quant: "" (the latent cache in the compute dtype), "int8" or "fp8".

    When the `cache` collection is mutable (`apply(..., mutable=["cache"])`, not at init)
    and `kv_latent` is not given, it decodes with the compressed cache: `cache/latent`
    [B, S, C] and `cache/key_rope` [B, S, R] receive x's tokens at slots `q_positions`
    (`attention.write_cache`) and the queries attend to all S slots under the causal
    mask over positions. A missing cache is created with S = T;
    `inference.kv_cache.init_cache` preallocates one. A paged cache (`inference.paged`)
    holds `latent_pages` [P, Z, C], `key_rope_pages` [P, Z, R] and `block_table` [B, M]
    instead, written with `attention.write_pages` and read as a gathered view.
    With `kv_cache_quant` ("int8" | "fp8") both are stored as codes with a float32 scale per
    position (`latent_scale`, `key_rope_scale` [B, S]; paged: `*_scale_pages` [P, Z]) and
    read dequantized (`models.layers.kv_cache`); attention without a cache uses the same
    quantized-then-dequantized latents, so cached decoding equals a recompute.

    When the `intermediates` collection is mutable, the attention weights [B, N, T, S]
    are sown as `attention_weights`.
    """

    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    norm_eps: float = 1e-6
    use_bias: bool = False
    dropout_rate: float = 0.0
    kv_cache_quant: str = ""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        check_quant(self.kv_cache_quant)
        # A submodule declared in setup (the rest stays compact) so that `latent_kv` can be
        # called on its own through `apply(..., method=...)`, sharing __call__'s params.
        self.latent_kv_proj = LatentKVProjection(
            kv_lora_rank=self.kv_lora_rank, qk_rope_head_dim=self.qk_rope_head_dim, rope=self.rope,
            norm_eps=self.norm_eps, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            name="latent_kv",
        )

    def latent_kv(self, x_BSD: jax.Array, positions_BS: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """What a latent KV cache stores for each token: (c [B, S, C], k_rope [B, S, R]).

        c is the RMS-normalised KV latent (before the per-head expansion by key_up and
        value_up) and k_rope the shared key already rotated to its position, so a cache
        holds (kv_lora_rank + qk_rope_head_dim) numbers per token per layer, against
        num_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) for the expanded
        keys and values (DeepSeek-V3: 512 + 64 = 576 against 128 * 320 = 40,960).
        A cache of S tokens over a model's layers is B * S * layers * (C + R) numbers.

        Args:
          x_BSD: [B, S, D] the layer's (normalised) input.
          positions_BS: [B, S] integer positions (default 0..S-1).

        Use: `mla.apply(params, x, positions, method=MultiHeadLatentAttention.latent_kv)`.
        """
        B, S, _ = x_BSD.shape
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
        return self.latent_kv_proj(x_BSD, positions_BS)

    def _update_latent_cache(self, x_BTD: jax.Array, positions_BT: jax.Array,
                             causal: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes x's (c, k_rope) into `cache/latent` [B, S, C] and `cache/key_rope` [B, S, R]
        at slots `positions_BT`; returns the whole cache and its positions [B, S]."""
        if not causal:
            raise ValueError("a latent KV cache needs causal attention: its unwritten slots are hidden by the "
                             "causal mask over positions")
        if self.rope.scaling == "dynamic":
            # latent_kv rotates each call's keys with frequencies sized by that call's length.
            raise ValueError("dynamic RoPE scaling is not supported with a latent KV cache; use yarn or default")
        c_BTC, k_rope_BTR = self.latent_kv(x_BTD, positions_BT)
        quant = self.kv_cache_quant
        c_BSC = update_cache(self, "latent", c_BTC.astype(self.dtype), positions_BT, quant=quant)
        k_rope_BSR = update_cache(self, "key_rope", k_rope_BTR.astype(self.dtype), positions_BT, quant=quant)
        B, S = c_BSC.shape[:2]
        return c_BSC, k_rope_BSR, jnp.broadcast_to(jnp.arange(S), (B, S))  # slot s holds position s

    def _param(self, name, shape, axes, init):
        return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

    def _queries(self, x_BTD: jax.Array) -> jax.Array:
        """[B, T, N, P+R] queries, through the low-rank latent when q_lora_rank is set."""
        D, N = x_BTD.shape[-1], self.num_heads
        Q = self.qk_nope_head_dim + self.qk_rope_head_dim
        if not self.q_lora_rank:
            w_q = self._param("query", (D, N, Q), ("embed", "heads", "head_dim"), _fan_init(0, (1, 2)))
            return jnp.einsum("BTD,DNQ->BTNQ", x_BTD, w_q.astype(self.dtype))
        L = self.q_lora_rank
        w_down = self._param("query_down", (D, L), ("embed", "q_lora"), _fan_init(0, 1))
        w_up = self._param("query_up", (L, N, Q), ("q_lora", "heads", "head_dim"), _fan_init(0, (1, 2)))
        cq_BTL = jnp.einsum("BTD,DL->BTL", x_BTD, w_down.astype(self.dtype))
        if self.use_bias:
            cq_BTL += self._param("query_down_bias", (L,), ("q_lora",), nn.initializers.zeros).astype(self.dtype)
        cq_BTL = _rms_norm(self, "query_norm", cq_BTL, "q_lora", self.norm_eps, self.dtype)
        return jnp.einsum("BTL,LNQ->BTNQ", cq_BTL, w_up.astype(self.dtype))

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        causal: bool = True,
        q_positions: jax.Array | None = None,
        kv_latent: tuple[jax.Array, jax.Array] | None = None,
        kv_positions: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
        q_segment_ids: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
        mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Self-attention over `x` [B, T, D]; returns [B, T, D].

        Args:
          x: [B, T, D] input.
          q_positions: [B, T] positions for RoPE and the causal mask (default 0..T-1).
          kv_latent: (c [B, S, C], k_rope [B, S, R]) from `latent_kv`, to attend to
            instead of x's own latents: a latent cache that already holds x's tokens
            (decoding). None: S = T, the keys are x's tokens.
          kv_positions: [B, S] positions of `kv_latent`'s tokens, for the causal mask
            (needed with `kv_latent`; their RoPE was applied by `latent_kv`).
          causal, kv_mask, q_segment_ids, kv_segment_ids, mask: see
            `attention.make_attention_mask`; kv_mask [B, S] also hides unfilled cache slots.
          deterministic: disables attention dropout.
        """
        x_BTD = x.astype(self.dtype)
        B, T, D = x_BTD.shape
        N, P, H, C = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        if q_positions is None:
            q_positions = jnp.broadcast_to(jnp.arange(T), (B, T))

        q_BTNQ = self._queries(x_BTD)
        q_nope_BTNP = q_BTNQ[..., :P]
        q_rope_BTNR = apply_rope(q_BTNQ[..., P:], q_positions, self.rope)
        if kv_latent is None and self.is_mutable_collection("cache") and not self.is_initializing():
            c_BSC, k_rope_BSR, kv_positions = self._update_latent_cache(x_BTD, q_positions, causal)
        elif kv_latent is None:
            c_BSC, k_rope_BSR = self.latent_kv(x_BTD, q_positions)
            if self.kv_cache_quant:  # what a cache would hold
                c_BSC, k_rope_BSR = (fake_quantize(a, self.kv_cache_quant) for a in (c_BSC, k_rope_BSR))
            kv_positions = q_positions
        else:
            if kv_positions is None:
                raise ValueError("kv_latent needs kv_positions [B, S], the positions of its tokens")
            if self.is_initializing():  # so that init on this path also creates latent_kv's params
                self.latent_kv(x_BTD, q_positions)
            c_BSC, k_rope_BSR = (a.astype(self.dtype) for a in kv_latent)
        S = c_BSC.shape[1]

        w_k = self._param("key_up", (C, N, P), ("kv_lora", "heads", "head_dim"), _fan_init(0, (1, 2)))
        w_v = self._param("value_up", (C, N, H), ("kv_lora", "heads", "head_dim"), _fan_init(0, (1, 2)))
        w_o = self._param("out", (N, H, D), ("heads", "head_dim", "embed"), _fan_init((0, 1), 2))
        k_nope_BSNP = jnp.einsum("BSC,CNP->BSNP", c_BSC, w_k.astype(self.dtype))
        v_BSNH = jnp.einsum("BSC,CNH->BSNH", c_BSC, w_v.astype(self.dtype))
        q_nope_BTNP = nn.with_logical_constraint(q_nope_BTNP, ("act_batch", "act_seq", "act_heads", None))
        k_nope_BSNP = nn.with_logical_constraint(k_nope_BSNP, ("act_batch", "act_seq", "act_heads", None))
        v_BSNH = nn.with_logical_constraint(v_BSNH, ("act_batch", "act_seq", "act_heads", None))

        f32 = jnp.float32
        logits_BNTS = (
            jnp.einsum("BTNP,BSNP->BNTS", q_nope_BTNP, k_nope_BSNP, preferred_element_type=f32)
            + jnp.einsum("BTNR,BSR->BNTS", q_rope_BTNR, k_rope_BSR, preferred_element_type=f32)
        ) * mla_softmax_scale(P + self.qk_rope_head_dim, self.rope)
        mask_BNTS = make_attention_mask(
            B, T, S, causal=causal, q_positions=q_positions, kv_positions=kv_positions, kv_mask=kv_mask,
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
        )
        weights_BNTS = _masked_softmax(logits_BNTS, mask_BNTS)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attention_weights", weights_BNTS)

        probs_BNTS = weights_BNTS
        if self.dropout_rate > 0.0 and not deterministic:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, probs_BNTS.shape)
            probs_BNTS = jnp.where(keep, probs_BNTS / (1.0 - self.dropout_rate), 0.0)
        out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS.astype(self.dtype), v_BSNH)
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, w_o.astype(self.dtype))
        if self.use_bias:
            out_BTD += self._param("out_bias", (D,), ("embed",), nn.initializers.zeros).astype(self.dtype)
        return out_BTD
