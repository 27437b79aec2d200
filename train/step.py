"""The pure training and evaluation steps, the same for every objective.

Axis letters: A micro-batches, B batch.

`train_step(state, batch, rng, *, objective, tx, schedule, ...)` is a module-level pure
function: the caller binds its static pieces (the objective with its model, the optimizer,
the schedule) with `functools.partial` and jits it with explicit shardings and a donated
state (`train.program`, `sharding.step`). What differs between pretraining, masked LM, SFT,
classification, ... is the objective (`train.objectives`); this step follows its
accumulation contract (`train.objectives.base`):

    step_rng = fold_in(rng, step)
    batch    = objective.prepare(batch, step_rng)              # whole batch (masked-LM choice)
    totals   = objective.totals(batch) + {micro_batches: A}     # whole-batch normalizers
    grads, stats, aux = sum over A micro-batches of grad(objective.loss)(trainable, ...)
    trainable, opt_state = tx.update(grads, ...)                # only what trains
    trainable, extra = objective.after_update(trainable, aux, A)

The loss sees `train.trainable.combine(trainable, frozen)`; the gradient is taken with
respect to the trainable parameters only, and the frozen ones (`state.frozen`: a base under
LoRA, frozen layers) are never in the optimizer state and come out unchanged. The dropout rng
is the step's rng itself (A = 1) or `fold_in(step_rng, i)` for micro-batch i.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from train import trainable as trainable_lib


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; no functions inside).

    Attributes:
      step: the optimizer steps taken.
      params: the trainable parameters (all of them without freezing).
      opt_state: the optimizer's state of `params`.
      frozen: the parameters that do not train (`train.trainable`); empty: none.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = flax.struct.field(default_factory=dict)


def init_state(rng: jax.Array, sample_ids_BT: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               split: Callable | None = None, store_frozen: Callable | None = None):
    """Initial state with boxed (logically partitioned) params, for `jax.eval_shape`.

    Args:
      split: params -> (trainable, frozen) (`train.trainable.split` bound to a config); None:
        everything trains.
      store_frozen: frozen -> as stored (e.g. quantized); None: as is.
    """
    params = model.init(rng, sample_ids_BT)["params"]
    trainable, frozen = split(params) if split is not None else (params, {})
    if store_frozen is not None:
        frozen = store_frozen(frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(nn.unbox(trainable)),
                      frozen=frozen)


def _loss_and_grads(trainable, frozen, batch, rng, totals, *, objective):
    """(grads of the trainable params, stats, aux) of one (micro-)batch."""

    def loss_fn(p):
        return objective.loss(trainable_lib.combine(p, frozen), batch, rng, totals)

    grads, (stats, aux) = jax.grad(loss_fn, has_aux=True)(trainable)
    return grads, stats, aux


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    objective: Any,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int = 1,
    grad_shardings: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of `objective` on `batch` (the keys of `objective.batch_spec`).

    Args:
      objective: the objective (`train.objectives.base.Objective`), its model bound.
      tx: the optimizer of the trainable params.
      schedule: the learning-rate schedule (for the metrics).
      grad_accum_steps: A, micro-batches the batch is split into (rows divisible by A).
      grad_shardings: shardings (a tree like the trainable params) the gradients are laid
        out by as soon as they exist: each micro-batch's, the accumulator's and the summed
        ones (ZeRO-2 and up, see `sharding.step`); None: the compiler chooses.

    Returns:
      The new state and metrics: the objective's summed stats and `after_update` metrics,
      grad_norm (before clipping) and learning_rate.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    batch = objective.prepare(batch, step_rng)
    totals = {**objective.totals(batch), "micro_batches": grad_accum_steps}
    frozen = state.frozen

    def loss_and_grads(params, micro_batch, micro_rng):
        return _loss_and_grads(params, frozen, micro_batch, micro_rng, totals, objective=objective)

    def lay_out(grads):
        return grads if grad_shardings is None else jax.lax.with_sharding_constraint(grads, grad_shardings)

    if grad_accum_steps == 1:
        grads, stats, aux = loss_and_grads(state.params, batch, step_rng)
        grads = lay_out(grads)
    else:
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)

        def accumulate(carry, xs):
            index, micro_batch = xs
            grads, stats, aux = loss_and_grads(state.params, micro_batch, jax.random.fold_in(step_rng, index))
            # Laid out before the sum: under ZeRO-2 each device adds only its slice of the
            # micro-batch's summed gradient (a reduce-scatter), never a whole gradient.
            return jax.tree_util.tree_map(jnp.add, carry, (lay_out(grads), stats, aux)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        shapes = jax.eval_shape(loss_and_grads, state.params, first, step_rng)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zeros = (lay_out(zeros[0]), *zeros[1:])
        (grads, stats, aux), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, extra = objective.after_update(params, aux, grad_accum_steps)
    metrics = {**stats, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step), **extra}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, frozen, batch: dict[str, jax.Array], rng: jax.Array, *, objective: Any) -> dict[str, jax.Array]:
    """The objective's sums over one validation batch (`objective.eval_sums`) of the whole
    parameters `combine(params, frozen)`; `rng` draws what the evaluation draws (a masked
    LM's masks: a fixed rng per batch gives every evaluation the same ones)."""
    return objective.eval_sums(trainable_lib.combine(params, frozen), batch, rng)
