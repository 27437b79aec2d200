"""Calibration data and the statistics of every kernel's input activations.

Error-compensating compression (GPTQ, SparseGPT, AWQ, SmoothQuant, Wanda) weighs a kernel's
errors by the activations that meet it. For a kernel W [I, O] (its 2-D view: the input axes
merged into I, the output axes into O) whose input over n calibration tokens is X [n, I]:

    hessian  H_ij = sum_t x_ti x_tj / n      [I, I]  (GPTQ / SparseGPT: ||X dW||^2 = n tr(dW^T H dW))
    absmean  mean_t |x_ti|                   [I]     (AWQ's activation scale)
    absmax   max_t |x_ti|                    [I]     (SmoothQuant's outlier scale)
    l2       sqrt(sum_t x_ti^2)              [I]     (Wanda's ||X_i||_2)

    batches = calibration_batches(config, tokenizer, samples=128, seq_len=128, seed=0, workdir=w)
    stats = collect(source, batches, stats=("hessian", "absmean"))
    stats["layer_0/self_attention/query"]["hessian"]   # [D, D]

`calibration_batches` draws packed rows of the run's own training data (`data.pipeline`: the
embedded pydoc corpus by default), shuffled with their own seed. `collect` runs the float
model on them with the `layer_inputs` collection mutable: the attention and feed-forward
layers (`models.layers.multihead`, `models.layers.feedforward`) and an untied LM head sow
each kernel's input there under the '+'-joined names of the kernels that read it
(`query+key+value`, `out`, `wi_gate+wi_up`, `wo`, `lm_head`), so q, k and v share one set of
statistics (the same dict object). Per batch, the sums (X^T X, sum |x|, max |x|, sum x^2) are
computed in float32 inside one jitted function, and only they leave it; the host adds them up
in float64 over the batches.

Scanned stacks (`scan_layers=True`) sow [L, B, T, I]: their statistics carry the same leading
L axis as their kernels ([L, I, I], [L, I]). The embedding table (its input is a token id) and
a tied LM head get no statistics; mixture-of-experts layers (each expert sees only its routed
tokens) and latent attention (MLA) sow nothing: the methods refuse those architectures
(`check_supported`). `flat_params`, `input_groups` and `matrix` are the views of the params
and statistics the methods work on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

COLLECTION = "layer_inputs"
STATS = ("hessian", "absmean", "absmax", "l2")


def calibration_batches(config, tokenizer, *, samples: int, seq_len: int, seed: int = 0, batch_size: int = 8,
                        workdir: str = "") -> list[np.ndarray]:
    """`samples` rows of `seq_len` token ids from the run's training split, as int32 [B, T] batches.

    Args:
      config: the run config (its `data.*` keys choose the source, as the trainer reads them).
      tokenizer: the run's tokenizer.
      samples: rows to draw (> 0).
      seq_len: tokens per row.
      seed: the shuffle seed of the documents and rows (independent of training's).
      batch_size: rows per batch (the last batch may hold fewer).
      workdir: the run's workdir, where `data.data_dir` = "" keeps the built source files
        (WORKDIR/tfds, as the trainer); "" and no `data.data_dir`: tfds's default directory.

    Returns:
      A list of int32 numpy arrays [B, seq_len] holding `samples` rows together.
    """
    from data import pipeline
    from train.build import data_config

    if samples < 1:
        raise ValueError(f"--calibration_samples={samples}; expected a positive number of rows")
    if seq_len < 2:
        raise ValueError(f"calibration seq_len={seq_len}; expected at least 2 tokens per row")
    data = data_config(config, workdir)
    if not config.data.data_dir and not workdir:
        data = dataclasses.replace(data, data_dir=None)
    batch = min(batch_size, samples)
    data = dataclasses.replace(data, seq_len=seq_len, batch_size=batch, seed=seed, worker_count=0,
                               shuffle_window=max(64, batch))
    rows, out = 0, []
    for b in pipeline.train_iterator(data, tokenizer, process_index=0, process_count=1):
        take = min(batch, samples - rows)
        out.append(np.asarray(b["inputs"][:take], np.int32))
        rows += take
        if rows >= samples:
            break
    return out


def _apply_fn(model):
    def run(params, ids_BT):
        _, state = model.apply({"params": params}, ids_BT, mutable=[COLLECTION])
        return state.get(COLLECTION, {})

    return run


def _sown(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, Any]]:
    """(module path '/'-joined, '+'-joined kernel names, array) of every sown input."""
    for key, value in tree.items():
        if isinstance(value, tuple):  # sow stores a tuple, one entry per call
            if len(value) != 1:
                raise ValueError(f"{'/'.join(prefix + (key,))} was sown {len(value)} times in one forward pass; "
                                 "calibration needs each layer called once")
            yield "/".join(prefix), key, value[0]
        else:
            yield from _sown(value, prefix + (key,))


def input_dims(source, seq_len: int = 8) -> dict[str, int]:
    """Kernel path -> the width I of its input (from shapes only: nothing runs)."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    sown = jax.eval_shape(_apply_fn(source.model), source.params, ids)
    return {f"{module}/{k}" if module else k: x.shape[-1] for module, names, x in _sown(sown)
            for k in names.split("+")}


@functools.partial(jax.jit, static_argnames=("model", "hessian"))
def _batch_sums(params, ids_BT, *, model, hessian: bool):
    sown = _apply_fn(model)(params, ids_BT)
    out = {}
    for module, names, x in _sown(sown):
        x = x.astype(jnp.float32)
        # [B, T, I] -> [n, I]; a scanned stack's [L, B, T, I] -> [L, n, I]
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim == 4 else x.reshape(-1, x.shape[-1])
        sums = {"abssum": jnp.sum(jnp.abs(x), axis=-2), "absmax": jnp.max(jnp.abs(x), axis=-2),
                "sqsum": jnp.sum(jnp.square(x), axis=-2)}
        if hessian:
            sums["xtx"] = jnp.einsum("...ni,...nj->...ij", x, x)
        out[(module, names)] = sums
    return out


def collect(source, batches: Sequence[Any], stats: Sequence[str] = ("hessian", "absmean", "absmax")) -> dict[str, dict]:
    """Statistics of every sown kernel input over the calibration `batches` (module docstring).

    Args:
      source: a `compress.methods.Source` (its `model` and float `params`).
      batches: int32 token batches [B, T] (`calibration_batches`).
      stats: which of STATS to compute ("hessian" costs I^2 per kernel input).

    Returns:
      {kernel path: {stat: float64 numpy array, "tokens": n, "lead": 0 or 1 (a scanned
      stack's leading L axis)}}; kernels that read the same input share one dict. Paths are '/'-joined param paths (`models.quant.quantizable`'s).

    Raises:
      ValueError (one line, before the model runs): no batches, an unknown stat, or (with
      "hessian") fewer calibration tokens than the widest kernel input, for which the Hessian
      would be singular.
    """
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"calibration stat {unknown[0]!r} is not one of {STATS}")
    if not batches:
        raise ValueError("no calibration batches; pass --calibration_samples > 0")
    tokens = sum(int(np.prod(np.shape(b))) for b in batches)
    seq_len = int(np.shape(batches[0])[1])
    dims = input_dims(source, seq_len)
    if not dims:
        raise ValueError("the model sows no kernel inputs (mixture-of-experts or latent attention only?); "
                         "calibration needs attention or dense feed-forward layers")
    widest = max(dims.values())
    if "hessian" in stats and tokens < widest:
        raise ValueError(f"the calibration set holds {tokens} tokens, fewer than the widest kernel input ({widest}), "
                         f"so its Hessian would be singular; use --calibration_samples >= {math.ceil(widest / seq_len)}"
                         f" (rows of {seq_len} tokens)")
    totals: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for ids in batches:
        sums = jax.device_get(_batch_sums(source.params, jnp.asarray(ids, jnp.int32), model=source.model,
                                          hessian="hessian" in stats))
        for key, s in sums.items():
            acc = totals.setdefault(key, {})
            for name, value in s.items():
                value = np.asarray(value, np.float64)
                if name not in acc:
                    acc[name] = value
                elif name == "absmax":
                    acc[name] = np.maximum(acc[name], value)
                else:
                    acc[name] = acc[name] + value
    out: dict[str, dict] = {}
    for (module, names), acc in totals.items():
        # lead: 1 for a scanned stack's statistics ([L, ...]), else 0
        entry: dict[str, Any] = {"tokens": tokens, "lead": acc["abssum"].ndim - 1}
        if "hessian" in stats:
            entry["hessian"] = acc["xtx"] / tokens
        if "absmean" in stats:
            entry["absmean"] = acc["abssum"] / tokens
        if "absmax" in stats:
            entry["absmax"] = acc["absmax"]
        if "l2" in stats:
            entry["l2"] = np.sqrt(acc["sqsum"])
        for kernel in names.split("+"):
            out[f"{module}/{kernel}" if module else kernel] = entry
    return out


