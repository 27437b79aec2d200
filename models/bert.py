"""BERT (Devlin et al. 2018): a bidirectional post-LN encoder built from the shared layers.

Axis letters: B batch, T length, D model width, V vocabulary, C classes.

    ids --word + position + token-type embeddings, LayerNorm, dropout-->
        L x EncoderLayer(bidirectional, post-LN) --> hidden [B, T, D]
                                                  --> pooler: tanh(Dense(hidden[:, 0])) [B, D]

Heads, each wrapping a `BertModel` named `bert` (Hugging Face's layout, so that checkpoints
convert name by name, see `models/convert/bert.py`):
- `BertForMaskedLM`: Dense + activation + LayerNorm, then logits tied to the word embeddings
  plus an output bias;
- `BertForSequenceClassification`: pooler -> dropout -> Dense(C);
- `BertForQuestionAnswering`: per-token start and end logits.

`attention_mask` [B, T] is 1 for tokens and 0 for padding, as in Hugging Face; padded keys
are masked out, padded queries are computed (and ignored by the caller).

Packed rows (several documents in one row, as the pretraining pipeline makes them) pass
`segment_ids` [B, T] (1, 2, ... per document, 0 on padding) and `positions` [B, T]: a token
attends only to tokens of its own document, and positions restart at each document.
`segment_ids` are not BERT's token types (sentence A/B), which are `token_type_ids`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers.blocks import BlockConfig
from models.layers.embedding import Embed
from models.layers.feedforward import ACTIVATIONS
from models.layers.norms import LayerNorm
from models.layers.peft import check_lora_matched
from models.layers.positional import LearnedPositionalEmbedding
from models.layers.stack import check_remat, layer_class, scanned_layers, stack_layers, unstack_layers

HEADS = ("base", "mlm", "classification", "qa")
INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters.

    Attributes:
      vocab_size: V.
      block: per-layer settings; BERT's are post-LN LayerNorm, exact (erf) GELU,
        norm_eps=1e-12 and biases everywhere.
      num_layers: L.
      max_len: rows of the learned position table.
      type_vocab_size: rows of the token-type (segment A/B) table.
      pad_id: the padding token id (for callers that build attention masks from ids).
      remat: "none", "full", "dots_saveable" or "nothing_saveable" (models/layers/stack.py).
      scan_layers: run the layers as one `nn.scan` (params stacked under `layers`) instead
        of a loop (`layer_{i}`); same outputs, see `scan_params` / `unscan_params`.
    """

    vocab_size: int
    block: BlockConfig
    num_layers: int = 12
    max_len: int = 512
    type_vocab_size: int = 2
    pad_id: int = 0
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        check_remat(self.remat)
        b = self.block
        if b.norm_position != "post" or b.norm != "layernorm":
            raise ValueError(f"BERT is post-LN with LayerNorm; got norm_position={b.norm_position!r}, "
                             f"norm={b.norm!r}")
        if b.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"BERT's MLP is not gated; mlp_activation={b.mlp_activation!r}, "
                             f"expected one of {tuple(ACTIVATIONS)}")
        if b.rope is not None or b.sliding_window is not None:
            raise ValueError("BERT uses learned absolute positions and full attention; unset rope "
                             "and sliding_window")

    def num_params(self, head: str = "base", num_labels: int = 2) -> int:
        """Parameter count of `head` ("base" is BertModel with its pooler); tied weights once."""
        if head not in HEADS:
            raise ValueError(f"head={head!r}; expected one of {HEADS}")
        b, D, V = self.block, self.block.d_model, self.vocab_size
        layers = self.num_layers * (b.attention_params() + b.mlp_params() + 2 * b.norm_params())
        embeddings = (V + self.max_len + self.type_vocab_size) * D + b.norm_params()
        pooler = D * D + D
        extra = {
            "base": pooler,
            "mlm": D * D + D + b.norm_params() + V,  # transform, its norm, output bias
            "classification": pooler + D * num_labels + num_labels,
            "qa": 2 * D + 2,
        }[head]
        return layers + embeddings + extra

    def flops_per_token(self, seq_len: int, head: str = "base") -> int:
        """Forward matmul FLOPs per token at length `seq_len` (2 per multiply-add).

        Projections and MLP (2 x weights) and attention over all T keys (4 * N * H * T) per
        layer; the "mlm" head adds its transform and the V-way output for every token. The
        pooler and the small heads act once per sequence or are negligible and are left out.
        """
        if head not in HEADS:
            raise ValueError(f"head={head!r}; expected one of {HEADS}")
        b, D = self.block, self.block.d_model
        per_layer = 2 * (b.attention_weights() + b.mlp_weights()) + 4 * b.num_heads * b.head_size * seq_len
        mlm = 2 * (D * D + D * self.vocab_size) if head == "mlm" else 0
        return self.num_layers * per_layer + mlm


def _layer_groups(config: BertConfig) -> list[tuple[str, int, int]]:
    return [("layers", 0, config.num_layers)]


def scan_params(params: dict, config: BertConfig) -> dict:
    """Per-layer params (`layer_{i}`, top level or under a head's `bert`) -> the stacked
    layout of `scan_layers=True`."""
    if "bert" in params:
        return {**params, "bert": scan_params(params["bert"], config)}
    return stack_layers(params, _layer_groups(config))


def unscan_params(params: dict, config: BertConfig) -> dict:
    """The stacked layout of `scan_layers=True` -> per-layer params."""
    if "bert" in params:
        return {**params, "bert": unscan_params(params["bert"], config)}
    return unstack_layers(params, _layer_groups(config))


