"""benchmarks/serving.py runs in quick mode: every request of both phases completes with its tokens.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serving_benchmark_quick_mode(capsys):
    spec = importlib.util.spec_from_file_location("serving_benchmark", os.path.join(REPO, "benchmarks", "serving.py"))
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    results = serving.main(["--quick", "--requests=6", "--concurrency=3", "--max_tokens=4"])
    for name in ("sequential", "concurrent"):
        r = results[name]
        assert r["requests"] == 6 and 6 <= r["tokens"] <= 24  # greedy; an eos may end one early
        assert r["ttft_p50"] <= r["latency_p50"] and r["latency_p50"] <= r["latency_p99"]
    out = capsys.readouterr().out
    assert "ratios (concurrent / sequential)" in out and "TTFT p50/p90/p99" in out
