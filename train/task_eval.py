"""Harness tasks during training (`eval.tasks`): scored on the live parameters, logged as
`eval/<task>/<metric>` beside val_loss.

    tasks = task_eval.TaskEvaluator(run)      # the tasks of run.config.eval.tasks
    tasks(state) -> {"eval/arith_add/exact_match": 0.25, ...}     # {} when it names none

At every evaluation (`eval.every_steps`, and the end of the run) the trainer hands the loop's
state to `evals.harness.evaluate` through `evals.lm.ModelLM`, without a copy or a gather: the
parameters stay in the run's sharded layout (FSDP shards, a LoRA run's frozen base beside its
adapters, `train.trainable.combine`) and ModelLM places its batches on the run's mesh. The
model is the run's own, so a LoRA, prefix or adapter run scores with its adapters applied; a
PPO run scores its policy (`models.policy_value`: without the value head or value model).
Every process takes part (the forward passes are collectives); only process 0 writes what
they return. The numbers equal `python -m evals` on the checkpoint of the same step.

`evals` is imported here only when a run names tasks: it imports `inference`, which imports
`train.build` lazily, so a module-level import would tie the packages in a cycle.
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
    """The tasks of `eval.tasks`, loaded (their declarations, not their data); ValueError naming
    the key and the bad task. [] when the run names none."""
    names = task_names(config)
    if not names:
        return []
    from evals import tasks

    try:
        return tasks.load_tasks(names)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"config key `eval.tasks`={config.eval.tasks!r}: {e}") from None


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


class TaskEvaluator:
    """The run's `eval.tasks`, scored on a state by the harness (see the module docstring);
    with no tasks it returns {} and imports nothing."""

    def __init__(self, run):
        """Loads the tasks of `run.config.eval.tasks` (already checked by `train.validate`)."""
        self.run = run
        self.tasks = check_tasks(run.config)
        self.model = policy_value.policy_model(run.model)  # PPO: the policy alone
        config = run.config
        # The micro-batch: what the run already fits in memory at once.
        self.batch_size = config.data.batch_size // config.optimizer.grad_accum_steps
        self.limit = config.eval.task_limit or None

    def __call__(self, state) -> dict[str, float]:
        """`eval/<task>/<metric>` of the tasks on `state`'s parameters, as they are laid out."""
        if not self.tasks:
            return {}
        from evals import harness
        from evals.lm import ModelLM

        params = trainable.combine(state.params, state.frozen)
        if self.model is not self.run.model:
            params = policy_value.policy_params(params)
        lm = ModelLM(self.model, params, self.run.tokenizer, batch_size=self.batch_size, mesh=self.run.mesh,
                     strategy=self.run.config.sharding.strategy)
        return metric_names(harness.evaluate(lm, self.tasks, limit=self.limit))

