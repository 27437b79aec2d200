"""Where each piece of the training state lives under a strategy, as NamedShardings.

    boxed = jax.eval_shape(init_state, rng)       # abstract state, params logically partitioned
    layout = state_layout(strategy, mesh, boxed, tx)
    layout.state.params     # by the model rules (+ ZeRO split from stage 3)
    layout.grads            # like the params (+ ZeRO split from stage 2)
    layout.state.opt_state  # Adam's m and v like the params (+ ZeRO split from stage 1)
    layout.batch            # rows over the strategy's batch axes

The optimizer state's shardings mirror the parameter tree with `optax.tree_map_params`
(every copy of the parameter tree inside the state, such as Adam's m and v, gets the
parameter shardings; the rest, such as Adam's step count, is replicated), so no optax
internals are probed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.strategies import Rules, Strategy


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shardings of one strategy on one mesh for one model's state.

    Attributes:
      strategy, mesh: what they were built from.
      rules: the logical axis rules to trace the model under (activations).
      state: the state's tree (step, params, opt_state) with a NamedSharding per leaf.
      grads: the params' tree with the gradients' NamedShardings.
      batch: the sharding of a [B, T] batch.
      replicated: a fully replicated sharding (scalars, rng, metrics).
    """

    strategy: Strategy
    mesh: Mesh
    rules: Rules
    state: Any
    grads: Any
    batch: NamedSharding
    replicated: NamedSharding

    @contextlib.contextmanager
    def tracing(self):
        """The context a traced function needs for the models' logical constraints to bind to
        this mesh (usable inside `jax.jit`, unlike `jax.set_mesh`)."""
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
            yield


def param_shardings(strategy: Strategy, mesh: Mesh, boxed_params: Any, *, zero: bool) -> Any:
    """NamedShardings of a logically partitioned params tree: the model rules, and with `zero`
    the ZeRO split (`Strategy.spec`). Leaves without logical names are replicated."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned) and getattr(leaf, "names", None) is not None:
            return NamedSharding(mesh, strategy.spec(leaf.names, leaf.value.shape, mesh, zero=zero))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_layout(strategy: Strategy, mesh: Mesh, boxed_state: Any, tx: optax.GradientTransformation) -> Layout:
    """The Layout of a train state (a pytree with `step`, `params` and `opt_state`, params boxed
    with logical names, as `jax.eval_shape(train.step.init_state, ...)` returns).

    Args:
      strategy: the strategy.
      mesh: the mesh (its axes a subset of the strategy's, see `check_applies`).
      boxed_state: the abstract state.
      tx: the optimizer whose state `boxed_state.opt_state` is.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    stage = strategy.zero_stage
    params = param_shardings(strategy, mesh, boxed_state.params, zero=stage >= 3)
    grads = param_shardings(strategy, mesh, boxed_state.params, zero=stage >= 2)
    moments = param_shardings(strategy, mesh, boxed_state.params, zero=stage >= 1)
    opt_state = optax.tree_map_params(tx, lambda _, sharding: sharding, boxed_state.opt_state, moments,
                                      transform_non_params=lambda _: replicated)
    state = boxed_state.replace(step=replicated, params=params, opt_state=opt_state)
    rules = strategy.activation_rules(mesh)
    return Layout(strategy=strategy, mesh=mesh, rules=rules, state=state, grads=grads,
                  batch=NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch", None), rules)),
                  replicated=replicated)

