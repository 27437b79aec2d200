"""The KV cache of a decoder-only `GPT`: allocation and size.

Axis letters: B batch, S cache length (positions it can hold), K kv heads, H head dim,
C MLA's KV latent width, R MLA's rotary key width, L layers.

The cache is the flax `cache` collection of the model (see `models/gpt.py`): a pytree
that mirrors the layers, preallocated here and threaded through `apply`:

    per layer, multi-head / GQA attention:  key, value        [B, S, K, H]
    per layer, latent attention (MLA):      latent [B, S, C], key_rope [B, S, R]
    scan_layers=True: the same leaves stacked on a leading [L, ...] axis

With `config.block.kv_cache_quant` = "int8" | "fp8" each leaf holds 1-byte codes and has a
float32 scale beside it, one per vector: key_scale, value_scale [B, S, K]; MLA's
latent_scale, key_rope_scale [B, S] (`models.layers.kv_cache`; `inference.kv_quant` switches
a model's cache format and measures what it costs).

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
from models.layers.kv_cache import CODE_DTYPES, SCALE_DTYPE


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
    """The cache's size by formula, in bytes, as `init_cache` allocates it.

    In the compute dtype `config.block.dtype` (`kv_cache_quant` = ""), with e bytes a number:
    multi-head / grouped-query attention stores a key and a value per kv head,
        2 * layers * kv_heads * head_dim * length * batch * e;
    latent attention (MLA) stores the latent and the shared rotary key,
        layers * (kv_lora_rank + qk_rope_head_dim) * length * batch * e.
    Quantized ("int8" | "fp8"), each number is a 1-byte code and each vector (a position's
    key or value of one kv head; MLA: a position's latent, and its rotary key) adds a
    float32 scale:
        2 * layers * kv_heads * (head_dim + 4) * length * batch,
        layers * (kv_lora_rank + 4 + qk_rope_head_dim + 4) * length * batch.
    """
    b = config.block
    if b.kv_cache_quant:
        number, scale = jnp.dtype(CODE_DTYPES[b.kv_cache_quant]).itemsize, jnp.dtype(SCALE_DTYPE).itemsize
    else:
        number, scale = jnp.dtype(b.dtype).itemsize, 0
    if b.mla is not None:
        per_token_per_layer = (b.mla.kv_lora_rank * number + scale) + (b.mla.qk_rope_head_dim * number + scale)
    else:
        per_token_per_layer = 2 * b.kv_heads * (b.head_size * number + scale)
    return config.num_layers * per_token_per_layer * length * batch


def cache_nbytes(cache) -> int:
    """Bytes of the allocated buffers of a cache pytree."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
