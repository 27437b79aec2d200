"""benchmarks/decode.py runs in quick mode and its cached, recomputed and transformers decodes agree.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_decode_benchmark_quick_mode(capsys):
    spec = importlib.util.spec_from_file_location("decode_benchmark", os.path.join(REPO, "benchmarks", "decode.py"))
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    results = decode.main(["--quick", "--lengths=4,8"])  # raises if cached and recomputed tokens differ
    assert [n for n, _, _ in results["cache_vs_recompute"]] == [4, 8]
    assert results["transformers"][3]  # transformers' greedy tokens equal ours
    out = capsys.readouterr().out
    assert "cache speed-up" in out and "ratio (transformers time / lmlab time)" in out
