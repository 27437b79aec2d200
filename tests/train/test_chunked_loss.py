"""`train.losses.chunked_cross_entropy` equals `cross_entropy` on the full logits, and never
builds them.

Tolerance: both paths compute each logit as a dot product of D terms and then reduce over V
(logsumexp) and over the B * T tokens (the mean), in other orders (chunks, scan). Each float32
sum of n terms is within n * eps32 times the sum of its terms' magnitudes of the exact value,
so the two paths differ by at most 2 (paths) x 2 (a product's rounding on top of the sum's)
x (D + V + B T) x eps32 x the magnitude of the quantity: for the loss 1 + S + ln V (S bounds
every |logit|, z-loss added alike), for a gradient the sum of |terms| it accumulates.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.loader import load_config
from models.gpt import GPT, LMHead, llama_config
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from train import build, losses, objectives, validate
from train import program as program_lib

EPS32 = float(jnp.finfo(jnp.float32).eps)
B, T, D, V = 2, 13, 16, 37


def _inputs(tied: bool, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (B, T, D))
    kernel = 0.5 * jax.random.normal(k[1], (V, D) if tied else (D, V))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    # Weights 0 (masked), 1 and 2, and a masked target out of range (padding id -1).
    mask = jax.random.randint(k[3], (B, T), 0, 3)
    targets = jnp.where(mask == 0, -1, targets)
    return hidden, kernel, targets, mask


def _tolerances(hidden, kernel, tied, mask, z_loss):
    """(value tol, grad-wrt-hidden tol, grad-wrt-kernel tol) as the module docstring derives."""
    h, w = np.abs(np.asarray(hidden, np.float64)), np.abs(np.asarray(kernel, np.float64))
    S = float(np.max(h @ (w.T if tied else w)))  # >= every |logit|
    magnitude = 1.0 + S + np.log(V)
    magnitude += z_loss * magnitude**2
    n = D + V + B * T
    weights = np.asarray(mask, np.float64)
    per_token = 2.0 * (1.0 + 2.0 * z_loss * magnitude) * weights.max() / weights.sum()  # |p - y| sums to <= 2
    grad_hidden = per_token * w.max() * D
    grad_kernel = per_token * np.sum(h.max(-1))
    return [4 * n * EPS32 * m * (1.0 + S) for m in (magnitude, grad_hidden, grad_kernel)]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_size", [4, 1, 64])
def test_chunked_equals_plain_loss_and_gradients(tied, chunk_size):
    """Value, every aux entry and the gradients w.r.t. the hidden states and the head kernel, with
    a weighted mask, label smoothing and z-loss; T = 13 is not a multiple of 4 (a partial chunk),
    1 is one position per chunk, 64 > T one chunk."""
    hidden, kernel, targets, mask = _inputs(tied)
    opts = {"mask_BT": mask, "label_smoothing": 0.1, "z_loss": 1e-2}

    def plain(h, w):
        return losses.cross_entropy(LMHead(w, tied=tied)(h), targets, **opts)

    def chunked(h, w):
        return losses.chunked_cross_entropy(h, LMHead(w, tied=tied), targets, chunk_size=chunk_size, **opts)

    (want, want_aux), want_grads = jax.value_and_grad(plain, (0, 1), has_aux=True)(hidden, kernel)
    (got, got_aux), got_grads = jax.value_and_grad(chunked, (0, 1), has_aux=True)(hidden, kernel)
    tol_value, tol_hidden, tol_kernel = _tolerances(hidden, kernel, tied, mask, 1e-2)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol_value)
    for key in ("cross_entropy", "z_loss", "accuracy", "num_tokens", "per_token"):
        np.testing.assert_allclose(got_aux[key], want_aux[key], rtol=0, atol=tol_value, err_msg=key)
    assert float(want_aux["num_tokens"]) == float(jnp.sum(mask))
    np.testing.assert_allclose(got_grads[0], want_grads[0], rtol=0, atol=tol_hidden)
    np.testing.assert_allclose(got_grads[1], want_grads[1], rtol=0, atol=tol_kernel)
    assert np.all(np.asarray(got_grads[0])[np.asarray(mask) == 0] == 0)  # masked positions get no gradient


def test_nothing_counted_gives_zero_loss_and_zero_gradients():
    hidden, kernel, targets, _ = _inputs(True)
    mask = jnp.zeros((B, T), jnp.int32)

    def chunked(h, w):
        return losses.chunked_cross_entropy(h, LMHead(w, tied=True), targets, chunk_size=4, mask_BT=mask)[0]

    value, grads = jax.value_and_grad(chunked, (0, 1))(hidden, kernel)
    assert float(value) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def _avals(jaxpr):
    """Every intermediate value's shape in a jaxpr, sub-jaxprs (scan, checkpoint) included."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_gradient_program_never_holds_the_full_logits():
    """The traced loss-and-gradient program has no value as large as [B, T, V] (the plain one has)."""
    hidden, kernel, targets, mask = _inputs(False)

    def largest(fn):
        jaxpr = jax.make_jaxpr(jax.grad(fn, (0, 1)))(hidden, kernel).jaxpr
        return max(int(np.prod(s)) for s in _avals(jaxpr))

    plain = largest(lambda h, w: losses.cross_entropy(LMHead(w, tied=False)(h), targets, mask_BT=mask)[0])
    chunked = largest(lambda h, w: losses.chunked_cross_entropy(h, LMHead(w, tied=False), targets, chunk_size=4,
                                                                mask_BT=mask)[0])
    assert plain >= B * T * V
    assert chunked < B * T * V and chunked <= max(B * 4 * V, B * T * D, D * V, 16 * B * 4)


