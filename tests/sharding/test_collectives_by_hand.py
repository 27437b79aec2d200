"""sharding/collectives.py: the collectives written with ppermute equal lax's, on axes of 2, 4 and
8 simulated devices and a 2 x 4 mesh, and their compiled HLO is the cost model's.

Tolerance of the sums: a sum of N float32 numbers in any order is within (N - 1) u sum|x_i| of
the exact sum (u = eps32 / 2, the unit roundoff; recursive summation, Higham 2002 eq. 4.4 to
first order), so ours and lax's are each compared with float64 numpy within N eps32 sum|x_i|
(k = 1 with eps = 2u: twice the bound). Gathers and all-to-all move data without arithmetic:
exactly equal.
"""

import functools

import jax
import numpy as np
import pytest
from jax import lax

from sharding import analysis
from sharding import collectives as coll

EPS32 = float(np.finfo(np.float32).eps)
SIZES = (2, 4, 8)
REDUCING = ("ring_all_reduce", "bidirectional_all_reduce", "reduce_scatter")


@functools.cache
def mesh(sizes: tuple[tuple[str, int], ...]):
    return coll.mesh_of(dict(sizes))


def shape_for(name: str, n: int) -> tuple[int, ...]:
    """A per-device shape: not a multiple of N for the all-reduces (padding), splittable otherwise."""
    return (5, 3) if name.endswith("all_reduce") else (2 * n, 3)


def run_both(name: str, n: int, xs: np.ndarray):
    ours, ref = coll.COLLECTIVES[name]
    m = mesh((("data", n),))
    return np.asarray(coll.per_device(ours, m, "data")(xs)), np.asarray(coll.per_device(ref, m, "data")(xs))


