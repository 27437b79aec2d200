"""Defaults for every key of a pretraining run. Family files (configs/gpt.py, ...) start here.

    python -m train --config=configs/gpt.py:tiny --workdir=/tmp/run

Every key exists here with its type, so that a misspelt or unknown key, or a value of
the wrong type, fails at once (see configs/loader.py). 0 or "" means "derive it" where
a comment says so.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000  # optimizer steps in the whole run

    c.model = ml_collections.ConfigDict(dict(
        family="gpt",  # gpt | llama | qwen: all the decoder of models/gpt.py, told apart by the keys below
        vocab_size=0,  # 0: the tokenizer's vocabulary size
        num_layers=4,
        max_len=256,  # context length; must be >= data.seq_len
        positional="learned",  # learned (a position table, GPT-2) | rope (rotary, LLaMA/Qwen)
        # rope_* apply only with positional="rope" (models/layers/positional.py RopeConfig).
        rope_theta=10000.0,  # LLaMA 2: 1e4, LLaMA 3: 5e5, Qwen2/3: 1e6
        rope_scaling="default",  # default | linear | llama3 | yarn | dynamic
        rope_factor=1.0,  # context extension factor (all scalings but "default")
        rope_original_max_len=0,  # pre-training context for llama3/yarn/dynamic; 0: max_len
        tie_embeddings=True,
        remat="none",  # none | full | dots_saveable | nothing_saveable
        dtype="float32",  # compute dtype; "bfloat16" for mixed precision (params stay float32)
        param_dtype="float32",
        block=dict(d_model=128, num_heads=4, num_kv_heads=0, head_dim=0, d_ff=512, mlp_activation="gelu_tanh",
                   norm="layernorm", norm_position="pre", norm_eps=1e-5, dropout_rate=0.0,
                   attention_dropout_rate=0.0, use_bias=True,
                   # The three bias switches are "auto" (follow use_bias) | "true" | "false":
                   # ConfigDict keeps one type per key, so a bool could not also say "unset".
                   qkv_bias="auto",  # Qwen2: "true" with use_bias=False
                   out_bias="auto",
                   mlp_bias="auto",
                   qk_norm=False,  # RMSNorm on each query and key head before RoPE (Qwen3)
                   sliding_window=0,  # local attention over the last N keys; 0: none
                   ),
    ))
    c.tokenizer = ml_collections.ConfigDict(dict(
        path="",  # "": train our byte-level BPE on the training split and save it in the workdir
        vocab_size=4096,  # for a trained BPE
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="embedded",  # embedded | files:PATH[,PATH] | tfds:NAME[:CONFIG]
        text_key="text",
        split_paragraphs=False,
        seq_len=128,
        batch_size=16,  # global batch, over all devices and processes
        shuffle_seed=0,
        shuffle_window=1024,  # packed rows shuffled together (1: documents only)
        data_dir="",  # "": WORKDIR/tfds
        validation_fraction=0.05,
        train_split="train",
        eval_split="validation",
        worker_count=0,
    ))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3,  # peak learning rate
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1,
        decay_embeddings=False,
        grad_clip_norm=1.0,  # 0: no clipping
        grad_accum_steps=1,  # micro-batches per step; data.batch_size is split among them
        z_loss=1e-4,
        label_smoothing=0.0,
    ))
    c.schedule = ml_collections.ConfigDict(dict(
        name="cosine",  # cosine | wsd | constant | rsqrt
        warmup_steps=100,
        min_lr_ratio=0.1,
        decay_fraction=0.2,  # wsd
        decay_shape="linear",  # wsd: linear | cosine | sqrt
    ))
    c.sharding = ml_collections.ConfigDict(dict(
        strategy="dp",
        mesh="",  # "": all devices on the data axis
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        save_interval_steps=200,
        max_to_keep=3,
        async_save=True,
    ))
    c.logging = ml_collections.ConfigDict(dict(
        log_every_steps=10,
        tensorboard=True,
        progress_bar=True,
        peak_flops=0.0,  # FLOP/s for MFU; 0: measure a 2048^2 float32 matmul once
    ))
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=200,  # 0: only at the end
        max_batches=0,  # 0: the whole validation split
        num_samples=3,
        sample_tokens=48,
        temperature=0.8,
        prompt="The ",
    ))
    return c


def tiny_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run settings of every family's `tiny` preset: 30 steps of 8 x 64 tokens, for tests."""
    c.steps = 30
    c.tokenizer.vocab_size = 512
    c.data.update(seq_len=64, batch_size=8)
    c.optimizer.update(lr=3e-3)
    c.schedule.update(warmup_steps=5)
    c.checkpoint.update(save_interval_steps=10)
    c.logging.update(log_every_steps=5)
    c.eval.update(every_steps=0, max_batches=4, num_samples=1, sample_tokens=16)
    return c
