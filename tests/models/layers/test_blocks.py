"""models/layers/blocks.py against torch.nn.TransformerEncoderLayer / TransformerDecoderLayer
(post-LN and pre-LN, weights copied), a float64 NumPy composition of a Llama-style block
(RMSNorm, SwiGLU, GQA, RoPE), and invariants: causality by gradient, segment isolation
through cross-attention, dropout determinism, logical axis names, parameter counts.

Axis letters: B batch, T target length, S source length, D model width, N heads,
K kv heads, H head dim, F hidden width.

Measured max abs errors are printed (run with `-s`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch


from models.layers.blocks import BlockConfig, DecoderLayer, EncoderLayer
from models.layers.positional import RopeConfig

B, T, S, D, N, FF = 2, 6, 5, 16, 4, 24
AXIS_NAMES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", None}


def _record(label, got, want):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    print(f"\n[max-abs-err] {label}: {err:.3g}")
    return err


def _random_params(module, *args, seed=0):
    """Every parameter random (biases too); norm scales around 1."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        return ((1.0 + 0.2 * noise) if is_scale else 0.3 * noise).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    memory = rng.standard_normal((B, S, D)).astype(np.float32)
    return x, memory


def _jit_apply(module, deterministic=True):
    return jax.jit(functools.partial(module.apply, deterministic=deterministic))


# --- torch weight copies --------------------------------------------------------------


def _t(a):
    return torch.from_numpy(np.asarray(a, np.float64))


def _copy_mha(mha, p):
    Dm, Nh, Hd = p["query"].shape
    mha.in_proj_weight.copy_(torch.cat([_t(p[n]).reshape(Dm, Nh * Hd).T for n in ("query", "key", "value")]))
    mha.in_proj_bias.copy_(torch.cat([_t(p[n + "_bias"]).reshape(-1) for n in ("query", "key", "value")]))
    mha.out_proj.weight.copy_(_t(p["out"]).reshape(Nh * Hd, Dm).T)
    mha.out_proj.bias.copy_(_t(p["out_bias"]))


def _copy_norm(norm, p):
    norm.weight.copy_(_t(p["scale"]))
    norm.bias.copy_(_t(p["bias"]))


def _copy_mlp(layer, p):
    layer.linear1.weight.copy_(_t(p["wi"]).T)
    layer.linear1.bias.copy_(_t(p["wi_bias"]))
    layer.linear2.weight.copy_(_t(p["wo"]).T)
    layer.linear2.bias.copy_(_t(p["wo_bias"]))


def _causal_torch_mask(n):
    return torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)  # True = may NOT attend


# --- agreement with torch.nn.Transformer*Layer ----------------------------------------


@pytest.mark.parametrize("norm_position,causal,activation", [
    ("post", False, "relu"), ("post", True, "gelu"), ("pre", False, "gelu"), ("pre", True, "relu")])
