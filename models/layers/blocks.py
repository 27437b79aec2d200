"""Transformer layers: the residual sub-layer, the encoder layer and the decoder layer.

Axis letters: B batch, T target length, S source length, D model width.

Each sub-layer (attention or feed-forward) sits in a residual connection, either
post-LN as in Vaswani et al. 2017, `x = Norm(x + Dropout(f(x)))`, or pre-LN as in GPT-2
and most models since, `x = x + Dropout(f(Norm(x)))`.

An `EncoderLayer` with `causal=True` is the decoder-only block of GPT-style models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers.adapters import adapt
from models.layers.attention import ATTENTION_IMPLS
from models.layers.feedforward import GATED, MLP_ACTIVATIONS, FeedForward
from models.layers.kv_cache import check_quant
from models.layers.mla import MLAConfig, MultiHeadLatentAttention
from models.layers.moe import MoEConfig, MoEFeedForward
from models.layers.multihead import MultiHeadAttention
from models.layers.norms import NORMS, make_norm
from models.layers.peft import LoraConfig, PeftConfig, refuse_lora
from models.layers.positional import RopeConfig

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What a Transformer layer needs to know; shared by every model family.

    Attributes:
      d_model: D, the residual stream width.
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads (None: N; 1: multi-query).
      head_dim: H (None: D // N).
      d_ff: F, the feed-forward hidden width.
      mlp_activation: one of feedforward.MLP_ACTIVATIONS.
      norm: "layernorm" or "rmsnorm".
      norm_position: "post" (Vaswani et al.) or "pre" (GPT-2 onwards).
      norm_eps: the norms' epsilon.
      dropout_rate: residual and feed-forward dropout.
      attention_dropout_rate: dropout on attention weights.
      use_bias: biases in attention and feed-forward projections (and LayerNorm); the
        default for the three finer switches below.
      qkv_bias: biases on the q, k, v projections (None: `use_bias`; Qwen2: True).
      out_bias: bias on the attention output projection (None: `use_bias`).
      mlp_bias: biases in the feed-forward projections (None: `use_bias`).
      qk_norm: RMSNorm over the head dim of queries and keys before RoPE (Qwen3).
      rope: rotary embeddings in self-attention, if set.
      sliding_window: local self-attention window, if set.
      moe: if set, the feed-forward sub-layer is a mixture of SwiGLU experts
        (`models.layers.moe`); `d_ff`, `mlp_activation` and `mlp_bias` are then unused.
      mla: if set, self-attention is multi-head latent attention (`models.layers.mla`,
        DeepSeek-V2/V3) with `num_heads` heads and `rope` on its rotary dims;
        `num_kv_heads` and `head_dim` are then unused, and its biases (`qkv_bias` and
        `out_bias`, which must agree) are transformers' `attention_bias`. Decoder-only.
      peft: parameter-efficient fine-tuning in the layers (`models.layers.peft`): LoRA on
        matching kernels, prefix tuning, adapters; None: none.
      attention_impl: how attention is computed, one of `attention.ATTENTION_IMPLS`:
        "xla" (the [B, N, T, S] weight matrix), "blockwise" (flash-style, O(T) memory),
        "pallas" (the blockwise algorithm as a Pallas kernel), "cudnn" (GPU, bf16/fp16) or
        "ring" (blockwise with the sequence split over devices, `models.layers.ring_attention`).
        Anything but "xla" needs attention_dropout_rate = 0 and standard attention (not
        mla); KV-cache decoding and returned weights use "xla" whatever is set here.
      kv_cache_quant: how self-attention's KV cache is stored (`models.layers.kv_cache`):
        "" (the compute dtype), "int8" or "fp8" (e4m3), codes with a float32 scale per
        position and kv head (MLA: per position); a forward pass without a cache attends
        over the same quantized keys and values. A run setting: switch it on at inference
        with `inference.kv_quant.with_kv_cache_quant`.
      dtype: compute dtype; param_dtype: storage dtype.
    """

    d_model: int
    num_heads: int
    d_ff: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_activation: str = "relu"
    norm: str = "layernorm"
    norm_position: str = "post"
    norm_eps: float = 1e-5
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    use_bias: bool = True
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: bool = False
    rope: RopeConfig | None = None
    sliding_window: int | None = None
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    peft: PeftConfig | None = None
    attention_impl: str = "xla"
    kv_cache_quant: str = ""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={kv}")
        if self.mla is not None:
            self._check_mla()
        elif self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim explicitly"
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation={self.mlp_activation!r}; expected one of {MLP_ACTIVATIONS}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}; expected one of {NORMS}")
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position={self.norm_position!r}; expected 'pre' or 'post'")
        self._check_attention_impl()
        check_quant(self.kv_cache_quant)
        if self.mla is not None and self.peft is not None and self.peft.prefix is not None:
            raise ValueError("finetune.prefix: prefix tuning needs multi-head attention; latent attention (mla "
                             "set) caches latents, not keys and values")

    def _check_attention_impl(self):
        impl = self.attention_impl
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}")
        if impl != "xla" and self.mla is not None:
            raise ValueError(f"attention_impl={impl!r} is for standard attention; latent attention (mla set) "
                             "computes its own, use attention_impl='xla'")
        if impl != "xla" and self.attention_dropout_rate > 0:
            raise ValueError(f"attention_impl={impl!r} has no weight matrix to drop out; set "
                             f"attention_dropout_rate=0 (got {self.attention_dropout_rate}) or use 'xla'")

    def _check_mla(self):
        for name in ("qk_norm", "sliding_window"):
            if getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r} has no meaning with latent attention (mla set)")
        if self.rope is None:
            raise ValueError("latent attention (mla set) needs block.rope for its rotary dims")
        if self.has_qkv_bias != self.has_out_bias:
            raise ValueError(f"latent attention has one bias switch (HF attention_bias); got qkv_bias="
                             f"{self.has_qkv_bias}, out_bias={self.has_out_bias}")

    @property
    def lora(self) -> LoraConfig | None:
        return None if self.peft is None else self.peft.lora

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def has_qkv_bias(self) -> bool:
        return self.use_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def has_out_bias(self) -> bool:
        return self.use_bias if self.out_bias is None else self.out_bias

    @property
    def has_mlp_bias(self) -> bool:
        return self.use_bias if self.mlp_bias is None else self.mlp_bias

    def attention_weights(self) -> int:
        """Projection weights of one attention sub-layer: q, k, v and output (or MLA's)."""
        D, N, K, H = self.d_model, self.num_heads, self.kv_heads, self.head_size
        if self.mla is not None:
            return self.mla.weights(D, N)
        return D * N * H + 2 * D * K * H + N * H * D

    def attention_params(self) -> int:
        if self.mla is not None:
            return self.mla.params(self.d_model, self.num_heads, use_bias=self.has_qkv_bias)
        N, K, H = self.num_heads, self.kv_heads, self.head_size
        biases = (N * H + 2 * K * H if self.has_qkv_bias else 0) + (self.d_model if self.has_out_bias else 0)
        return self.attention_weights() + biases + (2 * H if self.qk_norm else 0)

    def attention_score_flops(self, seq_len: int) -> int:
        """Per-token FLOPs of the attention logits and the weighted value sum over seq_len
        keys (as computed, with a mask): 4 N H T, or MLA's 2 N (P + R) T + 2 N H_v T."""
        if self.mla is not None:
            return self.mla.score_flops(self.num_heads, seq_len)
        return 4 * self.num_heads * self.head_size * seq_len

    def mlp_weights(self) -> int:
        """Feed-forward weights a token multiplies through (MoE: router + its k experts + shared)."""
        if self.moe is not None:
            return self.moe.active_weights(self.d_model)
        n_in = 2 if self.mlp_activation in GATED else 1
        return (n_in + 1) * self.d_model * self.d_ff

    def mlp_params(self) -> int:
        if self.moe is not None:
            return self.moe.params(self.d_model)
        n_in = 2 if self.mlp_activation in GATED else 1
        return self.mlp_weights() + ((n_in * self.d_ff + self.d_model) if self.has_mlp_bias else 0)

    def norm_params(self) -> int:
        return self.d_model * (2 if self.norm == "layernorm" and self.use_bias else 1)


