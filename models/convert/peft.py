"""PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) <-> lmlab LoRA params.

Axis letters: D model width, N heads, H head dim, V vocab, r rank.

peft stores, per adapted module `M` (a Hugging Face module name such as
`model.layers.0.self_attn.q_proj`), `base_model.model.M.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] (an Embedding: `lora_embedding_A` [r, V], `lora_embedding_B` [D, r]),
and with DoRA `...lora_magnitude_vector` [out]. Ours are A [*in, r], B [r, *out] and magnitude
[*out] with the kernel's axes split out, so peft's = ours.reshape(in, r).T, ours.reshape(r, out).T
and ours.reshape(out): the same flattening as the base kernels, taken from the family's
converter (`models/convert/{llama,bert}.py`). GPT-2's fused `c_attn` [D, 3D] has one A for
q, k and v; its B's rows are q's, then k's, then v's.

    save_adapter(model, params, "out/")                     # peft.PeftModel.from_pretrained(base, "out/")
    model, params = load_adapter(base_model, base_params, "adapter/")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from models import bert as bert_lib
from models import gpt as gpt_lib
from models.convert import bert as bert_convert
from models.convert import llama as llama_convert
from models.layers.peft import LoraConfig, PeftConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
BERT_CLASSES = {"BertModel": "base", "BertForMaskedLM": "mlm", "BertForSequenceClassification": "classification",
                "BertForQuestionAnswering": "qa"}


class Site(NamedTuple):
    """One kernel LoRA can adapt: our path, the HF module, its input axes, and for GPT-2's
    fused c_attn which third of the module's outputs it is (None: all)."""

    path: tuple[str, ...]
    module: str
    n_in: int
    embedding: bool = False
    part: int | None = None


def architecture(model) -> str:
    """The Hugging Face class of an lmlab model (the adapter's base)."""
    if isinstance(model, gpt_lib.GPT):
        from models.hf import decoder_architecture  # models.hf imports this module
        return decoder_architecture(model.config)
    name = type(model).__name__
    if name in BERT_CLASSES:
        return name
    raise ValueError(f"PEFT adapters are converted for GPT and BERT models, not {name}")


def _sites(model) -> list[Site]:
    arch = architecture(model)
    config = model.config
    if arch in llama_convert.ARCHITECTURES:
        out = []
        for name, path, _, n_in in llama_convert._layout(config):
            if path == ("embed", "embedding"):
                out.append(Site(path, name.removesuffix(".weight"), 1, embedding=True))
            elif n_in and name.endswith(".weight"):
                out.append(Site(path, name.removesuffix(".weight"), n_in))
        return out
    if arch == "GPT2LMHeadModel":
        return _gpt2_sites(config)
    if arch in BERT_CLASSES:
        head = BERT_CLASSES[arch]
        prefix = "" if head == "base" else "bert."
        n_ins = {"qkv": 1, "attn_out": 2, "linear": 1}
        out = []
        for name, path, kind in bert_convert._entries(config, head):
            module = prefix + name.removesuffix(".weight")
            if path[-2:] == ("word_embeddings", "embedding"):
                out.append(Site(path, module, 1, embedding=True))
            elif kind in n_ins and name.endswith(".weight") and path[-1] != "kernel":  # nn.Dense heads: no LoRA
                out.append(Site(path, module, n_ins[kind]))
        return out
    raise ValueError(f"PEFT adapters are converted for LLaMA, Qwen2, Qwen3, GPT-2 and BERT, not {arch}")


def _gpt2_sites(config) -> list[Site]:
    out = [Site(("embed", "embedding"), "transformer.wte", 1, embedding=True)]
    if not config.tie_embeddings:
        out.append(Site(("lm_head",), "lm_head", 1))
    for i in range(config.num_layers):
        h, ours = f"transformer.h.{i}.", f"layer_{i}"
        out += [Site((ours, "self_attention", name), h + "attn.c_attn", 1, part=j)
                for j, name in enumerate(("query", "key", "value"))]
        out += [Site((ours, "self_attention", "out"), h + "attn.c_proj", 2),
                Site((ours, "mlp", "wi"), h + "mlp.c_fc", 1), Site((ours, "mlp", "wo"), h + "mlp.c_proj", 1)]
    return out


def _unscanned(model, params):
    """(per-layer model, per-layer params, function back to the model's layout)."""
    params = nn.unbox(params)
    if not model.config.scan_layers:
        return model, params, lambda m, p: (m, p)
    lib = gpt_lib if isinstance(model, gpt_lib.GPT) else bert_lib
    flat = model.clone(config=dataclasses.replace(model.config, scan_layers=False))

    def back(m, p):
        return m.clone(config=dataclasses.replace(m.config, scan_layers=True)), lib.scan_params(p, m.config)

    return flat, lib.unscan_params(params, model.config), back


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _keys(site: Site) -> tuple[str, str]:
    stem = PREFIX + site.module
    return ((stem + ".lora_embedding_A", stem + ".lora_embedding_B") if site.embedding
            else (stem + ".lora_A.weight", stem + ".lora_B.weight"))


def save_adapter(model, params, directory: str, base_model_name_or_path: str = "") -> None:
    """Writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained`
    loads onto the Hugging Face base model to the same outputs.

    Args:
      model: an lmlab model with `config.block.peft.lora` set.
      params: its params (LoRA leaves included).
      directory: where to write; refused if it already holds an adapter.
      base_model_name_or_path: recorded in adapter_config.json.
    """
    lora = model.config.block.lora
    if lora is None:
        raise ValueError("the model has no LoRA (config.block.peft.lora is None): nothing to save as a PEFT adapter")
    existing = [f for f in (CONFIG, WEIGHTS) if os.path.exists(os.path.join(directory, f))]
    if existing:
        raise FileExistsError(f"{directory!r} already holds {existing}; choose an empty directory")
    model, params, _ = _unscanned(model, params)
    arch = architecture(model)
    tensors: dict[str, np.ndarray] = {}
    fused: dict[str, list] = {}
    for site in _sites(model):
        node = _get(params, site.path[:-1])
        name = site.path[-1]
        if f"{name}_lora_a" not in node:
            continue
        a, b = np.asarray(node[f"{name}_lora_a"], np.float32), np.asarray(node[f"{name}_lora_b"], np.float32)
        m = node.get(f"{name}_lora_magnitude")
        hf_a, hf_b = a.reshape(-1, lora.rank).T, b.reshape(lora.rank, -1).T
        hf_m = None if m is None else np.asarray(m, np.float32).reshape(-1)
        if site.part is not None:
            fused.setdefault(site.module, [None] * 3)[site.part] = (hf_a, hf_b, hf_m)
            continue
        _put(tensors, site, hf_a, hf_b, hf_m)
    for module, parts in fused.items():
        _put(tensors, Site((), module, 1), *_fuse_qkv(model, params, module, parts))
    modules = sorted({k[len(PREFIX):].split(".lora_")[0] for k in tensors})
    config = {"peft_type": "LORA", "base_model_name_or_path": base_model_name_or_path or None, "r": lora.rank,
              "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
              "use_dora": lora.dora, "target_modules": modules, "bias": "none",
              "fan_in_fan_out": arch == "GPT2LMHeadModel", "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "task_type": None,
              "auto_mapping": {"base_model_class": arch, "parent_library": "transformers"}}
    os.makedirs(directory, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(directory, WEIGHTS),
              metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _put(tensors, site: Site, hf_a, hf_b, hf_m) -> None:
    key_a, key_b = _keys(site)
    tensors[key_a], tensors[key_b] = hf_a, hf_b
    if hf_m is not None:
        tensors[PREFIX + site.module + ".lora_magnitude_vector"] = hf_m


def _fuse_qkv(model, params, module: str, parts):
    """GPT-2's c_attn LoRA from our q, k, v factors: one shared A, B's rows stacked."""
    if any(p is None for p in parts) or not all(np.array_equal(parts[0][0], p[0]) for p in parts[1:]):
        raise ValueError(f"GPT-2's fused {module} has one LoRA A for query, key and value: target all three "
                         f"(finetune.lora.targets) and keep their A's equal, or leave them out")
    hf_m = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return parts[0][0], np.concatenate([p[1] for p in parts]), hf_m


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: expected a PEFT adapter directory (adapter_config.json + "
                                f"{WEIGHTS})")
    with open(path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={config.get('peft_type')!r}; only LORA adapters are converted")
    unsupported = {k: config[k] for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication",
                                          "trainable_token_indices") if config.get(k)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if config.get("lora_bias"):
        unsupported["lora_bias"] = True
    if unsupported:
        raise ValueError(f"{path} sets {unsupported}; lmlab LoRA has one rank and alpha for every kernel and no "
                         "biases or extra trained modules: save the adapter without them")
    return config


def load_adapter(base_model, base_params, directory: str):
    """The LoRA model and params of a PEFT adapter directory on an lmlab base model.

    Args:
      base_model: the base model (GPT of LLaMA / Qwen2 / Qwen3 / GPT-2, or a BERT model), e.g.
        from `models.hf.load_pretrained`.
      base_params: its params.
      directory: holds adapter_config.json and adapter_model.safetensors (as peft's
        `save_pretrained` writes them).

    Returns:
      (model, params): `config.block.peft.lora` set to the adapter's rank, alpha, dropout,
      rsLoRA and DoRA with targets naming exactly the adapted kernels, and the base params
      plus the LoRA leaves; `model.apply` equals peft's `PeftModel` outputs.

    Raises:
      ValueError: naming the file and tensor when the adapter's base architecture, module names
        or shapes differ from the model's.
    """
    config = _read_config(directory)
    weights = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} is missing; the adapter directory needs it beside {CONFIG}")
    model, params, back = _unscanned(base_model, base_params)
    arch = architecture(model)
    declared = (config.get("auto_mapping") or {}).get("base_model_class")
    if declared and declared != arch and not (declared in BERT_CLASSES and arch in BERT_CLASSES):
        raise ValueError(f"{os.path.join(directory, CONFIG)} is for a {declared} base (auto_mapping); the model is a "
                         f"{arch}: load the adapter onto its own base model")
    lora = LoraConfig(targets="", rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")),
                      dora=bool(config.get("use_dora")))
    tensors = {k: np.asarray(v, np.float32) for k, v in load_file(weights).items()}
    sites = {}
    for site in _sites(model):
        sites.setdefault(site.module, []).append(site)
    dtype = model.config.block.param_dtype
    adapted = _place(tensors, sites, params, lora, weights, dtype)
    peft = dataclasses.replace(model.config.block.peft or PeftConfig(), lora=dataclasses.replace(
        lora, targets=_targets(adapted, model.config.num_layers)))
    model = model.clone(config=dataclasses.replace(model.config, block=dataclasses.replace(model.config.block,
                                                                                           peft=peft)))
    return back(model, params)


def _place(tensors, sites, params, lora: LoraConfig, weights: str, dtype) -> list[str]:
    """Writes the adapter's tensors into `params` (in place) as LoRA leaves; returns the
    adapted kernels' '/'-joined paths."""
    modules = {}
    for key in tensors:
        if not key.startswith(PREFIX) or ".lora_" not in key and ".base_layer." not in key:
            raise ValueError(f"{weights}: tensor {key!r} is not a PEFT LoRA tensor (base_model.model.<module>.lora_*)")
        module = key[len(PREFIX):].split(".lora_")[0].split(".base_layer.")[0]
        if module not in sites:
            raise ValueError(f"{weights}: tensor {key!r} adapts {module!r}, which this model does not have or "
                             f"cannot adapt (is the adapter for another base model?)")
        modules.setdefault(module, set()).add(key)
    adapted = []
    r = lora.rank
    for module, keys in modules.items():
        stem = PREFIX + module
        if stem + ".base_layer.weight" in keys:  # peft saves a targeted embedding's (or head's) table too
            _load_base(tensors[stem + ".base_layer.weight"], sites[module][0], params, weights, stem, dtype)
        if not keys - {stem + ".base_layer.weight"}:
            continue
        key_a, key_b = _keys(sites[module][0])
        for key in (key_a, key_b):
            if key not in tensors:
                raise ValueError(f"{weights}: {module} has LoRA tensors but lacks {key!r}")
        hf_a, hf_b = tensors[key_a], tensors[key_b]
        hf_m = tensors.get(stem + ".lora_magnitude_vector")
        if (hf_m is None) == lora.dora:
            raise ValueError(f"{weights}: {module} {'lacks' if lora.dora else 'has'} lora_magnitude_vector but "
                             f"adapter_config.json says use_dora={lora.dora}")
        parts = sites[module]
        for site in parts:
            node = _get(params, site.path[:-1])
            kernel = node[site.path[-1]]
            fan_in = math.prod(kernel.shape[:site.n_in])
            out_shape = kernel.shape[site.n_in:]
            fan_out = math.prod(out_shape)
            full_out = fan_out * (len(parts) if site.part is not None else 1)
            for key, array, want in ((key_a, hf_a, (r, fan_in)), (key_b, hf_b, (full_out, r)),
                                     (stem + ".lora_magnitude_vector", hf_m, (full_out,))):
                if array is not None and array.shape != want:
                    raise ValueError(f"{weights}: tensor {key!r} has shape {array.shape}; the model (and r={r} of "
                                     f"adapter_config.json) expects {want}: the adapter is for another base model")
            rows = slice(None) if site.part is None else slice(site.part * fan_out, (site.part + 1) * fan_out)
            name = site.path[-1]
            node[f"{name}_lora_a"] = jnp.asarray(hf_a.T.reshape(*kernel.shape[:site.n_in], r), dtype)
            node[f"{name}_lora_b"] = jnp.asarray(hf_b[rows].T.reshape(r, *out_shape), dtype)
            if hf_m is not None:
                node[f"{name}_lora_magnitude"] = jnp.asarray(hf_m[rows].reshape(out_shape), dtype)
            adapted.append("/".join(site.path))
    if not adapted:
        raise ValueError(f"{weights} holds no LoRA tensors")
    return adapted


def _load_base(table, site: Site, params, weights: str, key: str, dtype) -> None:
    """A saved base table (peft's `save_embedding_layers`): peft loads it over the base's, so do we."""
    node = _get(params, site.path[:-1])
    kernel = node[site.path[-1]]
    want = kernel.shape if site.embedding else tuple(reversed(kernel.shape))
    if table.shape != want:
        raise ValueError(f"{weights}: tensor {key + '.base_layer.weight'!r} has shape {table.shape}; the model "
                         f"expects {want}: the adapter is for another base model")
    node[site.path[-1]] = jnp.asarray(table if site.embedding else table.T, dtype)


def _targets(paths: list[str], num_layers: int) -> str:
    """A regex matching exactly `paths`, written per layer kind when every layer has it (so that
    it also selects them in the scanned layout, `layers/...`)."""
    by_suffix: dict[str, set[str]] = {}
    for path in paths:
        found = re.search(r"(^|/)layer_(\d+)/", path)
        if found:
            by_suffix.setdefault(path[:found.start(2) - 6] + "\0" + path[found.end():], set()).add(found.group(2))
        else:
            by_suffix.setdefault(path, set())
    every_layer = all(len(v) == num_layers for v in by_suffix.values() if v)
    alternatives = []
    for key, layers in sorted(by_suffix.items()):
        if not layers:
            alternatives.append(re.escape(key))
            continue
        prefix, suffix = key.split("\0")
        layer = r"(?:layer_\d+|layers)" if every_layer else "layer_(?:" + "|".join(sorted(layers)) + ")"
        alternatives.append(f"{re.escape(prefix)}{layer}/{re.escape(suffix)}")
    return "^(?:" + "|".join(alternatives) + ")$"
