"""Scaled dot-product attention as a pure function, with every mask lmlab needs.

Axis letters: B batch, T query length, S key length, N query heads, K key/value heads,
G query heads per K/V head (N = K * G), H head dim.

Grouped-query attention (GQA) and multi-query attention (MQA, K = 1) are computed by
grouping the N query heads into K groups of G that share one K/V head: the query is
reshaped to [B, T, K, G, H] and contracted against K/V of shape [B, S, K, H]. No copy of
K or V is ever made (compare `jnp.repeat` in many implementations).

Masks combine by logical AND into one boolean array broadcastable to [B, N, T, S]
(True = may attend; [B, 1, 1, S] when only padding is given, None when nothing is):
- causal: query position >= key position (positions default to 0..T-1 / 0..S-1; pass
  explicit positions for packed rows or for decoding with a cache);
- padding: `kv_mask` [B, S], True for real keys;
- segments: `q_segment_ids` [B, T] == `kv_segment_ids` [B, S], so packed documents never
  attend across each other;
- sliding window: query position - key position < window (with causal: the last `window`
  keys, the query's own included);
- any extra boolean `mask` broadcastable to [B, N or 1, T, S].

Logits and softmax are computed in float32 whatever the input dtype. A query row with no
valid key (a padding query, say) gets all-zero weights and a zero output, never NaN.

`write_cache` is the one write of a KV cache (`multihead.py`, `mla.py`): slot s of a
row holds the key of that row's position s, so the causal mask over positions alone
hides both the future and the slots not written yet. `write_pages` and `gather_pages`
are the same for a paged cache (`inference/paged.py`): a pool of P blocks of Z positions
shared by all rows, and a block table [B, M] naming the blocks of each row in order, so
that position s of row b lives in block table[b, s // Z] at offset s % Z.

`attend` is the one entry the layers call: `impl` picks the implementation of the same
function (`ATTENTION_IMPLS`): "xla" is `dot_product_attention` below (the [B, N, T, S]
matrix, O(T^2) memory; the only one with attention dropout and returned weights);
"blockwise" is `flash_attention.flash_attention` (online softmax, recomputing backward,
O(T) memory); "pallas" is `pallas_attention.pallas_attention` (the same algorithm as a
Pallas kernel: compiled on GPU/TPU, interpreted on CPU); "cudnn" is
`jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, bf16/fp16 only; "ring" is
`ring_attention.ring_attention` (the blockwise kernel with the sequence split over the mesh
axis that `act_seq` maps to, key/value chunks passed around a ring: context parallelism;
"blockwise" where the sequence is not split).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.layers.flash_attention import flash_attention

Array = jax.Array

ATTENTION_IMPLS = ("xla", "blockwise", "pallas", "cudnn", "ring")


def make_attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    kv_mask: Array | None = None,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    sliding_window: int | None = None,
    mask: Array | None = None,
) -> Array | None:
    """Combines the mask kinds into one boolean mask of shape [B, 1 or N, T, S].

    Args:
      batch, q_len, kv_len: B, T and S.
      causal: forbid attending to keys at later positions than the query.
      q_positions: [B, T] or [T] integer positions of the queries (default 0..T-1).
      kv_positions: [B, S] or [S] integer positions of the keys (default 0..S-1).
      kv_mask: [B, S] boolean, True for real (non-padding) keys.
      q_segment_ids: [B, T] document ids of the queries in a packed row.
      kv_segment_ids: [B, S] document ids of the keys.
      sliding_window: if set, a query sees only keys with q_pos - k_pos < window
        (and, when not causal, also k_pos - q_pos < window).
      mask: extra boolean mask broadcastable to [B, N, T, S].

    Returns:
      A boolean array broadcastable to [B, N, T, S], or None when nothing is masked.
    """
    result = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if causal or sliding_window is not None:
        q_pos = jnp.arange(q_len) if q_positions is None else q_positions
        k_pos = jnp.arange(kv_len) if kv_positions is None else kv_positions
        q_pos = jnp.broadcast_to(q_pos, (batch, q_len))
        k_pos = jnp.broadcast_to(k_pos, (batch, kv_len))
        delta_BTS = q_pos[:, :, None] - k_pos[:, None, :]
        if causal:
            result = both(result, delta_BTS >= 0)
        if sliding_window is not None:
            if sliding_window < 1:
                raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
            result = both(result, delta_BTS < sliding_window)
            if not causal:
                result = both(result, -delta_BTS < sliding_window)
        result = result[:, None]
    if kv_mask is not None:
        if kv_mask.shape != (batch, kv_len):
            raise ValueError(f"kv_mask must have shape [B, S] = {(batch, kv_len)}, got {kv_mask.shape}")
        result = both(result, kv_mask.astype(bool)[:, None, None, :])
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        same_BTS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        result = both(result, same_BTS[:, None])
    if mask is not None:
        result = both(result, mask.astype(bool))
    return result


def write_cache(cache_BS_: Array, new_BT_: Array, positions_BT: Array) -> Array:
    """Writes new[b, t] into cache[b, positions[b, t]], each row at its own positions.

    A KV cache is preallocated [B, S, ...] (S the longest sequence it will hold) and slot s
    of a row holds that row's position s. So a prefill writes a whole prompt (positions
    0..T-1), a decode step one token per row at the row's own length, and prompts of
    different lengths need no left padding: a right-padded row's padding slots sit past
    its length, where the causal mask hides them until its own tokens overwrite them.

    Args:
      cache_BS_: [B, S, ...] the cache buffer (keys, values, or MLA's latents).
      new_BT_: [B, T, ...] the entries of T consecutive tokens per row.
      positions_BT: [B, T] integer positions (= slots) of those tokens.

    Returns:
      The updated cache, in the cache's dtype. Positions >= S are dropped, never clamped
      onto the last slot (`dynamic_update_slice` would shift the write and corrupt the
      cache); callers size S to hold every position they write.
    """
    B = cache_BS_.shape[0]
    rows_B1 = jnp.arange(B)[:, None]
    return cache_BS_.at[rows_B1, positions_BT].set(new_BT_.astype(cache_BS_.dtype), mode="drop")


def write_pages(pages_PZ_: Array, new_BT_: Array, positions_BT: Array, block_table_BM: Array) -> Array:
    """Writes new[b, t] at position p = positions[b, t] of row b of a paged cache.

    Args:
      pages_PZ_: [P, Z, ...] the block pool (P blocks of Z positions).
      new_BT_: [B, T, ...] the entries of T tokens per row.
      positions_BT: [B, T] their positions.
      block_table_BM: [B, M] int, the pool block holding positions m*Z .. (m+1)*Z - 1 of
        row b. Unallocated entries point at a block nobody reads (`inference.paged`
        keeps block 0 for that).

    Returns:
      The updated pool. Positions >= M * Z are dropped, as in `write_cache`.
    """
    P, Z = pages_PZ_.shape[:2]
    M = block_table_BM.shape[1]
    index_BT = positions_BT // Z
    blocks_BT = jnp.take_along_axis(block_table_BM, jnp.minimum(index_BT, M - 1), axis=1)
    blocks_BT = jnp.where(index_BT < M, blocks_BT, P)  # block P does not exist: the write is dropped
    return pages_PZ_.at[blocks_BT, positions_BT % Z].set(new_BT_.astype(pages_PZ_.dtype), mode="drop")


def gather_pages(pages_PZ_: Array, block_table_BM: Array) -> Array:
    """A contiguous [B, M * Z, ...] view of each row's blocks: slot s holds position s.

    This copies the blocks (a gather), so attention then runs exactly as over a
    contiguous cache. Serving kernels (vLLM's PagedAttention) read the blocks in place
    instead; the copy is one layer's worth at a time and keeps this code readable.
    """
    B, M = block_table_BM.shape
    view_BMZ_ = pages_PZ_[block_table_BM]
    return view_BMZ_.reshape(B, M * pages_PZ_.shape[1], *pages_PZ_.shape[2:])


def dot_product_attention(
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
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """softmax(q k^T * scale + bias, masked) v, with grouped K/V heads.

    Args:
      q_BTNH: queries [B, T, N, H].
      k_BSKH: keys [B, S, K, H]; N must be a multiple of K (K = N: multi-head,
        1 < K < N: grouped-query, K = 1: multi-query).
      v_BSKH: values [B, S, K, H].
      causal, q_positions, kv_positions, kv_mask, q_segment_ids, kv_segment_ids,
        sliding_window, mask: see `make_attention_mask`.
      bias: optional additive float bias broadcastable to [B, N, T, S].
      scale: logit scale, default 1/sqrt(H).
      dropout_rate: dropout on the attention weights (needs `dropout_rng`).
      dropout_rng: PRNG key for the attention dropout.
      return_weights: also return the attention weights [B, N, T, S] (float32).

    Returns:
      The attention output [B, T, N, H] in the dtype of `v`, and the weights if asked.
    """
    B, T, N, H = q_BTNH.shape
    _, S, K, _ = k_BSKH.shape
    if k_BSKH.shape != v_BSKH.shape:
        raise ValueError(f"keys {k_BSKH.shape} and values {v_BSKH.shape} must have the same shape")
    if N % K:
        raise ValueError(f"num_heads={N} must be a multiple of num_kv_heads={K}")
    G = N // K
    scale = H**-0.5 if scale is None else scale

    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    logits_BKGTS = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
    )
    logits_BNTS = logits_BKGTS.reshape(B, N, T, S) * scale
    if bias is not None:
        logits_BNTS = logits_BNTS + bias.astype(jnp.float32)

    mask_BNTS = make_attention_mask(
        B, T, S, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
        kv_mask=kv_mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window, mask=mask,
    )
    if mask_BNTS is not None:
        # A large finite negative, not -inf, so that a fully masked row stays finite;
        # such rows are zeroed below.
        logits_BNTS = jnp.where(mask_BNTS, logits_BNTS, jnp.finfo(jnp.float32).min)
    weights_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
    if mask_BNTS is not None:
        weights_BNTS = jnp.where(mask_BNTS, weights_BNTS, 0.0)

    probs_BNTS = weights_BNTS
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs a dropout_rng")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BNTS.shape)
        probs_BNTS = jnp.where(keep, probs_BNTS / (1.0 - dropout_rate), 0.0)

    probs_BKGTS = probs_BNTS.reshape(B, K, G, T, S).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    out_BTNH = out_BTKGH.reshape(B, T, N, H)
    if return_weights:
        return out_BTNH, weights_BNTS
    return out_BTNH


def attend(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    *,
    impl: str = "xla",
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    **masks,
) -> Array | tuple[Array, Array]:
    """`dot_product_attention` computed by the implementation `impl` (`ATTENTION_IMPLS`).

    Args:
      q_BTNH, k_BSKH, v_BSKH: as in `dot_product_attention`.
      impl: "xla" | "blockwise" | "pallas" | "cudnn" | "ring" (see the module docstring).
      dropout_rate, dropout_rng, return_weights: "xla" only (they need the whole weight
        matrix); the others raise ValueError. `MultiHeadAttention` asks for "xla" itself
        when it returns weights or decodes with a KV cache.
      **masks: causal, q_positions, kv_positions, kv_mask, q_segment_ids,
        kv_segment_ids, sliding_window, mask, bias, scale (`dot_product_attention`).

    Returns:
      The attention output [B, T, N, H] (and the weights for "xla" with return_weights).
    """
    if impl == "xla":
        return dot_product_attention(q_BTNH, k_BSKH, v_BSKH, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                                     return_weights=return_weights, **masks)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r}; expected one of {ATTENTION_IMPLS}")
    if return_weights or dropout_rate > 0.0:
        raise ValueError(f"attention impl={impl!r} computes no weight matrix, so it has no attention dropout or "
                         "returned weights; use impl='xla'")
    if impl == "blockwise":
        return flash_attention(q_BTNH, k_BSKH, v_BSKH, **masks)
    if impl == "pallas":
        from models.layers.pallas_attention import pallas_attention  # Pallas is imported only when used

        return pallas_attention(q_BTNH, k_BSKH, v_BSKH, **masks)
    if impl == "ring":
        from models.layers.ring_attention import ring_attention

        return ring_attention(q_BTNH, k_BSKH, v_BSKH, **masks)
    return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, **masks)


def check_cudnn(dtype) -> None:
    """ValueError unless cuDNN attention can run here: a GPU backend and bf16/fp16 inputs."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention impl='cudnn' needs a GPU, but the JAX backend is {jax.default_backend()!r}; "
                         "use 'blockwise' or 'xla'")
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention impl='cudnn' takes bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}; "
                         "set model.dtype=bfloat16 or use 'blockwise'")


