"""Sharding ablation: one config trained a few steps under several strategies, side by side.

    python -m sharding.ablate --config=configs/llama.py:tiny --strategies=dp,zero1,zero2,zero3,tp,tp_sp,fsdp_tp \
        --devices=8 --steps=3 --out=/tmp/ablation [--config.KEY=VALUE ...]

For each strategy, on its default mesh over `--devices` devices (`sharding.strategies`;
`STRATEGY@MESH` picks another, e.g. `--strategies=dp,zero3@data=2,fsdp=4,tp`), the tool compiles the train step
of the config, trains `--steps` steps from the same initial parameters on the same batch and
records:

  * per-device bytes of parameters, gradients and optimizer state, from the shardings
    (equal to what the arrays' addressable shards hold), beside the analytical ZeRO formulas
    (`sharding.analysis.analytic_state_bytes`, f32 or mixed precision after the config);
  * the compiled step's buffers (`memory_analysis`: arguments, outputs, donated, temporaries);
  * the collectives of the compiled HLO by kind (count, result bytes, ring wire bytes);
  * the step time (median over the steps) and the losses, and the largest absolute loss
    difference against dp (dp is run first whether asked for or not).

The pipeline strategies (pp, pp_fsdp, pp_tp, pp_fsdp_tp) split the stacked layers: with one of
them in the list every layout runs with model.scan_layers=True (the same outputs), and
sharding.pipeline_microbatches must split the batch (e.g. `--strategies=pp,pp_fsdp,pp_tp
--config.sharding.pipeline_microbatches=2` on the tiny LLaMA's 8 rows over 8 devices).

It prints a table and writes OUT/ablation.json (the records, schema in the README) and
OUT/ablation.png (bar charts of memory and collective bytes per strategy).

Devices: on CPU the tool simulates `--devices` devices itself: it sets
`--xla_force_host_platform_device_count` in XLA_FLAGS before jax starts (so run it as a
command, not after importing jax; in a notebook set XLA_FLAGS first). A backend with fewer
devices than asked falls back to the CPU devices.

Context parallelism (cp, fsdp_cp) runs the config's model with `model.block.attention_impl=ring`
(ring attention, which those strategies need), the others the config's as it is.

Data: one fixed batch of random tokens (data.batch_size rows of data.seq_len, seed 0), no
tokenizer or corpus: the ablation measures layouts, not learning.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

from absl import app, flags

from configs.loader import split_override_args

KINDS_SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
               "collective-permute": "CP"}
STATE_KINDS = ("params", "grads", "opt_state")
DEFAULT_DEVICES = 8
FLAGS = flags.FLAGS


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def parse_layouts(text: str) -> list[tuple[str, str]]:
    """"dp,zero3@data=2,fsdp=4,tp" -> [("dp", ""), ("zero3", "data=2,fsdp=4"), ("tp", "")] (a part
    with "=" continues the mesh before it; "+" may separate a mesh's axes too)."""
    layouts: list[tuple[str, str]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "@" in part:
            strategy, mesh = part.split("@", 1)
            layouts.append((strategy, mesh.replace("+", ",")))
        elif "=" in part and layouts and layouts[-1][1]:  # the rest of the previous mesh
            layouts[-1] = (layouts[-1][0], f"{layouts[-1][1]},{part}")
        else:
            layouts.append((part, ""))
    return layouts


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """One [B, T] batch of random tokens, one document per row, every token counted."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    ones = np.ones((batch_size, seq_len), np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
            "loss_mask": ones}


def ablate(config, layouts: Sequence[tuple[str, str]], *, steps: int = 3, devices: Sequence | None = None,
           compiler_options: dict | None = None, log=print) -> list[dict]:
    """Compiles and trains `config` under each (strategy, mesh) and returns one record each
    (the README's schema). The first record is dp on all the devices (added if not asked for):
    the loss reference.

    Args:
      config: a loaded run config (a decoder family).
      layouts: (strategy, mesh) pairs; mesh "" is the strategy's default.
      steps: train steps per layout.
      devices: the devices of every mesh (default: all of the default backend's).
      compiler_options: XLA options for the step (e.g. FAST_COMPILE).
      log: called with a line per layout (None: silent).
    """
    import jax
    import numpy as np

    from sharding import analysis
    from sharding import mesh as mesh_lib
    from sharding.strategies import CONTEXT, STAGE, check_pipeline_batch, get_strategy
    from train import build
    from train import program as program_lib

    if config.model.family == "bert":
        raise ValueError("the ablation trains the decoder families' next-token step; model.family='bert' is not "
                         "supported")
    devices = list(jax.devices() if devices is None else devices)
    layouts = [(s, m) for s, m in layouts]
    if not any(s == "dp" and not m for s, m in layouts):
        layouts.insert(0, ("dp", ""))
    layouts.sort(key=lambda sm: not (sm[0] == "dp" and not sm[1]))  # the reference first
    vocab = config.model.vocab_size or config.tokenizer.vocab_size
    if any(STAGE in get_strategy(s).mesh_axes for s, _ in layouts) and not config.model.scan_layers:
        # A pipeline splits the stacked layers; every layout runs them stacked (the same outputs).
        config = config.copy_and_resolve_references()
        config.model.scan_layers = True
        if log:
            log("model.scan_layers=True for every layout: the pipeline strategies split the stacked layers")
    model = build.model(config, vocab)
    tx, schedule = build.optimizer(config)
    batch = random_batch(config.data.batch_size, config.data.seq_len, vocab)
    precision = "f32" if config.model.param_dtype == "float32" else "mixed"
    ring_config = config.copy_and_resolve_references()
    ring_config.model.block.attention_impl = "ring"
    ring_model = build.model(ring_config, vocab)  # context parallelism's attention
    records, start = [], None
    for strategy_name, mesh_text in layouts:
        strategy = get_strategy(strategy_name)
        mesh = mesh_lib.make_mesh(mesh_text or strategy.default_mesh, devices)
        check_pipeline_batch(strategy, dict(mesh.shape), config.data.batch_size // config.optimizer.grad_accum_steps,
                             config.sharding.pipeline_microbatches)
        program = program_lib.build_for_run(config, ring_model if CONTEXT in strategy.mesh_axes else model, tx,
                                            schedule, strategy=strategy, mesh=mesh)
        began = time.perf_counter()
        compiled = program.step.lower(program.abstract_state, program.abstract_batch(*batch["inputs"].shape),
                                      jax.random.key(1)).compile(compiler_options)
        compile_time = time.perf_counter() - began
        if start is None:  # every layout starts from the same parameters: dp's init
            start = jax.device_get(program.init(jax.random.key(config.seed)))
        state, losses, times = _train(compiled, jax.device_put(start, program.layout.state),
                                      {k: jax.device_put(v, program.layout.batch) for k, v in batch.items()},
                                      steps, jax.random.key(config.seed + 1))
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(program.abstract_state.params))
        analytic = (None if strategy.name == "ep" else
                    analysis.analytic_state_bytes(program.layout, num_params, precision,
                                                  analysis.staged_params(program.layout, program.abstract_state.params)))
        records.append({
            "strategy": strategy.name,
            "summary": strategy.summary,
            "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
            "num_params": num_params,
            "bytes_per_device": analysis.state_bytes(program.layout, program.abstract_state),
            "measured_bytes_per_device": {"params": analysis.addressable_bytes(state.params),
                                          "opt_state": analysis.addressable_bytes(state.opt_state)},
            "analytic_bytes_per_device": analytic,
            "analytic_precision": precision,
            "compiled_bytes": analysis.compiled_memory(compiled),
            "collectives": analysis.summarize(analysis.collectives(compiled)),
            "compile_time_s": compile_time,
            "step_time_s": statistics.median(times),
            "losses": losses,
        })
        reference = records[0]["losses"]
        records[-1]["max_abs_loss_diff_vs_dp"] = max(abs(a - b) for a, b in zip(losses, reference))
        if log:
            log(f"{strategy.name:8s} {_mesh_text(records[-1]['mesh']):24s} compiled in {compile_time:.1f} s, "
                f"losses {', '.join(f'{x:.6f}' for x in losses)}")
    return records


def _train(compiled, state, batch, steps: int, rng):
    """(final state, losses, step times) of `steps` calls of the compiled step."""
    import jax

    losses, times = [], []
    for _ in range(steps):
        began = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - began)
        losses.append(float(metrics["loss"]))
    return state, losses, times


def _mesh_text(mesh: dict) -> str:
    return ",".join(f"{a}={s}" for a, s in mesh.items())


def format_table(records: Sequence[dict]) -> str:
    """The records as a text table: per-device KB of state (sharded and analytic), the compiled
    step's peak, collective KB by kind (result bytes), step time and the loss difference to dp."""
    kb = 1024
    head = (f"{'strategy':9s} {'mesh':22s} {'params':>7s} {'grads':>7s} {'opt':>7s} {'state':>7s} {'formula':>7s} "
            f"{'peak':>7s} {'AR':>7s} {'AR>RS':>7s} " + " ".join(f"{k:>6s}" for k in list(KINDS_SHORT.values())[1:])
            + f" {'step ms':>8s} {'max|dloss|':>10s}")
    lines = ["per device, KB; collectives: result bytes of one step's ops", head, "-" * len(head)]
    for r in records:
        state = r["bytes_per_device"]
        analytic = r["analytic_bytes_per_device"]
        analytic_text = f"{analytic['total'] / kb:7.1f}" if analytic else f"{'-':>7s}"
        ops = r["collectives"]
        collectives = " ".join(f"{ops[k]['bytes'] / kb:6.1f}" for k in list(KINDS_SHORT)[1:])
        lines.append(f"{r['strategy']:9s} {_mesh_text(r['mesh']):22s} {state['params'] / kb:7.1f} "
                     f"{state['grads'] / kb:7.1f} {state['opt_state'] / kb:7.1f} {sum(state.values()) / kb:7.1f} "
                     f"{analytic_text} {r['compiled_bytes']['peak'] / kb:7.1f} "
                     f"{ops['all-reduce']['bytes'] / kb:7.1f} {ops['all-reduce']['scattered_bytes'] / kb:7.1f} "
                     f"{collectives} {r['step_time_s'] * 1e3:8.2f} {r['max_abs_loss_diff_vs_dp']:10.2e}")
    lines.append(f"state: params + grads + opt from the shardings; formula: the ZeRO formula "
                 f"({records[0]['analytic_precision']}); peak: compiled arguments + outputs - donated + temporaries;")
    lines.append("AR>RS: all-reduce bytes every reader slices by device (XLA:CPU's reduce-scatter; GPU and TPU emit RS)")
    return "\n".join(lines)


def plot(records: Sequence[dict], path: str | None = None):
    """Two bar charts: per-device state bytes by kind (sharded, with the analytic total as a
    marker), and collective result bytes by kind, per strategy. Saved to `path` if given;
    returns the matplotlib figure."""
    import matplotlib

    if path:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r["strategy"] + "\n" + _mesh_text(r["mesh"]) for r in records]
    x = np.arange(len(records))
    fig, (memory_ax, comm_ax) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(records)), 8))
    width = 0.8 / len(STATE_KINDS)
    for i, kind in enumerate(STATE_KINDS):
        memory_ax.bar(x + (i - 1) * width, [r["bytes_per_device"][kind] / 1024 for r in records], width, label=kind)
    analytic = [r["analytic_bytes_per_device"] for r in records]
    shown = [(i, a) for i, a in enumerate(analytic) if a]
    for kind_index, kind in enumerate(STATE_KINDS):
        memory_ax.scatter([i + (kind_index - 1) * width for i, _ in shown], [a[kind] / 1024 for _, a in shown],
                          marker="_", s=200, color="black", label="ZeRO formula" if kind_index == 0 else None)
    memory_ax.set(title="model state per device", ylabel="KB", xticks=x, xticklabels=labels)
    memory_ax.legend()
    # An all-reduce whose readers slice it by device is XLA:CPU's reduce-scatter: shown apart.
    series = {"all-reduce": [r["collectives"]["all-reduce"]["bytes"] - r["collectives"]["all-reduce"]["scattered_bytes"]
                             for r in records],
              "all-reduce read in slices\n(reduce-scatter on GPU/TPU)":
                  [r["collectives"]["all-reduce"]["scattered_bytes"] for r in records],
              **{kind: [r["collectives"][kind]["bytes"] for r in records] for kind in list(KINDS_SHORT)[1:]}}
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        comm_ax.bar(x + (i - len(series) / 2 + 0.5) * width, [v / 1024 for v in values], width, label=name)
    comm_ax.set(title="collectives in one step (result bytes)", ylabel="KB", xticks=x, xticklabels=labels)
    comm_ax.legend(fontsize=8)
    for ax in (memory_ax, comm_ax):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


