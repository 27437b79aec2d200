"""Collectives written by hand out of `lax.ppermute`, and their alpha-beta cost model.

The collectives behind every strategy (DP's gradient all-reduce, ZeRO's reduce-scatter and
all-gather, expert parallelism's all-to-all), written as the ring algorithms NCCL and the
TPU interconnect run, from point-to-point sends only: inside a `shard_map` body each device
calls `lax.ppermute`, which passes one block to a neighbour. The results equal `lax.psum`,
`lax.psum_scatter`, `lax.all_gather` and `lax.all_to_all` (the sums add in another order).

On an axis of N devices and n bytes per device:

  reduce_scatter   N-1 steps: each device passes a running partial sum of one chunk (n/N
                   bytes) to its right neighbour and adds its own chunk to what it gets from
                   the left; after N-1 steps device i holds chunk i summed over all devices.
  all_gather       N-1 steps: each device passes on the block it last received (its own at
                   first) and keeps what comes in.
  ring_all_reduce  reduce_scatter of the flattened array, then all_gather of the summed
                   chunks: 2(N-1) steps of n/N bytes, the bandwidth-optimal all-reduce.
  bidirectional_all_reduce   the same with each chunk split in halves, one half around the
                   ring clockwise and the other counter-clockwise: every step uses both
                   directions of each link, so each direction carries half the bytes.
  all_to_all       N-1 steps of pairwise exchange: at step k device i sends its block for
                   device i+k straight to it (a shift by k, not k hops of a ring).
  hierarchical_all_reduce   over two mesh axes (outer x inner, e.g. hosts x chips):
                   reduce-scatter over inner, all-reduce of the 1/N_in shard over outer,
                   all-gather over inner; the slow outer links carry only n/N_in.

Every loop is unrolled in Python, so the compiled HLO holds one collective-permute per step
(`sharding.analysis.collectives` counts ops statically: a permute in a while loop would count
once) and its bytes can be checked against the model's. Shapes whose size is not a multiple
of N are zero-padded to one and cropped after.

Cost model (`cost`): alpha seconds per message step, beta seconds per byte on one link
direction; a collective of S message steps whose busiest link direction carries B bytes takes
alpha * S + beta * B. With n the bytes of one device's input (of the gathered output for
all_gather):

  ring_all_reduce            2(N-1) alpha + 2(N-1)/N n beta
  bidirectional_all_reduce   2(N-1) alpha +  (N-1)/N n beta  (sends the same 2(N-1)/N n)
  reduce_scatter, all_gather  (N-1) alpha +  (N-1)/N n beta
  all_to_all                  (N-1) alpha +  (N-1)/N n beta
  hierarchical_all_reduce    2(Ni-1 + No-1) alpha + (2(Ni-1)/Ni + 2(No-1)/(No Ni)) n beta

`fit_alpha_beta` fits alpha and beta to measured times by least squares.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

# --------------------------------------------------------------------------- building blocks


def _shift(x: jax.Array, axis_name: str, size: int, offset: int) -> jax.Array:
    """Device i's `x` arrives at device i + offset (mod size)."""
    return lax.ppermute(x, axis_name, perm=[(j, (j + offset) % size) for j in range(size)])


def _ring_reduce_scatter_chunks(chunks: jax.Array, axis_name: str, direction: int = 1,
                                trace: list | None = None) -> jax.Array:
    """chunks [N, ...] on every device -> the sum over devices of chunks[i] on device i.

    At step s device i sends its partial sum of chunk i - d(s+1) to device i + d and adds its
    own chunk i - d(s+2) to the partial sum that arrives from i - d (d = `direction`, +1 or
    -1); after N-1 steps the partial sum it holds is of chunk i - dN = i, complete.
    `trace`, if a list, gets the device's chunks after each step, each with the partial sum
    it holds in place of its own.
    """
    size, index = lax.axis_size(axis_name), lax.axis_index(axis_name)
    partial = chunks[(index - direction) % size]
    for step in range(size - 1):
        received = _shift(partial, axis_name, size, direction)
        partial = received + chunks[(index - direction * (step + 2)) % size]
        if trace is not None:
            chunks = chunks.at[(index - direction * (step + 2)) % size].set(partial)
            trace.append(chunks)
    return partial


