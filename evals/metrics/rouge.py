"""ROUGE-N, ROUGE-L and summary-level ROUGE-Lsum, equal to Google's `rouge-score` 0.1.2.

Tokens (rouge-score's default tokenizer): the text lower-cased (Python's Unicode `str.lower`),
then every maximal run of the characters a-z and 0-9; everything else separates tokens, so
accented letters, CJK and punctuation never appear in a token. With `use_stemmer` a token longer
than three characters is replaced by its Porter stem (`evals.metrics.porter`, NLTK's variant).

Per reference, with hypothesis tokens H and reference tokens R:
  - rougeN: clipped n-gram matches over the n-grams of H (precision) and of R (recall); empty
    n-gram sets count as one in the denominator.
  - rougeL: the longest common subsequence of R and H over len(H) and len(R); 0 if either is empty.
  - rougeLsum: both texts split into sentences at newlines (empty lines dropped); for every
    reference sentence, the union of its LCS token positions with each hypothesis sentence
    (the LCS that rouge-score's table backtracking picks); the tokens of those unions are hits,
    each token counted at most as often as it occurs in both texts; hits / total tokens.
F = 2PR / (P + R) (0 when P + R = 0). Several references: for each type separately, the scores
of the reference with the highest F (the first on ties), as rouge-score's `score_multi`.
The corpus score is the mean of the per-item precision, recall and F.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import NamedTuple

from evals.metrics import porter

DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_TOKEN = re.compile(r"[a-z0-9]+")
_TYPE = re.compile(r"rouge([1-9]|L|Lsum)")


class Score(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


def _fscore(hits: int, hyp_total: int, ref_total: int) -> Score:
    precision, recall = hits / hyp_total, hits / ref_total
    fmeasure = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return Score(precision, recall, fmeasure)


_ZERO = Score(0.0, 0.0, 0.0)


def tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's default tokens of `text` (see the module docstring)."""
    tokens = _TOKEN.findall(text.lower())
    if use_stemmer:
        tokens = [porter.stem(t) if len(t) > 3 else t for t in tokens]
    return tokens


# --- Longest common subsequences, bit-parallel (Allison-Dix / Hyyrö): one big-int update per
# hypothesis token instead of a row of the dynamic-programming table. After the first j tokens
# of `can`, bit i of the row vector is 0 exactly where LCS(ref[:i+1], can[:j]) exceeds
# LCS(ref[:i], can[:j]), so the table entry T[i][j] is i minus the ones among the low i bits.

def _lcs_rows(ref: Sequence[str], can: Sequence[str]) -> list[int]:
    """The row vectors after 0, 1, ..., len(can) tokens of `can`."""
    where = {}
    for i, token in enumerate(ref):
        where[token] = where.get(token, 0) | (1 << i)
    full = (1 << len(ref)) - 1
    row, rows = full, [full]
    for token in can:
        matched = row & where.get(token, 0)
        row = ((row + matched) | (row - matched)) & full
        rows.append(row)
    return rows