def test_bad_chunk_size_is_refused():
    hidden, kernel, targets, _ = _inputs(True)
    with pytest.raises(ValueError, match="chunk_size=0"):
        losses.chunked_cross_entropy(hidden, LMHead(kernel, tied=True), targets, chunk_size=0)


@pytest.mark.parametrize("tied", [True, False])
def test_model_hidden_and_head_give_its_logits_and_mtp_logits(tied):
    """`GPT(return_hidden=True)`: head(hidden) is bitwise the model's logits, and the sown MTP
    hidden states give its sown MTP logits."""
    cfg = llama_config(vocab_size=V, d_model=D, num_layers=1, num_heads=2, d_ff=32, tie_embeddings=tied,
                       mtp_depth=1)
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(5), (B, T), 0, V)
    params = model.init(jax.random.key(6), ids)["params"]
    logits, state = model.apply({"params": params}, ids, mutable=["intermediates"])
    (hidden, head), hidden_state = model.apply({"params": params}, ids, return_hidden=True, mutable=["intermediates"])
    assert isinstance(head, LMHead) and head.tied == tied and hidden.shape == (B, T, D)
    np.testing.assert_array_equal(head(hidden), logits)
    mtp_logits, mtp_hidden = state["intermediates"]["mtp_logits"], hidden_state["intermediates"]["mtp_hidden"]
    assert len(mtp_hidden) == 1 and "mtp_logits" not in hidden_state["intermediates"]
    for want, got in zip(mtp_logits, mtp_hidden):
        np.testing.assert_array_equal(head(got), want)


# ---------------------------------------------------------------- the objectives and the run config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 2


def _tiny_llama(overrides):
    """configs/llama.py:tiny at 1 layer, vocab 64, seq 12, with multi-token prediction and 2 micro-batches."""
    return load_config(os.path.join(REPO, "configs/llama.py:tiny"), [
        "model.num_layers=1", "model.vocab_size=64", "data.seq_len=12", "data.batch_size=16", "model.mtp_depth=1",
        "optimizer.grad_accum_steps=2", "optimizer.label_smoothing=0.1", "optimizer.z_loss=1e-3", *overrides])


def _program(chunk_size: int):
    """The run config's sharded program (8 devices, dp) and objective."""
    config = _tiny_llama([f"model.loss_chunk_size={chunk_size}"])
    model = build.model(config, config.model.vocab_size)
    objective = objectives.get(config, model, None)
    assert objective.loss_chunk_size == chunk_size
    tx, schedule = build.optimizer(config)
    strategy = get_strategy(config.sharding.strategy)
    program = program_lib.build_for_run(config, model, tx, schedule, strategy=strategy,
                                        mesh=mesh_lib.make_mesh(strategy.default_mesh), objective=objective)
    return config, program, objective


