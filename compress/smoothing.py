"""Per-input-channel scales folded into the op before a kernel: the exact rewrite AWQ and
SmoothQuant share.

For a kernel group that reads one input X [n, I] (q/k/v; gate/up; ...), a positive scale
s [I] gives the same outputs when X is divided and the weights multiplied:

    X W = (X diag(1/s)) (diag(s) W)

The division is folded into the op that produces X, so nothing is added at run time:

    q/k/v (pre-LN)            the attention sub-layer's norm: scale /= s (and a LayerNorm's bias)
    gate/up or wi (pre-LN)    the feed-forward sub-layer's norm
    wo, gated MLP             wi_up's output columns (h = act(gate) * up is linear in up) and bias
    out                       value's output columns and bias, when every query head has its
                              own value head (N == K; with grouped heads a value head feeds
                              several query heads' channels, which would need equal scales)
    lm_head (untied)          the final norm

Anywhere else (post-LN layers, whose norm output also feeds the residual; a plain MLP's wo,
behind a nonlinearity; `out` under grouped-query attention) no fold is exact and the group
keeps s = 1. `predecessor` names the fold of a group; `fold` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def predecessor(module: str, names: Sequence[str], flat: Mapping[str, Any], config) -> tuple[str, list[str]] | None:
    """Where a group's 1/s folds: ("norm", [scale path, bias path?]) or ("columns", [kernel path,
    bias path?]), or None where no exact fold exists (module docstring).

    Args:
      module: the '/'-joined path of the module that sowed the input ("" for the LM head).
      names: the kernels that read it (e.g. ["query", "key", "value"]).
      flat: the flat params ({path: array}).
      config: the run config (`model.block.norm_position` tells pre-LN from post-LN).
    """
    pre_ln = config.model.block.get("norm_position", "pre") == "pre" and config.model.get("family") != "bert"
    parent = module.rsplit("/", 1)[0] if "/" in module else ""
    join = (lambda *parts: "/".join(p for p in parts if p))
    names = set(names)
    if names == {"lm_head"}:
        return _norm(flat, "final_norm")
    if names == {"query", "key", "value"} and module.endswith("self_attention") and pre_ln:
        return _norm(flat, join(parent, "attention_block/norm"))
    if names in ({"wi_gate", "wi_up"}, {"wi"}) and pre_ln:
        return _norm(flat, join(parent, "mlp_block/norm"))
    if names == {"wo"} and join(module, "wi_up") in flat:
        up = join(module, "wi_up")
        return "columns", [up] + ([up + "_bias"] if up + "_bias" in flat else [])
    if names == {"out"}:
        value, out = join(module, "value"), join(module, "out")
        if value in flat and np.shape(flat[value])[-2] == np.shape(flat[out])[-3]:  # K == N
            return "columns", [value] + ([value + "_bias"] if value + "_bias" in flat else [])
    return None


def _norm(flat, path: str):
    if path + "/scale" not in flat:
        return None
    return "norm", [path + "/scale"] + ([path + "/bias"] if path + "/bias" in flat else [])


def fold(flat: dict[str, Any], kind: str, paths: Sequence[str], s: np.ndarray) -> None:
    """Divides the producer of a group's input by s [*lead, I] in place (`predecessor`'s kind)."""
    for path in paths:
        x = np.asarray(flat[path], np.float64)
        if kind == "norm" or path.endswith("_bias") and x.ndim == s.ndim:
            flat[path] = (x / s).astype(flat[path].dtype)
            continue
        # a kernel's output columns (value [*lead, D, K, H], wi_up [*lead, D, F]) or a bias [*lead, K, H]
        lead = s.ndim - 1
        out_axes = x.ndim - lead - (0 if path.endswith("_bias") else 1)
        cols = x.reshape(*x.shape[:x.ndim - out_axes], -1)
        scale = s.reshape(*s.shape[:lead], *([1] * (cols.ndim - lead - 1)), s.shape[-1])
        flat[path] = (cols / scale).reshape(x.shape).astype(flat[path].dtype)


def scale_rows(w_IO: np.ndarray, s: np.ndarray) -> np.ndarray:
    """diag(s) W on a [*lead, I, O] view."""
    return w_IO * s[..., :, None]
