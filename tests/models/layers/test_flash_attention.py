"""Blockwise attention equals the reference `dot_product_attention`, outputs and gradients,
for every mask kind, MHA/GQA/MQA, lengths that are not block multiples, and bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers.attention import dot_product_attention
from models.layers.flash_attention import flash_attention

EPS32 = float(jnp.finfo(jnp.float32).eps)
EPS_BF16 = float(jnp.finfo(jnp.bfloat16).eps)
B, T, S, N, H = 2, 37, 45, 4, 8  # 37 and 45 are not multiples of the block size 16
BLOCK = 16


def tolerance(reference: np.ndarray, length: int) -> float:
    """Both sides compute the same f32 logits; they differ in the order of the softmax and
    value sums (S terms: a rounding random walk of ~sqrt(S) eps relative to the largest
    term) and in the exp of rescaled maxima (a few eps relative). 16 * eps32 * sqrt(S)
    times the largest reference magnitude covers both with a margin of ~4x."""
    return 16 * EPS32 * math.sqrt(length) * max(float(np.abs(reference).max()), 1e-30)


def inputs(kv_heads: int, t: int = T, s: int = S, dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, N, H)), dtype)
    k = jnp.asarray(rng.normal(size=(B, s, kv_heads, H)), dtype)
    v = jnp.asarray(rng.normal(size=(B, s, kv_heads, H)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
    return q, k, v, cotangent


def out_and_grads(attend, q, k, v, bias, cotangent, **masks):
    """The output and the gradients of <output, cotangent> wrt q, k, v (and bias)."""

    @jax.jit
    def run(q, k, v, bias):
        out, vjp = jax.vjp(lambda q, k, v, bias: attend(q, k, v, bias=bias, **masks), q, k, v, bias)
        return out, vjp(cotangent.astype(out.dtype))

    out, grads = run(q, k, v, bias)
    return np.asarray(out, np.float32), [None if g is None else np.asarray(g, np.float32) for g in grads]


def blockwise(q, k, v, **kwargs):
    return flash_attention(q, k, v, block_q=BLOCK, block_kv=BLOCK, **kwargs)


def _segments(t):
    """Two packed documents per row (split at different places), positions restarting."""
    seg = np.zeros((B, t), np.int32)
    seg[0, 15:] = 1
    seg[1, 24:] = 1
    pos = np.concatenate([np.arange(15), np.arange(t - 15)])[None].repeat(B, 0)
    pos[1] = np.concatenate([np.arange(24), np.arange(t - 24)])
    return jnp.asarray(seg), jnp.asarray(pos)


def _case(name):
    """(kv_heads, T, S, masks, bias) of a named mask case."""
    rng = np.random.default_rng(1)
    padding = np.ones((B, S), bool)
    padding[0, 30:] = False
    padding[1, :] = False  # a fully padded row: zero output, zero gradients, no NaN
    seg, pos = _segments(T)
    cases = {
        "none": (4, T, S, {}, None),
        "causal_gqa": (2, T, S, {"causal": True}, None),
        "causal_mqa": (1, T, S, {"causal": True}, None),
        "padding": (2, T, S, {"kv_mask": jnp.asarray(padding)}, None),
        "segments": (2, T, T, {"causal": True, "q_segment_ids": seg, "kv_segment_ids": seg,
                               "q_positions": pos, "kv_positions": pos}, None),
        "window_causal": (2, T, T, {"causal": True, "sliding_window": 7}, None),
        "window_bidirectional": (4, T, T, {"sliding_window": 7}, None),
        "decode_offset": (2, 5, S, {"causal": True, "q_positions": jnp.arange(S - 5, S)}, None),
        "extra_mask": (2, T, S, {"mask": jnp.asarray(rng.random((B, 1, T, S)) < 0.3).at[0, 0, 3].set(False)},
                       None),
        "bias": (2, T, S, {}, jnp.asarray(rng.normal(size=(1, N, T, S)), jnp.float32)),
        "bias_broadcast_causal": (1, T, S, {"causal": True},
                                  jnp.asarray(rng.normal(size=(B, 1, 1, S)), jnp.float32)),
        # Arbitrary (unsorted, repeated) positions: the tile skip must stay exact. (The bias
        # varies along S: one constant along S would have an exactly zero gradient, which
        # both sides only approximate by rounding noise.)
        "everything_random_positions": (2, T, T, {
            "causal": True, "sliding_window": 9, "kv_mask": jnp.asarray(rng.random((B, T)) < 0.8),
            "q_positions": jnp.asarray(rng.integers(0, 60, (B, T))),
            "kv_positions": jnp.asarray(rng.integers(0, 60, (B, T))),
            "q_segment_ids": jnp.asarray(rng.integers(0, 2, (B, T))),
            "kv_segment_ids": jnp.asarray(rng.integers(0, 2, (B, T))),
            "mask": jnp.asarray(rng.random((1, N, T, T)) < 0.9)},
            jnp.asarray(rng.normal(size=(1, N, 1, T)), jnp.float32)),
    }
    return cases[name]


CASES = ("none", "causal_gqa", "causal_mqa", "padding", "segments", "window_causal", "window_bidirectional",
         "decode_offset", "extra_mask", "bias", "bias_broadcast_causal", "everything_random_positions")


@pytest.mark.parametrize("name", CASES)
def test_equals_reference_outputs_and_gradients(name):
    kv_heads, t, s, masks, bias = _case(name)
    q, k, v, cotangent = inputs(kv_heads, t, s)
    want, want_grads = out_and_grads(dot_product_attention, q, k, v, bias, cotangent, **masks)
    got, got_grads = out_and_grads(blockwise, q, k, v, bias, cotangent, **masks)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want, s))
    for label, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
        if w is None:
            assert g is None
            continue
        assert np.isfinite(g).all(), label
        np.testing.assert_allclose(g, w, rtol=0, atol=tolerance(w, max(s, t)), err_msg=label)
    if name == "padding":  # the fully padded row: exactly zero, as the reference
        assert not got[1].any() and not got_grads[0][1].any()


@pytest.mark.parametrize("name", ("causal_gqa", "bias"))
def test_bfloat16_inputs(name):
    """bf16 q, k, v: both implementations round their inputs and output to bf16 (and the
    probabilities before the value product), so each is within a few bf16 ulps of the f32
    computation on the same rounded inputs: 4 * eps_bf16 * max|out|, with gradients
    (more bf16 products) at 8 * eps_bf16 * max|grad|."""
    kv_heads, t, s, masks, bias = _case(name)
    q, k, v, cotangent = inputs(kv_heads, t, s, dtype=jnp.bfloat16)
    exact, exact_grads = out_and_grads(dot_product_attention, *(x.astype(jnp.float32) for x in (q, k, v)), bias,
                                       cotangent, **masks)
    got, got_grads = out_and_grads(blockwise, q, k, v, bias, cotangent, **masks)
    assert got.dtype == np.float32 and flash_attention(q, k, v, **masks).dtype == jnp.bfloat16
    np.testing.assert_allclose(got, exact, rtol=0, atol=4 * EPS_BF16 * np.abs(exact).max())
    for g, w in zip(got_grads[:3], exact_grads[:3]):
        np.testing.assert_allclose(g, w, rtol=0, atol=8 * EPS_BF16 * np.abs(w).max())


def test_tiles_are_skipped_for_causal_attention():
    """A tile above the causal diagonal is never read: with NaN values there, a read tile
    would poison the output (0 * NaN = NaN), a skipped one leaves it equal to the reference."""
    q, k, v, _ = inputs(2, 32, 32)
    poisoned_v = v.at[:, 16:].set(jnp.nan)  # keys 16..31 are later than queries 0..15
    got = flash_attention(q[:, :16], k, poisoned_v, causal=True, block_q=16, block_kv=16)
    want = dot_product_attention(q[:, :16], k[:, :16], v[:, :16], causal=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(np.asarray(want), 16))


def test_bad_shapes_are_refused():
    q, k, v, _ = inputs(3)  # N = 4 heads over 3 K/V heads
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        flash_attention(q, k, v)
    q, k, v, _ = inputs(2)
    with pytest.raises(ValueError, match="not broadcastable"):
        flash_attention(q, k, v, bias=jnp.zeros((B, 3, T, S)))
