"""models/layers/mla.py against transformers' `DeepseekV3Attention` (torch, float64, eager),
and invariants: causality by gradient, packed-segment isolation, the latent cache's size
and content.

Axis letters: B batch, T length, D model width, N heads, L query latent, C KV latent,
P nope head dim, R rope head dim, H value head dim.

Measured max errors are printed (run with `-s`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

from models.layers.mla import MultiHeadLatentAttention, mla_softmax_scale
from models.layers.positional import RopeConfig, rope_config_from_hf

B, T, D, N, C, P, R, H = 2, 7, 64, 4, 16, 8, 4, 8
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.8, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}


def _hf_config(q_lora_rank, rope_parameters, interleave, bias=False):
    config = transformers.DeepseekV3Config(
        hidden_size=D, num_attention_heads=N, num_key_value_heads=N, q_lora_rank=q_lora_rank,
        kv_lora_rank=C, qk_nope_head_dim=P, qk_rope_head_dim=R, v_head_dim=H,
        max_position_embeddings=128, rope_parameters=dict(rope_parameters), rope_interleave=interleave,
        attention_bias=bias, num_hidden_layers=1,
    )
    config._attn_implementation = "eager"
    return config


def _ours(hf_config) -> MultiHeadLatentAttention:
    rope = dataclasses.replace(rope_config_from_hf(hf_config.to_dict(), R), interleaved=hf_config.rope_interleave)
    return MultiHeadLatentAttention(
        num_heads=N, q_lora_rank=hf_config.q_lora_rank, kv_lora_rank=C, qk_nope_head_dim=P,
        qk_rope_head_dim=R, v_head_dim=H, rope=rope, use_bias=hf_config.attention_bias,
    )


def _hf_attention(hf_config, seed):
    torch.manual_seed(seed)
    attn = hf_ds.DeepseekV3Attention(hf_config, layer_idx=0).double().eval()
    with torch.no_grad():
        for p in attn.parameters():  # random weights, norm scales moved off 1, biases off 0
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.15) + (1.0 if p.ndim == 1 else 0.0))
    return attn


def _params_from_hf(attn, hf_config) -> dict:
    """torch Linear weights [out, in] -> our per-head kernels."""
    w = {k: v.detach().numpy().astype(np.float32) for k, v in attn.state_dict().items()}
    Q = P + R
    p = {"latent_kv": {"kv_down": w["kv_a_proj_with_mqa.weight"][:C].T,
                       "key_rope": w["kv_a_proj_with_mqa.weight"][C:].T,
                       "kv_norm": w["kv_a_layernorm.weight"]}}
    if hf_config.q_lora_rank is None:
        p["query"] = w["q_proj.weight"].T.reshape(D, N, Q)
    else:
        p["query_down"] = w["q_a_proj.weight"].T
        p["query_norm"] = w["q_a_layernorm.weight"]
        p["query_up"] = w["q_b_proj.weight"].T.reshape(hf_config.q_lora_rank, N, Q)
    kv_up = w["kv_b_proj.weight"].T.reshape(C, N, P + H)
    p["key_up"], p["value_up"] = kv_up[..., :P], kv_up[..., P:]
    p["out"] = w["o_proj.weight"].T.reshape(N, H, D)
    if hf_config.attention_bias:
        if hf_config.q_lora_rank is not None:  # HF's plain q_proj has no bias
            p["query_down_bias"] = w["q_a_proj.bias"]
        p["latent_kv"]["kv_down_bias"] = w["kv_a_proj_with_mqa.bias"][:C]
        p["latent_kv"]["key_rope_bias"] = w["kv_a_proj_with_mqa.bias"][C:]
        p["out_bias"] = w["o_proj.bias"]
    return {"params": p}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D))
    positions = np.stack([np.arange(T), np.arange(T) + 5])  # row 1 starts at an offset
    return x, positions


def _hf_forward(attn, hf_config, x, positions):
    rotary = hf_ds.DeepseekV3RotaryEmbedding(hf_config)
    x_t = torch.from_numpy(x)
    cos, sin = rotary(x_t, torch.from_numpy(positions))
    # The additive float mask eager attention expects: [B, 1, T, S], dtype-min above the diagonal.
    causal = torch.full((T, T), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)
    with torch.no_grad():
        out, _ = attn(x_t, position_embeddings=(cos, sin), attention_mask=causal[None, None].expand(B, 1, T, T))
    return out.numpy()


CASES = [
    ("q_lora_default_interleave", 24, DEFAULT, True, False),
    ("plain_q_default_rotate_half", None, DEFAULT, False, False),
    ("q_lora_yarn_interleave", 24, YARN, True, False),
    ("plain_q_yarn_interleave_bias", None, YARN, True, True),
    ("q_lora_yarn_rotate_half_bias", 24, YARN, False, True),
]


@pytest.mark.parametrize("label,q_lora_rank,rope_parameters,interleave,bias", CASES, ids=[c[0] for c in CASES])
def test_matches_hf_deepseek_v3_attention_torch(label, q_lora_rank, rope_parameters, interleave, bias):
    hf_config = _hf_config(q_lora_rank, rope_parameters, interleave, bias)
    attn = _hf_attention(hf_config, seed=len(label))
    mla = _ours(hf_config)
    params = _params_from_hf(attn, hf_config)
    # The converted tree must be exactly the tree init builds.
    shapes = nn.unbox(jax.eval_shape(mla.init, jax.random.key(0), jnp.zeros((B, T, D))))
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(np.shape, params)

    x, positions = _inputs(seed=1)
    want = _hf_forward(attn, hf_config, x, positions)
    got = np.asarray(mla.apply(params, jnp.asarray(x, jnp.float32), q_positions=jnp.asarray(positions)))
    rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"\n[max-rel-err] {label}: {rel:.3g}")
    assert rel < 1e-4


def test_yarn_softmax_scale_is_hf_scaling():
    for params in (DEFAULT, YARN):
        hf_config = _hf_config(24, params, True)
        want = hf_ds.DeepseekV3Attention(hf_config, layer_idx=0).scaling
        assert mla_softmax_scale(P + R, _ours(hf_config).rope) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("interleave", [True, False])
def test_latent_kv_is_hf_cache_content_torch(interleave):
    """latent_kv gives C + R numbers per token: HF's normalised kv latent and rotated k_rot."""
    hf_config = _hf_config(24, YARN, interleave)
    attn = _hf_attention(hf_config, seed=7)
    mla = _ours(hf_config)
    params = _params_from_hf(attn, hf_config)
    x, positions = _inputs(seed=2)
    c, k_rope = mla.apply(params, jnp.asarray(x, jnp.float32), jnp.asarray(positions),
                          method=MultiHeadLatentAttention.latent_kv)
    assert c.shape == (B, T, C) and k_rope.shape == (B, T, R)
    assert c.shape[-1] + k_rope.shape[-1] == mla.kv_lora_rank + mla.qk_rope_head_dim

    with torch.no_grad():
        x_t = torch.from_numpy(x)
        kv_nope, k_rot = torch.split(attn.kv_a_proj_with_mqa(x_t), [C, R], dim=-1)
        kv_nope = attn.kv_a_layernorm(kv_nope)
        cos, sin = hf_ds.DeepseekV3RotaryEmbedding(hf_config)(x_t, torch.from_numpy(positions))
        k_rot = k_rot[:, None]  # [B, 1, T, R], HF's single-head layout
        rotate = hf_ds.apply_rotary_pos_emb_interleave if interleave else hf_ds.apply_rotary_pos_emb
        _, k_rot = rotate(k_rot, k_rot, cos, sin)
    want_k = k_rot[:, 0].numpy()
    got_k = np.asarray(k_rope)
    if interleave:  # HF writes the rotated pairs de-interleaved: evens, then odds
        got_k = np.concatenate([got_k[..., 0::2], got_k[..., 1::2]], axis=-1)
    np.testing.assert_allclose(np.asarray(c), kv_nope.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-4, atol=1e-4)


