"""models/layers/multihead.py against torch.nn.MultiheadAttention, a float64 NumPy
composition (GQA + RoPE), and invariants: causality by gradient, segment isolation,
packed == unpacked.

Axis letters: B batch, T query length, S key length, D model width, N query heads,
K key/value heads, H head dim.

Measured max abs errors are printed (run with `-s`).
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch


from models.layers.multihead import MultiHeadAttention
from models.layers.positional import RopeConfig

B, T, S, D = 2, 6, 7, 16


def _record(label, got, want):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    print(f"\n[max-abs-err] {label}: {err:.3g}")
    return err


def _random_params(module, *args, seed=0, **kwargs):
    """Initialises `module` and replaces every parameter (biases included) by N(0, 0.3^2)."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs))
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [(0.3 * rng.standard_normal(l.shape)).astype(np.float32) for l in leaves])


def _torch_mha(p, num_heads):
    """torch.nn.MultiheadAttention (float64) carrying our per-head weights."""
    Dm, N, Hd = p["query"].shape
    mha = torch.nn.MultiheadAttention(Dm, num_heads, bias=True, batch_first=True, dropout=0.0,
                                      dtype=torch.float64)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    with torch.no_grad():
        # torch: q = x W_q^T + b_q with W_q [N*H, D], heads laid out head-major in N*H.
        mha.in_proj_weight.copy_(torch.cat([t(p[name]).reshape(Dm, N * Hd).T for name in ("query", "key", "value")]))
        mha.in_proj_bias.copy_(torch.cat([t(p[name + "_bias"]).reshape(-1) for name in ("query", "key", "value")]))
        mha.out_proj.weight.copy_(t(p["out"]).reshape(N * Hd, Dm).T)
        mha.out_proj.bias.copy_(t(p["out_bias"]))
    return mha.eval()


def _inputs(seed=0, t=T, s=S):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, t, D)).astype(np.float32), rng.standard_normal((B, s, D)).astype(np.float32))


# --- agreement with torch.nn.MultiheadAttention ---------------------------------------


@pytest.mark.parametrize("kind", ["self_plain", "self_causal_padding", "cross_padding"])
def test_matches_torch_multihead_attention(kind):
    x, y = _inputs(seed=1)
    mha = MultiHeadAttention(num_heads=4, use_bias=True)
    kv_mask = np.ones((B, S if kind == "cross_padding" else T), bool)
    kv_mask[1, -2:] = False
    if kind == "cross_padding":
        params = _random_params(mha, x, y, seed=2)
        out = mha.apply(params, x, y, kv_mask=jnp.asarray(kv_mask))
        q_t, kv_t, kwargs = x, y, {"key_padding_mask": torch.from_numpy(~kv_mask)}
    elif kind == "self_causal_padding":
        params = _random_params(mha, x, seed=3)
        out = mha.apply(params, x, causal=True, kv_mask=jnp.asarray(kv_mask))
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = may NOT attend
        q_t, kv_t, kwargs = x, x, {"key_padding_mask": torch.from_numpy(~kv_mask), "attn_mask": causal}
    else:
        params = _random_params(mha, x, seed=4)
        out = mha.apply(params, x)
        q_t, kv_t, kwargs = x, x, {}
    torch_mha = _torch_mha(params["params"], 4)
    as_t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    want, _ = torch_mha(as_t(q_t), as_t(kv_t), as_t(kv_t), need_weights=False, **kwargs)
    want = want.detach().numpy()
    err = _record(f"multihead/{kind} vs torch.nn.MultiheadAttention", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"max abs err {err:.3g}")


# --- grouped heads with RoPE against a NumPy composition ------------------------------


