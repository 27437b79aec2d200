"""models/layers/linear.project equals the einsum it replaces (float64 numpy reference), forward and
gradients, and names mismatched axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import linear

EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("x_shape, w_shape, in_dims, spec", [
    ((2, 5, 8), (8, 6), 1, "btd,df->btf"),
    ((2, 5, 8), (8, 3, 4), 1, "btd,dnh->btnh"),
    ((2, 5, 3, 4), (3, 4, 8), 2, "btnh,nhd->btd"),
    ((7, 8), (8, 6), 1, "td,df->tf"),
])
def test_project_equals_einsum_and_its_gradients(x_shape, w_shape, in_dims, spec):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=w_shape).astype(np.float32)
    y = linear.project(jnp.asarray(x), jnp.asarray(w), in_dims=in_dims)
    reference = np.einsum(spec, x.astype(np.float64), w.astype(np.float64))
    contracted = int(np.prod(w_shape[:in_dims]))
    # A float32 dot of `contracted` terms: at most `contracted` roundings of the terms' scale.
    scale = np.einsum(spec, np.abs(x).astype(np.float64), np.abs(w).astype(np.float64))
    assert y.shape == reference.shape and y.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(np.asarray(y) - reference), contracted * EPS32 * scale + 1e-30)

    # Gradients of sum(y * c): dx = c . w over the output axes, dw = x . c over the token axes.
    c = rng.normal(size=reference.shape).astype(np.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(linear.project(x, w, in_dims=in_dims) * c), argnums=(0, 1))(x, w)
    ins, outs = spec.split("->")[0].split(",")
    out = spec.split("->")[1]
    dx_ref = np.einsum(f"{out},{outs}->{ins}", c.astype(np.float64), w.astype(np.float64))
    dw_ref = np.einsum(f"{ins},{out}->{outs}", x.astype(np.float64), c.astype(np.float64))
    dx_scale = np.einsum(f"{out},{outs}->{ins}", np.abs(c).astype(np.float64), np.abs(w).astype(np.float64))
    dw_scale = np.einsum(f"{ins},{out}->{outs}", np.abs(x).astype(np.float64), np.abs(c).astype(np.float64))
    terms_dx, terms_dw = reference.size // max(1, int(np.prod(x_shape[:-in_dims]))), int(np.prod(x_shape[:-in_dims]))
    np.testing.assert_array_less(np.abs(np.asarray(dx) - dx_ref), terms_dx * EPS32 * dx_scale + 1e-30)
    np.testing.assert_array_less(np.abs(np.asarray(dw) - dw_ref), terms_dw * EPS32 * dw_scale + 1e-30)


def test_project_names_mismatched_axes():
    with pytest.raises(ValueError, match=r"do not end in the kernel's input axes \(8,\)"):
        linear.project(jnp.zeros((2, 5, 7)), jnp.zeros((8, 6)))