def _dense(features: int, axes: tuple, cfg: BlockConfig, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.with_logical_partitioning(INIT, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name)


class BertModel(nn.Module):
    """The encoder; returns (hidden [B, T, D], pooled [B, D] or None without the pooler)."""

    config: BertConfig
    add_pooler: bool = True

    def setup(self):
        cfg, b = self.config, self.config.block
        self.word_embeddings = Embed(cfg.vocab_size, b.d_model, b.dtype, b.param_dtype, embedding_init=INIT,
                                     lora=b.lora)
        self.position_embeddings = LearnedPositionalEmbedding(cfg.max_len, b.d_model, b.dtype, b.param_dtype,
                                                              embedding_init=INIT)
        # A handful of rows: replicated, not sharded over `vocab`.
        self.token_type_embeddings = self.param(
            "token_type_embeddings", nn.with_logical_partitioning(INIT, (None, "embed")),
            (cfg.type_vocab_size, b.d_model), b.param_dtype)
        self.embeddings_norm = LayerNorm(epsilon=b.norm_eps, dtype=b.dtype, param_dtype=b.param_dtype)
        self.embeddings_dropout = nn.Dropout(b.dropout_rate)
        if cfg.scan_layers:
            self.layers = scanned_layers(b, length=cfg.num_layers, causal=False, remat=cfg.remat)
        else:
            self.layers = [layer_class(cfg.remat)(b, name=f"layer_{i}") for i in range(cfg.num_layers)]
        if self.add_pooler:
            self.pooler = _dense(b.d_model, ("embed", None), b)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array | None]:
        """Args:
          input_ids: [B, T] int token ids.
          attention_mask: [B, T], 1 for tokens and 0 for padding (None: no padding, or
            `segment_ids != 0` when segment_ids are given).
          token_type_ids: [B, T] token types, sentence A / B (None: all 0).
          positions: [B, T] position ids (None: 0..T-1).
          segment_ids: [B, T] document ids of packed rows (None: one document per row).
          deterministic: no dropout.

        Returns:
          hidden [B, T, D] and pooled [B, D] (None when `add_pooler` is False).
        """
        b = self.config.block
        ids_BT = input_ids
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids_BT)
        x_BTD = (self.word_embeddings(ids_BT) + self.position_embeddings(positions)
                 + jnp.take(self.token_type_embeddings, token_type_ids, axis=0).astype(b.dtype))
        x_BTD = self.embeddings_norm(x_BTD)
        x_BTD = self.embeddings_dropout(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_seq", "act_embed"))
        if attention_mask is not None:
            padding_BT = attention_mask.astype(bool)
        else:
            padding_BT = None if segment_ids is None else segment_ids != 0
        if self.config.scan_layers:
            x_BTD, _ = self.layers(x_BTD, deterministic, None, segment_ids, padding_BT)
        else:
            for layer in self.layers:
                x_BTD = layer(x_BTD, deterministic, segment_ids=segment_ids, padding_mask=padding_BT)
        pooled_BD = jnp.tanh(self.pooler(x_BTD[:, 0])) if self.add_pooler else None
        if self.is_initializing():
            check_lora_matched(b.lora, self.variables.get("params", {}))
        return x_BTD, pooled_BD

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits [B, T, V] against the word embedding table (the tied MLM decoder)."""
        return self.word_embeddings.attend(x_BTD)


class BertForMaskedLM(nn.Module):
    """Masked-LM logits [B, T, V] in float32; arguments as `BertModel`."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        cfg, b = self.config, self.config.block
        bert = BertModel(cfg, add_pooler=False, name="bert")
        x_BTD, _ = bert(input_ids, attention_mask, token_type_ids, positions=positions, segment_ids=segment_ids,
                        deterministic=deterministic)
        x_BTD = ACTIVATIONS[b.mlp_activation](_dense(b.d_model, ("embed", None), b, name="transform")(x_BTD))
        x_BTD = LayerNorm(epsilon=b.norm_eps, dtype=b.dtype, param_dtype=b.param_dtype, name="transform_norm")(x_BTD)
        bias_V = self.param("output_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                            (cfg.vocab_size,), b.param_dtype)
        logits_BTV = bert.attend(x_BTD).astype(jnp.float32) + bias_V.astype(jnp.float32)
        return nn.with_logical_constraint(logits_BTV, ("act_batch", "act_seq", "act_vocab"))


class BertForSequenceClassification(nn.Module):
    """Class logits [B, C] in float32 from the pooled first token."""

    config: BertConfig
    num_labels: int = 2

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        b = self.config.block
        _, pooled_BD = BertModel(self.config, name="bert")(input_ids, attention_mask, token_type_ids,
                                                           deterministic=deterministic)
        pooled_BD = nn.Dropout(b.dropout_rate)(pooled_BD, deterministic=deterministic)
        return _dense(self.num_labels, ("embed", None), b, name="classifier")(pooled_BD).astype(jnp.float32)


class BertForQuestionAnswering(nn.Module):
    """Span logits: (start [B, T], end [B, T]) in float32."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        b = self.config.block
        x_BTD, _ = BertModel(self.config, add_pooler=False, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        logits_BT2 = _dense(2, ("embed", None), b, name="qa_outputs")(x_BTD).astype(jnp.float32)
        return logits_BT2[..., 0], logits_BT2[..., 1]