def check_supported(config, method: str) -> None:
    """One-line ValueError for an architecture whose kernels calibration does not see."""
    m = config.model
    if m.get("family", "gpt") == "deepseek" or ("mla" in m and m.mla.get("kv_lora_rank", 0)):
        raise ValueError(f"--method={method} does not see latent attention's (MLA) kernel inputs; use --method=rtn "
                         "for this model")
    if m.get("family", "gpt") == "moe" or ("moe" in m and m.moe.get("num_experts", 0)):
        raise ValueError(f"--method={method} needs every kernel's calibration inputs, but mixture-of-experts "
                         "layers route each expert its own tokens, which calibration does not collect; use "
                         "--method=rtn for this model")


def flat_params(params) -> dict[str, Any]:
    """{'/'-joined path: leaf} of a params tree (the paths `collect` keys its stats by)."""
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The inverse of `flat_params` (nested dicts)."""
    out: dict = {}
    for path, x in flat.items():
        node = out
        *parents, name = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = x
    return out


def matrix(w, lead: int, rows: int):
    """The [*lead, I, O] view of a kernel [*lead, *I, *O] whose inputs hold `rows` values."""
    return jnp.reshape(w, (*np.shape(w)[:lead], rows, -1))


def input_groups(stats: Mapping[str, dict]) -> dict[int, list[str]]:
    """Kernels grouped by their shared input: {id(stats dict): [kernel paths]} in sown order."""
    groups: dict[int, list[str]] = {}
    for path, entry in stats.items():
        groups.setdefault(id(entry), []).append(path)
    return groups
