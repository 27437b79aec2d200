"""BLEU (Papineni et al., 2002), equal to sacrebleu 2.6.0's corpus_bleu and sentence_bleu.

BLEU is a corpus statistic: per hypothesis it counts the n-grams (n = 1..4) that also occur in
its references (clipped by the most any one reference has), and the corpus score is
`bp * exp(mean_n log p_n)` over the summed counts, where p_n = matches / hypothesis n-grams and
the brevity penalty `bp = exp(1 - ref_len / sys_len)` when the hypotheses are shorter than the
closest references. So per-item statistics are summed before anything else, and a bootstrap
only re-sums rows of `bleu_statistics` (no retokenizing):

    stats = bleu_statistics(hyps, refs)                    # [N, 2 + 2 * order] integers
    score = bleu_from_statistics(stats[sample].sum(0))     # == bleu(hyps[sample], refs[sample])

Smoothing (Chen & Cherry, 2014) only matters where an order has no match: "exp" (sacrebleu's
default, mteval's) gives the k-th such order precision 1 / (2^k * total), "floor" gives it
smooth_value / total, "add-k" adds smooth_value to the matches and totals of orders >= 2, and
"none" leaves it 0 (so BLEU is 0). With effective_order, orders the hypotheses are too short to
have at all are left out of the mean, as sentence BLEU needs.
"""

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from evals.metrics.pairs import reference_lists
from evals.metrics.text_tokenizers import get_tokenizer

# Smoothing methods and the value each uses when smooth_value is None (sacrebleu's defaults).
SMOOTH_DEFAULTS = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}
# sacrebleu's stand-in for log(0): the score becomes exp(-huge) == 0.0 rather than an error.
_LOG_ZERO = -9999999999


@dataclasses.dataclass(frozen=True)
class BLEUScore:
    """A BLEU score and the numbers it is made of (sacrebleu's BLEUScore fields).

    score and precisions are 0-100. counts/totals are the matched/hypothesis n-grams per order
    as sacrebleu reports them: under add-k smoothing they already include the added k (orders >= 2).
    """

    score: float
    counts: tuple
    totals: tuple
    precisions: tuple
    bp: float
    sys_len: int
    ref_len: int


def _check_options(tokenize: str, smooth_method: str, max_ngram_order: int) -> None:
    get_tokenizer(tokenize)  # raises for an unknown name
    if smooth_method not in SMOOTH_DEFAULTS:
        raise ValueError(f"unknown smooth_method {smooth_method!r}; use one of {', '.join(SMOOTH_DEFAULTS)}")
    if not isinstance(max_ngram_order, int) or max_ngram_order < 1:
        raise ValueError(f"max_ngram_order must be a positive integer, got {max_ngram_order!r} (BLEU uses 4)")


def _ngram_counts(tokens: list[str], max_order: int) -> Counter:
    """Counts of every n-gram (as a tuple of tokens) of orders 1..max_order."""
    counts = Counter(zip(tokens))
    for n in range(2, max_order + 1):
        counts.update(zip(*(tokens[i:] for i in range(n))))
    return counts


def _segment_statistics(hyp_tokens: list[str], refs_tokens: list[list[str]], max_order: int) -> list[int]:
    """[hyp_len, closest ref_len, matches per order..., hypothesis n-grams per order...]."""
    hyp_len = len(hyp_tokens)
    # The closest reference length; on a tie, the shorter reference.
    ref_len = min((abs(len(r) - hyp_len), len(r)) for r in refs_tokens)[1]
    ref_counts = _ngram_counts(refs_tokens[0], max_order)
    for other in refs_tokens[1:]:
        ref_counts |= _ngram_counts(other, max_order)  # clip by the most any one reference has
    correct = [0] * max_order
    for ngram, count in _ngram_counts(hyp_tokens, max_order).items():
        in_ref = ref_counts.get(ngram)
        if in_ref:
            correct[len(ngram) - 1] += min(count, in_ref)
    totals = [max(hyp_len - n, 0) for n in range(max_order)]
    return [hyp_len, ref_len, *correct, *totals]


def bleu_statistics(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str] | str],
    *,
    tokenize: str = "13a",
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    lowercase: bool = False,
    effective_order: bool = False,
    max_ngram_order: int = 4,
) -> np.ndarray:
    """Per-hypothesis BLEU statistics; their column sums give the corpus BLEU.

    Args:
      hypotheses: N system outputs.
      references: references[i] is the list of references of hypotheses[i] (a str is one).
      tokenize: "13a" (default), "intl", "zh", "char" or "none".
      smooth_method, smooth_value, effective_order: accepted (and checked) so that one set of
        options serves bleu_statistics and bleu_from_statistics; statistics do not depend on them.
      lowercase: lowercase hypotheses and references first.
      max_ngram_order: the largest n-gram order.

    Returns:
      int64 array [N, 2 + 2 * max_ngram_order]: hypothesis length, closest reference length,
      clipped matches per order, hypothesis n-grams per order.
    """
    _check_options(tokenize, smooth_method, max_ngram_order)
    ref_lists = reference_lists(hypotheses, references, "bleu")
    tokenizer = get_tokenizer(tokenize)

    def prepare(text: str) -> list[str]:
        return tokenizer((text.lower() if lowercase else text).rstrip())

    rows = [
        _segment_statistics(prepare(h), [prepare(r) for r in refs], max_ngram_order)
        for h, refs in zip(hypotheses, ref_lists)
    ]
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 2 + 2 * max_ngram_order)


