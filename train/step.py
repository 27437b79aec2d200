"""The pure training and evaluation steps of a language model.

Axis letters: A micro-batches, B batch, T length.

`train_step(state, batch, rng, *, ...)` is a module-level pure function: the trainer
binds its static pieces (model, optimizer, schedule, loss settings) with
`functools.partial` and jits it with explicit shardings and a donated state.

The loss is the token cross-entropy (+ z-loss) on `targets`: the next tokens, or with
`mlm` set (BERT) the original ids at the positions `train.mlm.mask_batch` corrupts, drawn
from the step's rng. To it the step adds what the model sows into `intermediates`:
  * MoE layers' `router_stats`: their weighted auxiliary losses (`moe_aux_loss`); the
    routing statistics are reported, and with `bias_update_rate > 0` the experts'
    correction biases move towards balanced loads after the update
    (`models.layers.moe.update_correction_bias`, DeepSeek-V3);
  * `mtp_logits` (multi-token prediction, `model.config.mtp_depth > 0`):
    `mtp_loss_weight` times the mean over depths of their cross-entropy (`mtp_loss`).

Gradient accumulation splits the batch into A micro-batches and sums the gradients of
sum(token losses) / (tokens in the whole batch), so an accumulated step is the same
update as one step on the whole batch, whatever the padding in each micro-batch. The
masked-LM choice is made on the whole batch before the split, and the multi-token terms
are normalised by the whole batch's counts alike. The MoE losses are per micro-batch
(a layer's balance over the tokens it routed together), each counting 1 / A.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from models.layers import moe as moe_lib
from train import losses
from train import mlm as mlm_lib

# Folded into the step's rng for the masked-LM choice (dropout uses the step's rng itself,
# and its micro-batches fold in 0..A-1).
MLM_RNG_SALT = 0x4D4C4D


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


def _sows_losses(model: nn.Module) -> bool:
    """Whether the model sows losses the step adds (MoE router statistics, MTP logits). Only
    then is `intermediates` made mutable: it also makes attention return its weights."""
    config = model.config
    return getattr(config, "mtp_depth", 0) > 0 or getattr(getattr(config, "block", None), "moe", None) is not None


def _router_stats(intermediates) -> dict:
    """The `router_stats` entries of an intermediates tree at their module paths, the rest pruned."""
    out = {}
    for key, value in intermediates.items():
        if key == "router_stats":
            out[key] = value
        elif isinstance(value, Mapping):
            found = _router_stats(value)
            if found:
                out[key] = found
    return out


def routing_metrics(router_stats: Mapping) -> dict[str, jax.Array]:
    """Mean dropped fraction over the MoE layers, and the most and least loaded expert of any
    layer as a multiple of its layer's mean load (1 and 1 when perfectly balanced)."""
    per_layer = []

    def visit(node):
        for key, value in node.items():
            if key == "router_stats":
                per_layer.extend(value)
            else:
                visit(value)

    visit(router_stats)
    tokens_LE = jnp.concatenate([jnp.reshape(s["tokens_per_expert"], (-1, s["tokens_per_expert"].shape[-1]))
                                 for s in per_layer])
    load_LE = tokens_LE / jnp.maximum(jnp.mean(tokens_LE, -1, keepdims=True), 1e-9)
    dropped = jnp.concatenate([jnp.ravel(s["dropped_fraction"]) for s in per_layer])
    return {"moe_dropped_fraction": jnp.mean(dropped), "moe_load_max": jnp.max(load_LE),
            "moe_load_min": jnp.min(load_LE)}


