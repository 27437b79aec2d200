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
        "causal_gqa": (2, T, S, {"causal": True}, None),
        "padding": (2, T, S, {"kv_mask": jnp.asarray(padding)}, None),
        "segments": (2, T, T, {"causal": True, "q_segment_ids": seg, "kv_segment_ids": seg,
                               "q_positions": pos, "kv_positions": pos}, None),
        "window_causal": (2, T, T, {"causal": True, "sliding_window": 7}, None),
        "window_bidirectional": (4, T, T, {"sliding_window": 7}, None),
        "decode_offset": (2, 5, S, {"causal": True, "q_positions": jnp.arange(S - 5, S)}, None),
        "extra_mask": (2, T, S, {"mask": jnp.asarray(rng.random((B, 1, T, S)) < 0.3).at[0, 0, 3].set(False)},
                       None),
        "bias": (4, T, S, {}, jnp.asarray(rng.normal(size=(1, N, T, S)), jnp.float32)),  # MHA, no mask
        "bias_broadcast_causal": (1, T, S, {"causal": True},  # MQA
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


CASES = ("causal_gqa", "padding", "segments", "window_causal", "window_bidirectional",
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


@pytest.mark.parametrize("name", ("causal_gqa",))
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


def _tiny_llama(impl: str):
    """configs/llama.py:tiny (GQA, RoPE; one layer, to compile fast) as a model, with the given attention_impl."""
    import os

    from configs.loader import load_config
    from train import build

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    config = load_config(os.path.join(repo, "configs/llama.py:tiny"),
                         ["model.num_layers=1", f"model.block.attention_impl={impl}"])
    return build.model(config, vocab_size=97)


def test_tiny_llama_blockwise_equals_xla_logits_and_loss_gradient():
    """The same parameters through both implementations, on packed rows (segments, positions
    restarting): logits and the gradient of the mean next-token loss agree to the f32
    tolerance of `tolerance` over its attention (S = 37 keys)."""
    xla, blockwise_model = _tiny_llama("xla"), _tiny_llama("blockwise")
    assert blockwise_model.config.block.attention_impl == "blockwise"
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (B, T)))
    seg, pos = _segments(T)
    params = xla.init(jax.random.PRNGKey(0), ids)

    def loss_and_logits(model, params):
        logits = model.apply(params, ids, positions=pos, segment_ids=seg)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean(), logits

    (_, want), want_grads = jax.jit(jax.value_and_grad(lambda p: loss_and_logits(xla, p), has_aux=True))(params)
    (_, got), got_grads = jax.jit(jax.value_and_grad(lambda p: loss_and_logits(blockwise_model, p),
                                                     has_aux=True))(params)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(np.asarray(want), T))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=0, atol=tolerance(np.asarray(w), T), err_msg=str(path))


def test_multihead_routes_weights_and_cache_to_xla_and_refuses_dropout():
    """Sown weights and KV-cache decoding need the weight matrix: MultiHeadAttention with
    attention_impl='blockwise' computes them by 'xla' (same results as an 'xla' module);
    attention dropout in training is refused, not silently dropped."""
    from models.layers.multihead import MultiHeadAttention

    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 9, 16)), jnp.float32)
    xla = MultiHeadAttention(num_heads=4, num_kv_heads=2)
    flash = MultiHeadAttention(num_heads=4, num_kv_heads=2, attention_impl="blockwise")
    params = xla.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(flash.apply(params, x, causal=True), xla.apply(params, x, causal=True),
                               rtol=0, atol=tolerance(np.asarray(xla.apply(params, x, causal=True)), 9))
    _, sown = flash.apply(params, x, causal=True, mutable=["intermediates"])
    _, sown_xla = xla.apply(params, x, causal=True, mutable=["intermediates"])
    np.testing.assert_array_equal(sown["intermediates"]["attention_weights"][0],
                                  sown_xla["intermediates"]["attention_weights"][0])
    out, cache = flash.apply(params, x, causal=True, mutable=["cache"])
    want, want_cache = xla.apply(params, x, causal=True, mutable=["cache"])
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(cache["cache"]["key"], want_cache["cache"]["key"])
    dropping = MultiHeadAttention(num_heads=4, num_kv_heads=2, dropout_rate=0.1, attention_impl="blockwise")
    with pytest.raises(ValueError, match="no attention dropout"):
        dropping.apply(params, x, causal=True, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})


def test_block_config_refuses_what_blockwise_cannot_do():
    from models.layers.blocks import BlockConfig
    from models.layers.mla import MLAConfig
    from models.layers.positional import RopeConfig

    with pytest.raises(ValueError, match="expected one of"):
        BlockConfig(d_model=16, num_heads=4, d_ff=32, attention_impl="flash")
    with pytest.raises(ValueError, match="attention_dropout_rate=0"):
        BlockConfig(d_model=16, num_heads=4, d_ff=32, attention_dropout_rate=0.1, attention_impl="blockwise")
    with pytest.raises(ValueError, match="latent attention"):
        BlockConfig(d_model=16, num_heads=4, d_ff=32, rope=RopeConfig(), attention_impl="blockwise",
                    mla=MLAConfig(q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4))


def test_attend_dispatches_and_refuses_what_an_impl_cannot_do():
    from models.layers.attention import attend

    q, k, v, _ = inputs(2, 9, 9)
    np.testing.assert_array_equal(attend(q, k, v, impl="xla", causal=True),
                                  dot_product_attention(q, k, v, causal=True))
    np.testing.assert_array_equal(attend(q, k, v, impl="blockwise", causal=True),
                                  flash_attention(q, k, v, causal=True))
    with pytest.raises(ValueError, match="expected one of"):
        attend(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="no attention dropout or returned weights"):
        attend(q, k, v, impl="blockwise", return_weights=True)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="attention impl='cudnn' needs a GPU"):
            attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), impl="cudnn")
    else:
        with pytest.raises(ValueError, match="takes bfloat16 or float16"):
            attend(q, k, v, impl="cudnn")


@pytest.mark.parametrize("name", ("causal_gqa", "padding"))
def test_cudnn_path_masks_like_the_reference(monkeypatch, name):
    """The cudnn impl's own work (plain causal as cuDNN's causal mode, other masks combined
    into one boolean mask, rows with no valid key zeroed), checked off-GPU by running
    `jax.nn.dot_product_attention`'s XLA implementation in cuDNN's place; bf16 inputs, as
    cuDNN requires, within the bf16 tolerance of `test_bfloat16_inputs`."""
    from models.layers import attention

    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation, **k: fused(*a, **k))
    kv_heads, t, s, masks, _ = _case(name)
    q, k, v, _ = inputs(kv_heads, t, s, dtype=jnp.bfloat16)
    exact = np.asarray(dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), **masks))
    got = np.asarray(attention.attend(q, k, v, impl="cudnn", **masks), np.float32)
    np.testing.assert_allclose(got, exact, rtol=0, atol=4 * EPS_BF16 * np.abs(exact).max())
    if name == "padding":
        assert not got[1].any()
    with pytest.raises(ValueError, match="takes bfloat16 or float16 inputs, got float32"):
        attention.attend(q.astype(jnp.float32), k, v, impl="cudnn", **masks)
