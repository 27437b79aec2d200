"""Builds the pieces of a run from its config: data config, tokenizer, model, optimizer.

Each function takes the run config (an ml-collections ConfigDict) and returns one narrow
object, so that a notebook can build any piece alone.

Families: gpt, llama, qwen, moe and deepseek are all the decoder of models/gpt.py (told
apart by the model keys: MoE, MLA, multi-token prediction), trained on next tokens; bert
is models/bert.py's encoder under the head of its objective: `BertForMaskedLM` (`mlm`, the
default), `BertForSequenceClassification` (`classification`, `task.num_labels` classes:
`resolved` derives them from the data) or `BertForQuestionAnswering` (`qa`).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from configs import base
from data import pipeline, prepared, sources
from data.tokenizer import Tokenizer, load_tokenizer, training
from models.bert import BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification
from models.gpt import GPT, POSITIONALS, GPTConfig
from models.layers.blocks import BlockConfig
from models.layers.kv_cache import KV_CACHE_QUANTS
from models.layers.mla import MLAConfig
from models.layers.moe import MoEConfig
from models.layers.peft import AdapterConfig, LoraConfig, PeftConfig, PrefixConfig
from models.layers.positional import ROPE_SCALINGS, RopeConfig
from train.mlm import MLMConfig
from train.optimizer import make_optimizer
from train.schedules import make_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Labels of the one decoder (models/gpt.py); the family differs only by the model keys.
DECODER_FAMILIES = ("gpt", "llama", "qwen", "moe", "deepseek")
FAMILIES = (*DECODER_FAMILIES, "bert")
BIAS_SWITCHES = {"auto": None, "true": True, "false": False}
# Keys that mean something only with model.positional="rope".
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_factor", "rope_original_max_len")
# Decoder-only keys, which must keep their defaults for bert.
DECODER_KEYS = ("remat", "scan_layers", "first_dense_layers", "mtp_depth", "moe.num_experts", "mla.kv_lora_rank",
                "block.kv_cache_quant")
# Objectives that train a BERT task head on data.tasks' examples (not data.pipeline's text).
TASK_OBJECTIVES = ("classification", "qa")
# The special tokens of a BPE the trainer trains; bert adds the mask token of its objective.
EOS_TOKEN, MASK_TOKEN = "<|endoftext|>", "[MASK]"


def data_config(config: ml_collections.ConfigDict, workdir: str) -> pipeline.DataConfig:
    d = config.data
    return pipeline.DataConfig(
        source=d.source, text_key=d.text_key, split_paragraphs=d.split_paragraphs, seq_len=d.seq_len,
        batch_size=d.batch_size, seed=d.shuffle_seed, shuffle_window=d.shuffle_window, data_dir=d.data_dir or os.path.join(workdir, "tfds"),
        validation_fraction=d.validation_fraction, train_split=d.train_split, eval_split=d.eval_split,
        worker_count=d.worker_count,
    )


def objective_name(config: ml_collections.ConfigDict) -> str:
    """The run's objective (`train.objectives.name_of`)."""
    from train import objectives

    return objectives.name_of(config)


def task_config(config: ml_collections.ConfigDict, workdir: str):
    """The `data.tasks.TaskConfig` of a classification or qa run (`data.*` and `task.*`)."""
    from train.objectives.classification import task_config as of_run

    return of_run(config, data_config(config, workdir), objective_name(config))