def cudnn_attention(
    q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, *, causal: bool = False, q_positions: Array | None = None,
    kv_positions: Array | None = None, bias: Array | None = None, scale: float | None = None, **masks,
) -> Array:
    """cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`).

    Plain causal attention over default positions is cuDNN's own causal mode; any other
    mask (padding, segments, a window, explicit positions) is combined by
    `make_attention_mask` and passed as a boolean mask. Rows with no valid key are zeroed,
    as `dot_product_attention` does.
    """
    check_cudnn(q_BTNH.dtype)
    B, T, _, _ = q_BTNH.shape
    S = k_BSKH.shape[1]
    plain_causal = causal and q_positions is None and kv_positions is None and not any(
        m is not None for m in masks.values())
    mask_BNTS = None
    if not plain_causal:
        mask_BNTS = make_attention_mask(B, T, S, causal=causal, q_positions=q_positions,
                                        kv_positions=kv_positions, **masks)
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, bias=None if bias is None else bias.astype(q_BTNH.dtype), mask=mask_BNTS,
        scale=scale, is_causal=plain_causal, implementation="cudnn")
    if mask_BNTS is not None:
        any_BT = jnp.broadcast_to(mask_BNTS, (B, mask_BNTS.shape[1], T, S)).any(-1).transpose(0, 2, 1)
        out_BTNH = jnp.where(any_BT[..., None], out_BTNH, 0)
    return out_BTNH
