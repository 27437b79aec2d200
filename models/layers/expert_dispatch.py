"""Expert parallelism by explicit all-to-all (GShard, DeepSpeed-MoE): routed tokens travel to
the devices that hold their experts and back, inside `jax.shard_map`.

Axis letters: B batch rows, T length, D model width, F expert hidden width, E experts,
L experts held per device (E / N), K choices per token, G tokens of one device (B * T),
A assignments of one device (G * K), S slots per expert per source device, N devices along
the expert mesh axis.

The layer names no mesh axis. At trace time `mesh_axes` reads the logical axis rules in
force (`nn.logical_axis_rules`, set by `sharding.layout.Layout.tracing`): the mesh axis that
logical `expert` maps to carries the all-to-alls, the axes of `act_batch` split the tokens.
Without a mesh or rules, or for a batch whose rows do not split over the batch axes (the
one-row sample `init` traces), the same code runs on one shard (every collective is the
identity), which is what a single device computes.

Capacity mode (`capacity`: C > 0), with exactly the single-device semantics of
`models.layers.moe._dispatch` (C slots per expert over the WHOLE batch, filled choice-major:
every token's first choice in global token order, then the second choices, ...):

    counts [K, E] per device -> all-gather over the batch axes -> each assignment's global slot
    (its choice's earlier assignments everywhere + earlier devices' + its own rank); kept if < C
    dispatch one-hot [G, E, S]  ->  x [E, S, D]  --all-to-all over expert-->  [N, L, S, D]
    local experts on [L, N * S, D]  --all-to-all back-->  y [E, S, D]  ->  combine [G, E, S]

A device's kept assignments to one expert are at most min(C, G) (a token picks an expert
once), so S = min(C, G) slots per (source, expert) hold them whatever the routing: an exact
bound, not a second capacity.

Sparse dropless mode (`capacity` 0): every assignment is computed.

    assignments sorted by expert; rows per expert [E] --all-to-all--> rows per local expert
    from each source [N, L]; the rows, in a padded buffer [N, A, D] (destination n gets rows
    [0, count_n) of its slot) --all-to-all--> [N, A, D]; regrouped by local expert, the
    grouped matmuls of models/layers/grouped_matmul.py (padding rows give 0), back by
    all-to-all, unsorted, weighted, summed over K.

Shapes are static, so the buffer is sized for the worst case (all A assignments of a source
to one destination): each device receives N * A rows and runs the grouped matmuls over
them, N times the rows a balanced routing needs. `jax.lax.ragged_all_to_all`, which sends
only the counted rows, exists in this JAX but XLA:CPU cannot compile it ("HLO opcode
`ragged-all-to-all` is not supported by XLA:CPU"), so the padded buffer is used everywhere.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from models.layers.grouped_matmul import grouped_matmul


def mesh_axes() -> tuple[jax.sharding.AbstractMesh | None, str | None, tuple[str, ...]]:
    """(mesh, expert axis, batch axes) from the abstract mesh and logical axis rules in force.

    The expert axis is the mesh axis logical `expert` maps to (None: experts are not split);
    the batch axes those of `act_batch`. With no mesh (or a mesh the rules use none of) the
    mesh is None.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return None, None, ()
    # Resolved one at a time: in one call flax would give each mesh axis to one dimension only.
    (expert,), (batch,) = nn.logical_to_mesh_axes(("expert",)), nn.logical_to_mesh_axes(("act_batch",))
    if expert is not None and not isinstance(expert, str):
        if len(expert) != 1:
            raise ValueError(f"dispatch='all_to_all' sends tokens over one mesh axis, but logical `expert` maps to "
                             f"{tuple(expert)}; map it to a single axis")
        expert = expert[0]
    batch = () if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
    if expert is not None and expert not in batch:
        raise ValueError(f"dispatch='all_to_all' needs the tokens split over the expert mesh axis `{expert}` too "
                         f"(logical `act_batch` maps to {batch}); use a strategy that splits the batch over it "
                         f"(ep) or dispatch='auto'")
    if expert is None and not batch:
        return None, None, ()
    return mesh, expert, batch


