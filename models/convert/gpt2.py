"""Hugging Face GPT-2 checkpoints <-> lmlab `GPT` params.

Axis letters: D model width, N heads, H head dim (N * H = D), F hidden, V vocab, P positions.

GPT-2 uses `Conv1D`, whose weights are [in, out] (the transpose of nn.Linear), and one
fused `c_attn` [D, 3D] whose columns are q, k, v in that order, each head-major
(n * H + h) as our [D, N, H] kernels are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.convert.llama import check_names
from models.convert.sources import Source, materialize
from models.gpt import GPTConfig
from models.layers.blocks import BlockConfig

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT2LMHeadModel config dict.

    Args:
      hf: `hf_model.config.to_dict()` or a parsed config.json.
      **overrides: further BlockConfig fields (dtype, param_dtype, ...).

    Returns:
      The GPTConfig (learned positions, pre-LN LayerNorm, biases, tied embeddings).
    """
    if "GPT2LMHeadModel" not in (hf.get("architectures") or []) and hf.get("model_type") != "gpt2":
        raise ValueError(f"not a GPT-2 config (architectures={hf.get('architectures')}, "
                         f"model_type={hf.get('model_type')!r})")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation_function={act!r}; expected one of {tuple(_ACTIVATIONS)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or \
            not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, "
                         "scale_attn_weights=False) are not converted")
    D = hf.get("n_embd", 768)
    block = {"d_model": D, "num_heads": hf.get("n_head", 12), "d_ff": hf.get("n_inner") or 4 * D,
                 "mlp_activation": _ACTIVATIONS[act], "norm": "layernorm", "norm_position": "pre",
                 "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "dropout_rate": 0.0, "use_bias": True}
    block.update(overrides)
    return GPTConfig(vocab_size=hf.get("vocab_size", 50257), block=BlockConfig(**block),
                     num_layers=hf.get("n_layer", 12), max_len=hf.get("n_positions", 1024),
                     tie_embeddings=hf.get("tie_word_embeddings", True), positional="learned")


def _names(config: GPTConfig) -> set[str]:
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(config.num_layers):
        names |= {f"transformer.h.{i}.{m}.{p}" for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                        "mlp.c_proj") for p in ("weight", "bias")}
    return names if config.tie_embeddings else names | {"lm_head.weight"}


def _check(config: GPTConfig) -> None:
    b = config.block
    if config.positional != "learned" or b.norm != "layernorm" or b.norm_position != "pre" or \
            b.kv_heads != b.num_heads or b.head_size * b.num_heads != b.d_model or b.mlp_activation not in \
            _ACTIVATIONS.values() or not (b.has_qkv_bias and b.has_out_bias and b.has_mlp_bias) or b.qk_norm:
        raise ValueError("the GPT-2 layout needs learned positions, pre-LN LayerNorm, all biases, N * H = D, "
                         "no GQA, no qk_norm and a plain MLP (see gpt2.config_from_hf)")