def lcs_length(ref: Sequence[str], can: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    return len(ref) - _lcs_rows(ref, can)[-1].bit_count()


def lcs_positions(ref: Sequence[str], can: Sequence[str]) -> list[int]:
    """Positions in `ref` of one longest common subsequence: the one rouge-score reads out of
    its table (from the end: take a match, else step along `can` when that keeps a longer LCS
    than stepping along `ref`, else step along `ref`)."""
    rows = _lcs_rows(ref, can)

    def table(i: int, j: int) -> int:
        return i - (rows[j] & ((1 << i) - 1)).bit_count()

    i, j, positions = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            positions.append(i - 1)
            i, j = i - 1, j - 1
        elif table(i, j - 1) > table(i - 1, j):
            j -= 1
        else:
            i -= 1
    return positions[::-1]


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _rouge_n(ref: Sequence[str], hyp: Sequence[str], n: int) -> Score:
    ref_grams, hyp_grams = _ngrams(ref, n), _ngrams(hyp, n)
    hits = sum((ref_grams & hyp_grams).values())
    return _fscore(hits, max(sum(hyp_grams.values()), 1), max(sum(ref_grams.values()), 1))


def _rouge_l(ref: Sequence[str], hyp: Sequence[str]) -> Score:
    if not ref or not hyp:
        return _ZERO
    return _fscore(lcs_length(ref, hyp), len(hyp), len(ref))


def _rouge_lsum(ref_sents: Sequence[list[str]], hyp_sents: Sequence[list[str]]) -> Score:
    ref_total, hyp_total = sum(map(len, ref_sents)), sum(map(len, hyp_sents))
    if not ref_total or not hyp_total:
        return _ZERO
    ref_left = collections.Counter(t for s in ref_sents for t in s)
    hyp_left = collections.Counter(t for s in hyp_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union = set()
        for hyp in hyp_sents:
            union.update(lcs_positions(ref, hyp))
        for token in (ref[i] for i in sorted(union)):
            # A token is a hit at most as often as it occurs in either whole text.
            if ref_left[token] > 0 and hyp_left[token] > 0:
                hits += 1
                ref_left[token] -= 1
                hyp_left[token] -= 1
    return _fscore(hits, hyp_total, ref_total)


class _Text:
    """A text's tokens and its newline-separated sentences' tokens, made on first use."""

    def __init__(self, text: str, use_stemmer: bool):
        self.text, self.use_stemmer = text, use_stemmer
        self._tokens = self._sentences = None

    @property
    def tokens(self) -> list[str]:
        if self._tokens is None:
            self._tokens = tokenize(self.text, self.use_stemmer)
        return self._tokens

    @property
    def sentences(self) -> list[list[str]]:
        if self._sentences is None:
            self._sentences = [tokenize(line, self.use_stemmer) for line in self.text.split("\n") if line]
        return self._sentences


def _score(ref: _Text, hyp: _Text, rouge_type: str) -> Score:
    if rouge_type == "rougeL":
        return _rouge_l(ref.tokens, hyp.tokens)
    if rouge_type == "rougeLsum":
        return _rouge_lsum(ref.sentences, hyp.sentences)
    return _rouge_n(ref.tokens, hyp.tokens, int(rouge_type[5:]))


def _check(hypotheses, references, rouge_types) -> tuple[list[list[str]], tuple[str, ...]]:
    """Validated references (a list per hypothesis) and rouge types; one-line ValueErrors."""
    if isinstance(rouge_types, str):
        rouge_types = (rouge_types,)
    rouge_types = tuple(rouge_types)
    for rouge_type in rouge_types:
        if not isinstance(rouge_type, str) or not _TYPE.fullmatch(rouge_type):
            raise ValueError(f"unknown rouge type {rouge_type!r}; use rouge1 ... rouge9, rougeL or rougeLsum")
    if not rouge_types:
        raise ValueError("rouge_types is empty; name at least one of rouge1 ... rouge9, rougeL, rougeLsum")
    if isinstance(hypotheses, str):
        raise ValueError("hypotheses is one str; pass a list of hypothesis strings (one per item)")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; give one reference "
                         "(or list of references) per hypothesis")
    lists = []
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not isinstance(hyp, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"item {i}: hypothesis {hyp!r} with references {refs!r}; each hypothesis must be a "
                             "str and each item's references a str or a non-empty list of str")
        lists.append(refs)
    return lists, rouge_types


def rouge_items(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], *,
                rouge_types: Sequence[str] = DEFAULT_TYPES, use_stemmer: bool = False) -> list[dict[str, Score]]:
    """Per-item ROUGE scores (see the module docstring).

    Args:
      hypotheses: the system outputs.
      references: references[i], a str or a list of str, are the references of hypotheses[i].
      rouge_types: any of "rouge1" ... "rouge9", "rougeL", "rougeLsum".
      use_stemmer: Porter-stem tokens longer than three characters.

    Returns:
      For each item, {rouge_type: Score(precision, recall, fmeasure)}, all in [0, 1].
    """
    reference_lists, rouge_types = _check(hypotheses, references, rouge_types)
    items = []
    for hypothesis, refs in zip(hypotheses, reference_lists):
        hyp = _Text(hypothesis, use_stemmer)
        best: dict[str, Score] = {}
        for reference in refs:
            ref = _Text(reference, use_stemmer)
            for rouge_type in rouge_types:
                score = _score(ref, hyp, rouge_type)
                if rouge_type not in best or score.fmeasure > best[rouge_type].fmeasure:
                    best[rouge_type] = score
        items.append(best)
    return items


def rouge(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], *,
          rouge_types: Sequence[str] = DEFAULT_TYPES, use_stemmer: bool = False) -> dict[str, Score]:
    """Corpus ROUGE: the mean over items of `rouge_items`' precision, recall and F.

    Args:
      hypotheses, references, rouge_types, use_stemmer: as `rouge_items`.

    Returns:
      {rouge_type: Score(precision, recall, fmeasure)}, each the mean over items, in [0, 1].
    """
    items = rouge_items(hypotheses, references, rouge_types=rouge_types, use_stemmer=use_stemmer)
    if not items:
        raise ValueError("rouge of no hypotheses: the corpus mean is undefined; pass at least one item")
    return {rouge_type: Score(*(sum(item[rouge_type][k] for item in items) / len(items) for k in range(3)))
            for rouge_type in items[0]}
