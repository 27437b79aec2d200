"""models/layers/attention.py against a float64 NumPy reference and torch SDPA.

The NumPy reference repeats the K/V heads explicitly (`np.repeat`) and builds every mask
with Python loops over (b, n, t, s), so it shares no code path with the grouped einsum
and the vectorised mask of the layer. Torch's `scaled_dot_product_attention` (bool
`attn_mask`, `enable_gqa=True`) is a second, independent softmax-attention.

Axis letters: B batch, T query length, S key length, N query heads, K key/value heads,
G = N / K, H head dim.

Measured max abs errors are printed (run with `-s`) and summarised at module teardown.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch


from models.layers.attention import dot_product_attention, make_attention_mask

B, H = 2, 8
HEADS = {"mha_N4K4": (4, 4), "gqa_N6K2": (6, 2), "mqa_N4K1": (4, 1)}
TOL = dict(rtol=1e-5, atol=1e-5)

_MAX_ERR: dict[str, float] = {}


def _record(label: str, got, want) -> float:
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)), initial=0.0))
    _MAX_ERR[label] = max(err, _MAX_ERR.get(label, 0.0))
    print(f"\n[max-abs-err] {label}: {err:.3g}")
    return err


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print("\n[max-abs-err summary] test_attention.py")
    for label, err in sorted(_MAX_ERR.items()):
        print(f"  {label:60s} {err:.3g}")


# --- independent references -----------------------------------------------------------


def _np_mask(B, N, T, S, *, causal=False, q_positions=None, kv_positions=None, kv_mask=None,
             q_segment_ids=None, kv_segment_ids=None, sliding_window=None, mask=None):
    """allowed[b, n, t, s], one element at a time, from the docstring's definitions."""
    explicit = None if mask is None else np.broadcast_to(np.asarray(mask, bool), (B, N, T, S))
    qp = None if q_positions is None else np.broadcast_to(np.asarray(q_positions), (B, T))
    kp = None if kv_positions is None else np.broadcast_to(np.asarray(kv_positions), (B, S))
    allowed = np.zeros((B, N, T, S), bool)
    for b in range(B):
        for n in range(N):
            for t in range(T):
                for s in range(S):
                    q_pos = t if qp is None else int(qp[b, t])
                    k_pos = s if kp is None else int(kp[b, s])
                    ok = True
                    if causal and k_pos > q_pos:
                        ok = False
                    if sliding_window is not None:
                        if q_pos - k_pos >= sliding_window:
                            ok = False
                        if not causal and k_pos - q_pos >= sliding_window:
                            ok = False
                    if kv_mask is not None and not kv_mask[b][s]:
                        ok = False
                    if q_segment_ids is not None and q_segment_ids[b][t] != kv_segment_ids[b][s]:
                        ok = False
                    if explicit is not None and not explicit[b, n, t, s]:
                        ok = False
                    allowed[b, n, t, s] = ok
    return allowed


