"""Hugging Face checkpoints in and out: `load_pretrained(directory)`, `save_pretrained(...)`.

    model, params = hf.load_pretrained("path/to/llama")      # config.json + *.safetensors
    logits = model.apply({"params": params}, input_ids)      # == transformers' first output
    hf.save_pretrained(model, params, "out/")               # transformers.from_pretrained("out/")

    # A plain encoder (e.g. all-MiniLM-L6-v2) under a freshly initialized task head:
    model, params = hf.load_pretrained("path/to/minilm", head="classification", num_labels=2)
    # A causal LM under a fresh reward head (`GPTConfig.head="score"`):
    model, params = hf.load_pretrained("path/to/llama", head="score")

Supported architectures: BertModel, BertForMaskedLM, BertForSequenceClassification (single-label),
BertForQuestionAnswering, GPT2LMHeadModel, LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM, DeepseekV3ForCausalLM,
and the reward models LlamaForSequenceClassification, Qwen2ForSequenceClassification and
Qwen3ForSequenceClassification (a `score` head: our scores at every position, transformers'
logits the one at the last non-padding token; `save_pretrained` writes the `pad_token_id` it
finds that token by).
Weights come from `model.safetensors` or from the shards listed in
`model.safetensors.index.json`. The per-family tensor maps live in `models/convert/`; this
module only reads and writes files and picks the family.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import numpy as np
from safetensors.numpy import load_file, save_file

from models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
from models.bert import scan_params as bert_scan_params
from models.bert import unscan_params as bert_unscan_params
from models.convert import bert as bert_convert
from models.convert import deepseek as deepseek_convert
from models.convert import gpt2 as gpt2_convert
from models.convert import llama as llama_convert
from models.convert import moe as moe_convert
from models.convert import peft as peft_convert
from models.convert import sources as sources_lib
from models.gpt import GPT, GPTConfig, layer_groups, scan_params, unscan_params

DECODERS = (*llama_convert.ARCHITECTURES, *moe_convert.ARCHITECTURES, *deepseek_convert.ARCHITECTURES)
# The decoder heads (`models.gpt.HEADS`) `head=` may ask of a decoder checkpoint.
DECODER_HEADS = ("lm", "score", "lm_score")
BERTS = {"BertModel": "base", "BertForMaskedLM": "mlm", "BertForSequenceClassification": "classification",
         "BertForQuestionAnswering": "qa"}
BERT_CLASSES = {"base": BertModel, "mlm": BertForMaskedLM, "classification": BertForSequenceClassification,
                "qa": BertForQuestionAnswering}
SUPPORTED = (*BERTS, "GPT2LMHeadModel", *DECODERS)
INDEX = "model.safetensors.index.json"


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no config.json: expected a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a model directory: one `model.safetensors` or the shards of its index."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory!r} has neither model.safetensors nor {INDEX} "
                                "(PyTorch .bin checkpoints: convert them with transformers' save_pretrained)")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"safetensors shard {path} is missing (listed in {INDEX}); download it again")
        try:
            tensors.update(load_file(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
            detail = " ".join(str(e).split())
            raise ValueError(f"safetensors shard {path} is truncated or corrupt ({detail}); download or save it "
                             "again") from None
    return tensors


def _architecture(hf_config: dict[str, Any]) -> str:
    names = hf_config.get("architectures") or []
    for name in names:
        if name in SUPPORTED:
            return name
    raise ValueError(f"unsupported architecture {names or hf_config.get('model_type')!r}; "
                     f"supported: {', '.join(SUPPORTED)}")


def load_pretrained(directory: str, adapter: str | None = None, *, head: str | None = None,
                    num_labels: int | None = None, seed: int = 0, verify: bool = False,
                    **overrides) -> tuple[nn.Module, dict]:
    """(flax model, params) of a Hugging Face model directory.

    Args:
      directory: holds config.json and model.safetensors (or sharded safetensors + index).
      adapter: a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
        to put on the model (`models.convert.peft.load_adapter`): the outputs are then
        `peft.PeftModel.from_pretrained(base, adapter)`'s.
      head: the head to return; None is the checkpoint's own. BERT: "base", "mlm",
        "classification", "qa"; decoders (LLaMA / Qwen): "lm", "score" (a reward model),
        "lm_score" (a policy with a value head). A head the checkpoint lacks (a BertModel
        directory such as all-MiniLM-L6-v2 loaded with head="classification", a causal LM
        loaded with head="score") is freshly initialized as transformers does (normal(0, 0.02)
        weights, zero biases); the other heads' tensors are dropped.
      num_labels: classes of the classification head (outputs of a decoder's score head);
        None: the checkpoint's (config.json's `id2label` / `num_labels`, 2 when neither is
        given; 1 for a fresh score head). A classification checkpoint with another count is an
        error.
      seed: seed of the freshly initialized head.
      verify: also build the transformers model from `directory` (when transformers is
        installed) and compare logits on a probe batch (`models.hf_verify`); raises
        ValueError naming the worst tensor and logit difference if they disagree (the base
        model, before any adapter).
      **overrides: config fields: for the decoder families dtype, param_dtype, remat,
        scan_layers (the params then come stacked, see `models.gpt.scan_params`), ...;
        for BERT remat and scan_layers.

    Returns:
      The model and its parameters: `model.apply({'params': params}, ids)` returns the
      transformers model's first output (logits; start and end logits for question answering;
      BertModel's last hidden state and pooled output).
    """
    hf_config = _read_config(directory)
    arch = _architecture(hf_config)
    tensors = read_safetensors(directory)
    scan = overrides.pop("scan_layers", False)
    if arch not in BERTS:
        model = model_of(directory, head=head, num_labels=num_labels, **overrides)
        model, params = _load_decoder(arch, model.config, _decoder_head_tensors(tensors, model.config, seed,
                                                                                directory))
        if scan:
            model, params = GPT(dataclasses.replace(model.config, scan_layers=True)), scan_params(params, model.config)
    else:
        model = model_of(directory, head=head, num_labels=num_labels, scan_layers=scan, **overrides)
        config, own, head = dataclasses.replace(model.config, scan_layers=False), BERTS[arch], _head_of(model)
        if head != own:
            tensors, fresh = bert_convert.head_tensors(tensors, config, head, getattr(model, "num_labels", 2), seed)
            logging.getLogger(__name__).info("%s: freshly initialized %s", directory, ", ".join(fresh))
        params = bert_convert.hf_to_params(tensors, config, head)
        params = bert_scan_params(params, model.config) if scan else params
    if verify:
        from models import hf_verify

        hf_verify.against_transformers(directory, model, params)
    return peft_convert.load_adapter(model, params, adapter) if adapter else (model, params)


def model_of(directory: str, *, head: str | None = None, num_labels: int | None = None, **overrides) -> nn.Module:
    """The flax model of `directory`'s config.json, without reading any weights.

    Args:
      directory: a Hugging Face model directory.
      head, num_labels, **overrides: as for `load_pretrained` (BERT: remat and scan_layers only).
    """
    hf_config = _read_config(directory)
    arch = _architecture(hf_config)
    if arch in BERTS:
        unknown = sorted(set(overrides) - {"remat", "scan_layers"})
        if unknown:
            raise ValueError(f"{arch} takes the overrides remat and scan_layers only; got {unknown}")
        config = dataclasses.replace(bert_convert.config_from_hf(hf_config), **overrides)
        own = BERTS[arch]
        head = own if head is None else head
        if head not in BERT_CLASSES:
            raise ValueError(f"head={head!r}; expected one of {tuple(BERT_CLASSES)}")
        labels = num_labels_from_hf(hf_config, directory) if own == "classification" else None
        if labels is not None and num_labels not in (None, labels):
            raise ValueError(f"{directory!r} holds a classifier of {labels} labels, not num_labels={num_labels}; "
                             'drop num_labels or load with head="base" and train a new head')
        if head == "classification":
            return BertForSequenceClassification(config, num_labels=num_labels or labels or 2)
        return BERT_CLASSES[head](config)
    scan = overrides.pop("scan_layers", False)
    config = _decoder_module(arch).config_from_hf(hf_config, **overrides)
    config = dataclasses.replace(config, scan_layers=scan, **_decoder_head(arch, config, head, num_labels, directory))
    return GPT(config)


def _decoder_head(arch: str, config: GPTConfig, head: str | None, num_labels: int | None,
                  directory: str) -> dict[str, Any]:
    """The GPTConfig head fields for `head` / `num_labels` asked of a decoder checkpoint
    (`models.convert.llama.head_fields`; LLaMA / Qwen trunks only)."""
    if head not in (None, *DECODER_HEADS):
        raise ValueError(f"head={head!r}; a decoder ({arch}) takes one of {DECODER_HEADS}")
    if head in (None, config.head) and num_labels is None:
        return {}
    if arch not in llama_convert.ARCHITECTURES:
        raise ValueError(f"head and num_labels apply to BERT and LLaMA / Qwen checkpoints; {directory!r} holds {arch}")
    return llama_convert.head_fields(config, head, num_labels, f"{directory!r} ({arch})")


def _decoder_head_tensors(tensors: dict[str, np.ndarray], config: GPTConfig, seed: int,
                          directory: str) -> dict[str, np.ndarray]:
    tensors, fresh = llama_convert.head_tensors(tensors, config, seed)
    if fresh:
        logging.getLogger(__name__).info("%s: freshly initialized %s", directory, ", ".join(fresh))
    return tensors


def _head_of(model: nn.Module) -> str:
    return next(head for head, cls in BERT_CLASSES.items() if type(model) is cls)


def num_labels_from_hf(hf_config: dict[str, Any], directory: str = "") -> int:
    """Classes of a BertForSequenceClassification config.json, as transformers reads them.

    Only single-label classification is supported: `problem_type` regression or multi-label (or
    a single label, which transformers treats as regression) is an error.
    """
    id2label = hf_config.get("id2label")
    labels = len(id2label) if id2label else int(hf_config.get("num_labels", 2))
    problem = hf_config.get("problem_type")
    if problem not in (None, "single_label_classification") or labels < 2:
        raise ValueError(f"{directory or 'config.json'}: problem_type={problem!r} with {labels} label(s); only "
                         "single-label classification (problem_type single_label_classification, 2 or more "
                         "labels) is supported")
    return labels


def param_sources(directory: str, model: nn.Module, available: set[str]) -> dict:
    """{param path: `models.convert.sources.Source`} of `model` (as `model_of(directory)`
    builds it, maybe with PEFT or a task head on top) from the checkpoint's tensors.

    Args:
      directory: the Hugging Face directory (its config.json picks the family).
      model: the flax model whose params are wanted.
      available: the names of the checkpoint's tensors (`SafetensorsReader.names()`).
    """
    arch = _architecture(_read_config(directory))
    config = model.config
    scan = config.scan_layers
    if scan:
        config = dataclasses.replace(config, scan_layers=False)
    if arch in BERTS:
        # The model's head (a task head on a plain encoder included): every parameter whose
        # tensor the checkpoint holds; the rest (a fresh classifier / qa_outputs) keep their init.
        head = _head_of(model) if type(model) in BERT_CLASSES.values() else BERTS[arch]
        found = bert_convert.sources(config, available, head=head)
        if available is not None:
            found = {p: s for p, s in found.items() if all(name in available for name in s.reads)}
        # BERT stacks all its layers under `layers` (models.bert.scan_params).
        return sources_lib.stacked(found, [("layers", 0, config.num_layers)]) if scan else found
    module = _decoder_module(arch)
    found = module.sources(config, available, arch=arch) if module is moe_convert else module.sources(config, available)
    return sources_lib.stacked(found, layer_groups(config)) if scan else found


def _decoder_module(arch: str):
    if arch in moe_convert.ARCHITECTURES:
        return moe_convert
    if arch in deepseek_convert.ARCHITECTURES:
        return deepseek_convert
    return gpt2_convert if arch == "GPT2LMHeadModel" else llama_convert


def _load_decoder(arch: str, config: GPTConfig, tensors) -> tuple[GPT, dict]:
    """A decoder family's model and per-layer params (`config` as `model_of` builds it)."""
    module = _decoder_module(arch)
    if module is moe_convert:
        return GPT(config), moe_convert.hf_to_params(tensors, config, arch=arch)
    return GPT(config), module.hf_to_params(tensors, config)


