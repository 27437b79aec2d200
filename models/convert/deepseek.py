"""Hugging Face DeepSeek-V3 checkpoints <-> lmlab `GPT` params (block.mla and block.moe set).

Axis letters: D model width, N heads, L query latent, C KV latent, P nope head dim,
R rope head dim, Q = P + R, H value head dim, E experts, F hidden width.

Embeddings, the layer and final RMSNorms and the dense layers' MLP map as in
`models/convert/llama.py`; the rest, torch Linear weights being [out, in]:

    self_attn.q_proj          [N*Q, D]    -> self_attention/query        [D, N, Q]   (q_lora_rank None)
    self_attn.q_a_proj        [L, D]      -> self_attention/query_down   [D, L]
    self_attn.q_a_layernorm   [L]         -> self_attention/query_norm
    self_attn.q_b_proj        [N*Q, L]    -> self_attention/query_up     [L, N, Q]
    self_attn.kv_a_proj_with_mqa [C+R, D] -> latent_kv/kv_down [D, C] (rows :C), latent_kv/key_rope [D, R]
    self_attn.kv_a_layernorm  [C]         -> latent_kv/kv_norm
    self_attn.kv_b_proj       [N*(P+H), C] -> key_up [C, N, P], value_up [C, N, H] (per head: P rows, then H)
    self_attn.o_proj          [D, N*H]    -> self_attention/out          [N, H, D]
    mlp.gate.weight           [E, D]      -> mlp/router                  [D, E]
    mlp.gate.e_score_correction_bias [E]  -> mlp/score_correction_bias   (float32)
    mlp.experts.gate_up_proj  [E, 2F, D]  -> mlp/wi_gate, mlp/wi_up      [E, D, F]
    mlp.experts.down_proj     [E, D, F]   -> mlp/wo                      [E, F, D]
    mlp.shared_experts.{gate,up,down}_proj -> mlp/shared/{wi_gate,wi_up,wo}

(with attention_bias, also q_a_proj.bias, kv_a_proj_with_mqa.bias (split like its weight)
and o_proj.bias). The expert tensors may instead come one per expert, as in checkpoint
files: `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`; `hf_to_params` accepts both
and `params_to_hf` writes the fused layout of transformers' `state_dict()`.

DeepSeek's own checkpoints hold one more layer, `model.layers.{num_hidden_layers}.*`: the
multi-token-prediction module, which transformers' DeepseekV3ForCausalLM does not build
(it drops those tensors on load). `hf_to_params` drops them too. FP8 checkpoints (with
`weight_scale_inv` tensors) must be dequantised first; their scales are reported as
unexpected tensors.

This module needs neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from models.convert import llama
from models.convert import moe as moe_convert
from models.convert.llama import check_names
from models.convert.sources import Source, to_numpy
from models.deepseek import deepseek_v3_config
from models.gpt import GPTConfig
from models.layers.positional import rope_config_from_hf

ARCHITECTURES = ("DeepseekV3ForCausalLM",)
# transformers' DeepseekV3Config defaults, for keys a config.json may omit.
_DEFAULTS = {
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096, "moe_intermediate_size": 2048,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "rope_interleave": True, "attention_bias": False,
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Per-expert checkpoint tensors are named as Qwen3-MoE's (mlp.experts.{e}.gate_proj...).
_PER_EXPERT_NAMING = "Qwen3MoeForCausalLM"


def is_deepseek_v3(hf: Mapping[str, Any]) -> bool:
    return "DeepseekV3ForCausalLM" in (hf.get("architectures") or []) or hf.get("model_type") == "deepseek_v3"


def config_from_hf(hf: Mapping[str, Any], **overrides) -> GPTConfig:
    """The GPTConfig of a HF DeepSeek-V3 config dict.

    Args:
      hf: `hf_model.config.to_dict()` or a parsed config.json (transformers 5's
        `rope_parameters` or 4.x's `rope_scaling`).
      **overrides: passed to `deepseek_v3_config` (dtype, param_dtype, remat,
        capacity_factor, seq_aux_loss_weight, ...).

    Raises:
      ValueError: for another architecture, or a DeepSeek-V3 variant this code does not
        compute (no shared experts, grouped KV heads, a non-SiLU activation).
    """
    if not is_deepseek_v3(hf):
        raise ValueError(f"not a DeepSeek-V3 config (architectures={hf.get('architectures')}, "
                         f"model_type={hf.get('model_type')!r}); expected DeepseekV3ForCausalLM")

    def get(key):
        return hf[key] if key in hf else _DEFAULTS[key]

    kwargs, _ = llama.preset_kwargs(hf, _DEFAULTS, _REQUIRED)
    N = kwargs["num_heads"]
    del kwargs["num_kv_heads"], kwargs["head_dim"], kwargs["rope_theta"]  # MLA has neither; RoPE read below
    if (hf.get("num_key_value_heads") or N) != N:
        raise ValueError(f"num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={N}: "
                         "transformers' MLA needs them equal")
    # Keys of DeepSeek's own config.json (transformers reads none of them): anything but
    # V3's routing would be computed wrongly.
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if hf.get(key, want) != want:
            raise ValueError(f"{key}={hf[key]!r}; DeepSeek-V3 (and this converter) has {key}={want!r}")
    if get("n_shared_experts") < 1:
        raise ValueError(f"n_shared_experts={get('n_shared_experts')}: only models with shared experts are converted")
    R = get("qk_rope_head_dim")
    rope = rope_config_from_hf({**hf, "rope_theta": llama._rope_theta(hf, _DEFAULTS["rope_theta"])}, R)
    rope = dataclasses.replace(rope, interleaved=bool(get("rope_interleave")))
    return deepseek_v3_config(
        **kwargs, d_ff=hf["intermediate_size"], moe_d_ff=get("moe_intermediate_size"),
        num_experts=get("n_routed_experts"), num_experts_per_tok=get("num_experts_per_tok"),
        n_group=get("n_group") or 1, topk_group=get("topk_group") or 1, num_shared_experts=get("n_shared_experts"),
        routed_scaling_factor=float(get("routed_scaling_factor")), norm_topk_prob=bool(get("norm_topk_prob")),
        first_dense_layers=min(get("first_k_dense_replace") or 0, hf["num_hidden_layers"]),
        q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=R, v_head_dim=get("v_head_dim"), rope=rope, attention_bias=bool(get("attention_bias")),
        **overrides,
    )


def _sizes(config: GPTConfig) -> dict[str, int]:
    b = config.block
    m, moe = b.mla, b.moe
    if m is None or moe is None or config.positional != "rope" or b.norm != "rmsnorm" or b.norm_position != "pre":
        raise ValueError("the DeepSeek-V3 layout needs block.mla and block.moe set, rope, pre-RMSNorm "
                         "(see models.deepseek.deepseek_v3_config)")
    return {"D": b.d_model, "N": b.num_heads, "L": m.q_lora_rank or 0, "C": m.kv_lora_rank, "P": m.qk_nope_head_dim,
            "R": m.qk_rope_head_dim, "H": m.v_head_dim, "E": moe.num_experts, "F": moe.expert_d_ff,
            "S": moe.shared_width, "Fd": b.d_ff, "V": config.vocab_size}


def _layout(config: GPTConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], int]]:
    """(HF name, our path, our shape, n_in) of the tensors `llama.load_layout` moves, as in
    `llama._layout`. The fused HF tensors appear split, under the names `_split` gives."""
    s = _sizes(config)
    D, N, L, C, P, R, H, E, V = (s[k] for k in "DNLCPRHEV")
    b, moe = config.block, config.block.moe
    out = [("model.embed_tokens.weight", ("embed", "embedding"), (V, D), 0),
           ("model.norm.weight", ("final_norm", "scale"), (D,), 0)]
    if not config.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head",), (D, V), 1))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layer_{i}"
        attn, latent, mlp = (ours, "self_attention"), (ours, "self_attention", "latent_kv"), (ours, "mlp")
        out += [
            (hf + "input_layernorm.weight", (ours, "attention_block", "norm", "scale"), (D,), 0),
            (hf + "post_attention_layernorm.weight", (ours, "mlp_block", "norm", "scale"), (D,), 0),
            (hf + "self_attn.kv_a_proj_with_mqa.weight:kv", (*latent, "kv_down"), (D, C), 1),
            (hf + "self_attn.kv_a_proj_with_mqa.weight:rope", (*latent, "key_rope"), (D, R), 1),
            (hf + "self_attn.kv_a_layernorm.weight", (*latent, "kv_norm"), (C,), 0),
            (hf + "self_attn.kv_b_proj.weight:key", (*attn, "key_up"), (C, N, P), 1),
            (hf + "self_attn.kv_b_proj.weight:value", (*attn, "value_up"), (C, N, H), 1),
            (hf + "self_attn.o_proj.weight", (*attn, "out"), (N, H, D), 2),
        ]
        if L:
            out += [(hf + "self_attn.q_a_proj.weight", (*attn, "query_down"), (D, L), 1),
                    (hf + "self_attn.q_a_layernorm.weight", (*attn, "query_norm"), (L,), 0),
                    (hf + "self_attn.q_b_proj.weight", (*attn, "query_up"), (L, N, P + R), 1)]
        else:
            out.append((hf + "self_attn.q_proj.weight", (*attn, "query"), (D, N, P + R), 1))
        if b.has_qkv_bias:
            out += [(hf + "self_attn.kv_a_proj_with_mqa.bias:kv", (*latent, "kv_down_bias"), (C,), 0),
                    (hf + "self_attn.kv_a_proj_with_mqa.bias:rope", (*latent, "key_rope_bias"), (R,), 0),
                    (hf + "self_attn.o_proj.bias", (*attn, "out_bias"), (D,), 0)]
            if L:
                out.append((hf + "self_attn.q_a_proj.bias", (*attn, "query_down_bias"), (L,), 0))
        if i < config.first_dense_layers:
            F = s["Fd"]
            out += [(hf + "mlp.gate_proj.weight", (*mlp, "wi_gate"), (D, F), 1),
                    (hf + "mlp.up_proj.weight", (*mlp, "wi_up"), (D, F), 1),
                    (hf + "mlp.down_proj.weight", (*mlp, "wo"), (F, D), 1)]
            continue
        S, shared = s["S"], (*mlp, "shared")
        out += [(hf + "mlp.gate.weight", (*mlp, "router"), (D, E), 1),
                (hf + "mlp.shared_experts.gate_proj.weight", (*shared, "wi_gate"), (D, S), 1),
                (hf + "mlp.shared_experts.up_proj.weight", (*shared, "wi_up"), (D, S), 1),
                (hf + "mlp.shared_experts.down_proj.weight", (*shared, "wo"), (S, D), 1)]
        if moe.score_correction_bias:
            out.append((hf + "mlp.gate.e_score_correction_bias", (*mlp, "score_correction_bias"), (E,), 0))
    return out


def _hf_names(config: GPTConfig) -> set[str]:
    """Every tensor name of the HF state dict (fused experts)."""
    names = {name.split(":")[0] for name, *_ in _layout(config)}
    for i in range(config.first_dense_layers, config.num_layers):
        hf = f"model.layers.{i}.mlp."
        names |= {hf + "experts.gate_up_proj", hf + "experts.down_proj", hf + "gate.e_score_correction_bias"}
    return names


def _split_parts(config: GPTConfig) -> dict[str, tuple[tuple[int, ...], list[tuple[str, int]]]]:
    """Fused HF tensor suffix -> (its shape, its (part, rows) along the output axis), the
    rows per head for kv_b_proj."""
    s = _sizes(config)
    C, R, D = s["C"], s["R"], s["D"]
    return {"self_attn.kv_a_proj_with_mqa.weight": ((C + R, D), [("kv", C), ("rope", R)]),
            "self_attn.kv_a_proj_with_mqa.bias": ((C + R,), [("kv", C), ("rope", R)]),
            "self_attn.kv_b_proj.weight": ((s["N"] * (s["P"] + s["H"]), C), [("key", s["P"]), ("value", s["H"])])}


def _split(sd: Mapping[str, Any], config: GPTConfig) -> dict[str, Any]:
    """The state dict with each fused attention tensor replaced by its `name:part` pieces."""
    out, N = dict(sd), config.block.num_heads
    for i in range(config.num_layers):
        for suffix, (shape, parts) in _split_parts(config).items():
            name = f"model.layers.{i}.{suffix}"
            if name not in out:
                continue
            array = to_numpy(out.pop(name))
            if array.shape != shape:
                raise ValueError(f"{name} has shape {array.shape}; expected {shape}")
            per_head = suffix.startswith("self_attn.kv_b_proj")
            if per_head:  # [N*(P+H), C] -> [N, P+H, C]
                array = array.reshape(N, -1, shape[-1])
            start = 0
            for part, n in parts:
                piece = array[:, start:start + n].reshape(-1, shape[-1]) if per_head else array[start:start + n]
                out[f"{name}:{part}"] = piece
                start += n
    return out


def _join(sd: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """The inverse of `_split`."""
    N = config.block.num_heads
    for i in range(config.num_layers):
        for suffix, (_, parts) in _split_parts(config).items():
            name = f"model.layers.{i}.{suffix}"
            if f"{name}:{parts[0][0]}" not in sd:
                continue
            pieces = [sd.pop(f"{name}:{part}") for part, _ in parts]
            if suffix.startswith("self_attn.kv_b_proj"):  # [N*n, C] pieces -> per head [N, P+H, C]
                pieces = [p.reshape(N, -1, p.shape[-1]) for p in pieces]
                sd[name] = np.concatenate(pieces, 1).reshape(-1, pieces[0].shape[-1])
            else:
                sd[name] = np.concatenate(pieces, 0)
    return sd


def sources(config: GPTConfig, available=None) -> dict:
    """Per-parameter sources of a DeepSeek-V3 checkpoint (see models/convert/sources.py): the
    split attention tensors read their fused tensor and keep their part (`_split`)."""
    out = {}
    for name, path, shape, n_in in _layout(config):
        fused, _, part = name.partition(":")
        if part:
            def convert(array, name=name, fused=fused, shape=shape, n_in=n_in):
                return llama.entry_to_ours(to_numpy(_split({fused: array}, config)[name]), name, shape, n_in)
            out[path] = Source((fused,), convert, shape)
        else:
            out.update(llama.layout_sources([(name, path, shape, n_in)]))
    out.update(moe_convert.expert_sources(config, range(config.first_dense_layers, config.num_layers), available,
                                          _PER_EXPERT_NAMING))
    return out


def hf_to_params(state_dict: Mapping[str, Any], config: GPTConfig) -> dict:
    """Our params from a HF DeepSeek-V3 state dict (fused or per-expert expert tensors).

    Args:
      state_dict: HF name -> torch tensor or array; `model.layers.{num_layers}.*` (the MTP
        module of DeepSeek's checkpoints) is ignored.
      config: from `config_from_hf`.

    Returns:
      The nested params dict (`layer_{i}`, per layer) for `GPT(config)`.

    Raises:
      ValueError: naming every missing, unexpected or misshapen tensor.
    """
    mtp = f"model.layers.{config.num_layers}."
    sd = {name: value for name, value in state_dict.items() if not name.startswith(mtp)}
    sd = moe_convert._fuse_per_expert(sd, config, _PER_EXPERT_NAMING)
    moe = config.block.moe
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    bias_names = {f"model.layers.{i}.mlp.gate.e_score_correction_bias"
                  for i in range(config.first_dense_layers, config.num_layers)}
    expected = _hf_names(config)
    if not moe.score_correction_bias:  # accepted only as zeros (it would change the routing)
        expected, optional = expected - bias_names, optional | bias_names
        for name in bias_names & set(sd):
            if np.any(to_numpy(sd[name])):
                raise ValueError(f"{name} is non-zero but config.block.moe.score_correction_bias=False")
    check_names(sd, expected, optional)
    params = llama.load_layout(_split(sd, config), _layout(config), config)
    dtype, E, F, D = config.block.param_dtype, moe.num_experts, moe.expert_d_ff, config.block.d_model
    for i in range(config.first_dense_layers, config.num_layers):
        hf, mlp = f"model.layers.{i}.mlp.", params[f"layer_{i}"]["mlp"]
        gate_up, down = to_numpy(sd[hf + "experts.gate_up_proj"]), to_numpy(sd[hf + "experts.down_proj"])
        for name, array, shape in (("gate_up_proj", gate_up, (E, 2 * F, D)), ("down_proj", down, (E, D, F))):
            if array.shape != shape:
                raise ValueError(f"{hf}experts.{name} has shape {array.shape}; expected {shape}")
        gate_up = gate_up.transpose(0, 2, 1)  # [E, D, 2F]
        mlp.update(wi_gate=jnp.asarray(gate_up[..., :F], dtype), wi_up=jnp.asarray(gate_up[..., F:], dtype),
                   wo=jnp.asarray(down.transpose(0, 2, 1), dtype))
        if moe.score_correction_bias:  # float32 whatever param_dtype, as the module creates it
            mlp["score_correction_bias"] = jnp.asarray(to_numpy(sd[hf + "gate.e_score_correction_bias"]), jnp.float32)
    return params


def params_to_hf(params: Mapping[str, Any], config: GPTConfig, *, include_tied: bool = True) -> dict[str, np.ndarray]:
    """A HF state dict (numpy float32, fused expert tensors) from our per-layer params.

    Without a correction bias (score_correction_bias=False) HF's buffer is written as zeros.

    Args:
      params: as from `hf_to_params` or training (`layer_{i}` layout).
      config: the model's config.
      include_tied: with tied embeddings also emit `lm_head.weight`.
    """
    sd = _join(llama.dump_layout(params, _layout(config), config, include_tied=include_tied), config)
    moe = config.block.moe
    E, F, D = moe.num_experts, moe.expert_d_ff, config.block.d_model
    for i in range(config.first_dense_layers, config.num_layers):
        hf, mlp = f"model.layers.{i}.mlp.", params[f"layer_{i}"]["mlp"]
        arrays = {k: np.asarray(mlp[k], np.float32) for k in ("wi_gate", "wi_up", "wo")}
        for key, shape in (("wi_gate", (E, D, F)), ("wi_up", (E, D, F)), ("wo", (E, F, D))):
            if arrays[key].shape != shape:
                raise ValueError(f"param layer_{i}/mlp/{key} has shape {arrays[key].shape}; expected {shape}")
        sd[hf + "experts.gate_up_proj"] = np.ascontiguousarray(
            np.concatenate([arrays["wi_gate"], arrays["wi_up"]], -1).transpose(0, 2, 1))
        sd[hf + "experts.down_proj"] = np.ascontiguousarray(arrays["wo"].transpose(0, 2, 1))
        if not moe.score_correction_bias:
            sd[hf + "gate.e_score_correction_bias"] = np.zeros(E, np.float32)
    return sd
