"""models/layers/positional.py against NumPy references written from the papers:
the sinusoidal formula as a loop, RoPE as complex multiplication (interleaved pairs) and
as Hugging Face's rotate_half (halves), plus RoPE's invariants. Also the lookup tables
(LearnedPositionalEmbedding, and embedding.py's Embed, which has no test file of its own).

Axis letters: B batch, T length, N heads, H head dim, D model width, V vocab.

Measured max abs errors are printed (run with `-s`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from models.layers.embedding import Embed
from models.layers.positional import (
    LearnedPositionalEmbedding, RopeConfig, apply_rope, rope_frequencies, sinusoidal_embedding)

B, T, N, H = 2, 6, 3, 8


def _record(label, got, want):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    print(f"\n[max-abs-err] {label}: {err:.3g}")
    return err


# --- sinusoidal -----------------------------------------------------------------------


def test_sinusoidal_matches_formula_loop():
    positions = np.array([[0, 1, 2, 3, 4, 5, 6], [3, 17, 40, 64, 99, 100, 127]])
    d_model = 16
    got = np.asarray(sinusoidal_embedding(jnp.asarray(positions), d_model))
    want = np.zeros(positions.shape + (d_model,))
    for b in range(positions.shape[0]):
        for t in range(positions.shape[1]):
            pos = positions[b, t]
            for i in range(d_model // 2):
                want[b, t, 2 * i] = math.sin(pos / 10000 ** (2 * i / d_model))
                want[b, t, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d_model))
    assert got.dtype == np.float32 and got.shape == (2, 7, d_model)
    err = _record("positional/sinusoidal vs formula loop (positions <= 127)", got, want)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{err:.3g}")  # f32 angles up to 127


def test_sinusoidal_rejects_odd_width():
    with pytest.raises(ValueError, match="even d_model"):
        sinusoidal_embedding(jnp.arange(4), 7)


# --- RoPE references ------------------------------------------------------------------


def _np_inv_freq(rotary_dim, theta=10000.0):
    return np.array([theta ** (-2.0 * i / rotary_dim) for i in range(rotary_dim // 2)])


def _np_rope_complex(x, positions, theta=10000.0):
    """The paper's form: pairs (x_2i, x_2i+1) as complex numbers times e^{i m theta_i}."""
    x = np.asarray(x, np.float64)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    angles = np.asarray(positions, np.float64)[:, :, None, None] * _np_inv_freq(x.shape[-1], theta)
    z = z * np.exp(1j * angles)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def _np_rope_rotate_half(x, positions, theta=10000.0):
    """Hugging Face LLaMA: x * cos + rotate_half(x) * sin, cos/sin over concatenated halves."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    freqs = np.asarray(positions, np.float64)[:, :, None] * _np_inv_freq(x.shape[-1], theta)
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    rotate_half = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(emb) + rotate_half * np.sin(emb)


def _x(seed=0, shape=(B, T, N, H)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


POSITIONS = np.array([[0, 1, 2, 3, 4, 5], [7, 30, 31, 60, 90, 120]])


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_interleaved_matches_complex_multiplication(theta):
    x = _x(1)
    got = apply_rope(jnp.asarray(x), jnp.asarray(POSITIONS), RopeConfig(theta=theta, interleaved=True))
    want = _np_rope_complex(x, POSITIONS, theta)
    err = _record(f"positional/rope interleaved theta={theta:g} vs numpy complex", got, want)
    np.testing.assert_allclose(got, want, atol=3e-5, err_msg=f"{err:.3g}")


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_halves_matches_rotate_half(theta):
    x = _x(2)
    got = apply_rope(jnp.asarray(x), jnp.asarray(POSITIONS), RopeConfig(theta=theta, interleaved=False))
    want = _np_rope_rotate_half(x, POSITIONS, theta)
    err = _record(f"positional/rope halves theta={theta:g} vs numpy rotate_half", got, want)
    np.testing.assert_allclose(got, want, atol=3e-5, err_msg=f"{err:.3g}")


def test_rope_frequencies_match_formula():
    inv_freq, factor = rope_frequencies(RopeConfig(theta=1000.0), 12)
    np.testing.assert_allclose(inv_freq, _np_inv_freq(12, 1000.0), rtol=1e-12)
    assert factor == 1.0


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_scores_depend_only_on_relative_position(interleaved):
    """<rope(q, m), rope(k, n)> is a function of m - n, and it does change with m - n."""
    config = RopeConfig(interleaved=interleaved)
    q, k = _x(3, (1, 1, 1, H)), _x(4, (1, 1, 1, H))

    def score(m, n):
        rq = apply_rope(jnp.asarray(q), jnp.full((1, 1), m), config)
        rk = apply_rope(jnp.asarray(k), jnp.full((1, 1), n), config)
        return float(jnp.sum(rq * rk))

    for delta in (0, 1, 5):
        scores = [score(n + delta, n) for n in (0, 3, 17, 50)]
        np.testing.assert_allclose(scores, scores[0], atol=5e-5, err_msg=f"delta={delta}")
    assert abs(score(5, 0) - score(1, 0)) > 1e-3
    # Rotations preserve each head's norm.
    x = _x(5)
    r = apply_rope(jnp.asarray(x), jnp.asarray(POSITIONS), config)
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("interleaved", [True, False])
def test_linear_scaling_is_positions_divided_by_factor(interleaved):
    x = _x(6)
    scaled = apply_rope(jnp.asarray(x), jnp.asarray(POSITIONS),
                        RopeConfig(interleaved=interleaved, scaling="linear", factor=4.0))
    divided = apply_rope(jnp.asarray(x), jnp.asarray(POSITIONS / 4.0), RopeConfig(interleaved=interleaved))
    np.testing.assert_allclose(scaled, divided, atol=1e-5)
    reference = _np_rope_complex if interleaved else _np_rope_rotate_half
    np.testing.assert_allclose(scaled, reference(x, POSITIONS / 4.0), atol=3e-5)
    assert np.abs(np.asarray(scaled) - reference(x, POSITIONS)).max() > 1e-2  # factor matters


@pytest.mark.parametrize("interleaved", [True, False])
def test_partial_rotary_leaves_tail_unchanged(interleaved):
    """fraction=0.5 (GPT-NeoX): the first H/2 dims rotate with frequencies over H/2, the rest pass."""
    x = _x(7)
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(POSITIONS),
                                RopeConfig(interleaved=interleaved, fraction=0.5)))
    R = H // 2
    np.testing.assert_array_equal(got[..., R:], x[..., R:])
    reference = _np_rope_complex if interleaved else _np_rope_rotate_half
    err = _record(f"positional/rope partial interleaved={interleaved} vs numpy", got[..., :R],
                  reference(x[..., :R], POSITIONS))
    np.testing.assert_allclose(got[..., :R], reference(x[..., :R], POSITIONS), atol=3e-5, err_msg=f"{err:.3g}")


def test_rope_keeps_dtype():
    x = jnp.asarray(_x(8), jnp.bfloat16)
    out = apply_rope(x, jnp.asarray(POSITIONS), RopeConfig())
    assert out.dtype == jnp.bfloat16
    want = _np_rope_rotate_half(np.asarray(x.astype(jnp.float32)), POSITIONS)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2**-7, atol=1e-2)


def test_bad_rope_settings_raise():
    x, pos = jnp.asarray(_x(9)), jnp.asarray(POSITIONS)
    with pytest.raises(ValueError, match="unknown RoPE scaling 'yarnn'"):
        apply_rope(x, pos, RopeConfig(scaling="yarnn"))
    with pytest.raises(ValueError, match="even, non-zero"):
        apply_rope(x, pos, RopeConfig(fraction=0.25 * 1.5))  # 3 rotated dims
    with pytest.raises(dataclasses.FrozenInstanceError):
        RopeConfig().theta = 1.0


# --- lookup tables --------------------------------------------------------------------


def test_learned_positional_embedding_is_a_row_lookup():
    module = LearnedPositionalEmbedding(max_len=130, features=5)
    positions = jnp.asarray(POSITIONS)
    shapes = jax.eval_shape(module.init, jax.random.key(0), positions)["params"]
    assert shapes["embedding"].value.shape == (130, 5) and shapes["embedding"].names == (None, "embed")
    table = _x(11, (130, 5))
    params = {"params": {"embedding": table}}
    np.testing.assert_array_equal(module.apply(params, positions), table[POSITIONS])


def test_embed_lookup_and_tied_attend_match_numpy():
    V, D = 11, 6
    module = Embed(num_embeddings=V, features=D)
    ids = jnp.asarray([[0, 3, 10], [5, 5, 1]])
    table = _x(12, (V, D))
    params = {"params": {"embedding": table}}
    np.testing.assert_array_equal(module.apply(params, ids), table[np.asarray(ids)])
    x = _x(10, (2, 3, D))
    logits = module.apply(params, x, method=Embed.attend)
    want = np.einsum("btd,vd->btv", x.astype(np.float64), table.astype(np.float64))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="integers"):
        module.apply(params, jnp.ones((2, 3)))
    boxed = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]["embedding"]
    assert boxed.names == ("vocab", "embed")
