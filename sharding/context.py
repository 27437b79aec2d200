"""Context parallelism's token order: zig-zag chunks, so causal attention is balanced.

Under a strategy with a `context` axis of C devices (`cp`, `fsdp_cp`) every activation is split
along the sequence into C contiguous slices, and ring attention (`models.layers.ring_attention`)
passes key/value slices around the C devices. With causal attention in the natural token order
device C-1 attends to every slice and device 0 to one: the ring waits for the slowest. Cutting
the sequence into 2C chunks and giving device r the chunks r and 2C-1-r (zig-zag, Brandon et al.
2023 "Striped Attention" / Megatron-LM's context parallelism) gives every device the same number
of live (query, key) pairs: ring attention skips the fully masked chunk pairs.

The reordering is applied once per step to the token batch, inside the jitted step
(`sharding.step.build`), where the batch is still whole along the sequence on each device (it
is split over the batch axes only), so it moves no data between devices. Nothing downstream
depends on the order: RoPE and the attention masks read the batch's `positions` and
`segment_ids` (reordered with the tokens), and the loss sums over tokens weighted by the
reordered `loss_mask`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.strategies import CONTEXT, Strategy


def ring_size(strategy: Strategy, mesh: Mesh) -> int:
    """C: the devices of the `context` axis the strategy splits the sequence over (1: none)."""
    return mesh.shape[CONTEXT] if CONTEXT in strategy.mesh_axes and CONTEXT in mesh.shape else 1


def zigzag_order(seq_len: int, ring: int) -> np.ndarray:
    """[T] int: position p of the reordered sequence holds token order[p]; its r-th contiguous
    slice of T / C tokens is chunk r followed by chunk 2C-1-r (of 2C equal chunks).

    Raises a ValueError unless T is a multiple of 2C."""
    if seq_len % (2 * ring):
        raise ValueError(f"zig-zag context parallelism cuts the sequence ({seq_len} tokens) into 2 x {ring} equal "
                         f"chunks; use a sequence length that is a multiple of {2 * ring}")
    chunks = np.arange(seq_len).reshape(2 * ring, seq_len // (2 * ring))
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * ring - 1 - r]]) for r in range(ring)])


def zigzag_batch(batch: dict, seq_len: int, ring: int) -> dict:
    """The batch with every leaf of shape [B, T, ...] (T = seq_len) reordered by `zigzag_order`
    along its second axis; other leaves unchanged."""
    order = zigzag_order(seq_len, ring)

    def one(x):
        return x[:, order] if x.ndim >= 2 and x.shape[1] == seq_len else x

    return jax.tree.map(one, batch)
