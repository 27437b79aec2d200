"""DeepSeek-V3-style decoder presets (models/gpt.py with multi-head latent attention, DeepSeekMoE
and multi-token prediction).

    python -m train --config=configs/deepseek.py:tiny --workdir=/tmp/deepseek_tiny

The recipe: MLA attention (model.mla), the first model.first_dense_layers layers with a
dense SwiGLU MLP and the rest DeepSeekMoE (sigmoid scores, experts in groups of which a
token may use topk_group, one shared expert, routed weights times routed_scaling_factor),
balanced without an auxiliary loss by a per-expert score correction bias that moves by
model.moe.bias_update_rate after every step (plus a small sequence-wise balance loss), and mtp_depth
multi-token-prediction modules whose cross-entropy enters the loss times mtp_loss_weight.

Presets:
    tiny:             2 layers (the first dense), width 64, 4 MLA heads, 8 experts in 4 groups,
                      top-2 within the best 2 groups, a shared expert, correction bias with
                      bias_update_rate 1e-2, one MTP module, for tests (seconds)
    deepseek_v3_671b: DeepSeek-V3 shape (61 layers, 3 dense, width 7168, 128 heads, q / kv
                      latents 1536 / 512, 256 experts of 2048 in 8 groups, top-8 within 4
                      groups, 1 shared expert, vocab 129280, untied, 4K pre-training context):
                      671,026,419,200 parameters without the MTP module (the checkpoint's main
                      model, correction biases included), 682,636,487,424 with it

The RoPE dims rotate halves, not DeepSeek's interleaved pairs: the same model trained from
scratch, but not the layout of DeepSeek's checkpoints (models/deepseek.py converts those).
"""

from __future__ import annotations

import ml_collections

from configs import base, llama

PRESETS = ("tiny", "deepseek_v3_671b")


def deepseek_switches(c: ml_collections.ConfigDict) -> None:
    """DeepSeek-V3's switches: LLaMA's (RoPE, pre-RMSNorm, SwiGLU, no biases, untied) plus a
    sigmoid-scored, group-limited MoE with a correction bias and renormalised top-k weights."""
    llama.llama_switches(c)
    c.model.family = "deepseek"
    c.model.block.norm_eps = 1e-6
    # Balanced by the correction bias and a small sequence-wise loss, not the Switch loss.
    c.model.moe.update(score_func="sigmoid", norm_topk_prob=True, score_correction_bias=True, aux_loss_weight=0.0,
                       seq_aux_loss_weight=1e-4)


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown deepseek preset {preset!r}; expected one of {PRESETS}")
    c = base.get_config()
    deepseek_switches(c)
    if preset == "tiny":
        c.model.update(num_layers=2, first_dense_layers=1, max_len=64, mtp_depth=1, mtp_loss_weight=0.3)
        c.model.block.update(d_model=64, num_heads=4, d_ff=128)
        c.model.moe.update(num_experts=8, num_experts_per_tok=2, expert_d_ff=32, n_group=4, topk_group=2,
                           num_shared_experts=1, routed_scaling_factor=2.5, bias_update_rate=1e-2)
        c.model.mla.update(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        base.tiny_run(c)
    elif preset == "deepseek_v3_671b":
        c.steps = 100_000
        # Pre-trained at 4K context with plain RoPE; YaRN (factor 40, to 128K) came after.
        c.model.update(vocab_size=129280, num_layers=61, first_dense_layers=3, max_len=4096, rope_theta=10000.0,
                       mtp_depth=1, mtp_loss_weight=0.3, dtype="bfloat16", remat="full", scan_layers=True)
        c.model.block.update(d_model=7168, num_heads=128, d_ff=18432)
        c.model.moe.update(num_experts=256, num_experts_per_tok=8, expert_d_ff=2048, n_group=8, topk_group=4,
                           num_shared_experts=1, shared_d_ff=2048, routed_scaling_factor=2.5,
                           bias_update_rate=1e-3)
        c.model.mla.update(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                           v_head_dim=128)
        c.tokenizer.vocab_size = 129280
        c.data.update(seq_len=4096, batch_size=15360)  # 63M tokens a step, as DeepSeek-V3 ended with
        c.optimizer.update(lr=2.2e-4, weight_decay=0.1)
        c.schedule.update(warmup_steps=2000)
    return c
