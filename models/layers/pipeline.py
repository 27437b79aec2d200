"""Pipeline parallelism of a stack of identical layers (GPipe), in logical axis names only.

Axis letters: S stages, M micro-batches, L layers (L = S * Ls), B batch, b = B / M rows of a
micro-batch, T length, D model width.

The stacked parameters [L, ...] (`nn.scan`'s leading `layers` axis) are cut into S stages of
Ls consecutive layers, [S, Ls, ...]; a strategy that maps `layers` to a mesh axis puts each
stage's layers on its own devices, so the reshape moves nothing. The batch is cut into M
contiguous micro-batches (rows [j b, (j + 1) b), like gradient accumulation's). A state buffer
[S, b, T, D] (logical `act_stage` first) holds what each stage works on; every tick

    buffer = shift(buffer) by one stage, micro-batch t entering stage 0
    buffer = vmap(stage)(params_S, buffer)          # all S stages at once, each on its devices

so stage s works on micro-batch t - s at tick t, and after M + S - 1 ticks every micro-batch has
passed all S stages; the last stage's outputs at ticks S - 1 ... M + S - 2 are the stack's
output. The shift of a stage-split buffer compiles to a collective-permute; autodiff of the
tick loop runs the ticks backwards with the permutes reversed: GPipe's schedule (Huang et al.
2019), all forwards then all backwards, each stage keeping the activations of its M micro-batches.

A stage is idle (computes on a placeholder, its result masked out) at the ticks where t - s is
outside [0, M): S - 1 of the M + S - 1 ticks, the bubble (S - 1) / (M + S - 1). The loop counts
each stage's useful ticks (`PipelineOutput.useful_ticks`), which measures the bubble of the
program that ran.

Dropout masks are drawn per micro-batch and layer (the rng folded with both), so with dropout
a pipelined run draws other masks than the unpipelined stack; without, the outputs are equal.

What layers sow (a MoE layer's router statistics) is kept only for the useful ticks and
averaged over the micro-batches: as under gradient accumulation over M micro-batches, a MoE
layer's balance losses are those of the tokens it routed together, each micro-batch counting
1 / M.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STATE_NAMES = ("act_stage", "act_batch", "act_seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class PipelineOutput:
    """What `pipeline` returns.

    Attributes:
      y_BTD: the stack's output.
      stats: what the layers returned besides their output, leaves [L, ...], the mean over
        the micro-batches.
      useful_ticks: [S] int32, the ticks at which each stage worked on a micro-batch.
      ticks: the ticks the loop ran (M + S - 1).
    """

    y_BTD: jax.Array
    stats: Any
    useful_ticks: jax.Array
    ticks: int


def stage_axes():
    """The mesh axes the logical axis `act_stage` is split over under the current logical axis
    rules and mesh (None: none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return None
    axes = nn.logical_to_mesh_axes(("act_stage",))[0]
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.shape) or None


def stage_count() -> int:
    """Devices the logical axis `act_stage` is split over (1: not split): the stages."""
    axes = stage_axes()
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if axes is None else math.prod(mesh.shape[a] for a in axes)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe's idle fraction of the stage-ticks, (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def pipeline(apply_layer: Callable, params_L: Any, x_BTD: jax.Array, extras: dict[str, jax.Array], *,
             stages: int, microbatches: int, rng: jax.Array | None = None) -> PipelineOutput:
    """Runs L stacked layers over `x_BTD` as an S-stage pipeline of M micro-batches (module docstring).

    Args:
      apply_layer: (layer params, x [b, T, D], extras {name: [b, ...]}, rng or None) ->
        (y [b, T, D], stats): one layer; `stats` a pytree of arrays (e.g. {}).
      params_L: the stacked parameters, leaves [L, ...].
      x_BTD: the input.
      extras: per-row inputs of every layer (positions, segment ids, ...), leaves [B, ...].
      stages: S; L must be a multiple of it.
      microbatches: M; B must be a multiple of it.
      rng: the layers' rng (dropout), folded with the micro-batch and the layer index; None: none.

    Returns:
      The PipelineOutput.
    """
    S, M = stages, microbatches
    L = jax.tree_util.tree_leaves(params_L)[0].shape[0]
    B = x_BTD.shape[0]
    if L % S:
        raise ValueError(f"a pipeline of {S} stages needs the stacked layers ({L}) to be a multiple of {S}")
    if B % M:
        raise ValueError(f"a pipeline of {M} micro-batches needs the batch ({B} rows) to be a multiple of {M}")
    Ls, b = L // S, B // M
    params_S = jax.tree_util.tree_map(lambda w: w.reshape(S, Ls, *w.shape[1:]), params_L)
    x_M = nn.with_logical_constraint(jnp.asarray(x_BTD).reshape(M, b, *x_BTD.shape[1:]), (None, *STATE_NAMES[1:]))
    extras_M = jax.tree_util.tree_map(lambda e: jnp.asarray(e).reshape(M, b, *e.shape[1:]), extras)

    def stage(params_l, x, extras_b, j, s):
        def body(h, inputs):
            params, index = inputs
            layer_rng = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, j), s * Ls + index)
            return apply_layer(params, h, extras_b, layer_rng)

        return jax.lax.scan(body, x, (params_l, jnp.arange(Ls)))

    # Inside the vmap over stages, the layers' own sharding constraints get the stage axis too.
    run_stages = jax.vmap(stage, spmd_axis_name=stage_axes())
    stage_ids = jnp.arange(S)
    first = (stage_ids == 0)[:, None, None, None]

    def tick(carry, t):
        state, stats_sum, useful = carry
        j = t - stage_ids
        valid = (j >= 0) & (j < M)
        j = jnp.clip(j, 0, M - 1)
        state = jnp.where(first, x_M[jnp.minimum(t, M - 1)][None], jnp.roll(state, 1, axis=0))
        state = nn.with_logical_constraint(state, STATE_NAMES)
        state, stats = run_stages(params_S, state, jax.tree_util.tree_map(lambda e: e[j], extras_M), j, stage_ids)
        state = nn.with_logical_constraint(state, STATE_NAMES)
        stats_sum = jax.tree_util.tree_map(
            lambda total, x: total + jnp.where(valid.reshape(S, *(1,) * (x.ndim - 1)), x, 0), stats_sum, stats)
        return (state, stats_sum, useful + valid.astype(jnp.int32)), state[S - 1]

    state0 = nn.with_logical_constraint(jnp.zeros((S, *x_M.shape[1:]), x_BTD.dtype), STATE_NAMES)
    stats_shape = jax.eval_shape(lambda: run_stages(params_S, state0, jax.tree_util.tree_map(
        lambda e: e[jnp.zeros(S, jnp.int32)], extras_M), stage_ids, stage_ids)[1])
    stats0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
    ticks = M + S - 1
    (_, stats_sum, useful), last_T = jax.lax.scan(tick, (state0, stats0, jnp.zeros(S, jnp.int32)),
                                                  jnp.arange(ticks))
    y_BTD = last_T[S - 1:].reshape(x_BTD.shape)
    stats = jax.tree_util.tree_map(lambda s: (s / M).reshape(L, *s.shape[2:]), stats_sum)
    return PipelineOutput(y_BTD=nn.with_logical_constraint(y_BTD, STATE_NAMES[1:]), stats=stats,
                          useful_ticks=useful, ticks=ticks)
