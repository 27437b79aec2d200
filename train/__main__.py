"""Pretrain a language model: `python -m train [--config=FILE.py:PRESET] [--workdir=DIR] [--config.KEY=VALUE ...]`.

With no flags: the default GPT on the embedded corpus, in ./workdir. The same command on an
existing workdir resumes from its latest checkpoint.
"""

import sys

from absl import app, flags

from configs.loader import ConfigError, load_config, split_override_args
from train import cli

_CONFIG = flags.DEFINE_string("config", "configs/gpt.py:default", "Config file and preset, FILE.py:PRESET.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics and the summary are written.")


def main(argv, overrides):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
    except trainer.NonFiniteLoss as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    argv, overrides = split_override_args(sys.argv)
    cli.run(lambda a: main(a, overrides), argv=argv)  # errors as one line `error: ...` (--verbose: traceback)