def routed_experts(x_BTD: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array, gate_EDF: jax.Array,
                   up_EDF: jax.Array, down_EFD: jax.Array, *, capacity: int, impl: str = "auto"
                   ) -> tuple[jax.Array, jax.Array]:
    """The routed SwiGLU experts with tokens moved by all-to-all (module docstring).

    Args:
      x_BTD: the tokens (the compute dtype).
      experts_BTK, weights_BTK: each token's K chosen experts and their routing weights.
      gate_EDF, up_EDF, down_EFD: the expert weights.
      capacity: C, slots per expert over the whole batch (0: dropless).
      impl: dropless mode's grouped matmul (`grouped_matmul.GROUPED_MATMULS`).

    Returns:
      (y_BTD, kept_BTK): sum_k weight * Expert(x) over the kept assignments, and which
      assignments were kept (all of them when dropless).
    """
    mesh, expert, batch = mesh_axes()
    if mesh is not None and x_BTD.shape[0] % math.prod(mesh.shape[a] for a in batch):
        mesh, expert, batch = None, None, ()  # rows that do not split (init's one-row sample): one shard
    body = functools.partial(_capacity if capacity else _dropless, expert_axis=expert, batch_axes=batch,
                             capacity=capacity, impl=impl)
    if mesh is None:
        return body(x_BTD, experts_BTK, weights_BTK, gate_EDF, up_EDF, down_EFD)
    rows, experts = PartitionSpec(batch), PartitionSpec(expert)
    return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, experts, experts, experts),
                         out_specs=(rows, rows))(x_BTD, experts_BTK, weights_BTK, gate_EDF, up_EDF, down_EFD)


def _all_to_all(x: jax.Array, axis: str | None) -> jax.Array:
    """Block n of the leading axis to device n of `axis`; the result's block n came from device n."""
    return x if axis is None else jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def _swiglu(x_LRD, gate_LDF, up_LDF, down_LFD):
    h_LRF = jax.nn.silu(jnp.einsum("LRD,LDF->LRF", x_LRD, gate_LDF)) * jnp.einsum("LRD,LDF->LRF", x_LRD, up_LDF)
    return jnp.einsum("LRF,LFD->LRD", h_LRF, down_LFD)


def _capacity(x_BTD, experts_BTK, weights_BTK, gate_LDF, up_LDF, down_LFD, *, expert_axis, batch_axes, capacity,
              impl):
    """One device's share of capacity mode; the expert weights are its L experts."""
    del impl
    B, T, D = x_BTD.shape
    K = experts_BTK.shape[-1]
    L = gate_LDF.shape[0]
    N = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
    E, G, C = N * L, B * T, capacity
    S = min(C, G)
    mask_KGE = jax.nn.one_hot(experts_BTK.reshape(G, K).T, E, dtype=jnp.int32)
    local_KE = jnp.sum(mask_KGE, 1)
    rank_KGE = jnp.cumsum(mask_KGE, 1) - 1  # among this device's choice-k assignments to e
    if batch_axes:
        every_NKE = jax.lax.all_gather(local_KE, batch_axes)
        me = jax.lax.axis_index(batch_axes)
        before_KE = jnp.sum(jnp.where((jnp.arange(every_NKE.shape[0]) < me)[:, None, None], every_NKE, 0), 0)
        total_KE = jnp.sum(every_NKE, 0)
    else:
        before_KE, total_KE = jnp.zeros_like(local_KE), local_KE
    earlier_KE = jnp.cumsum(total_KE, 0) - total_KE  # every device's assignments of earlier choices
    slot_of = lambda offset_KE: jnp.sum((rank_KGE + offset_KE[:, None]) * mask_KGE, -1)
    kept_KG = slot_of(earlier_KE + before_KE) < C
    # Kept assignments are a prefix of this device's choice-major order per expert: local rank < S.
    local_KG = slot_of(jnp.cumsum(local_KE, 0) - local_KE)
    slot_KGS = jax.nn.one_hot(jnp.where(kept_KG, local_KG, S), S, dtype=jnp.float32)
    mask_KGE = mask_KGE.astype(jnp.float32)
    dispatch_GES = jnp.einsum("KGE,KGS->GES", mask_KGE, slot_KGS).astype(x_BTD.dtype)
    combine_GES = jnp.einsum("KGE,KGS,KG->GES", mask_KGE, slot_KGS,
                             weights_BTK.reshape(G, K).T.astype(jnp.float32)).astype(x_BTD.dtype)
    x_ESD = jnp.einsum("GES,GD->ESD", dispatch_GES, x_BTD.reshape(G, D))
    x_NLSD = _all_to_all(x_ESD.reshape(N, L, S, D), expert_axis)
    y_LNSD = _swiglu(x_NLSD.transpose(1, 0, 2, 3).reshape(L, N * S, D), gate_LDF, up_LDF,
                     down_LFD).reshape(L, N, S, D)
    y_ESD = _all_to_all(y_LNSD.transpose(1, 0, 2, 3), expert_axis).reshape(E, S, D)
    y_GD = jnp.einsum("GES,ESD->GD", combine_GES, y_ESD)
    return y_GD.reshape(B, T, D), kept_KG.T.reshape(B, T, K)


