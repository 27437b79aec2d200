"""benchmarks/distillation.py runs in quick mode: the teacher is the larger model, both students
train the same steps on the same tokens, and they start identical (the same seed and first batch
give the same first-step cross-entropy: only the loss differs); the curves reach the JSON file.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS32 = float(np.finfo(np.float32).eps)


def _benchmark():
    spec = importlib.util.spec_from_file_location("distillation_benchmark",
                                                  os.path.join(REPO, "benchmarks", "distillation.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_distillation_benchmark_quick_mode(tmp_path, capsys):
    bench = _benchmark()
    path = tmp_path / "curves.json"
    out = bench.main(["--quick", f"--json={path}"])
    printed = capsys.readouterr().out
    rows = out["rows"]
    teacher, distilled, scratch = rows["teacher"], rows["distilled"], rows["scratch"]
    assert teacher["num_params"] > distilled["num_params"] == scratch["num_params"]
    assert distilled["steps"] == scratch["steps"] == bench.QUICK.steps
    assert distilled["tokens"] == scratch["tokens"] == bench.QUICK.steps * 8 * 32
    # Step 1: the same initial student on the same batch (with the same dropout) in both runs;
    # its cross-entropy differs only by the float32 rounding of two compiled programs.
    (step_d, ce_d), (step_s, ce_s) = distilled["curve"]["train_ce"][0], scratch["curve"]["train_ce"][0]
    assert step_d == step_s == 1
    assert abs(ce_d - ce_s) < 64 * EPS32 * math.log(300) * (1 + ce_s)
    steps = [s for s, _ in distilled["curve"]["train_ce"]]
    assert steps == list(range(1, bench.QUICK.steps + 1))
    assert [s for s, _ in distilled["curve"]["val_ce"]] == [s for s, _ in scratch["curve"]["val_ce"]]
    for row in rows.values():
        assert row["val_perplexity"] == math.exp(row["val_ce"]) and row["val_bits_per_byte"] > 0
    assert distilled["val_kl"] > 0
    assert json.loads(path.read_text())["rows"]["distilled"]["val_ce"] == distilled["val_ce"]
    assert "distilled - scratch" in printed and "validation CE curve" in printed
