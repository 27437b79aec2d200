"""Masked-LM corruption (train/mlm.py) and the masked-LM training and evaluation steps.

Statistics of `mask_tokens` on a large random batch; the step's loss against a float64
reference on exactly the chosen positions; accumulation == one batch; fresh masks per step.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.bert import BertConfig, BertForMaskedLM
from models.layers.blocks import BlockConfig
from train import mlm as mlm_lib
from train import step as step_lib
from train.objectives.mlm import MLM_RNG_SALT, MLMObjective
from train.schedules import make_schedule

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _big_batch(B=256, T=512, vocab=1000, seed=0):
    """Random ids; row b is real for its first T - (b % 64) * 4 tokens, the rest padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T)).astype(np.int32)
    lengths = T - (np.arange(B) % 64) * 4
    real = np.arange(T)[None, :] < lengths[:, None]
    ids[~real] = 0
    return jnp.asarray(ids), jnp.asarray(real.astype(np.int32))


def test_mask_tokens_fractions_follow_bert():
    ids, real = _big_batch()
    MASK, V = 999, 1000
    inputs, chosen = jax.jit(functools.partial(mlm_lib.mask_tokens, mask_id=MASK, vocab_size=V))(
        jax.random.key(0), ids, real)
    ids, real, inputs, chosen = (np.asarray(x) for x in (ids, real, inputs, chosen))
    n_real, n_chosen = real.sum(), chosen.sum()
    assert not chosen[real == 0].any(), "padding was chosen"
    assert (inputs[~chosen] == ids[~chosen]).all(), "an unchosen token changed"
    # 256 x ~386 real tokens: the standard error of a 15% share is ~0.04%.
    assert abs(n_chosen / n_real - 0.15) < 0.003, n_chosen / n_real
    masked = (inputs == MASK) & chosen
    kept = (inputs == ids) & chosen & ~masked
    randomised = chosen & ~masked & ~kept
    # A random token equals the original (or [MASK]) with probability 1/V: tiny, allowed for.
    assert abs(masked.sum() / n_chosen - 0.8) < 0.01
    assert abs(randomised.sum() / n_chosen - 0.1) < 0.01
    assert abs(kept.sum() / n_chosen - 0.1) < 0.01
    # Random replacements are uniform over the vocabulary.
    assert abs(inputs[randomised].mean() - (V - 1) / 2) < 30


def test_mask_tokens_is_a_function_of_the_rng():
    ids, real = _big_batch(B=8, T=64)
    mask = functools.partial(mlm_lib.mask_tokens, mask_id=5, vocab_size=1000)
    a, b, c = (mask(jax.random.key(k), ids, real) for k in (0, 0, 1))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (np.asarray(a[1]) != np.asarray(c[1])).any()


def test_mask_batch_targets_the_original_ids_at_the_chosen_positions():
    ids, real = _big_batch(B=8, T=64)
    batch = {"inputs": ids, "targets": jnp.full_like(ids, -1), "segment_ids": real * 3, "positions": ids * 0 + 7,
             "loss_mask": real}
    out = mlm_lib.mask_batch(jax.random.key(2), batch, mlm_lib.MLMConfig(mask_id=5, vocab_size=1000))
    inputs, chosen = mlm_lib.mask_tokens(jax.random.key(2), ids, real, mask_id=5, vocab_size=1000)
    np.testing.assert_array_equal(out["inputs"], inputs)
    np.testing.assert_array_equal(out["targets"], ids)
    np.testing.assert_array_equal(out["loss_mask"], chosen.astype(np.int32))
    np.testing.assert_array_equal(out["segment_ids"], batch["segment_ids"])
    np.testing.assert_array_equal(out["positions"], batch["positions"])


@pytest.mark.parametrize("kwargs,message", [
    ({"mask_id": 10, "vocab_size": 10}, r"mask_id=10 must lie in \[0, vocab_size=10\)"),
    ({"mask_id": 1, "vocab_size": 10, "prob": 0.0}, r"prob=0.0 must lie in \(0, 1\]"),
    ({"mask_id": 1, "vocab_size": 10, "mask_fraction": 0.9, "random_fraction": 0.2}, r"sum to at most 1"),
])
def test_mlm_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mlm_lib.MLMConfig(**kwargs)


# --- the masked-LM step ------------------------------------------------------------------

B, T, VOCAB, MASK_ID = 8, 16, 40, 39
MLM = mlm_lib.MLMConfig(mask_id=MASK_ID, vocab_size=VOCAB, prob=0.3)
SGD = optax.sgd(make_schedule("constant", peak_lr=0.5, total_steps=10, warmup_steps=0))