def test_encoder_layer_matches_torch(norm_position, causal, activation):
    cfg = BlockConfig(d_model=D, num_heads=N, d_ff=FF, norm_position=norm_position, mlp_activation=activation,
                      dropout_rate=0.0)
    layer = EncoderLayer(cfg, causal=causal)
    x, _ = _inputs(seed=1)
    padding = np.ones((B, T), bool)
    padding[1, -2:] = False
    params = _random_params(layer, x, seed=2)
    out = _jit_apply(layer)(params, x, padding_mask=jnp.asarray(padding))

    ref = torch.nn.TransformerEncoderLayer(D, N, dim_feedforward=FF, dropout=0.0, activation=activation,
                                           layer_norm_eps=cfg.norm_eps, batch_first=True,
                                           norm_first=norm_position == "pre", dtype=torch.float64)
    p = params["params"]
    with torch.no_grad():
        _copy_mha(ref.self_attn, p["self_attention"])
        _copy_norm(ref.norm1, p["attention_block"]["norm"])
        _copy_norm(ref.norm2, p["mlp_block"]["norm"])
        _copy_mlp(ref, p["mlp"])
    ref.eval()
    # Parameters that require grad keep torch on its reference (non-fused) path.
    want = ref(_t(x), src_mask=_causal_torch_mask(T) if causal else None,
               src_key_padding_mask=torch.from_numpy(~padding)).detach().numpy()
    label = f"blocks/encoder {norm_position}-LN causal={causal} {activation} vs torch TransformerEncoderLayer"
    err = _record(label, out, want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"{err:.3g}")


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_decoder_layer_matches_torch(norm_position):
    cfg = BlockConfig(d_model=D, num_heads=N, d_ff=FF, norm_position=norm_position, dropout_rate=0.0)
    layer = DecoderLayer(cfg)
    y, memory = _inputs(seed=3)
    enc_padding = np.ones((B, S), bool)
    enc_padding[0, -1] = False
    enc_padding[1, -3:] = False
    params = _random_params(layer, y, memory, seed=4)
    out = _jit_apply(layer)(params, y, memory, encoder_padding_mask=jnp.asarray(enc_padding))

    ref = torch.nn.TransformerDecoderLayer(D, N, dim_feedforward=FF, dropout=0.0, layer_norm_eps=cfg.norm_eps,
                                           batch_first=True, norm_first=norm_position == "pre",
                                           dtype=torch.float64)
    p = params["params"]
    with torch.no_grad():
        _copy_mha(ref.self_attn, p["self_attention"])
        _copy_mha(ref.multihead_attn, p["cross_attention"])
        _copy_norm(ref.norm1, p["self_attention_block"]["norm"])
        _copy_norm(ref.norm2, p["cross_attention_block"]["norm"])
        _copy_norm(ref.norm3, p["mlp_block"]["norm"])
        _copy_mlp(ref, p["mlp"])
    ref.eval()
    want = ref(_t(y), _t(memory), tgt_mask=_causal_torch_mask(T),
               memory_key_padding_mask=torch.from_numpy(~enc_padding)).detach().numpy()
    err = _record(f"blocks/decoder {norm_position}-LN vs torch TransformerDecoderLayer", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"{err:.3g}")


# --- a Llama-style block against NumPy ------------------------------------------------


