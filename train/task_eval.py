"""Harness tasks during training (`eval.tasks`): scored on the live parameters, logged as
`eval/<task>/<metric>` beside val_loss.

    tasks = task_eval.TaskEvaluator(run)      # the tasks of run.config.eval.tasks
    tasks(state) -> {"eval/pydoc_cloze/acc": 0.25, ...}     # {} when it names none

The trainer scores them at the start of the run (the scores it starts from; a task the model
cannot score, e.g. one whose continuations outgrow the context, fails before any training),
every `eval.every_steps` and at the end (the summary). It hands the loop's state to
`evals.harness.evaluate` through `evals.lm.ModelLM` without a copy or a gather: the parameters
stay in the run's sharded layout (FSDP shards, a LoRA run's frozen base beside its adapters,
`train.trainable.combine`) and ModelLM places its batches on the run's mesh. The model is the
run's own, so a LoRA, prefix or adapter run scores with its adapters applied; a PPO run scores
its policy (`policy_lm`). Every process takes part (the forward passes are collectives); only
process 0 writes what they return. The numbers equal the harness on the checkpoint of the same
step (`python -m evals`, at the same batch size and strategy).

`evals` is imported only when a run names tasks: it imports `inference`, which reads
`train.build`, so `train` importing `evals` at module level would make a cycle.
"""

from __future__ import annotations

from typing import Any

from models import policy_value
from train import trainable

PREFIX = "eval"


def task_names(config) -> list[str]:
    """The names (or task file paths) of `eval.tasks`, comma-separated; [] for none."""
    return [name.strip() for name in config.eval.tasks.split(",") if name.strip()]


def check_tasks(config) -> list[Any]:
    """The tasks of `eval.tasks`, loaded (their documents read and checked by
    `evals.tasks.load_tasks`); ValueError or FileNotFoundError naming the key and the bad task.
    [] when the run names none."""
    names = task_names(config)
    if not names:
        return []
    from evals import tasks

    try:  # tfds: sources are read where the run's own tfds data lives if set (else tfds's default)
        return tasks.load_tasks(names, data_dir=config.data.data_dir or None)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config key `eval.tasks`={config.eval.tasks!r}: {e}") from None


def check_model(config, model) -> None:
    """A run that names tasks trains a decoder with an LM head (the tasks score log-likelihoods
    and generations); ValueError in one line otherwise."""
    if not task_names(config) or _scores_text(model):
        return
    from train import objectives

    kind = (f"an encoder ({type(model).__name__})" if not policy_value.is_decoder(model) else
            f"a decoder under a {policy_value.policy_model(model).config.head!r} head")
    raise ValueError(f"config key `eval.tasks`={config.eval.tasks!r} needs a causal LM (a decoder with an LM head) "
                     f"but this run (objective {objectives.name_of(config)!r}) trains {kind}; set eval.tasks=''")


def _scores_text(model) -> bool:
    return policy_value.is_decoder(model) and policy_value.policy_model(model).config.head == "lm"


def metric_names(results) -> dict[str, float]:
    """`eval/<task>/<metric>` -> value of a harness `Results`."""
    return {f"{PREFIX}/{task}/{metric}": float(score["value"])
            for task, metrics in results.results.items() for metric, score in metrics.items()}


def policy_lm(model, params) -> tuple[Any, Any]:
    """(model, params) of the causal LM that a run's tasks score: the run's own, or a PPO run's
    policy (`models.policy_value`: without the shared value head or the separate value model)."""
    policy = policy_value.policy_model(model)
    return (policy, params) if policy is model else (policy, policy_value.policy_params(params))


class TaskEvaluator:
    """The run's `eval.tasks`, scored on a state by the harness (see the module docstring);
    with no tasks it returns {} and imports nothing."""

    def __init__(self, run):
        """Loads the tasks of `run.config.eval.tasks` (already checked by `train.validate`)."""
        self.run = run
        self.tasks = check_tasks(run.config)
        config = run.config
        # The micro-batch: what the run already fits in memory at once.
        self.batch_size = config.data.batch_size // config.optimizer.grad_accum_steps
        self.limit = config.eval.task_limit or None

    def __call__(self, state) -> dict[str, float]:
        """`eval/<task>/<metric>` of the tasks on `state`'s parameters, as they are laid out.

        Raises:
          ValueError: one line naming the task this run's model cannot score (e.g. a continuation
            longer than the model's context).
        """
        if not self.tasks:
            return {}
        from evals import harness
        from evals.lm import ModelLM

        model, params = policy_lm(self.run.model, trainable.combine(state.params, state.frozen))
        lm = ModelLM(model, params, self.run.tokenizer, batch_size=self.batch_size, mesh=self.run.mesh,
                     strategy=self.run.config.sharding.strategy)
        scores = {}
        for task in self.tasks:  # one at a time, so that an error names its task (the scores do not depend on it)
            try:
                results = harness.evaluate(lm, [task], limit=self.limit)
            except ValueError as e:
                raise ValueError(f"config key `eval.tasks`: task {task.name!r} cannot be scored by this run's model: "
                                 f"{e}") from None
            scores.update(metric_names(results))
        return scores
