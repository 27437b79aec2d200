"""RoPE long-context scalings in models/layers/positional.py against Hugging Face transformers
(torch, CPU): `ROPE_INIT_FUNCTIONS` for the inverse frequencies and attention factor, and
`LlamaRotaryEmbedding` + `apply_rotary_pos_emb` for the rotated queries and keys. Our RopeConfig
is built from the same transformers config by `rope_config_from_hf`, so the mapping is checked too.

Axis letters: B batch, T length, N heads, H head dim.

Measured max errors are printed (run with `-s`).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama

from models.layers.positional import RopeConfig, apply_rope, rope_config_from_hf, rope_frequencies

B, N, H = 2, 3, 32
MAX_POS = 512  # the HF config's max_position_embeddings

# (label, rope_parameters, partial_rotary_factor). With H=32 and theta=1e4 the wavelengths run
# from 6 to ~1.8e4, so llama3's three bands and YaRN's ramp each hold several dims.
CASES = [
    ("linear", {"rope_type": "linear", "factor": 4.0}, 1.0),
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}, 1.0),
    ("llama3-partial", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                        "original_max_position_embeddings": 128}, 0.5),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 1.0),
    ("yarn-betas-notrunc", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                            "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}, 1.0),
    ("yarn-mscale", {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                     "mscale": 1.0, "mscale_all_dim": 0.5}, 1.0),
    ("yarn-attention-factor", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                               "attention_factor": 1.25}, 1.0),
    ("yarn-no-factor", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64}, 1.0),
    ("yarn-partial", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 0.5),
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0}, 1.0),
    ("dynamic-partial", {"rope_type": "dynamic", "factor": 3.0}, 0.5),
]
FULL_ROTARY = [c for c in CASES if c[2] == 1.0]


def _hf_config(rope_parameters, partial_rotary_factor=1.0, theta=10000.0):
    kwargs = {} if partial_rotary_factor == 1.0 else {"partial_rotary_factor": partial_rotary_factor}
    return transformers.LlamaConfig(
        hidden_size=N * H, num_attention_heads=N, num_key_value_heads=N, head_dim=H,
        max_position_embeddings=MAX_POS, rope_parameters={**rope_parameters, "rope_theta": theta}, **kwargs)


def _ours(hf_config):
    return rope_config_from_hf(hf_config.to_dict(), H)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / np.abs(want)))


@pytest.mark.parametrize("seq_len", [None, 2000])
@pytest.mark.parametrize("label,params,partial", CASES, ids=[c[0] for c in CASES])
def test_hf_inv_freq_and_attention_factor(label, params, partial, seq_len):
    hf_config = _hf_config(params, partial)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, device=None, seq_len=seq_len)
    got_inv, got_factor = rope_frequencies(_ours(hf_config), H, seq_len=seq_len)
    err = _rel_err(got_inv, want_inv.numpy())
    print(f"\n[max-rel-err] inv_freq {label} seq_len={seq_len}: {err:.3g}")
    assert got_inv.shape == tuple(want_inv.shape)
    assert err < 1e-6
    assert got_factor == pytest.approx(float(want_factor), rel=1e-6)


def test_hf_scalings_do_scale():
    """Guards the comparisons above against a vacuous pass: each kind differs from no scaling."""
    base, _ = rope_frequencies(RopeConfig(), H)
    for label, params, partial in FULL_ROTARY:
        got, factor = rope_frequencies(_ours(_hf_config(params, partial)), H, seq_len=2000)
        assert np.max(np.abs(got / base - 1)) > 0.1 or factor != 1.0, label
    yarn, factor = rope_frequencies(_ours(_hf_config(CASES[3][1])), H)
    assert factor == pytest.approx(0.1 * np.log(4.0) + 1)
    assert yarn[0] == base[0] and yarn[-1] == pytest.approx(base[-1] / 4)  # fast dims kept, slow interpolated


def _hf_rotate(hf_config, q, k, positions):
    rotary = modeling_llama.LlamaRotaryEmbedding(hf_config)
    pos = torch.from_numpy(positions)
    cos, sin = rotary(torch.from_numpy(q), pos)
    q_out, k_out = modeling_llama.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin,
                                                       unsqueeze_dim=2)  # [B, T, N, H] layout
    return q_out.numpy(), k_out.numpy()


@pytest.mark.parametrize("T", [200, 1500])
@pytest.mark.parametrize("label,params,partial", FULL_ROTARY, ids=[c[0] for c in FULL_ROTARY])
def test_hf_apply_rope_matches_apply_rotary_pos_emb(label, params, partial, T):
    """A prefill of positions 0..T-1: T=200 is inside MAX_POS, T=1500 beyond it (dynamic grows)."""
    hf_config = _hf_config(params, partial)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, T, N, H)).astype(np.float32)
    positions = np.broadcast_to(np.arange(T), (B, T)).copy()
    want_q, want_k = _hf_rotate(hf_config, q, k, positions)
    config = _ours(hf_config)
    got_q = np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(positions), config))
    got_k = np.asarray(apply_rope(jnp.asarray(k), jnp.asarray(positions), config))
    err = max(float(np.max(np.abs(got_q - want_q))), float(np.max(np.abs(got_k - want_k))))
    print(f"\n[max-abs-err] apply_rope {label} T={T}: {err:.3g}")
    # Both sides form angles of up to T rad in float32 (HF's dynamic path even raises its base
    # to a power in float32), so a few ulps of the largest angle, times the largest |x|, is the floor.
    tol = 4 * np.finfo(np.float32).eps * T * max(np.max(np.abs(q)), np.max(np.abs(k)))
    assert err < tol


def test_hf_dynamic_below_original_len_changes_nothing():
    config = _ours(_hf_config({"rope_type": "dynamic", "factor": 2.0}))
    assert config.original_max_len == MAX_POS
    plain = RopeConfig(theta=config.theta)
    for seq_len in (None, 1, MAX_POS):
        np.testing.assert_array_equal(rope_frequencies(config, H, seq_len=seq_len)[0], rope_frequencies(plain, H)[0])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 64, N, H)), jnp.float32)
    pos = jnp.arange(64)[None]
    np.testing.assert_array_equal(np.asarray(apply_rope(x, pos, config)), np.asarray(apply_rope(x, pos, plain)))
    # Above it the base grows, so every frequency but the first (theta^0) falls.
    longer, _ = rope_frequencies(config, H, seq_len=4 * MAX_POS)
    assert longer[0] == 1.0 and np.all(longer[1:] < rope_frequencies(plain, H)[0][1:])


def test_hf_from_legacy_rope_scaling_dict():
    """A raw config.json in the pre-5.0 layout: `rope_scaling` with `type`, top-level rope_theta."""
    raw = {"rope_theta": 500000.0, "max_position_embeddings": 131072, "partial_rotary_factor": 0.5,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    config = rope_config_from_hf(raw, 64)
    assert config == RopeConfig(theta=500000.0, fraction=0.5, scaling="llama3", factor=8.0, original_max_len=8192,
                                low_freq_factor=1.0, high_freq_factor=4.0)
    assert rope_config_from_hf({"rope_theta": 1e6}, 64) == RopeConfig(theta=1e6)
    # DeepSeek-V3's rope_scaling: factor 40, mscale == mscale_all_dim, so the attention factor is 1.
    ds = rope_config_from_hf({"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, 64)
    assert rope_frequencies(ds, 64)[1] == 1.0
    dyn = rope_config_from_hf({"rope_type": "dynamic", "factor": 2.0}, 64, max_position_embeddings=4096)
    assert dyn.original_max_len == 4096


@pytest.mark.parametrize("kwargs,field", [
    ({"scaling": "ntk"}, "unknown RoPE scaling 'ntk'"),
    ({"scaling": "linear", "factor": 0.5}, "RopeConfig.factor"),
    ({"scaling": "yarn", "factor": 4.0, "original_max_len": 0}, "RopeConfig.original_max_len"),
    ({"scaling": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}, "high_freq_factor"),
    ({"scaling": "yarn", "factor": 4.0, "beta_slow": -1.0}, "RopeConfig.beta_slow"),
    ({"scaling": "yarn", "factor": 4.0, "attention_factor": 0.0}, "RopeConfig.attention_factor"),
    ({"scaling": "dynamic", "factor": 2.0, "fraction": 2 / H}, "more than 2 rotated dims"),
])
def test_hf_bad_scaling_settings_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        rope_frequencies(RopeConfig(**kwargs), H)


@pytest.mark.parametrize("hf,kwargs,field", [
    ({"rope_type": "longrope", "factor": 2.0}, {}, "rope_type 'longrope'"),
    ({"rope_type": "default", "mrope_section": [8, 4, 4]}, {}, "mrope_section"),
    ({"rope_type": "dynamic", "factor": 2.0}, {}, "max_position_embeddings"),
    ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64}, {}, "max_position_embeddings"),
    ({"rope_type": "linear"}, {}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "high_freq_factor": 4.0},
     {}, "low_freq_factor"),
    ({"rope_type": "yarn", "factor": 4.0}, {}, "original_max_position_embeddings"),
])
def test_hf_bad_hf_config_raises(hf, kwargs, field):
    with pytest.raises(ValueError, match=field):
        rope_config_from_hf(hf, H, **kwargs)
