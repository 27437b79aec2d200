"""compress/calibration.py: calibration batches from the training data, and every kernel's
input statistics checked against inputs captured independently (flax's `nn.intercept_methods`
around the attention and feed-forward modules, reduced with numpy in float64).

Tolerances: the statistics are float32 sums over a batch's n_b tokens (then float64 over
batches), and the captured inputs come from a second float32 run of the same model, so an
entry of X^T X is within (n_b + 8) * eps32 * sum_t |x_ti||x_tj| of the float64 reference.
"""

import flax.linen as nn
import numpy as np
import pytest

from compress import calibration
from configs.loader import load_config
from models.layers.feedforward import FeedForward
from models.layers.multihead import MultiHeadAttention
from tests.compress.tiny_models import tiny_source, token_batches

EPS32 = np.finfo(np.float32).eps


def _captured(source, batches):
    """{module path: (inputs [n, D], outputs [n, D])} of every attention and feed-forward module."""
    seen = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, MultiHeadAttention | FeedForward):
            key = "/".join(context.module.path)
            x, y = np.asarray(args[0], np.float64), np.asarray(out, np.float64)
            old = seen.get(key, (np.zeros((0, x.shape[-1])), np.zeros((0, y.shape[-1]))))
            seen[key] = (np.concatenate([old[0], x.reshape(-1, x.shape[-1])]),
                         np.concatenate([old[1], y.reshape(-1, y.shape[-1])]))
        return out

    with nn.intercept_methods(capture):
        for ids in batches:
            source.model.apply({"params": source.params}, ids)
    return seen


def _within(a, b, bound):
    """|a - b| <= bound elementwise (bound an array)."""
    excess = np.abs(a - b) / bound
    assert np.all(excess <= 1), f"off by {excess.max():.3g} x the bound"


def _check_hessian(h, x, tokens_per_batch):
    n = len(x)
    _within(h, x.T @ x / n, (tokens_per_batch + 8) * EPS32 * (np.abs(x).T @ np.abs(x) / n))


def _check_energy(h, w_IO, y, tokens_per_batch):
    """tr(W^T H W) = ||X W||^2 / n: checks the statistics of an input that no module returns."""
    n = len(y)
    i = w_IO.shape[0]
    bound = (tokens_per_batch + i + 8) * EPS32 * np.sum(np.abs(w_IO) * (np.abs(h) @ np.abs(w_IO)))
    assert abs(np.sum(w_IO * (h @ w_IO)) - np.sum(y ** 2) / n) <= bound


def test_statistics_equal_independently_captured_inputs():
    source = tiny_source("configs/llama.py:tiny")
    batches = token_batches(rows=16, seq_len=32)
    stats = calibration.collect(source, batches, stats=calibration.STATS)
    seen = _captured(source, batches)
    p = source.params
    for layer in ("layer_0", "layer_1"):
        x, y = seen[f"{layer}/self_attention"]
        entry = stats[f"{layer}/self_attention/query"]
        assert stats[f"{layer}/self_attention/key"] is entry and stats[f"{layer}/self_attention/value"] is entry
        assert entry["tokens"] == len(x) == 512 and entry["lead"] == 0
        _check_hessian(entry["hessian"], x, 8 * 32)
        scale = np.abs(x).max()
        np.testing.assert_allclose(entry["absmean"], np.abs(x).mean(0), rtol=0, atol=8 * 32 * EPS32 * scale)
        np.testing.assert_allclose(entry["absmax"], np.abs(x).max(0), rtol=0, atol=8 * EPS32 * scale)
        np.testing.assert_allclose(entry["l2"], np.sqrt((x ** 2).sum(0)), rtol=(8 * 32 + 8) * EPS32)
        w_out = np.asarray(p[layer]["self_attention"]["out"], np.float64)
        _check_energy(stats[f"{layer}/self_attention/out"]["hessian"], w_out.reshape(-1, w_out.shape[-1]), y, 256)
        x, y = seen[f"{layer}/mlp"]
        assert stats[f"{layer}/mlp/wi_gate"] is stats[f"{layer}/mlp/wi_up"]
        _check_hessian(stats[f"{layer}/mlp/wi_gate"]["hessian"], x, 256)
        _check_energy(stats[f"{layer}/mlp/wo"]["hessian"], np.asarray(p[layer]["mlp"]["wo"], np.float64), y, 256)
    # the untied LM head reads the final normed hidden states: logits = h @ lm_head
    logits = np.concatenate([np.asarray(source.model.apply({"params": p}, ids), np.float64).reshape(-1, 512)
                             for ids in batches])
    _check_energy(stats["lm_head"]["hessian"], np.asarray(p["lm_head"], np.float64), logits, 256)
    assert "embed/embedding" not in stats


