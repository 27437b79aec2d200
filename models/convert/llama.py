"""Hugging Face LLaMA / Qwen2 / Qwen3 checkpoints <-> lmlab `GPT` params.

Axis letters: D model width, N query heads, K key/value heads, H head dim, F hidden, V vocab.

torch `nn.Linear` weights are [out, in]; ours are [in, ...out] with the heads split out:
`q_proj.weight` [N*H, D] -> `query` [D, N, H], `o_proj.weight` [D, N*H] -> `out` [N, H, D].
The rows of q_proj/k_proj are already in the order that HF's rotate-half RoPE expects,
and our `RopeConfig(interleaved=False)` rotates the same halves, so no permutation is
needed (the permutation in HF's convert_llama_weights_to_hf.py is for Meta's originals).

    config = config_from_hf(hf_model.config.to_dict())
    params = hf_to_params(hf_model.state_dict(), config)
    logits = GPT(config).apply({"params": params}, ids)

This module needs neither torch nor transformers: state dicts are mappings of name to
array (torch tensors are read through numpy) and `params_to_hf` returns numpy arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.convert.sources import Source, materialize, to_numpy
from models.gpt import GPTConfig, llama_config, qwen2_config, qwen3_config
from models.layers.positional import rope_config_from_hf

CAUSAL_LMS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# The same trunks under transformers' `score` head (a reward model, num_labels = 1): a Linear
# [num_labels, D] without bias on the final normed hidden states, no LM head (`GPTConfig.head="score"`).
SEQUENCE_CLASSIFIERS = {"LlamaForSequenceClassification": "LlamaForCausalLM",
                        "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
                        "Qwen3ForSequenceClassification": "Qwen3ForCausalLM"}
ARCHITECTURES = (*CAUSAL_LMS, *SEQUENCE_CLASSIFIERS)
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Defaults of the transformers config classes, for keys a config.json may omit.
_DEFAULTS = {
    "LlamaForCausalLM": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "Qwen2ForCausalLM": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "Qwen3ForCausalLM": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def match_architecture(hf: Mapping[str, Any], architectures: tuple[str, ...], model_types: Mapping[str, str]) -> str:
    """Which of `architectures` a HF config dict describes, by its `architectures` list or its
    `model_type` (mapped through `model_types`)."""
    names = list(hf.get("architectures") or []) + [model_types.get(hf.get("model_type"), "")]
    for name in names:
        if name in architectures:
            return name
    raise ValueError(f"unsupported Hugging Face model (architectures={hf.get('architectures')}, "
                     f"model_type={hf.get('model_type')!r}); expected one of {architectures}")


def _architecture(hf: Mapping[str, Any]) -> str:
    return match_architecture(hf, ARCHITECTURES, _MODEL_TYPES)


def num_labels_from_hf(hf: Mapping[str, Any]) -> int:
    """Outputs of a *ForSequenceClassification's `score` head, as transformers reads them:
    `id2label`'s length, else `num_labels`, else 2 (PretrainedConfig's default)."""
    id2label = hf.get("id2label")
    return len(id2label) if id2label else int(hf.get("num_labels", 2))


def _rope_theta(hf: Mapping[str, Any], default: float) -> float:
    """rope_theta from transformers 5's `rope_parameters` or 4.x's top-level keys."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    return float(rope.get("rope_theta", hf.get("rope_theta", default)))


def _rope(hf: Mapping[str, Any], head_dim: int, default_theta: float):
    """The RopeConfig (scalings included: linear, dynamic, yarn, llama3) of a HF config."""
    return rope_config_from_hf({**hf, "rope_theta": _rope_theta(hf, default_theta)}, head_dim)


def _sliding_window(hf: Mapping[str, Any]) -> int | None:
    """One window for every layer, or None; mixed full/sliding layers are not supported."""
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return None
    L = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", L) else "full_attention" for i in range(L)]
    if all(t == "sliding_attention" for t in types):
        return int(hf["sliding_window"])
    if all(t == "full_attention" for t in types):
        return None
    raise ValueError(f"layer_types={types} mixes full and sliding attention; GPTConfig has one sliding_window "
                     f"for all layers")