def _rope_parameters(config: GPTConfig) -> dict[str, Any]:
    rope = config.block.rope
    out: dict[str, Any] = {"rope_type": rope.scaling, "rope_theta": rope.theta}
    if rope.scaling != "default":
        out["factor"] = rope.factor
    if rope.scaling in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = rope.original_max_len
    if rope.scaling == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.scaling == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(rope, key) is not None:
                out[key] = getattr(rope, key)
    return out


def decoder_architecture(config: GPTConfig) -> str:
    """Which transformers class computes the same function as this GPTConfig (a score head: the
    LLaMA / Qwen trunk's *ForSequenceClassification)."""
    arch = _causal_architecture(config)
    if config.head == "lm":
        return arch
    classifier = {lm: name for name, lm in llama_convert.SEQUENCE_CLASSIFIERS.items()}.get(arch)
    if config.head != "score" or classifier is None:
        raise ValueError(f"head={config.head!r} on a {arch} trunk has no transformers class (there is a "
                         "*ForSequenceClassification for LLaMA and Qwen trunks under a score head alone)")
    return classifier


def _causal_architecture(config: GPTConfig) -> str:
    b = config.block
    if config.positional == "learned":
        return "GPT2LMHeadModel"
    if b.mla is not None:
        return "DeepseekV3ForCausalLM"
    if b.moe is not None:
        return "Qwen3MoeForCausalLM" if b.qk_norm else "MixtralForCausalLM"
    if b.qk_norm:
        return "Qwen3ForCausalLM"
    if b.has_qkv_bias and not b.has_out_bias and not b.has_mlp_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def _decoder_hf_config(config: GPTConfig, pad_token_id: int | None = None) -> dict[str, Any]:
    b, arch = config.block, decoder_architecture(config)
    if arch in llama_convert.SEQUENCE_CLASSIFIERS:  # the causal LM's keys, another class and its labels
        out = _decoder_hf_config(dataclasses.replace(config, head="lm"))
        labels = {str(i): f"LABEL_{i}" for i in range(config.num_scores)}
        return out | {"architectures": [arch], "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()},
                      "pad_token_id": pad_token_id}
    if arch == "GPT2LMHeadModel":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[b.mlp_activation]
        return {"architectures": [arch], "model_type": "gpt2", "vocab_size": config.vocab_size,
                "n_embd": b.d_model, "n_head": b.num_heads, "n_layer": config.num_layers, "n_inner": b.d_ff,
                "n_positions": config.max_len, "activation_function": act, "layer_norm_epsilon": b.norm_eps,
                "tie_word_embeddings": config.tie_embeddings}
    if arch == "DeepseekV3ForCausalLM":
        return _deepseek_hf_config(config)
    if b.moe is not None:
        return _moe_hf_config(config, arch)
    out = {"architectures": [arch], "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                                   "Qwen3ForCausalLM": "qwen3"}[arch],
           "vocab_size": config.vocab_size, "hidden_size": b.d_model, "intermediate_size": b.d_ff,
           "num_hidden_layers": config.num_layers, "num_attention_heads": b.num_heads,
           "num_key_value_heads": b.kv_heads, "head_dim": b.head_size, "rms_norm_eps": b.norm_eps,
           "max_position_embeddings": config.max_len, "tie_word_embeddings": config.tie_embeddings,
           "hidden_act": "silu", "rope_parameters": _rope_parameters(config)}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=b.has_qkv_bias, mlp_bias=b.has_mlp_bias)
    if arch == "Qwen3ForCausalLM":
        out["attention_bias"] = b.has_qkv_bias
    if arch != "LlamaForCausalLM":
        out.update(use_sliding_window=b.sliding_window is not None, sliding_window=b.sliding_window,
                   max_window_layers=0)
    return out