def _dropless(x_BTD, experts_BTK, weights_BTK, gate_LDF, up_LDF, down_LFD, *, expert_axis, batch_axes, capacity,
              impl):
    """One device's share of sparse dropless mode; the expert weights are its L experts."""
    del batch_axes, capacity
    B, T, D = x_BTD.shape
    K = experts_BTK.shape[-1]
    L = gate_LDF.shape[0]
    N = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
    E, A = N * L, B * T * K
    experts_A = experts_BTK.reshape(A)  # token-major: assignment a is token a // K
    order_A = jnp.argsort(experts_A, stable=True)
    sizes_NL = jnp.sum(jax.nn.one_hot(experts_A, E, dtype=jnp.int32), 0).reshape(N, L)
    count_N = jnp.sum(sizes_NL, -1)
    start_N = jnp.cumsum(count_N) - count_N
    x_AD = x_BTD.reshape(B * T, D)[order_A // K]
    r_A = jnp.arange(A)
    send_NAD = jnp.where((r_A < count_N[:, None])[..., None],
                         x_AD[jnp.minimum(start_N[:, None] + r_A, A - 1)], 0)
    received_NL = _all_to_all(sizes_NL, expert_axis)  # rows per local expert from each source
    x_NAD = _all_to_all(send_NAD, expert_axis)
    # Each source's rows are sorted by local expert; rows past its total are padding (group L).
    local_NA = jax.vmap(lambda ends, r: jnp.searchsorted(ends, r, side="right"))(jnp.cumsum(received_NL, -1),
                                                                                  jnp.broadcast_to(r_A, (N, A)))
    regroup_R = jnp.argsort(local_NA.reshape(N * A), stable=True)
    x_RD = x_NAD.reshape(N * A, D)[regroup_R][None]
    sizes_1L = jnp.sum(received_NL, 0)[None]

    def grouped(lhs, rhs):
        return grouped_matmul(lhs, rhs, sizes_1L, impl)

    y_RD = grouped(jax.nn.silu(grouped(x_RD, gate_LDF)) * grouped(x_RD, up_LDF), down_LFD)[0]
    y_NAD = _all_to_all(y_RD[jnp.argsort(regroup_R)].reshape(N, A, D), expert_axis)
    dest_A = experts_A[order_A] // L
    y_AD = y_NAD[dest_A, r_A - start_N[dest_A]][jnp.argsort(order_A)]
    y_BTD = jnp.einsum("BTKD,BTK->BTD", y_AD.reshape(B, T, K, D), weights_BTK)
    return y_BTD, jnp.ones(experts_BTK.shape, bool)
