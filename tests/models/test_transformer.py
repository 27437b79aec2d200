"""The encoder-decoder Transformer against torch.nn.Transformer, plus its invariants."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import transformer as transformer_configs
from models.layers.blocks import BlockConfig
from models.transformer import Transformer, TransformerConfig

D, HEADS, FF, VOCAB, PAD = 32, 4, 64, 50, 0


def _config(**overrides) -> TransformerConfig:
    block = dict(d_model=D, num_heads=HEADS, d_ff=FF, dropout_rate=0.0, norm_eps=1e-5)
    block.update(overrides.pop("block", {}))
    kw = dict(vocab_size=VOCAB, num_encoder_layers=2, num_decoder_layers=2, max_len=16, final_norm=True)
    kw.update(overrides)
    return TransformerConfig(block=BlockConfig(**block), **kw)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, VOCAB, size=(3, 7))
    tgt = rng.integers(1, VOCAB, size=(3, 5))
    src[0, 5:] = PAD  # padded sources
    src[2, 3:] = PAD
    return jnp.asarray(src, jnp.int32), jnp.asarray(tgt, jnp.int32)


def _init(cfg, src, tgt, seed=0):
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), src, tgt)["params"])


class TorchReference(torch.nn.Module):
    """Embedding * sqrt(D) + sinusoidal PE -> torch.nn.Transformer -> tied output projection."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        b = cfg.block
        self.d_model = b.d_model
        self.embed = torch.nn.Embedding(cfg.vocab_size, b.d_model)
        self.core = torch.nn.Transformer(
            d_model=b.d_model, nhead=b.num_heads, num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_decoder_layers, dim_feedforward=b.d_ff, dropout=0.0,
            activation="relu", batch_first=True, norm_first=(b.norm_position == "pre"), layer_norm_eps=b.norm_eps,
        )
        pos = np.arange(cfg.max_len)[:, None]
        div = np.exp(np.arange(0, b.d_model, 2) * (-math.log(10000.0) / b.d_model))
        pe = np.zeros((cfg.max_len, b.d_model))
        pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
        self.register_buffer("pe", torch.tensor(pe, dtype=torch.float32))

    def forward(self, src, tgt):
        def emb(ids):
            return self.embed(ids) * math.sqrt(self.d_model) + self.pe[: ids.shape[1]]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        pad = src == PAD
        out = self.core(emb(src), emb(tgt), tgt_mask=causal, src_key_padding_mask=pad,
                        memory_key_padding_mask=pad, tgt_is_causal=True)
        return out @ self.embed.weight.T


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def _copy_attention(torch_mha, p):
    D_ = p["query"].shape[0]
    w = [np.asarray(p[k]).reshape(D_, -1).T for k in ("query", "key", "value")]
    b = [np.asarray(p[k + "_bias"]).reshape(-1) for k in ("query", "key", "value")]
    torch_mha.in_proj_weight.copy_(_t(np.concatenate(w, 0)))
    torch_mha.in_proj_bias.copy_(_t(np.concatenate(b, 0)))
    torch_mha.out_proj.weight.copy_(_t(np.asarray(p["out"]).reshape(-1, D_).T))
    torch_mha.out_proj.bias.copy_(_t(p["out_bias"]))


def _copy_norm(torch_norm, p):
    torch_norm.weight.copy_(_t(p["scale"]))
    torch_norm.bias.copy_(_t(p["bias"]))


def _copy_mlp(layer, p):
    layer.linear1.weight.copy_(_t(np.asarray(p["wi"]).T))
    layer.linear1.bias.copy_(_t(p["wi_bias"]))
    layer.linear2.weight.copy_(_t(np.asarray(p["wo"]).T))
    layer.linear2.bias.copy_(_t(p["wo_bias"]))


