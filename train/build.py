"""Builds the pieces of a run from its config: data config, tokenizer, model, optimizer.

Each function takes the run config (an ml-collections ConfigDict) and returns one narrow
object, so that a notebook can build any piece alone.
"""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import ml_collections

from configs import base
from data import pipeline
from data.tokenizer import ByteLevelBPE, Tokenizer, load_tokenizer
from models.gpt import GPT, POSITIONALS, GPTConfig
from models.layers.blocks import BlockConfig
from models.layers.positional import ROPE_SCALINGS, RopeConfig
from train.optimizer import make_optimizer
from train.schedules import make_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Labels of the one decoder (models/gpt.py); the family differs only by the model keys.
FAMILIES = ("gpt", "llama", "qwen")
BIAS_SWITCHES = {"auto": None, "true": True, "false": False}
# Keys that mean something only with model.positional="rope".
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_factor", "rope_original_max_len")


def data_config(config: ml_collections.ConfigDict, workdir: str) -> pipeline.DataConfig:
    d = config.data
    return pipeline.DataConfig(
        source=d.source, text_key=d.text_key, split_paragraphs=d.split_paragraphs, seq_len=d.seq_len,
        batch_size=d.batch_size, seed=d.shuffle_seed, shuffle_window=d.shuffle_window, data_dir=d.data_dir or os.path.join(workdir, "tfds"),
        validation_fraction=d.validation_fraction, train_split=d.train_split, eval_split=d.eval_split,
        worker_count=d.worker_count,
    )


def tokenizer(config: ml_collections.ConfigDict, workdir: str, data: pipeline.DataConfig) -> Tokenizer:
    """The configured tokenizer; or our BPE trained on the training split, saved in the workdir.

    A workdir that already holds a trained tokenizer reuses it, so a resumed run sees the
    same ids.
    """
    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    saved = os.path.join(workdir, "tokenizer")
    if os.path.isdir(saved):
        return load_tokenizer(saved)
    texts = pipeline.open_split(data, data.train_split)
    logging.info("training a byte-level BPE with vocab %d on %d documents", config.tokenizer.vocab_size, len(texts))
    bpe = ByteLevelBPE.train(list(texts), config.tokenizer.vocab_size)
    bpe.save(saved)
    return bpe


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


def _rope(m: ml_collections.ConfigDict) -> RopeConfig | None:
    """RopeConfig from the model.rope_* keys, or None for learned positions."""
    if m.positional not in POSITIONALS:
        raise ValueError(f"config key `model.positional`={m.positional!r}; expected one of {POSITIONALS}")
    if m.positional != "rope":
        defaults = base.get_config().model
        changed = [k for k in ROPE_KEYS if m[k] != defaults[k]]
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
    return BlockConfig(**block, rope=_rope(m), dtype=_dtype(m.dtype, "model.dtype"),
                       param_dtype=_dtype(m.param_dtype, "model.param_dtype"))


def model(config: ml_collections.ConfigDict, vocab_size: int) -> GPT:
    """The model of `config.model`; `vocab_size` fills model.vocab_size when that is 0."""
    m = config.model
    if m.family not in FAMILIES:
        raise ValueError(f"config key `model.family`={m.family!r}; expected one of {FAMILIES}")
    if m.vocab_size and m.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if m.max_len < config.data.seq_len:
        raise ValueError(f"model.max_len={m.max_len} must be >= data.seq_len={config.data.seq_len}")
    return GPT(GPTConfig(vocab_size=m.vocab_size or vocab_size, block=_block(m), num_layers=m.num_layers,
                         max_len=m.max_len, tie_embeddings=m.tie_embeddings, remat=m.remat,
                         positional=m.positional))


def optimizer(config: ml_collections.ConfigDict):
    """(optax transformation, learning-rate schedule) from `optimizer` and `schedule`."""
    o, s = config.optimizer, config.schedule
    schedule = make_schedule(s.name, peak_lr=o.lr, total_steps=config.steps, warmup_steps=s.warmup_steps,
                             min_lr_ratio=s.min_lr_ratio, decay_fraction=s.decay_fraction,
                             decay_shape=s.decay_shape)
    tx = make_optimizer(learning_rate=schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        grad_clip_norm=o.grad_clip_norm, decay_embeddings=o.decay_embeddings)
    return tx, schedule
