"""Reading the model to compress and writing the compressed one (`python -m compress`).

Input: a `python -m train` workdir (its run config, latest or `step` checkpoint, tokenizer) or
a Hugging Face directory (`inference.load`; its run config is configs/base.py's with
`init_from=hf:DIR`, so the output rebuilds the architecture from that directory).

Output DIR is a workdir that `python -m inference --checkpoint=DIR` and `python -m evals`
load like any other:

    DIR/config.json            the new run config; its `compress` section records the method,
                               its options and (`tensors`) every quantized kernel's format,
                               group, zero point and contraction (`models.quant.describe`)
    DIR/checkpoints/<step>/    the params (QuantizedTensor fields where quantized) through
                               `train.checkpoint.Checkpointer` (manifest, commit marker)
    DIR/tokenizer/             the tokenizer
    DIR/compress_info.json     the method's measurements

`inference.load` restores a quantized tree from the `compress.tensors` record
(`models.quant.abstract_stored`); a pruned or shrunk model is an ordinary float one of its
new config's sizes. An existing non-empty DIR is refused unless `overwrite` (which removes
only those four entries first). Process 0 writes the files; every process takes part in the
checkpoint save (orbax's own coordination) and waits at a barrier for the rest.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections

from compress import methods
from compress.methods import Compressed, Source

OUTPUT_ENTRIES = ("config.json", "checkpoints", "tokenizer", "compress_info.json")


def check_paths(checkpoint: str, out: str, *, overwrite: bool) -> None:
    """One-line errors for a missing or unrecognized checkpoint and an unusable output DIR."""
    from inference.load import HF_WEIGHTS, WORKDIR_CHECKPOINTS, is_hf_dir, is_workdir

    if not os.path.isdir(checkpoint):
        raise ValueError(f"--checkpoint={checkpoint!r} is not a directory; expected a `python -m train` workdir "
                         "or a Hugging Face model directory")
    if not (is_workdir(checkpoint) or is_hf_dir(checkpoint)):
        raise ValueError(f"--checkpoint={checkpoint!r} is neither a `python -m train` workdir (config.json + "
                         f"{WORKDIR_CHECKPOINTS}/) nor a Hugging Face directory (config.json + {HF_WEIGHTS[0]})")
    if os.path.abspath(out) == os.path.abspath(checkpoint):
        raise ValueError(f"--out={out!r} is the checkpoint itself; write the compressed model elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out={out!r} exists and is not empty; pick a new directory or pass --overwrite")


def source_config(checkpoint: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
    """The run config of the checkpoint (cheap: no params read) and the step it will read."""
    from inference import load as load_lib

    if load_lib.is_workdir(checkpoint):
        step = load_lib.checkpoint_step(checkpoint, step)
        return load_lib._saved_config(checkpoint, step), step
    from configs import base
    from models import hf

    model = hf.model_of(checkpoint)
    config = base.get_config()
    config.init_from = f"hf:{os.path.abspath(checkpoint)}"
    config.model.family = _hf_family(model)
    max_len = getattr(getattr(model, "config", None), "max_len", None)
    if max_len:  # the defaults' sequence length must fit the checkpoint's context
        config.data.seq_len = min(config.data.seq_len, max_len)
    return config, 0


def _hf_family(model) -> str:
    from models.bert import BertConfig

    cfg = getattr(model, "config", None)
    if cfg is None or isinstance(cfg, BertConfig) or not hasattr(cfg, "block"):
        return "bert"
    if getattr(cfg, "mla", None) is not None:
        return "deepseek"
    if getattr(cfg, "moe", None) is not None:
        return "moe"
    return "gpt" if cfg.block.norm == "layernorm" else "llama"


def load_source(checkpoint: str, config: ml_collections.ConfigDict, step: int) -> Source:
    """The model, its float params and tokenizer (a workdir's trained model, masked LMs included)."""
    from inference import load as load_lib

    if not load_lib.is_workdir(checkpoint):
        if methods.family_of(config) == "bert":  # an encoder: inference.load reads causal LMs only
            from data.tokenizer import load_tokenizer
            from models import hf

            model, params = hf.load_pretrained(checkpoint)
            return Source(model=model, params=params, config=config, tokenizer=load_tokenizer(checkpoint))
        loaded = load_lib.load(checkpoint)
        return Source(model=loaded.model, params=loaded.params, config=config, tokenizer=loaded.tokenizer)
    if config.get("compress") and config.compress.get("tensors"):
        raise ValueError(f"--checkpoint={checkpoint!r} is already quantized ({config.compress.method}); compress "
                         "the float model it came from")
    from train import build, init_from

    tokenizer = init_from.workdir_tokenizer(config, checkpoint)
    model = build.model(config, tokenizer.vocab_size)
    params = load_lib.run_params(checkpoint, step, config, model)
    return Source(model=model, params=params, config=config, tokenizer=tokenizer)


def save(out: str, result: Compressed, source: Source, step: int, *, overwrite: bool = False) -> str:
    """Writes the compressed workdir (module docstring); returns its checkpoints directory."""
    from models import quant
    from train import distributed
    from train.checkpoint import Checkpointer

    config = result.config.copy_and_resolve_references()
    with config.unlocked():
        if "compress" not in config:
            raise ValueError("the method returned a config without a `compress` section")
        config.compress.tensors = quant.describe(result.params)
        config.tokenizer.path = ""  # DIR/tokenizer
    if distributed.is_lead():
        if overwrite:
            for entry in OUTPUT_ENTRIES:
                path = os.path.join(out, entry)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
        source.tokenizer.save(os.path.join(out, "tokenizer"))
        with open(os.path.join(out, "compress_info.json"), "w") as f:
            json.dump(jsonable(result.info), f, indent=2)
    distributed.barrier("compress_files")
    directory = os.path.join(out, "checkpoints")
    checkpointer = Checkpointer(directory, max_to_keep=None, save_interval_steps=1, async_save=False)
    try:
        checkpointer.save(step, {"params": result.params}, data_state={}, config=config, force=True)
    finally:
        checkpointer.close()
    distributed.barrier("compress_saved")
    return directory


def jsonable(value: Any) -> Any:
    """`value` with numpy/jax scalars as Python numbers and anything else unknown as its str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def compress(checkpoint: str, method: str, out: str, *, options=None, step: int | None = None,
             calibration_samples: int = 0, calibration_seq_len: int = 256, overwrite: bool = False,
             seed: int = 0) -> Compressed:
    """Checks everything cheap first (paths, method, options, family), then loads, compresses
    (with calibration batches when the method needs them) and saves to `out`."""
    check_paths(checkpoint, out, overwrite=overwrite)
    config, step = source_config(checkpoint, step)
    spec, parsed = methods.check(method, config, options, calibration=calibration_samples > 0)
    if calibration_samples < 0 or calibration_seq_len < 2:
        raise ValueError(f"--calibration_samples={calibration_samples} must be >= 0 and --calibration_seq_len="
                         f"{calibration_seq_len} >= 2")
    source = load_source(checkpoint, config, step)
    batches = None
    if spec.needs_calibration:
        from compress import calibration
        from inference.load import is_workdir

        batches = calibration.calibration_batches(source.config, source.tokenizer, samples=calibration_samples,
                                                  seq_len=calibration_seq_len, seed=seed,
                                                  workdir=checkpoint if is_workdir(checkpoint) else "")
    result = methods.apply(method, source, calibration=batches, options=parsed)
    save(out, result, source, step, overwrite=overwrite)
    return result
