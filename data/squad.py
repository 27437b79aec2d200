"""Extractive question answering (SQuAD): windows of tokens with character offsets and the answer-span
post-processing. The official v1.1 exact match and F1 of the answers are `evals.metrics.squad`.

Axis letters: N features (windows), T sequence length, K n-best candidates.

A feature is one window of an example: `[CLS] question [SEP] context-window [SEP]`, padded to T.
Contexts longer than the room left by the question are cut into windows that overlap by
`doc_stride` tokens (Hugging Face's `stride`); only the context is ever truncated. A window
that holds the whole answer points at its first and last token; one that does not (or an
unanswerable example) points at [CLS] (position 0), as in BERT's SQuAD recipe.

Post-processing (Hugging Face's `postprocess_qa_predictions`, without the null answer of
SQuAD 2.0): for every window, the `n_best` highest start and end logits; every pair inside the
context with start <= end and at most `max_answer_length` tokens is a candidate scored by the
sum of its logits; an example's answer is its best candidate over all its windows, mapped back
through the offsets to the text of the context.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One question about one context; `answers` are (text, answer_start) pairs (empty: none)."""

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    where: str = ""  # file:line (or tfds example) for error messages


@dataclasses.dataclass
class QAFeatures:
    """Windows of a list of examples, as arrays with a leading N axis.

    Attributes:
      input_ids, token_type_ids, attention_mask: [N, T] int32.
      start_positions, end_positions: [N] int32, the answer's first / last token (0: [CLS]).
      example_index: [N] int32, the example each window comes from.
      offsets: [N, T, 2] int32, each context token's [start, end) characters in its example's
        context; (-1, -1) for [CLS], the question, separators and padding.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray
    example_index: np.ndarray
    offsets: np.ndarray

    def batch_arrays(self) -> dict[str, np.ndarray]:
        """The model-facing keys (TEAM11 interface 1, qa)."""
        return {k: getattr(self, k) for k in ("input_ids", "token_type_ids", "attention_mask", "start_positions",
                                              "end_positions")}


def check_answers(example: QAExample, answers_key: str = "answers") -> None:
    """Raises a one-line ValueError when an answer's text is not at its answer_start in the context."""
    for text, start in example.answers:
        if not 0 <= start <= len(example.context) - len(text) or example.context[start:start + len(text)] != text:
            found = example.context.find(text)
            hint = f"it occurs at {found}" if found >= 0 else "it does not occur in the context"
            raise ValueError(f"{example.where}: {answers_key} text {text!r} is not at answer_start={start} of the "
                             f"context ({hint}); fix answer_start")


def featurize(examples: Sequence[QAExample], tokenizer, seq_len: int, doc_stride: int,
              max_query_len: int) -> QAFeatures:
    """Windows of every example (see the module docstring).

    Args:
      examples: the examples, answers already checked (`check_answers`).
      tokenizer: a `data.tokenizer` tokenizer with `encode_with_offsets`, `cls_id`, `sep_id`,
        `pad_id` (a Hugging Face tokenizer.json or a BERT vocab.txt).
      seq_len: T.
      doc_stride: tokens shared by consecutive windows of one context.
      max_query_len: questions are cut to this many tokens.

    Returns:
      QAFeatures of every window, in example order.
    """
    room = seq_len - 3 - max_query_len
    if room <= doc_stride:
        raise ValueError(f"seq_len={seq_len} leaves {room} context tokens per window after max_query_len="
                         f"{max_query_len}; it must exceed doc_stride={doc_stride}: raise seq_len or lower "
                         "doc_stride / max_query_len")
    cls, sep, pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id or 0
    rows = collections.defaultdict(list)
    for index, example in enumerate(examples):
        question = tokenizer.encode(example.question.lstrip())[:max_query_len]
        ctx_ids, ctx_offsets = tokenizer.encode_with_offsets(example.context)
        span = room + max_query_len - len(question)  # context tokens per window
        answer = _answer_tokens(example, ctx_offsets)
        first = 0
        while True:
            last = min(first + span, len(ctx_ids))
            ids = [cls, *question, sep, *ctx_ids[first:last], sep]
            offset = len(question) + 2 - first  # context token i sits at position i + offset
            offsets = np.full((seq_len, 2), -1, np.int32)
            if last > first:
                offsets[first + offset:last + offset] = ctx_offsets[first:last]
            start = end = 0
            if answer is not None and first <= answer[0] and answer[1] < last:
                start, end = answer[0] + offset, answer[1] + offset
            pad_len = seq_len - len(ids)
            rows["input_ids"].append(ids + [pad] * pad_len)
            rows["token_type_ids"].append([0] * (len(question) + 2) + [1] * (len(ids) - len(question) - 2)
                                          + [0] * pad_len)
            rows["attention_mask"].append([1] * len(ids) + [0] * pad_len)
            rows["start_positions"].append(start)
            rows["end_positions"].append(end)
            rows["example_index"].append(index)
            rows["offsets"].append(offsets)
            if last == len(ctx_ids):
                break
            first += span - doc_stride
    arrays = {k: np.asarray(v, np.int32) for k, v in rows.items()}
    if not arrays:
        return QAFeatures(*(np.zeros((0, seq_len), np.int32) for _ in range(3)), *(np.zeros((0,), np.int32)
                                                                                  for _ in range(3)),
                          np.zeros((0, seq_len, 2), np.int32))
    return QAFeatures(**arrays)


def _answer_tokens(example: QAExample, ctx_offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The first and last context token of the first answer (None: no answer, or only blanks)."""
    if not example.answers:
        return None
    text, a_start = example.answers[0]
    inside = [i for i, (s, e) in enumerate(ctx_offsets) if e > a_start and s < a_start + len(text)]
    return (inside[0], inside[-1]) if inside else None


def top_k(logits_NT: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [N, K], values [N, K]) of the k largest logits per row, best first."""
    order = np.argsort(-logits_NT, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(logits_NT, order, axis=-1)


def postprocess(examples: Sequence[QAExample], features: QAFeatures, start_idx_NK: np.ndarray,
                start_val_NK: np.ndarray, end_idx_NK: np.ndarray, end_val_NK: np.ndarray,
                max_answer_length: int = 30) -> list[str]:
    """Each example's predicted answer text (see the module docstring).

    Args:
      examples, features: what `featurize` was given and returned.
      start_idx_NK, start_val_NK, end_idx_NK, end_val_NK: the n-best start / end positions and
        their logits per feature (`top_k` of the model's start and end logits).
      max_answer_length: longest answer, in tokens.

    Returns:
      One string per example ("" when no window offers a valid span).
    """
    best = [(-np.inf, "")] * len(examples)
    for n in range(len(features.example_index)):
        ex = int(features.example_index[n])
        offsets = features.offsets[n]
        for s, s_val in zip(start_idx_NK[n], start_val_NK[n]):
            if offsets[s, 0] < 0:
                continue
            for e, e_val in zip(end_idx_NK[n], end_val_NK[n]):
                if offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_val) + float(e_val)
                if score > best[ex][0]:
                    best[ex] = (score, examples[ex].context[offsets[s, 0]:offsets[e, 1]])
    return [text for _, text in best]
