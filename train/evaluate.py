"""Evaluate a run's checkpoint: `python -m train.evaluate --workdir=W [--step=N]`.

The run's objective (its saved config's) evaluates the parameters of checkpoint N (default:
the latest committed one) on the run's validation data, exactly as the trainer's evaluations
do, and writes W/eval.json:

    {"step": N, "objective": "lm", "metrics": {"loss": ..., "accuracy": ...}, "sums": {...}}

An objective with `dataset_metrics` adds what it measures over the whole validation set (qa:
SQuAD's exact_match and f1, as the run's summary has them as val_exact_match and val_f1).

Only the parameters are read (`train.checkpoint.restore_params`: the trainable ones and the
frozen ones of a fine-tuning run), never the optimizer state; nothing but eval.json is
written (config.json and summary.json stay as they are).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from configs import loader

EVAL_FILE = "eval.json"


def _config_of(workdir: str, step: int) -> ml_collections.ConfigDict:
    """The run config saved with checkpoint `step` (what trained it)."""
    path = os.path.join(workdir, "checkpoints", str(step), "config", "metadata")
    try:
        with open(path) as f:
            return loader.with_defaults(json.load(f))
    except (OSError, ValueError) as e:
        raise ValueError(f"the run config of checkpoint {step} ({path}) is unreadable ({e}); pick another --step") \
            from None


def evaluate_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Evaluates checkpoint `step` (None: the latest) of `workdir` and writes WORKDIR/eval.json.

    Args:
      workdir: a `python -m train` workdir.
      step: a committed checkpoint step, or None for the latest.

    Returns:
      What eval.json holds: step, objective, metrics (the objective's `eval_metrics`) and the
      sums they come from.

    Raises:
      FileNotFoundError: no such workdir, no checkpoint, or no checkpoint at `step`.
    """
    from train import distributed, trainable, trainer
    from train import step as step_lib
    from train.checkpoint import restore_params

    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir} does not exist; give the workdir of a `python -m train` run")
    from inference.load import checkpoint_step

    step = checkpoint_step(workdir, step)
    config = _config_of(workdir, step)
    r = trainer.setup(config, workdir, write_config=False)
    root = os.path.join(workdir, "checkpoints")
    abstract = r.abstract_state
    params = restore_params(root, step, abstract.params)
    frozen = restore_params(root, step, abstract.frozen, key="frozen") if abstract.frozen else {}
    state = step_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=None, frozen=frozen)
    batches = r.objective.eval_batches(r.config, r.data, r.tokenizer)
    sums, metrics = trainer.evaluate(r, state, batches)
    over_set = getattr(r.objective, "dataset_metrics", None)  # e.g. SQuAD's exact match and F1
    if over_set is not None:
        metrics = {**metrics, **over_set(lambda: distributed.to_host(trainable.combine(params, frozen)), batches)}
    result = {"step": step, "objective": r.objective.name, "metrics": metrics, "sums": sums}
    if jax.process_index() == 0:
        path = os.path.join(workdir, EVAL_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)  # never a half-written eval.json
        print(f"step {step} ({r.objective.name}): " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
              + f"; wrote {path}", flush=True)
    return result


def _main() -> None:
    from absl import app, flags

    from train import cli

    workdir = flags.DEFINE_string("workdir", None, "The `python -m train` workdir to evaluate.")
    step = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
    flags.mark_flag_as_required("workdir")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        evaluate_checkpoint(workdir.value, step.value)

    cli.run(main)  # errors as one line `error: ...`, library logs behind --verbose


if __name__ == "__main__":
    _main()