def write(records: Sequence[dict], out: str) -> tuple[str, str]:
    """OUT/ablation.json and OUT/ablation.png; returns their paths."""
    os.makedirs(out, exist_ok=True)
    json_path, png_path = os.path.join(out, "ablation.json"), os.path.join(out, "ablation.png")
    with open(json_path, "w") as f:
        json.dump(list(records), f, indent=2)
    plot(records, png_path)
    return json_path, png_path


def simulate_devices(count: int) -> None:
    """Asks XLA for `count` CPU devices (read when jax starts its backends, so call it first)."""
    flag = f"--xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def main(argv, overrides) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from configs.loader import load_config

    config = load_config(FLAGS.config, overrides)
    count = FLAGS.devices
    devices = jax.devices()
    if len(devices) < count:
        print(f"{jax.default_backend()} has {len(devices)} devices, fewer than --devices={count}: using the CPU's")
        devices = jax.devices("cpu")
    if len(devices) < count:
        raise app.UsageError(f"--devices={count} but only {len(devices)} CPU devices exist: XLA_FLAGS was read "
                             "before this tool could set it")
    records = ablate(config, parse_layouts(FLAGS.strategies), steps=FLAGS.steps, devices=devices[:count],
                     compiler_options=FAST_COMPILE if FLAGS.fast_compile else None)
    print(format_table(records))
    if FLAGS.out:
        for path in write(records, FLAGS.out):
            print("wrote", path)


