"""GPTQ (compress/gptq.py) against a float64 numpy re-implementation of the paper's algorithm.

The reference follows the authors' `fasterquant` loop in their [out, in] layout (W1[:, i:] -=
err1 Hinv1[i, i:], lazy W[:, i2:] -= Err1 Hinv[i1:i2, i2:]), written here with numpy. It
chooses a group's scales from the block's current columns W1 (where the authors read the
block-start W): the "as columns are reached" rule that compress/gptq.py documents. lmlab's
jitted version runs in float64 here (jax.enable_x64), so both compute the same real numbers
up to float64 rounding: codes must be equal, weights within the float64 error bound of
computing through an inverse, I * cond(H + lambda I) * eps64 relative to their size.
"""

import jax
import numpy as np
import pytest

from compress import gptq as gptq_lib

EPS64 = np.finfo(np.float64).eps


def _grid(w_OR, bits, sym):
    """Scale and zero of each output row over a group's columns (the storage format's grid)."""
    if sym:
        scale = np.abs(w_OR).max(1) / (2 ** (bits - 1) - 1)
        zero = np.zeros_like(scale)
    else:
        lo, hi = np.minimum(w_OR.min(1), 0), np.maximum(w_OR.max(1), 0)
        scale = (hi - lo) / (2 ** bits - 1)
        zero = np.round(-lo / np.where(scale == 0, 1, scale))
    return np.where(scale == 0, 1, scale), zero


def _quant(w, scale, zero, bits, sym):
    if sym:
        qmax = 2 ** (bits - 1) - 1
        return np.clip(np.round(w / scale), -qmax, qmax)
    return np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)


def _hinv_upper(H, damp):
    H = H.copy()
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    return np.linalg.cholesky(np.linalg.inv(H)).T


