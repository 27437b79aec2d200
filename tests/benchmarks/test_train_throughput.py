"""benchmarks/train_throughput.py runs in quick mode and prints consistent numbers.

No wall-clock time is asserted: the checks are on the fields and on how they relate."""

import importlib.util
import math
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_quick_mode(capsys):
    bench = _load("train_throughput")
    results = bench.main(["--quick"])
    assert list(results) == ["tiny"]
    r = results["tiny"]
    assert r["shape"] == "2L x 64, B8 x T64, V512" and r["tokens_per_step"] == 8 * 64  # the tiny preset
    assert r["num_params"] > 0
    for key in ("compile_seconds", "step_seconds", "tokens_per_second", "flops_per_second", "peak_flops"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    # The printed rates follow from one another: tokens/s from the step time, FLOP/s = 3 x forward.
    assert math.isclose(r["tokens_per_second"], r["tokens_per_step"] / r["step_seconds"], rel_tol=1e-9)
    flops_per_token = 3 * bench.build.model(bench.load_config(os.path.join(REPO, "configs", "gpt.py") + ":tiny"),
                                            512).config.flops_per_token(64)
    assert math.isclose(r["flops_per_second"], flops_per_token * r["tokens_per_second"], rel_tol=1e-9)
    out = capsys.readouterr().out
    assert "matmul peak (512^2 float32, measured now)" in out and "of peak" in out
    (row,) = [line for line in out.splitlines() if line.startswith("tiny ")]
    assert row.rstrip().endswith(f"{r['flops_per_second'] / r['peak_flops']:7.1%}".strip())
