"""Quantized weight storage: NF4 with double-quantized scales (QLoRA) and block-wise int8.

    q = quantize(w, kind="nf4", block_size=64, double_quant=True)   # a pytree
    y = x @ q.dequantize(jnp.bfloat16)                              # dequantized inside the jitted matmul
    frozen_q = quantize_tree(frozen, kind="nf4", block_size=64, double_quant=True)

NF4 (Dettmers et al. 2023, "QLoRA", as bitsandbytes implements it): each block of
`block_size` consecutive values along the LAST axis is divided by its absolute maximum
(absmax) and rounded to the nearest of the 16 NormalFloat values `NF4_CODE`; two 4-bit
codes share a byte, the first of a pair in the high nibble. Double quantization stores the
absmax scales themselves in 8 bits: their mean is subtracted, and the rest is quantized in
blocks of 256 (over the scales in row-major order) to the nearest value of bitsandbytes'
8-bit dynamic code (`dynamic_code()`), with one float32 absmax per block of 256.

int8: each block is divided by its absmax and rounded to the nearest of -127..127
(symmetric, round half to even); the scales are double-quantized alike when asked.

A `QuantizedTensor` keeps the weight's RANK, so the weight's logical axis names lay out its
fields (`logically_partitioned`): codes [..., L/2] uint8 (NF4) or [..., L] int8, scales
[..., L/block] (float32, or uint8 codes when double-quantized). A last dimension L that is
not a multiple of `block_size` is zero-padded up to one (attention kernels end in a head
dimension that is often shorter than a block): the padding is stored, counted in `nbytes`,
and cut off by `dequantize`. `pad=False` makes that an error instead.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("nf4", "int8")
# Second-level blocks of the double-quantized scales (QLoRA, bitsandbytes).
SCALE_BLOCK = 256

# bitsandbytes' NF4 table (`create_normal_map(offset=0.9677083)`): the normal quantiles at 8
# evenly spaced probabilities from 1/2 to 0.9677083 (the positive half, with 1) and at 7 (the
# negative half), normalized to [-1, 1], so that 0 is exact and the code is asymmetric.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


@functools.cache
def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`, Dettmers 2016):
    for exponents 10^-6 .. 10^0, the 2^i midpoints of a linear grid of 2^i + 1 points on
    [0.1, 1], and their negatives, plus 0 and 1: 256 sorted float32 values in [-1, 1].

    Computed in float64 and rounded once; bitsandbytes' own table is within 1 float32 ulp of it
    (it steps `torch.linspace` in float32, whose last bit depends on the CPU's vector width)."""
    values = [0.0, 1.0]
    for i in range(7):
        grid = np.linspace(0.1, 1.0, 2 ** i + 1)
        means = (grid[:-1] + grid[1:]) / 2.0
        values += [sign * 10.0 ** (i - 6) * m for m in means for sign in (1.0, -1.0)]
    return np.sort(np.array(values, np.float64)).astype(np.float32)


def _midpoints(code: np.ndarray) -> jax.Array:
    """Decision thresholds of a sorted code: x rounds to code[k] with k = #thresholds < x."""
    return jnp.asarray((code[:-1] + code[1:]) / np.float32(2.0))