def _moe_hf_config(config: GPTConfig, arch: str) -> dict[str, Any]:
    b, moe = config.block, config.block.moe
    if moe.score_func != "softmax" or moe.num_shared_experts or moe.routed_scaling_factor != 1.0:
        raise ValueError(f"{arch} has softmax routing, no shared experts and routed_scaling_factor=1; "
                         f"got {moe}")
    if arch == "MixtralForCausalLM" and not moe.norm_topk_prob:
        raise ValueError("MixtralForCausalLM always renormalises the top-k weights; norm_topk_prob=False has "
                         "no Mixtral equivalent")
    out = {"architectures": [arch], "vocab_size": config.vocab_size, "hidden_size": b.d_model,
           "num_hidden_layers": config.num_layers, "num_attention_heads": b.num_heads,
           "num_key_value_heads": b.kv_heads, "head_dim": b.head_size, "rms_norm_eps": b.norm_eps,
           "max_position_embeddings": config.max_len, "tie_word_embeddings": config.tie_embeddings,
           "hidden_act": "silu", "rope_parameters": _rope_parameters(config),
           "num_experts_per_tok": moe.num_experts_per_tok, "router_aux_loss_coef": moe.aux_loss_weight,
           "sliding_window": b.sliding_window}
    if arch == "MixtralForCausalLM":
        out.update(model_type="mixtral", intermediate_size=moe.expert_d_ff, num_local_experts=moe.num_experts)
    else:
        out.update(model_type="qwen3_moe", intermediate_size=moe.expert_d_ff, moe_intermediate_size=moe.expert_d_ff,
                   num_experts=moe.num_experts, norm_topk_prob=moe.norm_topk_prob, attention_bias=b.has_qkv_bias,
                   use_sliding_window=b.sliding_window is not None, max_window_layers=0, mlp_only_layers=[],
                   decoder_sparse_step=1)
    return out