def copy_to_torch(ref: TorchReference, params, cfg: TransformerConfig):
    with torch.no_grad():
        ref.embed.weight.copy_(_t(params["embed"]["embedding"]))
        for i, layer in enumerate(ref.core.encoder.layers):
            p = params[f"encoder_{i}"]
            _copy_attention(layer.self_attn, p["self_attention"])
            _copy_mlp(layer, p["mlp"])
            _copy_norm(layer.norm1, p["attention_block"]["norm"])
            _copy_norm(layer.norm2, p["mlp_block"]["norm"])
        for i, layer in enumerate(ref.core.decoder.layers):
            p = params[f"decoder_{i}"]
            _copy_attention(layer.self_attn, p["self_attention"])
            _copy_attention(layer.multihead_attn, p["cross_attention"])
            _copy_mlp(layer, p["mlp"])
            _copy_norm(layer.norm1, p["self_attention_block"]["norm"])
            _copy_norm(layer.norm2, p["cross_attention_block"]["norm"])
            _copy_norm(layer.norm3, p["mlp_block"]["norm"])
        _copy_norm(ref.core.encoder.norm, params["encoder_norm"])
        _copy_norm(ref.core.decoder.norm, params["decoder_norm"])


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_matches_torch_nn_transformer(norm_position):
    """The whole model (embeddings, both stacks, masks, tied projection) equals torch's."""
    cfg = _config(block=dict(norm_position=norm_position))
    src, tgt = _batch()
    params = _init(cfg, src, tgt)
    ours = np.asarray(Transformer(cfg).apply({"params": params}, src, tgt))

    ref = TorchReference(cfg).eval()
    copy_to_torch(ref, params, cfg)
    with torch.no_grad():
        theirs = ref(torch.tensor(np.asarray(src)), torch.tensor(np.asarray(tgt))).numpy()
    err = np.max(np.abs(ours - theirs))
    rel = err / np.max(np.abs(theirs))
    print(f"torch.nn.Transformer parity ({norm_position}-LN): max abs err {err:.2e}, relative {rel:.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_torch_parity_would_catch_a_wrong_weight():
    """The parity check is sensitive: one transposed FFN weight breaks it."""
    cfg = _config()
    src, tgt = _batch()
    params = _init(cfg, src, tgt)
    ref = TorchReference(cfg).eval()
    copy_to_torch(ref, params, cfg)
    with torch.no_grad():
        w = ref.core.decoder.layers[1].linear2.weight
        w.copy_(w.flip(0))
        theirs = ref(torch.tensor(np.asarray(src)), torch.tensor(np.asarray(tgt))).numpy()
    ours = np.asarray(Transformer(cfg).apply({"params": params}, src, tgt))
    assert np.max(np.abs(ours - theirs)) > 1e-3


def test_padding_in_source_does_not_change_outputs():
    """Extra padding at the end of the source leaves the logits unchanged."""
    cfg = _config()
    src, tgt = _batch()
    params = _init(cfg, src, tgt)
    model = Transformer(cfg)
    padded = jnp.pad(src, ((0, 0), (0, 4)), constant_values=PAD)
    np.testing.assert_allclose(model.apply({"params": params}, src, tgt),
                               model.apply({"params": params}, padded, tgt), atol=1e-5)


def test_decoder_is_causal():
    """Changing the target token at position t changes logits at >= t only.

    (Causality by gradient is tested layer by layer in tests/models/layers.)
    """
    cfg = _config()
    src, tgt = _batch()
    params = _init(cfg, src, tgt)
    model = Transformer(cfg)
    base = model.apply({"params": params}, src, tgt)
    for t in range(tgt.shape[1]):
        changed = tgt.at[:, t].set((tgt[:, t] % (VOCAB - 1)) + 1)
        out = model.apply({"params": params}, src, changed)
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert np.max(np.abs(out[:, t:] - base[:, t:])) > 1e-4


def test_num_params_matches_init():
    for cfg in [_config(), _config(share_embeddings=False, positional="learned"),
                _config(block=dict(mlp_activation="swiglu", num_kv_heads=2, norm="rmsnorm", use_bias=False))]:
        src, tgt = _batch()
        params = _init(cfg, src, tgt)
        assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == cfg.num_params()


def test_flops_per_token_matches_compiled_cost():
    """Our analytic forward FLOPs agree with XLA's count for the compiled forward pass."""
    # Wide enough that matmuls dominate, as in any real model.
    cfg = _config(vocab_size=256, block=dict(d_model=128, d_ff=512))
    src = jnp.ones((4, 12), jnp.int32)
    tgt = jnp.ones((4, 10), jnp.int32)
    params = _init(cfg, src, tgt)
    compiled = jax.jit(lambda p, s, t: Transformer(cfg).apply({"params": p}, s, t)).lower(params, src, tgt).compile()
    xla_flops = compiled.cost_analysis()["flops"]
    ours = cfg.flops_per_token(12, 10) * tgt.size
    # XLA also counts softmax, norms and elementwise work, a few percent at this width.
    assert 0.95 * xla_flops <= ours <= 1.0 * xla_flops, (ours, xla_flops)


def test_remat_gives_same_outputs_and_gradients():
    cfg = _config()
    cfg_remat = _config(remat=True)
    src, tgt = _batch()
    params = _init(cfg, src, tgt)

    def loss(p, c):
        return jnp.mean(Transformer(c).apply({"params": p}, src, tgt) ** 2)

    np.testing.assert_allclose(loss(params, cfg), loss(params, cfg_remat), rtol=1e-6)
    g1, g2 = jax.grad(loss)(params, cfg), jax.grad(loss)(params, cfg_remat)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_dropout_only_in_training():
    cfg = _config(block=dict(dropout_rate=0.3))
    src, tgt = _batch()
    params = _init(cfg, src, tgt)
    model = Transformer(cfg)
    eval_a = model.apply({"params": params}, src, tgt)
    eval_b = model.apply({"params": params}, src, tgt, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(eval_a, eval_b)
    train = lambda k: model.apply({"params": params}, src, tgt, deterministic=False, rngs={"dropout": jax.random.key(k)})
    assert np.max(np.abs(train(1) - eval_a)) > 1e-3
    np.testing.assert_array_equal(train(2), train(2))


def test_every_param_has_logical_axes():
    cfg = _config(positional="learned", share_embeddings=False)
    src, tgt = _batch()
    boxed = Transformer(cfg).init(jax.random.key(0), src, tgt)["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim


@pytest.mark.parametrize("preset,expected_millions", [("base", 63.1), ("big", 214.2)])
def test_paper_presets_shape_only(preset, expected_millions):
    """base/big build and count their parameters without allocating them (jax.eval_shape)."""
    cfg = transformer_configs.model_config(transformer_configs.get_config(preset))
    src = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    shapes = jax.eval_shape(lambda s, t: Transformer(cfg).init(jax.random.key(0), s, t), src, src)
    count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(shapes["params"])))
    assert count == cfg.num_params()
    assert abs(count / 1e6 - expected_millions) < 0.1
    assert cfg.block.norm_position == "post" and cfg.positional == "sinusoidal" and cfg.share_embeddings


def test_bad_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        BlockConfig(d_model=32, num_heads=4, num_kv_heads=3, d_ff=64)
    with pytest.raises(ValueError, match="positional"):
        _config(positional="alibi")
    with pytest.raises(ValueError, match="unknown transformer preset"):
        transformer_configs.get_config("huge")