def float64_reference(name: str, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per device: the exact result (float64) and sum|x| of the terms of each element."""
    n = xs.shape[0]
    total, scale = xs.astype(np.float64).sum(0), np.abs(xs.astype(np.float64)).sum(0)
    if name == "reduce_scatter":
        return total.reshape(n, -1, *xs.shape[2:]), scale.reshape(n, -1, *xs.shape[2:])
    return np.broadcast_to(total, xs.shape), np.broadcast_to(scale, xs.shape)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", tuple(coll.COLLECTIVES))
def test_equals_lax(name, n):
    xs = np.random.default_rng(n).standard_normal((n, *shape_for(name, n))).astype(np.float32)
    ours, theirs = run_both(name, n, xs)
    assert ours.shape == theirs.shape
    if name not in REDUCING:
        np.testing.assert_array_equal(ours, theirs)
        return
    exact, scale = float64_reference(name, xs)
    for result in (ours, theirs):
        assert np.all(np.abs(result - exact) <= n * EPS32 * scale), np.abs(result - exact).max()


@pytest.mark.parametrize("shape", [(), (1,), (7, 3), (2, 9, 5)])
def test_all_reduce_pads_any_shape(shape):
    """Sizes 1, 7 * 3 and 90 are not multiples of 8 (or of 16, the bidirectional chunking)."""
    xs = np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
    exact, scale = float64_reference("ring_all_reduce", xs)
    for name in ("ring_all_reduce", "bidirectional_all_reduce"):
        ours, _ = coll.COLLECTIVES[name]
        result = np.asarray(coll.per_device(ours, mesh((("data", 8),)), "data")(xs))
        assert result.shape == xs.shape
        assert np.all(np.abs(result - exact) <= 8 * EPS32 * scale)


@pytest.mark.parametrize("split_axis, concat_axis", [(0, 1), (1, 0), (2, 2), (1, 2)])
def test_all_to_all_other_axes(split_axis, concat_axis):
    xs = np.random.default_rng(0).standard_normal((4, 4, 8, 4)).astype(np.float32)
    m = mesh((("data", 4),))
    ours = coll.per_device(lambda x, a: coll.all_to_all(x, a, split_axis, concat_axis), m, "data")(xs)
    theirs = coll.per_device(lambda x, a: lax.all_to_all(x, a, split_axis, concat_axis, tiled=True), m, "data")(xs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_gather_and_scatter_on_other_dimensions():
    xs = np.random.default_rng(0).standard_normal((4, 3, 8)).astype(np.float32)
    m = mesh((("data", 4),))
    for axis, tiled in ((1, False), (2, False), (1, True)):
        ours = coll.per_device(functools.partial(coll.all_gather, axis=axis, tiled=tiled), m, "data")(xs)
        theirs = coll.per_device(functools.partial(lax.all_gather, axis=axis, tiled=tiled), m, "data")(xs)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    ours = np.asarray(coll.per_device(lambda x, a: coll.reduce_scatter(x, a, scatter_dimension=1), m, "data")(xs))
    exact = xs.astype(np.float64).sum(0).reshape(3, 4, 2).transpose(1, 0, 2)
    scale = np.abs(xs.astype(np.float64)).sum(0).reshape(3, 4, 2).transpose(1, 0, 2)
    assert np.all(np.abs(ours - exact) <= 4 * EPS32 * scale)


def test_on_a_2x4_mesh():
    """The hierarchical all-reduce over both axes, and the ring over each axis alone (groups of
    4 devices along `inner`, of 2 along `outer`), against float64 sums."""
    xs = np.random.default_rng(0).standard_normal((2, 4, 7, 3)).astype(np.float32)
    m = mesh((("outer", 2), ("inner", 4)))
    wide = xs.astype(np.float64)
    cases = {
        (0, 1): lambda x, o, i: coll.hierarchical_all_reduce(x, i, o),
        (1,): lambda x, o, i: coll.ring_all_reduce(x, i),
        (0,): lambda x, o, i: coll.bidirectional_all_reduce(x, o),
    }
    for axes, body in cases.items():
        result = np.asarray(coll.per_device(body, m, ("outer", "inner"))(xs))
        exact = np.broadcast_to(wide.sum(axes, keepdims=True), xs.shape)
        scale = np.broadcast_to(np.abs(wide).sum(axes, keepdims=True), xs.shape)
        terms = int(np.prod([xs.shape[a] for a in axes]))
        assert np.all(np.abs(result - exact) <= terms * EPS32 * scale), axes


def compiled_collectives(body, m, axes, xs) -> dict:
    ops = analysis.collectives(coll.per_device(body, m, axes).lower(xs).compile().as_text())
    return {k: v for k, v in analysis.summarize(ops).items() if v["count"]}


@pytest.mark.parametrize("n", (4, 8))
def test_hlo_is_permutes_with_the_cost_models_bytes(n):
    """Ours compile to collective-permutes only, one per step (two for the bidirectional ring),
    carrying the model's sent bytes; lax's op is the matching collective, whose ring estimate by
    the HLO parser (`wire_bytes`) is the same number."""
    lax_kind = {"ring_all_reduce": "all-reduce", "bidirectional_all_reduce": "all-reduce",
                "reduce_scatter": "reduce-scatter", "all_gather": "all-gather", "all_to_all": "all-to-all"}
    m = mesh((("data", n),))
    for name, (ours, ref) in coll.COLLECTIVES.items():
        shape = (5, 3) if name.endswith("all_reduce") else (4 * n, 3)
        xs = np.zeros((n, *shape), np.float32)
        model = coll.cost(name, coll.padded_bytes(name, shape, 4, n), n)
        mine = compiled_collectives(ours, m, "data", xs)
        assert set(mine) == {"collective-permute"}, (name, mine)
        assert mine["collective-permute"]["count"] == model.steps * (2 if name.startswith("bi") else 1)
        assert mine["collective-permute"]["bytes"] == model.sent_bytes, name
        if name == "all_to_all" or name.startswith("bi"):
            continue  # padded bytes differ from lax's unpadded (shape 5 x 3) / checked below
        theirs = compiled_collectives(ref, m, "data", xs)
        assert set(theirs) == {lax_kind[name]}, (name, theirs)
    # The lax ops' parser estimate on shapes that need no padding.
    for name, kind in lax_kind.items():
        xs = np.zeros((n, 4 * n, 3), np.float32)
        theirs = compiled_collectives(coll.COLLECTIVES[name][1], m, "data", xs)
        assert theirs[kind]["wire_bytes"] == coll.cost(name, coll.padded_bytes(name, (4 * n, 3), 4, n), n).sent_bytes


def test_hierarchical_hlo_bytes():
    """2 x 4: 3 + 3 permutes of n/4 over inner, 2 of n/8 over outer: the model's 8 steps and
    2 (3/4) n + 2 (1/2) n/4 bytes, the same bytes as one ring over 8 devices."""
    m = mesh((("outer", 2), ("inner", 4)))
    xs = np.zeros((2, 4, 64, 4), np.float32)
    mine = compiled_collectives(lambda x, o, i: coll.hierarchical_all_reduce(x, i, o), m, ("outer", "inner"), xs)
    model = coll.cost("hierarchical_all_reduce", 64 * 4 * 4, (2, 4))
    assert set(mine) == {"collective-permute"}
    assert (mine["collective-permute"]["count"], mine["collective-permute"]["bytes"]) == (model.steps,
                                                                                          model.sent_bytes)
    assert model.steps == 8 and model.sent_bytes == coll.cost("ring_all_reduce", 1024, 8).sent_bytes


def test_cost_model_formulas():
    n, nbytes = 8, 1024
    ring = coll.cost("ring_all_reduce", nbytes, n)
    assert (ring.steps, ring.sent_bytes, ring.link_bytes) == (14, 1792, 1792)
    bidi = coll.cost("bidirectional_all_reduce", nbytes, n)
    assert (bidi.steps, bidi.sent_bytes, bidi.link_bytes) == (14, 1792, 896)
    for name in ("reduce_scatter", "all_gather", "all_to_all"):
        assert coll.cost(name, nbytes, n) == coll.Cost(7, 896, 896)
    assert ring.time(1e-6, 1e-9) == pytest.approx(14e-6 + 1792e-9)
    assert coll.padded_bytes("ring_all_reduce", (5, 3), 4, 8) == 16 * 4
    assert coll.padded_bytes("bidirectional_all_reduce", (5, 3), 4, 8) == 16 * 4
    assert coll.padded_bytes("all_gather", (5, 3), 4, 8) == 8 * 15 * 4


def test_fit_recovers_alpha_and_beta():
    """Times generated by the model with alpha = 20 us, beta = 1 ns/B are fitted back (to
    float64 rounding of a 2-unknown least-squares problem)."""
    alpha, beta = 20e-6, 1e-9
    costs = [coll.cost(name, nbytes, n) for name in coll.COLLECTIVES for n in SIZES for nbytes in (1e3, 1e5, 1e7)]
    fitted = coll.fit_alpha_beta(costs, [c.time(alpha, beta) for c in costs])
    np.testing.assert_allclose(fitted, (alpha, beta), rtol=1e-9)


def test_bad_shapes_and_names():
    m = mesh((("data", 4),))
    with pytest.raises(ValueError, match="reduce_scatter: dimension 0 of shape \\(6, 3\\).*multiple of the axis"):
        coll.per_device(coll.reduce_scatter, m, "data")(np.zeros((4, 6, 3), np.float32))
    with pytest.raises(ValueError, match="all_to_all: dimension 1"):
        coll.per_device(lambda x, a: coll.all_to_all(x, a, 1, 0), m, "data")(np.zeros((4, 8, 3), np.float32))
    with pytest.raises(ValueError, match="no cost model for collective 'broadcast'"):
        coll.cost("broadcast", 8, 4)
    with pytest.raises(ValueError, match="needs 16 devices"):
        coll.mesh_of({"data": 16}, jax.devices()[:8])


def test_fit_stays_non_negative():
    """Times that shrink as bytes grow would give beta < 0 unconstrained; the fit clips beta to
    0 and fits alpha alone: the relative least-squares alpha, sum(s_k / t_k) / sum((s_k / t_k)^2)."""
    costs = [coll.Cost(1, 1e3, 1e3), coll.Cost(1, 1e6, 1e6), coll.Cost(2, 1e3, 1e3)]
    seconds = [2e-6, 1e-6, 4e-6]
    alpha, beta = coll.fit_alpha_beta(costs, seconds)
    ratios = np.array([c.steps / t for c, t in zip(costs, seconds)])
    assert beta == 0.0
    np.testing.assert_allclose(alpha, ratios.sum() / (ratios**2).sum(), rtol=1e-12)


def test_ring_all_reduce_trace_follows_the_ring():
    """Device d holds 2**d everywhere, so a chunk's value says which devices it has summed
    (exact in float32). After reduce-scatter step s device i's chunk i-s-2 has the s+2 devices
    i-s-1..i; after the all-gather step s it also has the complete chunk i-s-1; at the end every
    chunk is the full sum 2**N - 1, and the traced all-reduce still returns lax's result."""
    n, width = 4, 3
    xs = np.broadcast_to(2.0 ** np.arange(n)[:, None], (n, n * width)).astype(np.float32)

    def body(x, axis):
        trace = []
        out = coll.ring_all_reduce(x, axis, trace=trace)
        return out, jax.numpy.stack(trace)

    m = mesh((("data", n),))
    f = jax.jit(jax.shard_map(lambda x: tuple(v[None] for v in body(x[0], "data")), mesh=m,
                              in_specs=jax.sharding.PartitionSpec("data"),
                              out_specs=jax.sharding.PartitionSpec("data"), check_vma=False))
    out, trace = (np.asarray(v) for v in f(xs))
    assert trace.shape == (n, 2 * (n - 1), n, width)
    np.testing.assert_array_equal(out, np.full_like(xs, 2**n - 1))
    for i in range(n):
        for s in range(n - 1):
            chunk = trace[i, s, (i - s - 2) % n]
            np.testing.assert_array_equal(chunk, sum(2.0 ** ((i - k) % n) for k in range(s + 2)))
            np.testing.assert_array_equal(trace[i, n - 1 + s, (i - s - 1) % n], 2**n - 1)
    np.testing.assert_array_equal(trace[:, -1], 2**n - 1)