def _deepseek_hf_config(config: GPTConfig) -> dict[str, Any]:
    """DeepseekV3Config keys. Multi-token prediction modules (mtp_depth) are not written:
    transformers' DeepseekV3ForCausalLM has none."""
    b, moe, mla = config.block, config.block.moe, config.block.mla
    if moe is None or moe.score_func != "sigmoid" or not moe.num_shared_experts or moe.shared_d_ff not in (
            None, moe.expert_d_ff):
        raise ValueError("DeepseekV3ForCausalLM has a sigmoid-scored MoE with shared experts as wide as the routed "
                         f"ones; got {moe}")
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": config.vocab_size,
            "hidden_size": b.d_model, "intermediate_size": b.d_ff, "moe_intermediate_size": moe.expert_d_ff,
            "num_hidden_layers": config.num_layers, "num_attention_heads": b.num_heads,
            "num_key_value_heads": b.num_heads, "n_shared_experts": moe.num_shared_experts,
            "n_routed_experts": moe.num_experts, "routed_scaling_factor": moe.routed_scaling_factor,
            "kv_lora_rank": mla.kv_lora_rank, "q_lora_rank": mla.q_lora_rank,
            "qk_rope_head_dim": mla.qk_rope_head_dim, "v_head_dim": mla.v_head_dim,
            "qk_nope_head_dim": mla.qk_nope_head_dim, "n_group": moe.n_group, "topk_group": moe.topk_group,
            "num_experts_per_tok": moe.num_experts_per_tok, "first_k_dense_replace": config.first_dense_layers,
            "norm_topk_prob": moe.norm_topk_prob, "hidden_act": "silu", "max_position_embeddings": config.max_len,
            "rms_norm_eps": b.norm_eps, "tie_word_embeddings": config.tie_embeddings,
            "rope_parameters": _rope_parameters(config), "rope_interleave": b.rope.interleaved,
            "attention_bias": b.has_qkv_bias, "num_nextn_predict_layers": 0}


