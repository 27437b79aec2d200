"""Pruning masks: which weights to keep, by score, and the params trees they apply to.

A mask is a boolean array shaped like the weight it prunes, True where the weight is kept.
Every pruning method is "score, then select": magnitude pruning scores w by |w|, Wanda by
|w| * ||x||, SparseGPT by w^2 / [H^-1]_ii; this module only selects.

    unstructured_mask(s, p)          keep the largest (1 - p) fraction of the whole array
    unstructured_mask(s, p, axis=0)  the same within every 1-D slice running along axis 0
    nm_mask(s, n=2, m=4, axis=0)     keep the n largest of every m consecutive along axis 0

Counts are exact: of a slice of L scores, round(p * L) are pruned (Python's round), whatever
the values. Ties are broken by position: of equal scores the one at the smaller index is kept
(a stable sort of the negated scores), so a mask depends only on the scores. NaN scores rank
lowest.

Kernels and their contraction axis. lmlab stores a projection's kernel input-first:
`[*lead, *in, *out]`, where `lead` is a stacked "layers" axis (`scan_layers`) and/or an
"expert" axis. The input (contraction) axes of each kernel are (`KERNEL_LAYOUTS`):

    mlp     wi, wi_gate, wi_up [D, F]     wo [F, D]              in = axis 0 of the pair
    attn    query, key, value [D, N|K, H] (MLA: query_up, key_up, value_up [R, N, H])
            out [N, H, D]                 in = (N, H): the two axes before D
    MLA     query_down, kv_down [D, R], key_rope [D, H_r]

N:M sparsity runs along the contraction axis, as hardware 2:4 does (NVIDIA's sparse tensor
cores hold, in every row of the [out, in] weight, 2 nonzeros in each 4 consecutive inputs):
for `out` [N, H, D] the groups are 4 consecutive entries of the flattened N*H input, i.e. of
H within one head, since H is a multiple of 4 in every preset. `kernel_matrix` gives the
[*lead, I, O] view in which the contraction is axis -2, and the selections below take that
view's axis.

Embeddings, the LM head, routers and norms are never pruned (as in SparseGPT and Wanda: the
prunable weights are the linear layers inside the blocks).

Paths are tuples of keys, as `flax.traverse_util.flatten_dict` gives them; masks of a params
tree are a flat {path: mask} dict over its prunable kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]

# Leaf name -> (number of input axes, number of output axes) of the kernel, after its lead axes.
ATTENTION_KERNELS = {"query": (1, 2), "key": (1, 2), "value": (1, 2), "out": (2, 1),
                     "query_up": (1, 2), "key_up": (1, 2), "value_up": (1, 2),
                     "query_down": (1, 1), "kv_down": (1, 1), "key_rope": (1, 1)}
MLP_KERNELS = {"wi": (1, 1), "wi_gate": (1, 1), "wi_up": (1, 1), "wo": (1, 1)}
ATTENTION_SCOPES = ("self_attention", "cross_attention", "latent_kv")
MLP_SCOPES = ("mlp", "shared")


def _ranks_descending(scores: jax.Array, axis: int) -> jax.Array:
    """Each score's place along `axis` in decreasing order (0 = largest), ties by position."""
    scores = jnp.asarray(scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    order = jnp.argsort(-scores, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True)


def _check_sparsity(sparsity: float) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must lie in [0, 1] (the fraction of weights removed)")
    return sparsity


def unstructured_mask(scores: jax.Array, sparsity: float, axis: int | None = None) -> jax.Array:
    """Keeps the largest scores: a boolean mask with round(sparsity * L) False per selection.

    Args:
      scores: importance of each weight (larger is kept).
      sparsity: the fraction to prune, in [0, 1].
      axis: None: one selection over the whole array; an int: one selection within every 1-D
        slice running along that axis (e.g. axis=0 of an [in, out] kernel compares the inputs of
        each output, as Wanda does).

    Returns:
      bool array of `scores.shape`, True where kept.
    """
    sparsity = _check_sparsity(sparsity)
    scores = jnp.asarray(scores)
    if axis is None:
        flat = scores.reshape(-1)
        keep = flat.size - round(sparsity * flat.size)
        return (_ranks_descending(flat, 0) < keep).reshape(scores.shape)
    axis = _axis(scores, axis)
    size = scores.shape[axis]
    keep = size - round(sparsity * size)
    return _ranks_descending(scores, axis) < keep


def nm_mask(scores: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    """N:M semi-structured mask: in every m consecutive entries along `axis`, the n largest kept.

    Args:
      scores: importance of each weight.
      n, m: keep n of every m (0 <= n <= m).
      axis: the axis the groups run along; its size must be divisible by m.

    Returns:
      bool array of `scores.shape`, exactly n True in each group.
    """
    if not (isinstance(n, int | np.integer) and isinstance(m, int | np.integer) and 0 <= n <= m and m > 0):
        raise ValueError(f"N:M sparsity needs integers 0 <= n <= m, m > 0; got n={n}, m={m}")
    scores = jnp.asarray(scores)
    axis = _axis(scores, axis)
    size = scores.shape[axis]
    if size % m:
        raise ValueError(f"{n}:{m} needs a dimension divisible by {m}; axis {axis} of shape {scores.shape} has "
                         f"size {size}")
    moved = jnp.moveaxis(scores, axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], size // m, m)
    keep = (_ranks_descending(grouped, -1) < n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, axis)


def _axis(x: jax.Array, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for an array of shape {x.shape}")
    return axis % x.ndim


# ------------------------------------------------------------------------ kernels of a tree


def kernel_layout(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(lead, in, out) axis counts of the kernel at `path`, or None if it is not prunable."""
    name, scopes = path[-1], path[:-1]
    table = (ATTENTION_KERNELS if any(s in ATTENTION_SCOPES for s in scopes[-2:]) else
             MLP_KERNELS if scopes and scopes[-1] in MLP_SCOPES else {})
    if name not in table:
        return None
    n_in, n_out = table[name]
    lead = len(shape) - n_in - n_out
    if lead < 0:
        raise ValueError(f"kernel {'/'.join(path)} has shape {shape}; expected {n_in} input and {n_out} output axes")
    return lead, n_in, n_out


def prunable(params: Any) -> dict[Path, jax.Array]:
    """{path: kernel} of the prunable kernels of a params tree (see the module docstring)."""
    flat = traverse_util.flatten_dict(_unfreeze(params))
    return {path: w for path, w in flat.items() if kernel_layout(path, np.shape(w)) is not None}


def matrix_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape [*lead, I, O] of a kernel's matrix view (`kernel_matrix`)."""
    lead, n_in, _ = kernel_layout(path, shape)
    return (*shape[:lead], math.prod(shape[lead:lead + n_in]), math.prod(shape[lead + n_in:]))


def kernel_matrix(path: Path, w: jax.Array) -> jax.Array:
    """The [*lead, I, O] view of a kernel: its input axes merged into I (axis -2), outputs into O."""
    return w.reshape(matrix_shape(path, w.shape))


def kernel_nm_mask(path: Path, scores: jax.Array, n: int = 2, m: int = 4) -> jax.Array:
    """N:M mask of the kernel at `path` along its contraction axis, shaped like the kernel."""
    matrix = kernel_matrix(path, scores)
    if matrix.shape[-2] % m:
        raise ValueError(f"{n}:{m} needs a dimension divisible by {m}; kernel {'/'.join(path)} {scores.shape} has "
                         f"{matrix.shape[-2]} inputs")
    return nm_mask(matrix, n, m, axis=-2).reshape(scores.shape)


def apply_masks(params: Any, masks: Mapping[Path, jax.Array]) -> Any:
    """The params tree with every masked kernel's dropped weights set to zero (others unchanged)."""
    flat = traverse_util.flatten_dict(_unfreeze(params))
    missing = [p for p in masks if p not in flat]
    if missing:
        raise ValueError(f"mask for {'/'.join(missing[0])}, which the params tree does not have")
    for path, mask in masks.items():
        if mask.shape != flat[path].shape:
            raise ValueError(f"mask {mask.shape} for {'/'.join(path)} does not match its kernel {flat[path].shape}")
        flat[path] = jnp.where(mask, flat[path], jnp.zeros((), flat[path].dtype))
    return traverse_util.unflatten_dict(flat)


def nonzero_masks(params: Any) -> dict[Path, jax.Array]:
    """{path: w != 0} over the prunable kernels: the pattern a pruned checkpoint carries."""
    return {path: w != 0 for path, w in prunable(params).items()}


def count_zeros(params: Any) -> tuple[int, int]:
    """(zeros, total) over the prunable kernels of a params tree."""
    kernels = prunable(params)
    zeros = sum(int(jnp.sum(w == 0)) for w in kernels.values())
    return zeros, sum(int(np.size(w)) for w in kernels.values())


def sparsity(params: Any) -> float:
    """Fraction of zeros among the prunable kernels' weights."""
    zeros, total = count_zeros(params)
    return zeros / total if total else 0.0


def _unfreeze(params: Any) -> dict:
    return params.unfreeze() if hasattr(params, "unfreeze") else dict(params)