def preset_kwargs(hf: Mapping[str, Any], defaults: Mapping[str, Any], required) -> tuple[dict, int]:
    """The preset arguments every LLaMA-style decoder shares (sizes, heads, norm, RoPE base,
    context, tying) from a HF config dict, and the head dim; checks `required` keys and SiLU."""
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face config lacks {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is converted")
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or D // N
    kwargs = {
        "vocab_size": hf["vocab_size"], "d_model": D, "num_layers": hf["num_hidden_layers"], "num_heads": N,
        "num_kv_heads": hf.get("num_key_value_heads") or N, "head_dim": None if head_dim * N == D else head_dim,
        "norm_eps": float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        "rope_theta": _rope_theta(hf, defaults["rope_theta"]),
        "max_len": hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    return kwargs, head_dim


def config_from_hf(hf: Mapping[str, Any], **overrides) -> GPTConfig:
    """The GPTConfig of a Hugging Face LLaMA / Qwen2 / Qwen3 causal LM config.

    Args:
      hf: the config as a dict (`hf_model.config.to_dict()` or a parsed config.json).
      **overrides: passed to the preset (dtype, param_dtype, remat, max_len, ...).

    Returns:
      A GPTConfig whose `GPT` computes the same logits as the Hugging Face model (a
      *ForSequenceClassification: `head="score"` with `num_scores` its labels, the scores at
      every position; transformers returns the one at the last non-padding token).
    """
    arch = _architecture(hf)
    classifier = arch in SEQUENCE_CLASSIFIERS
    arch = SEQUENCE_CLASSIFIERS.get(arch, arch)
    defaults = _DEFAULTS[arch]
    kwargs, head_dim = preset_kwargs(hf, defaults, _REQUIRED)
    kwargs["d_ff"] = hf["intermediate_size"]
    if arch == "LlamaForCausalLM":
        kwargs.update(attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)))
        config = llama_config(**kwargs, **overrides)
    elif arch == "Qwen2ForCausalLM":  # q, k, v always have biases; o_proj never does
        config = qwen2_config(**kwargs, sliding_window=_sliding_window(hf), **overrides)
    else:
        config = qwen3_config(attention_bias=bool(hf.get("attention_bias", False)),
                              sliding_window=_sliding_window(hf), **kwargs, **overrides)
    rope = _rope(hf, head_dim, defaults["rope_theta"])
    config = dataclasses.replace(config, block=dataclasses.replace(config.block, rope=rope))
    return dataclasses.replace(config, head="score", num_scores=num_labels_from_hf(hf)) if classifier else config


def head_fields(config: GPTConfig, head: str | None, num_labels: int | None, where: str) -> dict[str, Any]:
    """The GPTConfig fields (head, num_scores) of `head` / `num_labels` asked of a checkpoint whose
    own config is `config`: a causal LM takes any head (a score head is fresh, `num_labels` or 1
    outputs); a reward model only its own (it has no LM head), with its own label count."""
    own = config.head
    head = own if head is None else head
    if own == "score" and head != "score":
        raise ValueError(f"{where} is a reward model (a score head, no LM head); head={head!r} needs a causal LM "
                         "checkpoint (LlamaForCausalLM, Qwen2ForCausalLM, ...)")
    if own == "score" and num_labels not in (None, config.num_scores):
        raise ValueError(f"{where} is a reward model of {config.num_scores} label(s), not num_labels={num_labels}")
    if head == "lm" and num_labels is not None:
        raise ValueError(f"num_labels={num_labels} applies to a score head; head='lm' has none")
    return {"head": head, "num_scores": num_labels or (config.num_scores if own == "score" else 1)}


def head_tensors(state_dict: Mapping[str, Any], config: GPTConfig, seed: int = 0) -> tuple[dict, list[str]]:
    """A checkpoint's tensors for `config`'s head: the LM head dropped where it has none (a causal
    LM loaded as a reward model), a score head the checkpoint lacks drawn as transformers'
    `_init_weights` does (normal(0, 0.02), seeded). Returns (tensors, names made fresh)."""
    out, fresh = dict(state_dict), []
    if config.head == "score":
        out.pop("lm_head.weight", None)
    if config.head != "lm" and "score.weight" not in out:
        shape = (config.num_scores, config.block.d_model)
        out["score.weight"] = np.random.default_rng(seed).normal(0.0, 0.02, shape).astype(np.float32)
        fresh.append("score.weight")
    return out, fresh


