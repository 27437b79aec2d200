"""LLaMA-style decoder presets (models/gpt.py with RoPE, RMSNorm, SwiGLU, GQA) for pretraining.

    python -m train --config=configs/llama.py:tiny --workdir=/tmp/llama_tiny
    python -m train --config=configs/llama.py:llama3_8b --config.tokenizer.path=PATH/TO/Meta-Llama-3-8B

Presets:
    tiny:      2 layers, width 64, 4 query / 2 key-value heads, untied head, for tests (seconds)
    small:     6 layers, width 256, 8 query / 2 key-value heads, SwiGLU 768 (LLaMA's rule: 8/3 D
               rounded up to a multiple of 256, so 128-row quantization groups divide every
               kernel), BPE vocab 2048, context 128, 600 steps of 16 rows on the embedded corpus:
               5,573,888 parameters, the larger trained model of benchmarks/compression_table.py (about
               10 minutes on 2 cores)
    llama3_8b: Llama-3-8B shape (32 layers, width 4096, 32 / 8 heads, SwiGLU 14336,
               RoPE theta 5e5, context 8192, vocab 128256, untied): 8,030,261,248 parameters
"""

from __future__ import annotations

import ml_collections

from configs import base

PRESETS = ("tiny", "small", "llama3_8b")


def llama_switches(c: ml_collections.ConfigDict) -> None:
    """The switches every LLaMA shares: RoPE (halves rotated), pre-RMSNorm, SwiGLU, no biases, untied."""
    c.model.update(family="llama", positional="rope", tie_embeddings=False)
    c.model.block.update(norm="rmsnorm", norm_position="pre", mlp_activation="swiglu", use_bias=False,
                         dropout_rate=0.0, attention_dropout_rate=0.0)


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown llama preset {preset!r}; expected one of {PRESETS}")
    c = base.get_config()
    llama_switches(c)
    if preset == "tiny":
        c.model.update(num_layers=2, max_len=64, rope_theta=500000.0)
        # SwiGLU's three matrices: F ~ 8/3 D keeps the MLP the size of a 4D gelu MLP.
        c.model.block.update(d_model=64, num_heads=4, num_kv_heads=2, d_ff=176, norm_eps=1e-5)
        base.tiny_run(c)
    elif preset == "small":
        c.steps = 600
        c.model.update(num_layers=6, max_len=128, rope_theta=10000.0)
        c.model.block.update(d_model=256, num_heads=8, num_kv_heads=2, d_ff=768, norm_eps=1e-5)
        c.tokenizer.vocab_size = 2048
        c.data.update(seq_len=128, batch_size=16)
        c.optimizer.update(lr=2e-3)
        c.schedule.update(warmup_steps=60)
        c.eval.update(every_steps=200)
    elif preset == "llama3_8b":
        c.steps = 100_000
        c.model.update(vocab_size=128256, num_layers=32, max_len=8192, rope_theta=500000.0, dtype="bfloat16",
                       remat="full")
        c.model.block.update(d_model=4096, num_heads=32, num_kv_heads=8, d_ff=14336, norm_eps=1e-5)
        c.tokenizer.vocab_size = 128256
        c.data.update(seq_len=8192, batch_size=512)  # 4M tokens a step, as Llama 3 ended with
        c.optimizer.update(lr=3e-4)
        c.schedule.update(warmup_steps=2000)
    return c
