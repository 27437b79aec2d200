"""Pruning methods: magnitude (layer-wise, global) and N:M, and the helpers all pruners share.

Unstructured and semi-structured (the shapes stay; weights become zeros, `compress.masks`):

    magnitude      score |w|; scope=layer: each prunable kernel (each layer's slice of a scanned
                   stack) loses round(s * size) weights; scope=global: one threshold over all
                   prunable kernels (Han et al. 2015)
    magnitude_nm   score |w|; n of every m consecutive inputs kept (2:4, Mishra et al. 2021),
                   along each kernel's contraction axis (`compress.masks` docstring)

Structured pruning that shrinks the model (prune_heads, prune_neurons, prune_layers) is in
`compress.prune_structured`.

Every method's `info` holds `sparsity` (the fraction of the prunable weights, `compress.masks`,
that are zero or removed), `params` (stored parameters after) and `params_before`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from compress import masks as masks_lib
from compress.methods import Compressed, Source, register

SCOPES = ("layer", "global")


# ----------------------------------------------------------------------------- options


def fraction_option(options: Mapping[str, str], key: str = "sparsity") -> float:
    try:
        value = float(options[key])
    except ValueError:
        raise ValueError(f"--option={key}={options[key]!r} is not a number; e.g. --option={key}=0.5") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"--option={key}={value} must lie in [0, 1)")
    return value


def integer_option(options: Mapping[str, str], key: str) -> int:
    try:
        return int(options[key])
    except ValueError:
        raise ValueError(f"--option={key}={options[key]!r} is not an integer") from None


def choice_option(options: Mapping[str, str], key: str, allowed: Sequence[str]) -> str:
    if options[key] not in allowed:
        raise ValueError(f"--option={key}={options[key]!r}; expected one of {tuple(allowed)}")
    return options[key]


def num_params(params: Any) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))


def prunable_count(params: Any) -> int:
    return sum(int(np.size(w)) for w in masks_lib.prunable(params).values())


# ---------------------------------------------------------------- magnitude and N:M


def _layer_slices(path: masks_lib.Path, w: jax.Array) -> int:
    """How many leading axes of a kernel are stacked layers/experts (selected one by one)."""
    lead, _, _ = masks_lib.kernel_layout(path, w.shape)
    return lead


def magnitude_masks(params: Any, sparsity: float, scope: str = "layer") -> dict[masks_lib.Path, jax.Array]:
    """{path: mask} keeping the largest |w| of the prunable kernels.

    Args:
      params: a model's params tree.
      sparsity: fraction of the prunable weights to remove.
      scope: "layer": each kernel (each layer's and expert's slice of a stacked one) alone;
        "global": one ranking over every prunable weight of the model.
    """
    kernels = masks_lib.prunable(params)
    if scope == "global":
        flat = jnp.concatenate([jnp.abs(w).reshape(-1) for w in kernels.values()])
        keep = masks_lib.unstructured_mask(flat, sparsity)
        out, start = {}, 0
        for path, w in kernels.items():
            out[path] = keep[start:start + w.size].reshape(w.shape)
            start += w.size
        return out
    out = {}
    for path, w in kernels.items():
        lead = _layer_slices(path, w)
        per_slice = jnp.abs(w).reshape(*w.shape[:lead], -1)  # one selection per layer/expert slice
        out[path] = masks_lib.unstructured_mask(per_slice, sparsity, axis=-1).reshape(w.shape)
    return out


def nm_masks(params: Any, n: int = 2, m: int = 4) -> dict[masks_lib.Path, jax.Array]:
    """{path: N:M mask of |w| along the contraction axis} over the prunable kernels."""
    kernels = masks_lib.prunable(params)
    for path, w in kernels.items():  # every kernel checked before any work
        inputs = masks_lib.matrix_shape(path, w.shape)[-2]
        if inputs % m:
            raise ValueError(f"{n}:{m} needs a dimension divisible by {m}; kernel {'/'.join(path)} {w.shape} has "
                             f"{inputs} inputs")
    return {path: masks_lib.kernel_nm_mask(path, jnp.abs(w), n, m) for path, w in kernels.items()}


def recorded_config(config, method: str, options: Mapping[str, str]):
    """A copy of the run config whose `compress` section records the method and its options
    (`compress.io` adds the stored tensors' description)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.compress = ml_collections.ConfigDict({"method": method, "options": dict(options)})
    return config


def _masked_result(source: Source, masks: Mapping, info: dict, options: Mapping[str, str]) -> Compressed:
    params = masks_lib.apply_masks(source.params, masks)
    zeros, total = masks_lib.count_zeros(params)
    info = {**info, "sparsity": zeros / total, "zeros": zeros, "prunable": total,
            "params": num_params(params), "params_before": num_params(source.params),
            "nonzero_params": num_params(params) - zeros}
    return Compressed(params=params, config=recorded_config(source.config, info["method"], options), info=info)


@register("magnitude", kind="prune", options={"sparsity": "0.5", "scope": "layer"})
def magnitude(source: Source, calibration, options) -> Compressed:
    """Unstructured magnitude pruning: the smallest |w| of each kernel (scope=layer) or of the model (global)."""
    sparsity = fraction_option(options)
    scope = choice_option(options, "scope", SCOPES)
    return _masked_result(source, magnitude_masks(source.params, sparsity, scope),
                          {"method": "magnitude", "scope": scope, "target_sparsity": sparsity}, options)


@register("magnitude_nm", kind="prune", options={"n": "2", "m": "4"})
def magnitude_nm(source: Source, calibration, options) -> Compressed:
    """N:M semi-structured magnitude pruning (2:4): n of every m consecutive inputs of each kernel kept."""
    n, m = integer_option(options, "n"), integer_option(options, "m")
    if not 0 < n < m:
        raise ValueError(f"--option=n={n} --option=m={m}: N:M pruning needs 0 < n < m (e.g. n=2, m=4)")
    return _masked_result(source, nm_masks(source.params, n, m), {"method": "magnitude_nm", "n": n, "m": m}, options)
