"""models/layers/feedforward.py against float64 NumPy (GELU through math.erf) and torch
(torch.nn.functional.linear / gelu(approximate=...) / silu / relu) with the weights copied.

Axis letters: B batch, T length, D model width, F hidden width.

Measured max abs errors are printed (run with `-s`).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F


from models.layers.feedforward import GATED, MLP_ACTIVATIONS, FeedForward

B, T, D, FF = 2, 5, 12, 20
ALL = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_tanh", "reglu")

_erf = np.vectorize(math.erf)
NP_ACTS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}
TORCH_ACTS = {
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
GATE_OF = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}


def _record(label, got, want):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    print(f"\n[max-abs-err] {label}: {err:.3g}")
    return err


def _setup(activation, use_bias=True, seed=0):
    rng = np.random.default_rng(seed)
    x = (1.5 * rng.standard_normal((B, T, D))).astype(np.float32)
    module = FeedForward(hidden_dim=FF, activation=activation, use_bias=use_bias)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x))["params"]
    params = {name: (0.5 * rng.standard_normal(s.shape)).astype(np.float32) for name, s in shapes.items()}
    return module, x, params


def test_parameter_names_and_shapes():
    _, _, plain = _setup("gelu")
    assert {k: v.shape for k, v in plain.items()} == {
        "wi": (D, FF), "wi_bias": (FF,), "wo": (FF, D), "wo_bias": (D,)}
    _, _, gated = _setup("swiglu", use_bias=False)
    assert {k: v.shape for k, v in gated.items()} == {"wi_gate": (D, FF), "wi_up": (D, FF), "wo": (FF, D)}
    assert set(ALL) == set(MLP_ACTIVATIONS) and set(GATE_OF) == set(GATED)


def _np_ffn(activation, x, p):
    f = lambda name: np.asarray(p[name], np.float64) if name in p else 0.0  # noqa: E731
    x = np.asarray(x, np.float64)
    if activation in GATE_OF:
        h = NP_ACTS[GATE_OF[activation]](x @ f("wi_gate") + f("wi_gate_bias")) * (x @ f("wi_up") + f("wi_up_bias"))
    else:
        h = NP_ACTS[activation](x @ f("wi") + f("wi_bias"))
    return h @ f("wo") + f("wo_bias")


def _torch_ffn(activation, x, p):
    t = lambda name: torch.from_numpy(np.asarray(p[name], np.float64)) if name in p else None  # noqa: E731
    lin = lambda x, name: F.linear(x, t(name).T, t(name + "_bias"))  # torch weight = our kernel^T  # noqa: E731
    x = torch.from_numpy(np.asarray(x, np.float64))
    if activation in GATE_OF:
        h = TORCH_ACTS[GATE_OF[activation]](lin(x, "wi_gate")) * lin(x, "wi_up")
    else:
        h = TORCH_ACTS[activation](lin(x, "wi"))
    return lin(h, "wo").numpy()


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("activation", ALL)
def test_matches_numpy_float64(activation, use_bias):
    module, x, params = _setup(activation, use_bias, seed=1)
    out = module.apply({"params": params}, x)
    want = _np_ffn(activation, x, params)
    err = _record(f"feedforward/{activation} bias={use_bias} vs numpy64", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"{err:.3g}")


@pytest.mark.parametrize("activation", ALL)
def test_matches_torch(activation):
    module, x, params = _setup(activation, seed=2)
    out = module.apply({"params": params}, x)
    want = _torch_ffn(activation, x, params)
    err = _record(f"feedforward/{activation} vs torch", out, want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"{err:.3g}")


def test_exact_and_tanh_gelu_are_distinct():
    """Guards against the two GELUs being swapped: they differ by ~1e-3 near |x| ~ 2."""
    module, x, params = _setup("gelu", seed=3)
    exact = module.apply({"params": params}, x)
    tanh = module.clone(activation="gelu_tanh").apply({"params": params}, x)
    assert np.abs(np.asarray(exact - tanh)).max() > 1e-4


def test_hidden_dropout():
    module, x, params = _setup("gelu", seed=4)
    module = module.clone(dropout_rate=0.5)
    plain = module.apply({"params": params}, x)
    same = module.apply({"params": params}, x, deterministic=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(plain, same)
    run = lambda seed: module.apply({"params": params}, x, deterministic=False,  # noqa: E731
                                    rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(run(1), run(1))
    assert np.abs(np.asarray(run(1) - run(2))).max() > 1e-3
    # Dropout sits on the hidden layer only: with wo = 0 the output is the bias, dropped or not.
    zeroed = dict(params, wo=np.zeros_like(params["wo"]))
    np.testing.assert_array_equal(
        module.apply({"params": zeroed}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}),
        np.broadcast_to(params["wo_bias"], (B, T, D)))


def test_unknown_activation_raises():
    x = jnp.ones((B, T, D))
    with pytest.raises(ValueError, match="swiglu"):
        FeedForward(FF, activation="gelu_new").init(jax.random.key(0), x)


def test_logical_axis_names():
    x = jnp.ones((B, T, D))
    boxed = jax.eval_shape(FeedForward(FF, activation="swiglu").init, jax.random.key(0), x)["params"]
    want = {"wi_gate": ("embed", "mlp"), "wi_up": ("embed", "mlp"), "wo": ("mlp", "embed"),
            "wi_gate_bias": ("mlp",), "wi_up_bias": ("mlp",), "wo_bias": ("embed",)}
    assert {name: box.names for name, box in boxed.items()} == want
