"""The decoder-only language model of lmlab: GPT-2, LLaMA 2/3, Qwen2 and Qwen3 by config.

Axis letters: B batch, T length, D model width, V vocabulary.

    ids --Embed (+ learned positions)--> L x EncoderLayer(causal, pre-LN) --> Norm --> logits

The families differ only by switches of `GPTConfig` and its `BlockConfig`:

    GPT-2   positional="learned", LayerNorm, gelu_tanh MLP, biases, tied embeddings
    LLaMA   positional="rope" (block.rope), RMSNorm, swiglu, no biases, GQA, untied
    Qwen2   LLaMA + qkv_bias
    Qwen3   LLaMA + qk_norm (+ an explicit head_dim)
    Mixtral LLaMA with a mixture of SwiGLU experts (block.moe) in every layer
    Qwen3-MoE Qwen3 with a mixture of experts in every layer

`llama_config`, `qwen2_config`, `qwen3_config`, `mixtral_config` and `qwen3_moe_config`
build those; `models/convert/llama.py` and `models/convert/moe.py` read Hugging Face
configs and weights into them.

Packed rows (several documents in one row) pass `segment_ids` and `positions`: tokens
attend only within their document and positions restart at each document.

Layers run as a Python loop (params `layer_{i}`) or, with `scan_layers=True`, as one
`nn.scan` per run of identical layers (params stacked on a leading "layers" axis under
`dense_layers` and `layers`): one layer compiles instead of L, for the same outputs.
`scan_params` / `unscan_params` convert between the two layouts (checkpoint converters
work on the per-layer one).

Decoding with a KV cache is the same `apply` with a `cache` collection (the flax
`decode` pattern, switched on by the collection being mutable rather than by a flag, as
the `intermediates` collection switches on sowing):

    cache = inference.kv_cache.init_cache(model, batch=B, max_len=S)  # zeros, per layer
    logits, state = model.apply({"params": p, "cache": cache}, ids_BT, positions=pos_BT,
                                mutable=["cache"])                    # state["cache"]

Each attention layer writes the T new tokens' keys and values at slots `positions` of
its row (each row at its own length: prompts of different lengths need no left padding)
and attends to the whole cache under the causal mask over positions. With
`scan_layers=True` the cache is stacked on a leading layers axis like the params.
Multi-token prediction modules do not run while decoding.

A loss that applies the LM head itself, chunk by chunk (`train.losses.chunked_cross_entropy`,
never holding the [B, T, V] logits), asks for the final normed hidden states instead:

    hidden_BTD, head = model.apply({"params": p}, ids_BT, return_hidden=True)
    logits_BCV = head(hidden_BTD[:, :C])   # `LMHead`: the tied table or lm_head, as data

With multi-token prediction the modules' normed hidden states are then sown as
`intermediates/mtp_hidden` (instead of `mtp_logits`), for the same head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from models.layers import linear
from models.layers import moe as moe_lib
from models.layers import pipeline as pipeline_lib
from models.layers.blocks import BlockConfig
from models.layers.embedding import Embed
from models.layers.moe import MoEConfig
from models.layers.norms import make_norm
from models.layers.peft import check_lora_matched, lora_factors, lora_output
from models.layers.positional import LearnedPositionalEmbedding, RopeConfig
from models.layers.stack import check_remat, layer_class, scanned_layers, stack_layers, unstack_layers

POSITIONALS = ("learned", "rope")
HEADS = ("lm", "score", "lm_score")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Decoder-only LM hyper-parameters.

    Attributes:
      vocab_size: V.
      num_layers: L.
      block: per-layer settings (GPT-2: pre-LN LayerNorm, gelu_tanh MLP, biases).
      max_len: context length (rows of the learned position table, if any).
      positional: "learned" (a [max_len, D] table added to the embeddings, GPT-2) or
        "rope" (rotary embeddings in attention from `block.rope`, no table, LLaMA).
      tie_embeddings: the output projection is the token embedding transposed; if False
        a separate `lm_head` [D, V].
      remat: "none", "full" (recompute each layer), "dots_saveable" (keep matmul
        outputs, recompute the rest) or "nothing_saveable".
      first_dense_layers: with `block.moe` set, the first this-many layers have a dense
        MLP of width `block.d_ff` instead of experts (DeepSeek-V3: first_k_dense_replace).
      scan_layers: run the layers with `nn.scan` (one compiled layer, params stacked on a
        leading "layers" axis under `dense_layers` / `layers`) instead of a Python loop
        (params `layer_{i}`); outputs are equal, see `scan_params` / `unscan_params`.
      mtp_depth: multi-token prediction modules (DeepSeek-V3): module k predicts the token
        k + 1 places ahead; their logits are sown as `intermediates/mtp_logits`.
      head: what the model returns from the final normed hidden states: "lm" (logits
        [B, T, V]); "score" (scores [B, T, num_scores] from a linear `score` [D, num_scores]
        without bias, and no LM head: transformers' *ForSequenceClassification, a reward
        model); "lm_score" (both, as (logits, scores): a policy with a value head on its trunk).
      num_scores: outputs of the `score` head (1 for a reward or value model).
      pipeline_microbatches: where the model is traced with the logical axis `act_stage`
        split over S > 1 devices (a pipeline strategy), the scanned `layers` stack runs as a
        GPipe pipeline of S stages and this many micro-batches (`models.layers.pipeline`;
        training and evaluation, not decoding): same parameters, same outputs. Elsewhere
        unused.
    """

    vocab_size: int
    block: BlockConfig
    num_layers: int = 12
    max_len: int = 1024
    tie_embeddings: bool = True
    remat: str = "none"
    positional: str = "learned"
    first_dense_layers: int = 0
    scan_layers: bool = False
    mtp_depth: int = 0
    head: str = "lm"
    num_scores: int = 1
    pipeline_microbatches: int = 0

    def __post_init__(self):
        check_remat(self.remat)
        if self.pipeline_microbatches < 0:
            raise ValueError(f"pipeline_microbatches={self.pipeline_microbatches} must be >= 0")
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}; expected one of {HEADS}")
        if self.head != "lm" and self.num_scores < 1:
            raise ValueError(f"num_scores={self.num_scores} must be >= 1 with head={self.head!r}")
        if self.head == "score" and self.mtp_depth:
            raise ValueError("head='score' (a sequence scorer) has no LM head for multi-token prediction; "
                             "set mtp_depth=0")
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional={self.positional!r}; expected one of {POSITIONALS}")
        if self.positional == "rope" and self.block.rope is None:
            raise ValueError("positional='rope' needs block.rope set, e.g. BlockConfig(..., rope=RopeConfig())")
        if self.positional == "learned" and self.block.rope is not None:
            raise ValueError("block.rope is set but positional='learned'; use positional='rope' (one position "
                             "scheme per model)")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            raise ValueError(f"first_dense_layers={self.first_dense_layers} must be in [0, num_layers="
                             f"{self.num_layers}]")
        if self.first_dense_layers and self.block.moe is None:
            raise ValueError("first_dense_layers is set but block.moe is None: every layer is dense already")
        if self.mtp_depth < 0:
            raise ValueError(f"mtp_depth={self.mtp_depth} must be >= 0")

    def layer_block(self, index: int) -> BlockConfig:
        """The BlockConfig of layer `index` (dense MLP for the first `first_dense_layers`)."""
        return dataclasses.replace(self.block, moe=None) if index < self.first_dense_layers else self.block

    def _layer_params(self, index: int) -> int:
        b = self.layer_block(index)
        return b.attention_params() + b.mlp_params() + 2 * b.norm_params()

    def mtp_params(self) -> int:
        """Parameters of the multi-token prediction modules (embedding and head are shared)."""
        b = self.block
        per_module = 3 * b.norm_params() + 2 * b.d_model * b.d_model + self._layer_params(self.num_layers)
        return self.mtp_depth * per_module

    def num_params(self, *, include_embeddings: bool = True, include_mtp: bool = True) -> int:
        """Parameters as stored (tied tables once). DeepSeek-V3's published 671B leaves out
        its multi-token prediction module: `include_mtp=False`."""
        b, D, V = self.block, self.block.d_model, self.vocab_size
        layers = sum(self._layer_params(i) for i in range(self.num_layers))
        table = self.max_len * D if self.positional == "learned" else 0
        lm_head = 0 if self.tie_embeddings or self.head == "score" else V * D
        embeddings = V * D + table + lm_head
        mtp = self.mtp_params() if include_mtp else 0
        score = 0 if self.head == "lm" else D * self.num_scores
        return layers + b.norm_params() + (embeddings if include_embeddings else 0) + mtp + score

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token at context `seq_len` (2 per multiply-add).

        Projections and MLP (2 x weights), attention scores and values over all T keys
        (4 * N * H * T as computed with a mask; MLA: `BlockConfig.attention_score_flops`), the output projection, and each
        multi-token prediction module (its projection, layer and output head). A training
        step costs 3x this (forward + backward), which is what MFU uses.
        """
        def layer(b: BlockConfig) -> int:
            return 2 * (b.attention_weights() + b.mlp_weights()) + b.attention_score_flops(seq_len)

        b = self.block
        head = (0 if self.head == "score" else 2 * b.d_model * self.vocab_size) + (
            0 if self.head == "lm" else 2 * b.d_model * self.num_scores)
        mtp = self.mtp_depth * (2 * 2 * b.d_model * b.d_model + layer(self.layer_block(self.num_layers)) + head)
        return sum(layer(self.layer_block(i)) for i in range(self.num_layers)) + head + mtp


def layer_groups(config: GPTConfig) -> list[tuple[str, int, int]]:
    """(scanned name, first layer, stop) of each run of identical layers: the dense first
    layers (`dense_layers`) and the rest (`layers`); empty runs are left out."""
    k, L = config.first_dense_layers, config.num_layers
    return [(name, start, stop) for name, start, stop in (("dense_layers", 0, k), ("layers", k, L)) if stop > start]


def scan_params(params: dict, config: GPTConfig) -> dict:
    """Per-layer params (`layer_{i}`) -> the stacked layout of `scan_layers=True`."""
    return stack_layers(params, layer_groups(config))


def unscan_params(params: dict, config: GPTConfig) -> dict:
    """The stacked layout of `scan_layers=True` -> per-layer params (`layer_{i}`)."""
    return unstack_layers(params, layer_groups(config))


@flax.struct.dataclass
class LMHead:
    """The output projection as data: logits = hidden @ kernel, float32 (`GPT(return_hidden=True)`).

    Attributes:
      kernel: the tied embedding table [V, D], or the untied `lm_head` [D, V].
      tied: which of the two `kernel` is.
      dtype: the compute dtype of the projection.
    """

    kernel: jax.Array
    tied: bool = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)

    def __call__(self, h_BTD: jax.Array) -> jax.Array:
        # einsum("BTD,VD->BTV") or ("BTD,DV->BTV") as one 2-D dot: no transposed [V, B*T] gradient
        # copy in the backward pass (models/layers/linear.py)
        kernel_DV = self.kernel.astype(self.dtype).T if self.tied else self.kernel.astype(self.dtype)
        logits_BTV = linear.project(h_BTD.astype(self.dtype), kernel_DV)
        return nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))


class MultiTokenPrediction(nn.Module):
    """One DeepSeek-V3 multi-token prediction module (DeepSeek-AI 2024, section 2.2).

    From the previous depth's hidden state h [B, T, D] and the embedding of the token
    `depth` places ahead, e [B, T, D]:
        h' = Layer(W [RMSNorm(e); RMSNorm(h)]),   logits = OutputHead(Norm(h'))
    with W [2D, D], a full Transformer layer, and the embedding and output head shared
    with the main model (passed in). Returns (h', logits).
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, h_BTD, e_BTD, head, deterministic, positions, segment_ids, padding_mask):
        cfg, b = self.config, self.config.block

        def norm(name):
            return make_norm(b.norm, epsilon=b.norm_eps, dtype=b.dtype, param_dtype=b.param_dtype,
                             use_bias=b.use_bias, name=name)

        joined = jnp.concatenate([norm("embed_norm")(e_BTD), norm("hidden_norm")(h_BTD)], -1)
        proj = linear.kernel_param(self, "proj", nn.initializers.normal(0.02), (2 * b.d_model, b.d_model),
                                   b.param_dtype, ("mlp", "embed"))
        h_BTD = linear.project(joined.astype(b.dtype), proj.astype(b.dtype))  # einsum("BTE,ED->BTD")
        h_BTD = layer_class(cfg.remat)(cfg.layer_block(cfg.num_layers), causal=True, name="layer")(
            h_BTD, deterministic, positions=positions, segment_ids=segment_ids, padding_mask=padding_mask)
        return h_BTD, head(norm("final_norm")(h_BTD))