def _random_params(module, x, seed=0):
    """N(0, 0.15^2) weights in init's tree, without compiling init's PRNG (slow on CPU)."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x))
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [(0.15 * rng.standard_normal(l.shape)).astype(np.float32) for l in leaves])


def _small_mla(q_lora_rank=24):
    return MultiHeadLatentAttention(num_heads=N, q_lora_rank=q_lora_rank, kv_lora_rank=C, qk_nope_head_dim=P,
                                    qk_rope_head_dim=R, v_head_dim=H, rope=RopeConfig(interleaved=True))


def test_causality_by_gradient():
    mla = _small_mla()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, T, D)), jnp.float32)
    params = _random_params(mla, x, seed=0)
    jac = jax.jit(jax.jacrev(lambda x_: mla.apply(params, x_)[0]))(x)  # [T, D, 1, T, D]
    dep_TT = np.asarray(jnp.abs(jac[:, :, 0]).sum(axis=(1, 3)))  # output t vs input s
    assert np.all(np.triu(dep_TT, 1) == 0), "an output depends on a later input"
    assert np.all(dep_TT[np.tril_indices(T)] > 0), "an output ignores an earlier input"


def test_packed_segments_equal_separate_rows():
    """Two documents packed in one row (positions restarting) == each on its own row.

    One batch, one compile: row 0 packs a (3 tokens) and b (4); rows 1 and 2 hold a and b
    alone, followed by unrelated tokens that causality keeps out of their outputs.
    """
    mla = _small_mla(q_lora_rank=None)
    x = np.random.default_rng(4).standard_normal((3, T, D)).astype(np.float32)
    x[1, :3], x[2, :4] = x[0, :3], x[0, 3:]
    seg = np.array([[1, 1, 1, 2, 2, 2, 2]] + 2 * [[1] * T])
    pos = np.array([[0, 1, 2, 0, 1, 2, 3]] + 2 * [list(range(T))])
    params = _random_params(mla, x, seed=1)
    out = np.asarray(mla.apply(params, x, q_positions=pos, q_segment_ids=seg, kv_segment_ids=seg))
    np.testing.assert_allclose(out[0, :3], out[1, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 3:], out[2, :4], rtol=1e-5, atol=1e-5)


def test_attending_to_cached_latents_equals_full_recompute():
    """Prefill 4 tokens into a latent cache of 7 slots, then decode 3 one by one."""
    mla = _small_mla()
    x = np.random.default_rng(5).standard_normal((B, T, D)).astype(np.float32)
    params = _random_params(mla, x, seed=2)
    full = np.asarray(mla.apply(params, x))
    c, k_rope = mla.apply(params, x, method=MultiHeadLatentAttention.latent_kv)
    cache_c, cache_k = jnp.zeros_like(c).at[:, :4].set(c[:, :4]), jnp.zeros_like(k_rope).at[:, :4].set(k_rope[:, :4])
    slots = jnp.broadcast_to(jnp.arange(T), (B, T))
    got = [mla.apply(params, x[:, :4], kv_latent=(cache_c, cache_k), kv_positions=slots,
                     kv_mask=slots < 4)]

    @jax.jit
    def decode(cache_c, cache_k, x_t, t):
        pos = jnp.full((B, 1), t)
        c_t, k_t = mla.apply(params, x_t, pos, method=MultiHeadLatentAttention.latent_kv)
        cache_c, cache_k = cache_c.at[:, t].set(c_t[:, 0]), cache_k.at[:, t].set(k_t[:, 0])
        out = mla.apply(params, x_t, q_positions=pos, kv_latent=(cache_c, cache_k), kv_positions=slots,
                        kv_mask=slots <= t)
        return cache_c, cache_k, out

    for t in range(4, T):
        cache_c, cache_k, out = decode(cache_c, cache_k, x[:, t:t + 1], t)
        got.append(out)
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=1e-5, atol=1e-5)
    # init on the cached path builds the same tree as init on the plain path.
    cached_init = nn.unbox(jax.eval_shape(
        lambda: mla.init(jax.random.key(0), x[:, :1], q_positions=jnp.zeros((B, 1), int),
                         kv_latent=(cache_c, cache_k), kv_positions=slots)))
    assert jax.tree.map(jnp.shape, cached_init) == jax.tree.map(np.shape, params)


def test_deepseek_v3_full_size_shapes():
    """DeepSeek-V3's attention (D 7168, N 128, L 1536, C 512, P 128, R 64, H 128), shape-only."""
    mla = MultiHeadLatentAttention(num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                   qk_rope_head_dim=64, v_head_dim=128,
                                   rope=RopeConfig(interleaved=True, scaling="yarn", factor=40.0,
                                                   original_max_len=4096, mscale=1.0, mscale_all_dim=1.0))
    x = jax.ShapeDtypeStruct((1, 8, 7168), jnp.bfloat16)
    boxed = jax.eval_shape(mla.init, jax.random.key(0), x)
    shapes = jax.tree.map(jnp.shape, nn.unbox(boxed))["params"]
    assert shapes["query_up"] == (1536, 128, 192) and shapes["key_up"] == (512, 128, 128)
    assert shapes["latent_kv"]["kv_down"] == (7168, 512) and shapes["latent_kv"]["key_rope"] == (7168, 64)
    assert shapes["out"] == (128, 128, 7168)
    n = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))
    assert n == 187_107_328  # HF DeepseekV3Attention's parameter count for this config
    axes = nn.get_partition_spec(boxed)["params"]
    assert tuple(axes["latent_kv"]["kv_norm"]) == ("kv_lora",)
    assert tuple(axes["query_up"]) == ("q_lora", "heads", "head_dim")
    c, k = jax.eval_shape(lambda p: mla.apply(p, jnp.zeros((1, 8, 7168), jnp.bfloat16),
                                              method=MultiHeadLatentAttention.latent_kv), nn.unbox(boxed))
    assert c.shape[-1] + k.shape[-1] == 576
