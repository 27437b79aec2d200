"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017).

Axis letters: B batch, S source length, T target length, D model width, V vocabulary.

    src ids --Embed*sqrt(D) + PE--> N x EncoderLayer --> encoded_BSD
    tgt ids --Embed*sqrt(D) + PE--> N x DecoderLayer(encoded) --> logits_BTV

`encode` and `decode` are separate methods so that generation runs the encoder once.
Padding is read from `pad_id` in the token ids unless explicit segment ids are given
(packed examples: segment 0 is padding, and no token attends across segments).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from models.layers.blocks import BlockConfig, DecoderLayer, EncoderLayer
from models.layers.embedding import Embed
from models.layers.norms import make_norm
from models.layers.positional import LearnedPositionalEmbedding, sinusoidal_embedding

POSITIONALS = ("sinusoidal", "learned", "rope")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Encoder-decoder hyper-parameters.

    Attributes:
      vocab_size: V (source and target share one vocabulary, as in the paper's BPE).
      num_encoder_layers, num_decoder_layers: N for each stack.
      block: the per-layer settings (width, heads, FFN, norm placement, dropout).
      max_len: longest sequence (sizes the learned position table).
      positional: "sinusoidal", "learned", or "rope" (rotary, inside self-attention).
      share_embeddings: one matrix for source and target embeddings and the pre-softmax
        projection (paper section 3.4).
      scale_embeddings: multiply embeddings by sqrt(D) (paper section 3.4).
      final_norm: a norm after each stack (needed for pre-LN; torch.nn.Transformer has
        it for post-LN too).
      pad_id: the padding token id.
      remat: recompute each layer's activations in the backward pass.
    """

    vocab_size: int
    block: BlockConfig
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    max_len: int = 512
    positional: str = "sinusoidal"
    share_embeddings: bool = True
    scale_embeddings: bool = True
    final_norm: bool = False
    pad_id: int = 0
    remat: bool = False

    def __post_init__(self):
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional={self.positional!r}; expected one of {POSITIONALS}")
        if (self.positional == "rope") != (self.block.rope is not None):
            raise ValueError("positional='rope' and block.rope must be set together")

    def num_params(self) -> int:
        """Trainable parameters, counted from the shapes (tested against `init`)."""
        b, D, V = self.block, self.block.d_model, self.vocab_size
        embed = V * D if self.share_embeddings else 3 * V * D  # src, tgt, output
        pos = 2 * self.max_len * D if self.positional == "learned" else 0
        enc = self.num_encoder_layers * (b.attention_params() + b.mlp_params() + 2 * b.norm_params())
        dec = self.num_decoder_layers * (2 * b.attention_params() + b.mlp_params() + 3 * b.norm_params())
        final = 2 * b.norm_params() if self.final_norm else 0
        return embed + pos + enc + dec + final

    def flops_per_token(self, src_len: int, tgt_len: int) -> int:
        """Forward matmul FLOPs per target token for a (src_len, tgt_len) pair.

        Two FLOPs per multiply-add of every matmul: projections, feed-forward, attention
        scores and values (over the full S or T keys, as computed), and the output
        projection. The encoder's work and the cross-attention K/V projections are spread
        over the target tokens. A training step costs about 3x this.
        """
        b, D = self.block, self.block.d_model
        S, T = src_len, tgt_len
        NH, KH = b.num_heads * b.head_size, b.kv_heads * b.head_size
        encoder_per_src_token = 2 * b.attention_weights() + 2 * b.mlp_weights() + 4 * NH * S
        self_attention = 2 * b.attention_weights() + 4 * NH * T
        cross_attention = 2 * (2 * D * NH) + 2 * (2 * D * KH) * S / T + 4 * NH * S
        decoder_per_tgt_token = self_attention + cross_attention + 2 * b.mlp_weights()
        return int(self.num_encoder_layers * encoder_per_src_token * S / T
                   + self.num_decoder_layers * decoder_per_tgt_token + 2 * D * self.vocab_size)


class Transformer(nn.Module):
    """Encoder-decoder Transformer; `__call__(src, tgt)` returns next-token logits [B, T, V]."""

    config: TransformerConfig

    def setup(self):
        cfg, b = self.config, self.config.block
        init = nn.initializers.normal(stddev=b.d_model**-0.5)
        self.embed = Embed(cfg.vocab_size, b.d_model, dtype=b.dtype, param_dtype=b.param_dtype,
                           embedding_init=init, name="embed")
        if not cfg.share_embeddings:
            self.target_embed = Embed(cfg.vocab_size, b.d_model, dtype=b.dtype, param_dtype=b.param_dtype,
                                      embedding_init=init, name="target_embed")
            self.output_embed = Embed(cfg.vocab_size, b.d_model, dtype=b.dtype, param_dtype=b.param_dtype,
                                      embedding_init=init, name="output_embed")
        if cfg.positional == "learned":
            self.source_positions = LearnedPositionalEmbedding(cfg.max_len, b.d_model, b.dtype, b.param_dtype)
            self.target_positions = LearnedPositionalEmbedding(cfg.max_len, b.d_model, b.dtype, b.param_dtype)
        # static_argnums count `self`: `deterministic` is argument 2 of EncoderLayer, 3 of DecoderLayer.
        enc_cls = nn.remat(EncoderLayer, static_argnums=(2,)) if cfg.remat else EncoderLayer
        dec_cls = nn.remat(DecoderLayer, static_argnums=(3,)) if cfg.remat else DecoderLayer
        self.encoder_layers = [enc_cls(b, name=f"encoder_{i}") for i in range(cfg.num_encoder_layers)]
        self.decoder_layers = [dec_cls(b, name=f"decoder_{i}") for i in range(cfg.num_decoder_layers)]
        if cfg.final_norm:
            kw = dict(epsilon=b.norm_eps, dtype=b.dtype, param_dtype=b.param_dtype, use_bias=b.use_bias)
            self.encoder_norm = make_norm(b.norm, name="encoder_norm", **kw)
            self.decoder_norm = make_norm(b.norm, name="decoder_norm", **kw)
        self.dropout = nn.Dropout(b.dropout_rate)

    def _embed(self, ids_BT, positions_BT, table: Embed, pos_table, deterministic):
        cfg = self.config
        x_BTD = table(ids_BT)
        if cfg.scale_embeddings:
            x_BTD = x_BTD * jnp.sqrt(jnp.asarray(cfg.block.d_model, x_BTD.dtype))
        if cfg.positional == "sinusoidal":
            x_BTD = x_BTD + sinusoidal_embedding(positions_BT, cfg.block.d_model).astype(x_BTD.dtype)
        elif cfg.positional == "learned":
            x_BTD = x_BTD + pos_table(positions_BT)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_seq", "act_embed"))
        return self.dropout(x_BTD, deterministic=deterministic)

    def _masks(self, ids_BT, segment_ids_BT, positions_BT):
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        padding_BT = ids_BT != self.config.pad_id if segment_ids_BT is None else segment_ids_BT != 0
        return padding_BT, positions_BT

    def encode(self, src_ids_BS, *, src_segment_ids=None, src_positions=None, deterministic=True):
        """Source ids [B, S] -> encoded states [B, S, D]."""
        padding_BS, positions_BS = self._masks(src_ids_BS, src_segment_ids, src_positions)
        x_BSD = self._embed(src_ids_BS, positions_BS, self.embed,
                            getattr(self, "source_positions", None), deterministic)
        for layer in self.encoder_layers:
            x_BSD = layer(x_BSD, deterministic, positions=positions_BS, segment_ids=src_segment_ids,
                          padding_mask=padding_BS)
        return self.encoder_norm(x_BSD) if self.config.final_norm else x_BSD

    def decode(self, tgt_ids_BT, encoded_BSD, src_ids_BS, *, tgt_segment_ids=None, tgt_positions=None,
               src_segment_ids=None, deterministic=True):
        """Target ids [B, T] (shifted right) and the encoder output -> logits [B, T, V] (float32)."""
        cfg = self.config
        src_padding_BS = src_ids_BS != cfg.pad_id if src_segment_ids is None else src_segment_ids != 0
        _, positions_BT = self._masks(tgt_ids_BT, tgt_segment_ids, tgt_positions)
        table = self.embed if cfg.share_embeddings else self.target_embed
        y_BTD = self._embed(tgt_ids_BT, positions_BT, table, getattr(self, "target_positions", None),
                            deterministic)
        for layer in self.decoder_layers:
            y_BTD = layer(y_BTD, encoded_BSD, deterministic, positions=positions_BT,
                          segment_ids=tgt_segment_ids, encoder_padding_mask=src_padding_BS,
                          encoder_segment_ids=src_segment_ids)
        if cfg.final_norm:
            y_BTD = self.decoder_norm(y_BTD)
        out_table = self.embed if cfg.share_embeddings else self.output_embed
        logits_BTV = out_table.attend(y_BTD).astype(jnp.float32)
        return nn.with_logical_constraint(logits_BTV, ("act_batch", "act_seq", "act_vocab"))

    def __call__(self, src_ids_BS, tgt_ids_BT, *, src_segment_ids=None, tgt_segment_ids=None,
                 src_positions=None, tgt_positions=None, deterministic=True):
        encoded_BSD = self.encode(src_ids_BS, src_segment_ids=src_segment_ids, src_positions=src_positions,
                                  deterministic=deterministic)
        return self.decode(tgt_ids_BT, encoded_BSD, src_ids_BS, tgt_segment_ids=tgt_segment_ids,
                           tgt_positions=tgt_positions, src_segment_ids=src_segment_ids,
                           deterministic=deterministic)
