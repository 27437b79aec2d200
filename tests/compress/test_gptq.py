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

from compress import calibration, methods
from compress import gptq as gptq_lib
from configs.loader import load_config
from inference.generate import generate
from models import quant
from tests.compress.tiny_models import tiny_source, token_batches

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


def _problem(I=64, O=24, n=400, seed=0, dead=True):
    """Correlated inputs with uneven channel scales (and one dead input), and a weight."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(I, I)) / np.sqrt(I) + np.eye(I)
    X = rng.normal(size=(n, I)) @ mix * np.exp(rng.normal(scale=0.7, size=I))
    if dead:
        X[:, 5] = 0
    W = rng.normal(size=(I, O)) * 0.05
    return X, W, X.T @ X / n


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 16, True, False), (4, 16, False, True), (8, 0, True, False)])
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


@pytest.mark.parametrize("sparsity,n,m", [(0.6, 0, 0), (0.5, 2, 4)])
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


# ------------------------------------------------------------------ the method on a tiny model


def _dequantized_view(q, lead, rows):
    return np.asarray(q.dequantize(np.float32), np.float64).reshape(*q.shape[:lead], rows, -1)


def test_gptq_method_beats_round_to_nearest_on_every_layer_and_generates():
    source = tiny_source("configs/gpt.py:tiny")
    batches = token_batches(rows=16, seq_len=32)
    out = methods.apply("gptq", source, calibration=batches, options={"bits": "4", "group": "16"})
    stats = calibration.collect(source, batches, stats=("hessian",))
    flat = calibration.flat_params(source.params)
    stored = _flat_quantized(out.params)
    assert sorted(out.info["layer_error"]) == sorted(stats)
    for path, error in out.info["layer_error"].items():
        assert error < out.info["rtn_layer_error"][path], path  # the check, same bits, group and data
        q = stored[path]
        assert quant.is_quantized(q) and q.kind == "int4" and q.group == 16
        h = stats[path]["hessian"]
        w = np.asarray(flat[path], np.float64).reshape(h.shape[-1], -1)
        # what is stored reproduces the error GPTQ measured (its codes and scales went through from_int)
        assert gptq_lib.layer_error(w, _dequantized_view(q, 0, h.shape[-1]), h) == pytest.approx(error, rel=1e-4)
    assert quant.is_quantized(stored["embed/embedding"])  # no inputs to calibrate: round to nearest
    assert out.config.compress.method == "gptq" and out.config.compress.options["group"] == "16"
    ids = batches[0][:2]
    logits = source.model.apply({"params": out.params}, ids)
    assert np.isfinite(np.asarray(logits)).all()
    tokens = generate(source.model, out.params, [[1, 2, 3]], max_new_tokens=4)
    assert len(tokens[0]) == 4


def _flat_quantized(params):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_leaves_with_path(params, is_leaf=quant.is_quantized)}


def test_gptq_bad_options_are_one_line_errors_before_any_work():
    source = tiny_source("configs/llama.py:tiny")  # d_ff 176 = 16 * 11
    one_token = [np.zeros((1, 1), np.int32)]  # far too few for a Hessian: the option errors come first
    for options, words in (({"group": "32"}, "group=32 does not divide the contraction dimension 176 of layer_0/mlp"),
                           ({"bits": "3"}, "bits=3; expected 4 or 8"), ({"bits": "8", "sym": "false"}, "sym=true"),
                           ({"group": "15"}, "even"), ({"damp": "x"}, "damp='x' is not a valid float")):
        with pytest.raises(ValueError, match=words) as e:
            methods.apply("gptq", source, calibration=one_token, options=options)
        assert "\n" not in str(e.value)
    moe = methods.Source(model=None, params=None, config=load_config("configs/moe.py:tiny"))
    with pytest.raises(ValueError, match="does not apply to model family 'moe'"):
        methods.apply("gptq", moe, calibration=one_token)


def test_gptq_method_on_a_scanned_stack():
    source = tiny_source("configs/gpt.py:tiny", ["model.scan_layers=true"])
    batches = token_batches(rows=16, seq_len=32)
    out = methods.apply("gptq", source, calibration=batches, options={"group": "32", "act_order": "true",
                                                                      "sym": "false"})
    q = out.params["layers"]["mlp"]["wo"]
    assert q.lead_shape == (2,) and q.zero is not None and q.group == 32
    for path, error in out.info["layer_error"].items():  # the mean over the stack's two layers
        assert error < out.info["rtn_layer_error"][path], path
    stats = calibration.collect(source, batches, stats=("hessian",))
    h = stats["layers/mlp/wo"]["hessian"]
    w = np.asarray(source.params["layers"]["mlp"]["wo"], np.float64)
    measured = np.mean([gptq_lib.layer_error(w[i], _dequantized_view(q, 1, 256)[i], h[i]) for i in range(2)])
    assert measured == pytest.approx(out.info["layer_error"]["layers/mlp/wo"], rel=1e-4)
    assert np.isfinite(np.asarray(source.model.apply({"params": out.params}, batches[0][:2]))).all()
