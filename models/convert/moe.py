"""Hugging Face Mixtral / Qwen3-MoE checkpoints <-> lmlab `GPT` params (block.moe set).

Axis letters: D model width, E experts, F expert hidden width.

Attention, norms and embeddings map exactly as in `models/convert/llama.py`. The MoE MLP:

    mlp.gate.weight               [E, D]      -> mlp/router  [D, E]
    mlp.experts.gate_up_proj      [E, 2F, D]  -> mlp/wi_gate [E, D, F] (rows :F), mlp/wi_up (rows F:)
    mlp.experts.down_proj         [E, D, F]   -> mlp/wo      [E, F, D]

That fused layout is what transformers 5 keeps in memory (`state_dict()`). Checkpoint files
(and transformers' own `save_pretrained`) may instead hold one tensor per expert:
Mixtral `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.{e}.w1/w3/w2.weight`
(gate/up/down), Qwen3-MoE `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`;
`hf_to_params` accepts either. `params_to_hf` writes the fused layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from models.convert import llama
from models.convert.llama import check_names
from models.convert.sources import Source, materialize, to_numpy
from models.gpt import GPTConfig, mixtral_config, qwen3_moe_config

ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
_MODEL_TYPES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_DEFAULTS = {
    "MixtralForCausalLM": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32},
    "Qwen3MoeForCausalLM": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok")
_LEGACY = {  # arch -> (module prefix, gate, up, down) of per-expert checkpoints
    "MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
    "Qwen3MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def architecture(hf: Mapping[str, Any]) -> str:
    """Which of ARCHITECTURES a HF config dict describes."""
    return llama.match_architecture(hf, ARCHITECTURES, _MODEL_TYPES)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> GPTConfig:
    """The GPTConfig of a HF Mixtral / Qwen3-MoE config dict.

    Args:
      hf: `hf_model.config.to_dict()` or a parsed config.json.
      **overrides: passed to the preset (dtype, param_dtype, remat, capacity_factor, ...).

    Raises:
      ValueError: for Qwen3-MoE with dense layers (mlp_only_layers, decoder_sparse_step != 1).
    """
    arch = architecture(hf)
    defaults = _DEFAULTS[arch]
    kwargs, head_dim = llama.preset_kwargs(hf, defaults, _REQUIRED)
    kwargs.update({
        "num_experts_per_tok": hf["num_experts_per_tok"],
        "aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.0)),
    })
    if arch == "MixtralForCausalLM":
        config = mixtral_config(num_experts=hf.get("num_local_experts", hf.get("num_experts", 8)), d_ff=hf["intermediate_size"],
                                sliding_window=hf.get("sliding_window"), **kwargs, **overrides)
    else:
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError(f"Qwen3-MoE with dense layers (mlp_only_layers={hf.get('mlp_only_layers')}, "
                             f"decoder_sparse_step={hf.get('decoder_sparse_step')}) is not supported; only "
                             "mlp_only_layers=[] and decoder_sparse_step=1 (every layer MoE)")
        # transformers 5 stores Qwen3-MoE's num_experts as num_local_experts (attribute_map)
        config = qwen3_moe_config(num_experts=hf.get("num_experts", hf.get("num_local_experts", 128)), d_ff=hf["moe_intermediate_size"],
                                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                                  attention_bias=bool(hf.get("attention_bias", False)),
                                  sliding_window=llama._sliding_window(hf), **kwargs, **overrides)
    rope = llama._rope(hf, head_dim, defaults["rope_theta"])
    return dataclasses.replace(config, block=dataclasses.replace(config.block, rope=rope))


def _dense_layout(config: GPTConfig):
    """llama's layout of everything but the MLP tensors."""
    if config.block.moe is None:
        raise ValueError("config.block.moe is None; use models.convert.llama for dense models")
    return [entry for entry in llama._layout(config) if ".mlp." not in entry[0]]


