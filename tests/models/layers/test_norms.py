"""models/layers/norms.py against torch.nn.LayerNorm / torch.nn.RMSNorm (float64) with the
parameters copied, and the float32-statistics property for bfloat16 inputs.

Measured max abs errors are printed (run with `-s`).
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch


from models.layers.norms import LayerNorm, RMSNorm, make_norm

B, T, D = 2, 5, 24


def _record(label, got, want):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    print(f"\n[max-abs-err] {label}: {err:.3g}")
    return err


def _x(seed=0, offset=0.0, scale=2.0):
    return (offset + scale * np.random.default_rng(seed).standard_normal((B, T, D))).astype(np.float32)


def _vec(seed):
    return np.random.default_rng(seed).standard_normal(D).astype(np.float32)


def _t(a):
    return torch.from_numpy(np.asarray(a, np.float64))


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_layernorm_matches_torch(eps):
    x, scale, bias = _x(1, offset=3.0), 1.0 + _vec(2), _vec(3)
    out = LayerNorm(epsilon=eps).apply({"params": {"scale": scale, "bias": bias}}, x)
    ref = torch.nn.LayerNorm(D, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(_t(scale))
        ref.bias.copy_(_t(bias))
        want = ref(_t(x)).numpy()
    err = _record(f"norms/layernorm eps={eps} vs torch.nn.LayerNorm", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-6, err_msg=f"{err:.3g}")


def test_layernorm_without_bias_matches_torch():
    x, scale = _x(4), 1.0 + _vec(5)
    module = LayerNorm(use_bias=False)
    params = nn.unbox(module.init(jax.random.key(0), x))
    assert set(params["params"]) == {"scale"}
    out = module.apply({"params": {"scale": scale}}, x)
    want = torch.nn.functional.layer_norm(_t(x), (D,), weight=_t(scale), bias=None, eps=1e-5).numpy()
    err = _record("norms/layernorm no-bias vs torch layer_norm", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rmsnorm_matches_torch(eps):
    x, scale = _x(6, offset=1.0), 1.0 + _vec(7)
    out = RMSNorm(epsilon=eps).apply({"params": {"scale": scale}}, x)
    ref = torch.nn.RMSNorm(D, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(_t(scale))
        want = ref(_t(x)).numpy()
    err = _record(f"norms/rmsnorm eps={eps} vs torch.nn.RMSNorm", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-6, err_msg=f"{err:.3g}")


def test_rmsnorm_scale_offset_matches_torch_with_gemma_weight():
    """scale_offset=1: zero-initialised scale is the identity gain; weight = 1 + scale."""
    x, scale = _x(8), 0.1 * _vec(9)
    module = RMSNorm(scale_offset=1.0)
    init = nn.unbox(module.init(jax.random.key(0), x))
    assert (np.asarray(init["params"]["scale"]) == 0.0).all()
    out = module.apply({"params": {"scale": scale}}, x)
    want = torch.nn.functional.rms_norm(_t(x), (D,), weight=1.0 + _t(scale), eps=1e-6).numpy()
    err = _record("norms/rmsnorm scale_offset=1 vs torch rms_norm", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-6)


def test_default_init_matches_torch_unit_gain():
    x = _x(10)
    ln = LayerNorm()
    out = ln.apply(ln.init(jax.random.key(0), x), x)
    want = torch.nn.functional.layer_norm(_t(x), (D,), eps=1e-5).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-6)
    rms = RMSNorm()
    out = rms.apply(rms.init(jax.random.key(0), x), x)
    want = torch.nn.functional.rms_norm(_t(x), (D,), eps=1e-6).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-6)


def _np_layernorm(x, scale, bias, eps=1e-5):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_rmsnorm(x, scale, eps=1e-6):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_bfloat16_input_gets_float32_statistics(kind):
    """bf16 activations far from zero (mean 50, std 1): the statistics must be float32.

    Each bf16 input is exact in float32, so the f32 path on the same bf16 values is the
    reference; a bf16-output module may differ from it only by the final rounding to bf16.
    Statistics accumulated in bf16 would be off by several units of the output.
    """
    x16 = jnp.asarray(_x(11, offset=50.0, scale=1.0), jnp.bfloat16)
    x_r = np.asarray(x16.astype(jnp.float32))
    scale, bias = 1.0 + 0.1 * _vec(12), 0.1 * _vec(13)
    if kind == "layernorm":
        params = {"params": {"scale": scale, "bias": bias}}
        want = _np_layernorm(x_r, scale, bias)
        make = lambda dtype: LayerNorm(dtype=dtype)  # noqa: E731
    else:
        params = {"params": {"scale": scale}}
        want = _np_rmsnorm(x_r, scale)
        make = lambda dtype: RMSNorm(dtype=dtype)  # noqa: E731

    out_f32 = make(jnp.float32).apply(params, x16)  # bf16 in, float32 out
    assert out_f32.dtype == jnp.float32
    err32 = _record(f"norms/{kind} bf16 input, f32 output vs numpy64", out_f32, want)
    # The rms of x ~ 50 makes RMSNorm outputs ~1 with a f32 relative error; LayerNorm's
    # centring cancels 50 against 50, still within f32 precision of the inputs.
    assert err32 < 2e-5, err32

    out_bf16 = make(jnp.bfloat16).apply(params, x16)
    assert out_bf16.dtype == jnp.bfloat16
    err16 = _record(f"norms/{kind} bf16 input, bf16 output vs numpy64", np.asarray(out_bf16, np.float32), want)
    # One bf16 rounding of the output: relative error <= 2^-8.
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32), want, rtol=2**-8, atol=1e-6,
                               err_msg=f"{err16:.3g}")

    # The test can fail: statistics taken in bf16 are far outside that tolerance.
    if kind == "layernorm":
        mean16 = jnp.mean(x16, -1, keepdims=True)
        var16 = jnp.mean(jnp.square(x16 - mean16), -1, keepdims=True)
        naive = np.asarray(((x16 - mean16) * jax.lax.rsqrt(var16 + 1e-5)).astype(jnp.float32)) * scale + bias
        assert np.max(np.abs(naive - want)) > 10 * err16


def test_make_norm_builds_by_name_and_rejects_unknown():
    assert isinstance(make_norm("layernorm", epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32), LayerNorm)
    rms = make_norm("rmsnorm", epsilon=1e-3, dtype=jnp.float32, param_dtype=jnp.float32)
    assert isinstance(rms, RMSNorm) and rms.epsilon == 1e-3
    with pytest.raises(ValueError, match="layernorm.*rmsnorm"):
        make_norm("batchnorm", epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)


def test_params_carry_embed_axis_name():
    x = _x(14)
    for module in (LayerNorm(), RMSNorm()):
        boxed = module.init(jax.random.key(0), x)["params"]
        for name, box in boxed.items():
            assert isinstance(box, nn.LogicallyPartitioned), name
            assert box.names == ("embed",), (name, box.names)
