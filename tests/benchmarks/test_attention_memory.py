"""benchmarks/attention_memory.py in quick mode: compiled memory of causal attention forward
+ backward grows ~linearly in T for blockwise and ~quadratically for xla.

Properties of XLA's compiled memory analysis, not wall time: doubling T from 512 to 1024
multiplies the plain path's footprint by ~4 (its [B, N, T, T] logits and probabilities
dominate, so > 3) and blockwise's by ~2 (everything it holds is [B, T, ...], so < 2.5)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmark():
    spec = importlib.util.spec_from_file_location("attention_memory",
                                                  os.path.join(REPO, "benchmarks", "attention_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blockwise_memory_grows_linearly_and_xla_quadratically(capsys):
    bench = _benchmark()
    result = bench.main(["--quick"])
    lengths, peaks = result["lengths"], result["peak_bytes"]
    assert lengths == [512, 1024]
    assert peaks["blockwise"][1] / peaks["blockwise"][0] < 2.5, peaks
    assert peaks["xla"][1] / peaks["xla"][0] > 3, peaks
    # At T = 1024 the xla path's attention matrices alone (logits and probabilities,
    # 2 x 4 B x N x T^2 bytes = 64 MiB) exceed blockwise's whole footprint.
    assert peaks["blockwise"][1] < 2 * 4 * bench.HEADS * 1024**2 < peaks["xla"][1]
    assert "xla/blockwise" in capsys.readouterr().out


def test_longest_fit_is_the_boundary_of_the_budget():
    """With the budget set to the footprint at T = 256, the search (doubling from 256,
    then bisection to 128) lands on 256: it fits, 256 + 128 does not (memory grows with T)."""
    bench = _benchmark()
    budget = bench.peak_bytes("xla", 256)
    assert bench.longest_fit("xla", budget, start=256) == 256
    assert bench.peak_bytes("xla", 256 + bench.GRANULE) > budget
