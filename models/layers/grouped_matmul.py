"""Grouped matmul: rows sorted by group, each group multiplied by its own matrix.

    out[b, a] = lhs[b, a] @ rhs[e]   for row a of batch row b in group e

Axis letters: B batch rows, A rows (sorted by group: group e holds sizes[b, e] consecutive
rows), D contracted width, F output width, E groups (experts), P padded rows, N tiles of
TILE_ROWS rows (P = N * TILE_ROWS).

Two implementations, same result up to float rounding:

* `ragged_dot`: `jax.lax.ragged_dot_general`. On TPU and GPU XLA runs it natively over the
  routed rows only; on CPU JAX lowers it to a dense dot over every group of a masked copy of
  the rows (E times the routed FLOPs).
* `tiled` (MegaBlocks-style block padding): each group's rows are padded to a multiple of
  TILE_ROWS, so every tile of TILE_ROWS rows belongs to one group; a `lax.scan` over the tiles
  multiplies each by its group's [D, F] matrix (fetched by index, never a [N, D, F] gather).
  The padded row count is static, P = A + E * (TILE_ROWS - 1) rounded up to a multiple of
  TILE_ROWS (the most that padding every group can add); tiles past the last group hold zero
  rows whose results are dropped. FLOPs ~ (A + E * TILE_ROWS) * 2 * D * F instead of
  ragged_dot-on-CPU's E * A * 2 * D * F.

`grouped_matmul(..., impl="auto")` picks `tiled` when lowered for CPU and `ragged_dot`
elsewhere (`jax.lax.platform_dependent`: only the chosen branch is compiled).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUPED_MATMULS = ("auto", "ragged_dot", "tiled")
# Rows per tile of the tiled path. Each group wastes up to TILE_ROWS - 1 padded rows, and each
# tile is one scan step: 16 keeps the padding small next to A for E up to ~A / 16 while a
# [16, D] x [D, F] step is still a matmul worth a loop iteration on CPU.
TILE_ROWS = 16
# x [B, A, D] . w [E, D, F] -> [B, A, F]: rows of A grouped by expert, group sizes [B, E].
_GROUPED_ROWS = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([2], [1]), ([], [])),
                                                  lhs_ragged_dimensions=[1], rhs_group_dimensions=[0])


def padded_rows(num_rows: int, num_groups: int, tile_rows: int = TILE_ROWS) -> int:
    """P: the static row count of the tiled path, enough for any split of `num_rows` into groups."""
    return -(-(num_rows + num_groups * (tile_rows - 1)) // tile_rows) * tile_rows


def ragged_dot(lhs_BAD: jax.Array, rhs_EDF: jax.Array, sizes_BE: jax.Array) -> jax.Array:
    """The grouped matmul as one `jax.lax.ragged_dot_general`."""
    return jax.lax.ragged_dot_general(lhs_BAD, rhs_EDF, sizes_BE, _GROUPED_ROWS)


def _tiled_row(lhs_AD: jax.Array, rhs_EDF: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """One batch row of `tiled`."""
    A, D = lhs_AD.shape
    E, _, F = rhs_EDF.shape
    m = TILE_ROWS
    P = padded_rows(A, E)
    ends_E = jnp.cumsum(sizes_E)
    starts_E = ends_E - sizes_E
    padded_E = -(-sizes_E // m) * m
    padded_ends_E = jnp.cumsum(padded_E)
    padded_starts_E = padded_ends_E - padded_E
    # Padded row p -> its group (E past the last group) and the source row it copies.
    p_P = jnp.arange(P)
    group_P = jnp.searchsorted(padded_ends_E, p_P, side="right")
    safe_P = jnp.minimum(group_P, E - 1)
    local_P = p_P - padded_starts_E[safe_P]
    valid_P = (group_P < E) & (local_P < sizes_E[safe_P])
    x_PD = jnp.where(valid_P[:, None], lhs_AD[jnp.where(valid_P, starts_E[safe_P] + local_P, 0)], 0)

    def tile(_, xs):
        x_mD, e = xs
        return None, x_mD @ jax.lax.dynamic_index_in_dim(rhs_EDF, e, 0, keepdims=False)

    # Groups start on tile boundaries, so a tile's group is its first row's (trailing tiles:
    # clamped to E - 1, zero rows).
    _, y_NmF = jax.lax.scan(tile, None, (x_PD.reshape(P // m, m, D), safe_P[::m]))
    y_PF = y_NmF.reshape(P, F)
    # Row a -> its padded position; rows past sum(sizes) belong to no group and give 0 (as ragged_dot).
    a_A = jnp.arange(A)
    group_A = jnp.searchsorted(ends_E, a_A, side="right")
    safe_A = jnp.minimum(group_A, E - 1)
    y_AF = y_PF[padded_starts_E[safe_A] + a_A - starts_E[safe_A]]
    return jnp.where((group_A < E)[:, None], y_AF, 0)


def tiled(lhs_BAD: jax.Array, rhs_EDF: jax.Array, sizes_BE: jax.Array) -> jax.Array:
    """The grouped matmul as a scan over block-padded tiles (module docstring), per batch row."""
    return jax.vmap(_tiled_row, in_axes=(0, None, 0))(lhs_BAD, rhs_EDF, sizes_BE)


def grouped_matmul(lhs_BAD: jax.Array, rhs_EDF: jax.Array, sizes_BE: jax.Array, impl: str = "auto") -> jax.Array:
    """out[b, a] = lhs[b, a] @ rhs[group of row a in batch row b].

    Args:
      lhs_BAD: rows sorted by group within each batch row.
      rhs_EDF: one matrix per group.
      sizes_BE: rows per group (int), summing to at most A per batch row.
      impl: "ragged_dot", "tiled", or "auto" (tiled on CPU, ragged_dot elsewhere).

    Returns:
      out_BAF (zero for rows past the last group).
    """
    if impl == "auto":
        return jax.lax.platform_dependent(lhs_BAD, rhs_EDF, sizes_BE, cpu=tiled, default=ragged_dot)
    if impl == "ragged_dot":
        return ragged_dot(lhs_BAD, rhs_EDF, sizes_BE)
    if impl == "tiled":
        return tiled(lhs_BAD, rhs_EDF, sizes_BE)
    raise ValueError(f"grouped matmul impl={impl!r}; expected one of {GROUPED_MATMULS}")