def _ring_all_gather_blocks(block: jax.Array, axis_name: str, direction: int = 1, *,
                            start: jax.Array | None = None, trace: list | None = None) -> jax.Array:
    """block on every device -> [N, *block.shape], row j device j's block, on every device.

    At step s device i passes on the block it got at step s-1 (its own at s = 0), so what
    arrives from i - d is device i - d(s+1)'s. `start`: the rows to write into (zeros by
    default); `trace`, if a list, gets the rows after each step.
    """
    size, index = lax.axis_size(axis_name), lax.axis_index(axis_name)
    out = (jnp.zeros((size, *block.shape), block.dtype) if start is None else start).at[index].set(block)
    for step in range(size - 1):
        block = _shift(block, axis_name, size, direction)
        out = out.at[(index - direction * (step + 1)) % size].set(block)
        if trace is not None:
            trace.append(out)
    return out


def _padded_chunks(x: jax.Array, parts: int) -> jax.Array:
    """x flattened and zero-padded to a multiple of `parts`, as [parts, ceil(size / parts)]."""
    flat = x.reshape(-1)
    pad = -flat.size % parts
    return jnp.pad(flat, (0, pad)).reshape(parts, -1)


def _crop(chunks: jax.Array, like: jax.Array) -> jax.Array:
    return chunks.reshape(-1)[:like.size].reshape(like.shape)


def _check_divides(x: jax.Array, dim: int, size: int, what: str) -> None:
    if x.shape[dim] % size:
        raise ValueError(f"{what}: dimension {dim} of shape {x.shape} must be a multiple of the axis size {size}; "
                         f"pad it or choose another dimension")


# ------------------------------------------------------------- collectives in a shard_map body