def _layout(config: GPTConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], int]]:
    """(HF name, our param path, our shape, n_in) of every tensor.

    n_in > 0 marks a torch Linear weight: our first n_in axes are its input, the rest its
    output, so HF = ours.reshape(in, out).T. n_in == 0: the same values, maybe reshaped.
    """
    b = config.block
    D, N, K, H, F, V = b.d_model, b.num_heads, b.kv_heads, b.head_size, b.d_ff, config.vocab_size
    if config.positional != "rope" or b.norm != "rmsnorm" or b.mlp_activation != "swiglu" or b.norm_position != "pre":
        raise ValueError("the LLaMA layout needs positional='rope', norm='rmsnorm', mlp_activation='swiglu', "
                         "norm_position='pre' (see models.gpt.llama_config)")
    out = [("model.embed_tokens.weight", ("embed", "embedding"), (V, D), 0),
           ("model.norm.weight", ("final_norm", "scale"), (D,), 0)]
    if not config.tie_embeddings and config.head != "score":
        out.append(("lm_head.weight", ("lm_head",), (D, V), 1))
    if config.head != "lm":  # *ForSequenceClassification's score: nn.Linear(D, num_labels, bias=False)
        out.append(("score.weight", ("score",), (D, config.num_scores), 1))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layer_{i}"
        attn, mlp = "self_attention", "mlp"
        out += [
            (hf + "input_layernorm.weight", (ours, "attention_block", "norm", "scale"), (D,), 0),
            (hf + "post_attention_layernorm.weight", (ours, "mlp_block", "norm", "scale"), (D,), 0),
            (hf + "self_attn.q_proj.weight", (ours, attn, "query"), (D, N, H), 1),
            (hf + "self_attn.k_proj.weight", (ours, attn, "key"), (D, K, H), 1),
            (hf + "self_attn.v_proj.weight", (ours, attn, "value"), (D, K, H), 1),
            (hf + "self_attn.o_proj.weight", (ours, attn, "out"), (N, H, D), 2),
            (hf + "mlp.gate_proj.weight", (ours, mlp, "wi_gate"), (D, F), 1),
            (hf + "mlp.up_proj.weight", (ours, mlp, "wi_up"), (D, F), 1),
            (hf + "mlp.down_proj.weight", (ours, mlp, "wo"), (F, D), 1),
        ]
        if b.has_qkv_bias:
            out += [(hf + "self_attn.q_proj.bias", (ours, attn, "query_bias"), (N, H), 0),
                    (hf + "self_attn.k_proj.bias", (ours, attn, "key_bias"), (K, H), 0),
                    (hf + "self_attn.v_proj.bias", (ours, attn, "value_bias"), (K, H), 0)]
        if b.has_out_bias:
            out.append((hf + "self_attn.o_proj.bias", (ours, attn, "out_bias"), (D,), 0))
        if b.qk_norm:
            out += [(hf + "self_attn.q_norm.weight", (ours, attn, "query_norm"), (H,), 0),
                    (hf + "self_attn.k_norm.weight", (ours, attn, "key_norm"), (H,), 0)]
        if b.has_mlp_bias:
            out += [(hf + f"mlp.{name}_proj.bias", (ours, mlp, ours_name + "_bias"), (size,), 0)
                    for name, ours_name, size in (("gate", "wi_gate", F), ("up", "wi_up", F), ("down", "wo", D))]
    return out


