"""A train step and its init, given by the caller, jitted with a strategy's shardings.

The library lays out whatever step it is handed: the language model's (`train.program`
binds `train.step`'s), or any objective's pure step with the same contract. One init recipe
(flax lm1b's `setup_initial_state`):

    jax.eval_shape(init_state) -> logical names -> strategy checks -> Layout (mesh shardings)
    -> jax.jit(init_state, out_shardings=layout.state)

and the step, jitted with `in_shardings` / `out_shardings` from the layout and a donated
state. Both trace inside `layout.tracing()`, so the models' logical activation constraints
bind to the mesh whoever calls them.

ZeRO-2 and up pass `layout.grads` to the step (`grad_shardings`), which constrains the
gradients to it as soon as they exist. The batch-sharded backward pass leaves each device a
partial sum of every gradient; asking for the sum split over the data axes (not replicated)
is what turns DP's all-reduce into ZeRO-2's reduce-scatter: each device receives only the
slice of the summed gradient whose optimizer state it holds. Within one jitted step XLA sees
the whole program: under ZeRO-1 the optimizer only reads its slice of each summed gradient
too, so the compiler scatters the gradients anyway and ZeRO-1 and ZeRO-2 compile to the same
program (tests/sharding measure it). The constraint matters where a gradient outlives the
backward pass: the gradient accumulation buffer, which the step constrains inside the
accumulation loop.

    program = sharding.step.build(
        init_state=functools.partial(init_state, sample_ids_BT=ids_1T, model=model, tx=tx),
        train_step=functools.partial(train_step, model=model, tx=tx, schedule=schedule),
        tx=tx, strategy=get_strategy("zero3"), mesh=make_mesh("data=-1"), seq_len=64, batch_size=8)
    state = program.init(jax.random.key(0))
    state, metrics = program.step(state, batch, rng)   # batch placed by program.layout.batch

Under context parallelism (a `context` mesh axis) the step first reorders the batch's tokens
zig-zag (`sharding.context`), so that causal ring attention is balanced over the devices.

This module imports nothing from `train/` (a test checks it): the dependency runs one way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sharding import context
from sharding.layout import Layout, state_layout
from sharding.strategies import Strategy, check_applies

# The batch of a step built without a `batch_spec`: a packed token batch, [B, T] int32 each.
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class ShardedProgram:
    """What `build` returns.

    Attributes:
      layout: the shardings of state, gradients and batch.
      boxed_state: the abstract state with logically partitioned params.
      abstract_state: ShapeDtypeStructs of the state carrying their shardings (for
        checkpoint restore and ahead-of-time lowering).
      init: rng -> the initial state, placed by the layout.
      step: (state, batch, rng) -> (state, metrics), the state donated.
      batch_spec: (batch_size, seq_len) -> the batch's ShapeDtypeStructs (the objective's), or
        None for a packed token batch (BATCH_KEYS, [B, T] int32).
    """

    layout: Layout
    boxed_state: Any
    abstract_state: Any
    init: Callable
    step: Callable
    batch_spec: Callable | None = None

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The step's batch as ShapeDtypeStructs with the batch sharding (for `step.lower`): the
        spec the step was built with, rows over the batch axes whatever each leaf's rank."""
        spec = (self.batch_spec(batch_size, seq_len) if self.batch_spec is not None else
                {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in BATCH_KEYS})
        return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.layout.batch) for k, s in spec.items()}


def build(*, init_state: Callable, train_step: Callable, tx: optax.GradientTransformation, strategy: Strategy,
          mesh: Mesh, seq_len: int | None = None, batch_size: int | None = None,
          batch_spec: Callable | None = None) -> ShardedProgram:
    """Checks that `strategy` applies, lays the state out and jits init and step.

    Args:
      init_state: rng -> the initial state, a pytree with `step`, `params` (boxed with logical
        axis names, as `model.init` returns them), `opt_state` (of `params` only) and
        optionally `frozen` (parameters that do not train, boxed alike; laid out like the
        params); static pieces bound with `functools.partial`. Traced, never run eagerly.
      train_step: the pure step `(state, batch, rng, *, grad_shardings) -> (state, metrics)`,
        static pieces bound with `functools.partial`. `grad_shardings` is the gradients'
        layout (a tree like the params) under ZeRO-2 and up, else None.
      tx: the optimizer whose state is `opt_state` (its moments are laid out like the params).
      strategy: the sharding strategy.
      mesh: the mesh.
      seq_len: the training sequence length, checked against sequence parallelism if given.
      batch_size: the global (micro-)batch, checked against the batch axes if given.
      batch_spec: (batch_size, seq_len) -> the step's batch as ShapeDtypeStructs (for
        `abstract_batch`); None: a packed token batch.

    Returns:
      The ShardedProgram.
    """
    boxed = jax.eval_shape(init_state, jax.random.key(0))
    check_applies(strategy, mesh, boxed.params, batch_size=batch_size, seq_len=seq_len)
    if getattr(boxed, "frozen", None):
        check_applies(strategy, mesh, boxed.frozen)
    layout = state_layout(strategy, mesh, boxed, tx)

    def init(rng):
        with layout.tracing():
            # No constraint at unboxing: out_shardings places each leaf (a parameter never
            # exists whole on one device under ZeRO-3).
            return _unbox(init_state(rng))

    grad_shardings = layout.grads if strategy.zero_stage >= 2 else None
    ring = context.ring_size(strategy, mesh)

    def step(state, batch, rng):
        if ring > 1 and seq_len is not None:  # causal load balance of context parallelism
            batch = context.zigzag_batch(batch, seq_len, ring)
        with layout.tracing():
            return train_step(state, batch, rng, grad_shardings=grad_shardings)

    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      _unbox(boxed), layout.state)
    return ShardedProgram(
        layout=layout, boxed_state=boxed, abstract_state=abstract,
        init=jax.jit(init, out_shardings=layout.state),
        step=jax.jit(step, in_shardings=(layout.state, layout.batch, layout.replicated),
                     out_shardings=(layout.state, layout.replicated), donate_argnums=(0,)),
        batch_spec=batch_spec,
    )


def _unbox(tree):
    return jax.tree_util.tree_map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                                  tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
