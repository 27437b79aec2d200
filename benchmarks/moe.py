"""Dropless MoE: the sparse path (tokens sorted by expert, grouped matmuls) with each grouped
matmul (`jax.lax.ragged_dot_general`; the tiled scan over block-padded tiles) against the dense
reference (every expert on every token, masked).

For (E, k) = (8, 2), (16, 2), (64, 6) one `MoEFeedForward` layer (softmax top-k routing,
SwiGLU experts) is jitted forward + backward (gradients of every parameter and of the input)
as `dropless_impl="dense"` and as `dropless_impl="sparse"` with `grouped_matmul="ragged_dot"`
and `"tiled"`, on the same tokens and parameters, and measured side by side:

* FLOPs, next to the analytic FLOPs of the expert matmuls (forward 2 + backward 4 FLOPs per
  multiply-add, 3 matrices of D x F): `routed` = G * k experts' worth, `all experts` = G * E's.
  Ideally sparse / dense is about k / E; the tiled path adds up to TILE_ROWS - 1 padded rows
  per expert and batch row. Dense and ragged_dot: XLA's `cost_analysis()` of the compiled
  program. Tiled: its matmuls run in a loop, whose body `cost_analysis()` counts once whatever
  the trip count, so its FLOPs are those of every `dot_general` in the jaxpr, each scan body
  times its length (`matmul_flops`; the dense column's count by the same function is printed
  as a check against XLA's).
* step time: the best of `--repeats` calls after a warm-up (compile) call.
* whether the compiled ragged_dot program still holds a native `ragged-dot` instruction (TPU,
  GPU) or JAX lowered it before XLA saw it. On CPU JAX lowers `ragged_dot` to a dense dot over
  every group of a masked copy of the rows ([E, rows, D]), so ragged_dot there costs E times its
  routed FLOPs, k times the dense path's; the tiled path is what `grouped_matmul="auto"` picks
  on CPU.

Run:
  python benchmarks/moe.py
  python benchmarks/moe.py --quick          # or LMLAB_QUICK=1: a tiny layer, one timed call
  python benchmarks/moe.py --settings=8x2,256x8
"""

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from models.layers.moe import MoEConfig, MoEFeedForward

SETTINGS = ((8, 2), (16, 2), (64, 6))
SPARSE = ("ragged_dot", "tiled")  # the grouped matmuls of the sparse path
FIELDS = ("experts", "top_k", "routed_flops", "all_expert_flops", "dense_flops", "dense_matmul_flops", "dense_s",
          "native_ragged_dot",
          *(f"{impl}_{what}" for impl in SPARSE for what in ("flops", "s", "flops_ratio", "time_ratio")))


def sizes(quick: bool) -> dict[str, int]:
    """Layer and batch sizes: B rows of T tokens, model width D, expert width F."""
    return dict(B=2, T=16, D=32, F=64) if quick else dict(B=4, T=128, D=128, F=256)


def train_step_fn(config: MoEConfig, probe_BTD: jax.Array):
    """jit(grad) of <layer(x), probe> + the routing losses, by parameters and input."""
    module = MoEFeedForward(config)

    def loss(params, x_BTD):
        (y_BTD, stats), _ = module.apply({"params": params}, x_BTD, mutable=["intermediates"])
        return jnp.sum(y_BTD * probe_BTD) + stats["weighted_loss"]

    return jax.jit(jax.grad(loss, (0, 1)))


def matmul_flops(jaxpr: Jaxpr | ClosedJaxpr) -> int:
    """FLOPs of every `dot_general` the jaxpr runs: 2 per multiply-add, a scan body's times its
    length, nested calls (jit, custom derivatives) once.

    Raises:
      ValueError: on a primitive whose matmul count is not known from the jaxpr alone (a while
        loop's trip count, a cond's branch, a ragged dot's lowering).
    """
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("while", "cond", "ragged_dot_general"):
            raise ValueError(f"matmul_flops cannot count a {name}")
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        times = eqn.params["length"] if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                    total += times * matmul_flops(sub)
    return total


