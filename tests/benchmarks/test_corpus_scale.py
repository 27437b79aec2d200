"""benchmarks/corpus_scale.py runs in quick mode: both corpora prepare, train a tokenizer,
train and evaluate, each in its own subprocess, at a peak RSS under 2 GB.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_corpus_scale_benchmark_quick_mode(capsys, tmp_path, monkeypatch):
    # The runs as `python benchmarks/corpus_scale.py` makes them on this CPU: one device, not the
    # suite's eight simulated ones (whose SPMD compilation of every step is most of a tiny run).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    spec = importlib.util.spec_from_file_location("corpus_scale", os.path.join(REPO, "benchmarks", "corpus_scale.py"))
    corpus_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus_scale)
    results = corpus_scale.main(["--quick", f"--dir={tmp_path}", "tokenizer.vocab_size=300"])
    for run in (results["small"], results["full"]):
        assert run["final_step"] == 2 and run["val_bytes"] > 0 and run["train_documents"] > 50
        assert 0 < run["peak_rss_mb"] < 2048, run
    assert results["full"]["corpus_mb"] > 5 * results["small"]["corpus_mb"] > 0
    out = capsys.readouterr().out
    assert "prepare throughput" in out and "peak RSS (MB)" in out
