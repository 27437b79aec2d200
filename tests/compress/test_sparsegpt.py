"""SparseGPT as a method (compress/gptq.py's `sparsegpt`; the algorithm itself is checked
against a float64 re-implementation in test_gptq.py): on a tiny model's layers its
reconstruction error is below magnitude pruning's at the same sparsity and pattern, the
pattern is exact, and the pruned model runs."""

import numpy as np
import pytest

from compress import calibration, masks, methods
from compress.gptq import layer_error
from inference.generate import generate
from tests.compress.tiny_models import tiny_source, token_batches


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_pruning_and_generates(pattern):
    source = tiny_source("configs/gpt.py:tiny")
    batches = token_batches(rows=16, seq_len=32)
    out = methods.apply("sparsegpt", source, calibration=batches, options={"sparsity": "0.5", "pattern": pattern})
    stats = calibration.collect(source, batches, stats=("hessian",))
    kernels = masks.prunable(out.params)
    assert sorted("/".join(k) for k in kernels) == sorted(out.info["layer_error"])
    for key, w in kernels.items():
        path = "/".join(key)
        assert out.info["layer_error"][path] < out.info["magnitude_layer_error"][path], path
        view = np.asarray(masks.kernel_matrix(key, w))  # [I, O]
        h = stats[path]["hessian"]
        original = np.asarray(masks.kernel_matrix(key, masks.prunable(source.params)[key]))
        assert layer_error(original, view, h) == pytest.approx(out.info["layer_error"][path], rel=1e-5)
        if pattern == "2:4":  # exactly 2 nonzeros in every 4 consecutive inputs of every output
            assert ((view.reshape(-1, 4, view.shape[-1]) != 0).sum(1) == 2).all()
        else:  # every block of 128 input rows drops half its weights
            assert (view == 0).sum() == view.size // 2
        kept = view != 0
        assert not np.allclose(view[kept], original[kept])  # the kept weights absorbed the error
    assert masks.sparsity(out.params) == pytest.approx(0.5)
    logits = source.model.apply({"params": out.params}, batches[0][:2])
    assert np.isfinite(np.asarray(logits)).all()
    assert len(generate(source.model, out.params, [[1, 2, 3]], max_new_tokens=4)[0]) == 4


def test_sparsegpt_bad_options_are_one_line_errors():
    source = tiny_source("configs/gpt.py:tiny")
    one_token = [np.zeros((1, 1), np.int32)]
    for options, words in (({"pattern": "2:3:4"}, "pattern='2:3:4'"), ({"pattern": "4:4"}, "0 < N < M"),
                           ({"sparsity": "1.5"}, r"sparsity=1.5; expected a fraction in \[0, 1\)"),
                           ({"pattern": "2:6"}, r"divisible by 6; layer_0/mlp/wi \(64, 256\) has 64")):
        with pytest.raises(ValueError, match=words) as e:
            methods.apply("sparsegpt", source, calibration=one_token, options=options)
        assert "\n" not in str(e.value)