class GPT(nn.Module):
    """Decoder-only Transformer; returns float32 logits [B, T, V] (`GPTConfig.head`: or
    float32 scores [B, T, num_scores], or both as (logits, scores)).

    With a mutable `cache` collection it decodes with a KV cache (module docstring):
    `positions` [B, T] are then the tokens' positions and cache slots, default 0..T-1.

    `return_hidden=True` (head "lm" only, no LoRA on an untied `lm_head`) returns
    (final normed hidden states [B, T, D], `LMHead`) instead of the logits: the loss applies
    the head (module docstring).
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, ids_BT: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, deterministic: bool = True, return_hidden: bool = False):
        cfg, b = self.config, self.config.block
        if return_hidden and cfg.head != "lm":
            raise ValueError(f"return_hidden=True returns the LM head's input, but head={cfg.head!r}; use head='lm'")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        embed = Embed(cfg.vocab_size, b.d_model, dtype=b.dtype, param_dtype=b.param_dtype,
                      embedding_init=nn.initializers.normal(0.02), lora=b.lora, name="embed")
        x_BTD = embed(ids_BT)
        if cfg.positional == "learned":
            x_BTD += LearnedPositionalEmbedding(cfg.max_len, b.d_model, b.dtype, b.param_dtype,
                                                name="positions")(positions)
        x_BTD = nn.Dropout(b.dropout_rate)(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_seq", "act_embed"))
        padding_BT = None if segment_ids is None else segment_ids != 0
        decoding = self.is_mutable_collection("cache") and not self.is_initializing()
        if decoding and segment_ids is not None:
            raise ValueError("segment_ids (packed rows) cannot be used with a KV cache; decode one sequence per row")
        stages = 1 if decoding or self.is_initializing() else pipeline_lib.stage_count()
        if stages > 1:
            _check_pipelined(cfg, stages)
        if cfg.scan_layers:
            for name, start, stop in layer_groups(cfg):
                if stages > 1:
                    x_BTD = self._pipelined(name, stages, x_BTD, deterministic, positions, segment_ids, padding_BT)
                    continue
                stack = scanned_layers(cfg.layer_block(start), length=stop - start, causal=True, remat=cfg.remat,
                                       name=name)
                x_BTD, _ = stack(x_BTD, deterministic, positions, segment_ids, padding_BT)
        else:
            layer_cls = layer_class(cfg.remat)
            for i in range(cfg.num_layers):
                x_BTD = layer_cls(cfg.layer_block(i), causal=True, name=f"layer_{i}")(
                    x_BTD, deterministic, positions=positions, segment_ids=segment_ids, padding_mask=padding_BT)
        hidden_BTD = x_BTD
        x_BTD = make_norm(b.norm, epsilon=b.norm_eps, dtype=b.dtype, param_dtype=b.param_dtype,
                          use_bias=b.use_bias, name="final_norm")(x_BTD)
        scores_BTS = None
        if cfg.head != "lm":
            score = self.param("score", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
                               (b.d_model, cfg.num_scores), b.param_dtype)
            scores_BTS = jnp.einsum("BTD,DS->BTS", x_BTD, score.astype(b.dtype)).astype(jnp.float32)
            scores_BTS = nn.with_logical_constraint(scores_BTS, ("act_batch", "act_seq", None))
            if cfg.head == "score":
                return scores_BTS
        head_lora = None
        if cfg.tie_embeddings:
            # peft leaves a tied head on the base table, LoRA on the embedding or not.
            lm_head = LMHead(embed.embedding, tied=True, dtype=b.dtype)
        else:
            kernel = linear.kernel_param(self, "lm_head", nn.initializers.normal(0.02), (b.d_model, cfg.vocab_size),
                                         b.param_dtype, ("embed", "vocab"))
            head_lora = lora_factors(self, "lm_head", kernel, n_in=1, names=("embed", "vocab"), lora=b.lora)
            lm_head = LMHead(kernel, tied=False, dtype=b.dtype)
        if return_hidden and head_lora is not None:
            raise ValueError("return_hidden=True applies the LM head outside the model, but LoRA targets the untied "
                             "lm_head; exclude lm_head from the LoRA targets")

        if not cfg.tie_embeddings:
            linear.sow_input(self, "lm_head", x_BTD)  # the untied head's input, for calibration

        def logits(h_BTD):
            if head_lora is None:
                return lm_head(h_BTD)
            y_BTV = linear.project(h_BTD, lm_head.kernel.astype(b.dtype))  # einsum("BTD,DV->BTV")
            y_BTV = lora_output(self, head_lora, lm_head.kernel, h_BTD, y_BTV, deterministic=deterministic)
            return nn.with_logical_constraint(y_BTV.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

        # The multi-token prediction modules are a training signal; decoding uses the main head only.
        for depth in range(1, (0 if decoding else cfg.mtp_depth) + 1):
            # Input i sees token i + depth; past the row's end it sees padding (id 0), whose
            # predictions the loss masks out.
            ahead_BT = jnp.pad(ids_BT[:, depth:], ((0, 0), (0, depth)))
            # return_hidden: the module's "head" is the identity, its output the normed hidden state.
            hidden_BTD, mtp_out = MultiTokenPrediction(cfg, name=f"mtp_{depth}")(
                hidden_BTD, embed(ahead_BT), (lambda h: h) if return_hidden else logits, deterministic, positions,
                segment_ids, padding_BT)
            self.sow("intermediates", "mtp_hidden" if return_hidden else "mtp_logits", mtp_out)
        if self.is_initializing():
            check_lora_matched(b.lora, self.variables.get("params", {}))
        if return_hidden:
            return x_BTD, lm_head
        return logits(x_BTD) if scores_BTS is None else (logits(x_BTD), scores_BTS)

    def _pipelined(self, name, stages, x_BTD, deterministic, positions, segment_ids, padding_BT):
        """The scanned stack `name` (its parameters as `nn.scan` made them) through
        `models.layers.pipeline`; sows the layers' router statistics where the scan would
        (leaves [L, ...], the mean over micro-batches) and the ticks each stage worked
        (`intermediates/pipeline`)."""
        cfg = self.config
        layer = layer_class(cfg.remat, scanned=True)(cfg.layer_block(0), causal=True)
        sows = cfg.block.moe is not None and self.is_mutable_collection("intermediates")
        extras = {"positions": positions, **({} if segment_ids is None else
                                             {"segment_ids": segment_ids, "padding": padding_BT})}

        def apply_layer(params, x_bTD, extras_b, rng):
            out = layer.apply({"params": params}, x_bTD, deterministic, extras_b["positions"],
                              extras_b.get("segment_ids"), extras_b.get("padding"),
                              rngs={} if rng is None else {"dropout": rng},
                              mutable=["intermediates"] if sows else False)
            if not sows:
                return out[0], {}
            (y_bTD, _), variables = out
            return y_bTD, moe_lib.router_stats_tree(variables.get("intermediates", {}))

        rng = self.make_rng("dropout") if not deterministic and self.has_rng("dropout") else None
        out = pipeline_lib.pipeline(apply_layer, self.variables["params"][name], x_BTD, extras,
                                    stages=stages, microbatches=cfg.pipeline_microbatches,
                                    rng=rng)
        if out.stats:
            self.sow("intermediates", name, out.stats, init_fn=dict, reduce_fn=lambda _, new: new)
        self.sow("intermediates", "pipeline", {"useful_ticks": out.useful_ticks, "ticks": jnp.int32(out.ticks)},
                 init_fn=dict, reduce_fn=lambda _, new: new)
        return out.y_BTD


def _check_pipelined(config: GPTConfig, stages: int) -> None:
    """Raises unless `config` can run as a pipeline of `stages` stages."""
    if not config.scan_layers:
        raise ValueError(f"the layers are split into {stages} pipeline stages, which needs them stacked: set "
                         "scan_layers=True (config key model.scan_layers)")
    if config.first_dense_layers:
        raise ValueError("a pipeline runs one stack of identical layers; first_dense_layers must be 0")
    if config.pipeline_microbatches < 1:
        raise ValueError(f"the layers are split into {stages} pipeline stages: set pipeline_microbatches >= 1 "
                         "(config key sharding.pipeline_microbatches)")
    if config.num_layers % stages:
        raise ValueError(f"num_layers={config.num_layers} does not split into {stages} pipeline stages; use a "
                         f"multiple of {stages}")




def llama_config(*, vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                 num_kv_heads: int | None = None, head_dim: int | None = None, rope_theta: float = 10000.0,
                 norm_eps: float = 1e-5, max_len: int = 4096, tie_embeddings: bool = False,
                 attention_bias: bool = False, mlp_bias: bool = False, sliding_window: int | None = None,
                 **overrides) -> GPTConfig:
    """LLaMA 2/3: RoPE (halves rotated), pre-RMSNorm, SwiGLU, no biases, GQA, untied head.

    Args:
      vocab_size, d_model, num_layers, num_heads, d_ff: V, D, L, N, F.
      num_kv_heads: K (None: N).
      head_dim: H (None: D // N).
      rope_theta: RoPE base (LLaMA 2: 1e4, LLaMA 3: 5e5).
      norm_eps: RMSNorm epsilon.
      max_len: context length.
      tie_embeddings: share the token table with the output projection.
      attention_bias: biases on q, k, v and the output projection.
      mlp_bias: biases in the feed-forward projections.
      sliding_window: local attention window, if any.
      **overrides: further BlockConfig fields (dtype, param_dtype, qkv_bias, qk_norm, ...),
        or the GPTConfig fields remat, scan_layers, mtp_depth, first_dense_layers.

    Returns:
      The GPTConfig.
    """
    gpt_fields = {k: overrides.pop(k) for k in ("remat", "scan_layers", "mtp_depth", "first_dense_layers",
                                                "pipeline_microbatches")
                  if k in overrides}
    block = {"d_model": d_model, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
             "d_ff": d_ff, "mlp_activation": "swiglu", "norm": "rmsnorm", "norm_position": "pre", "norm_eps": norm_eps,
             "dropout_rate": 0.0, "use_bias": attention_bias, "mlp_bias": mlp_bias,
             "rope": RopeConfig(theta=rope_theta, interleaved=False), "sliding_window": sliding_window}
    block.update(overrides)
    return GPTConfig(vocab_size=vocab_size, block=BlockConfig(**block), num_layers=num_layers, max_len=max_len,
                     tie_embeddings=tie_embeddings, positional="rope", **gpt_fields)


def qwen2_config(*, rope_theta: float = 1e6, norm_eps: float = 1e-6, **kwargs) -> GPTConfig:
    """Qwen2 / Qwen2.5: LLaMA with biases on q, k, v (none on the output projection).

    Args: as `llama_config`.
    """
    kwargs.setdefault("qkv_bias", True)
    return llama_config(rope_theta=rope_theta, norm_eps=norm_eps, **kwargs)


def qwen3_config(*, rope_theta: float = 1e6, norm_eps: float = 1e-6, **kwargs) -> GPTConfig:
    """Qwen3: LLaMA with RMSNorm on each query and key head before RoPE; head_dim is
    usually given explicitly (128, not D // N).

    Args: as `llama_config`.
    """
    kwargs.setdefault("qk_norm", True)
    return llama_config(rope_theta=rope_theta, norm_eps=norm_eps, **kwargs)


def mixtral_config(*, num_experts: int = 8, num_experts_per_tok: int = 2, rope_theta: float = 1e6,
                   aux_loss_weight: float = 0.0, capacity_factor: float = 0.0, **kwargs) -> GPTConfig:
    """Mixtral: LLaMA whose every MLP is a softmax top-k router over `num_experts` SwiGLU
    experts of width `d_ff`, the k weights renormalised to sum to 1.

    Args:
      num_experts, num_experts_per_tok: E and k.
      aux_loss_weight: load-balancing loss weight (HF: router_aux_loss_coef).
      capacity_factor: 0 = dropless (exact, as HF); > 0 drops tokens beyond capacity.
      **kwargs: as `llama_config` (d_ff is the expert width).
    """
    moe = MoEConfig(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, expert_d_ff=kwargs["d_ff"],
                    norm_topk_prob=True, aux_loss_weight=aux_loss_weight, capacity_factor=capacity_factor)
    return llama_config(rope_theta=rope_theta, moe=moe, **kwargs)


def qwen3_moe_config(*, num_experts: int = 128, num_experts_per_tok: int = 8, norm_topk_prob: bool = True,
                     aux_loss_weight: float = 0.0, capacity_factor: float = 0.0, **kwargs) -> GPTConfig:
    """Qwen3-MoE: Qwen3 (QK-norm) whose every MLP is a softmax top-k mixture of SwiGLU experts
    of width `d_ff` (HF's moe_intermediate_size); the k weights are renormalised only if
    `norm_topk_prob`. Dense layers (HF mlp_only_layers / decoder_sparse_step > 1) are not supported.

    Args: as `mixtral_config`, plus norm_topk_prob; **kwargs as `qwen3_config`.
    """
    moe = MoEConfig(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, expert_d_ff=kwargs["d_ff"],
                    norm_topk_prob=norm_topk_prob, aux_loss_weight=aux_loss_weight, capacity_factor=capacity_factor)
    return qwen3_config(moe=moe, **kwargs)