def sources(config: GPTConfig, available=None) -> dict[tuple[str, ...], Source]:
    """Per-parameter sources of a GPT2LMHeadModel checkpoint (see models/convert/sources.py):
    query/key/value and their biases are column slices of the fused c_attn."""
    _check(config)
    b = config.block
    D, N, H, F, V = b.d_model, b.num_heads, b.head_size, b.d_ff, config.vocab_size

    def one(name, shape, convert=lambda x: x):
        return Source((name,), convert, shape)

    def ln(prefix):
        return {"scale": one(prefix + ".weight", (D,)), "bias": one(prefix + ".bias", (D,))}

    tree = {"embed": {"embedding": one("transformer.wte.weight", (V, D))},
            "positions": {"embedding": one("transformer.wpe.weight", (config.max_len, D))},
            "final_norm": ln("transformer.ln_f")}
    if not config.tie_embeddings:
        tree["lm_head"] = one("lm_head.weight", (D, V), lambda x: x.T)
    for i in range(config.num_layers):
        h = f"transformer.h.{i}."
        attn = {}
        for j, name in enumerate(("query", "key", "value")):
            attn[name] = one(h + "attn.c_attn.weight", (D, N, H),
                             lambda w, j=j: w[:, j * D:(j + 1) * D].reshape(D, N, H))
            attn[name + "_bias"] = one(h + "attn.c_attn.bias", (N, H),
                                       lambda w, j=j: w[j * D:(j + 1) * D].reshape(N, H))
        attn["out"] = one(h + "attn.c_proj.weight", (N, H, D), lambda w: w.reshape(N, H, D))
        attn["out_bias"] = one(h + "attn.c_proj.bias", (D,))
        mlp = {"wi": one(h + "mlp.c_fc.weight", (D, F)), "wi_bias": one(h + "mlp.c_fc.bias", (F,)),
               "wo": one(h + "mlp.c_proj.weight", (F, D)), "wo_bias": one(h + "mlp.c_proj.bias", (D,))}
        tree[f"layer_{i}"] = {"attention_block": {"norm": ln(h + "ln_1")}, "mlp_block": {"norm": ln(h + "ln_2")},
                              "self_attention": attn, "mlp": mlp}
    return {tuple(k.key for k in path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Source))[0]}


def hf_to_params(state_dict: Mapping[str, Any], config: GPTConfig) -> dict:
    """Our params from a GPT2LMHeadModel state dict; ValueError names missing/unexpected tensors.

    With tied embeddings `lm_head.weight` may be present or not; `.attn.bias` and
    `.attn.masked_bias` causal-mask buffers of older transformers are ignored.
    """
    _check(config)
    sd = {k: v for k, v in state_dict.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    check_names(sd, _names(config), {"lm_head.weight"} if config.tie_embeddings else set())
    params = materialize(sources(config), sd)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, config.block.param_dtype), params)


def params_to_hf(params: Mapping[str, Any], config: GPTConfig, *, include_tied: bool = True) -> dict[str, np.ndarray]:
    """A GPT2LMHeadModel state dict (numpy float32) from our params; `include_tied` as in
    `models.convert.llama.params_to_hf`."""
    _check(config)
    D = config.block.d_model

    def a(x):
        return np.ascontiguousarray(np.asarray(x, np.float32))

    sd = {"transformer.wte.weight": a(params["embed"]["embedding"]),
          "transformer.wpe.weight": a(params["positions"]["embedding"]),
          "transformer.ln_f.weight": a(params["final_norm"]["scale"]),
          "transformer.ln_f.bias": a(params["final_norm"]["bias"])}
    for i in range(config.num_layers):
        layer, h = params[f"layer_{i}"], f"transformer.h.{i}."
        attn, mlp = layer["self_attention"], layer["mlp"]
        sd[h + "attn.c_attn.weight"] = a(np.concatenate([np.reshape(attn[k], (D, D))
                                                         for k in ("query", "key", "value")], axis=1))
        sd[h + "attn.c_attn.bias"] = a(np.concatenate([np.reshape(attn[k], (D,))
                                                       for k in ("query_bias", "key_bias", "value_bias")]))
        sd[h + "attn.c_proj.weight"] = a(np.reshape(attn["out"], (D, D)))
        sd[h + "attn.c_proj.bias"] = a(attn["out_bias"])
        sd[h + "mlp.c_fc.weight"], sd[h + "mlp.c_fc.bias"] = a(mlp["wi"]), a(mlp["wi_bias"])
        sd[h + "mlp.c_proj.weight"], sd[h + "mlp.c_proj.bias"] = a(mlp["wo"]), a(mlp["wo_bias"])
        for ln, ours in (("ln_1", "attention_block"), ("ln_2", "mlp_block")):
            sd[h + ln + ".weight"] = a(layer[ours]["norm"]["scale"])
            sd[h + ln + ".bias"] = a(layer[ours]["norm"]["bias"])
    if not config.tie_embeddings:
        sd["lm_head.weight"] = a(np.asarray(params["lm_head"]).T)
    elif include_tied:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd
