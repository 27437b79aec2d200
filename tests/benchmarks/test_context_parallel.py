"""benchmarks/context_parallel.py in quick mode: one device's compiled memory of the cp train
step shrinks as the sequence is split over more context devices.

Properties of XLA's compiled memory analysis, not wall time. Per device the step holds the
replicated parameters and Adam state (independent of T) and activations of T / C tokens, so
at a fixed T the footprint falls with C, and what T adds (the 512 -> 1024 increment) halves
with each doubling of C. Not exactly: the token batch (5 int32 per token) is replicated over
the context devices, and the buffer assignment packs differently per program; each doubling
must still cut the increment to below 0.6 of the last."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmark():
    spec = importlib.util.spec_from_file_location("context_parallel",
                                                  os.path.join(REPO, "benchmarks", "context_parallel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_per_device_falls_with_the_context_devices(capsys):
    bench = _benchmark()
    result = bench.main(["--quick"])
    peaks = result["peak_bytes"]
    assert result["devices"] == [1, 2, 4] and result["lengths"] == [512, 1024]
    for i in range(2):
        assert peaks[1][i] > peaks[2][i] > peaks[4][i], peaks
    added = {c: peaks[c][1] - peaks[c][0] for c in (1, 2, 4)}
    assert 0 < added[2] < 0.6 * added[1] and 0 < added[4] < 0.6 * added[2], added
    assert "C=4" in capsys.readouterr().out

    # The search lands on the budget's boundary: with the budget set to the footprint of
    # T = 1024 on 2 devices, 1024 fits and the next multiple of 512 does not.
    budget = peaks[2][1]
    assert bench.longest_fit("quick", 2, budget, start=1024, granule=512) == 1024
    assert bench.peak_bytes("quick", 2, 1536) > budget
