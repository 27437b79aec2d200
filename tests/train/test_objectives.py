"""train/objectives: the registry picks the objective of a config, and the one generic step with the
lm objective is the update of a hand-composed jax.grad of train.losses.cross_entropy + tx.update."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.loader import load_config
from train import losses, objectives
from train import step as step_lib
from train.objectives.lm import LMObjective
from train.objectives.mlm import MLMObjective

from tests.train.test_step import (B, EPS32, FAST_COMPILE, ROUNDING_SPREAD, SCHEDULE, SGD, T, _at_step, _batch,
                                   _model, _state)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Tokenizer:
    vocab_size, mask_id = 300, 299


def test_the_registry_picks_lm_for_decoders_and_mlm_for_bert():
    assert {"lm", "mlm"} <= set(objectives.OBJECTIVES)
    gpt = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), ["optimizer.z_loss=1e-3", "model.mtp_loss_weight=0.2"])
    bert = load_config(os.path.join(REPO, "configs/bert.py:tiny"))
    assert objectives.name_of(gpt) == "lm" and objectives.name_of(bert) == "mlm"
    from train import build

    lm = objectives.get(gpt, build.model(gpt, 300), _Tokenizer())
    assert isinstance(lm, LMObjective) and (lm.z_loss, lm.mtp_loss_weight) == (1e-3, 0.2)
    mlm = objectives.get(bert, build.model(bert, 300), _Tokenizer())
    assert isinstance(mlm, MLMObjective) and mlm.mlm.mask_id == 299
    gpt.objective = "nope"
    with pytest.raises(ValueError, match=r"config key `objective`='nope'; expected one of"):
        objectives.get(gpt, None, None)


def test_a_module_registers_with_one_decorator():
    @objectives.register("test_only_objective")
    def make(config, model, tokenizer):
        return ("made", model)

    try:
        config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), ["objective=test_only_objective"])
        assert objectives.get(config, "m", None) == ("made", "m")
        with pytest.raises(ValueError, match="registered twice"):
            objectives.register("test_only_objective")(lambda *a: None)
    finally:
        del objectives.OBJECTIVES["test_only_objective"]


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_generic_step_is_the_update_of_a_hand_composed_gradient(grad_accum_steps):
    """Independent of the objective's share bookkeeping: the mean token loss of train.losses over
    the whole batch, differentiated by jax.grad and applied by tx.update (SGD: any error in the
    gradient shows in the parameters)."""
    model, batch, rng = _model(), _batch(), jax.random.key(0)
    state = _at_step(_state(model, SGD), 2)
    objective = LMObjective(model, z_loss=1e-3, label_smoothing=0.1)
    step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=SGD, schedule=SCHEDULE,
                                     grad_accum_steps=grad_accum_steps), compiler_options=FAST_COMPILE)
    new, metrics = step(state, batch, rng)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"], deterministic=True)
        loss, aux = losses.cross_entropy(logits, batch["targets"], mask_BT=batch["loss_mask"], label_smoothing=0.1,
                                         z_loss=1e-3)
        return loss, aux

    (_, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)(state.params)
    updates, _ = SGD.update(grads, state.opt_state, state.params)  # its count: step 2, past warmup
    expected = optax.apply_updates(state.params, updates)
    # Both sum the same B*T token terms in other orders: a gradient element moves by about
    # ROUNDING_SPREAD * EPS32 * sqrt(B*T) times its terms (see tests/train/test_step.py), taken
    # here as the largest element of its leaf (an embedding row sums a token's every position);
    # SGD scales that by lr, and each parameter is rounded within 2 ulp.
    lr, grad_norm = float(SCHEDULE(2)), float(optax.global_norm(grads))
    flat_grads = jax.tree_util.tree_leaves(grads)
    atols = [lr * ROUNDING_SPREAD * EPS32 * math.sqrt(B * T) * float(jnp.max(jnp.abs(g))) for g in flat_grads]
    for (path, x), y, atol in zip(jax.tree_util.tree_leaves_with_path(new.params), jax.tree_util.tree_leaves(expected),
                                  atols):
        np.testing.assert_allclose(x, y, rtol=2 * EPS32, atol=atol, err_msg=jax.tree_util.keystr(path))
    rtol = ROUNDING_SPREAD * EPS32 * math.sqrt(B * T)
    np.testing.assert_allclose(metrics["loss"], aux["cross_entropy"], rtol=rtol)
    np.testing.assert_allclose(metrics["accuracy"], aux["accuracy"], rtol=rtol)
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=rtol)
    assert float(metrics["num_tokens"]) == float(aux["num_tokens"]) == 28
    # Control: the update is not zero (the comparison can fail).
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(expected),
                                                                jax.tree_util.tree_leaves(state.params))) > 100 * max(atols)
