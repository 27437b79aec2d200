"""SmoothQuant: W8A8 with the activation outliers migrated into the weights (Xiao et al. 2023).

W8A8 runs a kernel's matmul in int8: weights per output channel (s_w = max_i |W_io| / 127,
offline) and activations per token (s_x = max_i |x_ti| / 127, at run time; `models.quant`'s
`act_quant`, executed by `models.layers.linear.project`). A few input channels of LLM
activations are 10-100x larger than the rest, so a token's absmax, and with it every other
channel's rounding step, is set by them. SmoothQuant divides each input channel by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          (alpha = 0.5 by default)

(max|X_j| over the calibration tokens, `compress.calibration`'s absmax; max|W_j| over the
row j of every kernel that reads X) and multiplies the weight rows by it, X W = (X / s)(s W):
the outliers are flattened, the weights take a share of the range. The division is folded
into the op that produces X (`compress.smoothing`: the pre-LN norms, wi_up for wo, value for
out when N == K); where no fold is exact the kernel runs plain W8A8 (s = 1).

Every kernel with calibration statistics runs W8A8; the token table (a lookup, not a matmul
of activations) is stored int8 per channel, weight-only.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from compress import calibration as calibration_lib
from compress import kernels, methods, smoothing
from models import quant


def smoothing_scales(absmax_I: np.ndarray, w_IO: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max_o |W_jo|^(1 - alpha) for a [*lead, I, O] view (1 where
    either maximum is 0: a dead channel has nothing to migrate)."""
    x = np.asarray(absmax_I, np.float64)
    w = np.max(np.abs(np.asarray(w_IO, np.float64)), axis=-1)
    ok = (x > 0) & (w > 0)
    s = np.where(ok, np.power(np.where(ok, x, 1.0), alpha) / np.power(np.where(ok, w, 1.0), 1.0 - alpha), 1.0)
    return s


@methods.register("smoothquant", kind="quantize", needs_calibration=True, options={"alpha": "0.5"},
                  families=("gpt", "llama", "qwen", "bert"))
def smoothquant_method(source: methods.Source, calibration, options) -> methods.Compressed:
    """SmoothQuant W8A8: activation outliers migrated into the weights, int8 weights and per-token int8 activations."""
    alpha = kernels.parse(options, "alpha", float, "smoothquant")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--method=smoothquant: alpha={alpha}; expected a migration strength in [0, 1]")
    calibration_lib.check_supported(source.config, "smoothquant")
    targets = kernels.quantized(source.params, 0, "smoothquant")
    stats = calibration_lib.collect(source, calibration, stats=("absmax",))
    original = calibration_lib.flat_params(source.params)
    flat = dict(original)
    scales, folded = {}, []
    for paths in calibration_lib.input_groups(stats).values():
        entry = stats[paths[0]]
        module = paths[0].rsplit("/", 1)[0] if "/" in paths[0] else ""
        fold = smoothing.predecessor(module, [p.rsplit("/", 1)[-1] for p in paths], original, source.config)
        rows = entry["absmax"].shape[-1]
        w = np.concatenate([np.asarray(calibration_lib.matrix(original[p], entry["lead"], rows)) for p in paths], -1)
        s = smoothing_scales(entry["absmax"], w, alpha) if fold is not None else np.ones(entry["absmax"].shape)
        if fold is not None:
            smoothing.fold(flat, *fold, s)
            folded += paths
        for p in paths:
            scales[p] = s
    for path, (lead, axes, _) in targets.items():
        w = flat[path]
        if path not in stats:  # the token table: int8 weight-only
            flat[path] = quant.quantize_weight(w, fmt="int8", contract_axes=axes, lead=lead)
            continue
        rows = scales[path].shape[-1]
        scaled = np.asarray(w, np.float64).reshape(*np.shape(w)[:lead], rows, -1) * scales[path][..., None]
        scaled = jnp.asarray(scaled.reshape(np.shape(w)), w.dtype)
        flat[path] = quant.quantize_weight(scaled, fmt="int8", contract_axes=axes, lead=lead).with_act_quant()
    # how much flatter each input got: max over channels of max|x| before and after the division
    info = {"alpha": alpha, "folded": folded,
            "activation_absmax": {p: (float(np.max(stats[p]["absmax"])), float(np.max(stats[p]["absmax"] / scales[p])))
                                  for p in stats}}
    return methods.Compressed(calibration_lib.unflatten(flat), kernels.recorded(source.config, "smoothquant", options),
                              info)
