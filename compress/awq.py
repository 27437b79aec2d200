"""AWQ: activation-aware weight quantization (Lin et al. 2023).

A few input channels carry much larger activations than the rest; their weights matter most.
AWQ scales those weight rows up before round-to-nearest quantization (so they lose less to
rounding) and divides the activations by the same scale, folded into the op before the
kernel (`compress.smoothing`): X W = (X / s)(s W) exactly in float, and

    W_q = Q(diag(s) W) / s          (Q: group-wise round to nearest, `compress.gptq.rtn`)

Per group of kernels reading one input (q/k/v share one s; gate/up share one), with the
calibration statistics of that input (`compress.calibration`: mean |x| and H = X^T X / n):

    s(alpha) = mean|x|^alpha / sqrt(max * min of mean|x|^alpha)     alpha on a grid in [0, 1)
    alpha*   = argmin_alpha  sum over the group's kernels of  tr(dW^T H dW),  dW = W_q(alpha) - W

The objective is the group's output error ||X W - X W_q||^2 / n on the calibration set,
computed from H without storing activations; alpha = 0 is plain round to nearest, so the
chosen scales never do worse than it on the calibration set. Where no exact fold exists the
group keeps s = 1 (plain round to nearest). AWQ's further weight-clipping search is not done.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from compress import calibration as calibration_lib
from compress import kernels, methods, smoothing
from compress.gptq import rtn, stacked_layer_error
from models import quant


@functools.partial(jax.jit, static_argnames=("bits", "group", "sym", "grid"))
def search_scales(w_IO: jax.Array, h_II: jax.Array, absmean_I: jax.Array, *, bits: int, group: int, sym: bool,
                  grid: int = 20):
    """The AWQ scales of one input group: the kernels' [I, O] views concatenated along O.

    Returns:
      (s [I], alpha, errors [grid]): the chosen scales, their exponent and every grid point's
      output error tr(dW^T H dW).
    """
    alphas = jnp.arange(grid, dtype=w_IO.dtype) / grid
    x = jnp.maximum(absmean_I, 1e-8)

    def error(alpha):
        s = x ** alpha
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        w_q = rtn(w_IO * s[:, None], bits=bits, group=group, sym=sym)[3] / s[:, None]
        d = w_q - w_IO
        return jnp.sum(d * (h_II @ d))

    errors = jax.vmap(error)(alphas)
    best = jnp.argmin(errors)
    s = x ** alphas[best]
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s)), alphas[best], errors


def _views(flat, paths, lead, rows):
    return [calibration_lib.matrix(jnp.asarray(flat[p], jnp.float32), lead, rows) for p in paths]


def _group_scales(flat, paths, entry, o, g, folds: bool):
    """s [*lead, I] of one input group (ones where it cannot fold)."""
    lead, h, x = entry["lead"], entry["hessian"], entry["absmean"]
    if not folds:
        return np.ones(x.shape)
    w = jnp.concatenate(_views(flat, paths, lead, h.shape[-1]), axis=-1)
    search = functools.partial(search_scales, bits=o["bits"], group=g, sym=o["sym"], grid=o["grid"])
    if lead:
        return np.stack([np.asarray(search(w[i], jnp.asarray(h[i], jnp.float32), jnp.asarray(x[i]))[0], np.float64)
                         for i in range(w.shape[0])])
    return np.asarray(search(w, jnp.asarray(h, jnp.float32), jnp.asarray(x, jnp.float32))[0], np.float64)


@methods.register("awq", kind="quantize", needs_calibration=True,
                  options={"bits": "4", "group": "128", "sym": "true", "grid": "20"},
                  families=("gpt", "llama", "qwen", "bert"))
def awq_method(source: methods.Source, calibration, options) -> methods.Compressed:
    """AWQ: activation-aware per-channel scales (grid-searched, folded into the previous op), then int4/int8 RTN."""
    o = kernels.parse_quant_options(options, "awq")
    o["grid"] = kernels.parse(options, "grid", int, "awq")
    if o["grid"] < 1:
        raise ValueError(f"--method=awq: grid={o['grid']}; expected a positive number of alpha values")
    calibration_lib.check_supported(source.config, "awq")
    targets = kernels.quantized(source.params, o["group"], "awq")
    stats = calibration_lib.collect(source, calibration, stats=("hessian", "absmean"))
    original = calibration_lib.flat_params(source.params)
    flat = dict(original)
    scales, column_scales, folded = {}, {}, []
    for paths in calibration_lib.input_groups(stats).values():
        entry = stats[paths[0]]
        module = paths[0].rsplit("/", 1)[0] if "/" in paths[0] else ""
        fold = smoothing.predecessor(module, [p.rsplit("/", 1)[-1] for p in paths], original, source.config)
        g = targets[paths[0]][2]
        s = _group_scales(original, paths, entry, o, g, fold is not None)
        if fold is not None:
            smoothing.fold(flat, *fold, s)
            folded += paths
            if fold[0] == "columns":  # value / wi_up now output y / s: errors are measured times s
                column_scales[fold[1][0]] = s
        for p in paths:
            scales[p] = s
    errors, rtn_errors = {}, {}
    for path, (lead, axes, g) in targets.items():
        w = flat[path]
        fmt = "int4" if o["bits"] == 4 else "int8"
        if path not in stats:  # the token table: plain round to nearest
            flat[path] = quant.quantize_weight(w, fmt=fmt, group=g, sym=o["sym"], contract_axes=axes, lead=lead)
            continue
        h = stats[path]["hessian"]
        # the kernel as the model now uses it (output columns folded), before its rows are scaled
        w_IO = calibration_lib.matrix(jnp.asarray(w, jnp.float32), lead, h.shape[-1])
        s = jnp.asarray(scales[path], jnp.float32)
        scaled = w_IO * s[..., :, None]
        quantize = jax.vmap(functools.partial(rtn, bits=o["bits"], group=g, sym=o["sym"])) if lead else \
            functools.partial(rtn, bits=o["bits"], group=g, sym=o["sym"])
        codes, scale, zero, w_q = quantize(scaled)
        # errors in the original model's terms: the kernel's own outputs before any column fold,
        # against plain round to nearest of the original kernel
        approx = w_q / s[..., :, None]
        if path in column_scales:
            approx = approx * jnp.asarray(column_scales[path], jnp.float32)[..., None, :]
        w_orig = calibration_lib.matrix(jnp.asarray(original[path], jnp.float32), lead, h.shape[-1])
        errors[path] = stacked_layer_error(w_orig, approx, h)
        rtn_errors[path] = stacked_layer_error(w_orig, quantize(w_orig)[3], h)
        flat[path] = quant.QuantizedTensor.from_int(codes, scale, None if o["sym"] else zero, bits=o["bits"],
                                                    group=g, shape=tuple(w.shape), in_dims=len(axes), dtype=w.dtype)
    info = {"bits": o["bits"], "group": o["group"], "folded": folded, "layer_error": errors,
            "rtn_layer_error": rtn_errors, "mean_layer_error": float(np.mean(list(errors.values()))),
            "mean_rtn_layer_error": float(np.mean(list(rtn_errors.values())))}
    return methods.Compressed(calibration_lib.unflatten(flat), kernels.recorded(source.config, "awq", options), info)

