"""`python -m evals`: a checkpoint scored on tasks, results written and printed.

    results = cli.run("/tmp/tiny", ["pydoc_continuation", "my_task.yaml"], "/tmp/eval", limit=100)

The steps, cheapest first, so that bad input fails in a line before the model loads: the
flags' values, the output directory (an existing results.json is kept unless `overwrite`: a
finished evaluation is never replaced by accident), the checkpoint path's kind (a `python -m
train` workdir or a Hugging Face directory), the tasks (their files and every document checked,
`evals.tasks.load_tasks`); then the model (`evals.lm.ModelLM.from_path`, a mesh over every
device under `strategy`), the evaluation, OUT/results.json + OUT/<task>.jsonl, and the table
on stdout.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from evals import harness
from evals.tasks import load_tasks


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Raises ValueError (one line) if `out_dir` is a file, or holds results.json and not `overwrite`."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out={out_dir} is a file, not a directory; choose a directory for the results")
    if os.path.exists(os.path.join(out_dir, harness.RESULTS_FILE)) and not overwrite:
        raise ValueError(f"{os.path.join(out_dir, harness.RESULTS_FILE)} already exists (an earlier evaluation); "
                         "choose another --out, or pass --overwrite to replace its results")


def check_checkpoint(path: str) -> None:
    """Raises (one line) if `path` is neither a `python -m train` workdir nor a Hugging Face directory."""
    from inference.load import HF_WEIGHTS, WORKDIR_CHECKPOINTS, is_hf_dir, is_workdir

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint={path} is not a directory; give a `python -m train` workdir or a "
                                "Hugging Face model directory")
    if not (is_workdir(path) or is_hf_dir(path)):
        found = sorted(os.listdir(path))[:10]
        raise ValueError(f"--checkpoint={path} is neither a `python -m train` workdir (config.json + "
                         f"{WORKDIR_CHECKPOINTS}/) nor a Hugging Face directory (config.json + "
                         f"{' or '.join(HF_WEIGHTS)}); it holds {found}")


def parse_task_names(text: str) -> list[str]:
    """`a,b.yaml` -> ["a", "b.yaml"]; an empty list is an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--tasks names no task; give built-in names or task files, comma-separated")
    return names


def run(checkpoint: str, task_names: Sequence[str], out_dir: str, *, limit: int | None = None, batch_size: int = 8,
        max_length: int | None = None, strategy: str | None = None, dtype: str | None = None,
        step: int | None = None, bootstrap_iters: int = 1000, seed: int = 0, num_fewshot: int | None = None,
        data_dir: str | None = None, overwrite: bool = False) -> harness.Results:
    """Evaluates `checkpoint` on the tasks, writes OUT_DIR and prints the table.

    Args:
      checkpoint: a `python -m train` workdir or a Hugging Face directory.
      task_names: built-in tasks or task files (`evals.tasks.load_tasks`).
      out_dir: where results.json and the per-task records go.
      limit, bootstrap_iters, seed: as `evals.harness.evaluate`.
      batch_size, max_length, strategy, dtype, step: as `evals.lm.ModelLM.from_path`.
      num_fewshot: overrides every task's num_fewshot.
      data_dir: where `tfds:` task sources are prepared.
      overwrite: replace an existing OUT_DIR/results.json.

    Returns:
      The `harness.Results`.
    """
    for name, value, least in (("limit", limit, 1), ("batch_size", batch_size, 1), ("max_length", max_length, 2),
                               ("bootstrap_iters", bootstrap_iters, 0), ("num_fewshot", num_fewshot, 0),
                               ("step", step, 0)):
        if value is not None and value < least:
            raise ValueError(f"--{name}={value} must be >= {least}")
    check_out_dir(out_dir, overwrite)
    check_checkpoint(checkpoint)
    tasks = load_tasks(task_names, data_dir=data_dir, num_fewshot=num_fewshot)
    from evals.lm import ModelLM  # jax and the model: after every cheap check

    lm = ModelLM.from_path(checkpoint, batch_size=batch_size, max_length=max_length, strategy=strategy, dtype=dtype,
                           step=step)
    results = harness.evaluate(lm, tasks, limit=limit, bootstrap_iters=bootstrap_iters, seed=seed)
    meta = {"checkpoint": os.path.abspath(checkpoint), "tasks": list(task_names), "limit": limit,
            "batch_size": batch_size, "max_length": lm.max_length, "strategy": strategy, "dtype": dtype, "step": step,
            "bootstrap_iters": bootstrap_iters, "seed": seed, "num_fewshot": num_fewshot}
    path = harness.write(out_dir, results, meta=meta)
    print(harness.table(results))
    print(f"# wrote {path}", file=sys.stderr)
    return results
