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

from compress import kernels, masks, methods
from compress.gptq import prune_kernels


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
    return prune_kernels(source, calibration, options, "wanda", ("l2",),
                         lambda w_IO, entry, h: wanda_matrix(w_IO, entry["l2"], sparsity, n, m)[0], sparsity, n, m)
