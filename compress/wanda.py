"""Wanda: pruning by weights and activations (Sun et al. 2023).

Magnitude pruning drops the smallest |W_io|; but a small weight on an input channel with large
activations can matter more than a large one on a quiet channel. Wanda scores each weight of
a kernel [I, O] by its size times its input's norm over the calibration tokens
(`compress.calibration`'s l2, ||X_i||_2 = sqrt(sum_t x_ti^2)):

    S_io = |W_io| * ||X_i||_2

and compares weights per output: for each output o, the `sparsity` fraction of its I inputs
with the smallest scores are dropped (`compress.masks.unstructured_mask` along the input axis);
with an N:M pattern, the M - N smallest of every M consecutive inputs (`compress.masks.nm_mask`).
No weight is updated (no second-order information, one pass). It prunes the kernels that
`compress.masks.prunable` names, as magnitude pruning does; `info` holds the layer
reconstruction errors ||X W - X W_pruned|| / ||X W|| of Wanda and of magnitude pruning at the
same sparsity, from the calibration Hessian.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from compress import calibration as calibration_lib
from compress import kernels, masks, methods
from compress.gptq import stacked_layer_error


def wanda_matrix(w_IO, l2_I, sparsity: float, n: int = 0, m: int = 0):
    """Wanda on a [*lead, I, O] view with input norms [*lead, I]: (pruned weights, keep mask)."""
    scores = jnp.abs(w_IO) * jnp.asarray(l2_I, w_IO.dtype)[..., :, None]
    keep = masks.nm_mask(scores, n, m, axis=-2) if m else masks.unstructured_mask(scores, sparsity, axis=-2)
    return jnp.where(keep, w_IO, 0.0), keep


@methods.register("wanda", kind="prune", needs_calibration=True, options={"sparsity": "0.5", "pattern": "unstructured"},
                  families=("gpt", "llama", "qwen", "bert"))
def wanda_method(source: methods.Source, calibration, options) -> methods.Compressed:
    """Wanda: prune by |weight| x input activation norm, per output, unstructured or N:M."""
    sparsity, n, m = kernels.parse_sparsity(options, "wanda")
    calibration_lib.check_supported(source.config, "wanda")
    targets = kernels.prunable(source.params, m, "wanda")
    stats = calibration_lib.collect(source, calibration, stats=("l2", "hessian"))
    flat = calibration_lib.flat_params(source.params)
    errors, magnitude_errors = {}, {}
    for path, (_, lead) in targets.items():
        w, entry = flat[path], stats[path]
        h = jnp.asarray(entry["hessian"], jnp.float32)
        w_IO = calibration_lib.matrix(jnp.asarray(w, jnp.float32), lead, h.shape[-1])
        pruned, _ = wanda_matrix(w_IO, entry["l2"], sparsity, n, m)
        errors[path] = stacked_layer_error(w_IO, pruned, h)
        magnitude_errors[path] = stacked_layer_error(w_IO, kernels.magnitude_matrix(w_IO, sparsity, n, m), h)
        flat[path] = pruned.reshape(w.shape).astype(w.dtype)
    info = {"sparsity": sparsity, "pattern": options["pattern"], "layer_error": errors,
            "magnitude_layer_error": magnitude_errors, "mean_layer_error": float(np.mean(list(errors.values()))),
            "mean_magnitude_layer_error": float(np.mean(list(magnitude_errors.values())))}
    return methods.Compressed(calibration_lib.unflatten(flat), kernels.recorded(source.config, "wanda", options), info)