def _moe_names(config: GPTConfig, i: int) -> dict[str, str]:
    hf = f"model.layers.{i}.mlp."
    return {"router": hf + "gate.weight", "gate_up": hf + "experts.gate_up_proj", "down": hf + "experts.down_proj"}


def _fuse_per_expert(state_dict: Mapping[str, Any], config: GPTConfig, arch: str) -> dict[str, Any]:
    """Replaces per-expert checkpoint tensors (if present) with the fused transformers-5 ones."""
    prefix, gate, up, down = _LEGACY[arch]
    sd = dict(state_dict)
    E = config.block.moe.num_experts
    for i in range(config.num_layers):
        old = f"model.layers.{i}.{prefix}."
        names = _moe_names(config, i)
        if old + "experts.0." + gate + ".weight" not in sd:
            continue
        if prefix != "mlp" and old + "gate.weight" in sd:
            sd[names["router"]] = sd.pop(old + "gate.weight")
        gate_up, down_ = [], []
        for e in range(E):
            base = f"{old}experts.{e}."
            g, u, d = (to_numpy(sd.pop(base + n + ".weight")) for n in (gate, up, down))
            gate_up.append(np.concatenate([g, u], 0))
            down_.append(d)
        sd[names["gate_up"]], sd[names["down"]] = np.stack(gate_up), np.stack(down_)
    return sd


def expert_sources(config: GPTConfig, layers, available, arch: str, prefix: tuple[str, ...] = ("mlp",)) -> dict:
    """Sources of the routed experts' wi_gate / wi_up / wo [E, D, F] / [E, F, D] of `layers`,
    from the fused transformers-5 tensors or, where the checkpoint holds those
    (`available`: its tensor names), one tensor per expert (`_LEGACY[arch]` naming)."""
    moe = config.block.moe
    D, E, F = config.block.d_model, moe.num_experts, moe.expert_d_ff
    old_prefix, gate, up, down = _LEGACY[arch]
    out = {}
    for i in layers:
        names, ours = _moe_names(config, i), (f"layer_{i}", *prefix)
        old = f"model.layers.{i}.{old_prefix}.experts."
        if available is not None and old + "0." + gate + ".weight" in available:  # one tensor per expert
            def stack(name, e_count=E, old=old):
                return tuple(f"{old}{e}.{name}.weight" for e in range(e_count))
            out[(*ours, "wi_gate")] = Source(stack(gate), lambda *g: np.stack(g).transpose(0, 2, 1), (E, D, F))
            out[(*ours, "wi_up")] = Source(stack(up), lambda *u: np.stack(u).transpose(0, 2, 1), (E, D, F))
            out[(*ours, "wo")] = Source(stack(down), lambda *d: np.stack(d).transpose(0, 2, 1), (E, F, D))
            continue
        gate_up, down_name = names["gate_up"], names["down"]
        out[(*ours, "wi_gate")] = Source((gate_up,), functools.partial(_fused_half, name=gate_up, shape=(E, 2 * F, D),
                                                                       half=0), (E, D, F))
        out[(*ours, "wi_up")] = Source((gate_up,), functools.partial(_fused_half, name=gate_up, shape=(E, 2 * F, D),
                                                                     half=1), (E, D, F))
        out[(*ours, "wo")] = Source((down_name,), functools.partial(_checked_t, name=down_name, shape=(E, D, F)),
                                    (E, F, D))
    return out


def _checked_t(array, name, shape):
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}; expected {shape}")
    return array.transpose(0, 2, 1)


def _fused_half(array, name, shape, half):
    """gate_up_proj [E, 2F, D] -> its gate (half 0) or up (half 1) part as [E, D, F]."""
    F = shape[1] // 2
    return _checked_t(array, name, shape)[..., half * F:(half + 1) * F]


