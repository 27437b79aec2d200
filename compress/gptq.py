"""GPTQ and SparseGPT: one kernel at a time, each weight's error compensated by the ones after it.

Both solve the layer-wise problem  min ||X W - X W'||^2  over a quantized (GPTQ, Frantar et
al. 2022) or sparse (SparseGPT, Frantar & Alistarh 2023) W', with the Hessian H = X^T X / n of
the kernel's calibration inputs (`compress.calibration`). Axis letters: I the kernel's input
(contraction) width, O its output width, on its 2-D view W [I, O].

Optimal Brain Surgeon, one input row at a time. With U the upper Cholesky factor of the damped
inverse Hessian (U^T U = (H + lambda I)^-1, lambda = damp * mean(diag H)), rows are fixed in
order i = 0, 1, ...: row i becomes w'_i (quantized, or masked to zero), and its error, scaled
as e_i = (w_i - w'_i) / U_ii, is taken out of the rows still free:

    w_j -= U_ij e_i     for j > i          (the OBS update, in the Cholesky form of GPTQ)

Lazy batch updates: inside a block of `block` rows the update runs row by row; the rows after
the block receive the whole block's errors at once, W[i2:] -= U[i1:i2, i2:]^T E, one matmul.

GPTQ's grid: `bits` 4 or 8, groups of `group` consecutive input rows (0: the whole input, one
scale per output), symmetric (w ~ q s, q in [-(2^(b-1) - 1), 2^(b-1) - 1]) or asymmetric
(w ~ (q - z) s, q in [0, 2^b - 1]). A group's scales are chosen from its rows as they are when
the group is reached (already updated by the earlier errors); blocks are made a multiple of
the group so that a group never straddles two blocks. Act-order (`act_order`) fixes rows by
descending diag(H) (the inputs with the most energy first, while the most rows are left to
absorb their error); its groups stay groups of consecutive ORIGINAL rows (so storage is the
plain group-wise format) and their scales are chosen up front from the unmodified weights
("static groups", as AutoGPTQ's `static_groups`).

SparseGPT's choice: in each block (unstructured) the `sparsity` fraction of the block's
weights with the smallest w^2 / U_ii^2 is dropped (`compress.masks.unstructured_mask`); with
n:m, in each run of m consecutive input rows (reached as the rows are) the m - n smallest of
every output are dropped (`compress.masks.nm_mask`), the pattern of hardware 2:4 sparsity.

Inputs that never fire (H_ii = 0) get H_ii = 1 and weight 0, as the reference code does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from compress import calibration as calibration_lib
from compress import kernels, methods
from compress import masks as masks_lib
from models import quant

BLOCK = 128


def inverse_cholesky(h_II: jax.Array, damp: float) -> jax.Array:
    """Upper U with U^T U = (H + damp * mean(diag H) * I)^-1 (dead inputs given H_ii = 1)."""
    diag = jnp.diagonal(h_II)
    dead = diag == 0
    h_II = h_II + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(h_II.dtype))
    h_II = h_II + damp * jnp.mean(jnp.diagonal(h_II)) * jnp.eye(h_II.shape[0], dtype=h_II.dtype)
    lower = jnp.linalg.cholesky(h_II)
    eye = jnp.eye(h_II.shape[0], dtype=h_II.dtype)
    inv_lower = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    h_inv = inv_lower.T @ inv_lower
    # the upper factor of H^-1: the transpose of the lower Cholesky factor of H^-1 reversed
    return jnp.linalg.cholesky(h_inv).T


def grid_params(w_RO: jax.Array, *, bits: int, sym: bool) -> tuple[jax.Array, jax.Array]:
    """Scale and zero [O] of the rows `w_RO` of one group: sym absmax / (2^(b-1) - 1) and
    zero 0; asym (max - min) / (2^b - 1) over a range that includes 0, zero = round(-min / s)."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = jnp.max(jnp.abs(w_RO), axis=0) / qmax
        zero = jnp.zeros_like(scale)
    else:
        lo = jnp.minimum(jnp.min(w_RO, axis=0), 0.0)
        hi = jnp.maximum(jnp.max(w_RO, axis=0), 0.0)
        scale = (hi - lo) / (2 ** bits - 1)
        zero = jnp.round(-lo / jnp.where(scale == 0, 1.0, scale))
    return jnp.where(scale == 0, 1.0, scale), zero