def _np_rope_half(x_BTNH, positions_BT, theta=10000.0):
    """Hugging Face rotate_half RoPE in float64."""
    Hd = x_BTNH.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, Hd, 2) / Hd)
    angles = positions_BT[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate([angles, angles], -1)[:, :, None, :]
    rotate_half = np.concatenate([-x_BTNH[..., Hd // 2:], x_BTNH[..., : Hd // 2]], -1)
    return x_BTNH * np.cos(emb) + rotate_half * np.sin(emb)


def _np_gqa_rope_causal(p, x, positions):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f(x)
    q = np.einsum("btd,dnh->btnh", x, f(p["query"]))
    k = np.einsum("btd,dkh->btkh", x, f(p["key"]))
    v = np.einsum("btd,dkh->btkh", x, f(p["value"]))
    q, k = _np_rope_half(q, positions), _np_rope_half(k, positions)
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, 2), np.repeat(v, G, 2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    Tq = x.shape[1]
    logits = np.where(np.tril(np.ones((Tq, Tq), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", w, v)
    return np.einsum("btnh,nhd->btd", o, f(p["out"]))


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_with_rope_matches_numpy_float64(num_kv_heads):
    x, _ = _inputs(seed=5)
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads, rope=RopeConfig())
    params = _random_params(mha, x, seed=6)
    positions = np.broadcast_to(np.arange(3, 3 + T), (B, T))  # an offset, as in decoding
    out = mha.apply(params, x, causal=True, q_positions=jnp.asarray(positions))
    want = _np_gqa_rope_causal(params["params"], x, positions)
    err = _record(f"multihead/gqa K={num_kv_heads}+rope vs numpy64", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"max abs err {err:.3g}")


# --- invariants -----------------------------------------------------------------------


def _causal_jacobian(apply, x_1TD):
    """J[t, s] = max |d out[t] / d x[s]| for a single row."""
    jac = jax.jit(jax.jacrev(lambda x: apply(x)[0]))(x_1TD)  # [T, D, 1, T, D]
    return np.abs(np.asarray(jac[:, :, 0])).max(axis=(1, 3))


def test_causality_by_gradient():
    x, _ = _inputs(seed=7)
    x = x[:1]
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, use_bias=True, rope=RopeConfig())
    params = _random_params(mha, x, seed=8)
    dep = _causal_jacobian(lambda x: mha.apply(params, x, causal=True), jnp.asarray(x))
    later = np.triu(np.ones((T, T), bool), k=1)
    assert (dep[later] == 0.0).all(), dep
    assert (dep[~later] > 0.0).all(), dep  # every earlier (and own) position matters


def test_sliding_window_by_gradient():
    x, _ = _inputs(seed=9)
    x = x[:1]
    window = 2
    mha = MultiHeadAttention(num_heads=4, sliding_window=window)
    params = _random_params(mha, x, seed=10)
    dep = _causal_jacobian(lambda x: mha.apply(params, x, causal=True), jnp.asarray(x))
    t, s = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    seen = (s <= t) & (t - s < window)
    assert (dep[~seen] == 0.0).all(), dep
    assert (dep[seen] > 0.0).all(), dep


def test_segment_isolation_on_a_packed_row():
    """Changing document 2 leaves document 1's outputs bit-identical (and changes doc 2's)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 8, D)).astype(np.float32)
    seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2]])
    pos = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2]])
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, use_bias=True, rope=RopeConfig())
    params = _random_params(mha, x, seed=12)
    for causal in (False, True):
        apply = jax.jit(lambda x: mha.apply(params, x, causal=causal, q_positions=pos,  # noqa: B023
                                            q_segment_ids=seg, kv_segment_ids=seg))
        run = lambda x: np.asarray(apply(x))  # noqa: E731
        x2 = x.copy()
        x2[0, 5:] = rng.standard_normal((3, D))
        a, b = run(x), run(x2)
        np.testing.assert_array_equal(a[0, :5], b[0, :5])
        assert np.abs(a[0, 5:] - b[0, 5:]).min() > 0.0


def test_packed_row_equals_documents_run_alone():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((1, 8, D)).astype(np.float32)
    seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2]])
    pos = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2]])
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, rope=RopeConfig(interleaved=True))
    params = _random_params(mha, x, seed=14)
    apply = jax.jit(lambda x, **kw: mha.apply(params, x, causal=True, **kw))
    packed = apply(x, q_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    alone = np.concatenate([apply(x[:, :5]), apply(x[:, 5:])], 1)
    err = _record("multihead/packed vs documents alone", packed, alone)
    np.testing.assert_allclose(packed, alone, rtol=1e-6, atol=1e-6, err_msg=f"{err:.3g}")


def test_sown_attention_weights():
    x, _ = _inputs(seed=15)
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2)
    params = _random_params(mha, x, seed=16)
    _, state = mha.apply(params, x, causal=True, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (B, 4, T, T)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert (np.asarray(weights)[..., np.triu(np.ones((T, T), bool), 1)] == 0.0).all()


def test_bfloat16_compute_close_to_float32():
    x, _ = _inputs(seed=17)
    params = _random_params(MultiHeadAttention(num_heads=4), x, seed=18)
    out32 = MultiHeadAttention(num_heads=4).apply(params, x, causal=True)
    out16 = MultiHeadAttention(num_heads=4, dtype=jnp.bfloat16).apply(params, x, causal=True)
    assert out16.dtype == jnp.bfloat16
    err = _record("multihead/bf16 compute vs f32", np.asarray(out16, np.float32), out32)
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, rtol=5e-2, atol=5e-2, err_msg=f"{err:.3g}")


def test_heads_not_divisible_by_kv_heads_raises():
    x, _ = _inputs()
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MultiHeadAttention(num_heads=4, num_kv_heads=3).init(jax.random.key(0), x)
