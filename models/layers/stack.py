"""Running a stack of identical layers: a Python loop or one `nn.scan`, with optional remat.

A loop creates L layers named `layer_{i}`; XLA compiles each. `nn.scan` creates one layer
whose parameters are stacked on a leading axis (logical name "layers") and runs it L
times: one layer compiles, whatever the depth, for the same outputs. `stack_layers` and
`unstack_layers` move parameters between the two layouts (checkpoint converters read and
write the per-layer one).

Remat (`jax.checkpoint`) recomputes a layer's activations in the backward pass instead of
keeping them: "full" keeps only the layer's input, "dots_saveable" keeps matmul outputs,
"nothing_saveable" keeps nothing it can recompute.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers.blocks import BlockConfig, EncoderLayer

REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")
# Collections whose variables each layer has its own of: stacked on scan's leading axis.
PER_LAYER_COLLECTIONS = {"params": 0, "intermediates": 0, "cache": 0, "layer_inputs": 0}


class ScanStep(EncoderLayer):
    """An EncoderLayer with the calling convention of `nn.scan`: positional arguments and
    a (carry, output) return, so that a stack of them runs as one scanned layer."""

    def __call__(self, x_BTD, deterministic, positions, segment_ids, padding_mask):
        return super().__call__(x_BTD, deterministic, positions=positions, segment_ids=segment_ids,
                                padding_mask=padding_mask), None


def check_remat(policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r}; expected one of {REMAT_POLICIES}")


def layer_class(policy: str, scanned: bool = False):
    """EncoderLayer (or ScanStep), wrapped in `nn.remat` with the policy unless "none"."""
    check_remat(policy)
    cls = ScanStep if scanned else EncoderLayer
    if policy == "none":
        return cls
    jax_policy = {
        "full": None,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    }[policy]
    # static_argnums counts `self`: argument 2 is `deterministic`.
    return nn.remat(cls, policy=jax_policy, static_argnums=(2,))


def scanned_layers(block: BlockConfig, *, length: int, causal: bool, remat: str = "none",
                   name: str | None = None) -> nn.Module:
    """`length` layers as one scanned module; call it as
    `x, _ = layers(x, deterministic, positions, segment_ids, padding_mask)`."""
    stack = nn.scan(layer_class(remat, scanned=True), variable_axes=PER_LAYER_COLLECTIONS,
                    split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * 4, length=length,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    return stack(block, causal=causal, name=name)


def stack_layers(params: Mapping, groups: list[tuple[str, int, int]]) -> dict:
    """Per-layer params (`layer_{i}`) -> stacked: each (name, start, stop) group becomes one
    subtree `name` whose leaves have a leading axis of stop - start."""
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    for name, start, stop in groups:
        out[name] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(params[f"layer_{i}"]
                                                                         for i in range(start, stop)))
    return out


def unstack_layers(params: Mapping, groups: list[tuple[str, int, int]]) -> dict:
    """The inverse of `stack_layers`."""
    out = {k: v for k, v in params.items() if k not in {name for name, _, _ in groups}}
    for name, start, stop in groups:
        for i in range(start, stop):
            out[f"layer_{i}"] = jax.tree_util.tree_map(lambda x, j=i - start: x[j], params[name])
    return out