def _devices_from_argv(argv: list[str]) -> int:
    for arg in argv:
        if arg.startswith("--devices="):
            value = arg.split("=", 1)[1]
            if not value.strip().isdigit() or int(value) < 1:
                raise ValueError(f"--devices={value!r} must be a positive integer (e.g. --devices=8)")
            return int(value)
    return flags.FLAGS['devices'].default


def _define_flags() -> None:
    """The command's flags (defined only when run as a command, so the module imports anywhere)."""
    flags.DEFINE_string("config", "configs/llama.py:tiny", "Config file and preset, FILE.py:PRESET.")
    flags.DEFINE_string("strategies", "dp,zero1,zero2,zero3,tp,tp_sp,fsdp_tp",
                        "Comma-separated strategies, each on its default mesh, or STRATEGY@MESH "
                        "(e.g. dp,zero3@data=2,fsdp=4,tp).")
    flags.DEFINE_integer("devices", DEFAULT_DEVICES, "Devices of every mesh. On CPU the tool simulates them (it sets "
                                                     "XLA_FLAGS=--xla_force_host_platform_device_count before jax "
                                                     "starts).")
    flags.DEFINE_integer("steps", 3, "Train steps per strategy.")
    flags.DEFINE_string("out", "", "Directory for ablation.json and ablation.png (none: print only).")
    flags.DEFINE_bool("fast_compile", False, "Compile quickly (LLVM -O0, no fusion emitters): the same HLO, "
                                             "memory and collectives, slower code (step times not meaningful).")


if __name__ == "__main__":
    from train import cli

    _define_flags()
    argv, overrides = split_override_args(sys.argv)
    # errors as one line `error: ...` (--verbose: traceback); the devices are simulated before jax starts
    cli.run(lambda a: main(a, overrides), argv=argv, prepare=lambda: simulate_devices(_devices_from_argv(argv)))
