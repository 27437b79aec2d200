"""Moderation: a pluggable classifier the server runs on input and output (TEAM14 interface).

A moderator maps texts to `ModerationResult`s (OpenAI's /v1/moderations shape: `flagged`,
per-category booleans and scores). Two kinds load through `load_moderator(spec)`:

  * a directory written by `python -m safety.train_moderator --out=DIR` (`ClassifierModerator`):
    `moderator.json` (categories, threshold, seq_len) and `model/`, a Hugging Face
    BertForSequenceClassification directory (MiniLM fine-tuned by lmlab's trainer under the
    `classification` objective) with its tokenizer. One class is `safe`; every other class is a
    category whose score is its softmax probability. A text is flagged when 1 - P(safe) (the
    harm categories' total) is at least the threshold; a category is marked when its own score is
    at least the threshold, and a flagged text with no such category marks its top-scoring one
    (so `flagged == any(categories)` always).
  * "module.path:attr": a user's object with `check(texts)` (or a zero-argument factory that
    returns one).

Axis letters: B batch, T tokens, C classes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

REFUSAL = "I can't help with that request. It was flagged by this server's content moderation."
SAFE = "safe"
MANIFEST = "moderator.json"


@dataclasses.dataclass
class ModerationResult:
    """One text's verdict: `flagged` is any(categories)."""

    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]


@runtime_checkable
class Moderator(Protocol):
    def check(self, texts: Sequence[str]) -> list[ModerationResult]: ...


def results_from_scores(scores_BC: np.ndarray, categories: Sequence[str], threshold: float,
                        harm_B: np.ndarray | None = None) -> list[ModerationResult]:
    """`ModerationResult`s of per-category scores [B, C].

    Args:
      scores_BC: each category's score.
      categories: their names.
      threshold: a category is marked at score >= threshold.
      harm_B: the probability of any harm (1 - P(safe)); when given, a text is flagged at
        harm >= threshold, and a flagged text with no marked category marks its top one.
    """
    out = []
    scores_BC = np.asarray(scores_BC, np.float64)
    for b, row in enumerate(scores_BC):
        flags = {c: bool(s >= threshold) for c, s in zip(categories, row)}
        if harm_B is not None and harm_B[b] >= threshold and not any(flags.values()):
            flags[categories[int(np.argmax(row))]] = True
        out.append(ModerationResult(any(flags.values()), flags, {c: float(s) for c, s in zip(categories, row)}))
    return out


class ClassifierModerator:
    """A BERT sequence classifier (a `safe` class plus one class per category) as a moderator.

    Args:
      model, params: a `BertForSequenceClassification` and its parameters.
      tokenizer: its WordPiece tokenizer.
      labels: class names in id order; one of them is "safe".
      threshold: a category is flagged when its probability is >= threshold.
      seq_len: texts are cut to this many tokens ([CLS] and [SEP] included).
    """

    def __init__(self, model, params, tokenizer, labels: Sequence[str], *, threshold: float = 0.5,
                 seq_len: int = 128, batch_size: int = 32):
        import jax

        if SAFE not in labels:
            raise ValueError(f"a moderation classifier needs a {SAFE!r} class; its labels are {list(labels)}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold}; expected a probability in (0, 1]")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.labels, self.threshold, self.seq_len, self.batch_size = tuple(labels), threshold, seq_len, batch_size
        self.categories = tuple(c for c in self.labels if c != SAFE)
        self._columns = [self.labels.index(c) for c in self.categories]
        self._probs = jax.jit(self._probabilities)

    def _probabilities(self, params, ids_BT, mask_BT):
        import jax
        import jax.numpy as jnp

        logits_BC = self.model.apply({"params": params}, ids_BT, mask_BT, jnp.zeros_like(ids_BT), deterministic=True)
        return jax.nn.softmax(logits_BC.astype(jnp.float32), axis=-1)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, T], attention mask [B, T]) padded to the longest text (a multiple of 8)."""
        from data.tasks import encode_pair

        rows = [encode_pair(self.tokenizer, str(t), None, self.seq_len)[0] for t in texts]
        width = min(self.seq_len, -(-max(len(r) for r in rows) // 8) * 8)
        ids = np.full((len(rows), width), self.tokenizer.pad_id or 0, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for n, row in enumerate(rows):
            ids[n, :len(row)], mask[n, :len(row)] = row, 1
        return ids, mask

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """[B, C] class probabilities (label order) of `texts`."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            ids, mask = self.encode(chunk)
            pad = self.batch_size - len(chunk) if len(texts) > self.batch_size else 0  # one compiled shape
            ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
            out.append(np.asarray(self._probs(self.params, ids, mask))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def check(self, texts: Sequence[str]) -> list[ModerationResult]:
        if not texts:
            return []
        probs_BC = self.probabilities(texts)
        harm_B = 1.0 - probs_BC[:, self.labels.index(SAFE)]
        return results_from_scores(probs_BC[:, self._columns], self.categories, self.threshold, harm_B)

    @classmethod
    def load(cls, directory: str, *, threshold: float | None = None) -> "ClassifierModerator":
        """The moderator `safety.train_moderator` wrote to `directory` (threshold: its saved one when None)."""
        from data.tokenizer.load import load_tokenizer
        from models import hf

        manifest = read_manifest(directory)
        model_dir = os.path.join(directory, manifest.get("model", "model"))
        model, params = hf.load_pretrained(model_dir)
        with open(os.path.join(model_dir, "config.json")) as f:
            id2label = json.load(f).get("id2label", {})
        labels = [id2label[str(i)] for i in range(len(id2label))]
        tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer.json"))
        return cls(model, params, tokenizer, labels, seq_len=int(manifest.get("seq_len", 128)),
                   threshold=float(manifest.get("threshold", 0.5) if threshold is None else threshold))


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} holds no {MANIFEST}; give a directory written by "
                                "`python -m safety.train_moderator --out=DIR` or a 'module.path:attr' spec")
    with open(path) as f:
        return json.load(f)


def _import_attr(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"moderator spec {spec!r}: cannot import {module_name!r} ({e}); fix the module path") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"moderator spec {spec!r}: {module_name} has no attribute {attr!r}; fix the name")
        obj = getattr(obj, part)
    if not hasattr(obj, "check") and callable(obj):
        try:
            obj = obj()  # a factory
        except TypeError as e:
            raise ValueError(f"moderator spec {spec!r} is not a moderator: it has no check(texts) method and "
                             f"is not a zero-argument factory ({e})") from None
    if not callable(getattr(obj, "check", None)):
        raise ValueError(f"moderator spec {spec!r} is not a moderator: it needs a check(texts) method")
    return obj


def load_moderator(spec: str, *, threshold: float | None = None) -> Moderator:
    """The moderator of `spec`.

    Args:
      spec: a directory written by `python -m safety.train_moderator`, or "module.path:attr" (an
        object with `check(texts) -> list[ModerationResult]`, or a zero-argument factory of one).
      threshold: the classifier's flagging threshold (its saved one when None).

    Raises:
      ValueError / FileNotFoundError: one line naming what is wrong with `spec`.
    """
    if os.path.isdir(spec):
        return ClassifierModerator.load(spec, threshold=threshold)
    if ":" in spec and os.path.sep not in spec.partition(":")[0]:
        if threshold is not None:
            raise ValueError("threshold applies to a trained moderation directory, not to a 'module:attr' moderator")
        return _import_attr(spec)
    raise ValueError(f"moderator spec {spec!r} is neither a directory nor 'module.path:attr'; give a directory "
                     "written by `python -m safety.train_moderator --out=DIR` or an import path")
