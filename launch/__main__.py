"""Render a cluster launch file: `python -m launch render TEMPLATE --set KEY=VALUE ... [--out FILE]`.

    python -m launch list                                   # the templates
    python -m launch list slurm/train.sbatch                # its values, defaults and help
    python -m launch render slurm/train.sbatch --set nodes=4 --set repo=/shared/lmlab \\
        --set config=configs/llama.py:small --set workdir=/shared/runs/small --out train.sbatch
    sbatch train.sbatch

Without --out the text goes to stdout. A bad template name or value is one line `error: ...`.
"""

import os

from absl import app, flags

from launch import catalog, render
from train import cli

_SET = flags.DEFINE_multi_string("set", [], "A template value KEY=VALUE; repeat the flag.")
_OUT = flags.DEFINE_string("out", None, "Write the rendered file here (default: stdout).")
_USAGE = "usage: python -m launch render TEMPLATE --set KEY=VALUE ... [--out FILE], or python -m launch list [TEMPLATE]"


def _list(args: list[str]) -> None:
    if not args:
        for template in catalog.TEMPLATES.values():
            print(f"{template.path:30s} {template.help}")
        return
    for value in render.find(args[0]).values:
        default = "(required)" if value.default is None else f"(default {value.default!r})"
        print(f"{value.name:22s} {default:26s} {value.help}")


def main(argv):
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if command == "list" and len(args) <= 1:
        return _list(args)
    if command != "render" or len(args) != 1:
        raise app.UsageError(_USAGE)
    text = render.render(args[0], render.parse_sets(_SET.value))
    if _OUT.value is None:
        print(text, end="")
        return
    with open(_OUT.value, "w") as f:
        f.write(text)
    if args[0].endswith(".sbatch"):
        os.chmod(_OUT.value, 0o755)
    print(f"# wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
