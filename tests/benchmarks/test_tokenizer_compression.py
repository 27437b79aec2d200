"""benchmarks/tokenizer_compression.py runs in quick mode: our BPE against the tokenizers library's.

No wall-clock time is asserted: the checks are on compression, which is deterministic."""

import importlib.util
import math
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tokenizer_compression_quick_mode(capsys):
    spec = importlib.util.spec_from_file_location(
        "tokenizer_compression_benchmark", os.path.join(REPO, "benchmarks", "tokenizer_compression.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    numbers = bench.main(["--quick"])  # raises if our BPE does not round-trip the held-out text
    for key in ("ours_train_s", "library_train_s", "ours_encode_s", "library_encode_s"):
        assert math.isfinite(numbers[key]) and numbers[key] > 0, key
    # 63 merges on English compress beyond one byte a token, and the same algorithm on the same
    # text gives both the same compression (the README's claim is "the same byte-level BPE").
    ours, library = numbers["ours_bytes_per_token"], numbers["library_bytes_per_token"]
    assert ours > 1.2 and library > 1.2, (ours, library)
    assert abs(ours / library - 1) < 0.02, (ours, library)
    out = capsys.readouterr().out
    assert "vocab 320:" in out and "ours/lib" in out and "identical held-out tokens:" in out
    (row,) = [line for line in out.splitlines() if line.startswith("bytes/token (held out)")]
    assert row.split()[-1] == f"{ours / library:.3f}"