def _np_attention(q, k, v, allowed_BNTS, *, scale=None, bias=None):
    """float64 softmax attention with the K/V heads repeated; rows with no key give 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    Bq, T, N, Hq = q.shape
    S, K = k.shape[1], k.shape[2]
    k_rep = np.repeat(k, N // K, axis=2)  # query head n reads kv head n // G
    v_rep = np.repeat(v, N // K, axis=2)
    scale = Hq**-0.5 if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k_rep) * scale
    if bias is not None:
        logits = logits + np.broadcast_to(np.asarray(bias, np.float64), logits.shape)
    out = np.zeros((Bq, T, N, Hq))
    weights = np.zeros((Bq, N, T, S))
    for b in range(Bq):
        for n in range(N):
            for t in range(T):
                keep = allowed_BNTS[b, n, t]
                if not keep.any():
                    continue
                row = logits[b, n, t, keep]
                p = np.exp(row - row.max())
                weights[b, n, t, keep] = p / p.sum()
                out[b, t, n] = weights[b, n, t] @ v_rep[b, :, n]
    return out, weights


def _torch_sdpa(q, k, v, allowed_BNTS=None, *, is_causal=False):
    """torch SDPA in float64 on [B, N, T, H] layouts; GQA through `enable_gqa`."""
    to_t = lambda a: torch.from_numpy(np.asarray(a, np.float64)).transpose(1, 2)  # noqa: E731
    qt, kt, vt = to_t(q), to_t(k), to_t(v)
    attn_mask = None if allowed_BNTS is None else torch.from_numpy(np.asarray(allowed_BNTS))
    out = torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=qt.shape[1] != kt.shape[1])
    return out.transpose(1, 2).numpy()  # [B, T, N, H]


# --- the mask kinds ---------------------------------------------------------------------


def _case(name, N):
    """(T, S, kwargs of numpy arrays/ints) for one mask kind; deterministic per name."""
    rng = np.random.default_rng(sum(map(ord, name)) + N)
    if name == "none":
        return 5, 8, {}
    if name == "causal":
        return 8, 8, {"causal": True}
    if name == "padding":
        kv_mask = np.zeros((B, 8), bool)
        kv_mask[0, :5] = True  # batch row 1 has no real key at all: every query row is empty
        return 5, 8, {"kv_mask": kv_mask}
    if name == "segments":
        seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 2, 2, 2, 2, 2, 2]], np.int32)
        return 8, 8, {"q_segment_ids": seg, "kv_segment_ids": seg}
    if name == "segments_cross":  # T != S: packed queries against packed keys
        q_seg = np.array([[1, 1, 2, 2, 3], [1, 2, 2, 2, 2]], np.int32)
        kv_seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]], np.int32)
        return 5, 8, {"q_segment_ids": q_seg, "kv_segment_ids": kv_seg}  # segment 3: no key
    if name == "window_causal":
        return 8, 8, {"causal": True, "sliding_window": 3}
    if name == "window_bidirectional":
        return 5, 8, {"sliding_window": 2}
    if name == "explicit":
        mask = rng.random((B, N, 5, 8)) < 0.6
        mask[0, 0, 1] = False  # one empty row
        mask[1, -1, 2] = False
        return 5, 8, {"mask": mask}
    if name == "combined":
        seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
        kv_mask = np.ones((B, 8), bool)
        kv_mask[1, 6:] = False
        kv_mask[0, 5] = False  # the first token of document 2 is padding: its query row is empty
        mask = rng.random((B, 1, 8, 8)) < 0.8
        return 8, 8, {"causal": True, "kv_mask": kv_mask, "q_segment_ids": seg, "kv_segment_ids": seg,
                      "sliding_window": 4, "mask": mask}
    if name == "decode_positions":  # a query block at 5..7 against a cache holding 0..7
        return 3, 8, {"causal": True, "q_positions": np.broadcast_to(np.arange(5, 8), (B, 3))}
    if name == "decode_window":
        return 3, 8, {"causal": True, "sliding_window": 3, "q_positions": np.arange(5, 8)}
    if name == "packed_positions":  # positions restart at each document
        seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 2, 2, 2]], np.int32)
        pos = np.array([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 2]], np.int32)
        return 8, 8, {"causal": True, "q_positions": pos, "kv_positions": pos, "sliding_window": 2,
                      "q_segment_ids": seg, "kv_segment_ids": seg}
    raise KeyError(name)


CASES = ("none", "causal", "padding", "segments", "segments_cross", "window_causal",
         "window_bidirectional", "explicit", "combined", "decode_positions", "decode_window",
         "packed_positions")


def _qkv(T, S, N, K, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)).astype(dtype)
    k = rng.standard_normal((B, S, K, H)).astype(dtype)
    v = rng.standard_normal((B, S, K, H)).astype(dtype)
    return q, k, v


def _jax_kwargs(kwargs):
    return {key: jnp.asarray(val) if isinstance(val, np.ndarray) else val for key, val in kwargs.items()}


# --- agreement with the references -----------------------------------------------------


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_float64(case, heads):
    N, K = HEADS[heads]
    T, S, kwargs = _case(case, N)
    q, k, v = _qkv(T, S, N, K)
    out, weights = dot_product_attention(q, k, v, return_weights=True, **_jax_kwargs(kwargs))
    allowed = _np_mask(B, N, T, S, **kwargs)
    want_out, want_w = _np_attention(q, k, v, allowed)

    assert out.shape == (B, T, N, H) and out.dtype == jnp.float32
    assert weights.shape == (B, N, T, S) and weights.dtype == jnp.float32
    out, weights = np.asarray(out), np.asarray(weights)
    assert np.isfinite(out).all() and np.isfinite(weights).all()
    err = _record(f"attention/{case}/{heads} vs numpy64 (out)", out, want_out)
    _record(f"attention/{case}/{heads} vs numpy64 (weights)", weights, want_w)
    np.testing.assert_allclose(out, want_out, **TOL, err_msg=f"max abs err {err:.3g}")
    np.testing.assert_allclose(weights, want_w, **TOL)

    valid_BNT = allowed.any(-1)
    np.testing.assert_allclose(weights.sum(-1)[valid_BNT], 1.0, rtol=1e-6)
    # Masked entries carry exactly zero weight; rows with no valid key are exactly zero.
    assert (weights[~allowed] == 0.0).all()
    assert (out.transpose(0, 2, 1, 3)[~valid_BNT] == 0.0).all()


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("case", CASES)
def test_matches_torch_sdpa(case, heads):
    N, K = HEADS[heads]
    T, S, kwargs = _case(case, N)
    q, k, v = _qkv(T, S, N, K, seed=1)
    out = np.asarray(dot_product_attention(q, k, v, **_jax_kwargs(kwargs)))
    allowed = _np_mask(B, N, T, S, **kwargs)
    if case == "causal":  # torch builds its own causal mask here
        want = _torch_sdpa(q, k, v, is_causal=True)
    elif case == "none":
        want = _torch_sdpa(q, k, v)
    else:
        want = _torch_sdpa(q, k, v, allowed)
    valid_BTN = allowed.any(-1).transpose(0, 2, 1)  # torch is NaN on rows with no valid key
    assert np.isfinite(want[valid_BTN]).all()
    err = _record(f"attention/{case}/{heads} vs torch sdpa", out[valid_BTN], want[valid_BTN])
    np.testing.assert_allclose(out[valid_BTN], want[valid_BTN], **TOL, err_msg=f"max abs err {err:.3g}")
    assert np.isfinite(out).all() and (out[~valid_BTN] == 0.0).all()


def test_make_attention_mask_matches_python_loops():
    for case in CASES:
        T, S, kwargs = _case(case, 4)
        got = make_attention_mask(B, T, S, **_jax_kwargs(kwargs))
        want = _np_mask(B, 4, T, S, **kwargs)
        if got is None:
            assert want.all(), case
        else:
            np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), want.shape), want, err_msg=case)


def test_scale_and_bias_match_numpy():
    N, K, T, S = 6, 2, 5, 8
    q, k, v = _qkv(T, S, N, K, seed=2)
    bias = np.random.default_rng(3).standard_normal((1, N, T, S)).astype(np.float32)
    kwargs = {"causal": True}
    out = dot_product_attention(q, k, v, bias=jnp.asarray(bias), scale=0.3, **kwargs)
    want, _ = _np_attention(q, k, v, _np_mask(B, N, T, S, **kwargs), scale=0.3, bias=bias)
    _record("attention/scale+bias vs numpy64", out, want)
    np.testing.assert_allclose(out, want, **TOL)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Grouped heads read K/V head n // G: the same as MHA on np.repeat-ed K/V."""
    N, K, T, S = 6, 2, 5, 8
    q, k, v = _qkv(T, S, N, K, seed=4)
    grouped = dot_product_attention(q, k, v, causal=True)
    repeated = dot_product_attention(q, np.repeat(k, N // K, 2), np.repeat(v, N // K, 2), causal=True)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-6, atol=1e-6)


# --- empty rows, gradients, dtypes, dropout, errors ------------------------------------


def test_rows_without_keys_are_zero_and_have_finite_zero_gradients():
    N, K, T, S = 4, 2, 5, 8
    q, k, v = _qkv(T, S, N, K, seed=5)
    _, _, kwargs = _case("padding", N)
    kv_mask = jnp.asarray(kwargs["kv_mask"])  # batch row 1: no valid key

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, kv_mask=kv_mask) ** 2)

    out = np.asarray(dot_product_attention(q, k, v, kv_mask=kv_mask))
    assert (out[1] == 0.0).all() and np.abs(out[0]).min() > 0.0
    gq, gk, gv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in (gq, gk, gv):
        assert np.isfinite(np.asarray(g)).all()
    assert (np.asarray(gq)[1] == 0.0).all() and (np.asarray(gv)[1] == 0.0).all()
    # Padding keys of row 0 get no gradient either; real keys do.
    assert (np.asarray(gk)[0, 5:] == 0.0).all() and np.abs(np.asarray(gk)[0, :5]).max() > 0.0