def test_scanned_stack_statistics_carry_the_layers_axis():
    source = tiny_source("configs/gpt.py:tiny")  # LayerNorm, gelu MLP, biases, tied embeddings
    scanned = tiny_source("configs/gpt.py:tiny", ["model.scan_layers=true"])  # the same params, stacked
    np.testing.assert_array_equal(scanned.params["layers"]["mlp"]["wo"][1], source.params["layer_1"]["mlp"]["wo"])
    batches = token_batches(rows=8, seq_len=32)
    loop = calibration.collect(source, batches, stats=("hessian", "absmax"))
    stack = calibration.collect(scanned, batches, stats=("hessian", "absmax"))
    assert sorted(stack) == sorted(k.replace("layer_0/", "layers/") for k in loop if k.startswith("layer_0/"))
    assert "lm_head" not in loop  # tied: the embedding table
    for name in ("self_attention/query", "self_attention/out", "mlp/wi", "mlp/wo"):
        assert stack[f"layers/{name}"]["lead"] == 1
        for i in (0, 1):
            ref = loop[f"layer_{i}/{name}"]["hessian"]
            h = stack[f"layers/{name}"]["hessian"][i]
            x_abs = np.sqrt(np.diag(ref))  # |x| scale: sum_t |x_ti||x_tj| / n <= sqrt(H_ii H_jj)
            _within(h, ref, 2 * (256 + 8) * EPS32 * np.outer(x_abs, x_abs))


def test_too_few_tokens_for_the_hessian_is_a_one_line_error():
    source = tiny_source("configs/llama.py:tiny")  # widest input: wo, d_ff = 176
    with pytest.raises(ValueError, match=r"--calibration_samples >= 6 \(rows of 32 tokens\)") as e:
        calibration.collect(source, token_batches(rows=5, seq_len=32, batch=5))
    assert "\n" not in str(e.value) and "160 tokens" in str(e.value)
    assert calibration.collect(source, token_batches(rows=5, seq_len=32, batch=5), stats=("absmax",))


def test_mixture_of_experts_and_latent_attention_are_refused():
    for spec, word in (("configs/moe.py:tiny", "mixture-of-experts"), ("configs/deepseek.py:tiny", "latent")):
        with pytest.raises(ValueError, match=word):
            calibration.check_supported(load_config(spec), "gptq")
    calibration.check_supported(load_config("configs/llama.py:tiny"), "gptq")


class _Bytes:
    """A byte-level stand-in tokenizer: what the data pipeline needs (encode, eos, bos)."""

    eos_id, bos_id, vocab_size = 256, None, 257

    def encode(self, text):
        return list(text.encode("utf-8"))


def test_calibration_batches_are_rows_of_the_training_text(tmp_path):
    config = load_config("configs/llama.py:tiny")
    batches = calibration.calibration_batches(config, _Bytes(), samples=11, seq_len=48, seed=3, batch_size=4,
                                              workdir=str(tmp_path))
    assert [b.shape for b in batches] == [(4, 48), (4, 48), (3, 48)]
    assert all(b.dtype == np.int32 for b in batches)
    again = calibration.calibration_batches(config, _Bytes(), samples=11, seq_len=48, seed=3, batch_size=4,
                                            workdir=str(tmp_path))
    other = calibration.calibration_batches(config, _Bytes(), samples=11, seq_len=48, seed=4, batch_size=4,
                                            workdir=str(tmp_path))
    assert all((a == b).all() for a, b in zip(batches, again))
    assert not all((a == b).all() for a, b in zip(batches, other))
    text = bytes(int(t) for t in np.concatenate(batches).reshape(-1) if t < 256).decode("utf-8", "replace")
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # English documentation, not noise
    assert (tmp_path / "tfds").is_dir()
    with pytest.raises(ValueError, match="--calibration_samples=0"):
        calibration.calibration_batches(config, _Bytes(), samples=0, seq_len=48, workdir=str(tmp_path))
