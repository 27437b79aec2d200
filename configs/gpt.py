"""GPT-2-style decoder presets (models/gpt.py) for pretraining.

    python -m train                                       # configs/gpt.py:default
    python -m train --config=configs/gpt.py:tiny --workdir=/tmp/tiny
    python -m train --config=configs/gpt.py:gpt2_124m --config.optimizer.lr=6e-4

Presets:
    default: 4 layers, width 128, BPE vocab 2048, context 128, 600 steps of 16 rows: the
             README's main job; about 4 minutes on a 2-core CPU, ending at ~1.65 bits per
             byte on the held-out pydoc text where xz -9 needs 2.62
    tiny:    2 layers, width 64, for tests (seconds)
    gpt2_124m: GPT-2 small shape (12 layers, width 768, 12 heads, context 1024, vocab 50257,
             tied): 124,439,808 parameters; `small` is the same preset under its older name
"""

from __future__ import annotations

import ml_collections

from configs import base

PRESETS = ("default", "tiny", "gpt2_124m", "small")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown gpt preset {preset!r}; expected one of {PRESETS}")
    c = base.get_config()
    if preset == "default":
        c.steps = 600
        c.model.update(num_layers=4, max_len=128)
        c.model.block.update(d_model=128, num_heads=4, d_ff=512)
        c.tokenizer.vocab_size = 2048
        c.data.update(seq_len=128, batch_size=16)
        c.optimizer.update(lr=3e-3)
        c.schedule.update(warmup_steps=60)
        c.eval.update(every_steps=200)
    elif preset == "tiny":
        c.model.update(num_layers=2, max_len=64)
        c.model.block.update(d_model=64, num_heads=4, d_ff=256)
        base.tiny_run(c)
    elif preset in ("gpt2_124m", "small"):
        c.steps = 100_000
        c.model.update(vocab_size=50257, num_layers=12, max_len=1024)
        c.model.block.update(d_model=768, num_heads=12, d_ff=3072)
        c.tokenizer.vocab_size = 50257
        c.data.update(seq_len=1024, batch_size=512)
        c.optimizer.update(lr=6e-4)
        c.schedule.update(warmup_steps=2000)
    return c
