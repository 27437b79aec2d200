"""benchmarks/memory_startup.py in quick mode: the chunked loss's compiled memory is below what the
plain loss must hold, and a warm restart compiles fewer programs than the cold one (counted,
never timed)."""

import importlib.util
import math
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_startup_quick_mode(capsys):
    bench = _load("memory_startup")
    results = bench.main(["--quick"])
    (row,) = results["memory"]
    B, T, D, V = (row[k] for k in ("batch", "seq_len", "d_model", "vocab"))
    assert row["logits_bytes"] == B * T * V * 4
    # The plain loss-and-gradient holds the float32 logits (and their gradient) as temporaries; the
    # chunked one holds one chunk's at a time (B C V floats, C / T of them) and must stay below.
    assert row["plain"]["temp"] >= B * T * V * 4
    assert row["chunked"]["temp"] < B * T * V * 4
    assert row["chunked"]["total"] < row["plain"]["total"]
    # Inputs are the same for both: hidden, kernel and targets.
    assert row["plain"]["arguments"] == row["chunked"]["arguments"] == 4 * (B * T * D + D * V + B * T)
    cold, warm = results["startup"]["cold"], results["startup"]["warm"]
    assert cold["compilation_cache_hits"] == 0 and cold["programs_compiled"] > 0
    assert warm["programs_compiled"] < cold["programs_compiled"] and warm["compilation_cache_hits"] > 0
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in (cold, warm)
               for k in ("seconds_to_first_step", "process_seconds"))
    out = capsys.readouterr().out
    assert "cold / warm: first step" in out and f"V = {V:>7,}" in out
