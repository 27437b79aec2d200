"""Expert parallelism: bytes each device moves per train step with the explicit all-to-all
dispatch (`model.moe.dispatch=all_to_all`, models/layers/expert_dispatch.py) against the
constraint-based layout (`dispatch=auto`: the compiler chooses), for capacity and sparse
dropless mode.

A Mixtral (softmax top-k over E SwiGLU experts) train step is compiled under
`sharding.strategy=ep` on the mesh data=2,expert=4 (8 simulated CPU devices) for each of the
four (mode, dispatch) pairs, and the collectives of its HLO are summed by kind and phase
(`sharding.analysis.collectives` / `summarize`; bytes are each op's result, wire bytes the ring
estimate of what one device sends). Nothing is timed: simulated devices share one CPU.

What to expect: with `auto`, dropless mode gathers every expert tensor whole in the forward pass
(its grouped matmuls need the sorted rows and all weights on one device) and capacity mode
moves the [E, C, D] slot buffer; with `all_to_all` only token buffers move: per layer there
and back in the forward pass and again in the backward, [E, min(C, G), D] per device in capacity
mode and the worst-case [N, G * K, D] in dropless mode (G tokens per device, N expert shards).

Run:
  python benchmarks/expert_parallel.py
  python benchmarks/expert_parallel.py --quick       # or LMLAB_QUICK=1: the tests' tiny Mixtral
"""

import argparse
import dataclasses
import os
import pathlib
import sys

# Simulated devices must be asked for before jax starts.
_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from models.gpt import GPT, mixtral_config
from sharding import analysis
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from train import program as program_lib
from train.optimizer import make_optimizer

MESH = "data=2,expert=4"
MODES = {"capacity": 2.0, "dropless": 0.0}  # capacity_factor
DISPATCHES = ("auto", "all_to_all")
FIELDS = ("mode", "dispatch", "forward_all_to_all_bytes", "forward_all_gather_bytes", "all_to_all_bytes",
          "all_gather_bytes", "all_reduce_bytes", "total_bytes", "total_wire_bytes")
# Compiled for speed of compiling: the HLO passes that place the collectives are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def sizes(quick: bool) -> dict[str, int]:
    """The model and batch: quick is tests/sharding/conftest.py's tiny Mixtral."""
    if quick:
        return {"layers": 2, "d_model": 64, "d_ff": 64, "heads": 4, "experts": 4, "batch": 16, "seq": 16,
                "vocab": 128}
    return {"layers": 2, "d_model": 256, "d_ff": 512, "heads": 8, "experts": 8, "batch": 32, "seq": 128,
            "vocab": 1024}


def model(s: dict[str, int], mode: str, dispatch: str) -> GPT:
    config = mixtral_config(num_experts=s["experts"], capacity_factor=MODES[mode], aux_loss_weight=0.01,
                            num_layers=s["layers"], d_ff=s["d_ff"], vocab_size=s["vocab"], d_model=s["d_model"],
                            num_heads=s["heads"], num_kv_heads=s["heads"] // 2, max_len=s["seq"])
    return GPT(dataclasses.replace(config, block=dataclasses.replace(
        config.block, moe=dataclasses.replace(config.block.moe, dispatch=dispatch))))


def measure(s: dict[str, int], mode: str, dispatch: str) -> dict:
    """One row: the compiled ep step's collective bytes per device."""
    program = program_lib.build(model(s, mode, dispatch), make_optimizer(learning_rate=1e-3), lambda step: 1e-3,
                                strategy=get_strategy("ep"), mesh=mesh_lib.make_mesh(MESH), seq_len=s["seq"],
                                batch_size=s["batch"])
    compiled = program.step.lower(program.abstract_state, program.abstract_batch(s["batch"], s["seq"]),
                                  jax.random.key(0)).compile(FAST_COMPILE)
    ops = analysis.collectives(compiled)
    summary = analysis.summarize(ops)

    def forward(kind):
        return sum(op.bytes for op in ops if op.kind == kind and op.phase == "forward")

    return {"mode": mode, "dispatch": dispatch,
            "forward_all_to_all_bytes": forward("all-to-all"), "forward_all_gather_bytes": forward("all-gather"),
            "all_to_all_bytes": summary["all-to-all"]["bytes"], "all_gather_bytes": summary["all-gather"]["bytes"],
            "all_reduce_bytes": summary["all-reduce"]["bytes"],
            "total_bytes": sum(v["bytes"] for v in summary.values()),
            "total_wire_bytes": sum(v["wire_bytes"] for v in summary.values())}


def format_table(rows: list[dict]) -> str:
    head = ("mode", "dispatch", "fwd A2A KB", "fwd AG KB", "A2A KB", "AG KB", "AR KB", "total KB", "wire KB")
    lines = ["  ".join(f"{h:>10}" for h in head)]
    for r in rows:
        values = [r[f] / 1024 for f in FIELDS[2:]]
        lines.append("  ".join([f"{r['mode']:>10}", f"{r['dispatch']:>10}", *(f"{v:10.1f}" for v in values)]))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("LMLAB_QUICK") == "1")
    args = parser.parse_args(argv)
    if jax.device_count() < 8:
        raise SystemExit(f"error: expert_parallel needs 8 devices (mesh {MESH}), found {jax.device_count()}; "
                         f"run it as a script (it asks XLA for 8 simulated CPU devices) or set XLA_FLAGS={_FLAG}")
    s = sizes(args.quick)
    print(f"Mixtral E={s['experts']} top-2, {s['layers']} layers, d_model {s['d_model']}, batch {s['batch']} x "
          f"{s['seq']}, strategy ep on {MESH}: collective bytes per device per train step")
    rows = [measure(s, mode, dispatch) for mode in MODES for dispatch in DISPATCHES]
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
