"""`python -m inference.export`: a checkpoint's decoder as `jax.export` files or an ONNX graph.

    python -m inference.export --checkpoint=/tmp/tiny --out=/tmp/tiny_jax                 # jax (default)
    python -m inference.export --checkpoint=/tmp/tiny --out=/tmp/tiny_onnx --format=onnx
    python /tmp/tiny_onnx/run_onnx.py /tmp/tiny_onnx --prompt_ids=5,17,3 --max_new_tokens=20

PATH is a `python -m train` workdir (its latest checkpoint, or --step) or a Hugging Face
model directory. `--format=jax` writes `inference.export.export_decoder`'s directory
(prefill.jax, decode.jax, params.npz, run_exported.py); `--format=onnx` writes
`inference.onnx_export.export_onnx`'s (model.onnx, manifest.json, run_onnx.py). Flags,
the output directory and the architecture are checked before any weight is read; an
existing, non-empty --out is kept unless --overwrite, and even then it is replaced only
once the new export is complete.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from absl import app, flags

from train import cli

FORMATS = ("jax", "onnx")
DTYPES = ("float32", "bfloat16", "float16")  # inference.load.DTYPES (not imported: it pulls in jax)

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A `python -m train` workdir or a Hugging Face directory.")
_OUT = flags.DEFINE_string("out", None, "The directory to write the export to (new or empty).")
_FORMAT = flags.DEFINE_string("format", "jax", f"One of {FORMATS}.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "The longest prompt + generation (default: the model's max_len).")
_STEP = flags.DEFINE_integer("step", None, "The workdir checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_string("dtype", None, f"Params (and jax computation) dtype, one of {DTYPES} (default: as "
                                            "saved); ONNX computes in float32.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def check_flags(checkpoint: str | None, out: str | None, fmt: str, max_len: int | None, dtype: str | None,
                overwrite: bool) -> None:
    """Raises ValueError naming the first bad flag, before anything is loaded."""
    if not checkpoint:
        raise ValueError("--checkpoint is required: a `python -m train` workdir or a Hugging Face directory")
    if not os.path.isdir(checkpoint):
        raise ValueError(f"--checkpoint={checkpoint!r} is not a directory; pass a `python -m train` workdir or a "
                         "Hugging Face model directory")
    if not out:
        raise ValueError("--out is required: the directory to write the export to")
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r}; expected one of {FORMATS}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"--max_len={max_len} must be >= 1 (prompt + new tokens)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}; expected one of {DTYPES}")
    if fmt == "onnx" and dtype not in (None, "float32"):
        raise ValueError(f"--dtype={dtype} with --format=onnx: the ONNX graph computes in float32; drop --dtype and "
                         "let the runtime lower precision (TensorRT --fp16 / --bf16)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out!r} is a file; pass a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out={out!r} already holds files; choose a new directory or pass --overwrite")
    if os.path.abspath(out) == os.path.abspath(checkpoint):
        raise ValueError("--out is the --checkpoint directory; choose another directory")


def check_architecture(checkpoint: str, step: int | None) -> None:
    """For --format=onnx: refuses a model the graph cannot express, from its config alone."""
    from inference import load as loading
    from inference.onnx_export import check_exportable
    from models.gpt import GPT

    if loading.is_hf_dir(checkpoint):
        from models import hf

        model = hf.model_of(checkpoint)
    elif loading.is_workdir(checkpoint):
        from train import build

        config = loading._saved_config(checkpoint, loading.checkpoint_step(checkpoint, step))
        model = build.model(config, 1)
    else:
        return  # `load` names what the path is not
    if isinstance(model, GPT):
        check_exportable(model.config)


def export(checkpoint: str, out: str, *, fmt: str = "jax", max_len: int | None = None, step: int | None = None,
           dtype: str | None = None, overwrite: bool = False) -> str:
    """Loads `checkpoint` and writes its export to `out` (see the module docstring).

    Returns:
      A line saying what was written.
    """
    check_flags(checkpoint, out, fmt, max_len, dtype, overwrite)
    if fmt == "onnx":
        check_architecture(checkpoint, step)
    from inference.load import load

    loaded = load(checkpoint, step=step, dtype=dtype)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)  # the same filesystem: a rename, not a copy
    try:
        if fmt == "onnx":
            from inference.onnx_export import export_onnx

            manifest = export_onnx(loaded.model, loaded.params, staging, max_len=max_len)
        else:
            from inference.export import export_decoder

            manifest = export_decoder(loaded.model, loaded.params, staging, max_len=max_len)
        if os.path.isdir(out):
            shutil.rmtree(out)  # empty, or --overwrite: the new export is complete by now
        os.replace(staging, out)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return f"wrote a {fmt} export of {loaded.source} to {out} (max_len {manifest['max_len']})"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(export(_CHECKPOINT.value, _OUT.value, fmt=_FORMAT.value, max_len=_MAX_LEN.value, step=_STEP.value,
                 dtype=_DTYPE.value, overwrite=_OVERWRITE.value), file=sys.stderr)


def run() -> None:
    cli.run(main)  # errors as one line `error: ...`, library logs behind --verbose