@pytest.mark.parametrize("heads", list(HEADS))
def test_bfloat16_inputs_softmax_in_float32(heads):
    """bf16 q/k/v: weights are f32 and f32-accurate for the rounded inputs; output within bf16."""
    N, K = HEADS[heads]
    T, S, kwargs = _case("combined", N)
    q, k, v = _qkv(T, S, N, K, seed=6)
    q16, k16, v16 = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    out16, w16 = dot_product_attention(q16, k16, v16, return_weights=True, **_jax_kwargs(kwargs))
    assert out16.dtype == jnp.bfloat16 and w16.dtype == jnp.float32

    q_r, k_r, v_r = (np.asarray(a.astype(jnp.float32)) for a in (q16, k16, v16))
    out32 = dot_product_attention(q_r, k_r, v_r, **_jax_kwargs(kwargs))
    want_out, want_w = _np_attention(q_r, k_r, v_r, _np_mask(B, N, T, S, **kwargs))
    # The logits of bf16 inputs are exact in f32, so a float32 softmax is f32-accurate;
    # a bf16 softmax would be off by ~4e-3.
    err_w = _record(f"attention/bf16/{heads} weights vs numpy64", w16, want_w)
    assert err_w < 1e-5, err_w
    err = _record(f"attention/bf16/{heads} out vs f32 out", np.asarray(out16, np.float32), out32)
    _record(f"attention/bf16/{heads} out vs numpy64", np.asarray(out16, np.float32), want_out)
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, rtol=2e-2, atol=2e-2,
                               err_msg=f"max abs err {err:.3g}")


