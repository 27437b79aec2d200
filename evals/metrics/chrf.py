"""chrF (Popović, 2015) and chrF++ (Popović, 2017), equal to sacrebleu 2.6.0's CHRF.

chrF is an F-beta score (beta=2: recall weighs 4x precision) on character n-grams, n = 1..6,
with whitespace removed; chrF++ (word_order=2) adds word unigrams and bigrams, after splitting
one punctuation mark off each word's end (or else its start). Per hypothesis, the statistics of
the reference with the best sentence-level F are kept; the corpus score is the F of the summed
statistics: per order n, [hypothesis n-grams, reference n-grams, matches].

    stats = chrf_statistics(hyps, refs)                   # [N, 3 * (char_order + word_order)]
    score = chrf_from_statistics(stats[sample].sum(0))    # == chrf(hyps[sample], refs[sample])

Averaging (sacrebleu's default, eps_smoothing=False): precision and recall are averaged over
the orders both sides have n-grams of, then combined into one F. With eps_smoothing=True (the
original chrF++.py, Moses and NLTK) the F of each order is averaged, 1e-16 standing in for 0/0.
"""

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np

from evals.metrics.pairs import reference_lists

# string.punctuation: what chrF++ splits off a word's end or start.
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_EPS = 1e-16


@dataclasses.dataclass(frozen=True)
class ChrFScore:
    """A chrF score (0-100) and its settings (sacrebleu's CHRFScore fields)."""

    score: float
    char_order: int
    word_order: int
    beta: float


def _check_options(char_order: int, word_order: int, beta: float) -> None:
    for name, value in (("char_order", char_order), ("word_order", word_order)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r} (chrF: 6 and 0; chrF++: 6 and 2)")
    if char_order + word_order == 0:
        raise ValueError("char_order + word_order is 0: no n-grams to score; use char_order=6 (chrF)")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r} (chrF uses 2)")


def _split_punctuation(text: str) -> list[str]:
    """chrF++'s words: one punctuation mark split off the end of a word, or else off its start."""
    words = []
    for word in text.split():
        if len(word) > 1 and word[-1] in _PUNCTUATION:
            words += (word[:-1], word[-1])
        elif len(word) > 1 and word[0] in _PUNCTUATION:
            words += (word[0], word[1:])
        else:
            words.append(word)
    return words


def _ngram_counters(text: str, char_order: int, word_order: int, whitespace: bool) -> list[Counter]:
    """One Counter per order: character n-grams 1..char_order, then word n-grams 1..word_order."""
    chars = text if whitespace else "".join(text.split())
    counters = [Counter(chars)] if char_order else []
    for n in range(2, char_order + 1):
        counters.append(Counter([chars[i:i + n] for i in range(len(chars) - n + 1)]))
    if word_order:
        words = _split_punctuation(text)
        for n in range(1, word_order + 1):
            counters.append(Counter(zip(*(words[i:] for i in range(n)))))
    return counters


def _f_score(stats: Sequence[int], beta: float, eps_smoothing: bool) -> float:
    """chrF (0-100) from [hyp, ref, match] per order, in sacrebleu's floating-point steps."""
    factor = beta ** 2
    num_orders = len(stats) // 3
    eps_score, avg_prec, avg_rec, effective_order = 0.0, 0.0, 0.0, 0
    for i in range(num_orders):
        n_hyp, n_ref, n_match = stats[3 * i], stats[3 * i + 1], stats[3 * i + 2]
        prec = n_match / n_hyp if n_hyp > 0 else _EPS
        rec = n_match / n_ref if n_ref > 0 else _EPS
        if eps_smoothing:
            denom = factor * prec + rec
            eps_score += ((1 + factor) * prec * rec / denom) if denom > 0 else _EPS
        elif n_hyp > 0 and n_ref > 0:
            avg_prec += prec
            avg_rec += rec
            effective_order += 1
    if eps_smoothing:
        return 100 * eps_score / num_orders
    if effective_order == 0:
        return 0.0
    avg_prec /= effective_order
    avg_rec /= effective_order
    if not avg_prec + avg_rec:
        return 0.0
    score = (1 + factor) * avg_prec * avg_rec
    score /= (factor * avg_prec) + avg_rec
    return 100 * score


def _match_statistics(hyp: list[Counter], ref: list[Counter]) -> list[int]:
    """[hyp, ref, match] per order; hypothesis n-grams count only where the reference has some."""
    stats = []
    for h, r in zip(hyp, ref):
        small, large = (h, r) if len(h) <= len(r) else (r, h)
        matches = 0
        for ngram, count in small.items():
            other = large.get(ngram)
            if other:
                matches += min(count, other)
        stats += (h.total() if r else 0, r.total(), matches)
    return stats


