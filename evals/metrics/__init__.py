"""Metrics written by hand, each equal to its reference package on the same inputs.

`evals.metrics.bleu(...)`, `evals.metrics.rouge(...)` and the others are the functions. A
module that shares its function's name (bleu, chrf, rouge, bertscore, squad) is reached as
`importlib.import_module("evals.metrics.bleu")` (or `from evals.metrics.bleu import ...`):
the package imports every metric here, so its attributes are always the functions, whatever
was imported first.
"""

from evals.metrics.bertscore import bertscore
from evals.metrics.bleu import bleu, bleu_from_statistics, bleu_statistics, sentence_bleu
from evals.metrics.chrf import chrf, chrf_from_statistics, chrf_statistics, sentence_chrf
from evals.metrics.classification import accuracy, f1_score, matthews_corrcoef
from evals.metrics.perplexity import sliding_window_perplexity
from evals.metrics.rouge import rouge, rouge_items
from evals.metrics.squad import exact_match, normalize_answer, squad

__all__ = [
    "accuracy", "bertscore", "bleu", "bleu_from_statistics", "bleu_statistics", "chrf", "chrf_from_statistics",
    "chrf_statistics", "exact_match", "f1_score", "matthews_corrcoef", "normalize_answer", "rouge", "rouge_items",
    "sentence_bleu", "sentence_chrf", "sliding_window_perplexity", "squad",
]