def _np_rms(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def _np_rope(x, positions, theta=10000.0):
    Hd = x.shape[-1]
    freqs = positions[:, :, None] * theta ** (-np.arange(0, Hd, 2) / Hd)
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    return x * np.cos(emb) + np.concatenate([-x[..., Hd // 2:], x[..., : Hd // 2]], -1) * np.sin(emb)


def _np_llama_block(p, x, positions, norm_position, eps):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f(x)
    positions = f(positions)

    def attention(h):
        a = p["self_attention"]
        q = _np_rope(np.einsum("btd,dnh->btnh", h, f(a["query"])), positions)
        k = _np_rope(np.einsum("btd,dkh->btkh", h, f(a["key"])), positions)
        v = np.einsum("btd,dkh->btkh", h, f(a["value"]))
        G = q.shape[2] // k.shape[2]
        k, v = np.repeat(k, G, 2), np.repeat(v, G, 2)
        logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
        logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        return np.einsum("btnh,nhd->btd", np.einsum("bnts,bsnh->btnh", w, v), f(a["out"]))

    def swiglu(h):
        m = p["mlp"]
        gate = h @ f(m["wi_gate"])
        return (gate / (1.0 + np.exp(-gate)) * (h @ f(m["wi_up"]))) @ f(m["wo"])

    norm1 = lambda h: _np_rms(h, f(p["attention_block"]["norm"]["scale"]), eps)  # noqa: E731
    norm2 = lambda h: _np_rms(h, f(p["mlp_block"]["norm"]["scale"]), eps)  # noqa: E731
    if norm_position == "pre":
        h = x + attention(norm1(x))
        return h + swiglu(norm2(h))
    h = norm1(x + attention(x))
    return norm2(h + swiglu(h))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_llama_style_block_matches_numpy_float64(norm_position):
    cfg = BlockConfig(d_model=D, num_heads=N, num_kv_heads=2, d_ff=FF, mlp_activation="swiglu", norm="rmsnorm",
                      norm_position=norm_position, norm_eps=1e-6, dropout_rate=0.0, use_bias=False,
                      rope=RopeConfig())
    layer = EncoderLayer(cfg, causal=True)
    x, _ = _inputs(seed=5)
    positions = np.broadcast_to(np.arange(2, 2 + T), (B, T))
    params = _random_params(layer, x, seed=6)
    out = _jit_apply(layer)(params, x, positions=jnp.asarray(positions))
    want = _np_llama_block(params["params"], x, positions, norm_position, cfg.norm_eps)
    err = _record(f"blocks/llama-style {norm_position}-norm vs numpy64", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"{err:.3g}")


# --- causality by gradient ------------------------------------------------------------


def _dependence(fn, x_1TD):
    """dep[t, s] = max |d out[t] / d x[s]|."""
    jac = jax.jit(jax.jacrev(lambda x: fn(x)[0]))(x_1TD)  # [T, D, 1, T, D]
    return np.abs(np.asarray(jac[:, :, 0])).max(axis=(1, 3))


def _assert_causal(dep):
    later = np.triu(np.ones(dep.shape, bool), k=1)
    assert (dep[later] == 0.0).all(), dep
    assert (dep[~later] > 0.0).all(), dep  # the test can fail: the past does matter


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_causal_encoder_layer_by_gradient(norm_position):
    cfg = BlockConfig(d_model=D, num_heads=N, num_kv_heads=2, d_ff=FF, norm_position=norm_position,
                      rope=RopeConfig())
    x, _ = _inputs(seed=7)
    x = jnp.asarray(x[:1])
    causal = EncoderLayer(cfg, causal=True)
    params = _random_params(causal, x, seed=8)
    _assert_causal(_dependence(lambda x: causal.apply(params, x), x))


def test_decoder_layer_is_causal_in_its_targets():
    cfg = BlockConfig(d_model=D, num_heads=N, d_ff=FF)
    y, memory = _inputs(seed=9)
    y, memory = jnp.asarray(y[:1]), jnp.asarray(memory[:1])
    layer = DecoderLayer(cfg)
    params = _random_params(layer, y, memory, seed=10)
    _assert_causal(_dependence(lambda y: layer.apply(params, y, memory), y))


def test_decoder_cross_attention_respects_packed_pairs():
    """Two (source, target) pairs packed in one row: changing source 2 leaves target 1 unchanged."""
    cfg = BlockConfig(d_model=D, num_heads=N, d_ff=FF, norm_position="pre", dropout_rate=0.0)
    rng = np.random.default_rng(11)
    y = rng.standard_normal((1, T, D)).astype(np.float32)
    memory = rng.standard_normal((1, S, D)).astype(np.float32)
    tgt_seg, src_seg = jnp.asarray([[1, 1, 1, 2, 2, 2]]), jnp.asarray([[1, 1, 2, 2, 2]])
    layer = DecoderLayer(cfg)
    params = _random_params(layer, y, memory, seed=12)
    apply = jax.jit(lambda m: layer.apply(params, y, m, segment_ids=tgt_seg, encoder_segment_ids=src_seg))
    memory2 = memory.copy()
    memory2[0, 2:] = rng.standard_normal((3, D))
    a, b = np.asarray(apply(memory)), np.asarray(apply(memory2))
    np.testing.assert_array_equal(a[0, :3], b[0, :3])
    assert np.abs(a[0, 3:] - b[0, 3:]).min() > 0.0


# --- dropout --------------------------------------------------------------------------


def test_dropout_deterministic_flag_and_rng():
    cfg = BlockConfig(d_model=D, num_heads=N, d_ff=FF, dropout_rate=0.3, attention_dropout_rate=0.2)
    layer = EncoderLayer(cfg, causal=True)
    x, _ = _inputs(seed=13)
    params = _random_params(layer, x, seed=14)
    eval_apply, train_apply = _jit_apply(layer, True), _jit_apply(layer, False)
    rngs = lambda seed: {"dropout": jax.random.key(seed)}  # noqa: E731

    off = np.asarray(eval_apply(params, x, rngs=rngs(0)))
    np.testing.assert_array_equal(off, eval_apply(params, x, rngs=rngs(1)))
    on_a = np.asarray(train_apply(params, x, rngs=rngs(0)))
    np.testing.assert_array_equal(on_a, train_apply(params, x, rngs=rngs(0)))
    assert np.abs(on_a - np.asarray(train_apply(params, x, rngs=rngs(1)))).max() > 1e-2
    assert np.abs(on_a - off).max() > 1e-2


# --- logical axis names and parameter counts ------------------------------------------


CONFIGS = {
    "vaswani": BlockConfig(d_model=D, num_heads=N, d_ff=FF),
    "layernorm_no_bias": BlockConfig(d_model=D, num_heads=N, d_ff=FF, use_bias=False),
    "llama": BlockConfig(d_model=D, num_heads=N, num_kv_heads=2, d_ff=FF, mlp_activation="swiglu",
                         norm="rmsnorm", norm_position="pre", use_bias=False, rope=RopeConfig()),
    "mqa_bias_headdim": BlockConfig(d_model=D, num_heads=N, num_kv_heads=1, head_dim=6, d_ff=FF,
                                    mlp_activation="geglu", norm_position="pre"),
}


def _init_shapes(layer):
    x, memory = _inputs()
    args = (x, memory) if isinstance(layer, DecoderLayer) else (x,)
    return jax.eval_shape(layer.init, jax.random.key(0), *args)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_every_param_has_logical_axis_names(kind, name):
    layer = EncoderLayer(CONFIGS[name]) if kind == "encoder" else DecoderLayer(CONFIGS[name])
    boxed = _init_shapes(layer)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))
    assert leaves
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), where
        assert len(leaf.names) == leaf.value.ndim, (where, leaf.names, leaf.value.shape)
        assert set(leaf.names) <= AXIS_NAMES, (where, leaf.names)
    specs = nn.get_partition_spec(boxed)
    for (path, spec), (_, value) in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(
            s, jax.sharding.PartitionSpec)), jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))):
        assert len(spec) == value.ndim, (jax.tree_util.keystr(path), spec, value.shape)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_counts_match_config_formulas(name):
    cfg = CONFIGS[name]
    count = lambda tree: sum(int(np.prod(l.shape)) for l in jax.tree.leaves(nn.unbox(tree)))  # noqa: E731
    encoder = count(_init_shapes(EncoderLayer(cfg)))
    decoder = count(_init_shapes(DecoderLayer(cfg)))
    assert encoder == cfg.attention_params() + cfg.mlp_params() + 2 * cfg.norm_params()
    assert decoder == 2 * cfg.attention_params() + cfg.mlp_params() + 3 * cfg.norm_params()


def test_block_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        BlockConfig(d_model=D, num_heads=4, num_kv_heads=3, d_ff=FF)
    with pytest.raises(ValueError, match="head_dim"):
        BlockConfig(d_model=18, num_heads=4, d_ff=FF)
    with pytest.raises(ValueError, match="mlp_activation"):
        BlockConfig(d_model=D, num_heads=N, d_ff=FF, mlp_activation="swish")
    with pytest.raises(ValueError, match="norm="):
        BlockConfig(d_model=D, num_heads=N, d_ff=FF, norm="batchnorm")
    with pytest.raises(ValueError, match="norm_position"):
        BlockConfig(d_model=D, num_heads=N, d_ff=FF, norm_position="sandwich")
