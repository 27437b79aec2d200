"""Extractive question answering (`objective=qa`): per-token start and end logits (SQuAD).

Axis letters: B batch (windows), T length, K n-best candidates.

The loss is the mean over windows of (start cross-entropy + end cross-entropy) / 2, as
transformers' BertForQuestionAnswering computes it; a window without the answer points at
[CLS]; rows with start_positions -1 (an evaluation's padding) count for nothing. Accumulation
(`train.objectives.base`): sum over the micro-batch's windows / windows in the whole batch.

Evaluation: the device sums give the loss and the token-level span accuracy (start and end both
right) of every window. SQuAD's exact match and F1 need the answer text: `squad_scores` runs the
model over the whole validation set, keeps each window's n-best start and end positions
(`jax.lax.top_k` on device), and on the host maps the best span of each example back to its
context (`data.squad.postprocess`) and scores it against the gold answers with the official
normalization (`evals.metrics.squad`). The trainer's `report` hook calls it with the whole
parameters, in every process alike (each scores the whole set, so nothing is gathered across
processes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data import squad, tasks
from evals.metrics.squad import squad as squad_exact_match_f1
from train.objectives import register
from train.objectives.classification import (
    ENCODER_KEYS,
    encoder_batch_spec,
    example_cross_entropy,
    example_totals,
    task_config,
)


@dataclasses.dataclass(frozen=True)
class QAObjective:
    """Span cross-entropy of a `BertForQuestionAnswering` (see the module docstring).

    Attributes:
      model: the BertForQuestionAnswering.
      n_best: start and end candidates kept per window for the post-processing.
      max_answer_length: longest answer, in tokens.
    """

    model: nn.Module
    n_best: int = 20
    max_answer_length: int = 30
    name: str = "qa"
    # The task head trains under every PEFT method (`train.trainable.split`'s objective_head).
    trainable_head: str = r"^qa_outputs/"

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        return encoder_batch_spec(batch_size, seq_len, start_positions=None, end_positions=None)

    def prepare(self, batch, rng):
        return batch

    def totals(self, batch):
        return example_totals(batch["start_positions"])

    def _logits(self, params, batch, rng=None):
        kw = {"deterministic": True} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
        return self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                batch["token_type_ids"], **kw)

    def _terms(self, params, batch, rng=None):
        start_BT, end_BT = self._logits(params, batch, rng)
        s_nll, s_ok, counted = example_cross_entropy(start_BT, batch["start_positions"])
        e_nll, e_ok, _ = example_cross_entropy(end_BT, batch["end_positions"])
        return (s_nll + e_nll) / 2, s_ok * e_ok, counted

    def loss(self, params, batch, rng, totals):
        """(share of the whole batch's mean span loss, (stats, None)) of a micro-batch."""
        nll_B, span_ok_B, counted_B = self._terms(params, batch, rng)
        loss = jnp.sum(nll_B) / totals["examples"]
        stats = {"loss": loss, "span_accuracy": jnp.sum(span_ok_B) / totals["examples"],
                 "examples": jnp.sum(counted_B)}
        return loss, (stats, None)

    def after_update(self, params, aux, accum_steps):
        return params, {}

    def eval_sums(self, params, batch, rng):
        nll_B, span_ok_B, counted_B = self._terms(params, batch)
        return {"nll_sum": jnp.sum(nll_B), "span_correct_sum": jnp.sum(span_ok_B), "examples": jnp.sum(counted_B)}

    def eval_metrics(self, sums):
        count = max(sums["examples"], 1.0)
        return {"loss": sums["nll_sum"] / count, "span_accuracy": sums["span_correct_sum"] / count}

    def candidates(self, params, batch) -> tuple[jax.Array, ...]:
        """Each window's n-best (start indices, start logits, end indices, end logits), [B, K] each."""
        start_BT, end_BT = self._logits(params, batch)
        k = min(self.n_best, start_BT.shape[-1])
        start_val, start_idx = jax.lax.top_k(start_BT, k)
        end_val, end_idx = jax.lax.top_k(end_BT, k)
        return start_idx, start_val, end_idx, end_val

    # ---------------------------------------------------------------- host side: data, report

    def train_iterator(self, config, data_cfg, tokenizer):
        return tasks.train_iterator(task_config(config, data_cfg, "qa"), tokenizer)

    def eval_batches(self, config, data_cfg, tokenizer) -> tasks.EvalSet:
        return tasks.EvalSet(task_config(config, data_cfg, "qa"), tokenizer)

    def dataset_metrics(self, params_fn, eval_data) -> dict[str, float]:
        """SQuAD exact match and F1 (percent) over the whole validation set (`squad_scores`);
        `params_fn()` gives the whole parameters on the host. `train.evaluate` adds them to
        eval.json's metrics."""
        return squad_scores(self, params_fn(), eval_data)

    def report(self, run, params_fn, sums, metrics, eval_data) -> tuple[dict[str, Any], str]:
        """SQuAD exact match and F1 (percent) over the whole validation set."""
        scores = self.dataset_metrics(params_fn, eval_data)
        extra = {"val_exact_match": scores["exact_match"], "val_f1": scores["f1"]}
        return extra, f"exact match {scores['exact_match']:.1f}, F1 {scores['f1']:.1f}"


def squad_predictions(objective: QAObjective, params, eval_set: tasks.EvalSet) -> list[str]:
    """The predicted answer text of every validation example (see the module docstring)."""
    candidates = jax.jit(functools.partial(QAObjective.candidates, objective))
    arrays, B = eval_set.arrays, eval_set.config.batch_size
    count = len(arrays["input_ids"])
    outs = []
    for first in range(0, count, B):
        batch = {k: arrays[k][first:first + B] for k in ENCODER_KEYS}
        missing = B - len(batch["input_ids"])  # one shape for every batch: one compilation
        batch = {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}
        outs.append([np.asarray(x)[:B - missing] for x in candidates(params, batch)])
    start_idx, start_val, end_idx, end_val = (np.concatenate(parts) for parts in zip(*outs))
    return squad.postprocess(eval_set.examples, eval_set.features, start_idx, start_val, end_idx, end_val,
                             max_answer_length=objective.max_answer_length)


def squad_scores(objective: QAObjective, params, eval_set: tasks.EvalSet) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over every validation example."""
    predictions = squad_predictions(objective, params, eval_set)
    return squad_exact_match_f1(predictions, [[text for text, _ in e.answers] for e in eval_set.examples])


@register("qa")
def make(config, model, tokenizer) -> QAObjective:
    """The qa objective of a `BertForQuestionAnswering` (`task.n_best`, `task.max_answer_length`)."""
    from models.bert import BertForQuestionAnswering

    if not isinstance(model, BertForQuestionAnswering):
        raise ValueError(f"config key `objective`='qa' needs a BERT (model.family='bert' or init_from=hf:DIR of a "
                         f"BERT checkpoint), got a {type(model).__name__}")
    return QAObjective(model, n_best=config.task.n_best, max_answer_length=config.task.max_answer_length)
