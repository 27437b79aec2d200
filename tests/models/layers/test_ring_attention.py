"""Ring attention equals full attention (`dot_product_attention`, the xla impl) in its output and
its q / k / v gradients, with the sequence split over 8 simulated devices (context=8) and over 4
with a data axis beside it (data=2, context=4): causal, padding, packed segments with their
positions, a sliding window, GQA, and tokens in the zig-zag order context parallelism feeds it.

Tolerance: the ring sums each output and gradient element in another order than the reference
(per key chunk, then across chunks by log-sum-exp). The worst-case relative rounding of an
n-term float32 sum is about n * eps32 of the sum of magnitudes (Higham's gamma_n); the longest
sums here run over the T = 64 keys (outputs, dq) or the T * G = 128 query rows of a K/V head
(dk, dv), so every element must lie within 128 * eps32 * max|reference| of the reference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from models.layers import flash_attention as fa
from models.layers.attention import attend, dot_product_attention
from models.layers.ring_attention import _chunk_live, ring_attention
from sharding.context import zigzag_order

B, T, N, K, H = 2, 64, 4, 2, 8
EPS32 = float(np.finfo(np.float32).eps)
TOLERANCE = T * (N // K) * EPS32


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))


def _packed():
    """Two documents per row (of 40 and 24 tokens, positions restarting), row 1's last 14
    tokens padding (segment 0, and masked as keys)."""
    segments = np.where(np.arange(T) < 40, 1, 2)[None].repeat(B, 0)
    segments[1, 50:] = 0
    positions = np.where(np.arange(T) < 40, np.arange(T), np.arange(T) - 40)[None].repeat(B, 0)
    return {"causal": True, "q_positions": positions, "kv_positions": positions, "q_segment_ids": segments,
            "kv_segment_ids": segments, "kv_mask": segments > 0}


CASES = {
    "causal": {"causal": True},
    "padding": {"kv_mask": np.arange(T)[None] < np.array([[T], [37]])},
    "packed_causal_padding": _packed(),
    "causal_window": {"causal": True, "sliding_window": 9},
}


# The cotangent: d loss / d out, fixed and varied (one weight per token, head and feature).
WEIGHTS = np.sin(np.arange(B * T * N * H, dtype=np.float32)).reshape(B, T, N, H)


def _loss_and_grads(fn, q, k, v, masks, weights=WEIGHTS):
    """The output and d/d(q, k, v) of sum(out * weights)."""
    def loss(q, k, v):
        out = fn(q, k, v, **masks)
        return jnp.sum(out * weights), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _ring(mesh_shape: dict, q, k, v, masks: dict, weights=WEIGHTS):
    """Ring attention's output and gradients, q / k / v and the [B, T] masks split over the mesh's
    context axis (and rows over data)."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(tuple(mesh_shape.values())), tuple(mesh_shape),
                axis_types=(AxisType.Auto,) * len(mesh_shape))
    rules = (("act_batch", "data"),) * ("data" in mesh_shape) + (("act_seq", "context"),)
    split = NamedSharding(mesh, PartitionSpec("data" if "data" in mesh_shape else None, "context"))
    static = {name: masks[name] for name in ("causal", "sliding_window") if name in masks}
    arrays = {name: jax.device_put(jnp.asarray(x), split) for name, x in masks.items() if name not in static}

    @jax.jit
    def run(q, k, v, arrays):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return _loss_and_grads(lambda *a, **m: ring_attention(*a, block_q=4, block_kv=4, **m), q, k, v,
                                   {**arrays, **static}, weights)

    placed = [jax.device_put(x, split) for x in (q, k, v)]
    return run(*placed, arrays), run.lower(*placed, arrays).compile().as_text()


def _check_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=TOLERANCE * np.abs(w).max())


def _reference(q, k, v, masks):
    return _loss_and_grads(dot_product_attention, q, k, v, {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x
                                                            for n, x in masks.items()})


@pytest.mark.parametrize("mesh_shape,case", [
    ({"context": 8}, "causal"), ({"context": 8}, "packed_causal_padding"),
    ({"data": 2, "context": 4}, "padding"), ({"data": 2, "context": 4}, "causal_window"),
])
def test_equals_full_attention(mesh_shape, case):
    q, k, v = _inputs()
    got, hlo = _ring(mesh_shape, q, k, v, CASES[case])
    _check_close(got, _reference(q, k, v, CASES[case]))
    assert "collective-permute" in hlo  # the chunks travel by ppermute, not an all-gather
    assert "all-gather" not in hlo


def test_zigzag_order_gives_the_same_attention():
    """Tokens reordered zig-zag (device r holds chunks r and 7-r of 8) with their positions and
    segment ids: the ring computes each token's attention exactly as in the natural order."""
    q, k, v = _inputs(1)
    masks = _packed()
    order = zigzag_order(T, 4)
    permuted = {n: (x[:, order] if isinstance(x, np.ndarray) else x) for n, x in masks.items()}
    (out, grads), _ = _ring({"data": 2, "context": 4}, q[:, order], k[:, order], v[:, order], permuted,
                                WEIGHTS[:, order])
    inverse = np.argsort(order)
    _check_close((out[:, inverse], tuple(g[:, inverse] for g in grads)), _reference(q, k, v, masks))


def test_without_a_split_sequence_it_is_blockwise_attention():
    """No mesh axis for `act_seq` (one device, no rules): attend(impl="ring") is "blockwise"."""
    q, k, v = _inputs(2)
    masks = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in _packed().items()}
    np.testing.assert_array_equal(attend(q, k, v, impl="ring", **masks), attend(q, k, v, impl="blockwise", **masks))


def test_dense_mask_is_refused():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="dense `mask`"):
        ring_attention(q, k, v, mask=jnp.ones((T, T), bool))


def test_a_causal_future_chunk_is_skipped_whole():
    """Natural order, causal: queries 0..7 against keys 8..15 are all masked (skipped); against
    keys 0..7, or without the causal mask, they are live."""
    def live(q_pos, kv_pos, causal=True):
        st, _, _, _, masks = fa.prepare(*_inputs(), causal=causal,
                                        q_positions=q_pos, kv_positions=kv_pos, kv_mask=None, q_segment_ids=None,
                                        kv_segment_ids=None, sliding_window=None, mask=None, scale=None,
                                        block_q=4, block_kv=4, forward="blockwise")
        return bool(_chunk_live(st, masks))

    early, late = jnp.arange(T) % 8, jnp.arange(T) % 8 + 8
    assert not live(early, late) and live(late, early) and live(early, late, causal=False)