def _model():
    block = BlockConfig(d_model=16, num_heads=2, d_ff=32, mlp_activation="gelu", norm_position="post",
                        norm_eps=1e-12, dropout_rate=0.0)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, block=block, num_layers=1, max_len=T))


def _params(model, seed=0):
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape) + (1.0 if len(s.shape) == 1 else 0.0), s.dtype),
        shapes)


def _batch():
    """Packed rows (row 0 holds two documents) and padding; targets are next-token pairs the
    masked LM must ignore."""
    rng = np.random.default_rng(1)
    lengths = np.asarray([16, 16, 12, 9, 16, 5, 14, 0])
    real = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    segment_ids = real.copy()
    segment_ids[0, 7:] = 2
    positions = np.where(real > 0, np.arange(T)[None, :], 0)
    positions[0, 7:] = np.arange(T - 7)
    inputs = np.where(real > 0, rng.integers(0, MASK_ID, (B, T)), 0)
    batch = {"inputs": inputs, "targets": rng.integers(-5, -1, (B, T)), "segment_ids": segment_ids,
             "positions": positions, "loss_mask": real}
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@functools.cache
def _step_fn(grad_accum_steps):
    return jax.jit(functools.partial(step_lib.train_step, objective=MLMObjective(_model(), mlm=MLM), tx=SGD,
                                     schedule=make_schedule("constant", peak_lr=0.5, total_steps=10, warmup_steps=0),
                                     grad_accum_steps=grad_accum_steps), compiler_options=FAST_COMPILE)


def _state(model):
    params = _params(model)
    return step_lib.TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state=SGD.init(params))


def test_masked_lm_step_loss_counts_exactly_the_masked_positions():
    model, batch, rng = _model(), _batch(), jax.random.key(7)
    state = _state(model)
    _, metrics = _step_fn(1)(state, batch, rng)
    # The masks the step drew: from fold_in(rng, step), as documented.
    step_rng = jax.random.fold_in(rng, state.step)
    masked = mlm_lib.mask_batch(jax.random.fold_in(step_rng, MLM_RNG_SALT), batch, MLM)
    chosen = np.asarray(masked["loss_mask"]) > 0
    assert 0 < chosen.sum() < np.asarray(batch["loss_mask"]).sum()
    assert not chosen[np.asarray(batch["segment_ids"]) == 0].any()
    logits = model.apply({"params": state.params}, masked["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    log_p = np.asarray(logits, np.float64)
    log_p = log_p - log_p.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    original = np.asarray(batch["inputs"])
    nll = -np.take_along_axis(log_p, original[..., None], -1)[..., 0]
    np.testing.assert_allclose(metrics["loss"], nll[chosen].mean(), rtol=1e-5)
    assert float(metrics["num_tokens"]) == chosen.sum()
    correct = np.argmax(np.asarray(logits), -1) == original
    np.testing.assert_allclose(metrics["accuracy"], correct[chosen].mean(), rtol=1e-6)


def test_masked_lm_accumulation_equals_one_batch_and_masks_change_per_step():
    state, batch, rng = _state(_model()), _batch(), jax.random.key(7)
    whole, whole_metrics = _step_fn(1)(state, batch, rng)
    accum, accum_metrics = _step_fn(4)(state, batch, rng)
    for key in ("loss", "accuracy", "grad_norm", "num_tokens"):
        np.testing.assert_allclose(accum_metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
    for x, y in zip(jax.tree_util.tree_leaves(accum.params), jax.tree_util.tree_leaves(whole.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # The same params and batch one step later: new masks, a new loss.
    _, later = _step_fn(1)(state.replace(step=state.step + 1), batch, rng)
    assert float(later["num_tokens"]) != float(whole_metrics["num_tokens"]) or float(later["loss"]) != float(
        whole_metrics["loss"])


def test_masked_lm_eval_is_fixed_by_its_rng_and_counts_only_masks():
    model, batch = _model(), _batch()
    params = _params(model)
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, objective=MLMObjective(model, mlm=MLM)),
                      compiler_options=FAST_COMPILE)
    a, b, c = (eval_fn(params, {}, batch, jax.random.key(k)) for k in (0, 0, 1))
    assert float(a["nll_sum"]) == float(b["nll_sum"]) and float(a["nll_sum"]) != float(c["nll_sum"])
    expected = mlm_lib.mask_batch(jax.random.key(0), batch, MLM)["loss_mask"].sum()
    assert float(a["num_tokens"]) == float(expected) and 0 <= float(a["correct_sum"]) <= float(expected)
