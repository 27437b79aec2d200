"""Qwen3-style decoder presets (models/gpt.py: LLaMA plus QK-norm and an explicit head_dim).

    python -m train --config=configs/qwen.py:tiny --workdir=/tmp/qwen_tiny
    python -m train --config=configs/qwen.py:qwen3_8b --config.tokenizer.path=PATH/TO/Qwen3-8B

Qwen2 / Qwen2.5 is the same recipe with `--config.model.block.qk_norm=false
--config.model.block.qkv_bias=true` (biases on q, k, v only).

Presets:
    tiny:     2 layers, width 64, 4 query / 2 key-value heads of dim 32 (not 64 / 4),
              RMSNorm on queries and keys, tied embeddings (as Qwen3-0.6B), for tests (seconds)
    qwen3_8b: Qwen3-8B shape (36 layers, width 4096, 32 / 8 heads of dim 128, SwiGLU 12288,
              RoPE theta 1e6, context 40960, vocab 151936, untied): 8,190,735,360 parameters
"""

from __future__ import annotations

import ml_collections

from configs import base

PRESETS = ("tiny", "qwen3_8b")


def qwen3_switches(c: ml_collections.ConfigDict) -> None:
    """Qwen3's switches: LLaMA's (RoPE, pre-RMSNorm, SwiGLU, no biases) plus QK-norm, theta 1e6, eps 1e-6."""
    c.model.update(family="qwen", positional="rope", rope_theta=1e6)
    c.model.block.update(norm="rmsnorm", norm_position="pre", norm_eps=1e-6, mlp_activation="swiglu",
                         use_bias=False, qk_norm=True, dropout_rate=0.0, attention_dropout_rate=0.0)


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown qwen preset {preset!r}; expected one of {PRESETS}")
    c = base.get_config()
    qwen3_switches(c)
    if preset == "tiny":
        c.model.update(num_layers=2, max_len=64, tie_embeddings=True)
        c.model.block.update(d_model=64, num_heads=4, num_kv_heads=2, head_dim=32, d_ff=192)
        base.tiny_run(c)
    elif preset == "qwen3_8b":
        c.steps = 100_000
        c.model.update(vocab_size=151936, num_layers=36, max_len=40960, tie_embeddings=False, dtype="bfloat16",
                       remat="full")
        c.model.block.update(d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128, d_ff=12288)
        c.tokenizer.vocab_size = 151936
        c.data.update(seq_len=4096, batch_size=1024)
        c.optimizer.update(lr=3e-4)
        c.schedule.update(warmup_steps=2000)
    return c
