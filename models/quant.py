"""Quantized weights: one `QuantizedTensor` for QLoRA's frozen base and for inference kernels.

Two layouts of the same pytree, told apart by the static `in_dims`:

* BLOCKS ALONG THE LAST AXIS (`in_dims=0`, QLoRA storage; `quantize`, `quantize_tree`):

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
  The tensor keeps the weight's RANK, so the weight's logical axis names lay out its fields
  (`logically_partitioned`): codes [..., L/2] uint8 (NF4) or [..., L] int8, scales
  [..., L/block]. A last dimension L that `block_size` does not divide is zero-padded (the
  padding is stored, counted in `nbytes`, and cut off by `dequantize`; `pad=False`: error).

* GROUPS ALONG THE CONTRACTION AXES (`in_dims >= 1`, inference kernels; `quantize_weight`,
  `QuantizedTensor.from_int`, `quantize_params`). A kernel [*lead, *I, *O] (lead: stacked
  layers L and/or experts E; I: the axes a matmul contracts; O: its output axes) is stored as
  its 2-D view per lead index, w[i, o] with i < I = prod(I axes), o < O = prod(O axes):

      w[i, o] ~ (q[i, o] - zero[i // g, o]) * scale[i // g, o]       g = the group size

  formats (weight-only, round to nearest, half to even):
    int8  per output channel (g = I): q = round(w / s) in -127..127, s = absmax / 127;
    int4  groups of g = 32/64/128 input rows; sym: q in -7..7, s = absmax / 7 (zero = 0,
          stored as q + 8); asym: s = (max - min) / 15 over the group with 0 in the range,
          zero = round(-min / s), q = clip(round(w / s) + zero, 0, 15); two codes per byte,
          rows 2i (high nibble) and 2i+1 (low nibble) of a column share byte i;
    nf4   groups of g rows: s = absmax, q = the nearest NF4_CODE value of w / s, packed as
          int4; the scales double-quantized as above, in blocks of 256 of each lead index's
          [I/g, O] scales (blocks never cross layers or experts);
    fp8   e4m3 (`jnp.float8_e4m3fn`) per output channel: q = fp8(w / s), s = absmax / 448.
  Fields: codes [*lead, I, O] (int8, float8_e4m3fn) or [*lead, I/2, O] (uint8, packed);
  scales float32 [*lead, I/g, O] (nf4 double-quantized: uint8, with scale_absmax
  [*lead, blocks] and scale_offset [*lead]); zero uint8 [*lead, I/g, O] (int4 asym) or None.
  The static fields hold only the per-slice kernel shape (`in_shape`, `out_shape`): the lead
  axes are read from the arrays, so `nn.scan` slicing every leaf of a stacked [L, ...] tensor
  leaves a valid per-layer tensor.

      q = quantize_weight(w_NHD, fmt="int4", group=64, sym=False, contract_axes=(0, 1))
      q = QuantizedTensor.from_int(q_IO, scale, zero, bits=4, group=128, shape=w.shape, in_dims=1)
      y = linear.project(x_BTNH, q, in_dims=2)        # dequantized inside the jitted computation

  `from_int` is the door for methods that choose their own codes (GPTQ, AWQ): integer codes of
  the 2-D [I, O] view (or [*lead, I, O]) with the scale/zero equation above; sym: zero=None and
  q in [-(2^(b-1)-1), 2^(b-1)-1]; asym: q in [0, 2^b-1]; bits 4 or 8 (8: sym only).

  Which axes a kernel contracts is decided by its parameter NAME (`contraction`): [D, F]
  feed-forward and MLA down-projections contract axis 0; [D, N, H] q/k/v (and MLA's [C, N, H]
  up-projections) axis 0; [N, H, D] attention `out` axes 0 and 1; MoE experts [E, D, F] /
  [E, F, D] axis 1 (E leads); a token embedding [V, D] is stored as its tied head's kernel
  [D, V] (`transposed`: groups along D, a lookup gathers columns); a stacked group
  (`layers/...`, `dense_layers/...` under `scan_layers=True`) adds one leading axis. Norm
  scales, biases, routers, position and token-type embeddings and nn.Dense `kernel`s (BERT's
  MLM transform, task heads) stay float; any other matrix is refused with a one-line error.
  `quantize_params` applies the rule to a params tree, `describe` records what it quantized
  (a compressed checkpoint's config keeps it) and `abstract_stored` rebuilds the stored tree
  from that record; `to_plain`/`from_plain` turn the tensors into dicts of arrays and back
  (`jax.export`).

  W8A8 (SmoothQuant's execution): an int8 per-channel tensor with `act_quant=True` makes
  `linear.project` quantize the activations per token (dynamic absmax int8, s_x = max|x|/127)
  and run an int8 x int8 -> int32 dot, rescaled by s_x[t] * s_w[o].
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

KINDS = ("nf4", "int8")  # QLoRA's last-axis blocks (`quantize`)
FORMATS = ("int8", "int4", "nf4", "fp8")  # inference kernels (`quantize_weight`)
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
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
    zero: Any = None
    kind: str = flax.struct.field(pytree_node=False, default="nf4")
    block_size: int = flax.struct.field(pytree_node=False, default=64)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    in_dims: int = flax.struct.field(pytree_node=False, default=0)
    in_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    out_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    transposed: bool = flax.struct.field(pytree_node=False, default=False)
    act_quant: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def ndim(self) -> int:
        return len(self.logical_shape)

    @property
    def is_kernel(self) -> bool:
        """Groups along the contraction rows (`quantize_weight`), not QLoRA's last-axis blocks."""
        return self.in_dims > 0

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Kernel layout: the leading (layer, expert) axes, read from the arrays."""
        return tuple(self.codes.shape[:-2])

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape `dequantize()` returns (for a scanned slice: the slice's)."""
        if not self.is_kernel:
            return tuple(self.shape)
        kernel = self.lead_shape + self.in_shape + self.out_shape
        return kernel[:-2] + kernel[-2:][::-1] if self.transposed else kernel

    @property
    def group(self) -> int:
        return self.block_size

    @property
    def T(self) -> QuantizedTensor:
        """The transpose of a 2-D kernel-layout tensor (an embedding table <-> its tied head)."""
        if not self.is_kernel or self.lead_shape or len(self.in_shape) + len(self.out_shape) != 2:
            raise ValueError(f"only a 2-D kernel-layout QuantizedTensor transposes; this one is {self.logical_shape}")
        return self.replace(transposed=not self.transposed)

    def astype(self, dtype: Any) -> QuantizedTensor:
        """The same codes, dequantizing to `dtype` (what layers' `kernel.astype(self.dtype)` means)."""
        return self.replace(dtype=np.dtype(dtype).name)

    def with_act_quant(self, on: bool = True) -> QuantizedTensor:
        """W8A8: `linear.project` quantizes the activations per token and runs an int8 dot."""
        if on and not (self.is_kernel and self.kind == "int8" and self.scales.shape[-2] == 1 and self.zero is None):
            raise ValueError("W8A8 (act_quant) needs an int8 kernel with per-output-channel scales "
                             "(quantize_weight(fmt='int8') or from_int(bits=8, group=None))")
        return self.replace(act_quant=on)

    @classmethod
    def from_int(cls, codes: Any, scale: Any, zero: Any = None, *, bits: int, group: int | None, shape: tuple,
                 in_dims: int = 1, dtype: Any = "float32") -> QuantizedTensor:
        """A kernel-layout tensor from integer codes of the 2-D [I, O] view (or [*lead, I, O]).

        w[..., i, o] ~ (codes[..., i, o] - zero[..., i // group, o]) * scale[..., i // group, o].

        Args:
          codes: integers [*lead, I, O]; sym (zero None): in [-(2^(b-1)-1), 2^(b-1)-1]; asym: [0, 2^b-1].
          scale: [*lead, I/group, O] float.
          zero: None (symmetric) or integers [*lead, I/group, O] in [0, 2^b-1] (bits=4 only).
          bits: 4 (packed two per byte) or 8.
          group: input rows per scale; None: one scale per output column (group = I).
          shape: the kernel's shape [*lead, *I, *O] (what `dequantize()` returns).
          in_dims: how many axes after the lead ones the matmul contracts.
          dtype: what `dequantize()` returns by default.
        """
        codes, scale = jnp.asarray(codes), jnp.asarray(scale, jnp.float32)
        lead = codes.shape[:-2]
        in_shape, out_shape = _split_kernel_shape(tuple(shape), len(lead), in_dims)
        rows = math.prod(in_shape)
        group = rows if group is None else int(group)
        if codes.shape[-2:] != (rows, math.prod(out_shape)):
            raise ValueError(f"from_int: codes {codes.shape} are not the [*lead, I, O] = {lead + (rows, math.prod(out_shape))} "
                             f"view of kernel shape {tuple(shape)} with in_dims={in_dims}")
        _check_group(group, rows, tuple(shape), "group")
        if scale.shape != lead + (rows // group, codes.shape[-1]):
            raise ValueError(f"from_int: scale {scale.shape} should be {lead + (rows // group, codes.shape[-1])}")
        if bits == 8:
            if zero is not None:
                raise ValueError("from_int: bits=8 is symmetric only (zero=None)")
            kind, stored = "int8", codes.astype(jnp.int8)
        elif bits == 4:
            if rows % 2:
                raise ValueError(f"from_int: 4-bit codes pack two input rows per byte; I={rows} is odd")
            kind = "int4"
            if zero is None:
                stored = pack_rows((codes.astype(jnp.int32) + 8).astype(jnp.uint8))
            else:
                stored = pack_rows(codes.astype(jnp.uint8))
                zero = jnp.asarray(zero).astype(jnp.uint8)
                if zero.shape != scale.shape:
                    raise ValueError(f"from_int: zero {zero.shape} should have the scale's shape {scale.shape}")
        else:
            raise ValueError(f"from_int: bits={bits}; expected 4 or 8")
        return cls(codes=stored, scales=scale, zero=zero, kind=kind, block_size=group, shape=tuple(shape),
                   dtype=np.dtype(dtype).name, in_dims=in_dims, in_shape=in_shape, out_shape=out_shape)

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

    def int_codes(self) -> jax.Array:
        """Kernel layout: the codes as int32 [*lead, I, O] (int4 unpacked; sym int4 as -7..7 when
        zero is None; nf4: table indices 0..15; fp8: not integer, refused)."""
        if self.kind == "fp8":
            raise ValueError("fp8 codes are floating point; use dequantize()")
        if self.kind == "int8":
            return self.codes.astype(jnp.int32)
        nibbles = unpack_rows(self.codes).astype(jnp.int32)
        return nibbles - 8 if self.kind == "int4" and self.zero is None else nibbles

    def dequantize_2d(self, dtype: Any = None) -> jax.Array:
        """Kernel layout: w as [*lead, I, O] in `dtype` (default: the original dtype); the
        arithmetic in float32. Pure jnp: under jit it fuses into the consumer."""
        if not self.is_kernel:
            raise ValueError("dequantize_2d is for kernel-layout tensors (quantize_weight/from_int)")
        lead, (rows, cols), g = self.lead_shape, self.codes.shape[-2:], self.block_size
        if self.kind == "fp8":
            values = self.codes.astype(jnp.float32)
        elif self.kind == "nf4":
            values = jnp.asarray(NF4_CODE)[unpack_rows(self.codes).astype(jnp.int32)]
        elif self.kind == "int4" and self.zero is not None:
            values = unpack_rows(self.codes).astype(jnp.float32)
        else:
            values = self.int_codes().astype(jnp.float32)
        rows = values.shape[-2]
        blocks = values.reshape(*lead, rows // g, g, cols)
        if self.zero is not None:
            blocks = blocks - self.zero.astype(jnp.float32)[..., None, :]
        scales = (_dequantize_lead_scales(self.scales, self.scale_absmax, self.scale_offset) if self.double_quant
                  else self.scales)
        out = (blocks * scales[..., None, :]).reshape(*lead, rows, cols)
        return out.astype(dtype or self.dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The tensor of `logical_shape` in `dtype` (default: the original dtype): codes times
        their block's scale, computed in float32, padding cut off. Pure jnp: under jit it fuses
        into the consumer (e.g. `x @ w.dequantize()`)."""
        if self.is_kernel:
            w = self.dequantize_2d(dtype)
            if self.transposed:
                return w.T
            return w.reshape(self.lead_shape + self.in_shape + self.out_shape)
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


def materialize(w: Any, dtype: Any) -> jax.Array:
    """A kernel as a float array in `dtype`: dequantized if quantized (inside the caller's jit)."""
    return w.dequantize(dtype) if is_quantized(w) else w.astype(dtype)


def take_rows(table: Any, ids: jax.Array, dtype: Any) -> jax.Array:
    """table[ids] for an embedding table [V, D], float or quantized (`transposed` kernel layout
    [D, V]: only the looked-up columns are gathered and dequantized)."""
    if not is_quantized(table):
        return jnp.take(table, ids, axis=0).astype(dtype)
    if not (table.is_kernel and table.transposed):
        return jnp.take(table.dequantize(dtype), ids, axis=0)
    flat = ids.reshape(-1)
    pick = lambda a: None if a is None else jnp.take(a, flat, axis=-1)
    if table.double_quant:
        scales = _dequantize_lead_scales(table.scales, table.scale_absmax, table.scale_offset)
        columns = table.replace(scales=scales, scale_absmax=None, scale_offset=None)
    else:
        columns = table
    columns = columns.replace(codes=pick(columns.codes), scales=pick(columns.scales), zero=pick(columns.zero),
                              out_shape=(flat.shape[0],), transposed=False)
    return columns.dequantize_2d(dtype).T.reshape(*ids.shape, -1)


def _split_kernel_shape(shape: tuple, lead: int, in_dims: int) -> tuple[tuple, tuple]:
    """(contraction axes, output axes) of a kernel [*lead, *I, *O]."""
    if in_dims < 1 or lead + in_dims >= len(shape):
        raise ValueError(f"kernel shape {shape} with {lead} leading axes has no {in_dims} contraction "
                         f"axes followed by output axes")
    return tuple(shape[lead:lead + in_dims]), tuple(shape[lead + in_dims:])


def group_divisors(rows: int) -> list[int]:
    """Group sizes that divide `rows` (even, for packing), largest first, up to 1024."""
    return [g for g in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2) if rows % g == 0]


def _check_group(group: int, rows: int, shape: tuple, name: str = "group") -> None:
    if not isinstance(group, int) or group < 1 or rows % group:
        raise ValueError(f"{name}={group} does not divide the contraction dimension {rows} of kernel shape "
                         f"{shape}; group sizes that divide it: {group_divisors(rows) or [rows]}")


def pack_rows(nibbles: jax.Array) -> jax.Array:
    """uint8 [..., 2n, O] of values 0..15 -> [..., n, O]: rows 2i (high nibble) and 2i+1 (low)."""
    pairs = nibbles.reshape(*nibbles.shape[:-2], nibbles.shape[-2] // 2, 2, nibbles.shape[-1])
    return (pairs[..., 0, :] << 4) | pairs[..., 1, :]


def unpack_rows(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_rows`: uint8 [..., n, O] -> [..., 2n, O]."""
    pairs = jnp.stack([packed >> 4, packed & 0xF], axis=-2)
    return pairs.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def _safe_divide(w: jax.Array, s: jax.Array) -> jax.Array:
    """w / s with 0 where s is 0 (an all-zero group)."""
    return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), 0.0)


def _to_2d(w: jax.Array, contract_axes: tuple[int, ...], lead: int) -> tuple[jax.Array, tuple, tuple, bool]:
    """A kernel as [*lead, I, O] with its (in_shape, out_shape, transposed)."""
    axes = tuple(a % w.ndim for a in contract_axes)
    if list(axes) != list(range(axes[0], axes[0] + len(axes))) or axes[0] < lead:
        raise ValueError(f"contract_axes={contract_axes} of a kernel of shape {w.shape} with lead={lead} must be "
                         f"consecutive axes after the {lead} leading ones")
    before, after = axes[0] - lead, w.ndim - 1 - axes[-1]
    if before and after:
        raise ValueError(f"contract_axes={contract_axes} of a kernel of shape {w.shape}: output axes on both sides "
                         f"of the contraction are not supported")
    if before:  # [*lead, *O, *I], e.g. an embedding table [V, D] whose tied head contracts D
        if lead or before != 1 or len(axes) != 1:
            raise ValueError(f"contract_axes={contract_axes} of a kernel of shape {w.shape}: only a 2-D [O, I] "
                             f"matrix (an embedding table) may put its contraction last")
        return w.T, (w.shape[1],), (w.shape[0],), True
    in_shape, out_shape = _split_kernel_shape(tuple(w.shape), lead, len(axes))
    return (w.reshape(*w.shape[:lead], math.prod(in_shape), math.prod(out_shape)), in_shape, out_shape, False)


def quantize_weight(w: jax.Array, *, fmt: str, group: int | None = None, sym: bool = True,
                    contract_axes: tuple[int, ...] = (0,), lead: int = 0, double_quant: bool = True) -> QuantizedTensor:
    """Round-to-nearest weight quantization in the kernel layout (see the module docstring).

    Args:
      w: a float kernel [*lead, *I, *O] (or a 2-D [O, I] table with contract_axes=(1,)).
      fmt: one of FORMATS: "int8" (per output channel), "int4" (groups), "nf4" (groups, double
        quantized scales), "fp8" (e4m3, per output channel).
      group: input rows per scale (int4/nf4; default 128, or I if smaller); int8/fp8: None
        (per channel) or a divisor of I.
      sym: int4 only: symmetric (zero = 0) or asymmetric with a zero point.
      contract_axes: the axes a matmul contracts (consecutive).
      lead: how many leading axes are batch-like (stacked layers, experts).
      double_quant: nf4: store the scales in 8 bits.

    Returns:
      A kernel-layout QuantizedTensor with w's shape and dtype.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")
    w2, in_shape, out_shape, transposed = _to_2d(jnp.asarray(w), tuple(contract_axes), lead)
    rows = w2.shape[-2]
    if group is None:
        group = min(128, rows) if fmt in ("int4", "nf4") else rows
    _check_group(int(group), rows, tuple(w.shape))
    if fmt in ("int4", "nf4") and group % 2:
        raise ValueError(f"group={group}: 4-bit codes pack two input rows per byte; use an even group")
    parts = _quantize_2d(w2.astype(jnp.float32), fmt=fmt, group=int(group), sym=sym, double_quant=double_quant)
    return QuantizedTensor(**parts, kind=fmt, block_size=int(group), shape=tuple(w.shape),
                           dtype=np.dtype(w.dtype).name, in_dims=len(in_shape), in_shape=in_shape,
                           out_shape=out_shape, transposed=transposed)


@functools.partial(jax.jit, static_argnames=("fmt", "group", "sym", "double_quant"))
def _quantize_2d(w: jax.Array, *, fmt: str, group: int, sym: bool, double_quant: bool) -> dict[str, Any]:
    *lead, rows, cols = w.shape
    blocks = w.reshape(*lead, rows // group, group, cols)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)
    out: dict[str, Any] = {}
    if fmt == "int8":
        scale = absmax / 127.0
        q = jnp.clip(jnp.round(_safe_divide(blocks, scale[..., None, :])), -127, 127)
        out["codes"] = q.astype(jnp.int8).reshape(*lead, rows, cols)
    elif fmt == "fp8":
        scale = absmax / FP8_MAX
        out["codes"] = _safe_divide(blocks, scale[..., None, :]).astype(jnp.float8_e4m3fn).reshape(*lead, rows, cols)
    elif fmt == "int4" and sym:
        scale = absmax / 7.0
        q = jnp.clip(jnp.round(_safe_divide(blocks, scale[..., None, :])), -7, 7) + 8
        out["codes"] = pack_rows(q.astype(jnp.uint8).reshape(*lead, rows, cols))
    elif fmt == "int4":
        low = jnp.minimum(jnp.min(blocks, axis=-2), 0.0)
        high = jnp.maximum(jnp.max(blocks, axis=-2), 0.0)
        scale = (high - low) / 15.0
        zero = jnp.clip(jnp.round(_safe_divide(-low, scale)), 0, 15)
        q = jnp.clip(jnp.round(_safe_divide(blocks, scale[..., None, :])) + zero[..., None, :], 0, 15)
        out["codes"] = pack_rows(q.astype(jnp.uint8).reshape(*lead, rows, cols))
        out["zero"] = zero.astype(jnp.uint8)
    else:  # nf4
        scale = absmax
        normalized = jnp.clip(_safe_divide(blocks, scale[..., None, :]), -1.0, 1.0)
        out["codes"] = pack_rows(_nearest(NF4_CODE, normalized).reshape(*lead, rows, cols))
    if fmt == "nf4" and double_quant:
        out.update(_quantize_lead_scales(scale))
    else:
        out["scales"] = scale
    return out


def _quantize_lead_scales(scale: jax.Array) -> dict[str, jax.Array]:
    """Double quantization of [*lead, G, O] scales, separately for each lead index (blocks of
    SCALE_BLOCK over the row-major [G, O] scales never cross layers or experts)."""
    *lead, g, o = scale.shape
    flat = scale.reshape(*lead, g * o)
    offset = jnp.mean(flat, axis=-1)
    centred = flat - offset[..., None]
    padded = jnp.pad(centred, [(0, 0)] * len(lead) + [(0, -(g * o) % SCALE_BLOCK)])
    scale_absmax = jnp.max(jnp.abs(padded.reshape(*lead, -1, SCALE_BLOCK)), axis=-1)
    normalized = padded.reshape(*lead, -1, SCALE_BLOCK) * _reciprocal(scale_absmax)[..., None]
    codes = _nearest(dynamic_code(), normalized).reshape(*lead, -1)[..., :g * o].reshape(*lead, g, o)
    return {"scales": codes, "scale_absmax": scale_absmax, "scale_offset": offset}


def _dequantize_lead_scales(codes: jax.Array, scale_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    *lead, g, o = codes.shape
    values = jnp.asarray(dynamic_code())[codes.astype(jnp.int32)].reshape(*lead, g * o)
    block = jnp.arange(g * o) // SCALE_BLOCK
    return (values * scale_absmax[..., block] + offset[..., None]).reshape(*lead, g, o)


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


# --- which axes of each kernel a matmul contracts, by parameter name ---------------------------

# leaf name -> (contracted axes, rank of the kernel without leading axes)
CONTRACTIONS = {
    "query": (1, 3), "key": (1, 3), "value": (1, 3),            # [D, N, H]
    "query_up": (1, 3), "key_up": (1, 3), "value_up": (1, 3),   # MLA [L or C, N, H]
    "out": (2, 3),                                               # [N, H, D]
    "wi": (1, 2), "wi_gate": (1, 2), "wi_up": (1, 2), "wo": (1, 2),  # [D, F], [F, D] (experts: [E, ...])
    "kv_down": (1, 2), "key_rope": (1, 2), "query_down": (1, 2),     # MLA [D, C], [D, R], [D, L]
    "proj": (1, 2), "lm_head": (1, 2),                               # MTP [2D, D], untied head [D, V]
}
EXPERT_KERNELS = ("wi_gate", "wi_up", "wo")
STACKED = ("layers", "dense_layers")  # `scan_layers=True` groups: one leading [L] axis
TOKEN_TABLES = re.compile(r"(^|/)(embed|word_embeddings)/embedding$")
# Stay float: norm scales, biases, routers and score heads, position and token-type tables,
# nn.Dense kernels (BERT's MLM transform, pooler and task heads), the value/score heads.
FLOAT_LEAVES = re.compile(r"((^|/)scale$)|(bias$)|((^|/)router$)|((^|/)score$)|(position)|(token_type)|"
                          r"((^|/)kernel$)|(_lora_)|(value_head)")


def contraction(path: str, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """(lead, contract_axes) for the float leaf at '/'-joined `path`, or None to keep it float.

    The rule (module docstring): the leaf's name gives the contracted axes and the kernel's own
    rank; a stacked group adds one leading axis, a MoE expert stack another; a token table
    [V, D] contracts D as its tied head (transposed). Raises a one-line ValueError for a matrix
    the rule does not know or a rank it does not expect."""
    name = path.rsplit("/", 1)[-1]
    if len(shape) < 2 or FLOAT_LEAVES.search(path):
        return None
    lead = 1 if path.split("/", 1)[0] in STACKED else 0
    if TOKEN_TABLES.search(path):
        if lead or len(shape) != 2:
            raise ValueError(f"cannot quantize the token table {path} of shape {shape}: expected [V, D]")
        return 0, (1,)
    if name not in CONTRACTIONS:
        raise ValueError(f"cannot quantize {path} of shape {shape}: no contraction rule for a parameter named "
                         f"{name!r} (models.quant.CONTRACTIONS)")
    in_dims, rank = CONTRACTIONS[name]
    if len(shape) == lead + rank + 1 and name in EXPERT_KERNELS:
        lead += 1  # MoE experts [E, D, F] / [E, F, D]
    if len(shape) != lead + rank:
        raise ValueError(f"cannot quantize {path} of shape {shape}: a {name!r} kernel has rank {rank}"
                         f"{' after its stacked axis' if lead else ''}")
    return lead, tuple(range(lead, lead + in_dims))


def contraction_rows(path: str, shape: tuple[int, ...]) -> int | None:
    """I, the contraction length a group must divide, for a leaf `contraction` quantizes."""
    rule = contraction(path, shape)
    return None if rule is None else math.prod(shape[a] for a in rule[1])


def kernel_group(fmt: str, group: int | None, rows: int) -> int:
    """The group of a kernel with `rows` contraction rows: int8/fp8 per output channel when
    `group` is None or 0, int4/nf4 128 when None; a group >= rows is one group of all rows."""
    if not group:
        group = 128 if fmt in ("int4", "nf4") and group is None else rows
    return min(int(group), rows)


def check_groups(params: Any, fmt: str, group: int | None, option: str = "group") -> None:
    """A one-line ValueError naming `option` if `group` does not divide some kernel's contraction
    rows (checked from shapes, before any quantization)."""
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        rows = contraction_rows(_path(path), tuple(x.shape))
        if rows is None:
            continue
        g = kernel_group(fmt, group, rows)
        if rows % g or (fmt in ("int4", "nf4") and g % 2):
            raise ValueError(f"{option}={group} does not divide the contraction dimension {rows} of {_path(path)} "
                             f"{tuple(x.shape)}; groups that work: {[d for d in group_divisors(rows) if d <= 512]}")


def quantize_params(params: Any, *, fmt: str, group: int | None = None, sym: bool = True,
                    double_quant: bool = True) -> Any:
    """`params` (unboxed float arrays) with every kernel `contraction` names quantized by
    `quantize_weight` (the kernel layout; each kernel's group by `kernel_group`), the rest as
    they are."""
    check_groups(params, fmt, group)

    def one(path, x):
        rule = contraction(_path(path), tuple(x.shape))
        if rule is None:
            return x
        lead, axes = rule
        g = kernel_group(fmt, group, math.prod(x.shape[a] for a in axes))
        return quantize_weight(x, fmt=fmt, group=g, sym=sym, contract_axes=axes, lead=lead,
                               double_quant=double_quant)

    return jax.tree_util.tree_map_with_path(one, params)


def describe(tree: Any) -> dict[str, dict[str, Any]]:
    """{path: what `abstract_stored` needs to rebuild it} for every kernel-layout QuantizedTensor
    of a params tree: its format, group, zero point, double quantization, W8A8 flag and
    contraction (lead, contract_axes). JSON-able: a compressed checkpoint's config records it."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_quantized):
        if not is_quantized(x):
            continue
        if not x.is_kernel:
            raise ValueError(f"{_path(path)}: a QLoRA-layout tensor is not an inference kernel")
        lead = 0 if x.transposed else len(x.shape) - len(x.in_shape) - len(x.out_shape)
        out[_path(path)] = {"format": x.kind, "group": x.block_size, "sym": x.zero is None,
                            "double_quant": x.double_quant, "act_quant": x.act_quant, "lead": lead,
                            "contract_axes": [1] if x.transposed else list(range(lead, lead + x.in_dims))}
    return out


def abstract_stored(abstract: Any, described: Mapping[str, Mapping[str, Any]]) -> Any:
    """The stored tree of a compressed checkpoint: `abstract` (the float model's params as
    ShapeDtypeStructs, shardings kept on the unquantized leaves) with each `described` path
    replaced by its QuantizedTensor of ShapeDtypeStructs (on the float leaf's device, or
    replicated over its mesh: a kernel's split does not fit its packed fields)."""
    def one(path, x):
        d = described.get(_path(path))
        if d is None:
            return x
        make = functools.partial(quantize_weight, fmt=d["format"], group=int(d["group"]), sym=bool(d["sym"]),
                                 contract_axes=tuple(d["contract_axes"]), lead=int(d["lead"]),
                                 double_quant=bool(d["double_quant"]))
        q = jax.eval_shape(make, jax.ShapeDtypeStruct(x.shape, x.dtype)).replace(act_quant=bool(d["act_quant"]))
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):  # the kernel's split does not fit its fields: replicate
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.tree_util.tree_map(lambda f: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=sharding), q)

    missing = set(described) - {_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)}
    if missing:
        raise ValueError(f"the compressed checkpoint describes parameters the model does not have: {sorted(missing)[:3]}")
    return jax.tree_util.tree_map_with_path(one, abstract)


def tree_nbytes(tree: Any) -> int:
    """Bytes of every stored array of a params tree (QuantizedTensor fields included)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


ARRAY_FIELDS = ("codes", "scales", "scale_absmax", "scale_offset", "zero")


def to_plain(tree: Any) -> Any:
    """`tree` with each QuantizedTensor replaced by a dict of its arrays ({"codes": ..., "scales":
    ...}): nested dicts only, for formats that store no pytree classes (`jax.export`, npz)."""
    return jax.tree_util.tree_map(
        lambda x: {f: getattr(x, f) for f in ARRAY_FIELDS if getattr(x, f) is not None} if is_quantized(x) else x,
        tree, is_leaf=is_quantized)


def from_plain(plain: Any, like: Any) -> Any:
    """The inverse of `to_plain`: `like`'s QuantizedTensors (their static fields) with the arrays
    of `plain` (traced or concrete)."""
    def one(path, x):
        if not is_quantized(x):
            return _lookup(plain, path)
        arrays = _lookup(plain, path)
        return x.replace(**{f: arrays.get(f) for f in ARRAY_FIELDS})

    return jax.tree_util.tree_map_with_path(one, like, is_leaf=is_quantized)


def _lookup(tree: Any, path) -> Any:
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", None))]
    return tree
