"""SQuAD v1.1 exact match and F1, as the official `evaluate-v1.1.py` computes them.

An answer is normalized by lower-casing it, deleting ASCII punctuation (`string.punctuation`;
other Unicode punctuation stays), replacing the words a / an / the by spaces and collapsing
whitespace. Exact match: the normalized strings are equal. F1: the harmonic mean of the token
precision and recall of the normalized strings' whitespace tokens, counted with multiplicity
(0 when nothing is shared). A prediction scores the maximum over its gold answers.

This is lmlab's one implementation: the qa objective (`train.objectives.qa`) scores with it.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-cased, ASCII punctuation and the articles a/an/the removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_DELETE_PUNCTUATION)).split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("no gold answers to score against; pass at least one (a str or a list of str)")
    return golds


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    common = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalized prediction equals some normalized gold answer, else 0.0.

    Args:
      prediction: the predicted answer.
      golds: one gold answer or a non-empty list of them.

    Returns:
      1.0 or 0.0.
    """
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in _golds(golds)))


def f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Token-overlap F1 of the normalized strings, the best over the gold answers.

    Args:
      prediction: the predicted answer.
      golds: one gold answer or a non-empty list of them.

    Returns:
      The F1 in [0, 1].
    """
    tokens = normalize_answer(prediction).split()
    return max(_token_f1(tokens, normalize_answer(gold).split()) for gold in _golds(golds))


def squad(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus exact match and F1 in percent, as the official script prints them.

    Items whose reference list is empty (unanswerable questions, which SQuAD v1.1 does not
    have) are left out of both the sums and the count; with none left both scores are 0.

    Args:
      predictions: one predicted answer per question.
      references: references[i], a str or a list of str, are the gold answers of question i.

    Returns:
      {"exact_match": 0-100, "f1": 0-100}.
    """
    if isinstance(predictions, str):
        raise ValueError("predictions is one str; pass a list of predicted answers (one per question)")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; give one gold "
                         "answer (or list of gold answers) per prediction")
    em = f = count = 0.0
    for prediction, golds in zip(predictions, references):
        golds = [golds] if isinstance(golds, str) else golds
        if len(golds) == 0:
            continue
        em += exact_match(prediction, golds)
        f += f1(prediction, golds)
        count += 1
    count = max(count, 1.0)
    return {"exact_match": 100.0 * em / count, "f1": 100.0 * f / count}
