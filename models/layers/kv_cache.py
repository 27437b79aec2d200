"""The layers' side of a KV cache: one write-and-read of a cache buffer, float or quantized.

Axis letters: B batch, T new tokens, S cache length (slots), P pool blocks, Z positions per
block, M blocks per row, K kv heads, H head dim, C MLA's latent width, R its rotary-key width.
`_` stands for the axes of one cached entry: [K, H] for keys and values, [C] or [R] for MLA.

`update_cache(module, name, new_BT_, positions_BT, quant=...)` writes a call's entries into
the cache buffer `name` of the layer's flax `cache` collection and returns the whole buffer
as [B, S, _] in the compute dtype, whichever storage the collection holds:

    contiguous:  name [B, S, _]                        (`attention.write_cache`)
    paged:       name_pages [P, Z, _] + block_table    (`attention.write_pages`, `gather_pages`)

Quantized storage (`quant` = "int8" | "fp8") keeps, beside the codes, one float32 scale per
entry (per position and kv head for keys and values, per position for MLA's latents):

    name [B, S, _] int8 or float8_e4m3fn,  name_scale [B, S, K] (MLA: [B, S]) float32

(paged: `name_pages` [P, Z, _] and `name_scale_pages` [P, Z, K]). Each write quantizes the
new entries over their last axis (the head dim, or the latent width) with the absmax scale

    int8:  s = max|x| / 127,  q = round(x / s)   in [-127, 127]; |x - q s| <= s / 2
    fp8:   s = max|x| / 448,  q = e4m3(x / s)    (448 is e4m3's largest finite value;
           3 mantissa bits: |x - q s| <= 2^-4 |x| for normal codes, <= 2^-10 s below 2^-6)

and a read dequantizes x = q s in the jitted attention computation: the cache holds 1 byte per
number plus 4 bytes per scale, against 2 (bf16) or 4 (float32) bytes per number.

The same quantization is applied to the keys and values of a forward pass without a cache
(`fake_quantize`, gradients passed straight through), so a model with a quantized cache is
one function: a full recompute equals cached decoding, and its perplexity is measured by an
ordinary forward pass.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers.attention import gather_pages, write_cache, write_pages

KV_CACHE_QUANTS = ("", "int8", "fp8")  # "": the cache in the compute dtype
CODE_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
CODE_MAX = {"int8": 127.0, "fp8": 448.0}  # the absmax maps here
SCALE_DTYPE = jnp.float32
SCALE_SUFFIX = "_scale"
PAGE_SUFFIX = "_pages"


def check_quant(quant: str) -> None:
    if quant not in KV_CACHE_QUANTS:
        raise ValueError(f"kv_cache_quant={quant!r}; expected one of {KV_CACHE_QUANTS} ('' for the compute dtype)")


def quantize(x: jax.Array, quant: str) -> tuple[jax.Array, jax.Array]:
    """Codes and scales of `x` [..., W], one scale per vector over the last axis.

    Args:
      x: [..., W] keys [B, T, K, H], values, or MLA latents [B, T, C].
      quant: "int8" or "fp8".

    Returns:
      (codes [..., W] in CODE_DTYPES[quant], scale [...] float32) with x ~= codes * scale.
      An all-zero vector gets scale 0 and codes 0.
    """
    check_quant(quant)
    if not quant:
        raise ValueError("quantize needs quant='int8' or 'fp8'")
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / CODE_MAX[quant]
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    y = jnp.clip(x32 / safe, -CODE_MAX[quant], CODE_MAX[quant])  # the clip only catches a last-ulp overshoot
    if quant == "int8":
        y = jnp.round(y)  # half to even
    return y.astype(CODE_DTYPES[quant]), scale.astype(SCALE_DTYPE)


def dequantize(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """codes [..., W] * scale [...] in `dtype` (the product taken in float32)."""
    return (codes.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fake_quantize(x: jax.Array, quant: str) -> jax.Array:
    """dequantize(quantize(x)) in x's dtype, with the identity as its derivative (straight
    through), so that a model trained with `kv_cache_quant` set still learns its key and
    value projections."""
    return dequantize(*quantize(x, quant), x.dtype)


@fake_quantize.defjvp
def _fake_quantize_jvp(quant, primals, tangents):
    return fake_quantize(primals[0], quant), tangents[0]


def is_paged(module: nn.Module) -> bool:
    """The layer's cache is a block pool with this call's block tables (`inference.paged`)."""
    return module.has_variable("cache", "block_table")


def cache_length(module: nn.Module, name: str, new_len: int) -> int:
    """S, the slots `update_cache(module, name, ...)` will return: the pool's M * Z, the
    preallocated buffer's S, or `new_len` for a buffer the call creates."""
    if is_paged(module):
        table_BM = module.get_variable("cache", "block_table")
        return table_BM.shape[1] * module.get_variable("cache", name + PAGE_SUFFIX).shape[1]
    if module.has_variable("cache", name):
        return module.get_variable("cache", name).shape[1]
    return new_len


def update_cache(module: nn.Module, name: str, new_BT_: jax.Array, positions_BT: jax.Array, *,
                 quant: str = "") -> jax.Array:
    """Writes `new_BT_` at slots `positions_BT` of the cache buffer `name` of `module`; returns
    the whole buffer [B, S, _] (paged: the gathered view of each row's blocks, S = M * Z),
    dequantized, in new_BT_'s dtype.

    A contiguous buffer missing from the collection is created with S = T (shaped like this
    call's entries; `inference.kv_cache.init_cache` preallocates by tracing exactly this).
    """
    if is_paged(module):
        table_BM = module.get_variable("cache", "block_table")

        def write(buffer, value):
            pages = write_pages(module.get_variable("cache", buffer + PAGE_SUFFIX), value, positions_BT, table_BM)
            module.put_variable("cache", buffer + PAGE_SUFFIX, pages)
            return gather_pages(pages, table_BM)
    else:
        def write(buffer, value):
            variable = module.variable("cache", buffer, jnp.zeros, value.shape, value.dtype)
            variable.value = write_cache(variable.value, value, positions_BT)
            return variable.value

    if not quant:
        return write(name, new_BT_)
    codes, scale = quantize(new_BT_, quant)
    return dequantize(write(name, codes), write(name + SCALE_SUFFIX, scale), new_BT_.dtype)