def test_dropout_reproducible_and_rescaled():
    N, K, T, S = 4, 2, 8, 8
    q, k, v = _qkv(T, S, N, K, seed=7)
    fn = jax.jit(functools.partial(dot_product_attention, causal=True, dropout_rate=0.5, return_weights=True))
    out_a, w_a = fn(q, k, v, dropout_rng=jax.random.key(0))
    out_a2, _ = fn(q, k, v, dropout_rng=jax.random.key(0))
    out_b, _ = fn(q, k, v, dropout_rng=jax.random.key(1))
    plain, w_plain = dot_product_attention(q, k, v, causal=True, return_weights=True)
    np.testing.assert_array_equal(out_a, out_a2)
    assert np.abs(np.asarray(out_a - out_b)).max() > 1e-3
    assert np.abs(np.asarray(out_a - plain)).max() > 1e-3
    np.testing.assert_allclose(w_a, w_plain, rtol=1e-6, atol=1e-7)  # the pre-dropout weights
    with pytest.raises(ValueError, match="dropout_rng"):
        dot_product_attention(q, k, v, dropout_rate=0.1)


def test_bad_arguments_raise():
    q, k, v = _qkv(4, 4, 6, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dot_product_attention(q, k, v)
    q, k, v = _qkv(4, 5, 4, 2)
    with pytest.raises(ValueError, match="same shape"):
        dot_product_attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="sliding_window"):
        dot_product_attention(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match="kv_mask"):
        dot_product_attention(q, k, v, kv_mask=jnp.ones((B, 4), bool))
    with pytest.raises(ValueError, match="both"):
        dot_product_attention(q, k, v, q_segment_ids=jnp.ones((B, 4), jnp.int32))


class JitAgreementTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_combined_masks_match_numpy(self):
        N, K = HEADS["gqa_N6K2"]
        T, S, kwargs = _case("combined", N)
        q, k, v = _qkv(T, S, N, K, seed=8)
        static = {key: kwargs.pop(key) for key in ("causal", "sliding_window")}
        fn = self.variant(functools.partial(dot_product_attention, return_weights=True, **static))
        out, weights = fn(q, k, v, **_jax_kwargs(kwargs))
        want_out, want_w = _np_attention(q, k, v, _np_mask(B, N, T, S, **static, **kwargs))
        _record("attention/combined/gqa_N6K2 jit-variant vs numpy64", out, want_out)
        np.testing.assert_allclose(out, want_out, **TOL)
        np.testing.assert_allclose(weights, want_w, **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_decode_positions_match_numpy(self):
        N, K = HEADS["mqa_N4K1"]
        T, S, kwargs = _case("decode_positions", N)
        q, k, v = _qkv(T, S, N, K, seed=9)
        fn = self.variant(functools.partial(dot_product_attention, causal=True))
        out = fn(q, k, v, q_positions=jnp.asarray(kwargs["q_positions"]))
        want, _ = _np_attention(q, k, v, _np_mask(B, N, T, S, **kwargs))
        np.testing.assert_allclose(out, want, **TOL)


def test_jit_equals_no_jit():
    N, K = HEADS["gqa_N6K2"]
    T, S, kwargs = _case("packed_positions", N)
    q, k, v = _qkv(T, S, N, K, seed=10)
    static = {key: kwargs.pop(key) for key in ("causal", "sliding_window")}
    fn = functools.partial(dot_product_attention, **static)
    eager = fn(q, k, v, **_jax_kwargs(kwargs))
    jitted = jax.jit(fn)(q, k, v, **_jax_kwargs(kwargs))
    err = _record("attention/packed_positions jit vs no-jit", jitted, eager)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6, err_msg=f"{err:.3g}")
