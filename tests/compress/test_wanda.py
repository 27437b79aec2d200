"""Wanda (compress/wanda.py): the mask against a numpy selection of |W_io| * ||X_i||_2 per
output, its reconstruction error against magnitude pruning's at the same sparsity, exact
2:4 patterns, and the pruned model running."""

import numpy as np
import pytest

from compress import calibration, masks, methods, wanda
from compress.gptq import layer_error
from inference.generate import generate
from tests.compress.tiny_models import tiny_source, token_batches


def test_wanda_mask_keeps_the_largest_weight_times_input_norm_per_output():
    rng = np.random.default_rng(0)
    I, O = 48, 20
    w = rng.normal(size=(I, O)).astype(np.float32)
    l2 = np.exp(rng.normal(size=I)).astype(np.float32)
    pruned, keep = map(np.asarray, wanda.wanda_matrix(w, l2, 0.25))
    scores = np.abs(w).astype(np.float64) * l2[:, None]
    for o in range(O):
        expected = np.zeros(I, bool)
        expected[np.argsort(-scores[:, o], kind="stable")[:36]] = True
        np.testing.assert_array_equal(keep[:, o], expected)
    np.testing.assert_array_equal(pruned, np.where(keep, w, 0))
    _, keep24 = map(np.asarray, wanda.wanda_matrix(w, l2, 0.0, 2, 4))
    groups = scores.reshape(I // 4, 4, O)
    ranks = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_array_equal(keep24, (ranks < 2).reshape(I, O))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_on_a_tiny_model(pattern):
    source = tiny_source("configs/llama.py:tiny")
    batches = token_batches(rows=16, seq_len=32)
    out = methods.apply("wanda", source, calibration=batches, options={"sparsity": "0.5", "pattern": pattern})
    stats = calibration.collect(source, batches, stats=("hessian",))
    errors = out.info["layer_error"]
    for key, w in masks.prunable(out.params).items():
        path = "/".join(key)
        view = np.asarray(masks.kernel_matrix(key, w))
        original = np.asarray(masks.kernel_matrix(key, masks.prunable(source.params)[key]))
        assert layer_error(original, view, stats[path]["hessian"]) == pytest.approx(errors[path], rel=1e-5)
        kept = view != 0
        np.testing.assert_array_equal(view[kept], original[kept])  # no weight is updated
        if pattern == "2:4":
            assert (kept.reshape(-1, 4, view.shape[-1]).sum(1) == 2).all()
        else:  # half of every output's inputs
            assert (kept.sum(0) == view.shape[0] // 2).all()
    assert out.info["mean_layer_error"] < out.info["mean_magnitude_layer_error"]
    logits = source.model.apply({"params": out.params}, batches[0][:2])
    assert np.isfinite(np.asarray(logits)).all()
    assert len(generate(source.model, out.params, [[1, 2, 3]], max_new_tokens=4)[0]) == 4
