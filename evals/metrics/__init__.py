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
# BLEU's and chrF's per-item statistics and their aggregation (a bootstrap re-sums rows).
_WHERE.update({
    "bleu_statistics": "bleu", "bleu_from_statistics": "bleu",
    "chrf_statistics": "chrf", "chrf_from_statistics": "chrf",
})

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'evals.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"evals.metrics.{_WHERE[name]}"), name)
