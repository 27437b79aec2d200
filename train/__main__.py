"""Pretrain a language model: `python -m train [--config=FILE.py:PRESET] [--workdir=DIR] [--config.KEY=VALUE ...]`.

With no flags: the default GPT on the embedded corpus, in ./workdir. The same command on an
existing workdir resumes from its latest checkpoint.

Multi-host: every process runs the same command with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (or none of them inside a SLURM, TPU-pod or Kubernetes job,
which JAX detects); see train/distributed.py.
"""

import sys

from train import xla_flags

try:  # before jax is imported: XLA reads its flags once, when its backend starts
    xla_flags.apply()
except ValueError as e:
    sys.exit(f"error: {e}")

from absl import app, flags

from configs.loader import ConfigError, load_config, split_override_args
from train import cli

_CONFIG = flags.DEFINE_string("config", "configs/gpt.py:default", "Config file and preset, FILE.py:PRESET.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics and the summary are written.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..num_processes-1.")


def main(argv, overrides):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from train import distributed

    try:  # before anything touches a device: the devices of every process form one mesh
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    from train import trainer  # after flag parsing: importing jax early is slow for --help
    try:
        config = load_config(_CONFIG.value, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    try:
        trainer.run(config, _WORKDIR.value)
    except trainer.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(143)
    except (trainer.NonFiniteLoss, distributed.LeadFailed) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    argv, overrides = split_override_args(sys.argv)
    cli.run(lambda a: main(a, overrides), argv=argv)  # errors as one line `error: ...` (--verbose: traceback)
