"""Chance-corrected agreement between annotators: Cohen's kappa (two) and Fleiss' kappa (several).

Cohen's kappa of two annotators who each put the same n items into categories k: with the
observed agreement p_o (the share of items given the same category) and the agreement expected
by chance if each annotator chose independently at their own rates p1(k), p2(k),

    p_e = sum_k p1(k) p2(k),        kappa = (p_o - p_e) / (1 - p_e).

kappa is 1 for identical labels, about 0 for independent ones, negative for systematic
disagreement; it is undefined (NaN) when p_e = 1, i.e. both annotators put every item into
the same single category (sklearn's `cohen_kappa_score` says NaN there too).

Fleiss' kappa of m >= 2 annotators on N items each judged by all of them: with n_ik the
number of annotators who put item i into category k,

    P_i = (sum_k n_ik^2 - m) / (m (m - 1))        the pairs of annotators who agree on item i
    P = mean_i P_i,   p_k = sum_i n_ik / (N m),   P_e = sum_k p_k^2,   kappa = (P - P_e) / (1 - P_e)

(chance from the pooled category rates, so for m = 2 it is Scott's pi, not Cohen's kappa).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Agreement:
    """kappa (NaN: undefined), observed and expected agreement, items counted, categories seen."""

    kappa: float
    observed: float
    expected: float
    items: int
    categories: tuple

    def as_dict(self) -> dict:
        kappa = None if np.isnan(self.kappa) else self.kappa
        return {"kappa": kappa, "observed": self.observed, "expected": self.expected, "items": self.items,
                "categories": list(self.categories)}


def _categories(labels: Sequence[Hashable]) -> tuple:
    return tuple(sorted(set(labels), key=str))


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> Agreement:
    """Cohen's kappa of two annotators' categories for the same items (position i: item i).

    Raises:
      ValueError: different lengths or no item.
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"Cohen's kappa needs two equal, non-empty lists of labels; got {len(first)} and "
                         f"{len(second)}")
    categories = _categories([*first, *second])
    index = {c: i for i, c in enumerate(categories)}
    counts_KK = np.zeros((len(categories), len(categories)), np.int64)
    np.add.at(counts_KK, ([index[x] for x in first], [index[y] for y in second]), 1)
    n = len(first)
    rows_K, cols_K = counts_KK.sum(1), counts_KK.sum(0)
    observed = float(np.trace(counts_KK)) / n
    chance = int(rows_K @ cols_K)  # n^2 p_e, exact in integers
    expected = chance / n ** 2
    kappa = float("nan") if chance == n ** 2 else (observed - expected) / (1.0 - expected)
    return Agreement(kappa, observed, expected, n, categories)


def fleiss_kappa(ratings: Sequence[Sequence[Hashable]]) -> Agreement:
    """Fleiss' kappa of items each judged by the same number m >= 2 of annotators.

    Args:
      ratings: per item, the categories its m annotators chose (in any order).

    Raises:
      ValueError: no item, fewer than 2 ratings on an item, or items with different counts.
    """
    if not ratings:
        raise ValueError("Fleiss' kappa needs at least one item")
    m = len(ratings[0])
    if m < 2 or any(len(r) != m for r in ratings):
        raise ValueError(f"Fleiss' kappa needs every item judged by the same number (>= 2) of annotators; got "
                         f"{sorted({len(r) for r in ratings})}")
    categories = _categories([c for r in ratings for c in r])
    index = {c: i for i, c in enumerate(categories)}
    counts_NK = np.zeros((len(ratings), len(categories)), np.int64)
    for i, r in enumerate(ratings):
        np.add.at(counts_NK[i], [index[c] for c in r], 1)
    per_item_N = ((counts_NK ** 2).sum(1) - m) / (m * (m - 1))
    observed = float(per_item_N.mean())
    shares_K = counts_NK.sum(0) / (len(ratings) * m)
    expected = float(shares_K @ shares_K)
    single = len(categories) == 1
    kappa = float("nan") if single else (observed - expected) / (1.0 - expected)
    return Agreement(kappa, observed, expected, len(ratings), categories)