def best_time(fn, args, repeats: int) -> float:
    """Best seconds of `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def measure(num_experts: int, top_k: int, size: dict[str, int], repeats: int) -> dict:
    """Compiled FLOPs and step time of dense and of sparse dropless (each grouped matmul) at one (E, k)."""
    B, T, D, F = size["B"], size["T"], size["D"], size["F"]
    config = MoEConfig(num_experts=num_experts, num_experts_per_tok=top_k, expert_d_ff=F, aux_loss_weight=0.01)
    rng = np.random.default_rng(0)
    x_BTD = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    probe_BTD = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    params = nn.unbox(MoEFeedForward(config).init(jax.random.key(0), x_BTD)["params"])
    expert_flops = 6 * B * T * 3 * D * F  # one expert for every token, forward + backward
    row = {"experts": num_experts, "top_k": top_k, "routed_flops": top_k * expert_flops,
           "all_expert_flops": num_experts * expert_flops}
    impls = {"dense": dataclasses.replace(config, dropless_impl="dense")}
    impls.update({impl: dataclasses.replace(config, grouped_matmul=impl) for impl in SPARSE})
    for impl, impl_config in impls.items():
        step = train_step_fn(impl_config, probe_BTD)
        compiled = step.lower(params, x_BTD).compile()
        if impl == "ragged_dot":
            row[f"{impl}_flops"] = float(compiled.cost_analysis()["flops"])
        else:
            row[f"{impl}_flops" if impl == "tiled" else "dense_matmul_flops"] = matmul_flops(
                jax.make_jaxpr(step)(params, x_BTD))
        if impl == "dense":
            row["dense_flops"] = float(compiled.cost_analysis()["flops"])
        row[f"{impl}_s"] = best_time(compiled, (params, x_BTD), repeats)
        if impl == "ragged_dot":
            row["native_ragged_dot"] = "ragged-dot" in compiled.as_text()
    for impl in SPARSE:
        row[f"{impl}_flops_ratio"] = row[f"{impl}_flops"] / row["dense_flops"]
        row[f"{impl}_time_ratio"] = row[f"{impl}_s"] / row["dense_s"]
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny layer, one timed call (also LMLAB_QUICK=1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the best is kept)")
    parser.add_argument("--settings", default=",".join(f"{e}x{k}" for e, k in SETTINGS),
                        help="comma-separated ExK pairs (default 8x2,16x2,64x6)")
    args = parser.parse_args(argv)
    try:
        settings = [tuple(int(n) for n in pair.split("x")) for pair in args.settings.split(",")]
        if any(len(pair) != 2 or not 1 <= pair[1] <= pair[0] for pair in settings):
            raise ValueError
    except ValueError:
        parser.error(f"--settings={args.settings!r}; expected comma-separated ExK pairs with 1 <= K <= E, e.g. 8x2,64x6")
    quick = args.quick or os.environ.get("LMLAB_QUICK") == "1"
    size = sizes(quick)
    repeats = 1 if quick else args.repeats
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}")
    print(f"one MoE layer, forward + backward: B={size['B']} x T={size['T']} tokens, D={size['D']}, "
          f"F={size['F']}, float32; best of {repeats} after a warm-up\n")
    header = (f"{'E':>3} {'k':>2} {'ideal k/E':>9} {'dense GFLOP':>11} {'ragged GFLOP':>12} {'tiled GFLOP':>11} "
              f"{'ragged/dense':>12} {'tiled/dense':>11} {'tiled/routed':>12} {'dense ms':>9} {'ragged ms':>9} "
              f"{'tiled ms':>9} {'t ragged/dense':>14} {'t tiled/dense':>13} {'native':>6}")
    print(header)
    print("-" * len(header))
    checks = []
    rows = []
    for num_experts, top_k in settings:
        row = measure(num_experts, top_k, size, repeats)
        rows.append(row)
        print(f"{num_experts:3d} {top_k:2d} {top_k / num_experts:9.3f} {row['dense_flops'] / 1e9:11.4f} "
              f"{row['ragged_dot_flops'] / 1e9:12.4f} {row['tiled_flops'] / 1e9:11.4f} "
              f"{row['ragged_dot_flops_ratio']:12.3f} {row['tiled_flops_ratio']:11.3f} "
              f"{row['tiled_flops'] / row['routed_flops']:12.2f} {row['dense_s'] * 1e3:9.2f} "
              f"{row['ragged_dot_s'] * 1e3:9.2f} {row['tiled_s'] * 1e3:9.2f} {row['ragged_dot_time_ratio']:14.2f} "
              f"{row['tiled_time_ratio']:13.2f} {str(row['native_ragged_dot']):>6}", flush=True)
        checks.append(f"{row['dense_matmul_flops'] / row['dense_flops']:.3f}")
    print("(GFLOP of the forward + backward, dense and ragged: XLA cost_analysis of the compiled program, tiled: "
          "matmul_flops of its jaxpr (loops times their trip count); ragged, tiled: the sparse path with "
          "grouped_matmul=ragged_dot, tiled; tiled/routed: tiled FLOPs over the analytic FLOPs of the "
          "routed experts' matmuls; t: step time; native: a ragged-dot instruction survives in the compiled "
          "ragged_dot program, False where JAX lowered it to a masked dense dot over all E groups)")
    print(f"(dense: matmul_flops / XLA cost_analysis = {', '.join(checks)}: the tiled column's count agrees with "
          "XLA's on a program without loops)")
    return rows


if __name__ == "__main__":
    main()
