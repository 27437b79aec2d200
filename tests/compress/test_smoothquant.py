"""SmoothQuant (compress/smoothquant.py): on activations with planted outlier channels, W8A8
after migration (through `models.layers.linear.project`'s int8 execution) is closer to the
float product than plain W8A8; the scales follow the formula; the method quantizes every
calibrated kernel for W8A8 and the model still runs."""

import jax.numpy as jnp
import numpy as np
import pytest

from compress import methods, smoothquant
from inference.generate import generate
from models import quant
from models.layers import linear
from tests.compress.tiny_models import tiny_source, token_batches


def _w8a8(x, w):
    return np.asarray(linear.project(jnp.asarray(x, jnp.float32),
                                     quant.quantize_weight(jnp.asarray(w, jnp.float32), fmt="int8").with_act_quant()),
                      np.float64)


def test_migration_cuts_w8a8_error_with_outlier_channels():
    rng = np.random.default_rng(0)
    n, I, O = 256, 128, 64
    x = rng.normal(size=(n, I))
    x[:, [3, 50, 97]] *= 60.0  # LLM-style outlier channels, in every token
    w = rng.normal(size=(I, O)) / np.sqrt(I)
    exact = x @ w
    s = smoothquant.smoothing_scales(np.abs(x).max(0), w, 0.5)
    np.testing.assert_allclose(s, np.sqrt(np.abs(x).max(0)) / np.sqrt(np.abs(w).max(1)), rtol=1e-12)
    plain = np.linalg.norm(_w8a8(x, w) - exact) / np.linalg.norm(exact)
    smooth = np.linalg.norm(_w8a8(x / s, w * s[:, None]) - exact) / np.linalg.norm(exact)
    assert smooth < 0.5 * plain, (smooth, plain)
    # alpha = 0 migrates nothing into the activations: s = 1 / max|W_j|, a pure weight rescale
    np.testing.assert_allclose(smoothquant.smoothing_scales(np.abs(x).max(0), w, 0.0), 1 / np.abs(w).max(1))


def test_smoothquant_method_on_a_tiny_model():
    source = tiny_source("configs/llama.py:tiny")
    batches = token_batches(rows=16, seq_len=32)
    out = methods.apply("smoothquant", source, calibration=batches, options={"alpha": "0.5"})
    p = out.params
    for kernel in (p["layer_0"]["self_attention"]["query"], p["layer_1"]["mlp"]["wo"], p["lm_head"]):
        assert quant.is_quantized(kernel) and kernel.kind == "int8" and kernel.act_quant
    assert not p["embed"]["embedding"].act_quant  # a lookup: int8 weight-only
    assert "layer_0/mlp/wo" in out.info["folded"] and "layer_0/self_attention/out" not in out.info["folded"]
    before, after = out.info["activation_absmax"]["layer_0/mlp/wi_gate"]
    assert after < before
    ids = batches[0][:2]
    assert np.isfinite(np.asarray(source.model.apply({"params": p}, ids))).all()
    assert len(generate(source.model, p, [[1, 2, 3]], max_new_tokens=4)[0]) == 4
    with pytest.raises(ValueError, match="alpha=2.0"):
        methods.apply("smoothquant", source, calibration=batches, options={"alpha": "2"})
