"""DeepSeek-V3 (DeepSeek-AI 2024) as a `GPTConfig`: latent attention and a fine-grained,
group-routed mixture of experts with auxiliary-loss-free balancing.

Axis letters: D model width, N heads, E routed experts, K experts per token, F hidden width.

    ids --Embed--> k dense layers --> (L - k) MoE layers --> RMSNorm --> lm_head

Every layer is pre-RMSNorm `EncoderLayer(causal)`:

* attention: multi-head latent attention (`block.mla`, `models/layers/mla.py`): queries
  through a rank-L latent, keys and values expanded per head from one cached rank-C
  latent, RoPE (interleaved pairs, YaRN for long context) on R extra dims with one
  rotary key shared by all heads.
* feed-forward: the first `first_dense_layers` layers a SwiGLU MLP of width `d_ff`; the
  rest a mixture (`block.moe`, `models/layers/moe.py`) of E routed SwiGLU experts of
  width `moe_d_ff` plus `num_shared_experts` always-on experts. The router scores are
  sigmoids; the experts are chosen within the `topk_group` best of `n_group` groups, by
  the scores plus a per-expert correction bias (moved by `moe.update_correction_bias`
  between steps, not by gradients); the chosen scores are renormalised to sum to 1
  (`norm_topk_prob`) and scaled by `routed_scaling_factor`.
* untied output head.

transformers' `DeepseekV3ForCausalLM` computes the same function; `models/convert/deepseek.py`
maps its config and tensors:

    HF config                         here
    hidden_size, intermediate_size    d_model, d_ff (dense layers)
    moe_intermediate_size             moe_d_ff (each routed and each shared expert)
    n_routed_experts, n_shared_experts, num_experts_per_tok, n_group, topk_group,
    routed_scaling_factor, norm_topk_prob                      same names (E, K, ...)
    first_k_dense_replace             first_dense_layers
    q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
                                      the MLAConfig fields
    rope_parameters (yarn, mscale, mscale_all_dim), rope_interleave
                                      rope (RopeConfig(interleaved=True, scaling="yarn", ...))
    attention_bias                    attention_bias
    gate.e_score_correction_bias      mlp/score_correction_bias (a buffer in HF, outside its
                                      parameters(); num_params counts it)

The real checkpoints add one multi-token-prediction layer, `model.layers.61.*`, which
transformers ignores and so does the converter.
"""

from __future__ import annotations

import dataclasses

from models.gpt import GPTConfig
from models.layers.blocks import BlockConfig
from models.layers.mla import MLAConfig
from models.layers.moe import MoEConfig
from models.layers.positional import RopeConfig

_GPT_FIELDS = frozenset(f.name for f in dataclasses.fields(GPTConfig)) - {"vocab_size", "block", "num_layers",
                                                                          "max_len", "tie_embeddings", "positional",
                                                                          "first_dense_layers"}


def deepseek_v3_config(*, vocab_size: int = 129280, d_model: int = 7168, num_layers: int = 61, num_heads: int = 128,
                       d_ff: int = 18432, moe_d_ff: int = 2048, num_experts: int = 256, num_experts_per_tok: int = 8,
                       n_group: int = 8, topk_group: int = 4, num_shared_experts: int = 1,
                       routed_scaling_factor: float = 2.5, norm_topk_prob: bool = True, first_dense_layers: int = 3,
                       q_lora_rank: int | None = 1536, kv_lora_rank: int = 512, qk_nope_head_dim: int = 128,
                       qk_rope_head_dim: int = 64, v_head_dim: int = 128, rope: RopeConfig | None = None,
                       norm_eps: float = 1e-6, max_len: int = 4096, tie_embeddings: bool = False,
                       attention_bias: bool = False, score_correction_bias: bool = True, aux_loss_weight: float = 0.0,
                       seq_aux_loss_weight: float = 0.0, capacity_factor: float = 0.0, **overrides) -> GPTConfig:
    """DeepSeek-V3; the defaults are the 671B model at its 4K pre-training context
    (transformers' `DeepseekV3Config()` defaults).

    The released 128K-context model uses YaRN: `max_len=163840, rope=RopeConfig(
    interleaved=True, scaling="yarn", factor=40, original_max_len=4096, mscale=1.0,
    mscale_all_dim=1.0)`.

    Args:
      vocab_size, d_model, num_layers, num_heads: V, D, L, N.
      d_ff: hidden width of the dense layers' SwiGLU MLP (HF intermediate_size).
      moe_d_ff: hidden width of each routed and each shared expert (HF moe_intermediate_size).
      num_experts, num_experts_per_tok: E and K.
      n_group, topk_group: group-limited routing (K experts within the topk_group best of
        n_group groups).
      num_shared_experts: experts every token passes through.
      routed_scaling_factor, norm_topk_prob: see `MoEConfig`.
      first_dense_layers: how many first layers have the dense MLP (HF first_k_dense_replace).
      q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim: `MLAConfig`.
      rope: RoPE of the rotary dims (None: theta 1e4, interleaved pairs, no scaling).
      norm_eps: epsilon of the layer RMSNorms (the latent norms of MLA use 1e-6).
      max_len: context length.
      tie_embeddings: share the token table with the output head (DeepSeek-V3: no).
      attention_bias: biases in MLA (HF attention_bias).
      score_correction_bias: the auxiliary-loss-free balancing bias (see `MoEConfig`).
      aux_loss_weight, seq_aux_loss_weight: Switch-style and DeepSeek-V3 sequence-wise
        balance loss weights (the paper: 0 and 1e-4).
      capacity_factor: 0 = dropless (exact, as HF); > 0 drops tokens beyond capacity.
      **overrides: GPTConfig fields (remat, scan_layers, mtp_depth) or further BlockConfig
        fields (dtype, param_dtype, dropout_rate, attention_dropout_rate, ...).

    Returns:
      The GPTConfig.
    """
    gpt = {key: overrides.pop(key) for key in list(overrides) if key in _GPT_FIELDS}
    moe = MoEConfig(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, expert_d_ff=moe_d_ff,
                    score_func="sigmoid", norm_topk_prob=norm_topk_prob, capacity_factor=capacity_factor,
                    aux_loss_weight=aux_loss_weight, num_shared_experts=num_shared_experts,
                    routed_scaling_factor=routed_scaling_factor, n_group=n_group, topk_group=topk_group,
                    score_correction_bias=score_correction_bias, seq_aux_loss_weight=seq_aux_loss_weight)
    mla = MLAConfig(q_lora_rank=q_lora_rank or None, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                    qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim)
    block = {"d_model": d_model, "num_heads": num_heads, "d_ff": d_ff, "mlp_activation": "swiglu",
             "norm": "rmsnorm", "norm_position": "pre", "norm_eps": norm_eps, "dropout_rate": 0.0,
             "use_bias": attention_bias, "mlp_bias": False, "rope": rope or RopeConfig(theta=10000.0, interleaved=True),
             "moe": moe, "mla": mla}
    block.update(overrides)
    return GPTConfig(vocab_size=vocab_size, block=BlockConfig(**block), num_layers=num_layers, max_len=max_len,
                     tie_embeddings=tie_embeddings, positional="rope", first_dense_layers=first_dense_layers, **gpt)
