"""Ring attention: blockwise attention of one sequence split over devices (context parallelism).

Axis letters as in `flash_attention`: B batch, T query length (= S, self-attention), N query
heads, K key/value heads, G = N / K, H head dim; R the devices of the ring.

The sequence dimension of q, k and v is split over the mesh axis that the logical activation
name `act_seq` maps to under the current logical axis rules (a sharding strategy such as `cp`
maps it to its `context` axis; this module never names a mesh axis). Inside `jax.shard_map`
each device holds T / R queries and the keys and values of the same T / R tokens. R times, it
runs `flash_attention`'s blockwise forward of its queries against the key/value chunk it holds,
giving that chunk's (output, log-sum-exp), then passes the chunk (and its positions, padding
and segment ids) to the next device by `lax.ppermute` (Liu et al. 2023, "Ring Attention with
Blockwise Transformers"). The partial results combine exactly by their log-sum-exps:

    lse = logaddexp(lse_a, lse_b),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).

Gradients: a custom VJP, FlashAttention-2's backward around the ring. With the final output
and lse saved, each chunk's contribution to dq, dk and dv is `flash_attention._backward` of
that chunk alone (its probabilities are exp(logit - lse) with the global lse). The key/value
chunks travel the ring again together with their dk / dv accumulators; after R steps every
chunk and its finished gradient are back on the device that owns them. Memory stays O(T / R)
per device (autodiff through the forward ring would keep every tile's probabilities).

Masks are rebuilt per tile from positions, padding and segment ids, so the result does not
depend on the order of the tokens: a causal mask compares positions, not indices. That is
what causal load balancing relies on (`sharding.context` feeds each device the token chunks i
and 2R-1-i, "zig-zag", with their positions). A chunk pair whose every entry is masked (a
causal future chunk in the natural order) is skipped whole (`lax.cond`); inside a live pair
`flash_attention`'s own tile skipping applies, which is what skips the masked half of a
zig-zag pair when a chunk (T / 2R tokens) is a whole number of 128-token blocks.

Each step sends the next chunk before it computes on the current one, so XLA can overlap the
transfer with the compute. The forward pass shifts R times (the last shift only brings each
chunk home, unused); the backward pass needs all R, to bring dk and dv home.

With no mesh axis for `act_seq` (no rules, or an axis of one device) this is `flash_attention`.
The dense `mask` and `bias` inputs are not supported (they would have to travel the ring too).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.layers import flash_attention as fa

Array = jax.Array


def ring_axis(q_logical=("act_batch", "act_seq", "act_heads", None)):
    """(mesh axis of the sequence, its size, the q PartitionSpec) under the current rules and
    abstract mesh; the axis is None when the sequence is not split over more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    spec = nn.logical_to_mesh_axes(q_logical)
    axis = spec[1]
    if mesh.empty or axis is None or not isinstance(axis, str) or mesh.shape[axis] == 1:
        return None, 1, spec
    return axis, mesh.shape[axis], spec


