"""Pipeline schedules over the `stage` mesh axis: GPipe's and 1F1B's tick tables, and 1F1B run
with `shard_map` (each device executes its own stage's program).

Axis letters: S stages, M micro-batches, b rows of a micro-batch, T length, D model width.

A schedule is a table [ticks, S, 2] of (op, micro-batch) per stage and tick, op IDLE, FORWARD
or BACKWARD; every op takes one tick, an op waits for what it needs from the neighbouring stage
at an earlier tick (`schedule`):

    GPipe  every stage: F0 ... F(M-1), then B(M-1) ... B0 (what autodiff of
           `models.layers.pipeline` runs). A stage holds the activations of all M micro-batches.
    1F1B   stage s: S - s - 1 forwards, then one forward and one backward in turn, then the
           remaining backwards (PipeDream-Flush, Narayanan et al. 2021; Megatron-LM's default).
           A micro-batch's backward starts as soon as the last stage has its loss, so stage s
           holds at most S - s micro-batches' inputs, whatever M.

Both run 2 (M + S - 1) ticks, the same bubble (S - 1) / (M + S - 1); 1F1B buys memory, not time.

`one_f_one_b` runs the 1F1B table: forward and backward of every micro-batch through S stages
and the loss at the last one, returning the loss and its gradients (it is the training step's
forward and backward at once). Only `stage` is manual in its `shard_map`: on the other mesh
axes the compiler partitions each stage's work as the inputs' shardings and the layers' logical
constraints say, so 1F1B composes with fsdp and tp. A stage stashes each micro-batch's input
(a ring of S slots) and recomputes its forward inside the backward (`jax.vjp`); activations go
to the next stage and gradients to the previous one by `ppermute` every tick.

The training step (`sharding.pipeline_schedule`) pipelines with GPipe (`models.layers.pipeline`:
the loss stays outside the model); 1F1B is this library schedule, not yet a step option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from sharding.strategies import STAGE

IDLE, FORWARD, BACKWARD = 0, 1, 2
SCHEDULES = ("gpipe", "1f1b")


def _stage_ops(name: str, stage: int, stages: int, microbatches: int) -> list[tuple[int, int]]:
    M = microbatches
    if name == "gpipe":
        return [(FORWARD, j) for j in range(M)] + [(BACKWARD, j) for j in reversed(range(M))]
    warmup = min(stages - stage - 1, M)
    ops = [(FORWARD, j) for j in range(warmup)]
    for i in range(M - warmup):
        ops += [(FORWARD, warmup + i), (BACKWARD, i)]
    return ops + [(BACKWARD, j) for j in range(M - warmup, M)]


def schedule(name: str, stages: int, microbatches: int) -> np.ndarray:
    """The tick table [ticks, S, 2] of (op, micro-batch) of schedule `name` (module docstring).

    Each stage runs its ops in order, each at the first tick at which its inputs exist: a
    forward needs the previous stage's forward of the micro-batch, a backward its own forward
    and the next stage's backward (the last stage's loss is computed in its forward tick).
    """
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule {name!r}; expected one of {SCHEDULES}")
    S = stages
    pending = [_stage_ops(name, s, S, microbatches) for s in range(S)]
    done: dict[tuple[int, int, int], int] = {}
    rows = []
    while any(pending):
        t, row = len(rows), []
        for s in range(S):
            if not pending[s]:
                row.append((IDLE, 0))
                continue
            op, j = pending[s][0]
            if op == FORWARD:
                needs = [] if s == 0 else [(FORWARD, s - 1, j)]
            else:
                needs = [(FORWARD, s, j)] + ([] if s == S - 1 else [(BACKWARD, s + 1, j)])
            if all(done.get(n, t) < t for n in needs):
                done[(op, s, j)] = t
                pending[s].pop(0)
                row.append((op, j))
            else:
                row.append((IDLE, 0))
        rows.append(row)
        if len(rows) > 4 * (microbatches + S) + 8:
            raise RuntimeError(f"schedule {name} for {S} stages and {microbatches} micro-batches does not finish")
    return np.asarray(rows, np.int32)


def bubble(table: np.ndarray) -> float:
    """Idle fraction of the stage-ticks of a tick table."""
    return float(np.mean(table[..., 0] == IDLE))


def in_flight(table: np.ndarray) -> np.ndarray:
    """[S] the most micro-batches each stage holds at once (forwarded, not yet backwarded)."""
    forwards = np.cumsum(table[..., 0] == FORWARD, axis=0)
    backwards = np.cumsum(table[..., 0] == BACKWARD, axis=0)
    return (forwards - backwards).max(axis=0)


def one_f_one_b(stage_fn: Callable, loss_fn: Callable, stage_params: Any, head_params: Any, x_MbTD: jax.Array,
                extras_M: Any, targets_M: Any, *, mesh: Mesh):
    """The 1F1B schedule's loss and gradients, run with `shard_map` over `mesh`.

    Args:
      stage_fn: (one stage's params, x [b, T, D], extras of the micro-batch) -> (y [b, T, D],
        aux): the stage's layers; `aux` a scalar added to the loss (e.g. MoE balance losses).
      loss_fn: (head params, y [b, T, D], targets of the micro-batch) -> the micro-batch's
        share of the loss (a sum over its tokens, normalised by the caller).
      stage_params: leaves [S, ...], split over `stage`.
      head_params: the loss's params (replicated).
      x_MbTD: the first stage's inputs, [M, b, T, D].
      extras_M, targets_M: per micro-batch inputs of the stages and of the loss, leaves [M, b, ...].
      mesh: a mesh with a `stage` axis. Only `stage` is manual (each device runs its stage's
        program); on the other axes (data, fsdp, tensor) the compiler partitions each stage's
        work as the inputs' shardings and the layers' constraints say, so a micro-batch's
        statistics (a MoE layer's balance losses) are those of all its rows.

    Returns:
      (loss, (d stage_params, d head_params, d x_MbTD), useful_ticks [S]): the loss summed over
      micro-batches, stages and rows; the gradients; the ticks each stage computed.
    """
    S, M = mesh.shape[STAGE], x_MbTD.shape[0]
    table = jnp.asarray(schedule("1f1b", S, M))
    whole = PartitionSpec()

    def run(params, head, x_M, extras, targets):
        params = jax.tree_util.tree_map(lambda w: w[0], params)
        s = jax.lax.axis_index(STAGE)
        last = s == S - 1
        slots = jnp.zeros((S, *x_M.shape[1:]), x_M.dtype)

        def stage_input(stash, j):
            return jnp.where(s == 0, x_M[j], stash[j % S])

        def micro(tree, j):
            return jax.tree_util.tree_map(lambda e: e[j], tree)

        def forward(carry, j):
            stash, grads_in, dparams, dhead, loss, dx, useful = carry
            y, aux = stage_fn(params, stage_input(stash, j), micro(extras, j))

            def head_loss(y):  # the last stage: the loss and the cotangent of its output
                value, (dy, dh) = jax.value_and_grad(loss_fn, argnums=(1, 0))(head, y, micro(targets, j))
                return value, dy, dh

            def no_loss(y):
                return (jnp.zeros((), jnp.float32), jnp.zeros_like(y),
                        jax.tree_util.tree_map(jnp.zeros_like, head))

            value, dy, dh = jax.lax.cond(last, head_loss, no_loss, y)
            grads_in = jnp.where(last, grads_in.at[j % S].set(dy), grads_in)
            dhead = jax.tree_util.tree_map(jnp.add, dhead, dh)
            carry = (stash, grads_in, dparams, dhead, loss + value + aux, dx, useful + 1)
            return carry, y, jnp.zeros_like(y)

        def backward(carry, j):
            stash, grads_in, dparams, dhead, loss, dx, useful = carry
            _, vjp = jax.vjp(lambda p, x: stage_fn(p, x, micro(extras, j)), params, stage_input(stash, j))
            dp, dx_j = vjp((grads_in[j % S], jnp.ones((), jnp.float32)))
            dparams = jax.tree_util.tree_map(jnp.add, dparams, dp)
            dx = jnp.where(s == 0, dx.at[j].set(dx_j), dx)
            carry = (stash, grads_in, dparams, dhead, loss, dx, useful + 1)
            return carry, jnp.zeros_like(dx_j), dx_j

        def idle(carry, j):
            return carry, jnp.zeros_like(slots[0]), jnp.zeros_like(slots[0])

        def tick(carry, ops):
            op, j = ops[s, 0], ops[s, 1]
            carry, send_forward, send_backward = jax.lax.switch(op, (idle, forward, backward), carry, j)
            # Every stage passes its output on and its input gradient back; a receiver keeps what
            # its neighbour computed this tick (the table says what that was).
            got_forward = jax.lax.ppermute(send_forward, STAGE, [(i, i + 1) for i in range(S - 1)])
            got_backward = jax.lax.ppermute(send_backward, STAGE, [(i + 1, i) for i in range(S - 1)])
            stash, grads_in, *rest = carry
            before, after = ops[jnp.maximum(s - 1, 0)], ops[jnp.minimum(s + 1, S - 1)]
            stash = jnp.where((s > 0) & (before[0] == FORWARD), stash.at[before[1] % S].set(got_forward), stash)
            grads_in = jnp.where((s < S - 1) & (after[0] == BACKWARD),
                                 grads_in.at[after[1] % S].set(got_backward), grads_in)
            return (stash, grads_in, *rest), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        carry = (slots, slots, zeros, jax.tree_util.tree_map(jnp.zeros_like, head), jnp.zeros((), jnp.float32),
                 jnp.zeros_like(x_M), jnp.zeros((), jnp.int32))
        (_, _, dparams, dhead, loss, dx, useful), _ = jax.lax.scan(tick, carry, table)
        loss = jax.lax.psum(loss, STAGE)
        dparams = jax.tree_util.tree_map(lambda g: g[None], dparams)
        dhead = jax.lax.psum(dhead, STAGE)
        dx = jax.lax.psum(dx, STAGE)
        return loss, (dparams, dhead, dx), useful[None]

    stage_spec = jax.tree_util.tree_map(lambda _: PartitionSpec(STAGE), stage_params)
    head_spec = jax.tree_util.tree_map(lambda _: whole, head_params)
    mapped = jax.shard_map(
        run, mesh=mesh, axis_names={STAGE}, check_vma=False,
        in_specs=(stage_spec, head_spec, whole, jax.tree_util.tree_map(lambda _: whole, extras_M),
                  jax.tree_util.tree_map(lambda _: whole, targets_M)),
        out_specs=(whole, (stage_spec, head_spec, whole), PartitionSpec(STAGE)))
    return mapped(stage_params, head_params, x_MbTD, extras_M, targets_M)