def reference_gptq(W_OI, H, *, bits, group, sym, damp, blocksize, act_order):
    """The authors' fasterquant in numpy float64; returns codes, scale, zero in [out, in]."""
    W = W_OI.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    O, I = W.shape
    group = group or I
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        static = [_grid(W[:, i:i + group], bits, sym) for i in range(0, I, group)]
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _hinv_upper(H, damp)
    Q = np.zeros_like(W)
    scales = np.zeros((I // group, O))
    zeros = np.zeros((I // group, O))
    blocksize = max(group, -(-blocksize // group) * group)
    for i1 in range(0, I, blocksize):
        i2 = min(i1 + blocksize, I)
        W1, Err1, Hinv1 = W[:, i1:i2].copy(), np.zeros((O, i2 - i1)), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if act_order:
                g = perm[i1 + i] // group
                scale, zero = static[g]
            elif (i1 + i) % group == 0:
                g = (i1 + i) // group
                scale, zero = _grid(W1[:, i:i + group], bits, sym)
            scales[g], zeros[g] = scale, zero
            w = W1[:, i]
            q = _quant(w, scale, zero, bits, sym)
            Q[:, i1 + i] = q
            err = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, np.argsort(perm)]
    return Q, scales, zeros


def reference_sparsegpt(W_OI, H, *, sparsity, n, m, damp, blocksize):
    """The authors' fasterprune in numpy float64 (n:m keeps n of m; counts as compress.masks)."""
    W = W_OI.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    O, I = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _hinv_upper(H, damp)
    for i1 in range(0, I, blocksize):
        i2 = min(i1 + blocksize, I)
        W1, Err1, Hinv1 = W[:, i1:i2].copy(), np.zeros((O, i2 - i1)), Hinv[i1:i2, i1:i2]
        d = np.diag(Hinv1)
        prune = np.zeros_like(W1, bool)
        if not m:
            tmp = (W1 ** 2 / d[None, :] ** 2).T.reshape(-1)  # [in, out] order, as lmlab's masks rank
            k = round(sparsity * tmp.size)
            drop = np.argsort(tmp, kind="stable")[:k]
            prune = np.zeros(tmp.size, bool)
            prune[drop] = True
            prune = prune.reshape(i2 - i1, O).T
        for i in range(i2 - i1):
            if m and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2
                smallest = np.argsort(tmp, axis=1, kind="stable")[:, :m - n]
                np.put_along_axis(prune[:, i:i + m], smallest, True, axis=1)
            w = W1[:, i]
            q = np.where(prune[:, i], 0.0, w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def _tolerance(H, scale, damp=0.01):
    """I * cond(H + lambda I) * eps64 * scale: the two sides invert the damped Hessian by
    different routes (Cholesky solves against np.linalg.inv), each exact to cond * eps
    relative, and every row takes up to I updates through the inverse's factor."""
    damped = H + damp * np.mean(np.diag(H)) * np.eye(len(H))
    live = np.diag(H) > 0
    return len(H) * np.linalg.cond(damped[live][:, live]) * EPS64 * scale


def _problem(I=80, O=24, n=400, seed=0, dead=True):
    """Correlated inputs with uneven channel scales (and one dead input), and a weight."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(I, I)) / np.sqrt(I) + np.eye(I)
    X = rng.normal(size=(n, I)) @ mix * np.exp(rng.normal(scale=0.7, size=I))
    if dead:
        X[:, 5] = 0
    W = rng.normal(size=(I, O)) * 0.05
    return X, W, X.T @ X / n


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 16, True, False), (4, 16, False, False),
                                                      (8, 0, True, False), (4, 16, True, True),
                                                      (3, 40, False, True)])
def test_gptq_equals_the_float64_reference(bits, group, sym, act_order):
    _, W, H = _problem()
    with jax.enable_x64(True):
        codes, scale, zero, w_q = gptq_lib.gptq(W, H, bits=bits, group=group, sym=sym, damp=0.01,
                                                act_order=act_order, block=32)
        codes, scale, zero, w_q = map(np.asarray, (codes, scale, zero, w_q))
    Q, ref_scale, ref_zero = reference_gptq(W.T, H, bits=bits, group=group, sym=sym, damp=0.01, blocksize=32,
                                            act_order=act_order)
    np.testing.assert_array_equal(codes, Q.T)
    np.testing.assert_allclose(scale, ref_scale, rtol=0, atol=_tolerance(H, np.abs(ref_scale).max()))
    np.testing.assert_array_equal(zero, ref_zero)
    g = group or W.shape[0]
    rows = np.arange(W.shape[0]) // g
    np.testing.assert_allclose(w_q, (codes - zero[rows]) * scale[rows], rtol=0, atol=0)
    assert codes[5].tolist() == [0 if sym else zero[5 // g, o] for o in range(W.shape[1])]  # the dead input


@pytest.mark.parametrize("sparsity,n,m", [(0.5, 0, 0), (0.7, 0, 0), (0.5, 2, 4)])
def test_sparsegpt_equals_the_float64_reference(sparsity, n, m):
    _, W, H = _problem(dead=False)
    with jax.enable_x64(True):
        w_s, keep = map(np.asarray, gptq_lib.sparsegpt(W, H, sparsity=sparsity, n=n, m=m, damp=0.01, block=32))
    ref = reference_sparsegpt(W.T, H, sparsity=sparsity, n=n, m=m, damp=0.01, blocksize=32).T
    np.testing.assert_array_equal(keep, ref != 0)
    np.testing.assert_allclose(w_s, ref, rtol=0, atol=_tolerance(H, np.abs(ref).max()))
    np.testing.assert_array_equal(w_s[~keep], 0)
    if m:  # exactly n of every m consecutive inputs kept, for every output
        assert (keep.reshape(-1, m, keep.shape[1]).sum(1) == n).all()
    else:  # each block of 32 rows drops round(sparsity * its size)
        for i1 in range(0, W.shape[0], 32):
            block = keep[i1:i1 + 32]
            assert (~block).sum() == round(sparsity * block.size)
