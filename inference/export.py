"""Serialized prefill and decode functions (`jax.export`) that run without lmlab's code.

From the command line (inference/export_cli.py; `--format=onnx` writes inference/onnx_export.py's graph):

    python -m inference.export --checkpoint=PATH --out=DIR [--format=jax|onnx] [--max_len] [--step] [--dtype]

Axis letters: B batch, T prompt length, S cache length, V vocabulary.

    export_decoder(model, params, "out/", max_len=128)
    # in any process with jax and numpy (not lmlab):
    python out/run_exported.py out --prompt_ids=5,17,3 --max_new_tokens=20

`export_decoder` writes a self-contained directory:

    prefill.jax      params, ids [B, T] (right-padded), lengths [B]
                       -> (logits at each row's last prompt token [B, V], cache)
    decode.jax       params, cache, tokens [B], positions [B] -> (logits [B, V], cache)
    params.npz       the parameters, one array per leaf, named by their path ("a/b/kernel");
                       a dtype numpy cannot store (bfloat16, float8) as its bit pattern
                       (unsigned ints of the same width), its name in the manifest
    manifest.json    vocab_size, max_len S, the pad id, the platforms exported for,
                       param_dtypes {path: dtype name} of the leaves stored as bits
    run_exported.py  a copy of `inference/run_exported.py`, the greedy loop over the two

Both functions are StableHLO with their input/output pytree structure (nested dicts of
arrays), serialized by `Exported.serialize()`; `jax.export.deserialize` gives them back
in a process that never imports flax or lmlab's models. B and T are symbolic (shape
polymorphism): one export serves any batch size and prompt length up to S.

Params are arguments, not constants closed over. Closing over them would make a single
file, and XLA could fold them into the program; but the serialized module would then
hold every weight (its size is the model's, and a protobuf stops at 2 GB), a new
checkpoint of the same architecture would need a new export, and compiling a program
full of large constants is slow. As arguments, the exported programs are a few hundred
KB whatever the model size, serve any weights of that config (a fine-tune, a later
step), and the loader decides where the weights live (device, sharding, dtype); the
price is a second file and keeping the params tree's structure, which the serialized
in_tree checks at call time.

A quantized model (`python -m compress`) exports as it is stored: each QuantizedTensor is a
dict of its arrays ({"codes": uint8, "scales": float32, ...}, `models.quant.to_plain`) in
params.npz and in the exported functions' inputs, which rebuild the tensors and dequantize
inside (float8 codes are stored as their bits, as above).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from inference.generate import PAD_ID
from inference.kv_cache import cache_shapes
from inference.paged import batch_axis
from models import quant
from models.gpt import GPT

LOADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_exported.py")
FILES = ("prefill.jax", "decode.jax", "params.npz", "manifest.json", "run_exported.py")


def _zero_cache(model: GPT, batch, max_len: int) -> dict:
    """A zero cache whose batch may be a symbolic dimension (the layout of `init_cache`)."""
    axis = batch_axis(model)
    return jax.tree.map(lambda s: jnp.zeros((*s.shape[:axis], batch, *s.shape[axis + 1:]), s.dtype),
                        cache_shapes(model, 1, max_len))


def prefill_fn(model: GPT, max_len: int):
    """(params, ids [B, T], lengths [B]) -> (logits [B, V] at each row's last token, cache of S = max_len)."""

    def prefill(params, ids_BT, lengths_B):
        positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        logits_BTV, state = model.apply({"params": params, "cache": _zero_cache(model, ids_BT.shape[0], max_len)},
                                        ids_BT, positions=positions_BT, mutable=["cache"])
        last_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        return last_BV, state["cache"]

    return prefill


def decode_fn(model: GPT):
    """(params, cache, tokens [B], positions [B]) -> (logits [B, V], cache): one token per row."""

    def decode(params, cache, tokens_B, positions_B):
        logits_B1V, state = model.apply({"params": params, "cache": cache}, tokens_B[:, None],
                                        positions=positions_B[:, None], mutable=["cache"])
        return logits_B1V[:, 0], state["cache"]

    return decode


def flatten_params(params) -> dict[str, np.ndarray]:
    """{"a/b/kernel": array} of a nested params dict (the keys `run_exported.py` unflattens)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if any("/" in n for n in names):
            raise ValueError(f"params key {names} contains '/', which the flat file names use as separator")
        out["/".join(names)] = np.asarray(leaf)
    return out


def storable_arrays(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays `np.savez` can write and read back, and {path: dtype name} of those stored as bits.

    numpy writes an ml_dtypes array (bfloat16, float8) as raw void bytes ("|V2") that it
    cannot load again; such leaves are stored as their bit pattern in unsigned ints of the
    same width, which `run_exported.py` views back as the named dtype, exactly.
    """
    arrays, dtypes = {}, {}
    for key, a in flat.items():
        if np.dtype(a.dtype.str) != a.dtype:  # not a numpy-native dtype
            arrays[key], dtypes[key] = a.view(f"u{a.dtype.itemsize}"), a.dtype.name
        else:
            arrays[key] = a
    return arrays, dtypes


def export_decoder(model: GPT, params, directory: str, *, max_len: int | None = None,
                   platforms: tuple[str, ...] | None = None) -> dict:
    """Exports prefill and decode of `model` to `directory` (see the module docstring).

    Args:
      model, params: a decoder-only `GPT` and its params (nested dicts).
      directory: created if needed; must not already hold an export.
      max_len: S, the cache length: prompt + new tokens (default the model's max_len).
      platforms: the platforms to lower for (default: this process's backend), e.g.
        ("cpu", "cuda") for a file that runs on both.

    Returns:
      The manifest written (also `manifest.json`).
    """
    max_len = max_len or model.config.max_len
    if not 1 <= max_len <= model.config.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, the model's max_len={model.config.max_len}]")
    os.makedirs(directory, exist_ok=True)
    existing = [f for f in FILES if os.path.exists(os.path.join(directory, f))]
    if existing:
        raise FileExistsError(f"{directory!r} already holds {existing}; choose an empty directory")
    params = jax.tree.map(jnp.asarray, params)
    # Quantized kernels travel as dicts of their arrays (codes, scales...): the exported functions
    # take nested dicts only and rebuild the QuantizedTensors inside, so they dequantize in the kernel.
    like = jax.eval_shape(lambda: params)
    params = quant.to_plain(params)
    params_spec = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    B, T = jax.export.symbolic_shape("B, T")
    ids_spec = jax.ShapeDtypeStruct((B, T), jnp.int32)
    rows_spec = jax.ShapeDtypeStruct((B,), jnp.int32)
    kw = {} if platforms is None else {"platforms": platforms}
    prefill_q, decode_q = prefill_fn(model, max_len), decode_fn(model)
    prefill = jax.export.export(jax.jit(lambda p, *a: prefill_q(quant.from_plain(p, like), *a)), **kw)(
        params_spec, ids_spec, rows_spec)
    cache_spec = jax.tree.unflatten(prefill.out_tree, prefill.out_avals)[1]
    decode = jax.export.export(jax.jit(lambda p, *a: decode_q(quant.from_plain(p, like), *a)), **kw)(
        params_spec, cache_spec, rows_spec, rows_spec)

    for name, exported in (("prefill.jax", prefill), ("decode.jax", decode)):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(exported.serialize())
    arrays, param_dtypes = storable_arrays(flatten_params(params))
    np.savez(os.path.join(directory, "params.npz"), **arrays)
    manifest = {"vocab_size": model.config.vocab_size, "max_len": max_len, "pad_id": PAD_ID,
                "platforms": list(prefill.platforms), "param_dtypes": param_dtypes}
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    shutil.copy(LOADER, os.path.join(directory, "run_exported.py"))
    return manifest


if __name__ == "__main__":  # python -m inference.export: the CLI lives in export_cli (its absl flags)
    from inference import export_cli

    export_cli.run()