def check_names(state_dict: Mapping[str, Any], expected: set[str], optional: set[str] = frozenset()) -> None:
    """Raises ValueError listing every missing and unexpected tensor name."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - set(optional))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing {missing}, unexpected {unexpected}")


def hf_to_params(state_dict: Mapping[str, Any], config: GPTConfig) -> dict:
    """Our params (stored in `config.block.param_dtype`) from a Hugging Face state dict.

    Args:
      state_dict: HF name -> torch tensor or array. With tied embeddings `lm_head.weight`
        may be present (torch's state_dict lists it) or absent (safetensors files).
      config: from `config_from_hf`.

    Returns:
      The nested params dict for `GPT(config).apply({"params": params}, ids)`.

    Raises:
      ValueError: naming every missing, unexpected or misshapen tensor.
    """
    layout = _layout(config)
    optional = {"lm_head.weight"} if config.tie_embeddings and config.head != "score" else set()
    check_names(state_dict, {name for name, *_ in layout}, optional)
    return load_layout(state_dict, layout, config)


def load_layout(state_dict: Mapping[str, Any], layout, config: GPTConfig) -> dict:
    """Our params for the tensors of `layout` (see `_layout`), shapes checked.

    With tied embeddings, a `lm_head.weight` in the state dict must equal the embedding.
    """
    params = materialize(layout_sources(layout), state_dict)
    dtype = config.block.param_dtype
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    tied_head = state_dict.get("lm_head.weight") if config.tie_embeddings and config.head != "score" else None
    if tied_head is not None and not np.array_equal(to_numpy(tied_head),
                                                    to_numpy(state_dict["model.embed_tokens.weight"])):
        raise ValueError("lm_head.weight differs from model.embed_tokens.weight but config.tie_embeddings=True; "
                         "convert with tie_word_embeddings=False")
    return params


def entry_to_ours(array: np.ndarray, name: str, shape: tuple[int, ...], n_in: int) -> np.ndarray:
    """One `_layout` entry's HF tensor -> our array: a torch Linear weight (n_in > 0) transposed
    to [in, out] and split into `shape`; anything else reshaped."""
    if n_in:
        hf_shape = (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
        if array.shape != hf_shape:
            raise ValueError(f"{name} has shape {array.shape}; expected {hf_shape}")
        array = array.T
    elif array.size != int(np.prod(shape)):
        raise ValueError(f"{name} has shape {array.shape}; expected {int(np.prod(shape))} values for {shape}")
    return array.reshape(shape)


def layout_sources(layout) -> dict[tuple[str, ...], Source]:
    """The per-parameter `Source` of every `_layout` entry."""
    return {path: Source((name,), functools.partial(entry_to_ours, name=name, shape=shape, n_in=n_in), shape)
            for name, path, shape, n_in in layout}


def sources(config: GPTConfig, available=None) -> dict[tuple[str, ...], Source]:
    """Per-parameter sources of a LLaMA / Qwen2 / Qwen3 checkpoint (see models/convert/sources.py)."""
    return layout_sources(_layout(config))


def params_to_hf(params: Mapping[str, Any], config: GPTConfig, *, include_tied: bool = True) -> dict[str, np.ndarray]:
    """A Hugging Face state dict (numpy float32 arrays, HF layouts) from our params.

    Args:
      params: as from `hf_to_params` or training.
      config: the model's config.
      include_tied: with tied embeddings, also emit `lm_head.weight` (what torch's
        `load_state_dict(strict=True)` wants; safetensors files leave it out).

    Returns:
      HF name -> array; `torch.from_numpy` each for `load_state_dict`.
    """
    return dump_layout(params, _layout(config), config, include_tied=include_tied)


def dump_layout(params: Mapping[str, Any], layout, config: GPTConfig, *, include_tied: bool) -> dict[str, np.ndarray]:
    """The HF tensors of `layout` (see `_layout`) from our params, shapes checked."""
    sd = {}
    for name, path, shape, n_in in layout:
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(node, np.float32)
        if array.shape != shape:
            raise ValueError(f"param {'/'.join(path)} has shape {array.shape}; expected {shape}")
        if n_in:
            array = array.reshape(int(np.prod(shape[:n_in])), -1).T
        elif len(shape) == 2 and name.endswith("bias"):
            array = array.reshape(-1)
        sd[name] = np.ascontiguousarray(array)
    if config.tie_embeddings and include_tied and config.head != "score":
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd
