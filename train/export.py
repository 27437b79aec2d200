"""A run's checkpoint as a Hugging Face directory: `python -m train.export --workdir=W --out=DIR`.

    python -m train.export --workdir=/tmp/run --out=/tmp/hf [--step=N] [--adapter_only] [--force]

writes what transformers loads (`AutoModelForCausalLM.from_pretrained(DIR)`, or for a reward
run (objective=reward, a score head) `AutoModelForSequenceClassification.from_pretrained(DIR)`
with num_labels 1 and config.json's `pad_token_id` the tokenizer's pad id, else 0 (what lmlab
pads its rows with); `AutoTokenizer.from_pretrained(DIR)`):

    config.json, model.safetensors   `models.hf.save_pretrained` (LoRA / DoRA / QLoRA runs: the
                                     adapter merged into the (dequantized) base,
                                     `models.layers.peft.merge`)
    tokenizer.json                   the run's tokenizer (lmlab's BPE in the GPT-2 layout)
    tokenizer_config.json            its special tokens, and its chat template if it has one
    generation_config.json           bos / eos / pad ids (generate stops at eos)

or, with --adapter_only, the LoRA adapter alone in peft's format (adapter_config.json +
adapter_model.safetensors, `models.convert.peft.save_adapter`), to load with
`peft.PeftModel.from_pretrained` onto the base the run started from (a QLoRA adapter was
trained on the base's dequantized weights). Prefix tuning and bottleneck adapters have no
transformers module to merge into, and lmlab writes no peft file for them: their export is a
one-line error.

Every export verifies itself before it is moved into place: it reloads what it wrote
(`models.hf.load_pretrained`), compares the logits of a fixed probe batch with the
in-memory model and, when transformers is installed, does the same with transformers'
model (`models.hf_verify`); a mismatch fails naming the worst tensor and logit, and leaves
nothing at --out. An existing non-empty --out is never overwritten unless --force.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
from absl import flags

from models.layers.peft import is_peft_path
from train import build, init_from, trainable


def export(workdir: str, out: str, *, step: int | None = None, adapter_only: bool = False,
           force: bool = False, verify_transformers: bool = True) -> dict[str, Any]:
    """Writes checkpoint `step` (default: the latest) of the run in `workdir` to `out`.

    Args:
      workdir: a `python -m train` workdir.
      out: the directory to write; must not exist or be empty (unless `force`).
      step: the checkpoint step; None: the latest committed one.
      adapter_only: write only the LoRA adapter (a lora / qlora run).
      force: replace a non-empty `out` (only once the new export has verified).
      verify_transformers: also compare with transformers' model when it is installed.

    Returns:
      {"directory", "step", "architecture", "verified": {"reloaded": ..., "transformers": ...}}
      with the relative logit and worst-tensor differences found (a merged LoRA run also has
      "merged": the merged model's logits against the LoRA model's).
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise FileExistsError(f"--out={out} exists and is not empty; choose a new directory or pass --force "
                              "to replace it")
    spec = init_from.Spec("run", os.path.abspath(workdir), step)
    step = init_from.run_step(spec)
    config = init_from.run_config(spec)
    method = config.finetune.method if "finetune" in config else "full"
    if adapter_only and method not in ("lora", "qlora"):
        raise ValueError(_not_an_adapter(workdir, method))
    if not adapter_only and method in ("prefix", "adapter"):
        raise ValueError(f"the run in {workdir} trained finetune.method={method!r}: transformers has no "
                         f"{'prefix key/values' if method == 'prefix' else 'bottleneck adapter'} in its models, so "
                         f"it cannot be merged into a Hugging Face directory{_ADAPTER_ONLY_NOTE[method]}")
    tokenizer = init_from.run_tokenizer(spec)
    model = build.model(config, tokenizer.vocab_size)
    from models import hf

    hf.check_exportable(_without_peft(model))  # before any weights are read
    params = _restore(spec, step, model, config)
    base_model, base_params = model, params
    if method in ("lora", "qlora") and not adapter_only:
        from models.layers.peft import merge

        base_model, base_params = merge(model, params)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=parent)
    try:
        if adapter_only:
            verified = _write_adapter(model, params, staging)
        else:
            hf.save_pretrained(base_model, base_params, staging, **_pad_token(base_model, tokenizer))
            _write_tokenizer(tokenizer, config, staging, model.config.max_len)
            from models import hf_verify

            verified = {"merged": _merge_difference(model, params, base_model, base_params)} if base_model is not \
                model else {}
            verified["reloaded"] = hf_verify.against_reloaded(staging, base_model, base_params)
            if verify_transformers:
                verified["transformers"] = hf_verify.against_transformers(staging, base_model, base_params)
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if adapter_only:
        with open(os.path.join(out, "adapter_config.json")) as f:
            arch = json.load(f)["auto_mapping"]["base_model_class"]
    else:
        with open(os.path.join(out, "config.json")) as f:
            arch = json.load(f)["architectures"][0]
    return {"directory": out, "step": step, "architecture": arch, "verified": verified}


def _pad_token(model, tokenizer) -> dict[str, int]:
    """A reward model's `pad_token_id` (transformers' *ForSequenceClassification finds each row's
    last token as the rightmost one that is not it): the tokenizer's pad id, else 0, the id
    `data.preference` pads with. {} for other models."""
    if getattr(model.config, "head", "lm") != "score":
        return {}
    return {"pad_token_id": 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)}


def _by_path(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _without_peft(model):
    block = model.config.block
    return model.clone(config=dataclasses.replace(model.config, block=dataclasses.replace(block, peft=None)))


def _merge_difference(model, params, merged_model, merged_params) -> dict[str, float]:
    """The probe batch's logits of the merged model against the LoRA model's (the merge is exact
    up to float rounding; `models.hf_verify.check_logits` raises beyond its tolerance)."""
    from models import hf_verify

    ids = hf_verify.probe_ids(model.config.vocab_size, model.config.max_len)
    rel = hf_verify.check_logits(hf_verify.logits(merged_model, merged_params, ids), hf_verify.logits(model, params, ids),
                                 hf_verify.tolerance(model), "the LoRA merge", ("", 0.0))
    return {"logits": rel}


def _restore(spec: init_from.Spec, step: int, model, config=None):
    """The run's whole params (trained + frozen, a QLoRA base dequantized) on this process's
    first device (no optimizer state)."""
    from inference.load import run_params

    return run_params(spec.path, step, init_from.run_config(spec) if config is None else config, model)


# Why --adapter_only cannot help either, per method that cannot merge.
_ADAPTER_ONLY_NOTE = {
    "prefix": "; --adapter_only cannot either: lmlab's prefix is per-layer key/value positions, which peft's "
              "PREFIX_TUNING format stores in another layout that lmlab does not write yet. Use the run directly "
              "(python -m inference --checkpoint=WORKDIR)",
    "adapter": "; --adapter_only cannot either: peft has no bottleneck-adapter format. Use the run directly "
               "(python -m inference --checkpoint=WORKDIR)",
}


def _not_an_adapter(workdir: str, method: str) -> str:
    if method in _ADAPTER_ONLY_NOTE:
        return (f"--adapter_only: the run in {workdir} trained finetune.method={method!r}"
                f"{_ADAPTER_ONLY_NOTE[method]}")
    return (f"--adapter_only: the run in {workdir} trained no adapter (finetune.method={method!r}); export the "
            "whole model without --adapter_only")


def _write_adapter(model, params, directory: str) -> dict:
    """The LoRA adapter in peft's format (`models.convert.peft.save_adapter`), verified by
    loading it back onto the run's own base (`load_adapter`): the probe batch's logits must
    equal the run's.

    Returns:
      {"reloaded": {"logits": relative difference, "tensor": worst LoRA tensor difference}}.
    """
    from models import hf_verify
    from models.convert import peft as peft_files

    peft_files.save_adapter(model, params, directory)
    base_model = _without_peft(model)
    base_params, _ = trainable.partition(params, lambda path: not is_peft_path(path))
    reloaded_model, reloaded = peft_files.load_adapter(base_model, base_params, directory)
    tensors = hf_verify.worst_tensor(_by_path(params), _by_path(reloaded))
    ids = hf_verify.probe_ids(model.config.vocab_size, model.config.max_len)
    rel = hf_verify.check_logits(hf_verify.logits(reloaded_model, reloaded, ids), hf_verify.logits(model, params, ids),
                                 hf_verify.tolerance(model), f"the adapter in {directory} reloaded", tensors)
    return {"reloaded": {"logits": rel, "tensor": tensors[1]}}


def _write_tokenizer(tokenizer, config, directory: str, max_len: int) -> None:
    """tokenizer.json, tokenizer_config.json (special tokens, chat template) and
    generation_config.json of the run's tokenizer."""
    from data.tokenizer.bpe import ByteLevelBPE
    from data.tokenizer.hf_json import export_bpe

    if isinstance(tokenizer, ByteLevelBPE):
        export_bpe(tokenizer, os.path.join(directory, "tokenizer.json"))
    else:
        tokenizer.save(directory)
    source_config = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            source_config = json.load(f)
    ids = {role: getattr(tokenizer, f"{role}_id", None) for role in ("bos", "eos", "pad", "mask")}
    tokens = {f"{role}_token": tokenizer.decode([i]) for role, i in ids.items() if i is not None}
    tokenizer_config = {**source_config, **tokens, "tokenizer_class": "PreTrainedTokenizerFast",
                        "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    template = getattr(tokenizer, "chat_template", None) or _chat_template(config)
    if template:
        tokenizer_config["chat_template"] = template
    with open(path, "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    generation = {f"{role}_token_id": i for role, i in ids.items() if i is not None and role != "mask"}
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({**generation, "_from_model_config": False}, f, indent=2)


def _chat_template(config) -> str | None:
    """The chat template of the run's tokenizer directory (a Hugging Face tokenizer_config.json)."""
    spec = init_from.parse(config.init_from) if config.get("init_from") else None
    directory = config.tokenizer.path or (spec.path if spec is not None and spec.kind == "hf" else "")
    path = os.path.join(directory, "tokenizer_config.json") if directory and os.path.isdir(directory) else ""
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("chat_template")
    return None


def main(argv) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = export(flags.FLAGS.workdir, flags.FLAGS.out, step=flags.FLAGS.step,
                    adapter_only=flags.FLAGS.adapter_only, force=flags.FLAGS.force)
    checks = ", ".join(f"{k}: logits within {v['logits']:.1e}" for k, v in result["verified"].items() if v)
    print(f"exported step {result['step']} as {result['architecture']} to {result['directory']} ({checks})")


if __name__ == "__main__":
    from train import cli

    flags.DEFINE_string("workdir", None, "The `python -m train` workdir to export.", required=True)
    flags.DEFINE_string("out", None, "The Hugging Face directory to write (new or empty).", required=True)
    flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
    flags.DEFINE_bool("adapter_only", False, "Write only the PEFT adapter (adapter_config.json + "
                      "adapter_model.safetensors).")
    flags.DEFINE_bool("force", False, "Replace a non-empty --out (after the new export verified).")
    cli.run(main)
