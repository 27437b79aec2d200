"""Token embedding table with a tied output projection (`attend`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class Embed(nn.Module):
    """A [V, D] table; `__call__` looks ids up, `attend` gives logits x @ table^T.

    Attributes:
      num_embeddings: V.
      features: D.
    """

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype,
        )

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        if not jnp.issubdtype(ids_BT.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {ids_BT.dtype}")
        return jnp.take(self.embedding, ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits [B, T, V] from hidden states, sharing the embedding matrix."""
        return jnp.einsum("BTD,VD->BTV", x_BTD.astype(self.dtype), self.embedding.astype(self.dtype))
