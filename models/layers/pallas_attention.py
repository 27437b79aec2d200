"""The blockwise attention forward pass as a Pallas kernel (`jax.experimental.pallas`).

Axis letters as in `flash_attention`: B batch, T/S query/key length (padded: Tp, Sp),
K key/value heads, G query heads per K/V head, H head dim, Q and C the block sizes.

One kernel instance (grid point (b, k, g, i)) owns query block i of one head: it keeps
the running maximum, sum and output accumulator of the online softmax for its Q rows in
registers / VMEM and walks the key blocks of its K/V head with `fori_loop`, skipping a
key block (`lax.cond`) when the tile's mask, rebuilt in the kernel from the positions,
padding and segment ids of its rows, is empty. It writes the output and the row
log-sum-exp, exactly what `flash_attention`'s custom VJP saves, so the backward pass is
that module's (FlashAttention-2, recomputing tiles in JAX): gradients are the same on
every backend.

The kernel is compiled by Pallas on GPU (Triton) and TPU (Mosaic) and run with
`interpret=True` elsewhere (CPU: the tests), where it is a reference for the kernel's
logic, not fast. Inputs the kernel does not take, an additive `bias` or a dense boolean
`mask` ([B, N, T, S] arrays that would need their own tiled reads), fall back to the
blockwise forward pass of `flash_attention`, with the same results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from models.layers.flash_attention import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, Masks, Static, blocked_attention

Array = jax.Array


def _kernel(q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, kv_valid_ref, *refs, st: Static, segments: bool):
    """One query block of one head: q [Q, H]; k, v [Sp, H]; positions [Q] / [Sp]."""
    if segments:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    C = st.block_kv
    q = q_ref[...]
    q_pos = q_pos_ref[...]
    q_seg = q_seg_ref[...] if segments else None

    def tile_mask(j):
        cols = pl.ds(j * C, C)
        ok = (kv_valid_ref[cols] != 0)[None, :]
        delta = q_pos[:, None] - kv_pos_ref[cols][None, :]
        if st.causal:
            ok = ok & (delta >= 0)
        if st.window is not None:
            ok = ok & (delta < st.window)
            if not st.causal:
                ok = ok & (-delta < st.window)
        if segments:
            ok = ok & (q_seg[:, None] == kv_seg_ref[cols][None, :])
        return ok

    def kv_block(j, carry):
        ok = tile_mask(j)

        def visit(carry):
            m, l, acc = carry
            k = k_ref[pl.ds(j * C, C), :]
            v = v_ref[pl.ds(j * C, C), :]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * st.scale
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing valid yet
            p = jnp.where(ok, jnp.exp(s - m_safe[:, None]), 0.0)
            alpha = jnp.exp(m - m_safe)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[:, None] * acc + pv

        return jax.lax.cond(jnp.max(ok.astype(jnp.int32)) > 0, visit, lambda c: c, carry)

    Q, H = q.shape
    init = (jnp.full((Q,), -jnp.inf, jnp.float32), jnp.zeros((Q,), jnp.float32), jnp.zeros((Q, H), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, kv_valid_ref.shape[0] // C, kv_block, init)
    nonempty = l > 0
    safe_l = jnp.where(nonempty, l, 1.0)
    o_ref[...] = jnp.where(nonempty[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe_l), jnp.inf)


def forward(st: Static, q: Array, k: Array, v: Array, masks: Masks) -> tuple[Array, Array]:
    """The Pallas forward pass: q [B, Tp, K, G, H], k/v [B, Sp, K, H] (padded by
    `flash_attention.prepare`) -> output [B, Tp, K, G, H], lse [B, K, G, Tp]."""
    if masks.dense is not None:
        raise ValueError("the Pallas kernel takes no dense mask; pallas_attention routes it to blockwise")
    B, Tp, K, G, H = q.shape
    Sp = k.shape[1]
    Q = st.block_q
    sq = pl.squeezed
    q_BKGTH = q.transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    segments = masks.q_seg is not None
    args = [q_BKGTH, k_BKSH, v_BKSH, masks.q_pos, masks.kv_pos, masks.kv_valid.astype(jnp.int32)]
    query_rows = pl.BlockSpec((sq, Q), lambda b, h, g, i: (b, i))
    key_row = pl.BlockSpec((sq, Sp), lambda b, h, g, i: (b, 0))
    in_specs = [pl.BlockSpec((sq, sq, sq, Q, H), lambda b, h, g, i: (b, h, g, i, 0)),
                pl.BlockSpec((sq, sq, Sp, H), lambda b, h, g, i: (b, h, 0, 0)),
                pl.BlockSpec((sq, sq, Sp, H), lambda b, h, g, i: (b, h, 0, 0)),
                query_rows, key_row, key_row]
    if segments:
        args += [masks.q_seg, masks.kv_seg]
        in_specs += [query_rows, key_row]
    out, lse = pl.pallas_call(
        functools.partial(_kernel, st=st, segments=segments),
        grid=(B, K, G, Tp // Q),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((sq, sq, sq, Q, H), lambda b, h, g, i: (b, h, g, i, 0)),
                   pl.BlockSpec((sq, sq, sq, Q), lambda b, h, g, i: (b, h, g, i))],
        out_shape=[jax.ShapeDtypeStruct((B, K, G, Tp, H), v.dtype),
                   jax.ShapeDtypeStruct((B, K, G, Tp), jnp.float32)],
        interpret=jax.default_backend() not in ("gpu", "tpu"),
        name="lmlab_flash_forward",
    )(*args)
    return out.transpose(0, 3, 1, 2, 4), lse


def pallas_attention(
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
    """`flash_attention` with its forward pass as a Pallas kernel (same arguments and result).

    With a dense `mask` or a `bias` the forward pass is `flash_attention`'s blockwise one
    (the kernel reads only per-position masks); the backward pass is always the blockwise
    custom VJP's.
    """
    forward_kind = "blockwise" if mask is not None or bias is not None else "pallas"
    return blocked_attention(q_BTNH, k_BSKH, v_BSKH, forward=forward_kind, causal=causal,
                             q_positions=q_positions, kv_positions=kv_positions, kv_mask=kv_mask,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             sliding_window=sliding_window, mask=mask, bias=bias, scale=scale, block_q=block_q,
                             block_kv=block_kv)
