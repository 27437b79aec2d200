"""Capacity planner: will a model's training state fit, per device, under a strategy?

Two modes:

    python -m sharding.plan --params=7.5e9 --devices=64 [--precision=mixed] [--json]

prints the ZeRO paper's per-device memory of model states (parameters, gradients, Adam
state; no activations) for dp, zero1, zero2 and zero3, in decimal GB. With the defaults it
reproduces the paper's Table 1 row for 7.5B parameters on 64 GPUs: 120, 31.4, 16.6, 1.88.

    python -m sharding.plan --config=configs/llama.py:llama3_8b --mesh=data=8 --strategy=zero3 \
        --device_memory_gb=141 [--config.KEY=VALUE ...] [--json]

builds the model and the train step of the config and compiles the step ahead of time for
the mesh with shape-only inputs (`jax.ShapeDtypeStruct` carrying shardings): nothing of the
model is allocated. The mesh's devices are simulated CPU devices (the command sets
`--xla_force_host_platform_device_count` to the mesh size before jax starts), so the
compiled sizes are those of XLA's CPU buffer assignment: the state's bytes are exact, the
temporaries an estimate of what a GPU compile would assign, and for ZeRO-2/3 an upper bound:
the CPU compiler reduces gradients with an all-reduce (the whole f32 gradient, 4Ψ, lives for
a moment) where GPU compilers reduce-scatter, and it schedules ZeRO-3's all-gathers without
a memory limit. It prints the per-device breakdown beside the analytic formulas and whether
the peak fits. Under a pipeline strategy (a `stage` axis) the analytic state counts the
stacked layers' share 1 / stages, and the plan adds the pipeline's bubble and the layer inputs
its stages keep for the backward pass (`analysis.pipeline_activation_bytes`). For example
llama3_8b, zero3 on data=8, one 2048-token row per device (--config.data.batch_size=8 --config.data.seq_len=2048): state 16.06 GB, peak 101 GB.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags

from configs.loader import split_override_args

ZERO_TABLE = ("dp", "zero1", "zero2", "zero3")

_PARAMS = flags.DEFINE_float("params", 0.0, "Ψ, the number of parameters (formula mode).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Data-parallel devices N (formula mode), or the device count for a "
                                              "mesh with -1 (compile mode; default: the mesh's product).")
_PRECISION = flags.DEFINE_enum("precision", "mixed", ["mixed", "f32"], "Formula mode: mixed-precision Adam "
                               "(2 + 2 + 12 bytes per parameter) or f32 (4 + 4 + 8).")
_CONFIG = flags.DEFINE_string("config", "", "Config file and preset, FILE.py:PRESET (compile mode).")
_MESH = flags.DEFINE_string("mesh", "", "Mesh, e.g. data=8 or data=2,fsdp=2,tensor=2 (default: the strategy's).")
_STRATEGY = flags.DEFINE_string("strategy", "", "Sharding strategy (default: the config's sharding.strategy).")
_MEMORY = flags.DEFINE_float("device_memory_gb", 80.0, "Memory of one device, decimal GB (H100: 80, H200: 141).")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")


def formula_table(num_params: float, num_devices: int, precision: str = "mixed") -> dict:
    """Per-device decimal GB of dp, zero1, zero2, zero3 (3 significant digits) and the breakdown."""
    from sharding.analysis import zero_bytes

    rows = {name: zero_bytes(num_params, num_devices, name, precision) for name in ZERO_TABLE}
    return {
        "params": num_params, "devices": num_devices, "precision": precision,
        "gb_per_device": {name: _sig3(r["total"] / 1e9) for name, r in rows.items()},
        "breakdown_gb": {name: {k: _sig3(v / 1e9) for k, v in r.items()} for name, r in rows.items()},
    }


def compile_plan(config, *, strategy: str, mesh: str, device_memory_gb: float, devices=None) -> dict:
    """Compiles `config`'s train step for `strategy` on `mesh` from shapes only and reports the
    per-device memory (bytes) and whether the peak fits in `device_memory_gb`.

    Args:
      config: a loaded run config (decoder families).
      strategy: a strategy name.
      mesh: a mesh string ("" for the strategy's default).
      device_memory_gb: one device's memory, decimal GB.
      devices: the devices of the mesh (default all).
    """
    import jax

    from sharding import analysis
    from sharding import mesh as mesh_lib
    from sharding.strategies import STAGE, axis_size, check_pipeline_batch, get_strategy
    from train import build
    from train import program as program_lib

    if config.model.family == "bert":
        raise ValueError("the planner compiles the decoder families' next-token step; model.family='bert' is not "
                         "supported")
    chosen = get_strategy(strategy)
    device_mesh = mesh_lib.make_mesh(mesh or chosen.default_mesh, devices)
    check_pipeline_batch(chosen, dict(device_mesh.shape), config.data.batch_size // config.optimizer.grad_accum_steps,
                         config.sharding.pipeline_microbatches)
    model = build.model(config, config.model.vocab_size or config.tokenizer.vocab_size)
    tx, schedule = build.optimizer(config)
    seq_len, batch_size = config.data.seq_len, config.data.batch_size
    program = program_lib.build_for_run(config, model, tx, schedule, strategy=chosen, mesh=device_mesh)
    compiled = program.step.lower(program.abstract_state, program.abstract_batch(batch_size, seq_len),
                                  jax.random.key(0)).compile()
    num_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(program.abstract_state.params))
    precision = "f32" if config.model.param_dtype == "float32" else "mixed"
    memory = analysis.compiled_memory(compiled)
    staged = analysis.staged_params(program.layout, program.abstract_state.params)
    stages = dict(device_mesh.shape).get(STAGE, 1) if STAGE in chosen.mesh_axes else 1
    pipeline = None
    if stages > 1:
        micro = config.sharding.pipeline_microbatches
        rows = batch_size // config.optimizer.grad_accum_steps // micro // axis_size(
            device_mesh, tuple(a for a in chosen.batch_axes if a in device_mesh.shape))
        pipeline = {"stages": stages, "microbatches": micro, **analysis.pipeline_activation_bytes(
            stages=stages, microbatches=micro, num_layers=config.model.num_layers, rows=rows, seq_len=seq_len,
            d_model=config.model.block.d_model, bytes_per_element=4 if config.model.dtype == "float32" else 2)}
    return {
        "config": config.model.family, "strategy": strategy, "mesh": dict(device_mesh.shape), "params": num_params,
        "state_bytes": analysis.state_bytes(program.layout, program.abstract_state),
        "analytic_bytes": analysis.analytic_state_bytes(program.layout, num_params, precision, staged),
        "pipeline": pipeline,
        "analytic_precision": precision,
        "compiled_bytes": memory,
        "device_memory_bytes": device_memory_gb * 1e9,
        "fits": memory["peak"] <= device_memory_gb * 1e9,
    }


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


def _print_formula(result: dict) -> None:
    print(f"model states per device, {result['params']:.3g} parameters on {result['devices']} devices "
          f"({result['precision']} Adam), decimal GB:")
    print(f"{'strategy':10s} {'params':>8s} {'grads':>8s} {'opt':>8s} {'total':>8s}")
    for name in ZERO_TABLE:
        b = result["breakdown_gb"][name]
        print(f"{name:10s} {b['params']:8.3g} {b['grads']:8.3g} {b['opt_state']:8.3g} {b['total']:8.3g}")


def _print_plan(r: dict) -> None:
    gb = 1e9
    mesh = ",".join(f"{a}={s}" for a, s in r["mesh"].items())
    print(f"{r['config']} ({r['params'] / 1e9:.3g}B parameters), strategy {r['strategy']}, mesh {mesh}; per device, GB:")
    a, s = r["analytic_bytes"], r["state_bytes"]
    for key in ("params", "grads", "opt_state"):
        print(f"  {key:10s} sharded {s[key] / gb:10.4g}   analytic ({r['analytic_precision']}) {a[key] / gb:10.4g}")
    c = r["compiled_bytes"]
    print(f"  compiled: arguments {c['argument'] / gb:.4g}, outputs {c['output'] / gb:.4g} "
          f"(donated {c['alias'] / gb:.4g}), temporaries {c['temp'] / gb:.4g}, peak {c['peak'] / gb:.4g}")
    p = r.get("pipeline")
    if p:
        print(f"  pipeline: {p['stages']} stages x {p['microbatches']} micro-batches, bubble {p['bubble']:.3f}; "
              f"{p['in_flight_ticks']} ticks of layer inputs kept per stage: {p['layer_input_bytes'] / gb:.4g} "
              "(the layers' own activations come on top unless remat=full)")
    verdict = "fits" if r["fits"] else "does NOT fit"
    print(f"  {verdict} in {r['device_memory_bytes'] / gb:.4g} GB"
          + ("" if r["fits"] else " (more devices, a higher ZeRO stage, remat, or gradient accumulation)"))


def main(argv, overrides) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value:
        from configs.loader import load_config
        from sharding.mesh import DEFAULT_MESH
        from sharding.strategies import get_strategy

        config = load_config(_CONFIG.value, overrides)
        strategy = _STRATEGY.value or config.sharding.strategy
        mesh = _MESH.value or config.sharding.mesh or get_strategy(strategy).default_mesh or DEFAULT_MESH
        result = compile_plan(config, strategy=strategy, mesh=mesh, device_memory_gb=_MEMORY.value)
        print(json.dumps(result, indent=2)) if _JSON.value else _print_plan(result)
        return
    if _PARAMS.value <= 0 or _DEVICES.value <= 0:
        raise app.UsageError("give --params and --devices (formula mode), or --config (compile mode)")
    result = formula_table(_PARAMS.value, _DEVICES.value, _PRECISION.value)
    print(json.dumps(result, indent=2)) if _JSON.value else _print_formula(result)


def _simulate_devices(argv: list[str]) -> None:
    """Before jax starts: as many CPU devices as the compile-mode mesh needs."""
    values = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if "config" not in values:
        return
    devices = values.get("devices", "0")
    if not devices.strip().isdigit():
        raise ValueError(f"--devices={devices!r} must be a non-negative integer (e.g. --devices=8)")
    count = int(devices)
    if not count:
        mesh = values.get("mesh", "data=8")
        try:
            sizes = [int(part.split("=", 1)[1]) for part in mesh.split(",")]
        except (IndexError, ValueError):
            raise ValueError(f"--mesh={mesh!r}: each axis must be NAME=SIZE (e.g. data=2,fsdp=4)") from None
        count = math.prod(sizes) if -1 not in sizes else 8
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
    from train import cli

    argv, overrides = split_override_args(sys.argv)
    # errors as one line `error: ...` (--verbose: traceback); the devices are simulated before jax starts
    cli.run(lambda a: main(a, overrides), argv=argv, prepare=lambda: _simulate_devices(argv))
