"""Token-wise matmuls laid out for the backward pass: every token's features times a kernel.

    y_BTF = linear.project(x_BTD, w_DF)                 # jnp.einsum("BTD,DF->BTF", ...)
    q_BTNH = linear.project(x_BTD, w_DNH)               # jnp.einsum("BTD,DNH->BTNH", ...)
    out_BTD = linear.project(o_BTNH, w_NHD, in_dims=2)  # jnp.einsum("BTNH,NHD->BTD", ...)

The same arithmetic as the einsum (one dot, the same contraction), but the leading (token)
axes and the kernel's input and output axes are each merged first, so the dot is 2-D. Its
weight gradient is then one dot contracting the B*T tokens, which XLA's CPU backend computes
in place; from a 3-D einsum it writes the [F, B*T] activation gradient transposed into a
copy first (issue 15: the SwiGLU MLP's forward and backward at B8 T256 D512 F1344 took
447 ms CPU as a 3-D einsum and 338 ms as this, bitwise-equal gradients, on 2 CPU cores).
The merges are reshapes of contiguous axes: free in memory.

A quantized kernel (`models.quant.QuantizedTensor`, what the layers pass as they got it from
`kernel_param`) is dequantized here, inside the caller's jitted computation: the jit takes the
integer codes and scales as arguments and no float copy of the weights exists outside it.
With `act_quant` (W8A8, SmoothQuant's execution) the activations are quantized per token
instead, s_x[t] = max_i |x[t, i]| / 127, and the dot runs in integers,
    y[t, o] = (sum_i q_x[t, i] q_w[i, o]) * s_x[t] * s_w[o]      (int8 x int8 -> int32).

Except under context parallelism: when the logical rules split the sequence (`act_seq`) over
a mesh axis of its own while the batch takes another, B*T tokens merged into one axis cannot
keep both splits (a device's tokens are not one contiguous run of the merged axis) and XLA
would all-gather the sequence before every projection. There the dot keeps the token axes
(`jnp.tensordot`, one dot_general: the einsum itself). Sequence parallelism (tp_sp) gives `act_seq` the axis
that the feature dimensions also take, so it gathers the sequence by design and stays 2-D.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from models import quant


def project(x: jax.Array, w: jax.Array, *, in_dims: int = 1) -> jax.Array:
    """x [..., *I] @ w [*I, *O] -> [..., *O], the `in_dims` trailing axes of x contracted.

    Args:
      x: activations; their last `in_dims` axes match w's first `in_dims` axes.
      w: the kernel.
      in_dims: how many axes are contracted.

    Returns:
      x's leading axes followed by w's output axes, in the result dtype of the einsum.
    """
    if quant.is_quantized(w):
        if w.transposed or w.lead_shape or w.in_dims != in_dims:
            raise ValueError(f"project: a quantized kernel of shape {w.logical_shape} (in_dims={w.in_dims}, transposed="
                             f"{w.transposed}) cannot contract {in_dims} axes as a plain kernel")
        if w.act_quant:
            return _project_w8a8(x, w)
        w = w.dequantize()
    ins, outs = w.shape[:in_dims], w.shape[in_dims:]
    if x.shape[x.ndim - in_dims:] != ins:
        raise ValueError(f"project: activations {x.shape} do not end in the kernel's input axes {ins}")
    lead = x.shape[:x.ndim - in_dims]
    if len(lead) > 1 and sequence_split():
        return jnp.tensordot(x, w, axes=in_dims)
    y = jnp.dot(x.reshape(math.prod(lead), math.prod(ins)), w.reshape(math.prod(ins), math.prod(outs)))
    return y.reshape(*lead, *outs)


def sequence_split() -> bool:
    """Whether the current logical rules keep the sequence split through a token-wise matmul:
    `act_seq` maps to a mesh axis beside `act_batch` and `act_mlp` (context parallelism)."""
    return nn.logical_to_mesh_axes(("act_batch", "act_seq", "act_mlp"))[1] is not None


def _project_w8a8(x: jax.Array, w: quant.QuantizedTensor) -> jax.Array:
    """W8A8: per-token dynamic int8 activations times int8 per-channel weights, int32 accumulation."""
    if x.shape[x.ndim - w.in_dims:] != w.in_shape:
        raise ValueError(f"project: activations {x.shape} do not end in the kernel's input axes {w.in_shape}")
    lead = x.shape[:x.ndim - w.in_dims]
    x_MI = x.reshape(math.prod(lead), math.prod(w.in_shape)).astype(jnp.float32)
    scale_M = jnp.max(jnp.abs(x_MI), axis=-1) / 127.0
    q_MI = jnp.round(x_MI / jnp.where(scale_M > 0, scale_M, 1.0)[:, None]).astype(jnp.int8)
    acc_MO = jax.lax.dot(q_MI, w.codes, preferred_element_type=jnp.int32)
    y_MO = acc_MO.astype(jnp.float32) * scale_M[:, None] * w.scales[0][None, :]
    return y_MO.astype(x.dtype).reshape(*lead, *w.out_shape)


def kernel_param(module: nn.Module, name: str, init, shape: tuple, dtype, axes: tuple | None = None):
    """`module.param(name, ...)` (with logical `axes` when given), or the stored QuantizedTensor
    as it is: flax checks a stored param's first leaf against the init's shape, and a quantized
    kernel's codes are packed (and per-slice under nn.scan), so the check would refuse it."""
    if module.has_variable("params", name):
        stored = meta.unbox(module.get_variable("params", name))
        if quant.is_quantized(stored):
            return stored
    return module.param(name, nn.with_logical_partitioning(init, axes) if axes is not None else init, shape, dtype)


def sow_input(module: nn.Module, name: str, x: jax.Array) -> None:
    """Records `x`, the input of kernel(s) `name`, in the `layer_inputs` collection when the caller
    made it mutable (calibration, `compress.calibration`); a no-op otherwise. Never at init, so
    `model.init` returns the params collection alone (and random draws over its collections, e.g.
    `models.random_params`, do not depend on it)."""
    if not module.is_initializing():
        module.sow("layer_inputs", name, x)