def _bert_hf_config(config: BertConfig, arch: str, id2label: dict[int, str] | None = None) -> dict[str, Any]:
    b = config.block
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[b.mlp_activation]
    labels = {}
    if id2label is not None:
        labels = {"id2label": {str(i): name for i, name in id2label.items()},
                  "label2id": {name: i for i, name in id2label.items()},
                  "problem_type": "single_label_classification"}
    return labels | {"architectures": [arch], "model_type": "bert", "vocab_size": config.vocab_size,
            "hidden_size": b.d_model, "num_hidden_layers": config.num_layers, "num_attention_heads": b.num_heads,
            "intermediate_size": b.d_ff, "hidden_act": act, "max_position_embeddings": config.max_len,
            "type_vocab_size": config.type_vocab_size, "layer_norm_eps": b.norm_eps, "pad_token_id": config.pad_id}


def to_hf(model: nn.Module, params, id2label: dict[int, str] | None = None, pad_token_id: int | None = None
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, HF name -> numpy float32 tensor) of a model and its params, as
    `save_pretrained` writes them (tied copies left out); `id2label` names a classifier's classes,
    `pad_token_id` is a reward model's (a decoder under a score head)."""
    params = nn.unbox(params)
    if id2label is not None and not isinstance(model, BertForSequenceClassification):
        raise ValueError(f"id2label applies to BertForSequenceClassification, not {type(model).__name__}")
    if isinstance(model, tuple(BERT_CLASSES.values())):
        head = _head_of(model)
        arch = next(name for name, h in BERTS.items() if h == head)
        config = model.config
        if config.scan_layers:  # converters read the per-layer layout
            params, config = bert_unscan_params(params, config), dataclasses.replace(config, scan_layers=False)
        if head == "classification":
            id2label = id2label or {i: f"LABEL_{i}" for i in range(model.num_labels)}
            if sorted(id2label) != list(range(model.num_labels)):
                raise ValueError(f"id2label has ids {sorted(id2label)}; the model has {model.num_labels} labels")
        return _bert_hf_config(config, arch, id2label), bert_convert.params_to_hf(params, config, head)
    if isinstance(model, GPT):
        config = model.config
        if config.scan_layers:  # converters read the per-layer layout
            params, config = unscan_params(params, config), dataclasses.replace(config, scan_layers=False)
        hf_config = _decoder_hf_config(config, pad_token_id)
        convert = _decoder_module(hf_config["architectures"][0])
        return hf_config, convert.params_to_hf(params, config, include_tied=False)
    raise ValueError(f"save_pretrained supports {', '.join(BERTS)} and GPT, not {type(model).__name__}")


