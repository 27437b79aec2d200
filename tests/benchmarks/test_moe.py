"""benchmarks/moe.py runs in quick mode and reports sane FLOPs and ratios for dense and sparse dropless
(ragged_dot and tiled grouped matmuls); its loop-aware matmul FLOP count agrees with XLA's on loops.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import pytest

from models.layers.grouped_matmul import padded_rows

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmark():
    spec = importlib.util.spec_from_file_location("moe_benchmark", os.path.join(REPO, "benchmarks", "moe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_benchmark_quick_mode(capsys):
    moe = _benchmark()
    (row,) = moe.main(["--quick", "--settings=8x2"])
    assert set(row) == set(moe.FIELDS)
    assert (row["experts"], row["top_k"]) == (8, 2)
    assert row["all_expert_flops"] == 4 * row["routed_flops"] > 0
    # The dense reference multiplies every token through every expert; the sparse paths at least
    # through their routed ones (ragged_dot: exactly those on TPU/GPU, all E groups of masked rows
    # on CPU; tiled: the routed rows plus at most TILE_ROWS - 1 padded rows per expert and batch row).
    assert row["dense_flops"] >= row["all_expert_flops"]
    # matmul_flops counts only the matmuls XLA also counts (plus its elementwise work).
    assert 0.9 * row["dense_flops"] <= row["dense_matmul_flops"] <= row["dense_flops"]
    assert row["ragged_dot_flops"] >= row["routed_flops"]
    if not row["native_ragged_dot"]:  # JAX's fallback (CPU): every routed row through all E experts
        assert row["ragged_dot_flops"] >= row["experts"] * row["routed_flops"]
    size = moe.sizes(quick=True)
    padded = size["B"] * padded_rows(size["T"] * 2, 8) / (size["B"] * size["T"] * 2)
    assert row["routed_flops"] <= row["tiled_flops"] <= padded * row["routed_flops"] + 0.1 * row["dense_flops"]
    for impl in moe.SPARSE:
        assert math.isclose(row[f"{impl}_flops_ratio"], row[f"{impl}_flops"] / row["dense_flops"])
        assert row[f"{impl}_s"] > 0
        assert math.isclose(row[f"{impl}_time_ratio"], row[f"{impl}_s"] / row["dense_s"])
    assert row["dense_s"] > 0
    assert isinstance(row["native_ragged_dot"], bool)
    out = capsys.readouterr().out
    assert "tiled/dense" in out and "t tiled/dense" in out and "ragged/dense" in out


def test_matmul_flops_counts_scan_bodies_times_their_length():
    """XLA's cost_analysis counts a loop body once; matmul_flops counts it per iteration."""
    moe = _benchmark()
    w, xs = jnp.ones((64, 32)), jnp.ones((10, 16, 64))
    scanned = jax.make_jaxpr(lambda xs, w: jax.lax.scan(lambda c, x: (c, x @ w), 0.0, xs)[1])(xs, w)
    assert moe.matmul_flops(scanned) == 10 * 2 * 16 * 64 * 32
    unrolled = jax.jit(lambda xs, w: jnp.einsum("NmD,DF->NmF", xs, w)).lower(xs, w).compile()
    assert moe.matmul_flops(jax.make_jaxpr(lambda xs, w: jnp.einsum("NmD,DF->NmF", xs, w))(xs, w)) == \
        unrolled.cost_analysis()["flops"]
    with pytest.raises(ValueError, match="while"):
        moe.matmul_flops(jax.make_jaxpr(lambda x: jax.lax.while_loop(lambda v: v[0, 0] < 3, lambda v: v @ v, x))(
            jnp.ones((2, 2))))


def test_moe_benchmark_refuses_bad_settings(capsys):
    with pytest.raises(SystemExit):
        _benchmark().main(["--quick", "--settings=8x9"])
    assert "--settings" in capsys.readouterr().err