def chrf_statistics(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str] | str],
    *,
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2,
    lowercase: bool = False,
    whitespace: bool = False,
    eps_smoothing: bool = False,
) -> np.ndarray:
    """Per-hypothesis chrF statistics (of its best reference); their column sums give corpus chrF.

    Args:
      hypotheses: N system outputs.
      references: references[i] is the list of references of hypotheses[i] (a str is one).
      char_order: character n-gram orders 1..char_order (6).
      word_order: word n-gram orders 1..word_order (0 for chrF, 2 for chrF++).
      beta, eps_smoothing: pick the best reference by this F (and are checked).
      lowercase: case-insensitive.
      whitespace: keep whitespace in the character n-grams.

    Returns:
      int64 array [N, 3 * (char_order + word_order)]: per order, hypothesis n-grams,
      reference n-grams, matches.
    """
    _check_options(char_order, word_order, beta)
    ref_lists = reference_lists(hypotheses, references, "chrf")

    def counters(text: str) -> list[Counter]:
        return _ngram_counters(text.lower() if lowercase else text, char_order, word_order, whitespace)

    rows = []
    for hypothesis, refs in zip(hypotheses, ref_lists):
        hyp = counters(hypothesis)
        best_stats, best_f = None, -1.0
        for ref in refs:
            stats = _match_statistics(hyp, counters(ref))
            f = _f_score(stats, beta, eps_smoothing)
            if f > best_f:  # the first of equally good references
                best_stats, best_f = stats, f
        rows.append(best_stats)
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 3 * (char_order + word_order))


def chrf_from_statistics(
    stats: np.ndarray | Sequence[int],
    *,
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2,
    lowercase: bool = False,
    whitespace: bool = False,
    eps_smoothing: bool = False,
) -> ChrFScore:
    """chrF from statistics: a summed row of chrf_statistics (or all its rows, summed here).

    Args:
      stats: [3 * (char_order + word_order)] column sums of chrf_statistics, or its rows.
      char_order, word_order: the orders the statistics were computed with (checked).
      beta: recall's weight (2).
      eps_smoothing: average per-order F with 1e-16 for 0/0 instead of sacrebleu's default.
      lowercase, whitespace: accepted so chrf_statistics' options can be passed unchanged.

    Returns:
      ChrFScore.
    """
    _check_options(char_order, word_order, beta)
    del lowercase, whitespace  # they acted on the text, before the statistics
    stats = np.asarray(stats)
    if stats.ndim == 2:
        stats = stats.sum(axis=0)
    width = 3 * (char_order + word_order)
    if stats.shape != (width,):
        raise ValueError(f"chrf statistics have shape {stats.shape}, not ({width},) for char_order={char_order}, "
                         f"word_order={word_order}; pass chrf_statistics' rows or column sums with the same orders")
    score = _f_score([int(s) for s in stats], beta, eps_smoothing)
    return ChrFScore(score, char_order, word_order, beta)


def chrf(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str] | str],
    *,
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2,
    lowercase: bool = False,
    whitespace: bool = False,
    eps_smoothing: bool = False,
) -> ChrFScore:
    """Corpus chrF (chrF++ with word_order=2), 0-100, equal to sacrebleu's CHRF.corpus_score.

    Args:
      hypotheses: N system outputs.
      references: references[i] is the list of references of hypotheses[i] (a str is one;
        None entries are dropped, so the number of references may vary).
      char_order: character n-gram orders (6).
      word_order: word n-gram orders (0: chrF; 2: chrF++).
      beta: recall's weight relative to precision (2).
      lowercase: case-insensitive.
      whitespace: keep whitespace in the character n-grams.
      eps_smoothing: chrF++.py/Moses/NLTK averaging instead of sacrebleu's default.

    Returns:
      ChrFScore(score, char_order, word_order, beta).
    """
    options = {"char_order": char_order, "word_order": word_order, "beta": beta, "lowercase": lowercase,
               "whitespace": whitespace, "eps_smoothing": eps_smoothing}
    return chrf_from_statistics(chrf_statistics(hypotheses, references, **options).sum(axis=0), **options)


def sentence_chrf(
    hypothesis: str,
    references: Sequence[str] | str,
    *,
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2,
    lowercase: bool = False,
    whitespace: bool = False,
    eps_smoothing: bool = False,
) -> ChrFScore:
    """chrF of one hypothesis against its references, equal to sacrebleu's sentence_chrf.

    Args:
      hypothesis: one system output.
      references: its references (a str is one).
      char_order, word_order, beta, lowercase, whitespace, eps_smoothing: as in `chrf`.

    Returns:
      ChrFScore.
    """
    if not isinstance(hypothesis, str):
        raise ValueError(f"sentence_chrf: hypothesis is a {type(hypothesis).__name__}, not a str; "
                         "use chrf(hypotheses, references) for a corpus")
    return chrf([hypothesis], [references], char_order=char_order, word_order=word_order, beta=beta,
                lowercase=lowercase, whitespace=whitespace, eps_smoothing=eps_smoothing)
