"""Random parameters of a model's shapes, drawn in numpy: for tests, benchmarks and notebooks.

Compiling flax's `init` (threefry random numbers for every leaf) takes seconds on a CPU;
`jax.eval_shape` gives the shapes without compiling, and numpy fills them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_params(model: nn.Module, seed: int = 0, scale: float = 1.0) -> dict:
    """Params for `model.apply` (a model taking int ids [B, T]): kernels N(0, scale^2 / fan_in)
    with fan-in the first axis, 1-D leaves (norm scales, biases) 1 + N(0, 0.1^2)."""
    # Only the params: draws for another collection that init fills (a sown one) would shift them all.
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if leaf.ndim == 1:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0]), leaf.dtype)

    return jax.tree.map(draw, shapes)
