"""Dropless MoE: the sparse path (tokens sorted by expert, grouped matmuls with
`jax.lax.ragged_dot_general`) against the dense reference (every expert on every token, masked).

For (E, k) = (8, 2), (16, 2), (64, 6) one `MoEFeedForward` layer (softmax top-k routing,
SwiGLU experts) is jitted forward + backward (gradients of every parameter and of the input)
in both `dropless_impl`s, on the same tokens and parameters, and measured side by side:

* compiled FLOPs: XLA's `cost_analysis()` of the compiled program, next to the analytic
  FLOPs of the expert matmuls (forward 2 + backward 4 FLOPs per multiply-add, 3 matrices of
  D x F): `routed` = G * k experts' worth, `all experts` = G * E's. Ideally sparse / dense is
  about k / E.
* step time: the best of `--repeats` calls after a warm-up (compile) call.
* whether the compiled program still holds a native `ragged-dot` instruction (TPU, GPU) or
  JAX lowered it before XLA saw it. On CPU JAX lowers `ragged_dot` to a dense dot over
  every group of a masked copy of the rows ([E, rows, D]), so the sparse path there costs E
  times its routed FLOPs, k times the dense path's: the ratios below say what it costs on the
  device this runs on.

Run:
  python benchmarks/moe.py
  python benchmarks/moe.py --quick          # or LMLAB_QUICK=1: a tiny layer, one timed call
  python benchmarks/moe.py --settings=8x2,256x8
"""

import argparse
import dataclasses
import os
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from models.layers.moe import MoEConfig, MoEFeedForward

SETTINGS = ((8, 2), (16, 2), (64, 6))
FIELDS = ("experts", "top_k", "dense_flops", "sparse_flops", "routed_flops", "all_expert_flops", "flops_ratio",
          "dense_s", "sparse_s", "time_ratio", "native_ragged_dot")


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
    """Compiled FLOPs and step time of dense and sparse dropless at one (E, k)."""
    B, T, D, F = size["B"], size["T"], size["D"], size["F"]
    config = MoEConfig(num_experts=num_experts, num_experts_per_tok=top_k, expert_d_ff=F, aux_loss_weight=0.01)
    rng = np.random.default_rng(0)
    x_BTD = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    probe_BTD = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    params = nn.unbox(MoEFeedForward(config).init(jax.random.key(0), x_BTD)["params"])
    expert_flops = 6 * B * T * 3 * D * F  # one expert for every token, forward + backward
    row = {"experts": num_experts, "top_k": top_k, "routed_flops": top_k * expert_flops,
           "all_expert_flops": num_experts * expert_flops}
    for impl in ("dense", "sparse"):
        step = train_step_fn(dataclasses.replace(config, dropless_impl=impl), probe_BTD)
        compiled = step.lower(params, x_BTD).compile()
        row[f"{impl}_flops"] = float(compiled.cost_analysis()["flops"])
        row[f"{impl}_s"] = best_time(compiled, (params, x_BTD), repeats)
        if impl == "sparse":
            row["native_ragged_dot"] = "ragged-dot" in compiled.as_text()
    row["flops_ratio"] = row["sparse_flops"] / row["dense_flops"]
    row["time_ratio"] = row["sparse_s"] / row["dense_s"]
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
    header = (f"{'E':>3} {'k':>2} {'dense GFLOP':>11} {'sparse GFLOP':>12} {'sparse/dense':>12} {'ideal k/E':>9} "
              f"{'sparse/routed':>13} {'dense ms':>9} {'sparse ms':>9} {'time sparse/dense':>17} {'native':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    for num_experts, top_k in settings:
        row = measure(num_experts, top_k, size, repeats)
        rows.append(row)
        print(f"{num_experts:3d} {top_k:2d} {row['dense_flops'] / 1e9:11.4f} {row['sparse_flops'] / 1e9:12.4f} "
              f"{row['flops_ratio']:12.3f} {top_k / num_experts:9.3f} "
              f"{row['sparse_flops'] / row['routed_flops']:13.2f} {row['dense_s'] * 1e3:9.2f} "
              f"{row['sparse_s'] * 1e3:9.2f} {row['time_ratio']:17.2f} {str(row['native_ragged_dot']):>6}",
              flush=True)
    print("(GFLOP: XLA cost_analysis of the compiled forward + backward; sparse/routed: compiled sparse FLOPs over "
          "the analytic FLOPs of the routed experts' matmuls; native: a ragged-dot instruction survives in the "
          "compiled program, False where JAX lowered it to a masked dense dot over all E groups)")
    return rows


if __name__ == "__main__":
    main()
