"""Training throughput and MFU of GPT sizes, against a matmul peak measured in the same run.

Each size is a `configs/gpt.py` preset (plus overrides). Its optimizer and jitted train
step are built the way `train.trainer.run` builds them (`build_program`: the same
`train.program.build_for_run`, shardings and donation, on a one-device mesh) and fed synthetic batches of the config's shape, so the
numbers are the trainer's step alone: no data pipeline, metric reads or checkpoints.

    achieved FLOP/s = 3 * flops_per_token(seq_len) * tokens/s   (forward + backward)
    MFU             = achieved FLOP/s / peak,  peak = train.metrics.measure_matmul_peak()

Run:
  python benchmarks/train_throughput.py
  python benchmarks/train_throughput.py --sizes=tiny,default,wide --steps=20   # wide: ~1-4 s a step on 2 CPU cores
  python benchmarks/train_throughput.py --quick   # the tiny size, 2 steps, a small peak matmul (the test)
"""

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from configs.loader import load_config
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding.strategies import get_strategy
from train import build
from train import program as program_lib
from train.metrics import measure_matmul_peak

# name -> (configs/gpt.py preset, overrides). The vocabulary is the preset's BPE size.
SIZES = {
    "tiny": ("tiny", []),  # 2 layers x 64, seq 64, batch 8, vocab 512
    "default": ("default", []),  # 4 layers x 128, seq 128, batch 16, vocab 2048
    "wide": ("default", ["model.block.d_model=256", "model.block.d_ff=1024", "tokenizer.vocab_size=4096"]),
    "small": ("small", []),  # GPT-2 small; batch 512 x 1024: an accelerator only
}


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A [B, T] int32 batch of random tokens: one document per row, every token counted."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    ones = np.ones((batch_size, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones, "positions": positions,
            "loss_mask": ones}


def build_program(config, *, strategy: str = "dp", mesh_spec: str = "data=1", devices=None):
    """The model and sharded program of `config` as `train.trainer.run` builds them.

    Args:
      config: a run config (`configs/base.py` keys).
      strategy: a `sharding.strategies` name.
      mesh_spec: the mesh (`sharding.mesh.make_mesh`), e.g. "data=1" or "fsdp=-1".
      devices: the devices of the mesh (default: the first one).

    Returns:
      (model, `sharding.step.ShardedProgram`).
    """
    model = build.model(config, config.tokenizer.vocab_size)  # no tokenizer: its configured size
    tx, schedule = build.optimizer(config)
    mesh = mesh_lib.make_mesh(mesh_spec, list(devices) if devices is not None else jax.devices()[:1])
    program = program_lib.build_for_run(config, model, tx, schedule, strategy=get_strategy(strategy), mesh=mesh)
    return model, program


def time_steps(step_fn, state, batch, rng, steps: int, warmup: int):
    """Runs `warmup` untimed steps (the first also compiles a jitted step), then `steps` timed ones.

    Returns:
      (first_step_seconds, mean step_seconds of the timed steps, state, metrics of the last step).
    """
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, rng)
    jax.block_until_ready((state, metrics))
    first_step_seconds = time.perf_counter() - start
    for _ in range(warmup - 1):
        state, metrics = step_fn(state, batch, rng)
    jax.block_until_ready((state, metrics))

    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, batch, rng)
    jax.block_until_ready((state, metrics))
    step_seconds = (time.perf_counter() - start) / steps
    if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(f"the loss became {float(metrics['loss'])}")
    return first_step_seconds, step_seconds, state, metrics


def time_train_step(size: str, steps: int, warmup: int) -> dict[str, float]:
    """Builds `size` as the trainer would and times `steps` train steps after `warmup` ones.

    Returns:
      num_params, tokens_per_step, step_seconds (mean over the timed steps),
      compile_seconds (the first call: compilation and one step), tokens_per_second, flops_per_second.
    """
    preset, overrides = SIZES[size]
    config = load_config(str(_ROOT / "configs" / "gpt.py") + ":" + preset, overrides)
    model, program = build_program(config)
    B, T = config.data.batch_size, config.data.seq_len
    batch = rules_lib.device_put_batch(synthetic_batch(B, T, model.config.vocab_size), program.layout.batch)
    state = program.init(jax.random.key(config.seed))
    compile_seconds, step_seconds, _, _ = time_steps(program.step, state, batch, jax.random.key(config.seed + 1),
                                                     steps, warmup)
    tokens_per_second = B * T / step_seconds
    return {
        "num_params": model.config.num_params(),
        "tokens_per_step": B * T,
        "shape": f"{model.config.num_layers}L x {model.config.block.d_model}, B{B} x T{T}, V{model.config.vocab_size}",
        "compile_seconds": compile_seconds,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens_per_second,
        "flops_per_second": 3 * model.config.flops_per_token(T) * tokens_per_second,
    }


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,default",
                        help=f"comma-separated sizes among {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny size, 2 timed steps after 1, a 512^2 peak matmul: a check that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.warmup = "tiny", 2, 1
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; expected some of {list(SIZES)}")
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps={args.steps} and --warmup={args.warmup} must both be >= 1")

    device = jax.devices()[0]
    n = 512 if args.quick else 2048
    peak = measure_matmul_peak(n, repeats=1) if args.quick else measure_matmul_peak(n)
    print(f"device: {device.platform} {device.device_kind}; {jax.device_count()} devices (1 used)")
    print(f"matmul peak ({n}^2 float32, measured now): {peak / 1e9:.1f} GFLOP/s")
    print(f"timed {args.steps} steps per size after {args.warmup} warm-up steps\n")

    header = (f"{'model':8} {'shape':34} {'params':>8} {'tok/step':>8} {'compile':>8} {'step':>9} "
              f"{'tokens/s':>10} {'GFLOP/s':>8} {'of peak':>7}")
    print(header)
    print("-" * len(header))
    results = {}
    for size in sizes:
        r = time_train_step(size, args.steps, args.warmup)
        results[size] = {**r, "peak_flops": peak}
        print(f"{size:8} {r['shape']:34} {r['num_params'] / 1e6:7.2f}M {r['tokens_per_step']:8d} "
              f"{r['compile_seconds']:7.1f}s {r['step_seconds'] * 1e3:7.1f}ms {r['tokens_per_second']:10.0f} "
              f"{r['flops_per_second'] / 1e9:8.1f} {r['flops_per_second'] / peak:7.1%}", flush=True)
    return results


if __name__ == "__main__":
    main()
