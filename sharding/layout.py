"""Where each piece of the training state lives under a strategy, as NamedShardings.

    boxed = jax.eval_shape(init_state, rng)       # abstract state, params logically partitioned
    layout = state_layout(strategy, mesh, boxed, tx)
    layout.state.params     # by the model rules (+ ZeRO split from stage 3)
    layout.state.frozen     # parameters that do not train: like the params
    layout.grads            # like the params (+ ZeRO split from stage 2)
    layout.state.opt_state  # Adam's m and v like the params (+ ZeRO split from stage 1)
    layout.batch            # rows over the strategy's batch axes (batch leaves of any rank)

The frozen parameters (a base under LoRA, frozen layers; `train.trainable`) are laid out by
their logical names exactly like trainable ones (ZeRO-3 splits them too); they have no
gradients or optimizer state. A frozen leaf stored quantized (a pytree of arrays that keep the
kernel's rank) has each of its arrays laid out by the kernel's names.

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
      state: the state's tree (step, params, opt_state, frozen) with a NamedSharding per leaf.
      grads: the params' tree with the gradients' NamedShardings.
      batch: the sharding of a batch leaf: rows over the batch axes, any rank.
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

    def named(names, array):
        if names is not None and len(names) == len(array.shape):
            return NamedSharding(mesh, strategy.spec(names, array.shape, mesh, zero=zero))
        return NamedSharding(mesh, PartitionSpec())

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            names = getattr(leaf, "names", None)
            # One array (a QuantizedTensor has `shape` and `dtype` too, but several arrays).
            if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(leaf.value)):
                return named(names, leaf.value)
            # A quantized frozen kernel: a pytree of arrays of the kernel's rank.
            return jax.tree_util.tree_map(lambda a: named(names, a), leaf.value)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_layout(strategy: Strategy, mesh: Mesh, boxed_state: Any, tx: optax.GradientTransformation) -> Layout:
    """The Layout of a train state (a pytree with `step`, `params`, `opt_state` and optionally
    `frozen`, params and frozen boxed with logical names, as `jax.eval_shape(train.step.init_state,
    ...)` returns).

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
    parts = {"step": replicated, "params": params, "opt_state": opt_state}
    if hasattr(boxed_state, "frozen"):
        parts["frozen"] = param_shardings(strategy, mesh, boxed_state.frozen, zero=stage >= 3)
    state = boxed_state.replace(**parts)
    rules = strategy.activation_rules(mesh)
    # Only the leading (row) axis is named, so the sharding fits [B], [B, T], [B, T, ...] alike.
    return Layout(strategy=strategy, mesh=mesh, rules=rules, state=state, grads=grads,
                  batch=NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch",), rules)),
                  replicated=replicated)