def quantize_codes(w_O: jax.Array, scale_O: jax.Array, zero_O: jax.Array, *, bits: int, sym: bool) -> jax.Array:
    """Integer codes (as floats) of a row on the grid (scale, zero)."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        return jnp.clip(jnp.round(w_O / scale_O), -qmax, qmax)
    return jnp.clip(jnp.round(w_O / scale_O) + zero_O, 0, 2 ** bits - 1)


def _block_size(block: int, unit: int) -> int:
    """`block` rounded up to a multiple of `unit` (a group or an m of n:m)."""
    return max(unit, -(-block // unit) * unit)


def _zero_dead(w_IO, h_II):
    """The weights of inputs that never fire (H_ii = 0) set to 0: nothing constrains them."""
    return jnp.where((jnp.diagonal(h_II) == 0)[:, None], 0.0, w_IO)


@functools.partial(jax.jit, static_argnames=("bits", "group", "sym", "act_order", "block"))
def gptq(w_IO: jax.Array, h_II: jax.Array, *, bits: int = 4, group: int = 128, sym: bool = True,
         damp: float = 0.01, act_order: bool = False, block: int = BLOCK):
    """GPTQ of one [I, O] kernel view (module docstring).

    Args:
      w_IO: the float weights (their dtype is the computation's: float64 in tests).
      h_II: the Hessian X^T X / n of the kernel's calibration inputs.
      bits: 4 or 8.
      group: input rows per scale (0: I, per output channel); must divide I.
      sym: symmetric (zero 0) or asymmetric codes.
      damp: lambda as a fraction of mean(diag H).
      act_order: fix rows by descending diag(H) (static group scales).
      block: rows per lazy batch (rounded up to a multiple of the group).

    Returns:
      (codes [I, O] int32, scale [I/group, O], zero [I/group, O], w_q [I, O]) with
      w_q = (codes - zero[i // group]) * scale[i // group].
    """
    I, O = w_IO.shape
    group = group or I
    w_IO = _zero_dead(w_IO, h_II)
    n_groups = I // group
    perm = jnp.argsort(-jnp.diagonal(h_II), stable=True) if act_order else jnp.arange(I)
    group_of_row = perm // group
    if act_order:  # static groups: every group's scales from the unmodified weights
        scale_GO, zero_GO = jax.vmap(lambda g: grid_params(g, bits=bits, sym=sym))(w_IO.reshape(n_groups, group, O))
        w_IO, h_II = w_IO[perm], h_II[perm][:, perm]
    else:
        scale_GO = jnp.ones((n_groups, O), w_IO.dtype)
        zero_GO = jnp.zeros((n_groups, O), w_IO.dtype)
    u_II = inverse_cholesky(h_II, damp)
    block = _block_size(block, group)
    codes_IO = jnp.zeros((I, O), w_IO.dtype)
    for i1 in range(0, I, block):
        i2 = min(i1 + block, I)
        w1, u1 = w_IO[i1:i2], u_II[i1:i2, i1:i2]

        def row(j, carry, i1=i1, u1=u1, b=i2 - i1):
            w1, err1, codes1, scale_GO, zero_GO = carry
            i = i1 + j
            if not act_order:  # the group's scales from its rows as they are now
                fresh = grid_params(jax.lax.dynamic_slice_in_dim(w1, jnp.minimum(j, b - group), group), bits=bits,
                                    sym=sym)
                start = i % group == 0
                g = i // group
                scale_GO = jnp.where(start, scale_GO.at[g].set(fresh[0]), scale_GO)
                zero_GO = jnp.where(start, zero_GO.at[g].set(fresh[1]), zero_GO)
            g = group_of_row[i]
            w = w1[j]
            q = quantize_codes(w, scale_GO[g], zero_GO[g], bits=bits, sym=sym)
            w_q = (q - zero_GO[g]) * scale_GO[g]
            e = (w - w_q) / u1[j, j]
            later = (jnp.arange(b) > j)[:, None]
            w1 = w1 - jnp.where(later, u1[j][:, None] * e[None, :], 0.0)
            return w1, err1.at[j].set(e), codes1.at[j].set(q), scale_GO, zero_GO

        init = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1), scale_GO, zero_GO)
        w1, err1, codes1, scale_GO, zero_GO = jax.lax.fori_loop(0, i2 - i1, row, init)
        codes_IO = codes_IO.at[i1:i2].set(codes1)
        w_IO = w_IO.at[i2:].add(-u_II[i1:i2, i2:].T @ err1)
    inverse = jnp.argsort(perm)
    codes_IO = codes_IO[inverse]
    rows = jnp.arange(I) // group
    w_q = (codes_IO - zero_GO[rows]) * scale_GO[rows]
    return codes_IO.astype(jnp.int32), scale_GO, zero_GO, w_q


@functools.partial(jax.jit, static_argnames=("sparsity", "n", "m", "block"))
def sparsegpt(w_IO: jax.Array, h_II: jax.Array, *, sparsity: float = 0.5, n: int = 0, m: int = 0,
              damp: float = 0.01, block: int = BLOCK):
    """SparseGPT of one [I, O] kernel view (module docstring).

    Args:
      w_IO, h_II, damp, block: as `gptq`.
      sparsity: the fraction of weights dropped (unstructured; unused with n:m).
      n, m: keep n of every m consecutive input rows per output (0: unstructured); m divides I.

    Returns:
      (w_sparse [I, O], keep mask [I, O] bool).
    """
    I, O = w_IO.shape
    w_IO, u_II = _zero_dead(w_IO, h_II), inverse_cholesky(h_II, damp)
    block = _block_size(block, m) if m else block
    out_IO = jnp.zeros_like(w_IO)
    keep_IO = jnp.zeros((I, O), bool)
    for i1 in range(0, I, block):
        i2 = min(i1 + block, I)
        w1, u1 = w_IO[i1:i2], u_II[i1:i2, i1:i2]
        d = jnp.diagonal(u1)
        keep1 = (jnp.ones_like(w1, bool) if m else
                 masks_lib.unstructured_mask(jnp.square(w1) / jnp.square(d)[:, None], sparsity))

        def row(j, carry, u1=u1, d=d, b=i2 - i1):
            w1, err1, keep1 = carry
            if m:  # the n:m choice of the next m rows, from their current values
                start = jnp.minimum(j, b - m)
                scores = jnp.square(jax.lax.dynamic_slice_in_dim(w1, start, m)) / jnp.square(
                    jax.lax.dynamic_slice_in_dim(d, start, m))[:, None]
                fresh = jax.lax.dynamic_update_slice_in_dim(keep1, masks_lib.nm_mask(scores, n, m, axis=0), start, 0)
                keep1 = jnp.where(j % m == 0, fresh, keep1)
            w = w1[j]
            w_s = jnp.where(keep1[j], w, 0.0)
            e = (w - w_s) / u1[j, j]
            later = (jnp.arange(b) > j)[:, None]
            w1 = w1 - jnp.where(later, u1[j][:, None] * e[None, :], 0.0)
            w1 = w1.at[j].set(w_s)
            return w1, err1.at[j].set(e), keep1

        w1, err1, keep1 = jax.lax.fori_loop(0, i2 - i1, row, (w1, jnp.zeros_like(w1), keep1))
        out_IO = out_IO.at[i1:i2].set(w1)
        keep_IO = keep_IO.at[i1:i2].set(keep1)
        w_IO = w_IO.at[i2:].add(-u_II[i1:i2, i2:].T @ err1)
    return out_IO, keep_IO


def layer_error(w_IO, w_new_IO, h_II) -> float:
    """Relative layer reconstruction error ||X W - X W'|| / ||X W|| from H = X^T X / n:
    sqrt(tr(dW^T H dW) / tr(W^T H W)), in float64 on the host."""
    w, h = np.asarray(w_IO, np.float64), np.asarray(h_II, np.float64)
    d = w - np.asarray(w_new_IO, np.float64)
    den = np.sum(w * (h @ w))
    return float(np.sqrt(np.sum(d * (h @ d)) / (den if den > 0 else 1.0)))


@functools.partial(jax.jit, static_argnames=("bits", "group", "sym"))
def rtn(w_IO: jax.Array, *, bits: int, group: int, sym: bool):
    """Round to nearest on the same grid (no error feedback): (codes, scale, zero, w_q)."""
    I, O = w_IO.shape
    groups = w_IO.reshape(I // group, group, O)
    scale_GO, zero_GO = jax.vmap(lambda g: grid_params(g, bits=bits, sym=sym))(groups)
    rows = jnp.arange(I) // group
    codes = quantize_codes(w_IO, scale_GO[rows], zero_GO[rows], bits=bits, sym=sym)
    return codes.astype(jnp.int32), scale_GO, zero_GO, (codes - zero_GO[rows]) * scale_GO[rows]


# ----------------------------------------------------------------------------- the methods


def _per_slice(fn, w_LIO, h_LII):
    """fn(w [I, O], h [I, I]) on each stacked slice (lead 1) or on the one matrix (lead 0)."""
    if w_LIO.ndim == 2:
        return fn(w_LIO, h_LII)
    outs = [fn(w_LIO[i], h_LII[i]) for i in range(w_LIO.shape[0])]
    return tuple(jnp.stack(parts) for parts in zip(*outs))


def stacked_layer_error(w, w_new, h) -> float:
    """`layer_error` of a [I, O] view, or its mean over the layers of a stacked [L, I, O] one."""
    if w.ndim == 2:
        return layer_error(w, w_new, h)
    return float(np.mean([layer_error(w[i], w_new[i], h[i]) for i in range(w.shape[0])]))


@methods.register("gptq", kind="quantize", needs_calibration=True,
                  options={"bits": "4", "group": "128", "sym": "true", "damp": "0.01", "act_order": "false",
                           "block": str(BLOCK)},
                  families=("gpt", "llama", "qwen", "bert"))
def gptq_method(source: methods.Source, calibration, options) -> methods.Compressed:
    """GPTQ: group-wise int4 / per-channel int8 codes with Hessian-weighted error compensation."""
    o = kernels.parse_quant_options(options, "gptq")
    calibration_lib.check_supported(source.config, "gptq")
    targets = kernels.quantized(source.params, o["group"], "gptq")
    stats = calibration_lib.collect(source, calibration, stats=("hessian",))
    flat = calibration_lib.flat_params(source.params)
    errors, rtn_errors = {}, {}
    for path, (lead, axes, g) in targets.items():
        w = flat[path]
        fmt = "int4" if o["bits"] == 4 else "int8"
        if path not in stats:  # the token table: round to nearest on the same grid
            flat[path] = quant.quantize_weight(w, fmt=fmt, group=g, sym=o["sym"], contract_axes=axes, lead=lead)
            continue
        h = jnp.asarray(stats[path]["hessian"], jnp.float32)
        w_IO = calibration_lib.matrix(jnp.asarray(w, jnp.float32), lead, h.shape[-1])
        codes, scale, zero, w_q = _per_slice(functools.partial(
            gptq, bits=o["bits"], group=g, sym=o["sym"], damp=o["damp"], act_order=o["act_order"], block=o["block"]),
            w_IO, h)
        rtn_q = _per_slice(lambda a, _, g=g: rtn(a, bits=o["bits"], group=g, sym=o["sym"]), w_IO, h)[3]
        errors[path], rtn_errors[path] = stacked_layer_error(w_IO, w_q, h), stacked_layer_error(w_IO, rtn_q, h)
        flat[path] = quant.QuantizedTensor.from_int(codes, scale, None if o["sym"] else zero, bits=o["bits"],
                                                    group=g, shape=tuple(w.shape), in_dims=len(axes),
                                                    dtype=w.dtype)
    info = {"bits": o["bits"], "group": o["group"], "layer_error": errors, "rtn_layer_error": rtn_errors,
            "mean_layer_error": float(np.mean(list(errors.values()))),
            "mean_rtn_layer_error": float(np.mean(list(rtn_errors.values())))}
    return methods.Compressed(calibration_lib.unflatten(flat), kernels.recorded(source.config, "gptq", options), info)


@methods.register("sparsegpt", kind="prune", needs_calibration=True,
                  options={"sparsity": "0.5", "pattern": "unstructured", "damp": "0.01", "block": str(BLOCK)},
                  families=("gpt", "llama", "qwen", "bert"))
def sparsegpt_method(source: methods.Source, calibration, options) -> methods.Compressed:
    """SparseGPT: unstructured or N:M sparsity with Hessian-weighted error compensation."""
    sparsity, n, m = kernels.parse_sparsity(options, "sparsegpt")
    damp, block = kernels.parse(options, "damp", float, "sparsegpt"), kernels.parse(options, "block", int, "sparsegpt")
    prune = functools.partial(sparsegpt, sparsity=sparsity, n=n, m=m, damp=damp, block=block)
    return prune_kernels(source, calibration, options, "sparsegpt", ("hessian",),
                         lambda w_IO, entry, h: _per_slice(prune, w_IO, h)[0], sparsity, n, m)


def prune_kernels(source: methods.Source, calibration, options, method: str, stats: tuple[str, ...], prune,
                  sparsity: float, n: int, m: int) -> methods.Compressed:
    """Every prunable kernel of `source` replaced by `prune(w_IO, its statistics, its Hessian)`
    ([*lead, I, O] views), with each kernel's layer error against magnitude pruning at the same
    pattern in `info` (SparseGPT's and Wanda's shared loop)."""
    calibration_lib.check_supported(source.config, method)
    targets = kernels.prunable(source.params, m, method)
    entries = calibration_lib.collect(source, calibration, stats=tuple(dict.fromkeys(("hessian", *stats))))
    flat = calibration_lib.flat_params(source.params)
    errors, magnitude_errors = {}, {}
    for path, (_, lead) in targets.items():
        w, entry = flat[path], entries[path]
        h = jnp.asarray(entry["hessian"], jnp.float32)
        w_IO = calibration_lib.matrix(jnp.asarray(w, jnp.float32), lead, h.shape[-1])
        pruned = prune(w_IO, entry, h)
        errors[path] = stacked_layer_error(w_IO, pruned, h)
        magnitude_errors[path] = stacked_layer_error(w_IO, kernels.magnitude_matrix(w_IO, sparsity, n, m), h)
        flat[path] = pruned.reshape(w.shape).astype(w.dtype)
    info = {"sparsity": sparsity, "pattern": options["pattern"], "layer_error": errors,
            "magnitude_layer_error": magnitude_errors, "mean_layer_error": float(np.mean(list(errors.values()))),
            "mean_magnitude_layer_error": float(np.mean(list(magnitude_errors.values())))}
    return methods.Compressed(calibration_lib.unflatten(flat), kernels.recorded(source.config, method, options), info)
