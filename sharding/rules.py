"""Helpers that map logical axis names to mesh shardings.

Models name logical axes only (`embed`, `heads`, `mlp`, `vocab`, `act_batch`, ...). The
tables that map them to mesh axes, one per strategy (dp, ZeRO-1/2/3, FSDP, pipeline, Megatron
TP/SP, EP), live in `sharding/strategies.py`; `sharding/layout.py` turns them into the
shardings of a train state and `sharding/step.py` jits the step with them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.strategies import get_strategy


def rules_for(strategy: str, mesh: Mesh | None = None) -> tuple[tuple[str, Any], ...]:
    """The logical axis rules to trace a model under for `strategy` (its activation table), for
    the axes `mesh` has (None: all the strategy's axes); "dp" gives (("act_batch", "data"),).
    Parameters, gradients and optimizer state are laid out by `sharding.layout.state_layout`."""
    return get_strategy(strategy).activation_rules(mesh)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` (or plain) leaves."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a [B, T] batch: B over the mesh axes `act_batch` maps to."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch", None), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(batch_size: int, mesh: Mesh, rules, name: str = "data.batch_size") -> None:
    """Raises if a batch of `batch_size` rows cannot be split over the batch's mesh axes."""
    spec = nn.logical_to_mesh_axes(("act_batch",), rules)[0]
    axes = (spec,) if isinstance(spec, str) else (spec or ())
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    if batch_size % size:
        raise ValueError(f"{name}={batch_size} is not divisible by the {size} devices of mesh axes {axes}; "
                         f"use a multiple of {size} or a smaller mesh (sharding.mesh)")


def device_put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Places this process's rows of a global batch onto the mesh (multi-process aware)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
