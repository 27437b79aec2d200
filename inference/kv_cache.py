"""The KV cache of a decoder-only `GPT`: allocation and size.

Axis letters: B batch, S cache length (positions it can hold), K kv heads, H head dim,
C MLA's KV latent width, R MLA's rotary key width, L layers.

The cache is the flax `cache` collection of the model (see `models/gpt.py`): a pytree
that mirrors the layers, preallocated here and threaded through `apply`:

    per layer, multi-head / GQA attention:  key, value        [B, S, K, H]
    per layer, latent attention (MLA):      latent [B, S, C], key_rope [B, S, R]
    scan_layers=True: the same leaves stacked on a leading [L, ...] axis

Why the collection rather than a cache argument to every layer: the cache follows the
layers through `nn.scan` and `nn.remat` by naming it in `variable_axes`, exactly as the
params do, with no change to the layer signatures; the caller still holds it as a plain
pytree (to donate it, shard it, or copy a row into a serving slot).

Slot s of a row holds the row's position s (`models.layers.attention.write_cache`), so
no per-layer write index is stored: the caller passes each token's position.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.gpt import GPT, GPTConfig


def init_cache(model: GPT, batch: int, max_len: int) -> dict:
    """A zero cache for `batch` rows of up to `max_len` positions, in the compute dtype.

    The shapes come from tracing `apply` with a mutable, empty `cache` collection under
    `jax.eval_shape` (each attention layer creates its buffers shaped like its input), so
    nothing but the zeros is computed and the layout can never disagree with the layers.

    Args:
      model: a decoder-only `GPT`.
      batch: B.
      max_len: S, the largest position + 1 that will be written.

    Returns:
      The `cache` collection: a nested dict of zero arrays (see the module docstring).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"init_cache needs a decoder-only models.gpt.GPT, got {type(model).__name__}")
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(model, batch, max_len))


@functools.lru_cache(maxsize=64)
def cache_shapes(model: GPT, batch: int, max_len: int):
    """The cache's ShapeDtypeStructs for `batch` rows of `max_len` positions (traced once per model and
    size: flax modules hash by config)."""

    def cache_of_a_prefill():
        ids_BS = jnp.zeros((batch, max_len), jnp.int32)
        params = nn.unbox(model.init(jax.random.key(0), ids_BS)["params"])
        _, state = model.apply({"params": params}, ids_BS, mutable=["cache"])
        return state["cache"]

    return jax.eval_shape(cache_of_a_prefill)


def kv_cache_bytes(config: GPTConfig, batch: int, length: int) -> int:
    """The cache's size by formula, in bytes, in the compute dtype `config.block.dtype`.

    Multi-head / grouped-query attention stores a key and a value per kv head:
        2 * layers * kv_heads * head_dim * length * batch * bytes.
    Latent attention (MLA) stores the latent and the shared rotary key:
        layers * (kv_lora_rank + qk_rope_head_dim) * length * batch * bytes.
    """
    b = config.block
    if b.mla is not None:
        per_token_per_layer = b.mla.kv_lora_rank + b.mla.qk_rope_head_dim
    else:
        per_token_per_layer = 2 * b.kv_heads * b.head_size
    return config.num_layers * per_token_per_layer * length * batch * jnp.dtype(b.dtype).itemsize


def cache_nbytes(cache) -> int:
    """Bytes of the allocated buffers of a cache pytree."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
