"""Mixture-of-experts decoder presets (models/gpt.py with `block.moe`): Mixtral and Qwen3-MoE.

    python -m train --config=configs/moe.py:tiny --workdir=/tmp/moe_tiny
    python -m train --config=configs/moe.py:mixtral_8x7b --config.tokenizer.path=PATH/TO/Mixtral-8x7B-v0.1

Every layer's MLP is a top-k mixture of SwiGLU experts (models/layers/moe.py). The training
loss adds each MoE layer's load-balancing loss times model.moe.aux_loss_weight (and the
router z-loss times model.moe.router_z_loss_weight); the logged metrics add `moe_aux_loss`,
the mean dropped fraction and the most and least loaded expert relative to the mean.

Presets:
    tiny:          2 layers, width 64, LLaMA attention (4 query / 2 key-value heads), 4 SwiGLU
                   experts of width 128, top-2, aux_loss_weight 0.01, for tests (seconds)
    mixtral_8x7b:  Mixtral-8x7B shape (32 layers, width 4096, 32 / 8 heads, 8 experts of
                   14336, top-2, RoPE theta 1e6, vocab 32000, untied): 46,702,792,704 parameters
    qwen3_30b_a3b: Qwen3-30B-A3B shape (48 layers, width 2048, 32 / 4 heads of dim 128,
                   QK-norm, 128 experts of 768, top-8, vocab 151936, untied): 30,532,122,624
                   parameters
"""

from __future__ import annotations

import ml_collections

from configs import base, llama, qwen

PRESETS = ("tiny", "mixtral_8x7b", "qwen3_30b_a3b")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown moe preset {preset!r}; expected one of {PRESETS}")
    c = base.get_config()
    if preset == "qwen3_30b_a3b":
        qwen.qwen3_switches(c)
    else:
        llama.llama_switches(c)
    c.model.family = "moe"
    if preset == "tiny":
        c.model.update(num_layers=2, max_len=64, rope_theta=1e6)
        c.model.block.update(d_model=64, num_heads=4, num_kv_heads=2, d_ff=128)
        c.model.moe.update(num_experts=4, num_experts_per_tok=2, aux_loss_weight=0.01)
        base.tiny_run(c)
    elif preset == "mixtral_8x7b":
        c.steps = 100_000
        c.model.update(vocab_size=32000, num_layers=32, max_len=32768, rope_theta=1e6, dtype="bfloat16",
                       remat="full")
        c.model.block.update(d_model=4096, num_heads=32, num_kv_heads=8, d_ff=14336, norm_eps=1e-5)
        c.model.moe.update(num_experts=8, num_experts_per_tok=2, aux_loss_weight=0.02)
        c.tokenizer.vocab_size = 32000
        c.data.update(seq_len=4096, batch_size=1024)
        c.optimizer.update(lr=3e-4)
        c.schedule.update(warmup_steps=2000)
    elif preset == "qwen3_30b_a3b":
        c.steps = 100_000
        c.model.update(vocab_size=151936, num_layers=48, max_len=40960, tie_embeddings=False, dtype="bfloat16",
                       remat="full")
        c.model.block.update(d_model=2048, num_heads=32, num_kv_heads=4, head_dim=128, d_ff=768)
        c.model.moe.update(num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, aux_loss_weight=0.001)
        c.tokenizer.vocab_size = 151936
        c.data.update(seq_len=4096, batch_size=1024)
        c.optimizer.update(lr=3e-4)
        c.schedule.update(warmup_steps=2000)
    return c