def sources(config: GPTConfig, available=None, *, arch: str | None = None) -> dict:
    """Per-parameter sources of a Mixtral / Qwen3-MoE checkpoint (see models/convert/sources.py)."""
    arch = arch or ("Qwen3MoeForCausalLM" if config.block.qk_norm else "MixtralForCausalLM")
    prefix = _LEGACY[arch][0]
    D, E = config.block.d_model, config.block.moe.num_experts
    out = llama.layout_sources(_dense_layout(config))
    for i in range(config.num_layers):
        name = _moe_names(config, i)["router"]
        if available is not None and prefix != "mlp" and name not in available:
            name = f"model.layers.{i}.{prefix}.gate.weight"
        out[(f"layer_{i}", "mlp", "router")] = Source((name,), functools.partial(_router, name=name, shape=(E, D)),
                                                      (D, E))
    out.update(expert_sources(config, range(config.num_layers), available, arch))
    return out


def _router(array, name, shape):
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}; expected {shape}")
    return array.T


def hf_to_params(state_dict: Mapping[str, Any], config: GPTConfig, *, arch: str | None = None) -> dict:
    """Our params from a HF Mixtral / Qwen3-MoE state dict (fused or per-expert tensors).

    Args:
      state_dict: HF name -> torch tensor or array.
      config: from `config_from_hf`.
      arch: "MixtralForCausalLM" or "Qwen3MoeForCausalLM"; only needed to read per-expert
        tensors (None: inferred from config.block.qk_norm, which only Qwen3-MoE has).

    Returns:
      The nested params dict for `GPT(config)`.

    Raises:
      ValueError: naming every missing, unexpected or misshapen tensor.
    """
    arch = arch or ("Qwen3MoeForCausalLM" if config.block.qk_norm else "MixtralForCausalLM")
    sd = _fuse_per_expert(state_dict, config, arch)
    dense_names = {name for name, *_ in _dense_layout(config)}
    moe_names = {n for i in range(config.num_layers) for n in _moe_names(config, i).values()}
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    check_names(sd, dense_names | moe_names, optional)
    params = llama.load_layout(sd, _dense_layout(config), config)
    mlp = materialize({p: s for p, s in sources(config, set(sd), arch=arch).items() if p[1:2] == ("mlp",)}, sd)
    dtype = config.block.param_dtype
    for layer, tree in mlp.items():
        params[layer]["mlp"] = {k: jnp.asarray(v, dtype) for k, v in tree["mlp"].items()}
    return params


def params_to_hf(params: Mapping[str, Any], config: GPTConfig, *, include_tied: bool = True) -> dict[str, np.ndarray]:
    """A HF state dict (numpy float32, fused expert tensors) from our params.

    Args:
      params: as from `hf_to_params` or training.
      config: the model's config.
      include_tied: with tied embeddings also emit `lm_head.weight`.
    """
    sd = llama.dump_layout(params, _dense_layout(config), config, include_tied=include_tied)
    moe = config.block.moe
    D, E, F = config.block.d_model, moe.num_experts, moe.expert_d_ff
    for i in range(config.num_layers):
        names, mlp = _moe_names(config, i), params[f"layer_{i}"]["mlp"]
        arrays = {k: np.asarray(mlp[k], np.float32) for k in ("router", "wi_gate", "wi_up", "wo")}
        for key, shape in (("router", (D, E)), ("wi_gate", (E, D, F)), ("wi_up", (E, D, F)), ("wo", (E, F, D))):
            if arrays[key].shape != shape:
                raise ValueError(f"param layer_{i}/mlp/{key} has shape {arrays[key].shape}; expected {shape}")
        sd[names["router"]] = np.ascontiguousarray(arrays["router"].T)
        sd[names["gate_up"]] = np.ascontiguousarray(
            np.concatenate([arrays["wi_gate"], arrays["wi_up"]], -1).transpose(0, 2, 1))
        sd[names["down"]] = np.ascontiguousarray(arrays["wo"].transpose(0, 2, 1))
    return sd
