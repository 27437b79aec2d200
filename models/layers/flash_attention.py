"""Blockwise (flash-style) attention: O(T) memory, equal to `attention.dot_product_attention`.

Axis letters: B batch, T query length, S key length, N query heads, K key/value heads,
G query heads per K/V head (N = K * G), H head dim; Q and C are the query and key block
sizes (a tile is Q queries by C keys), I and J the numbers of query and key blocks.

The [B, N, T, S] logits are never materialized. The queries are cut into blocks of Q rows
and the keys into blocks of C; for each query block the key blocks are visited in turn
with an online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022): a
running row maximum m, a running sum l of exp(logit - m) and an unnormalized output
accumulator, rescaled by exp(m_old - m_new) whenever the maximum grows. The forward pass
keeps only the output and the row log-sum-exp (lse = m + log l); the backward pass
(`jax.custom_vjp`, FlashAttention-2's) recomputes each tile's probabilities from q, k and
lse, so training memory is O(T) in sequence length instead of O(T^2).

Every mask of `dot_product_attention` is supported (causal over positions, sliding window,
key padding, segments, an extra boolean `mask`) and an additive `bias` with its gradient.
The mask kinds given by positions, padding and segments are rebuilt per tile from [B, T]
and [B, S] vectors; a dense `mask` or `bias` (broadcastable to [B, N, T, S]) is sliced
per tile. A tile whose every entry is masked is skipped (`lax.cond`) in both passes: the
decision comes from the per-block minimum and maximum of the positions and segment ids
and from whether the block has any unpadded key, so it is exact for arbitrary positions
(packed rows, decoding offsets) and only ever skips tiles that are provably all-masked.
For causal attention that halves the work.

T and S need not be multiples of the block sizes: the inputs are padded to whole blocks,
the padded keys masked out and the padded query rows dropped from the output.

Logits, softmax statistics and accumulators are float32 whatever the input dtype. A
query row with no valid key gets a zero output and zero gradients, never NaN, exactly as
the reference does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 128


@dataclasses.dataclass(frozen=True)
class Static:
    """The hashable (non-array) settings of one attention call."""

    causal: bool
    window: int | None
    scale: float
    block_q: int
    block_kv: int
    forward: str = "blockwise"  # which kernel runs the forward pass: blockwise | pallas


class Masks(NamedTuple):
    """Per-position mask inputs, padded to whole blocks (integer / boolean: no gradient)."""

    q_pos: Array  # [B, Tp] int32
    kv_pos: Array  # [B, Sp] int32
    kv_valid: Array  # [B, Sp] bool: a real, unpadded key
    q_seg: Array | None  # [B, Tp] int32
    kv_seg: Array | None  # [B, Sp] int32
    dense: Array | None  # [b, k, g, t, s] bool, the extra `mask`, each dim 1 or full (padded)


class BlockStats(NamedTuple):
    """Per-block extremes the tile-skip decision reads; [B, I] or [B, J] each."""

    q_min: Array
    q_max: Array
    kv_min: Array  # over valid keys only (+big where none)
    kv_max: Array
    kv_any: Array  # [B, J] bool
    q_seg_min: Array | None
    q_seg_max: Array | None
    kv_seg_min: Array | None
    kv_seg_max: Array | None
    dense_any: Array | None  # [I, J] bool: the dense mask allows something in the tile


def _pad_to(x: Array, axis: int, size: int, mode: str = "constant") -> Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def _pad_ts(x5: Array, Tp: int, Sp: int) -> Array:
    """Pads the t and s axes of a [b, k, g, t, s] array to whole blocks (zeros / False)
    where they are full, not broadcast."""
    if x5.shape[3] > 1:
        x5 = _pad_to(x5, 3, Tp)
    return _pad_to(x5, 4, Sp) if x5.shape[4] > 1 else x5


def _as_5d(x: Array, name: str, B: int, K: int, G: int, T: int, S: int) -> Array:
    """A [.., N, T, S]-broadcastable array as [b, k, g, t, s] with each dim 1 or full."""
    if x.ndim > 4:
        raise ValueError(f"{name} must be broadcastable to [B, N, T, S], got shape {x.shape}")
    x4 = x.reshape((1,) * (4 - x.ndim) + x.shape)
    for dim, full, letter in zip(x4.shape, (B, K * G, T, S), "BNTS"):
        if dim not in (1, full):
            raise ValueError(f"{name} of shape {x.shape} is not broadcastable to [B, N, T, S] = "
                             f"{(B, K * G, T, S)} (axis {letter})")
    b, n, t, s = x4.shape
    return x4.reshape(b, K if n > 1 else 1, G if n > 1 else 1, t, s)


def _block_min_max(x_BL: Array, valid_BL: Array | None, block: int) -> tuple[Array, Array]:
    B, L = x_BL.shape
    big = jnp.iinfo(jnp.int32).max
    lo = x_BL if valid_BL is None else jnp.where(valid_BL, x_BL, big)
    hi = x_BL if valid_BL is None else jnp.where(valid_BL, x_BL, -big)
    return lo.reshape(B, L // block, block).min(-1), hi.reshape(B, L // block, block).max(-1)


def block_stats(st: Static, masks: Masks) -> BlockStats:
    """The per-block extremes of the positions and segment ids (keys: valid ones only)."""
    q_min, q_max = _block_min_max(masks.q_pos, None, st.block_q)
    kv_min, kv_max = _block_min_max(masks.kv_pos, masks.kv_valid, st.block_kv)
    B, Sp = masks.kv_valid.shape
    kv_any = masks.kv_valid.reshape(B, Sp // st.block_kv, st.block_kv).any(-1)
    segs = (None,) * 4
    if masks.q_seg is not None:
        segs = (*_block_min_max(masks.q_seg, None, st.block_q),
                *_block_min_max(masks.kv_seg, masks.kv_valid, st.block_kv))
    dense_any = None
    if masks.dense is not None:
        d = masks.dense.any(axis=(0, 1, 2))  # [t, s]
        t, s = d.shape
        rows = d.reshape(t // st.block_q, st.block_q, s).any(1) if t > 1 else d
        dense_any = rows.reshape(rows.shape[0], s // st.block_kv, st.block_kv).any(-1) if s > 1 else rows
    return BlockStats(q_min, q_max, kv_min, kv_max, kv_any, *segs, dense_any)


def tile_live(st: Static, stats: BlockStats, i: Array, j: Array) -> Array:
    """False only when every entry of tile (i, j) is masked, in every row of the batch."""
    qlo, qhi = stats.q_min[:, i], stats.q_max[:, i]
    klo, khi = stats.kv_min[:, j], stats.kv_max[:, j]
    dead_B = ~stats.kv_any[:, j]
    if st.causal:
        dead_B |= qhi < klo  # every query precedes every key
    if st.window is not None:
        dead_B |= qlo - khi >= st.window  # every key is too far behind
        if not st.causal:
            dead_B |= klo - qhi >= st.window  # every key is too far ahead
    if stats.q_seg_min is not None:
        dead_B |= (stats.q_seg_max[:, i] < stats.kv_seg_min[:, j]) | (stats.q_seg_min[:, i] > stats.kv_seg_max[:, j])
    live = ~dead_B.all()
    if stats.dense_any is not None:
        ii = i if stats.dense_any.shape[0] > 1 else 0
        jj = j if stats.dense_any.shape[1] > 1 else 0
        live &= stats.dense_any[ii, jj]
    return live


def _slice_5d(x: Array | None, i: Array, j: Array, st: Static) -> Array | None:
    """Tile (i, j) of a [b, k, g, t, s] array whose t and s are 1 or whole (padded) lengths."""
    if x is None:
        return None
    if x.shape[3] > 1:
        x = jax.lax.dynamic_slice_in_dim(x, i * st.block_q, st.block_q, axis=3)
    if x.shape[4] > 1:
        x = jax.lax.dynamic_slice_in_dim(x, j * st.block_kv, st.block_kv, axis=4)
    return x


def tile_mask(st: Static, masks: Masks, i: Array, j: Array) -> Array:
    """The boolean mask of tile (i, j), broadcastable to [B, K, G, Q, C]."""
    qs = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * st.block_q, slice_size=st.block_q, axis=1)
    ks = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=j * st.block_kv, slice_size=st.block_kv, axis=1)
    ok_BQC = ks(masks.kv_valid)[:, None, :]
    if st.causal or st.window is not None:
        delta_BQC = qs(masks.q_pos)[:, :, None] - ks(masks.kv_pos)[:, None, :]
        if st.causal:
            ok_BQC &= delta_BQC >= 0
        if st.window is not None:
            ok_BQC &= delta_BQC < st.window
            if not st.causal:
                ok_BQC &= -delta_BQC < st.window
    if masks.q_seg is not None:
        ok_BQC &= qs(masks.q_seg)[:, :, None] == ks(masks.kv_seg)[:, None, :]
    ok = ok_BQC[:, None, None]
    if masks.dense is not None:
        ok = ok & _slice_5d(masks.dense, i, j, st)
    return ok


def tile_logits(st: Static, q_BQKGH: Array, k_BCKH: Array, bias_tile: Array | None) -> Array:
    """float32 logits [B, K, G, Q, C] of one tile: q k^T * scale (+ bias)."""
    s = jnp.einsum("BQKGH,BCKH->BKGQC", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32) * st.scale
    if bias_tile is not None:
        s = s + bias_tile.astype(jnp.float32)
    return s


def _forward_blockwise(st: Static, q, k, v, bias, masks: Masks):
    """Online-softmax forward. q [B, Tp, K, G, H], k/v [B, Sp, K, H]; returns the output
    [B, Tp, K, G, H] (v's dtype) and lse [B, K, G, Tp] (float32, +inf on empty rows)."""
    B, Tp, K, G, H = q.shape
    I, J = Tp // st.block_q, k.shape[1] // st.block_kv
    stats = block_stats(st, masks)

    def q_block(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * st.block_q, st.block_q, axis=1)

        def kv_step(carry, j):
            def visit(carry):
                m, l, acc = carry
                k_j = jax.lax.dynamic_slice_in_dim(k, j * st.block_kv, st.block_kv, axis=1)
                v_j = jax.lax.dynamic_slice_in_dim(v, j * st.block_kv, st.block_kv, axis=1)
                s = tile_logits(st, q_i, k_j, _slice_5d(bias, i, j, st))
                ok = tile_mask(st, masks, i, j)
                s = jnp.where(ok, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing valid yet
                p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
                alpha = jnp.exp(m - m_safe)  # 0 while m is -inf
                l = alpha * l + p.sum(-1)
                pv = jnp.einsum("BKGQC,BCKH->BKGQH", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, l, alpha[..., None] * acc + pv

            return jax.lax.cond(tile_live(st, stats, i, j), visit, lambda c: c, carry), None

        init = (jnp.full((B, K, G, st.block_q), -jnp.inf, jnp.float32),
                jnp.zeros((B, K, G, st.block_q), jnp.float32),
                jnp.zeros((B, K, G, st.block_q, H), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, jnp.arange(J))
        nonempty = l > 0
        out = jnp.where(nonempty[..., None], acc / jnp.where(nonempty, l, 1.0)[..., None], 0.0)
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)
        return out.astype(v.dtype), lse

    out_IBKGQH, lse_IBKGQ = jax.lax.map(q_block, jnp.arange(I))
    out = out_IBKGQH.transpose(1, 0, 4, 2, 3, 5).reshape(B, Tp, K, G, H)
    lse = lse_IBKGQ.transpose(1, 2, 3, 0, 4).reshape(B, K, G, Tp)
    return out, lse


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums x over the axes where `shape` has 1 (the broadcast ones), keeping them."""
    axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return x.sum(axes, keepdims=True) if axes else x


def _backward(st: Static, res, d_out):
    """FlashAttention-2 backward: outer loop over key blocks, inner over query blocks; each
    live tile's probabilities are recomputed from q, k and the saved lse."""
    q, k, v, bias, masks, out, lse = res
    B, Tp, K, _, H = q.shape
    Sp = k.shape[1]
    I, J = Tp // st.block_q, Sp // st.block_kv
    stats = block_stats(st, masks)
    d_out = d_out.astype(jnp.float32)
    # D_i = rowsum(dO * O): the softmax-Jacobian term, [B, K, G, Tp].
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out, out.astype(jnp.float32))
    dq0 = jnp.zeros(q.shape, jnp.float32)
    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)

    def kv_block(carry, j):
        dq, dbias = carry
        k_j = jax.lax.dynamic_slice_in_dim(k, j * st.block_kv, st.block_kv, axis=1)
        v_j = jax.lax.dynamic_slice_in_dim(v, j * st.block_kv, st.block_kv, axis=1)

        def q_step(carry, i):
            def visit(carry):
                dk_j, dv_j, dq, dbias = carry
                q_i = jax.lax.dynamic_slice_in_dim(q, i * st.block_q, st.block_q, axis=1)
                do_i = jax.lax.dynamic_slice_in_dim(d_out, i * st.block_q, st.block_q, axis=1)
                lse_i = jax.lax.dynamic_slice_in_dim(lse, i * st.block_q, st.block_q, axis=3)
                delta_i = jax.lax.dynamic_slice_in_dim(delta, i * st.block_q, st.block_q, axis=3)
                s = tile_logits(st, q_i, k_j, _slice_5d(bias, i, j, st))
                p = jnp.where(tile_mask(st, masks, i, j), jnp.exp(s - lse_i[..., None]), 0.0)
                dv_j += jnp.einsum("BKGQC,BQKGH->BCKH", p, do_i)
                dp = jnp.einsum("BQKGH,BCKH->BKGQC", do_i, v_j.astype(jnp.float32))
                ds = p * (dp - delta_i[..., None])  # d logits (after scale and bias)
                dq_i = jnp.einsum("BKGQC,BCKH->BQKGH", ds, k_j.astype(jnp.float32)) * st.scale
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, jax.lax.dynamic_slice_in_dim(dq, i * st.block_q, st.block_q, axis=1) + dq_i,
                    i * st.block_q, axis=1)
                dk_j += jnp.einsum("BKGQC,BQKGH->BCKH", ds, q_i.astype(jnp.float32)) * st.scale
                if dbias is not None:
                    db = _reduce_to(ds, dbias.shape[:3] + (1 if dbias.shape[3] == 1 else st.block_q,
                                                          1 if dbias.shape[4] == 1 else st.block_kv))
                    ti = i * st.block_q if dbias.shape[3] > 1 else 0
                    tj = j * st.block_kv if dbias.shape[4] > 1 else 0
                    old = jax.lax.dynamic_slice(dbias, (0, 0, 0, ti, tj), db.shape)
                    dbias = jax.lax.dynamic_update_slice(dbias, old + db, (0, 0, 0, ti, tj))
                return dk_j, dv_j, dq, dbias

            return jax.lax.cond(tile_live(st, stats, i, j), visit, lambda c: c, carry), None

        zeros = jnp.zeros((B, st.block_kv, K, H), jnp.float32)
        (dk_j, dv_j, dq, dbias), _ = jax.lax.scan(q_step, (zeros, zeros, dq, dbias), jnp.arange(I))
        return (dq, dbias), (dk_j, dv_j)

    (dq, dbias), (dk_JBCKH, dv_JBCKH) = jax.lax.scan(kv_block, (dq0, dbias0), jnp.arange(J))
    dk = dk_JBCKH.transpose(1, 0, 2, 3, 4).reshape(B, Sp, K, H)
    dv = dv_JBCKH.transpose(1, 0, 2, 3, 4).reshape(B, Sp, K, H)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None if bias is None else dbias.astype(bias.dtype))