def _loss_and_grads(params, batch, rng, totals, *, model, z_loss, label_smoothing, mtp_loss_weight, accum_steps):
    """(grads, scalar stats, router_stats) of one (micro-)batch; `totals` holds the whole batch's counts."""

    def loss_fn(p):
        kw = {"positions": batch["positions"], "segment_ids": batch["segment_ids"], "deterministic": False,
              "rngs": {"dropout": rng}}
        if _sows_losses(model):
            logits_BTV, variables = model.apply({"params": p}, batch["inputs"], mutable=["intermediates"], **kw)
            intermediates = variables.get("intermediates", {})
        else:
            logits_BTV, intermediates = model.apply({"params": p}, batch["inputs"], **kw), {}
        _, aux = losses.cross_entropy(logits_BTV, batch["targets"], mask_BT=batch["loss_mask"],
                                      label_smoothing=label_smoothing, z_loss=z_loss)
        share = aux["num_tokens"] / totals["num_tokens"]
        stats = {"loss": aux["cross_entropy"] * share, "z_loss": aux["z_loss"] * share,
                 "correct": aux["accuracy"] * share}
        # per_token holds cross-entropy + z-loss, zero on masked tokens.
        loss = jnp.sum(aux["per_token"]) / totals["num_tokens"]
        router = _router_stats(intermediates)
        if router:
            stats["moe_aux_loss"] = moe_lib.total_aux_loss(router) / accum_steps
            loss += stats["moe_aux_loss"]
        if "mtp_logits" in intermediates:
            stats["mtp_loss"], _ = losses.multi_token_prediction_loss(
                jax.tree_util.tree_leaves(intermediates["mtp_logits"]), batch["targets"], batch["loss_mask"],
                batch["segment_ids"], num_tokens=totals.get("mtp_tokens"))
            loss += mtp_loss_weight * stats["mtp_loss"]
        return loss, (stats, router)

    grads, (stats, router) = jax.grad(loss_fn, has_aux=True)(params)
    return grads, stats, router


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
    mlm: mlm_lib.MLMConfig | None = None,
    mtp_loss_weight: float = 0.0,
    bias_update_rate: float = 0.0,
    grad_shardings: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` (dict of [B, T] int32: inputs, targets, segment_ids,
    positions, loss_mask). Dropout randomness is `fold_in(rng, step)`.

    Args:
      mlm: train a masked LM (BERT) on masks drawn from the step's rng; None: next tokens.
      mtp_loss_weight: weight of the multi-token prediction loss, if the model sows one.
      bias_update_rate: step of the MoE correction biases after the update (0: none).
      grad_shardings: shardings (a tree like the params) the gradients are laid out by as
        soon as they exist: each micro-batch's, the accumulator's and the summed ones (ZeRO-2
        and up, see `sharding.step`); None: the compiler chooses.
      The others: see the module docstring.

    Returns:
      The new state and metrics: loss (mean token cross-entropy), z_loss, accuracy,
      grad_norm (before clipping), learning_rate, num_tokens; with MoE layers also
      moe_aux_loss, moe_dropped_fraction, moe_load_max, moe_load_min; with multi-token
      prediction mtp_loss.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    if mlm is not None:
        batch = mlm_lib.mask_batch(jax.random.fold_in(step_rng, MLM_RNG_SALT), batch, mlm)
    totals = {"num_tokens": jnp.maximum(jnp.sum(batch["loss_mask"] > 0), 1).astype(jnp.float32)}
    depth = getattr(model.config, "mtp_depth", 0)
    if depth:
        totals["mtp_tokens"] = losses.multi_token_prediction_counts(batch["loss_mask"], batch["segment_ids"], depth)
    loss_and_grads = functools.partial(
        _loss_and_grads, model=model, z_loss=z_loss, label_smoothing=label_smoothing,
        mtp_loss_weight=mtp_loss_weight, accum_steps=grad_accum_steps)

    def lay_out(grads):
        return grads if grad_shardings is None else jax.lax.with_sharding_constraint(grads, grad_shardings)

    if grad_accum_steps == 1:
        grads, stats, router = loss_and_grads(state.params, batch, step_rng, totals)
        grads = lay_out(grads)
    else:
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)

        def accumulate(carry, xs):
            index, micro_batch = xs
            grads, stats, router = loss_and_grads(state.params, micro_batch, jax.random.fold_in(step_rng, index),
                                                  totals)
            # Laid out before the sum: under ZeRO-2 each device adds only its slice of the
            # micro-batch's summed gradient (a reduce-scatter), never a whole gradient.
            return jax.tree_util.tree_map(jnp.add, carry, (lay_out(grads), stats, router)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        shapes = jax.eval_shape(loss_and_grads, state.params, first, step_rng, totals)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zeros = (lay_out(zeros[0]), *zeros[1:])
        (grads, stats, router), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
        router = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, router)  # mean loads and fractions

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if bias_update_rate and router:
        params = moe_lib.update_correction_bias(params, router, bias_update_rate)
    metrics = {
        "loss": stats["loss"],
        "z_loss": stats["z_loss"],
        "accuracy": stats["correct"],
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
        "num_tokens": totals["num_tokens"],
        **{k: stats[k] for k in ("moe_aux_loss", "mtp_loss") if k in stats},
        **(routing_metrics(router) if router else {}),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict[str, jax.Array], rng: jax.Array | None = None, *, model: nn.Module,
              mlm: mlm_lib.MLMConfig | None = None) -> dict[str, jax.Array]:
    """Summed NLL (nats, no z-loss or smoothing), correct argmax predictions and token count of
    a batch: of the next tokens, or with `mlm` of the masked-LM positions that `rng` draws
    (a fixed rng gives every evaluation the same masks). Auxiliary losses are left out."""
    if mlm is not None:
        if rng is None:
            raise ValueError("a masked-LM evaluation needs an rng for its masks")
        batch = mlm_lib.mask_batch(rng, batch, mlm)
    logits_BTV = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"], deterministic=True)
    _, aux = losses.cross_entropy(logits_BTV, batch["targets"], mask_BT=batch["loss_mask"])
    num_tokens = aux["num_tokens"].astype(jnp.float32)
    return {"nll_sum": jnp.sum(aux["per_token"]), "num_tokens": num_tokens, "correct_sum": aux["accuracy"] * num_tokens}
