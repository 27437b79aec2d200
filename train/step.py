"""The pure training and evaluation steps of a language model.

Axis letters: A micro-batches, B batch, T length.

`train_step(state, batch, rng, *, ...)` is a module-level pure function: the trainer
binds its static pieces (model, optimizer, schedule, loss settings) with
`functools.partial` and jits it with explicit shardings and a donated state.

Gradient accumulation splits the batch into A micro-batches and sums the gradients of
sum(token losses) / (tokens in the whole batch), so an accumulated step is the same
update as one step on the whole batch, whatever the padding in each micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from train import losses


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; no functions inside)."""

    step: jax.Array
    params: Any
    opt_state: Any


def init_state(rng: jax.Array, sample_ids_BT: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation):
    """Initial state with boxed (logically partitioned) params, for `jax.eval_shape`."""
    params = model.init(rng, sample_ids_BT)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(nn.unbox(params)))


def _token_losses(params, batch, rng, *, model, z_loss, label_smoothing, deterministic):
    logits_BTV = model.apply(
        {"params": params}, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
        deterministic=deterministic, rngs={} if rng is None else {"dropout": rng},
    )
    _, aux = losses.cross_entropy(logits_BTV, batch["targets"], mask_BT=batch["loss_mask"],
                                  label_smoothing=label_smoothing, z_loss=z_loss)
    return aux


def _loss_and_grads(params, batch, rng, num_tokens, *, model, z_loss, label_smoothing):
    def loss_fn(p):
        aux = _token_losses(p, batch, rng, model=model, z_loss=z_loss, label_smoothing=label_smoothing,
                            deterministic=False)
        stats = {
            "loss": aux["cross_entropy"] * aux["num_tokens"] / num_tokens,
            "z_loss": aux["z_loss"] * aux["num_tokens"] / num_tokens,
            "correct": aux["accuracy"] * aux["num_tokens"] / num_tokens,
        }
        # per_token holds cross-entropy + z-loss, zero on masked tokens.
        return jnp.sum(aux["per_token"]) / num_tokens, stats

    return jax.grad(loss_fn, has_aux=True)(params)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int = 1,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` (dict of [B, T] int32: inputs, targets, segment_ids,
    positions, loss_mask). Dropout randomness is `fold_in(rng, step)`.

    Returns:
      The new state and metrics: loss (mean token cross-entropy), z_loss,
      accuracy, grad_norm (before clipping), learning_rate, num_tokens.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"] > 0), 1).astype(jnp.float32)
    kw = dict(model=model, z_loss=z_loss, label_smoothing=label_smoothing)
    if grad_accum_steps == 1:
        grads, stats = _loss_and_grads(state.params, batch, step_rng, num_tokens, **kw)
    else:
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)

        def accumulate(carry, xs):
            index, micro_batch = xs
            g, s = _loss_and_grads(state.params, micro_batch, jax.random.fold_in(step_rng, index), num_tokens, **kw)
            return jax.tree_util.tree_map(jnp.add, carry, (g, s)), None

        zeros = jax.tree_util.tree_map(
            jnp.zeros_like, (state.params, {"loss": 0.0, "z_loss": 0.0, "correct": 0.0}))
        (grads, stats), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": stats["loss"],
        "z_loss": stats["z_loss"],
        "accuracy": stats["correct"],
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
        "num_tokens": num_tokens,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
    """Summed next-token NLL (nats, no z-loss or smoothing) and token count of a batch."""
    aux = _token_losses(params, batch, None, model=model, z_loss=0.0, label_smoothing=0.0, deterministic=True)
    return {"nll_sum": jnp.sum(aux["per_token"]), "num_tokens": aux["num_tokens"].astype(jnp.float32)}