def test_training_with_chunked_loss_follows_the_same_trajectory():
    """STEPS AdamW steps of a tiny LLaMA (configs/llama.py:tiny) with MTP, label smoothing, z-loss,
    a padding mask and 2 micro-batches: at every state of the plain run's trajectory, the chunked
    run's step (chunk 5 of seq 12: a partial chunk) reports the same loss, MTP loss, z-loss and
    gradient norm, and the same evaluation sums at the end. Both steps start from the same
    state, so they differ by the float32 reordering of the module docstring (n = D + V + B T,
    magnitude 1 + |value| + ln V: per-token losses and gradients, |p - y| summing to <= 2)."""
    config, plain, plain_objective = _program(0)
    _, chunked, chunked_objective = _program(5)
    state = plain.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    shape = (config.data.batch_size, config.data.seq_len)
    V = config.model.vocab_size
    n = config.model.block.d_model + V + shape[0] * shape[1]
    for step in range(STEPS):
        batch = {"inputs": rng.integers(0, V, shape), "targets": rng.integers(0, V, shape),
                 "loss_mask": (rng.random(shape) < 0.8).astype(np.int32), "segment_ids": np.ones(shape),
                 "positions": np.broadcast_to(np.arange(shape[1]), shape)}
        batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
        _, got = chunked.step(jax.tree_util.tree_map(jnp.copy, state), batch, jax.random.key(step))
        state, want = plain.step(state, batch, jax.random.key(step))  # donates: after the copy
        for key in ("loss", "mtp_loss", "z_loss", "grad_norm"):
            want_v, got_v = float(want[key]), float(got[key])
            tol = 4 * n * EPS32 * (1.0 + abs(want_v) + np.log(V))
            assert abs(got_v - want_v) <= tol, (step, key, got_v, want_v, tol)
    want_sums = plain_objective.eval_sums(state.params, batch, jax.random.key(0))
    got_sums = chunked_objective.eval_sums(state.params, batch, jax.random.key(0))
    for key, want_v in want_sums.items():
        tol = 4 * n * EPS32 * (1.0 + abs(float(want_v)) + np.log(V))
        assert abs(float(got_sums[key]) - float(want_v)) <= tol, (key, got_sums[key], want_v)


@pytest.mark.parametrize("overrides, message", [
    (["model.loss_chunk_size=-1"], "`model.loss_chunk_size`=-1 must be >= 0"),
    (["model.loss_chunk_size=8", "objective=dpo"], "objective='dpo'"),
])
def test_validate_refuses_bad_chunk_settings(overrides, message, tmp_path):
    config = _tiny_llama(overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate._check_counts(config)


def test_lora_on_an_untied_lm_head_is_refused_with_chunking():
    """The LoRA branch of an untied head lives in the module: the objective refuses to chunk it,
    and the model refuses to return its hidden states; a tied head (the base table) is fine."""
    config = _tiny_llama(["model.loss_chunk_size=8", "finetune.method=lora", "finetune.lora.targets=lm_head$"])
    model = build.model(config, config.model.vocab_size)
    with pytest.raises(ValueError, match="LoRA on the untied lm_head"):
        objectives.get(config, model, None)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    with pytest.raises(ValueError, match="LoRA targets the untied lm_head"):
        jax.eval_shape(lambda p: model.apply(p, ids, return_hidden=True), params)
    tied = _tiny_llama(["model.loss_chunk_size=8", "model.tie_embeddings=true", "finetune.method=lora",
                        "finetune.lora.targets=lm_head$|query$"])
    objective = objectives.get(tied, build.model(tied, 64), None)
    assert objective.loss_chunk_size == 8


def test_sft_takes_the_chunk_size_and_bert_is_refused():
    config = _tiny_llama(["model.loss_chunk_size=8", "objective=sft"])
    assert objectives.get(config, build.model(config, 64), None).loss_chunk_size == 8
    bert = load_config(os.path.join(REPO, "configs/bert.py:tiny"), ["model.loss_chunk_size=8"])
    with pytest.raises(ValueError, match="objective='mlm' with model.family='bert'"):
        validate._check_counts(bert)
