"""Round-to-nearest weight quantization (`--method=rtn`): every kernel a matmul reads, stored
in one of `models.quant.FORMATS`, no calibration data.

    python -m compress --checkpoint=/tmp/tiny --method=rtn --option=format=int4 --option=group=64 \
        --option=sym=false --out=/tmp/tiny_int4

Options:
  format  int8 (per output channel), int4 (groups along the contraction axis, packed two per
          byte), nf4 (groups, double-quantized scales), fp8 (e4m3, per output channel);
  group   int4/nf4: input rows per scale (32/64/128...); a group >= a kernel's rows is one
          group; int8/fp8 ignore it (per channel);
  sym     int4: true (zero = 0, codes -7..7) or false (a zero point per group, codes 0..15).

Which kernels and along which axes: `models.quant.contraction` (the module docstring). The
result's `info` is measured from the stored arrays: bytes before and after, the share of
values quantized, and bits per quantized weight = 8 * bytes of the quantized tensors (codes,
scales, zero points, double quantization's constants) / their values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from compress.methods import Compressed, Source, register
from models import quant


def parse(options: Mapping[str, str]) -> dict[str, Any]:
    """format, group, sym from their strings; one-line errors naming the option."""
    fmt = options["format"]
    if fmt not in quant.FORMATS:
        raise ValueError(f"--option=format={fmt!r} is not a weight format; expected one of {quant.FORMATS}")
    try:
        group = int(options["group"])
    except ValueError:
        raise ValueError(f"--option=group={options['group']!r} is not an integer; e.g. --option=group=128") from None
    if group < 1:
        raise ValueError(f"--option=group={group}; expected a positive number of input rows, e.g. 128")
    sym = options["sym"].lower()
    if sym not in ("true", "false"):
        raise ValueError(f"--option=sym={options['sym']!r}; expected true or false")
    if fmt in ("int8", "fp8"):
        group = None  # per output channel
    return {"fmt": fmt, "group": group, "sym": sym == "true"}


def bits_info(float_params: Any, quantized: Any) -> dict[str, float]:
    """Bytes and bits per weight measured from the arrays of both trees."""
    leaves = jax.tree_util.tree_leaves(quantized, is_leaf=quant.is_quantized)
    q_leaves = [x for x in leaves if quant.is_quantized(x)]
    q_values = sum(math.prod(x.logical_shape) for x in q_leaves)
    q_bytes = sum(x.nbytes for x in q_leaves)
    total_values = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(float_params))
    return {"bits_per_weight": 8.0 * q_bytes / max(q_values, 1), "bytes": quant.tree_nbytes(quantized),
            "float_bytes": quant.tree_nbytes(float_params), "quantized_tensors": len(q_leaves),
            "quantized_fraction": q_values / max(total_values, 1)}


def check(params: Any, options: Mapping[str, str]) -> dict[str, Any]:
    """The parsed options, checked against every kernel's shape (before any work)."""
    parsed = parse(options)
    try:
        quant.check_groups(params, parsed["fmt"], parsed["group"], option="--option=group")
    except ValueError as e:
        raise ValueError(f"--method=rtn: {e}") from None
    return parsed


@register("rtn", kind="quantize", options={"format": "int4", "group": "128", "sym": "true"})
def rtn(source: Source, calibration: Sequence[Any] | None, options: Mapping[str, str]) -> Compressed:
    """Round-to-nearest weight-only quantization: int8, int4 (sym/asym groups), nf4 or fp8."""
    del calibration
    parsed = check(source.params, options)
    params = quant.quantize_params(source.params, fmt=parsed["fmt"], group=parsed["group"], sym=parsed["sym"])
    info = {"method": "rtn", "format": parsed["fmt"], "group": parsed["group"] or "channel",
            "sym": parsed["sym"], **bits_info(source.params, params)}
    config = source.config.copy_and_resolve_references()
    import ml_collections

    with config.unlocked():
        config.compress = ml_collections.ConfigDict({"method": "rtn", "options": dict(options)})
    return Compressed(params=params, config=config, info=info)
