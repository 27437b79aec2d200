"""The kernels a calibrated method rewrites, their options, and what the result records.

Quantizing methods (GPTQ, AWQ, SmoothQuant) rewrite every kernel that `models.quant.contraction`
names (the format's own rule: q/k/v/out, the feed-forward kernels, an untied LM head, the
token table as its tied head), through `models.quant.QuantizedTensor.from_int` or
`quantize_weight`; pruning methods (SparseGPT, Wanda) rewrite every kernel that
`compress.masks.prunable` names (attention and feed-forward kernels inside the blocks). Bad
options and kernels a group or an N:M pattern does not fit are one-line errors raised here,
before any calibration work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from compress import calibration as calibration_lib
from compress import masks as masks_lib
from models import quant


def parse_quant_options(options: Mapping[str, str], method: str) -> dict:
    """bits, group, sym (and GPTQ's damp, act_order, block) from their strings; one-line errors."""
    out = {"bits": parse(options, "bits", int, method), "group": parse(options, "group", int, method),
           "sym": parse(options, "sym", _bool, method)}
    if out["bits"] not in (4, 8):
        raise ValueError(f"--method={method}: bits={out['bits']}; expected 4 or 8")
    if out["bits"] == 8 and not out["sym"]:
        raise ValueError(f"--method={method}: bits=8 is stored symmetric; set sym=true")
    if out["group"] < 0 or (out["bits"] == 4 and out["group"] % 2):
        raise ValueError(f"--method={method}: group={out['group']}; expected 0 (per output channel) or a positive "
                         "even number of input rows (4-bit codes pack two rows per byte)")
    for key, kind in (("damp", float), ("act_order", _bool), ("block", int)):
        if key in options:
            out[key] = parse(options, key, kind, method)
    if out.get("damp", 0.0) < 0 or out.get("block", 1) < 1:
        raise ValueError(f"--method={method}: damp={out.get('damp')} must be >= 0 and block={out.get('block')} >= 1")
    return out


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "1")


def parse(options: Mapping[str, str], key: str, kind, method: str):
    try:
        return kind(options[key])
    except ValueError:
        raise ValueError(f"--method={method}: option {key}={options[key]!r} is not a valid {kind.__name__}") from None


def kernel_group(group: int, rows: int) -> int:
    """The group of a kernel with `rows` input rows: `group`, or all rows if 0 or larger."""
    return rows if group == 0 or group >= rows else group


def quantized(params, group: int, method: str) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """{path: (lead, contract_axes, group)} of every kernel `models.quant.contraction` quantizes;
    a group that does not divide a kernel's input rows is a one-line error (before any work)."""
    out = {}
    for path, w in calibration_lib.flat_params(params).items():
        rule = quant.contraction(path, tuple(w.shape))
        if rule is None:
            continue
        rows = math.prod(w.shape[a] for a in rule[1])
        g = kernel_group(group, rows)
        if rows % g:
            raise ValueError(f"--method={method}: group={group} does not divide the contraction dimension {rows} of "
                             f"{path} {tuple(w.shape)}; use a group that divides it, e.g. "
                             f"{quant.group_divisors(rows)[:3]}")
        out[path] = (rule[0], rule[1], g)
    return out


def recorded(config, method: str, options: Mapping[str, str]):
    """A copy of the run config whose `compress` section records the method and its options."""
    import ml_collections

    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.compress = ml_collections.ConfigDict({"method": method, "options": dict(options)})
    return out


def parse_sparsity(options: Mapping[str, str], method: str) -> tuple[float, int, int]:
    """(sparsity, n, m) from `sparsity` and `pattern` ("unstructured" or "N:M")."""
    sparsity = parse(options, "sparsity", float, method)
    pattern = options["pattern"]
    if pattern == "unstructured":
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"--method={method}: sparsity={sparsity}; expected a fraction in [0, 1)")
        return sparsity, 0, 0
    n, sep, m = pattern.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"--method={method}: pattern={pattern!r}; expected 'unstructured' or 'N:M' with 0 < N < M, "
                         "e.g. 2:4")
    return 1.0 - int(n) / int(m), int(n), int(m)


def prunable(params, m: int, method: str) -> dict[str, tuple[tuple[str, ...], int]]:
    """{path: (tuple path, lead)} of the kernels `compress.masks` prunes; with n:m, an input
    dimension that m does not divide is a one-line error (before any work)."""
    out = {}
    for key, w in masks_lib.prunable(params).items():
        path = "/".join(key)
        lead, n_in, _ = masks_lib.kernel_layout(key, np.shape(w))
        rows = math.prod(np.shape(w)[lead:lead + n_in])
        if m and rows % m:
            raise ValueError(f"--method={method}: the N:M pattern needs input dimensions divisible by {m}; {path} "
                             f"{tuple(np.shape(w))} has {rows}")
        out[path] = (key, lead)
    return out


def magnitude_matrix(w_IO, sparsity: float, n: int, m: int):
    """Magnitude pruning of a [*lead, I, O] view at the same pattern (the baseline)."""
    if m:
        keep = masks_lib.nm_mask(jnp.abs(w_IO), n, m, axis=-2)
    elif w_IO.ndim == 3:
        keep = jnp.stack([masks_lib.unstructured_mask(jnp.abs(x), sparsity) for x in w_IO])
    else:
        keep = masks_lib.unstructured_mask(jnp.abs(w_IO), sparsity)
    return jnp.where(keep, w_IO, 0.0)
