"""benchmarks/compression_table.py runs in quick mode and its columns hold what each method must give:
the original's bits per byte is the trainer's own evaluation of the run, the stored bits per
weight and the pruned sparsities follow from the formats and patterns, the saved checkpoints
shrink where the method stores less, and the KV cache bytes follow the cache formula.

No wall-clock time is asserted (the decode ratios live in the benchmark's printout)."""

import importlib.util
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS32 = float(np.finfo(np.float32).eps)


def _benchmark():
    spec = importlib.util.spec_from_file_location("compression_benchmark",
                                                  os.path.join(REPO, "benchmarks", "compression_table.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_compression_benchmark_quick_mode(tmp_path, capsys):
    bench = _benchmark()
    results = bench.main(["--quick", f"--out={tmp_path / 'out'}", f"--workdir={tmp_path / 'runs'}"])
    out = capsys.readouterr().out
    tiny = results["tiny"]
    base, rows = tiny["base"], tiny["rows"]
    assert list(rows) == [r.label for r in bench.QUICK.rows]

    # The original's bits per byte is the trainer's final evaluation of the same text.
    with open(tmp_path / "runs" / "tiny" / "summary.json") as f:
        summary = json.load(f)
    assert math.isclose(base["bpb"], summary["val_bits_per_byte"], rel_tol=64 * EPS32)
    for label, r in rows.items():
        assert np.isfinite(r["bpb"]) and math.isclose(r["delta"], r["bpb"] - base["bpb"], abs_tol=1e-12), label
        assert r["decode_ratio"] > 0 and 0 <= r["greedy_agreement"] <= 1, label

    # Stored bits per weight: codes plus float32 scales (and nothing else for symmetric int4).
    int8, int4, gptq = rows["int8 per-channel"], rows["int4 g128 sym"], rows["gptq int4 g128"]
    assert 8 < int8["bits"] < 8 + 32 / 64 + 1e-9  # one scale per output channel of >= 64 inputs
    assert 4 < int4["bits"] <= 4 + 32 / 64 + 1e-9  # groups of min(128, inputs >= 64)
    assert gptq["bits"] == int4["bits"]  # the same format, other codes
    assert int4["disk_bytes"] < int8["disk_bytes"] < 0.5 * base["disk_bytes"]

    # Pruning: exact sparsities of the prunable kernels; structured pruning saves fewer bytes.
    assert rows["magnitude layer 0.5"]["sparsity"] == 0.5
    assert rows["magnitude 2:4"]["sparsity"] == 0.5
    heads = rows["heads 50%"]
    assert 0 < heads["sparsity"] < 0.5 and heads["disk_bytes"] < base["disk_bytes"]

    # KV caches: int8 / fp8 codes (1 byte) plus a float32 scale per position and head.
    config = bench.preset_config("gpt", "tiny", bench.QUICK.steps)
    head_dim = config.model.block.d_model // config.model.block.num_heads
    kv = {r["kv_cache"]: r for r in tiny["kv"]}
    for fmt in ("int8", "fp8"):
        assert math.isclose(kv[fmt]["bytes_vs_float32"], (head_dim + 4) / (4 * head_dim), rel_tol=1e-12)
    assert kv["float"]["max_logit_error"] == 0

    # MiniLM: int8 keeps the sentence embeddings' direction.
    minilm = results["minilm"]["rows"]["int8 per-channel"]
    assert 0.99 < minilm["cosine_mean"] <= 1 + 1e-6 and minilm["disk_bytes"] < 0.3 * results["minilm"]["base"]["disk_bytes"]

    for path in results["_plots"]:
        assert os.path.getsize(path) > 0
    assert "| tiny | int8 per-channel |" in out and (tmp_path / "out" / "table.md").exists()


def test_the_benchmark_scripts_run_as_scripts():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, where a file named like a module
    jax imports (e.g. `compression`, the zstd package) would shadow it and break every script."""
    import subprocess

    for script in ("compression_table.py", "distillation.py"):
        run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
