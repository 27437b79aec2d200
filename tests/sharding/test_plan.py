"""The capacity planner: the ZeRO paper's Table 1, and an ahead-of-time compile of a config."""

import json
import os
import subprocess
import sys

import jax

from configs.loader import load_config
from sharding import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "sharding.plan", *args, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_reproduces_zero_paper_table_1():
    """7.5B parameters on 64 GPUs, mixed-precision Adam (Rajbhandari et al. 2020, Table 1)."""
    result = _cli("--params=7.5e9", "--devices=64")
    assert result["gb_per_device"] == {"dp": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.88}


def test_compiles_a_config_ahead_of_time():
    config = load_config("configs/llama.py:tiny")
    result = plan.compile_plan(config, strategy="zero3", mesh="data=8", device_memory_gb=1.0)
    assert result["mesh"] == {"data": 8}
    # The tiny LLaMA's leaves all split evenly by 8: the sharded state is the f32 ZeRO-3 formula.
    for key in ("params", "grads", "opt_state"):
        assert 0 <= result["state_bytes"][key] - result["analytic_bytes"][key] <= 16, key  # + step counts
    compiled = result["compiled_bytes"]
    assert compiled["argument"] >= result["state_bytes"]["params"] + result["state_bytes"]["opt_state"]
    assert result["fits"] and compiled["peak"] < 1e9
    small = plan.compile_plan(config, strategy="zero3", mesh="data=8", device_memory_gb=compiled["peak"] / 2e9)
    assert not small["fits"]
    assert len(jax.devices()) == 8  # nothing but shapes was needed


def test_cli_simulates_the_mesh_devices():
    result = _cli("--config=configs/llama.py:tiny", "--mesh=data=2,fsdp=2", "--strategy=fsdp",
                  "--device_memory_gb=1")
    assert result["mesh"] == {"data": 2, "fsdp": 2} and result["fits"]


def test_plans_a_pipeline():
    """pp_fsdp on stage=2,fsdp=4: the stacked layers count 1/2 (each stage holds its own), the
    embedding and head whole on both stages; the sharded state is that formula. The plan adds
    GPipe's bubble and the layer inputs a stage keeps: 2 micro-batches of 8 / 2 / 4 = 1 row,
    64 tokens, width 64, f32, for 2 + 2 - 1 ticks of the stage's one layer."""
    config = load_config("configs/llama.py:tiny", ["model.scan_layers=True",
                                                   "sharding.pipeline_microbatches=2"])
    result = plan.compile_plan(config, strategy="pp_fsdp", mesh="stage=2,fsdp=4", device_memory_gb=1.0)
    for key in ("params", "grads", "opt_state"):
        assert 0 <= result["state_bytes"][key] - result["analytic_bytes"][key] <= 16, key
    # Between all of it split 8 ways and all of it split 4 ways: the layers are split 8, the rest 4.
    assert 4 * result["params"] / 8 < result["state_bytes"]["params"] < 4 * result["params"] / 4
    assert result["pipeline"] == {"stages": 2, "microbatches": 2, "bubble": 1 / 3, "in_flight_ticks": 3,
                                  "layer_input_bytes": 3 * 1 * 1 * 64 * 64 * 4}
