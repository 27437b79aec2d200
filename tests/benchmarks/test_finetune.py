"""benchmarks/finetune.py runs in quick mode; its measured columns agree with what each method
must give: parameter counts from the shapes, optimizer bytes from the trainable count, the
quantized base smaller than bf16, methods that start at the base starting at its loss.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS32 = float(np.finfo(np.float32).eps)


def _benchmark():
    spec = importlib.util.spec_from_file_location("finetune_benchmark", os.path.join(REPO, "benchmarks", "finetune.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_finetune_benchmark_quick_mode(capsys):
    bench = _benchmark()
    results = bench.main(["--quick"])
    out = capsys.readouterr().out
    dec, enc = results["decoder"], results["encoder"]
    methods = [m for m in dec if not m.startswith("_")]
    assert methods == list(bench.METHODS)

    # Parameter counts from the tiny preset's shapes: 2 layers, D = 64, F = 256, 4 heads.
    q = bench.QUICK
    L, D, F, r = 2, 64, 256, 8
    assert dec["full"]["trainable_params"] == dec["full"]["total_params"] > 0
    lora = L * r * (4 * (D + D) + 2 * (D + F))  # query, key, value, out; wi, wo: r * (in + out) each
    assert dec["lora"]["trainable_params"] == dec["qlora"]["trainable_params"] == lora
    assert dec["prefix"]["trainable_params"] == L * 2 * q.prefix_length * D  # keys and values per layer
    h = q.adapter_hidden
    assert dec["adapter"]["trainable_params"] == L * 2 * (D * h + h + h * D + D)  # houlsby: 2 per layer

    # Only the trainable parameters are in the optimizer: AdamW's two f32 moments each, plus the
    # same step counters under every method.
    counters = {m: dec[m]["opt_bytes"] - 2 * 4 * dec[m]["trainable_params"] for m in methods}
    assert len(set(counters.values())) == 1 and 0 <= counters["full"] <= 64, counters
    for m in methods:
        ratio = dec[m]["opt_bytes"] / dec["full"]["opt_bytes"]
        assert math.isclose(ratio, dec[m]["trainable_params"] / dec["full"]["trainable_params"], rel_tol=1e-3)
        assert dec[m]["param_bytes"] == 4 * dec[m]["trainable_params"]
    assert dec["full"]["frozen_bytes"] == 0
    for m in ("lora", "prefix", "adapter"):  # the whole base frozen, f32; the method's parameters on top
        assert dec[m]["frozen_bytes"] == 4 * dec["full"]["total_params"]
    assert dec["qlora"]["frozen_bf16_bytes"] == 2 * dec["full"]["total_params"]
    assert dec["qlora"]["frozen_bytes"] < 0.5 * dec["qlora"]["frozen_bf16_bytes"]  # nf4: ~4.1 bits a value

    for m in methods:
        mem = dec[m]["step_memory"]
        assert mem["peak"] >= mem["argument"] > dec[m]["opt_bytes"] + dec[m]["param_bytes"] - 1
        assert dec[m]["step_seconds"] > 0 and dec[m]["eval_tokens"] > 0
        assert math.isfinite(dec[m]["start_loss"]) and math.isfinite(dec[m]["eval_loss"])
        assert math.isfinite(dec[m]["train_loss"])
    # The state the step reads: full fine-tuning's holds moments of every parameter.
    assert all(dec["full"]["step_memory"]["argument"] > dec[m]["step_memory"]["argument"] for m in methods[1:])
    # LoRA (B = 0) and adapters (up = 0) start exactly at the base: the same held-out loss up to
    # float32 rounding of a differently compiled program (a log-softmax over V = 512).
    tolerance = 16 * EPS32 * math.sqrt(512) * dec["full"]["start_loss"]
    for m in ("lora", "adapter"):
        assert abs(dec[m]["start_loss"] - dec["full"]["start_loss"]) <= tolerance, m

    # MiniLM: LoRA trains a small share; the probe only the classifier (384 x 4 + 4).
    assert [m for m in enc if not m.startswith("_")] == list(bench.ENCODER_METHODS)
    assert enc["full"]["trainable_params"] == enc["full"]["total_params"] > 20_000_000
    assert enc["lora"]["trainable_params"] < 0.05 * enc["full"]["trainable_params"]
    assert enc["probe"]["trainable_params"] == 384 * 4 + 4
    for m in bench.ENCODER_METHODS:
        assert enc[m]["opt_bytes"] - 8 * enc[m]["trainable_params"] == counters["full"]
        assert 0.0 <= enc[m]["accuracy"] <= 1.0 and math.isfinite(enc[m]["eval_loss"])
    # Same base, same fresh head (seeded), LoRA's B = 0: the three start with the same predictions.
    assert len({enc[m]["accuracy_before"] for m in bench.ENCODER_METHODS}) == 1
    assert enc["_task"]["classes"] == 4 and enc["_task"]["eval_examples"] == 16

    # The printed ratios are the measured ones.
    (row,) = [line for line in out.splitlines() if line.startswith("lora ") and len(line.split()) == 5]
    assert float(row.split()[2]) == pytest.approx(dec["lora"]["opt_bytes"] / dec["full"]["opt_bytes"], abs=1e-4)
    assert "qlora's frozen base" in out and "MiniLM" in out and "acc after" in out


def test_finetune_benchmark_refuses_bad_steps(capsys):
    with pytest.raises(SystemExit):
        _benchmark().main(["--quick", "--steps=-1"])
    assert "--steps" in capsys.readouterr().err
