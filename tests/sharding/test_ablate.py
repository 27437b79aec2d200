"""The ablation tool end to end: `python -m sharding.ablate` simulates its devices, trains the
tiny LLaMA under a few strategies and writes the documented JSON and the plot."""

import json
import math
import os
import subprocess
import sys

import numpy as np

from sharding import ablate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATE_KINDS = {"params", "grads", "opt_state"}
# A loss is a mean over the batch's 8 x 64 tokens (configs/llama.py:tiny): summed in another
# order it moves by about 4 * eps32 * sqrt(512) = 1.1e-5 of itself (the random-walk estimate of
# float32 summation, x4 for its spread; as in tests/sharding/test_equivalence.py).
LOSS_RTOL = 4 * float(np.finfo(np.float32).eps) * math.sqrt(8 * 64)


def test_parse_layouts():
    assert ablate.parse_layouts("dp,zero3@data=2,fsdp=4,tp,fsdp_tp@data=2+fsdp=2+tensor=2") == [
        ("dp", ""), ("zero3", "data=2,fsdp=4"), ("tp", ""), ("fsdp_tp", "data=2,fsdp=2,tensor=2")]


def test_cli_writes_the_documented_records(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the tool sets the device count itself
    out = subprocess.run([sys.executable, "-m", "sharding.ablate", "--config=configs/llama.py:tiny",
                          "--strategies=zero3,tp@data=4,tensor=2", "--devices=8", "--steps=2", f"--out={tmp_path}",
                          "--fast_compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "max|dloss|" in out.stdout and "wrote" in out.stdout
    records = json.loads((tmp_path / "ablation.json").read_text())
    assert [(r["strategy"], r["mesh"]) for r in records] == [
        ("dp", {"data": 8}), ("zero3", {"data": 8}), ("tp", {"data": 4, "tensor": 2})]  # dp added, first
    for r in records:
        assert set(r["bytes_per_device"]) == STATE_KINDS
        assert STATE_KINDS <= set(r["analytic_bytes_per_device"])
        assert set(r["collectives"]) == set(ablate.KINDS_SHORT)
        assert all({"count", "bytes", "wire_bytes"} <= set(v) for v in r["collectives"].values())
        assert r["step_time_s"] > 0 and len(r["losses"]) == 2
        assert r["max_abs_loss_diff_vs_dp"] < LOSS_RTOL * max(r["losses"])
        # Every leaf of the tiny LLaMA splits evenly by 8 under ZeRO: the sharded state is the formula.
        if r["strategy"] != "tp":
            assert r["bytes_per_device"]["params"] == r["analytic_bytes_per_device"]["params"]
        assert r["measured_bytes_per_device"]["params"] == r["bytes_per_device"]["params"]
    assert records[1]["bytes_per_device"]["params"] * 8 == records[0]["bytes_per_device"]["params"]
    assert records[0]["collectives"]["all-reduce"]["count"] >= 1
    assert records[1]["collectives"]["all-gather"]["bytes"] > 0
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_ablates_a_pipeline():
    """A pipeline strategy in the list: every layout runs the stacked layers, the stages pass
    micro-batches by collective-permute, the losses are dp's and the state is the formula
    (the stacked layers 1/2 per stage)."""
    from configs.loader import load_config

    config = load_config("configs/llama.py:tiny", ["sharding.pipeline_microbatches=2"])
    records = ablate.ablate(config, [("pp_fsdp_tp", "")], steps=2, compiler_options=ablate.FAST_COMPILE, log=None)
    assert [(r["strategy"], r["mesh"]) for r in records] == [
        ("dp", {"data": 8}), ("pp_fsdp_tp", {"stage": 2, "fsdp": 2, "tensor": 2})]
    pipelined = records[1]
    assert pipelined["max_abs_loss_diff_vs_dp"] < LOSS_RTOL * max(pipelined["losses"])
    assert pipelined["collectives"]["collective-permute"]["count"] >= 2
    assert records[0]["collectives"]["collective-permute"]["count"] == 0
    assert pipelined["bytes_per_device"]["params"] == pipelined["measured_bytes_per_device"]["params"]