def ring_attention(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    *,
    causal: bool = False,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    kv_mask: Array | None = None,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    sliding_window: int | None = None,
    mask: Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    block_q: int = fa.DEFAULT_BLOCK_Q,
    block_kv: int = fa.DEFAULT_BLOCK_KV,
) -> Array:
    """`attention.dot_product_attention` with the sequence split over the `act_seq` mesh axis.

    Args:
      q_BTNH, k_BSKH, v_BSKH: queries [B, T, N, H], keys and values [B, T, K, H] of the same
        T tokens (self-attention), as global (jit-level) arrays.
      causal, q_positions, kv_positions, kv_mask, q_segment_ids, kv_segment_ids,
        sliding_window, scale: see `attention.dot_product_attention`.
      mask, bias: must be None (ValueError otherwise).
      block_q, block_kv: the blockwise kernel's tile sizes on each device.

    Returns:
      The attention output [B, T, N, H] in the dtype of `v`, split like q.
    """
    if mask is not None or bias is not None:
        raise ValueError("ring attention takes positions, padding, segments and a window, not a dense `mask` or "
                         "`bias`; use attention impl 'blockwise'")
    flat = {"causal": causal, "q_positions": q_positions, "kv_positions": kv_positions, "kv_mask": kv_mask,
            "q_segment_ids": q_segment_ids, "kv_segment_ids": kv_segment_ids, "sliding_window": sliding_window,
            "scale": scale, "block_q": block_q, "block_kv": block_kv}
    axis, R, q_spec = ring_axis()
    if axis is None:
        return fa.flash_attention(q_BTNH, k_BSKH, v_BSKH, **flat)
    B, T = q_BTNH.shape[:2]
    if k_BSKH.shape[1] != T:
        raise ValueError(f"ring attention is self-attention: {T} queries but {k_BSKH.shape[1]} keys")
    if T % R:
        raise ValueError(f"ring attention splits the sequence ({T}) over mesh axis {axis!r} of {R} devices; use a "
                         f"length that is a multiple of {R}")
    mesh = jax.sharding.get_abstract_mesh()
    q_spec = _dividing(q_spec, q_BTNH.shape, mesh)
    kv_spec = _dividing(nn.logical_to_mesh_axes(("act_batch", "act_seq", "act_kv_heads", None)), k_BSKH.shape, mesh)
    row_spec = jax.sharding.PartitionSpec(q_spec[0], axis)

    def vector(x, fill):
        return jnp.broadcast_to(fill if x is None else x, (B, T)).astype(jnp.int32)

    vectors = {"q_positions": vector(q_positions, jnp.arange(T)),
               "kv_positions": vector(kv_positions if kv_positions is not None else q_positions, jnp.arange(T)),
               "kv_mask": vector(kv_mask, 1)}
    if q_segment_ids is not None:
        vectors["q_segment_ids"] = vector(q_segment_ids, 0)
        vectors["kv_segment_ids"] = vector(kv_segment_ids, 0)
    local = functools.partial(_ring_local, axis=axis, R=R, causal=causal, sliding_window=sliding_window,
                              scale=scale, block_q=block_q, block_kv=block_kv)
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, {name: row_spec for name in vectors}),
        out_specs=q_spec, check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, vectors)


def _dividing(spec, shape, mesh) -> jax.sharding.PartitionSpec:
    """`spec` without the mesh axes that do not divide their dimension (a batch of one row at
    init time is whole on every device, not split over the batch axes)."""
    def size(axes):
        return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))

    return jax.sharding.PartitionSpec(*(None if axes is None or dim % size(axes) else axes
                                        for axes, dim in zip(spec, shape)))


def _ring_local(q_BTNH, k_BSKH, v_BSKH, vectors, *, axis, R, causal, sliding_window, scale, block_q, block_kv):
    """One device's part: its T/R queries against every chunk of the ring."""
    B, T, N = q_BTNH.shape[:3]
    st, q5, k, v, masks = fa.prepare(
        q_BTNH, k_BSKH, v_BSKH, causal=causal, q_positions=vectors["q_positions"],
        kv_positions=vectors["kv_positions"], kv_mask=vectors["kv_mask"].astype(bool),
        q_segment_ids=vectors.get("q_segment_ids"), kv_segment_ids=vectors.get("kv_segment_ids"),
        sliding_window=sliding_window, mask=None, scale=scale, block_q=block_q, block_kv=block_kv,
        forward="blockwise")
    out = _ring_core(st, axis, R, q5, k, v, masks)
    return out[:, :T].reshape(B, T, N, v_BSKH.shape[-1])


def _chunk_live(st: fa.Static, masks: fa.Masks) -> Array:
    """False when every (query, key) pair of this device's queries and the chunk is masked."""
    whole = dataclasses.replace(st, block_q=masks.q_pos.shape[1], block_kv=masks.kv_pos.shape[1])
    return fa.tile_live(whole, fa.block_stats(whole, masks), 0, 0)


def _kv_part(k, v, masks: fa.Masks):
    """What travels the ring: a key/value chunk and its per-key mask inputs."""
    return k, v, masks.kv_pos, masks.kv_valid, masks.kv_seg


