"""Multi-host training in miniature: processes joined by `jax.distributed` train one mesh.

Two CPU processes with two devices each make one mesh of four devices; each process feeds
only its own rows of the global batch (`jax.make_array_from_process_local_data`), and the
sharded step runs as one SPMD program over both (CPU collectives through gloo):

    python -m sharding.multihost_demo --num_processes=2 --process_id=0 --coordinator=127.0.0.1:12345 &
    python -m sharding.multihost_demo --num_processes=2 --process_id=1 --coordinator=127.0.0.1:12345

and the same global batch on one process with four devices, for comparison:

    python -m sharding.multihost_demo --local_devices=4

Each process prints one JSON line: its index, the global device count, the losses and the
final parameters' global norm. On real hosts the same code runs with each host's
accelerators (no --local_devices, which only simulates CPU devices) and
`jax.distributed.initialize()` reading the cluster from the environment.

Data: a fixed batch of random tokens (data.batch_size rows of data.seq_len, seed 0), the
same on every process; each process keeps the rows its devices hold.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from configs.loader import split_override_args

DEFAULT_LOCAL_DEVICES = 2
FLAGS = flags.FLAGS



def local_rows(sharding, global_batch):
    """The rows of `global_batch` ([B, ...] arrays) this process's devices hold under the batch
    `sharding`: one contiguous block (a batch split along its first dimension only)."""
    rows = global_batch["inputs"].shape[0]
    spans = sorted({index[0].indices(rows)[:2] for index in
                    sharding.addressable_devices_indices_map(global_batch["inputs"].shape).values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"this process's rows {spans} are not one contiguous block")
    return {k: v[start:stop] for k, v in global_batch.items()}


def train(config, *, strategy: str, mesh: str, steps: int, compiler_options=None) -> dict:
    """Trains `steps` steps of `config` on all processes' devices; returns this process's report."""
    import jax

    from sharding import mesh as mesh_lib
    from sharding.ablate import random_batch
    from sharding.strategies import get_strategy
    from train import build
    from train import program as program_lib

    chosen = get_strategy(strategy)
    device_mesh = mesh_lib.make_mesh(mesh or chosen.default_mesh)
    vocab = config.model.vocab_size or config.tokenizer.vocab_size
    model = build.model(config, vocab)
    tx, schedule = build.optimizer(config)
    program = program_lib.build_for_run(config, model, tx, schedule, strategy=chosen, mesh=device_mesh)
    global_batch = random_batch(config.data.batch_size, config.data.seq_len, vocab)
    mine = local_rows(program.layout.batch, global_batch)
    batch = {k: jax.make_array_from_process_local_data(program.layout.batch, v, global_batch[k].shape)
             for k, v in mine.items()}
    compiled = program.step.lower(program.abstract_state, program.abstract_batch(*global_batch["inputs"].shape),
                                  jax.random.key(1)).compile(compiler_options)
    state = program.init(jax.random.key(config.seed))
    losses = []
    for _ in range(steps):
        state, metrics = compiled(state, batch, jax.random.key(config.seed + 1))
        losses.append(float(metrics["loss"]))  # replicated: every process holds it
    norm = jax.jit(lambda p: jax.numpy.sqrt(sum(jax.numpy.sum(x * x) for x in jax.tree_util.tree_leaves(p))),
                   out_shardings=program.layout.replicated)(state.params)
    return {"process": jax.process_index(), "num_processes": jax.process_count(), "devices": jax.device_count(),
            "mesh": dict(device_mesh.shape), "rows": [int(mine["inputs"].shape[0]), config.data.batch_size],
            "losses": losses, "param_norm": float(norm)}


def main(argv, overrides) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from configs.loader import load_config
    from sharding.ablate import FAST_COMPILE

    if FLAGS.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    config = load_config(FLAGS.config, overrides)
    report = train(config, strategy=FLAGS.strategy, mesh=FLAGS.mesh, steps=FLAGS.steps,
                   compiler_options=FAST_COMPILE if FLAGS.fast_compile else None)
    print(json.dumps(report), flush=True)
    if FLAGS.num_processes > 1:
        jax.distributed.shutdown()


def _simulate_devices(argv: list[str]) -> None:
    """Before jax starts: --local_devices CPU devices for this process."""
    count = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--local_devices=")), DEFAULT_LOCAL_DEVICES)
    if count:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={count}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _define_flags() -> None:
    """The command's flags (defined only when run as a command, so the module imports anywhere)."""
    flags.DEFINE_string("config", "configs/llama.py:tiny", "Config file and preset, FILE.py:PRESET.")
    flags.DEFINE_string("strategy", "fsdp", "Sharding strategy.")
    flags.DEFINE_string("mesh", "", "Mesh over all processes' devices (default: the strategy's).")
    flags.DEFINE_integer("steps", 3, "Train steps.")
    flags.DEFINE_integer("num_processes", 1, "Processes in the job (1: no jax.distributed).")
    flags.DEFINE_integer("process_id", 0, "This process's index.")
    flags.DEFINE_string("coordinator", "127.0.0.1:12345", "host:port of process 0's coordinator.")
    flags.DEFINE_integer("local_devices", DEFAULT_LOCAL_DEVICES,
                         "Simulated CPU devices of this process (0: the backend's own devices).")
    flags.DEFINE_bool("fast_compile", False, "Compile quickly (LLVM -O0, no fusion emitters; for tests).")


if __name__ == "__main__":
    _define_flags()
    argv, overrides = split_override_args(sys.argv)
    _simulate_devices(argv)
    app.run(lambda a: main(a, overrides), argv=argv)
