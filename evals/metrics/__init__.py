"""Metrics written by hand, each equal to its reference package on the same inputs.

Importing `evals.metrics` is cheap: each name loads its module on first use, so BLEU does
not import jax and BERTScore does not load before it is asked for.
"""

import importlib

# name -> the module (under evals.metrics) that defines it
_WHERE = {
    "bleu": "bleu", "sentence_bleu": "bleu",
    "chrf": "chrf", "sentence_chrf": "chrf",
    "rouge": "rouge",
    "rouge_items": "rouge",
    "bertscore": "bertscore",
    "squad": "squad",
    "exact_match": "squad", "normalize_answer": "squad",
    "accuracy": "classification", "f1_score": "classification", "matthews_corrcoef": "classification",
    "sliding_window_perplexity": "perplexity",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'evals.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"evals.metrics.{_WHERE[name]}"), name)
