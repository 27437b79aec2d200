"""benchmarks/vs_transformers.py runs in quick mode; lmlab and transformers, started from the same
checkpoint, compute the same loss and the same greedy tokens.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS32 = float(np.finfo(np.float32).eps)


def test_vs_transformers_quick_mode(capsys):
    spec = importlib.util.spec_from_file_location("vs_transformers", os.path.join(REPO, "benchmarks",
                                                                                  "vs_transformers.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    results = bench.main(["--quick"])

    (r,) = results["training"]
    # The same weights and batch: the mean cross-entropy agrees to float32 rounding. Each logit
    # is a chain of float32 dot products summed in a different order by XLA and torch; 64
    # roundings of the loss's scale bound the difference (it is ~4 here).
    assert abs(r["loss_lmlab"] - r["loss_transformers"]) <= 64 * EPS32 * max(1.0, abs(r["loss_transformers"]))
    assert 0 < r["loss_lmlab"] < 2 * np.log(bench.QUICK.vocab)  # near log V at init
    for name in ("bare", "trainer", "torch"):
        assert r[name]["wall"] > 0 and r[name]["cpu"] > 0 and r[name]["tokens_per_second"] > 0
    assert r["jax_peak"] > 0 and r["torch_peak"] > 0

    decode = results["decode"][64]
    assert [row["batch"] for row in decode] == list(bench.QUICK.decode_batches)
    assert all(row["same_tokens"] for row in decode)  # greedy from the same weights: the same tokens

    out = capsys.readouterr().out
    for label in ("(a) lmlab bare", "(b) lmlab trainer", "(c) transformers", "matmul peak", "same tokens",
                  "loss at init"):
        assert label in out
    table = [line for line in out.splitlines() if line.startswith("(")]
    assert len(table) == 3
    for line in table:  # wall ms, cpu ms, tokens/s, ratio, GFLOP/s, share of the peak
        wall, cpu, tokens, ratio, gflops, share = line.split()[-6:]
        assert float(wall) > 0 and float(cpu) > 0 and float(tokens) > 0 and float(gflops) > 0
        assert ratio.endswith("x") and share.endswith("%")
    assert table[2].split()[-3] == "1.00x"  # transformers against itself
