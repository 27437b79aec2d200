"""models/layers/pipeline.py on one device (no mesh): S stages x M micro-batches of a stack of
small layers give the stack's outputs, per-layer statistics and gradients of running the layers
one after the other, in float64 numpy; the loop counts GPipe's idle ticks. (On 8 devices with the
models, the strategies and 1F1B: tests/sharding/test_pipeline.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import pipeline

L, B, T, D = 4, 6, 3, 5
EPS32 = float(np.finfo(np.float32).eps)
# Four layers of a D-wide matmul and tanh: float32 rounding of about sqrt(D) * EPS32 relative
# per layer, compounded over L; x16 for its spread.
TOLERANCE = 16 * L * np.sqrt(D) * EPS32


def _layer(params, x_bTD, extras, rng):
    y = jnp.tanh(x_bTD @ params["w"] + params["b"] + extras["shift"][:, :, None])
    return y, {"mean": jnp.mean(y)}


def _reference(params, x, shift, microbatches):
    """The layers one after the other, float64; the statistics averaged over the micro-batches."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h, means = np.asarray(x, np.float64), []
    for i in range(L):
        h = np.tanh(h @ params["w"][i] + params["b"][i] + shift[:, :, None])
        means.append(np.mean(h.reshape(microbatches, -1), axis=1).mean())
    return h, np.asarray(means)


@pytest.mark.parametrize("stages,microbatches", [(1, 3), (2, 3), (4, 2), (2, 6)])
def test_equals_the_layers_in_order(stages, microbatches):
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(0, D ** -0.5, (L, D, D)).astype(np.float32),
              "b": rng.normal(0, 0.1, (L, D)).astype(np.float32)}
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    shift = rng.normal(size=(B, T)).astype(np.float32)
    out = pipeline.pipeline(_layer, params, x, {"shift": shift}, stages=stages, microbatches=microbatches)
    want, means = _reference(params, x, shift, microbatches)
    np.testing.assert_allclose(out.y_BTD, want, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(out.stats["mean"], means, rtol=0, atol=TOLERANCE)
    assert out.ticks == microbatches + stages - 1
    assert list(np.asarray(out.useful_ticks)) == [microbatches] * stages


def test_gradients_equal_the_layers_in_order():
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(0, D ** -0.5, (L, D, D)).astype(np.float32),
              "b": rng.normal(0, 0.1, (L, D)).astype(np.float32)}
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    shift = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))

    def piped(p, x):
        out = pipeline.pipeline(_layer, p, x, {"shift": shift}, stages=2, microbatches=3)
        return jnp.sum(out.y_BTD ** 2) + jnp.sum(out.stats["mean"])

    def sequential(p, x):
        def body(h, layer):
            y, stats = _layer(layer, h, {"shift": shift}, None)
            return y, stats["mean"]

        y, means = jax.lax.scan(body, x, p)
        # The pipeline's statistics are means over the micro-batches of equal size: the same means.
        return jnp.sum(y ** 2) + jnp.sum(means)

    got = jax.grad(piped, argnums=(0, 1))(params, x)
    want = jax.grad(sequential, argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=TOLERANCE * max(1.0, float(np.abs(w).max())))


def test_bad_shapes_are_named():
    params = {"w": np.zeros((3, D, D), np.float32), "b": np.zeros((3, D), np.float32)}
    with pytest.raises(ValueError, match=r"stacked layers \(3\) to be a multiple of 2"):
        pipeline.pipeline(_layer, params, np.zeros((B, T, D), np.float32), {"shift": np.zeros((B, T))}, stages=2,
                          microbatches=2)
    params = {"w": np.zeros((L, D, D), np.float32), "b": np.zeros((L, D), np.float32)}
    with pytest.raises(ValueError, match=r"batch \(6 rows\) to be a multiple of 4"):
        pipeline.pipeline(_layer, params, np.zeros((B, T, D), np.float32), {"shift": np.zeros((B, T))}, stages=2,
                          microbatches=4)