def reduce_scatter(x: jax.Array, axis_name: str, scatter_dimension: int = 0) -> jax.Array:
    """The ring reduce-scatter: `lax.psum_scatter(x, axis_name, scatter_dimension=..., tiled=True)`.

    Args:
      x: this device's array; `x.shape[scatter_dimension]` must be a multiple of N.
      axis_name: the mesh axis (of N devices) to sum over.
      scatter_dimension: the dimension split into N blocks; device i keeps the sum of block i.

    Returns:
      x's shape with `scatter_dimension` divided by N.
    """
    size = lax.axis_size(axis_name)
    _check_divides(x, scatter_dimension, size, "reduce_scatter")
    moved = jnp.moveaxis(x, scatter_dimension, 0)
    chunks = moved.reshape(size, moved.shape[0] // size, *moved.shape[1:])
    return jnp.moveaxis(_ring_reduce_scatter_chunks(chunks, axis_name), 0, scatter_dimension)


def all_gather(x: jax.Array, axis_name: str, axis: int = 0, tiled: bool = False) -> jax.Array:
    """The ring all-gather: `lax.all_gather(x, axis_name, axis=axis, tiled=tiled)`.

    Returns:
      the N devices' x stacked along a new dimension `axis` (tiled=False), or concatenated
      along `axis` (tiled=True).
    """
    gathered = jnp.moveaxis(_ring_all_gather_blocks(x, axis_name), 0, axis)
    if not tiled:
        return gathered
    shape = list(x.shape)
    shape[axis] *= lax.axis_size(axis_name)
    return gathered.reshape(shape)


def ring_all_reduce(x: jax.Array, axis_name: str, trace: list | None = None) -> jax.Array:
    """The ring all-reduce (reduce-scatter, then all-gather): `lax.psum(x, axis_name)`, any shape.

    Args:
      x: this device's array.
      axis_name: the mesh axis (of N devices) to sum over.
      trace: if a list, it gets this device's N chunks ([N, ceil(size / N)], x flattened and
        zero-padded) after each of the 2(N-1) steps: the partial sums of the reduce-scatter
        phase, then the complete sums as the all-gather phase brings them in.
    """
    size = lax.axis_size(axis_name)
    chunks = _padded_chunks(x, size)
    summed = _ring_reduce_scatter_chunks(chunks, axis_name, trace=trace)
    start = trace[-1] if trace else None  # the device's chunks as the reduce-scatter left them
    return _crop(_ring_all_gather_blocks(summed, axis_name, start=start, trace=trace), x)


def bidirectional_all_reduce(x: jax.Array, axis_name: str) -> jax.Array:
    """The ring all-reduce with half of every chunk going each way round: `lax.psum(x, axis_name)`."""
    size = lax.axis_size(axis_name)
    halves = _padded_chunks(x, 2 * size).reshape(2, size, -1)
    summed = [_ring_reduce_scatter_chunks(halves[h], axis_name, direction) for h, direction in ((0, 1), (1, -1))]
    gathered = [_ring_all_gather_blocks(summed[h], axis_name, direction) for h, direction in ((0, 1), (1, -1))]
    return _crop(jnp.stack(gathered), x)


def hierarchical_all_reduce(x: jax.Array, inner_axis: str, outer_axis: str) -> jax.Array:
    """2-D all-reduce over two mesh axes: `lax.psum(x, (outer_axis, inner_axis))`.

    Reduce-scatter over `inner_axis` (the fast links, e.g. within a host), ring all-reduce of
    the 1/N_inner shard over `outer_axis` (across hosts), all-gather over `inner_axis`.
    """
    inner, outer = lax.axis_size(inner_axis), lax.axis_size(outer_axis)
    chunks = _padded_chunks(x, inner * outer).reshape(inner, -1)
    shard = _ring_reduce_scatter_chunks(chunks, inner_axis)
    shard = ring_all_reduce(shard, outer_axis)  # its length divides by `outer`: no padding
    return _crop(_ring_all_gather_blocks(shard, inner_axis), x)


def all_to_all(x: jax.Array, axis_name: str, split_axis: int, concat_axis: int) -> jax.Array:
    """Pairwise-exchange all-to-all: `lax.all_to_all(x, axis_name, split_axis, concat_axis, tiled=True)`.

    x is split along `split_axis` into N blocks; block j goes to device j, and the blocks a
    device receives are concatenated along `concat_axis` in order of their senders. Step k
    (1..N-1) is one shift by k: device i sends block i+k and receives block i from i-k.
    """
    size, index = lax.axis_size(axis_name), lax.axis_index(axis_name)
    _check_divides(x, split_axis, size, "all_to_all")
    moved = jnp.moveaxis(x, split_axis, 0)
    blocks = moved.reshape(size, moved.shape[0] // size, *moved.shape[1:])
    received = jnp.zeros_like(blocks).at[index].set(blocks[index])
    for shift in range(1, size):
        block = _shift(blocks[(index + shift) % size], axis_name, size, shift)
        received = received.at[(index - shift) % size].set(block)
    received = jnp.moveaxis(received, 1, split_axis + 1)  # [N, *x.shape with split_axis / N]
    received = jnp.moveaxis(received, 0, concat_axis)
    shape = list(x.shape)
    shape[split_axis] //= size
    shape[concat_axis] *= size
    return received.reshape(shape)


# Each collective by hand beside the lax collective it equals, both as body(x, axis_name).
# The per-device input of the gathers is the shard, of the others the whole array.
COLLECTIVES: dict[str, tuple[Callable, Callable]] = {
    "ring_all_reduce": (ring_all_reduce, lambda x, a: lax.psum(x, a)),
    "bidirectional_all_reduce": (bidirectional_all_reduce, lambda x, a: lax.psum(x, a)),
    "reduce_scatter": (reduce_scatter, lambda x, a: lax.psum_scatter(x, a, tiled=True)),
    "all_gather": (functools.partial(all_gather, tiled=True), lambda x, a: lax.all_gather(x, a, tiled=True)),
    "all_to_all": (functools.partial(all_to_all, split_axis=0, concat_axis=0),
                   lambda x, a: lax.all_to_all(x, a, 0, 0, tiled=True)),
}


# ---------------------------------------------------------------------- over a whole mesh


def per_device(body: Callable, mesh: Mesh, axis_names: str | Sequence[str]) -> Callable:
    """A jitted function of per-device values stacked on leading axes, one per mesh axis.

    `per_device(ring_all_reduce, mesh, "data")(xs)` with xs [N, ...] gives device i xs[i]
    and returns [N, ...], row i device i's result: a way to call the collectives above (or
    the lax ones) from outside a shard_map and to see every device's value.

    Args:
      body: f(x, axis_name), or f(x, *axis_names) for several axes (hierarchical_all_reduce
        takes them inner first: pass axis_names=(outer, inner) and body=lambda x, o, i: ...).
      mesh: a mesh with those axes (others are left replicated).
      axis_names: the mesh axes of the leading dimensions, outer first.
    """
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    lead = (0,) * len(names)
    spec = PartitionSpec(*names)

    def local(xs):
        out = body(xs[lead], *names)
        return out.reshape((1,) * len(names) + out.shape)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def mesh_of(sizes: dict[str, int], devices: Sequence | None = None) -> Mesh:
    """A mesh of the first prod(sizes) devices with Auto axes, e.g. mesh_of({"data": 4})."""
    devices = jax.devices() if devices is None else devices
    count = math.prod(sizes.values())
    if count > len(devices):
        raise ValueError(f"mesh {sizes} needs {count} devices but there are {len(devices)}; use smaller axes "
                         f"(or XLA_FLAGS=--xla_force_host_platform_device_count={count} on CPU)")
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=devices[:count],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


# ----------------------------------------------------------------------------- cost model


@dataclasses.dataclass(frozen=True)
class Cost:
    """The alpha-beta cost of one collective, for one device.

    Attributes:
      steps: message steps in sequence (each pays the latency alpha once).
      sent_bytes: bytes one device sends in all (what its collective-permutes carry).
      link_bytes: bytes on its busiest link direction (what the bandwidth term pays for):
        sent_bytes, or half of it when the sends go both ways round the ring.
    """

    steps: int
    sent_bytes: float
    link_bytes: float

    def time(self, alpha: float, beta: float) -> float:
        """Seconds: alpha per step, beta per byte on the busiest link direction."""
        return alpha * self.steps + beta * self.link_bytes


def cost(name: str, nbytes: float, sizes: int | Sequence[int]) -> Cost:
    """The alpha-beta cost of collective `name` on `nbytes` per device (see the module docstring).

    Args:
      name: a key of COLLECTIVES, or "hierarchical_all_reduce".
      nbytes: bytes of one device's input, padded to the algorithm's chunking (of the gathered
        output for all_gather: N times its input).
      sizes: N, or (N_outer, N_inner) for hierarchical_all_reduce.
    """
    if name == "hierarchical_all_reduce":
        outer, inner = sizes
        sent = 2 * (inner - 1) / inner * nbytes + 2 * (outer - 1) / outer * nbytes / inner
        return Cost(2 * (inner - 1) + 2 * (outer - 1), sent, sent)
    n = sizes if isinstance(sizes, int) else math.prod(sizes)
    if name in ("ring_all_reduce", "bidirectional_all_reduce"):
        sent = 2 * (n - 1) / n * nbytes
        return Cost(2 * (n - 1), sent, sent / 2 if name == "bidirectional_all_reduce" else sent)
    if name in ("reduce_scatter", "all_gather", "all_to_all"):
        sent = (n - 1) / n * nbytes
        return Cost(n - 1, sent, sent)
    raise ValueError(f"no cost model for collective {name!r}; expected one of "
                     f"{(*COLLECTIVES, 'hierarchical_all_reduce')}")


def padded_bytes(name: str, shape: Sequence[int], itemsize: int, sizes: int | Sequence[int]) -> int:
    """Bytes of one device's input as the algorithm chunks it (flattened and zero-padded to a
    multiple of N for the ring all-reduce, 2N bidirectional, N_outer N_inner hierarchical)."""
    count = math.prod(shape)
    n = sizes if isinstance(sizes, int) else math.prod(sizes)
    parts = {"ring_all_reduce": n, "bidirectional_all_reduce": 2 * n, "hierarchical_all_reduce": n}.get(name, 1)
    count += -count % parts
    return count * itemsize * (n if name == "all_gather" else 1)


def fit_alpha_beta(costs: Sequence[Cost], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares alpha >= 0 and beta >= 0 of `seconds[k] ~ alpha * steps + beta * link_bytes`.

    Rows are weighted by 1 / seconds, so the fit minimises relative errors (a microsecond
    collective counts as much as a millisecond one). When the unconstrained optimum has a
    negative coefficient (times that barely grow with bytes), the better of the two one-term
    fits is returned (the constrained optimum then lies on that boundary). Returns (alpha, beta).
    """
    design = np.array([[c.steps, c.link_bytes] for c in costs], dtype=np.float64)
    target = np.asarray(seconds, dtype=np.float64)
    weighted, goal = design / target[:, None], np.ones_like(target)
    (alpha, beta), *_ = np.linalg.lstsq(weighted, goal, rcond=None)
    if alpha >= 0 and beta >= 0:
        return float(alpha), float(beta)
    best = None
    for column in (0, 1):
        coef = max(0.0, float(weighted[:, column] @ goal / (weighted[:, column] @ weighted[:, column])))
        residual = float(np.sum((weighted[:, column] * coef - goal) ** 2))
        if best is None or residual < best[0]:
            best = (residual, (coef, 0.0) if column == 0 else (0.0, coef))
    return best[1]
