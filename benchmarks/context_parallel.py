"""Context parallelism: the longest sequence a LLaMA trains on 1, 2, 4 and 8 devices in a fixed
per-device memory budget.

The program measured is the whole training step (forward, backward, Adam update) of a LLaMA
with ring attention (`model.block.attention_impl=ring`) under strategy `cp` on the mesh
"context=C", one row of T tokens: every activation is split along the sequence over the C
devices and key/value chunks travel the ring (`models.layers.ring_attention`); C = 1 is
plain blockwise attention on one device. Each step is compiled for its T, never run:
`compiled.memory_analysis()` of the SPMD program gives one device's bytes, and
arguments + outputs - aliased (donated) + temporaries is what that device must hold at once
(`sharding.analysis.compiled_memory`'s `peak`). Nothing is allocated, so simulated CPU
devices measure what real ones would need.

Printed: per-device memory at a few T for each C, and the longest T (a multiple of 256
tokens, so that 2 x 8 zig-zag chunks divide it) whose step fits --budget_mib per device, found
by doubling from 2048 and then bisection on compiled memory; with its ratio to C = 1.
The parameters and Adam state (replicated by cp) are a fixed cost, the activations shrink as
1 / C, so the longest T grows almost C-fold once they dominate.

Run:
  python benchmarks/context_parallel.py                 # C = 1, 2, 4, 8; 1 GiB per device
  python benchmarks/context_parallel.py --quick         # a tiny model, C = 1, 2, 4, T = 512, 1024
"""

import argparse
import functools
import os
import pathlib
import sys

if "jax" not in sys.modules:  # simulate the devices on CPU (before jax starts)
    _flag = "--xla_force_host_platform_device_count=8"
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from models.gpt import GPT, llama_config
from sharding import analysis
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from train import program as program_lib
from train.optimizer import make_optimizer

MIB = 2**20
GRANULE = 256  # the longest-T search's resolution: 2 x 8 zig-zag chunks divide it
START = 2048  # where the doubling starts
# Compile for the memory analysis only: LLVM -O0 and the older emitters (a third of the CPU
# compile time); the HLO passes and the buffer assignment are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
MODELS = {
    "full": {"vocab_size": 4096, "d_model": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4, "d_ff": 1536},
    "quick": {"vocab_size": 256, "d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "d_ff": 128},
}


@functools.cache
def peak_bytes(model: str, devices: int, seq_len: int) -> int:
    """One device's bytes (arguments + outputs - aliased + temporaries) of the compiled train
    step of `model` at T = seq_len, batch 1, under cp on "context=devices" (not run)."""
    gpt = GPT(llama_config(max_len=seq_len, attention_impl="ring", **MODELS[model]))
    program = program_lib.build(gpt, make_optimizer(learning_rate=1e-3), lambda step: 1e-3,
                                strategy=get_strategy("cp"),
                                mesh=mesh_lib.make_mesh(f"context={devices}", jax.devices()[:devices]),
                                seq_len=seq_len, batch_size=1)
    compiled = program.step.lower(program.abstract_state, program.abstract_batch(1, seq_len),
                                  jax.random.key(0)).compile(FAST_COMPILE)
    return analysis.compiled_memory(compiled)["peak"]


def longest_fit(model: str, devices: int, budget_bytes: int, *, start: int = START, granule: int = GRANULE,
                limit: int = 2**21) -> int:
    """The longest T (a multiple of `granule`) whose step fits the budget on each of `devices`:
    doubling from `start`, then bisection; 0 if not even `granule` fits."""
    if peak_bytes(model, devices, granule) > budget_bytes:
        return 0
    lo, hi = granule, max(start, granule)
    while peak_bytes(model, devices, hi) <= budget_bytes:  # lo fits; hi does not (or the limit)
        lo, hi = hi, 2 * hi
        if hi > limit:
            return lo
    while hi - lo > granule:
        mid = (lo + hi) // 2 // granule * granule
        lo, hi = (mid, hi) if peak_bytes(model, devices, mid) <= budget_bytes else (lo, mid)
    return lo


def main(argv=None) -> dict:
    """Prints the memory table (and the longest fits unless quick); returns the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, C = 1, 2, 4 at T = 512, 1024; no search")
    parser.add_argument("--budget_mib", type=float, default=1024.0, help="memory per device for the longest T")
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated context sizes C")
    args = parser.parse_args(argv)
    model = "quick" if args.quick else "full"
    counts = [1, 2, 4] if args.quick else [int(c) for c in args.devices.split(",")]
    if max(counts) > len(jax.devices()):
        raise SystemExit(f"error: --devices asks for {max(counts)} devices but JAX has {len(jax.devices())}")
    lengths = [512, 1024] if args.quick else [4096, 8192, 16384]
    result = {"model": MODELS[model], "devices": counts, "lengths": lengths,
              "peak_bytes": {c: [peak_bytes(model, c, t) for t in lengths] for c in counts}}
    print(f"LLaMA {MODELS[model]}, batch 1, train step under cp on context=C, ring attention: "
          f"compiled memory per device (arguments + outputs - donated + temporaries), MiB")
    print(f"{'T':>7} " + " ".join(f"{f'C={c}':>10}" for c in counts))
    for i, t in enumerate(lengths):
        print(f"{t:>7} " + " ".join(f"{result['peak_bytes'][c][i] / MIB:>10.1f}" for c in counts))
    if args.quick:
        return result
    budget = int(args.budget_mib * MIB)
    result["budget_bytes"] = budget
    result["longest_fit"] = {c: longest_fit(model, c, budget) for c in counts}
    base = result["longest_fit"][counts[0]]
    print(f"longest T that trains in {args.budget_mib:g} MiB per device:")
    for c, t in result["longest_fit"].items():
        print(f"  C={c}: T={t:,}" + (f" ({t / base:.2f}x C={counts[0]})" if base else ""))
    return result


if __name__ == "__main__":
    main()