@flax.struct.dataclass
class QuantizedTensor:
    """A block-wise quantized tensor of `shape` (a pytree: the arrays are its leaves).

    Attributes:
      codes: NF4: uint8 [..., Lp/2], two codes per byte (the first in the high nibble);
        int8: int8 [..., Lp]. Lp is the last dimension padded to a multiple of `block_size`.
      scales: the blocks' absmax [..., Lp/block]: float32, or with double quantization uint8
        codes of (absmax - scale_offset) in `dynamic_code()`.
      scale_absmax: double quantization: float32 [ceil(n_scales / 256)], the absmax of each
        block of 256 scales in row-major order; otherwise None.
      scale_offset: double quantization: float32 [], the scales' mean; otherwise None.
      kind: "nf4" or "int8".
      block_size: values per scale along the last axis.
      shape: the original shape.
      dtype: the original dtype's name (what `dequantize()` returns by default).
    """

    codes: Any
    scales: Any
    scale_absmax: Any = None
    scale_offset: Any = None
    kind: str = flax.struct.field(pytree_node=False, default="nf4")
    block_size: int = flax.struct.field(pytree_node=False, default=64)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.scale_absmax is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (codes, scales and the double quantization's constants)."""
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self))

    def block_scales(self) -> jax.Array:
        """The blocks' absmax as float32 [..., Lp/block] (reconstructed if double-quantized)."""
        if not self.double_quant:
            return self.scales
        return _dequantize_scales(self.scales, self.scale_absmax, self.scale_offset)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The tensor of `shape` in `dtype` (default: the original dtype): codes times their
        block's scale, computed in float32, padding cut off. Pure jnp: under jit it fuses into
        the consumer (e.g. `x @ w.dequantize()`)."""
        *lead, padded = self.scales.shape[:-1] + (self.scales.shape[-1] * self.block_size,)
        if self.kind == "nf4":
            values = jnp.asarray(NF4_CODE)[unpack_nibbles(self.codes).astype(jnp.int32)]
        else:
            values = self.codes.astype(jnp.float32) / 127.0
        blocks = values.reshape(*lead, padded // self.block_size, self.block_size)
        out = (blocks * self.block_scales()[..., None]).reshape(*lead, padded)
        return out[..., :self.shape[-1]].astype(dtype or self.dtype)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedTensor)


def _check(kind: str, block_size: int, last: int | None = None, pad: bool = True) -> None:
    if kind not in KINDS:
        raise ValueError(f"config key `finetune.qlora.quant`={kind!r}; expected one of {KINDS}")
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"config key `finetune.qlora.block_size`={block_size!r}; expected a positive even "
                         f"integer (two 4-bit codes share a byte), e.g. 64")
    if last is not None and last % block_size and not pad:
        divisors = [b for b in (256, 128, 64, 32, 16, 8, 4, 2) if last % b == 0]
        raise ValueError(f"config key `finetune.qlora.block_size`={block_size} does not divide the last "
                         f"dimension {last}; use a block size that divides it"
                         f"{f' (e.g. {divisors[0]})' if divisors else ''} or pad=True")


@functools.partial(jax.jit, static_argnames=("kind", "block_size", "double_quant", "pad"))
def quantize(x: jax.Array, kind: str = "nf4", block_size: int = 64, double_quant: bool = True, *,
             pad: bool = True) -> QuantizedTensor:
    """Block-wise absmax quantization of `x` along its last axis (see the module docstring); jitted.

    Args:
      x: a float array of rank >= 1.
      kind: "nf4" (4-bit NormalFloat, packed two per byte) or "int8" (symmetric, -127..127).
      block_size: values per scale along the last axis (positive and even).
      double_quant: store the scales in 8 bits (QLoRA's double quantization).
      pad: zero-pad a last dimension that `block_size` does not divide (False: ValueError).

    Returns:
      A QuantizedTensor of x's shape and dtype.
    """
    _check(kind, block_size, x.shape[-1] if x.ndim else None, pad)
    if x.ndim == 0:
        raise ValueError("quantize needs an array of rank >= 1 (blocks run along the last axis)")
    *lead, last = x.shape
    padded = -(-last // block_size) * block_size
    x32 = jnp.pad(x.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, padded - last)])
    blocks = x32.reshape(*lead, padded // block_size, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    # As bitsandbytes: times the reciprocal; an all-zero block keeps absmax 0 and codes of 0.
    normalized = blocks * _reciprocal(absmax)[..., None]
    if kind == "nf4":
        codes = pack_nibbles(_nearest(NF4_CODE, jnp.clip(normalized, -1.0, 1.0)).reshape(*lead, padded))
    else:
        codes = jnp.round(normalized * 127.0).astype(jnp.int8).reshape(*lead, padded)
    extra = _quantize_scales(absmax) if double_quant else {"scales": absmax}
    return QuantizedTensor(codes=codes, kind=kind, block_size=block_size, shape=tuple(x.shape),
                           dtype=np.dtype(x.dtype).name, **extra)


def _reciprocal(absmax: jax.Array) -> jax.Array:
    """1 / absmax, finite for 0 (bitsandbytes floors at 1e-38, a subnormal that XLA's CPU
    flushes to zero: the smallest normal float32 instead)."""
    return 1.0 / jnp.maximum(absmax, np.finfo(np.float32).tiny)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """uint8 [..., 2n] of values 0..15 -> uint8 [..., n], element 2i in the high nibble of byte i
    and 2i+1 in the low one (bitsandbytes' order)."""
    pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_nibbles`: uint8 [..., n] -> uint8 [..., 2n]."""
    pairs = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _nearest(code: np.ndarray, x: jax.Array) -> jax.Array:
    """uint8 index of the nearest value of the sorted `code` (ties to the lower one, as
    bitsandbytes' `torch.bucketize` against the midpoints)."""
    return jnp.searchsorted(_midpoints(code), x, side="left").astype(jnp.uint8)


def _scale_block_index(shape: tuple[int, ...]) -> jax.Array:
    """Each scale's block of SCALE_BLOCK in row-major order, elementwise (no reshape of a
    possibly sharded array)."""
    return jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape) // SCALE_BLOCK


def _quantize_scales(absmax: jax.Array) -> dict[str, jax.Array]:
    """QLoRA's double quantization of float32 scales (bitsandbytes `compress_statistics`)."""
    offset = jnp.mean(absmax)
    centred = absmax - offset
    n = centred.size
    flat = jnp.pad(centred.reshape(-1), (0, -n % SCALE_BLOCK))
    scale_absmax = jnp.max(jnp.abs(flat.reshape(-1, SCALE_BLOCK)), axis=-1)
    index = _scale_block_index(centred.shape)
    normalized = centred * _reciprocal(scale_absmax)[index]
    return {"scales": _nearest(dynamic_code(), normalized), "scale_absmax": scale_absmax, "scale_offset": offset}


def _dequantize_scales(codes: jax.Array, scale_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    index = _scale_block_index(codes.shape)
    return jnp.asarray(dynamic_code())[codes.astype(jnp.int32)] * scale_absmax[index] + offset


# Leaves named like these stay as they are whatever their shape (a scanned stack of norm
# scales is a matrix, but not a weight a matmul reads).
KEEP = re.compile(r"(^scale$)|(bias$)|(^router$)")


def quantizable(path: str, leaf: Any, min_size: int = 1024) -> bool:
    """Whether `quantize_tree` quantizes the leaf at '/'-joined `path`: a floating matrix (rank >= 2:
    kernels, embeddings, stacked layers' kernels) of at least `min_size` values, not a norm
    scale, bias or MoE router."""
    name = path.rsplit("/", 1)[-1]
    return (len(leaf.shape) >= 2 and math.prod(leaf.shape) >= min_size
            and jnp.issubdtype(leaf.dtype, jnp.floating) and not KEEP.search(name))


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def quantize_tree(params: Any, *, kind: str = "nf4", block_size: int = 64, double_quant: bool = True,
                  min_size: int = 1024, pad: bool = True) -> Any:
    """`params` with every `quantizable` leaf replaced by its QuantizedTensor.

    Args:
      params: a tree of arrays (unboxed), concrete or traced.
      kind, block_size, double_quant, pad: as `quantize`.
      min_size: leaves with fewer values stay as they are.

    Returns:
      The same tree structure with QuantizedTensor leaves where quantized.
    """
    _check(kind, block_size)
    one = functools.partial(quantize, kind=kind, block_size=block_size, double_quant=double_quant, pad=pad)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: one(x) if quantizable(_path(path), x, min_size) else x, params)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """`tree` with every QuantizedTensor dequantized (to `dtype`, default its original dtype)."""
    return jax.tree_util.tree_map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, tree,
                                  is_leaf=is_quantized)


def logically_partitioned(boxed_params: Any, quantized: Any, shards: Mapping[str, int] | None = None) -> Any:
    """The quantized tree boxed with logical axis names, for `sharding.layout.param_shardings`.

    Each QuantizedTensor's codes and scales carry its kernel's names (the rank is the kernel's);
    the double quantization's constants are small and unnamed (replicated). A name on the last
    axis splits codes of L/2 (NF4) and scales of L/block values, fewer than the kernel's L:
    where `shards[name]` (how many ways the layout splits that logical axis, e.g. 2 for `mlp`
    under tensor=2) does not divide a field's last dimension, that field's last axis is
    replicated instead (its name dropped). ZeRO's split needs no such care: it only picks
    dimensions that divide.

    Args:
      boxed_params: the params tree with nn.Partitioned leaves (e.g. from `jax.eval_shape(init)`).
      quantized: `quantize_tree` of its unboxed values (concrete or from `jax.eval_shape`).
      shards: logical axis name -> number of shards of the strategy's model rules (with
        `sharding.strategies.axis_size`: {name: axis_size(mesh, axes) for name, axes in
        strategy.model_rules if the mesh has axes}); None: keep every name.

    Returns:
      `quantized` with nn.Partitioned array fields (and the unquantized leaves boxed as in
      `boxed_params`).
    """
    shards = shards or {}

    def one(boxed, q):
        if not is_quantized(q):
            return boxed
        names = tuple(boxed.names)

        def box(field):
            last = names[-1]
            keep = last is None or field.shape[-1] % shards.get(last, 1) == 0
            return nn.Partitioned(field, names if keep else names[:-1] + (None,))

        return q.replace(codes=box(q.codes), scales=box(q.scales),
                         scale_absmax=None if q.scale_absmax is None else nn.Partitioned(q.scale_absmax, (None,)),
                         scale_offset=None if q.scale_offset is None else nn.Partitioned(q.scale_offset, ()))

    return jax.tree_util.tree_map(one, boxed_params, quantized,
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned) or is_quantized(x))


def storage_bytes(params: Any, *, block_size: int = 64, min_size: int = 1024) -> dict[str, int]:
    """Bytes of a params tree stored five ways, measured from the arrays each would hold
    (shapes only: `params` may be abstract, e.g. `jax.eval_shape(init)`).

    Returns:
      {"f32", "bf16": every leaf in that dtype; "int8", "nf4", "nf4+dq": the `quantizable`
       leaves quantized (int8 and nf4 with float32 scales, nf4+dq with double-quantized
       ones), the other leaves in their own dtype; "quantized_fraction": the share of
       values that are quantized}.
    """
    leaves = [(_path(p), x) for p, x in jax.tree_util.tree_leaves_with_path(nn.unbox(params))]
    count = sum(math.prod(x.shape) for _, x in leaves)
    out = {"f32": 4 * count, "bf16": 2 * count}
    for name, kind, dq in (("int8", "int8", False), ("nf4", "nf4", False), ("nf4+dq", "nf4", True)):
        total = 0
        for path, x in leaves:
            if quantizable(path, x, min_size):
                spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
                q = jax.eval_shape(functools.partial(quantize, kind=kind, block_size=block_size, double_quant=dq),
                                   spec)
                total += q.nbytes
            else:
                total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
        out[name] = total
    quantized = sum(math.prod(x.shape) for p, x in leaves if quantizable(p, x, min_size))
    out["quantized_fraction"] = quantized / max(count, 1)
    return out


def format_storage_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A text table of `storage_bytes` results, one row per model: MB and the ratio to f32."""
    kinds = ("f32", "bf16", "int8", "nf4", "nf4+dq")
    lines = [f"{'model':<20}{'params':>13}" + "".join(f"{k:>19}" for k in kinds)]
    for model, r in rows.items():
        cells = [f"{r[k] / 1e6:.3f} MB ({r['f32'] / r[k]:.2f}x)" for k in kinds]
        lines.append(f"{model:<20}{int(r['f32']) // 4:>13,}" + "".join(f"{c:>19}" for c in cells))
    return "\n".join(lines)
