"""AWQ (compress/awq.py) and the scale folds it shares with SmoothQuant (compress/smoothing.py).

The folds are exact rewrites: with any positive scales folded in and the weight rows scaled,
the float model computes the same logits up to float32 rounding. AWQ's search includes
alpha = 0 (plain round to nearest), so on the calibration set its chosen scales cannot do
worse than RTN, and with salient input channels they do strictly better.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import awq, calibration, methods, smoothing
from compress.gptq import layer_error, rtn
from inference.generate import generate
from models import quant
from tests.compress.tiny_models import tiny_source, token_batches

EPS32 = np.finfo(np.float32).eps


def _folded_everywhere(source, seed=0):
    """The float params with random scales in [0.25, 4] folded in wherever `predecessor` allows."""
    stats = calibration.collect(source, token_batches(rows=8, seq_len=16), stats=("absmax",))
    flat = calibration.flat_params(source.params)
    original = dict(flat)
    rng = np.random.default_rng(seed)
    folded = []
    for paths in calibration.input_groups(stats).values():
        entry = stats[paths[0]]
        module = paths[0].rsplit("/", 1)[0] if "/" in paths[0] else ""
        fold = smoothing.predecessor(module, [p.rsplit("/", 1)[-1] for p in paths], original, source.config)
        if fold is None:
            continue
        s = np.exp(rng.uniform(np.log(0.25), np.log(4.0), size=entry["absmax"].shape))
        smoothing.fold(flat, *fold, s)
        for p in paths:
            rows = s.shape[-1]
            w = np.asarray(flat[p], np.float64)
            flat[p] = (w.reshape(*w.shape[:entry["lead"]], rows, -1) * s[..., None]).reshape(w.shape).astype(np.float32)
        folded += paths
    return calibration.unflatten(flat), folded


@pytest.mark.parametrize("spec,overrides,expected", [
    ("configs/llama.py:tiny", [], {"query", "key", "value", "wi_gate", "wi_up", "wo", "lm_head"}),  # GQA: no out
    ("configs/gpt.py:tiny", ["model.scan_layers=true"], {"query", "key", "value", "wi", "out"}),  # gelu: no wo
])
def test_folded_scales_leave_the_float_model_unchanged(spec, overrides, expected):
    source = tiny_source(spec, overrides)
    params, folded = _folded_everywhere(source)
    assert {p.rsplit("/", 1)[-1] for p in folded} == expected
    ids = token_batches(rows=2, seq_len=16)[0]
    apply = jax.jit(source.model.apply)
    ref = np.asarray(apply({"params": source.params}, ids), np.float64)
    got = np.asarray(apply({"params": params}, ids), np.float64)
    # each folded product x (w s) / s is exact to 2 eps32 relative; through the 2 layers' ~10 roundings
    # per value and the widest contraction (d_ff = 256) the logits move by at most
    # 2 * 10 * 256 * eps32 of their size
    assert np.abs(got - ref).max() <= 2 * 10 * 256 * EPS32 * np.abs(ref).max()
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                          jax.tree_util.tree_leaves(source.params)))


def test_search_beats_round_to_nearest_with_salient_channels():
    rng = np.random.default_rng(0)
    I, O, n = 64, 48, 1024
    scale = np.ones(I)
    scale[rng.choice(I, 4, replace=False)] = 20.0  # a few channels carry large activations
    X = rng.normal(size=(n, I)) * scale
    W = rng.normal(size=(I, O)) * 0.05
    H = X.T @ X / n
    absmean = np.abs(X).mean(0)
    s, alpha, errors = awq.search_scales(jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32),
                                         jnp.asarray(absmean, jnp.float32), bits=4, group=16, sym=True, grid=20)
    plain = np.asarray(rtn(jnp.asarray(W, jnp.float32), bits=4, group=16, sym=True)[3])
    scaled = np.asarray(rtn(jnp.asarray(W * np.asarray(s)[:, None], jnp.float32), bits=4, group=16, sym=True)[3])
    awq_error, rtn_error = layer_error(W, scaled / np.asarray(s)[:, None], H), layer_error(W, plain, H)
    assert float(alpha) > 0 and awq_error < 0.8 * rtn_error
    # the grid's first point is RTN itself: errors[0] = n-normalised squared error of plain RTN
    assert float(errors[0]) == pytest.approx(rtn_error ** 2 * np.sum(W * (H @ W)), rel=1e-4)
    assert float(errors.min()) == pytest.approx(awq_error ** 2 * np.sum(W * (H @ W)), rel=1e-4)


def test_awq_method_on_a_tiny_model():
    source = tiny_source("configs/llama.py:tiny")
    batches = token_batches(rows=16, seq_len=32)
    out = methods.apply("awq", source, calibration=batches, options={"bits": "4", "group": "16", "grid": "10"})
    info = out.info
    for path in info["layer_error"]:
        if path in info["folded"]:  # per group the search minimises the summed error, RTN included
            continue
        assert info["layer_error"][path] == pytest.approx(info["rtn_layer_error"][path], rel=1e-5)  # s = 1
    assert info["mean_layer_error"] < info["mean_rtn_layer_error"]
    assert "layer_0/self_attention/out" not in info["folded"]  # GQA (K=2 < N=4): no exact fold into value
    norm = np.asarray(out.params["layer_0"]["attention_block"]["norm"]["scale"])
    assert not np.allclose(norm, np.asarray(source.params["layer_0"]["attention_block"]["norm"]["scale"]))
    assert quant.is_quantized(out.params["layer_0"]["self_attention"]["query"])
    logits = source.model.apply({"params": out.params}, batches[0][:2])
    assert np.isfinite(np.asarray(logits)).all()
    assert len(generate(source.model, out.params, [[1, 2, 3]], max_new_tokens=4)[0]) == 4
    with pytest.raises(ValueError, match="grid=0"):
        methods.apply("awq", source, calibration=batches, options={"grid": "0"})
