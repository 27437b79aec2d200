"""Token embedding table with a tied output projection (`attend`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import quant
from models.layers import linear
from models.layers.peft import LoraConfig, lora_factors, lora_output

Dtype = Any


class Embed(nn.Module):
    """A [V, D] table; `__call__` looks ids up, `attend` gives logits x @ table^T.

    Attributes:
      num_embeddings: V.
      features: D.
      lora: LoRA on the table if its `targets` regex matches `<path>/embedding` (peft's
        Embedding LoRA: the lookup gains A[ids] B; `attend` stays the base table, as a tied
        head does in peft).
    """

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(stddev=1.0)
    lora: LoraConfig | None = None

    def setup(self):
        self.embedding = linear.kernel_param(self, "embedding", self.embedding_init,
                                             (self.num_embeddings, self.features), self.param_dtype, ("vocab", "embed"))
        self.lora_factors = lora_factors(self, "embedding", self.embedding, n_in=1, names=("vocab", "embed"),
                                         lora=self.lora, lookup=True)

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        if not jnp.issubdtype(ids_BT.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {ids_BT.dtype}")
        x_BTD = quant.take_rows(self.embedding, ids_BT, self.dtype)  # a quantized table: the rows dequantized
        return lora_output(self, self.lora_factors, self.embedding, ids_BT, x_BTD, lookup=True)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits [B, T, V] from hidden states, sharing the embedding matrix."""
        # einsum("BTD,VD->BTV") as one 2-D dot: no transposed [V, B*T] gradient copy (models/layers/linear.py)
        return linear.project(x_BTD.astype(self.dtype), self.embedding.astype(self.dtype).T)