class Sublayer(nn.Module):
    """Residual wrapper: post-LN Norm(x + Drop(f(x))) or pre-LN x + Drop(f(Norm(x))).

    With `config.peft.adapter`, f is adapted (`models.layers.adapters.adapt`): "houlsby" on
    every sub-layer, "parallel" on the one whose `role` is "mlp".
    """

    config: BlockConfig
    role: str = "attention"

    @nn.compact
    def __call__(self, x_BTD: jax.Array, fn, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        norm = make_norm(cfg.norm, epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         use_bias=cfg.use_bias, name="norm")
        drop = nn.Dropout(cfg.dropout_rate)
        if cfg.peft is not None and cfg.peft.adapter is not None:
            inner = fn

            def fn(h_BTD):
                return adapt(cfg.peft, self.role, inner, h_BTD, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if cfg.norm_position == "pre":
            out = x_BTD + drop(fn(norm(x_BTD)), deterministic=deterministic)
        else:
            out = norm(x_BTD + drop(fn(x_BTD), deterministic=deterministic))
        return nn.with_logical_constraint(out, ("act_batch", "act_seq", "act_embed"))


def _attention(cfg: BlockConfig, name: str, *, rope: bool) -> MultiHeadAttention | MultiHeadLatentAttention:
    if cfg.mla is not None:
        if not rope:
            raise ValueError("latent attention (block.mla) is self-attention only; cross-attention needs mla=None")
        m = cfg.mla
        # norm_eps stays MLA's 1e-6: transformers builds the latent norms with it, not rms_norm_eps.
        return MultiHeadLatentAttention(
            num_heads=cfg.num_heads, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
            rope=cfg.rope, use_bias=cfg.has_qkv_bias, dropout_rate=cfg.attention_dropout_rate,
            kv_cache_quant=cfg.kv_cache_quant, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        )
    return MultiHeadAttention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, use_bias=cfg.use_bias,
        qkv_bias=cfg.has_qkv_bias, out_bias=cfg.has_out_bias, qk_norm=cfg.qk_norm, qk_norm_eps=cfg.norm_eps,
        dropout_rate=cfg.attention_dropout_rate, rope=cfg.rope if rope else None,
        sliding_window=cfg.sliding_window if rope else None, lora=cfg.lora,
        prefix=cfg.peft.prefix if rope and cfg.peft is not None else None, attention_impl=cfg.attention_impl,
        kv_cache_quant=cfg.kv_cache_quant if rope else "", dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
    )


def _feed_forward(cfg: BlockConfig):
    """The feed-forward sub-layer as a function of the normed input (MoE drops its statistics,
    which it sows into the `intermediates` collection)."""
    if cfg.moe is not None:
        moe = MoEFeedForward(cfg.moe, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="mlp")
        return lambda h, deterministic: moe(h, deterministic=deterministic)[0]
    return FeedForward(hidden_dim=cfg.d_ff, activation=cfg.mlp_activation, use_bias=cfg.has_mlp_bias,
                       dropout_rate=cfg.dropout_rate, lora=cfg.lora, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       name="mlp")


# Kernels LoRA does not adapt (latent attention, experts): a targets regex naming one is refused.
_MLA_KERNELS = tuple(f"self_attention/{k}" for k in ("query", "query_down", "query_up", "latent_kv/kv_down",
                                                     "latent_kv/key_rope", "key_up", "value_up", "out"))
_MOE_KERNELS = tuple(f"mlp/{k}" for k in ("router", "wi_gate", "wi_up", "wo", "shared/wi_gate", "shared/wi_up",
                                          "shared/wo"))


def _refuse_lora(cfg: BlockConfig, layer: nn.Module) -> None:
    if cfg.mla is not None:
        refuse_lora(layer, _MLA_KERNELS, cfg.lora, "a latent-attention kernel")
    if cfg.moe is not None:
        refuse_lora(layer, _MOE_KERNELS, cfg.lora, "a mixture-of-experts kernel")


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward; bidirectional, or causal for decoder-only models."""

    config: BlockConfig
    causal: bool = False

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        deterministic: bool = True,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        padding_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Args: x [B, T, D]; deterministic (no dropout; positional so that remat can mark it
        static); positions [B, T]; segment_ids [B, T]; padding_mask [B, T] (True = token)."""
        cfg = self.config
        _refuse_lora(cfg, self)
        attn = _attention(cfg, "self_attention", rope=True)
        x_BTD = Sublayer(cfg, name="attention_block")(
            x_BTD,
            lambda h: attn(h, causal=self.causal, q_positions=positions, kv_mask=padding_mask,
                           q_segment_ids=segment_ids, kv_segment_ids=segment_ids, deterministic=deterministic),
            deterministic=deterministic,
        )
        mlp = _feed_forward(cfg)
        return Sublayer(cfg, role="mlp", name="mlp_block")(x_BTD, lambda h: mlp(h, deterministic=deterministic),
                                               deterministic=deterministic)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention to the encoder output, then feed-forward."""

    config: BlockConfig

    @nn.compact
    def __call__(
        self,
        y_BTD: jax.Array,
        encoded_BSD: jax.Array,
        deterministic: bool = True,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        encoder_padding_mask: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Args: y [B, T, D] targets so far; encoded [B, S, D]; masks as in EncoderLayer
        (encoder_padding_mask [B, S], encoder_segment_ids [B, S] for packed pairs)."""
        cfg = self.config
        self_attn = _attention(cfg, "self_attention", rope=True)
        y_BTD = Sublayer(cfg, name="self_attention_block")(
            y_BTD,
            lambda h: self_attn(h, causal=True, q_positions=positions, q_segment_ids=segment_ids,
                                kv_segment_ids=segment_ids, deterministic=deterministic),
            deterministic=deterministic,
        )
        cross_attn = _attention(cfg, "cross_attention", rope=False)
        cross_segments = encoder_segment_ids is not None
        y_BTD = Sublayer(cfg, name="cross_attention_block")(
            y_BTD,
            lambda h: cross_attn(h, encoded_BSD, kv_mask=encoder_padding_mask,
                                 q_segment_ids=segment_ids if cross_segments else None,
                                 kv_segment_ids=encoder_segment_ids, deterministic=deterministic),
            deterministic=deterministic,
        )
        mlp = _feed_forward(cfg)
        return Sublayer(cfg, role="mlp", name="mlp_block")(y_BTD, lambda h: mlp(h, deterministic=deterministic),
                                               deterministic=deterministic)