def _forward(st: Static, q, k, v, bias, masks):
    if st.forward == "pallas":
        from models.layers import pallas_attention  # it imports this module
        return pallas_attention.forward(st, q, k, v, masks)
    return _forward_blockwise(st, q, k, v, bias, masks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_core(st: Static, q, k, v, bias, masks):
    return _forward(st, q, k, v, bias, masks)[0]


def _core_fwd(st: Static, q, k, v, bias, masks):
    out, lse = _forward(st, q, k, v, bias, masks)
    return out, (q, k, v, bias, masks, out, lse)


def _core_bwd(st: Static, res, d_out):
    dq, dk, dv, dbias = _backward(st, res, d_out)
    masks = res[4]
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), masks)
    return dq, dk, dv, dbias, no_grad


_attention_core.defvjp(_core_fwd, _core_bwd)


def prepare(
    q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, *, causal: bool, q_positions, kv_positions, kv_mask,
    q_segment_ids, kv_segment_ids, sliding_window, mask, scale, block_q: int, block_kv: int,
    forward: str,
):
    """Checks the inputs and pads them to whole blocks: (static, q [B, Tp, K, G, H], k, v, masks)."""
    B, T, N, H = q_BTNH.shape
    _, S, K, _ = k_BSKH.shape
    if k_BSKH.shape != v_BSKH.shape:
        raise ValueError(f"keys {k_BSKH.shape} and values {v_BSKH.shape} must have the same shape")
    if N % K:
        raise ValueError(f"num_heads={N} must be a multiple of num_kv_heads={K}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if kv_mask is not None and kv_mask.shape != (B, S):
        raise ValueError(f"kv_mask must have shape [B, S] = {(B, S)}, got {kv_mask.shape}")
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_kv={block_kv}")
    G = N // K
    # A short sequence is one block, of the next power of two >= 16 (the smallest tile
    # Pallas' GPU backend multiplies; powers of two are what it tiles).
    block_q = min(block_q, max(16, 1 << (T - 1).bit_length()))
    block_kv = min(block_kv, max(16, 1 << (S - 1).bit_length()))
    Tp, Sp = -(-T // block_q) * block_q, -(-S // block_kv) * block_kv
    st = Static(causal=bool(causal), window=sliding_window, scale=float(H**-0.5 if scale is None else scale),
                block_q=block_q, block_kv=block_kv, forward=forward)

    def positions(p, L, Lp):
        p = jnp.arange(L, dtype=jnp.int32) if p is None else p.astype(jnp.int32)
        # Edge padding: padded queries copy the last row's position (their output is dropped).
        return _pad_to(jnp.broadcast_to(p, (B, L)), 1, Lp, mode="edge")

    valid = jnp.ones((B, S), bool) if kv_mask is None else kv_mask.astype(bool)
    seg_q = seg_kv = None
    if q_segment_ids is not None:
        seg_q = _pad_to(q_segment_ids.astype(jnp.int32), 1, Tp, mode="edge")
        seg_kv = _pad_to(kv_segment_ids.astype(jnp.int32), 1, Sp, mode="edge")
    dense = None
    if mask is not None:
        dense = _pad_ts(_as_5d(mask.astype(bool), "mask", B, K, G, T, S), Tp, Sp)
    masks = Masks(positions(q_positions, T, Tp), positions(kv_positions, S, Sp), _pad_to(valid, 1, Sp),
                  seg_q, seg_kv, dense)
    q5 = _pad_to(q_BTNH.reshape(B, T, K, G, H), 1, Tp)
    return st, q5, _pad_to(k_BSKH, 1, Sp), _pad_to(v_BSKH, 1, Sp), masks


def flash_attention(
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
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
) -> Array:
    """Blockwise softmax(q k^T * scale + bias, masked) v with O(T) memory.

    The arguments and result are those of `attention.dot_product_attention` (without
    dropout and weights, which need the whole [B, N, T, S] matrix).

    Args:
      q_BTNH: queries [B, T, N, H].
      k_BSKH, v_BSKH: keys and values [B, S, K, H], N a multiple of K.
      causal, q_positions, kv_positions, kv_mask, q_segment_ids, kv_segment_ids,
        sliding_window, mask: see `attention.make_attention_mask`.
      bias: additive float bias broadcastable to [B, N, T, S] (it gets a gradient).
      scale: logit scale, default 1/sqrt(H).
      block_q, block_kv: query and key block sizes (a sequence shorter than a block is one
        block of the next power of two >= 16).

    Returns:
      The attention output [B, T, N, H] in the dtype of `v`.
    """
    return blocked_attention(q_BTNH, k_BSKH, v_BSKH, forward="blockwise", causal=causal, q_positions=q_positions,
                             kv_positions=kv_positions, kv_mask=kv_mask, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, sliding_window=sliding_window, mask=mask, bias=bias,
                             scale=scale, block_q=block_q, block_kv=block_kv)


def blocked_attention(q_BTNH, k_BSKH, v_BSKH, *, forward: str, bias, **kwargs) -> Array:
    """Pads, runs the custom-VJP core with the chosen forward kernel, and unpads."""
    B, T, N, _ = q_BTNH.shape
    st, q5, k, v, masks = prepare(q_BTNH, k_BSKH, v_BSKH, forward=forward, **kwargs)
    bias5 = None
    if bias is not None:  # reshaped and padded outside the core, so autodiff unpads its gradient
        K = k.shape[2]
        bias5 = _pad_ts(_as_5d(bias, "bias", B, K, N // K, T, k_BSKH.shape[1]), q5.shape[1], k.shape[1])
    out = _attention_core(st, q5, k, v, bias5, masks)
    return out[:, :T].reshape(B, T, N, v_BSKH.shape[-1])