def resolved(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """`config` with what it derives from the data filled in: a classification run's
    `task.num_labels` = 0 becomes the number of classes of its training split (or of
    `task.labels`), so the model, config.json and the checkpoints all carry it."""
    if objective_name(config) != "classification" or config.task.num_labels:
        return config
    from data import tasks

    out = config.copy_and_resolve_references()
    out.task.num_labels = tasks.num_labels(task_config(config, workdir))
    return out


def num_labels(config: ml_collections.ConfigDict) -> int:
    """The classes of a classification run: `task.num_labels`, else the names of `task.labels`."""
    count = config.task.num_labels or len([x for x in config.task.labels.split(",") if x.strip()])
    if count < 2:
        raise ValueError(f"config key `task.num_labels`={config.task.num_labels}: a classifier needs 2 or more "
                         "classes; set it, or list them in task.labels, or let the trainer derive it from the data "
                         "(`train.build.resolved`)")
    return count


def tokenizer(config: ml_collections.ConfigDict, workdir: str, data: pipeline.DataConfig) -> Tokenizer:
    """The configured tokenizer; a `prepared:DIR` source's own; or a BPE trained on a sample of the
    training split, saved in the workdir.

    The sample is `tokenizer.train_bytes` of text from the training documents in an order
    seeded by `data.shuffle_seed`, streamed into `tokenizer.trainer` (see
    `data.tokenizer.training`). A workdir that already holds a trained tokenizer reuses it,
    so a resumed run sees the same ids.
    """
    t = config.tokenizer
    if config.init_from:  # the checkpoint's own tokenizer
        from train import init_from

        return init_from.tokenizer(config)
    prepared_dir = _prepared_dir(config)
    if config.tokenizer.path:
        loaded = load_tokenizer(config.tokenizer.path)
        if prepared_dir:
            prepared.check_tokenizer(prepared_dir, loaded, name=f"tokenizer.path={config.tokenizer.path}")
        return loaded
    if prepared_dir:  # the tokenizer the data was prepared with
        return load_tokenizer(prepared.tokenizer_path(prepared_dir))
    if t.trainer not in training.TRAINERS:
        raise ValueError(f"config key `tokenizer.trainer`={t.trainer!r}; expected one of {training.TRAINERS}")
    if t.train_bytes < 0:
        raise ValueError(f"config key `tokenizer.train_bytes`={t.train_bytes}; expected bytes of training text "
                         "to sample, or 0 for the whole training split")
    saved = os.path.join(workdir, "tokenizer")
    if os.path.isdir(saved):
        return load_tokenizer(saved)
    documents = pipeline.open_split(data, data.train_split)
    special = (EOS_TOKEN, MASK_TOKEN) if config.model.family == "bert" else (EOS_TOKEN,)
    logging.info("training a byte-level BPE (%s) with vocab %d on %s of %d documents", t.trainer, t.vocab_size,
                 f"{t.train_bytes:,} bytes" if t.train_bytes else "all", len(documents))
    sample = training.sample_documents(documents, t.train_bytes, seed=data.seed)
    return training.train_tokenizer(sample, t.vocab_size, special, trainer=t.trainer, directory=saved)


def _prepared_dir(config: ml_collections.ConfigDict) -> str:
    """The directory of a `prepared:DIR` data source ("" for any other source, whichever objective
    reads it: sft, preference and task sources are not `data.sources` specs)."""
    if not config.data.source.startswith("prepared:"):
        return ""
    return sources.parse_source(config.data.source).paths[0]


def mlm(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> MLMConfig | None:
    """The masked-LM corruption of family bert (None for the next-token families)."""
    if config.model.family != "bert":
        return None
    if tokenizer.mask_id is None:
        raise ValueError("model.family='bert' trains a masked LM, but the tokenizer has no mask token ([MASK] or "
                         "<mask>): leave tokenizer.path empty (in a fresh workdir) to train a BPE with one, or give "
                         "a tokenizer that has one")
    return MLMConfig(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size)


def _dtype(name: str, key: str):
    if name not in DTYPES:
        raise ValueError(f"config key `{key}`={name!r}; expected one of {tuple(DTYPES)}")
    return DTYPES[name]


def _bias_switch(value: str, key: str) -> bool | None:
    lowered = value.strip().lower()
    if lowered not in BIAS_SWITCHES:
        raise ValueError(f"config key `{key}`={value!r}; expected one of {tuple(BIAS_SWITCHES)} "
                         "(auto follows model.block.use_bias)")
    return BIAS_SWITCHES[lowered]


def _changed(m: ml_collections.ConfigDict, keys) -> list[str]:
    """Those of the dotted `keys` of `model` that differ from configs/base.py's defaults."""
    defaults = base.get_config().model

    def get(c, key):
        for part in key.split("."):
            c = c[part]
        return c

    return [k for k in keys if get(m, k) != get(defaults, k)]


def _rope(m: ml_collections.ConfigDict) -> RopeConfig | None:
    """RopeConfig from the model.rope_* keys, or None for learned positions."""
    if m.positional not in POSITIONALS:
        raise ValueError(f"config key `model.positional`={m.positional!r}; expected one of {POSITIONALS}")
    if m.positional != "rope":
        changed = _changed(m, ROPE_KEYS)
        if changed:
            raise ValueError(f"config key `model.{changed[0]}` is set but model.positional={m.positional!r}; "
                             "set model.positional=rope or leave the rope_* keys at their defaults")
        return None
    if m.rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"config key `model.rope_scaling`={m.rope_scaling!r}; expected one of {tuple(ROPE_SCALINGS)}")
    if m.rope_scaling != "default" and not m.rope_factor >= 1.0:
        raise ValueError(f"config key `model.rope_factor`={m.rope_factor} must be >= 1 with "
                         f"rope_scaling={m.rope_scaling!r}")
    if m.rope_original_max_len < 0:
        raise ValueError(f"config key `model.rope_original_max_len`={m.rope_original_max_len}; "
                         "expected a length, or 0 for model.max_len")
    return RopeConfig(theta=m.rope_theta, interleaved=False, scaling=m.rope_scaling, factor=m.rope_factor,
                      original_max_len=m.rope_original_max_len or m.max_len)


def _moe(m: ml_collections.ConfigDict) -> MoEConfig | None:
    """MoEConfig from the model.moe keys, or None for a dense MLP (num_experts 0)."""
    e = m.moe
    if e.num_experts == 0:
        changed = _changed(m, [f"moe.{k}" for k in e])
        if changed:
            raise ValueError(f"config key `model.{changed[0]}` is set but model.moe.num_experts=0 (a dense MLP); "
                             "set num_experts for a mixture of experts or leave the moe keys at their defaults")
        return None
    if e.num_experts < 0 or e.expert_d_ff < 0 or e.shared_d_ff < 0:
        raise ValueError(f"config keys `model.moe.num_experts`={e.num_experts}, `expert_d_ff`={e.expert_d_ff}, "
                         f"`shared_d_ff`={e.shared_d_ff} must be >= 0")
    if e.bias_update_rate and not e.score_correction_bias:
        raise ValueError(f"config key `model.moe.bias_update_rate`={e.bias_update_rate} needs "
                         "model.moe.score_correction_bias=true (the bias it updates)")
    return MoEConfig(num_experts=e.num_experts, num_experts_per_tok=e.num_experts_per_tok,
                     expert_d_ff=e.expert_d_ff or m.block.d_ff, score_func=e.score_func,
                     norm_topk_prob=e.norm_topk_prob, capacity_factor=e.capacity_factor,
                     dropless_impl=e.dropless_impl, grouped_matmul=e.grouped_matmul, dispatch=e.dispatch,
                     router_z_loss_weight=e.router_z_loss_weight, aux_loss_weight=e.aux_loss_weight,
                     seq_aux_loss_weight=e.seq_aux_loss_weight, num_shared_experts=e.num_shared_experts,
                     shared_d_ff=e.shared_d_ff or None, routed_scaling_factor=e.routed_scaling_factor,
                     n_group=e.n_group, topk_group=e.topk_group, score_correction_bias=e.score_correction_bias)


def _mla(m: ml_collections.ConfigDict) -> MLAConfig | None:
    """MLAConfig from the model.mla keys, or None for standard attention (kv_lora_rank 0)."""
    a = m.mla
    if a.kv_lora_rank == 0:
        changed = _changed(m, [f"mla.{k}" for k in a])
        if changed:
            raise ValueError(f"config key `model.{changed[0]}` is set but model.mla.kv_lora_rank=0 (standard "
                             "attention); set kv_lora_rank for latent attention or leave the mla keys at 0")
        return None
    if m.positional != "rope":
        raise ValueError(f"latent attention (model.mla.kv_lora_rank={a.kv_lora_rank}) needs model.positional=rope, "
                         f"got {m.positional!r}")
    return MLAConfig(q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank,
                     qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                     v_head_dim=a.v_head_dim)


def _block(m: ml_collections.ConfigDict) -> BlockConfig:
    block = m.block.to_dict()
    block["num_kv_heads"] = block["num_kv_heads"] or None
    block["head_dim"] = block["head_dim"] or None
    for name in ("qkv_bias", "out_bias", "mlp_bias"):
        block[name] = _bias_switch(block[name], f"model.block.{name}")
    if block["sliding_window"] < 0:
        raise ValueError(f"config key `model.block.sliding_window`={block['sliding_window']}; "
                         "expected a number of keys, or 0 for none")
    block["sliding_window"] = block["sliding_window"] or None
    if block["kv_cache_quant"] not in KV_CACHE_QUANTS:
        raise ValueError(f"config key `model.block.kv_cache_quant`={block['kv_cache_quant']!r}; expected one of "
                         f"{KV_CACHE_QUANTS} ('' keeps the cache in model.dtype)")
    return BlockConfig(**block, rope=_rope(m), moe=_moe(m), mla=_mla(m), dtype=_dtype(m.dtype, "model.dtype"),
                       param_dtype=_dtype(m.param_dtype, "model.param_dtype"))


def peft(config: ml_collections.ConfigDict) -> PeftConfig | None:
    """The parameter-efficient method of `finetune.*` for the layers (`BlockConfig.peft`); None
    for full fine-tuning (and pretraining). qlora is LoRA in the layers over a quantized base
    (the quantization is of the frozen parameters, `train.trainable.store_frozen`)."""
    f = config.finetune
    if f.method in ("lora", "qlora"):
        lora = f.lora
        return PeftConfig(lora=LoraConfig(targets=lora.targets, rank=lora.rank, alpha=lora.alpha,
                                          dropout=lora.dropout, rslora=lora.rslora, dora=lora.dora))
    if f.method == "prefix":
        return PeftConfig(prefix=PrefixConfig(length=f.prefix.length, mlp_hidden=f.prefix.mlp_hidden))
    if f.method == "adapter":
        return PeftConfig(adapter=AdapterConfig(hidden=f.adapter.hidden, kind=f.adapter.kind))
    return None


def _bert(config: ml_collections.ConfigDict, vocab_size: int, block: BlockConfig) -> nn.Module:
    """The encoder under its objective's head (`bert_head`)."""
    m = config.model
    changed = _changed(m, DECODER_KEYS)
    if changed:
        raise ValueError(f"config key `model.{changed[0]}` is set but model.family='bert' (an encoder without "
                         "remat, scan, MoE, MLA, multi-token prediction or a KV cache); leave it at its default")
    if m.positional != "learned" or not m.tie_embeddings:
        raise ValueError(f"model.family='bert' has learned positions and a tied decoder; got model.positional="
                         f"{m.positional!r}, model.tie_embeddings={m.tie_embeddings}")
    if m.type_vocab_size < 1:
        raise ValueError(f"config key `model.type_vocab_size`={m.type_vocab_size} must be >= 1")
    encoder = BertConfig(vocab_size=vocab_size, block=block, num_layers=m.num_layers, max_len=m.max_len,
                         type_vocab_size=m.type_vocab_size)
    head = bert_head(config)
    if head == "classification":
        return BertForSequenceClassification(encoder, num_labels=num_labels(config))
    return BertForQuestionAnswering(encoder) if head == "qa" else BertForMaskedLM(encoder)


def decoder_head(config: ml_collections.ConfigDict) -> str:
    """The decoder's head (`models.gpt.GPTConfig.head`) for the run's objective: "score" for a
    reward model, "lm_score" for PPO's policy with a value head on its trunk, else "lm"."""
    name = objective_name(config)
    if name == "reward":
        return "score"
    if name == "ppo" and config.rl.value_head == "shared":
        return "lm_score"
    return "lm"


def bert_head(config: ml_collections.ConfigDict) -> str:
    """The BERT head (`models.hf.BERT_CLASSES`) of the run's objective: classification, qa, or mlm."""
    name = objective_name(config)
    return name if name in TASK_OBJECTIVES else "mlm"


def model(config: ml_collections.ConfigDict, vocab_size: int) -> nn.Module:
    """The model of `config.model` for the run's objective; `vocab_size` fills model.vocab_size
    when that is 0. The PEFT method of `finetune.*` rides on its blocks (`peft`). With
    `init_from` set, the checkpoint's model with the run's execution settings (`train.init_from`)."""
    if config.init_from:
        from train import init_from

        return with_value_model(config, init_from.model(config, vocab_size))
    m = config.model
    if m.family not in FAMILIES:
        raise ValueError(f"config key `model.family`={m.family!r}; expected one of {FAMILIES}")
    if m.vocab_size and m.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if m.max_len < config.data.seq_len:
        raise ValueError(f"model.max_len={m.max_len} must be >= data.seq_len={config.data.seq_len}")
    if m.family != "bert" and objective_name(config) in TASK_OBJECTIVES:
        raise ValueError(f"config key `objective`={config.objective!r} trains a BERT task head, but model.family="
                         f"{m.family!r}; set model.family=bert or init_from=hf:DIR of a BERT checkpoint")
    block = dataclasses.replace(_block(m), peft=peft(config))
    if m.family == "bert":
        # The objective chooses the head on the encoder (`bert_head`); lm is refused by its factory.
        return _bert(config, m.vocab_size or vocab_size, block)
    if m.family == "moe" and not m.moe.num_experts:
        raise ValueError("model.family='moe' needs experts: set model.moe.num_experts (0 is a dense MLP)")
    if m.type_vocab_size != base.get_config().model.type_vocab_size:
        raise ValueError(f"config key `model.type_vocab_size` is set but model.family={m.family!r}; it is BERT's")
    return with_value_model(config, GPT(GPTConfig(
        vocab_size=m.vocab_size or vocab_size, block=block, num_layers=m.num_layers, max_len=m.max_len,
        tie_embeddings=m.tie_embeddings, remat=m.remat, positional=m.positional,
        first_dense_layers=m.first_dense_layers, scan_layers=m.scan_layers, mtp_depth=m.mtp_depth,
        head=decoder_head(config), pipeline_microbatches=config.sharding.pipeline_microbatches)))


def with_value_model(config: ml_collections.ConfigDict, decoder: nn.Module) -> nn.Module:
    """PPO with `rl.value_head=separate`: the policy `decoder` and a value model of its
    architecture (`models.policy_value`); any other run: `decoder` as it is."""
    if objective_name(config) != "ppo" or config.rl.value_head != "separate":
        return decoder
    from models.policy_value import with_value_model as wrap

    return wrap(decoder)


def model_size(model: nn.Module, seq_len: int) -> tuple[int, int]:
    """(parameters, forward FLOPs per token at `seq_len`) of the model as trained (BERT: with its head)."""
    if isinstance(model, BertForMaskedLM):
        return model.config.num_params("mlm"), model.config.flops_per_token(seq_len, head="mlm")
    if isinstance(model, BertForSequenceClassification):
        return model.config.num_params("classification", model.num_labels), model.config.flops_per_token(seq_len)
    if isinstance(model, BertForQuestionAnswering):
        return model.config.num_params("qa"), model.config.flops_per_token(seq_len, head="qa")
    return model.config.num_params(), model.config.flops_per_token(seq_len)


def optimizer(config: ml_collections.ConfigDict):
    """(optax transformation, learning-rate schedule) from `optimizer` and `schedule`."""
    o, s = config.optimizer, config.schedule
    schedule = make_schedule(s.name, peak_lr=o.lr, total_steps=config.steps, warmup_steps=s.warmup_steps,
                             min_lr_ratio=s.min_lr_ratio, decay_fraction=s.decay_fraction,
                             decay_shape=s.decay_shape)
    tx = make_optimizer(learning_rate=schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        grad_clip_norm=o.grad_clip_norm, decay_embeddings=o.decay_embeddings,
                        keep_zeros=config.finetune.keep_sparsity)
    return tx, schedule
