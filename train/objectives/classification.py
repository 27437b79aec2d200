"""Sequence classification (`objective=classification`): BERT's pooled [CLS] -> class logits.

Axis letters: B batch, T length, C classes.

The loss is the mean cross-entropy over the batch's examples (float32); rows with label -1
(the padding of an evaluation's last batch) count for nothing. Accumulation
(`train.objectives.base`): each micro-batch returns sum(example losses) / (examples in the whole
batch). The evaluation reports the loss and the accuracy over every validation example.

The data are `data.tasks`' (local JSONL/CSV or `tfds:`), configured by `task.*` and `data.*`
(`task_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from data import tasks
from train.objectives import register

ENCODER_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def task_config(config, data_cfg, kind: str) -> tasks.TaskConfig:
    """The `data.tasks.TaskConfig` of a run: its `data.*` (source, seq_len, batch size, splits) and
    `task.*` (fields, labels, windows)."""
    t = config.task
    return tasks.TaskConfig(
        kind=kind, source=data_cfg.source, seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size,
        seed=data_cfg.seed, shuffle=data_cfg.shuffle, data_dir=data_cfg.data_dir,
        train_split=data_cfg.train_split, eval_split=data_cfg.eval_split,
        validation_fraction=data_cfg.validation_fraction, text_key=data_cfg.text_key,
        text_pair_key=t.text_pair_key, label_key=t.label_key,
        labels=tuple(x.strip() for x in t.labels.split(",") if x.strip()), num_labels=t.num_labels,
        question_key=t.question_key, context_key=t.context_key, answers_key=t.answers_key, id_key=t.id_key,
        doc_stride=t.doc_stride, max_query_len=t.max_query_len)


def encoder_batch_spec(batch_size: int, seq_len: int, **per_example: Any) -> dict[str, jax.ShapeDtypeStruct]:
    spec = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in ENCODER_KEYS}
    return spec | {k: jax.ShapeDtypeStruct((batch_size,), jnp.int32) for k in per_example}


def example_cross_entropy(logits_BC: jax.Array, labels_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-example cross-entropy [B], correct argmax [B], counted [B]) in float32; labels < 0
    count for nothing (zero loss, not correct)."""
    counted_B = (labels_B >= 0).astype(jnp.float32)
    safe_B = jnp.maximum(labels_B, 0)
    logp_BC = jax.nn.log_softmax(logits_BC.astype(jnp.float32), axis=-1)
    nll_B = -jnp.take_along_axis(logp_BC, safe_B[:, None], axis=-1)[:, 0]
    correct_B = (jnp.argmax(logits_BC, axis=-1) == safe_B).astype(jnp.float32)
    return nll_B * counted_B, correct_B * counted_B, counted_B


def example_totals(labels_B: jax.Array) -> dict[str, jax.Array]:
    """The whole batch's counted examples (at least 1)."""
    return {"examples": jnp.maximum(jnp.sum(labels_B >= 0), 1).astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class ClassificationObjective:
    """Cross-entropy of a `BertForSequenceClassification` (see the module docstring)."""

    model: nn.Module
    name: str = "classification"
    # The task head trains under every PEFT method (`train.trainable.split`'s objective_head).
    trainable_head: str = r"^classifier/"

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        return encoder_batch_spec(batch_size, seq_len, labels=None)

    def prepare(self, batch, rng):
        return batch

    def totals(self, batch):
        return example_totals(batch["labels"])

    def _logits(self, params, batch, rng=None):
        kw = {"deterministic": True} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
        return self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                batch["token_type_ids"], **kw)

    def loss(self, params, batch, rng, totals):
        """(share of the whole batch's mean cross-entropy, (stats, None)) of a micro-batch."""
        nll_B, correct_B, counted_B = example_cross_entropy(self._logits(params, batch, rng), batch["labels"])
        loss = jnp.sum(nll_B) / totals["examples"]
        stats = {"loss": loss, "accuracy": jnp.sum(correct_B) / totals["examples"], "examples": jnp.sum(counted_B)}
        return loss, (stats, None)

    def after_update(self, params, aux, accum_steps):
        return params, {}

    def eval_sums(self, params, batch, rng):
        nll_B, correct_B, counted_B = example_cross_entropy(self._logits(params, batch), batch["labels"])
        return {"nll_sum": jnp.sum(nll_B), "correct_sum": jnp.sum(correct_B), "examples": jnp.sum(counted_B)}

    def eval_metrics(self, sums):
        count = max(sums["examples"], 1.0)
        return {"loss": sums["nll_sum"] / count, "accuracy": sums["correct_sum"] / count}

    # ---------------------------------------------------------------- host side: data

    def train_iterator(self, config, data_cfg, tokenizer):
        return tasks.train_iterator(task_config(config, data_cfg, "classification"), tokenizer)

    def eval_batches(self, config, data_cfg, tokenizer) -> tasks.EvalSet:
        return tasks.EvalSet(task_config(config, data_cfg, "classification"), tokenizer)


@register("classification")
def make(config, model, tokenizer) -> ClassificationObjective:
    """The classification objective of a `BertForSequenceClassification` (`task.num_labels` classes)."""
    from models.bert import BertForSequenceClassification

    if not isinstance(model, BertForSequenceClassification):
        raise ValueError(f"config key `objective`='classification' needs a BERT (model.family='bert' or "
                         f"init_from=hf:DIR of a BERT checkpoint), got a {type(model).__name__}")
    return ClassificationObjective(model)
