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


def project(x: jax.Array, w: jax.Array, *, in_dims: int = 1) -> jax.Array:
    """x [..., *I] @ w [*I, *O] -> [..., *O], the `in_dims` trailing axes of x contracted.

    Args:
      x: activations; their last `in_dims` axes match w's first `in_dims` axes.
      w: the kernel.
      in_dims: how many axes are contracted.

    Returns:
      x's leading axes followed by w's output axes, in the result dtype of the einsum.
    """
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
