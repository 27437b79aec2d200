"""A GPT-2-style decoder-only language model built from the shared layers.

Axis letters: B batch, T length, D model width, V vocabulary.

    ids --Embed + learned positions--> L x EncoderLayer(causal, pre-LN) --> Norm --> logits

Packed rows (several documents in one row) pass `segment_ids` and `positions`: tokens
attend only within their document and positions restart at each document.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers.blocks import BlockConfig, EncoderLayer
from models.layers.embedding import Embed
from models.layers.norms import make_norm
from models.layers.positional import LearnedPositionalEmbedding

REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Decoder-only LM hyper-parameters.

    Attributes:
      vocab_size: V.
      num_layers: L.
      block: per-layer settings (GPT-2: pre-LN LayerNorm, gelu_tanh MLP, biases).
      max_len: context length (rows of the learned position table).
      tie_embeddings: the output projection is the token embedding transposed.
      remat: "none", "full" (recompute each layer), "dots_saveable" (keep matmul
        outputs, recompute the rest) or "nothing_saveable".
    """

    vocab_size: int
    block: BlockConfig
    num_layers: int = 12
    max_len: int = 1024
    tie_embeddings: bool = True
    remat: str = "none"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")

    def num_params(self, *, include_embeddings: bool = True) -> int:
        b, D, V = self.block, self.block.d_model, self.vocab_size
        layers = self.num_layers * (b.attention_params() + b.mlp_params() + 2 * b.norm_params())
        embeddings = V * D + self.max_len * D + (0 if self.tie_embeddings else V * D)
        return layers + b.norm_params() + (embeddings if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token at context `seq_len` (2 per multiply-add).

        Projections and MLP (2 x weights), attention scores and values over all T keys
        (4 * N * H * T, as computed with a mask), and the output projection. A training
        step costs 3x this (forward + backward), which is what MFU uses.
        """
        b = self.block
        per_layer = 2 * (b.attention_weights() + b.mlp_weights()) + 4 * b.num_heads * b.head_size * seq_len
        return self.num_layers * per_layer + 2 * b.d_model * self.vocab_size


def _remat_layer(policy: str):
    if policy == "none":
        return EncoderLayer
    jax_policy = {
        "full": None,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    }[policy]
    # static_argnums counts `self`: argument 2 is `deterministic`.
    return nn.remat(EncoderLayer, policy=jax_policy, static_argnums=(2,))


class GPT(nn.Module):
    """Decoder-only Transformer; returns float32 logits [B, T, V]."""

    config: GPTConfig

    @nn.compact
    def __call__(self, ids_BT: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        cfg, b = self.config, self.config.block
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        embed = Embed(cfg.vocab_size, b.d_model, dtype=b.dtype, param_dtype=b.param_dtype,
                      embedding_init=nn.initializers.normal(0.02), name="embed")
        x_BTD = embed(ids_BT) + LearnedPositionalEmbedding(cfg.max_len, b.d_model, b.dtype, b.param_dtype,
                                                           name="positions")(positions)
        x_BTD = nn.Dropout(b.dropout_rate)(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_seq", "act_embed"))
        padding_BT = None if segment_ids is None else segment_ids != 0
        layer_cls = _remat_layer(cfg.remat)
        for i in range(cfg.num_layers):
            x_BTD = layer_cls(b, causal=True, name=f"layer_{i}")(
                x_BTD, deterministic, positions=positions, segment_ids=segment_ids, padding_mask=padding_BT)
        x_BTD = make_norm(b.norm, epsilon=b.norm_eps, dtype=b.dtype, param_dtype=b.param_dtype,
                          use_bias=b.use_bias, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            kernel = self.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                        ("embed", "vocab")),
                                (b.d_model, cfg.vocab_size), b.param_dtype)
            logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, kernel.astype(b.dtype))
        return nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))
