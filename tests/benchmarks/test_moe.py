"""benchmarks/moe.py runs in quick mode and reports sane FLOPs and ratios for dense and sparse dropless.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import math
import os

import pytest

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
    # The dense reference multiplies every token through every expert; the sparse path at least
    # through its routed ones (exactly those on TPU/GPU; all E groups of masked rows on CPU).
    assert row["dense_flops"] >= row["all_expert_flops"]
    assert row["sparse_flops"] >= row["routed_flops"]
    if not row["native_ragged_dot"]:  # JAX's fallback (CPU): every routed row through all E experts
        assert row["sparse_flops"] >= row["experts"] * row["routed_flops"]
    assert math.isclose(row["flops_ratio"], row["sparse_flops"] / row["dense_flops"])
    assert row["dense_s"] > 0 and row["sparse_s"] > 0
    assert math.isclose(row["time_ratio"], row["sparse_s"] / row["dense_s"])
    assert isinstance(row["native_ragged_dot"], bool)
    out = capsys.readouterr().out
    assert "sparse/dense" in out and "time sparse/dense" in out


def test_moe_benchmark_refuses_bad_settings(capsys):
    with pytest.raises(SystemExit):
        _benchmark().main(["--quick", "--settings=8x9"])
    assert "--settings" in capsys.readouterr().err