def _with_kv(masks: fa.Masks, part) -> fa.Masks:
    return masks._replace(kv_pos=part[2], kv_valid=part[3], kv_seg=part[4])


def _shift(tree, axis: str, R: int):
    """Every device sends `tree` to the next one around the ring (device r to r + 1 mod R)."""
    return jax.lax.ppermute(tree, axis, [(r, (r + 1) % R) for r in range(R)])


def _ring_forward(st: fa.Static, axis: str, R: int, q, k, v, masks: fa.Masks):
    """(out [B, Tp, K, G, H] in v's dtype, lse [B, K, G, Tp] float32, +inf on rows with no key)."""
    B, Tp, K, G = q.shape[:4]

    def step(carry, _):
        part, out, lse = carry
        incoming = _shift(part, axis, R)  # sent while this chunk is computed
        m = _with_kv(masks, part)
        empty = (jnp.zeros(q.shape, v.dtype), jnp.full((B, K, G, Tp), jnp.inf, jnp.float32))
        out_c, lse_c = jax.lax.cond(_chunk_live(st, m), lambda: fa._forward_blockwise(st, q, part[0], part[1], None, m),
                                    lambda: empty)
        lse_c = jnp.where(lse_c == jnp.inf, -jnp.inf, lse_c)  # empty rows: weight 0 in the combination
        new = jnp.logaddexp(lse, lse_c)
        finite = jnp.isfinite(new)
        w_old = jnp.where(finite, jnp.exp(lse - jnp.where(finite, new, 0.0)), 0.0)
        w_new = jnp.where(finite, jnp.exp(lse_c - jnp.where(finite, new, 0.0)), 0.0)
        out = (out * w_old.transpose(0, 3, 1, 2)[..., None]
               + out_c.astype(jnp.float32) * w_new.transpose(0, 3, 1, 2)[..., None])
        return (incoming, out, new), None

    init = (_kv_part(k, v, masks), jnp.zeros(q.shape, jnp.float32), jnp.full((B, K, G, Tp), -jnp.inf, jnp.float32))
    (_, out, lse), _ = jax.lax.scan(step, init, None, length=R)
    return out.astype(v.dtype), jnp.where(jnp.isfinite(lse), lse, jnp.inf)


def _ring_backward(st: fa.Static, axis: str, R: int, res, d_out):
    """dq stays home; each chunk's dk / dv accumulate as they travel the ring beside the
    chunk, and arrive home with it after R shifts."""
    q, k, v, masks, out, lse = res

    def step(carry, _):
        part, dq, dk, dv = carry
        incoming = _shift(part, axis, R)  # the next chunk is sent while this one is computed
        m = _with_kv(masks, part)

        def visit():
            dq_c, dk_c, dv_c, _ = fa._backward(st, (q, part[0], part[1], None, m, out, lse), d_out)
            return dq_c.astype(jnp.float32), dk_c.astype(jnp.float32), dv_c.astype(jnp.float32)

        zeros = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        dq_c, dk_c, dv_c = jax.lax.cond(_chunk_live(st, m), visit, lambda: zeros)
        dk, dv = _shift((dk + dk_c, dv + dv_c), axis, R)  # they follow their chunk
        return (incoming, dq + dq_c, dk, dv), None

    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    init = (_kv_part(k, v, masks), jnp.zeros(q.shape, jnp.float32), zeros_kv, zeros_kv)
    (_, dq, dk, dv), _ = jax.lax.scan(step, init, None, length=R)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring_core(st: fa.Static, axis: str, R: int, q, k, v, masks: fa.Masks):
    return _ring_forward(st, axis, R, q, k, v, masks)[0]


def _core_fwd(st, axis, R, q, k, v, masks):
    out, lse = _ring_forward(st, axis, R, q, k, v, masks)
    return out, (q, k, v, masks, out, lse)


def _core_bwd(st, axis, R, res, d_out):
    dq, dk, dv = _ring_backward(st, axis, R, res, d_out)
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), res[3])
    return dq, dk, dv, no_grad


_ring_core.defvjp(_core_fwd, _core_bwd)