def check_exportable(model: nn.Module) -> None:
    """Raises ValueError if `save_pretrained` cannot write `model` (no transformers class
    computes it), from its config alone."""
    if isinstance(model, tuple(BERT_CLASSES.values())):
        return
    if not isinstance(model, GPT):
        raise TypeError(f"save_pretrained supports {', '.join(BERTS)} and GPT, not {type(model).__name__}")
    config = dataclasses.replace(model.config, scan_layers=False)
    try:
        arch = _decoder_hf_config(config)["architectures"][0]
    except ValueError as e:
        raise ValueError(f"this model has no Hugging Face equivalent: {e}") from None
    module = _decoder_module(arch)
    try:
        module.sources(config) if module is not moe_convert else module.sources(config, arch=arch)
    except ValueError as e:
        raise ValueError(f"this model has no Hugging Face equivalent ({arch} is the nearest): {e}") from None


def save_pretrained(model: nn.Module, params, directory: str, *, id2label: dict[int, str] | None = None,
                    pad_token_id: int | None = None) -> None:
    """Writes config.json and model.safetensors that transformers loads to the same outputs.

    Refuses to write into a directory that already holds a config.json or weights, so that
    nothing saved is overwritten.

    Args:
      model, params: what `load_pretrained` returns (or a trained copy).
      directory: where to write.
      id2label: BertForSequenceClassification only: class id -> name, written as config.json's
        `id2label` / `label2id` (default LABEL_0, LABEL_1, ... as transformers names them).
      pad_token_id: a reward model (a decoder under a score head) only, and required: the id
        transformers' *ForSequenceClassification skips to find a row's last token (the rightmost
        token that is not it; lmlab scores the token at the row's length - 1, the same token
        whenever a row does not end with the padding token).
    """
    existing = [f for f in ("config.json", "model.safetensors", INDEX) if os.path.exists(os.path.join(directory, f))]
    if existing:
        raise FileExistsError(f"{directory!r} already holds {existing}; choose an empty directory")
    scorer = isinstance(model, GPT) and model.config.head == "score"
    if scorer and pad_token_id is None:
        raise ValueError("save_pretrained of a reward model (head='score') needs pad_token_id: transformers' "
                         "*ForSequenceClassification finds each row's last token by it (the tokenizer's pad id)")
    if pad_token_id is not None and not scorer:
        raise ValueError(f"pad_token_id applies to a reward model (a decoder with head='score'), not this "
                         f"{type(model).__name__}")
    extra = {} if id2label is None else {"id2label": id2label}  # to_hf(model, params) for every other model
    if pad_token_id is not None:
        extra["pad_token_id"] = pad_token_id
    hf_config, tensors = to_hf(model, params, **extra)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