def bleu_from_statistics(
    stats: np.ndarray | Sequence[int],
    *,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    effective_order: bool = False,
    max_ngram_order: int | None = None,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> BLEUScore:
    """BLEU from statistics: a summed row of bleu_statistics (or all its rows, summed here).

    Args:
      stats: [2 + 2 * order] column sums of bleu_statistics, or its [N, 2 + 2 * order] rows.
      smooth_method: "exp" (default), "floor", "add-k" or "none".
      smooth_value: the value of floor / add-k (None: 0.1 / 1).
      effective_order: average only over the orders the hypotheses have n-grams of.
      max_ngram_order: checked against the statistics' width when given.
      tokenize, lowercase: accepted so bleu_statistics' options can be passed unchanged.

    Returns:
      The BLEUScore, computed in the same floating-point steps as sacrebleu.
    """
    stats = np.asarray(stats)
    if stats.ndim == 2:
        stats = stats.sum(axis=0)
    order = (stats.shape[-1] - 2) // 2 if stats.ndim == 1 else 0
    if stats.ndim != 1 or order < 1 or stats.shape[0] != 2 + 2 * order:
        raise ValueError(f"bleu statistics have shape {stats.shape}; pass bleu_statistics' [N, 2 + 2 * order] "
                         "rows or their column sums")
    if max_ngram_order is not None and max_ngram_order != order:
        raise ValueError(f"bleu statistics hold {order} n-gram orders but max_ngram_order={max_ngram_order}; "
                         "pass the max_ngram_order the statistics were computed with")
    _check_options(tokenize, smooth_method, order)
    del lowercase  # it acted on the text, before the statistics
    if smooth_value is None:
        smooth_value = SMOOTH_DEFAULTS[smooth_method]
    sys_len, ref_len = int(stats[0]), int(stats[1])
    correct = [int(c) for c in stats[2:2 + order]]
    total = [int(t) for t in stats[2 + order:]]

    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * order
    if not any(correct):
        return BLEUScore(0.0, tuple(correct), tuple(total), tuple(precisions), bp, sys_len, ref_len)

    exp_halvings = 1.0
    mean_over = order
    for n in range(order):
        if smooth_method == "add-k" and n > 0:
            correct[n] += smooth_value
            total[n] += smooth_value
        if total[n] == 0:
            break  # the hypotheses have no n-grams this long (nor longer)
        if effective_order:
            mean_over = n + 1
        if correct[n] == 0:
            if smooth_method == "exp":
                exp_halvings *= 2
                precisions[n] = 100.0 / (exp_halvings * total[n])
            elif smooth_method == "floor":
                precisions[n] = 100.0 * smooth_value / total[n]
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    log_sum = sum([math.log(p) if p != 0.0 else _LOG_ZERO for p in precisions[:mean_over]])
    score = bp * math.exp(log_sum / mean_over)
    return BLEUScore(score, tuple(correct), tuple(total), tuple(precisions), bp, sys_len, ref_len)


def bleu(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str] | str],
    *,
    tokenize: str = "13a",
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    lowercase: bool = False,
    effective_order: bool = False,
    max_ngram_order: int = 4,
) -> BLEUScore:
    """Corpus BLEU (0-100), equal to sacrebleu.corpus_bleu.

    Args:
      hypotheses: N system outputs.
      references: references[i] is the list of references of hypotheses[i] (a str is one;
        None entries are dropped, so the number of references may vary).
      tokenize: "13a" (default), "intl", "zh", "char" or "none".
      smooth_method: "exp" (default), "floor", "add-k" or "none".
      smooth_value: the value of floor / add-k (None: 0.1 / 1).
      lowercase: case-insensitive BLEU.
      effective_order: average only over the n-gram orders the hypotheses have.
      max_ngram_order: the largest n-gram order.

    Returns:
      BLEUScore(score, counts, totals, precisions, bp, sys_len, ref_len).
    """
    options = {"tokenize": tokenize, "smooth_method": smooth_method, "smooth_value": smooth_value,
               "lowercase": lowercase, "effective_order": effective_order, "max_ngram_order": max_ngram_order}
    return bleu_from_statistics(bleu_statistics(hypotheses, references, **options).sum(axis=0), **options)


def sentence_bleu(
    hypothesis: str,
    references: Sequence[str] | str,
    *,
    tokenize: str = "13a",
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    lowercase: bool = False,
    effective_order: bool = True,
    max_ngram_order: int = 4,
) -> BLEUScore:
    """BLEU of one hypothesis against its references, equal to sacrebleu.sentence_bleu.

    Args:
      hypothesis: one system output.
      references: its references (a str is one).
      tokenize, smooth_method, smooth_value, lowercase, max_ngram_order: as in `bleu`.
      effective_order: True by default, as in sacrebleu (a short sentence is not scored 0 for
        lacking 4-grams).

    Returns:
      BLEUScore.
    """
    if not isinstance(hypothesis, str):
        raise ValueError(f"sentence_bleu: hypothesis is a {type(hypothesis).__name__}, not a str; "
                         "use bleu(hypotheses, references) for a corpus")
    return bleu([hypothesis], [references], tokenize=tokenize, smooth_method=smooth_method,
                smooth_value=smooth_value, lowercase=lowercase, effective_order=effective_order,
                max_ngram_order=max_ngram_order)
