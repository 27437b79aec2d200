"""SEAT (May et al. 2019): WEAT's association statistic on sentence embeddings.

For targets X, Y and attributes A, B (embeddings, one row per sentence):

    s(w, A, B)   = mean_a cos(w, a) - mean_b cos(w, b)
    effect size  = (mean_x s(x) - mean_y s(y)) / std_{w in X u Y} s(w)      (Caliskan's d; sample std)
    statistic    = sum_x s(x) - sum_y s(y)
    p (one-sided) = Pr over the equal-size re-partitions (X_i, Y_i) of X u Y of statistic_i > statistic

The p-value enumerates every partition when there are at most `EXACT_LIMIT` of them, else
samples `samples` random ones with a fixed seed. Everything is float64.

    python -m safety.seat [--quick] [--minilm=DIR]   # the table, before and after SENT-DEBIAS
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

EXACT_LIMIT = 100_000
SAMPLES = 100_000
SEED = 0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def association(W: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """s(w, A, B) for each row w of W (float64) [N]."""
    W, A, B = _unit(W), _unit(A), _unit(B)
    return (W @ A.T).mean(axis=1) - (W @ B.T).mean(axis=1)


def effect_size(s_x: np.ndarray, s_y: np.ndarray) -> float:
    """Caliskan's d from the associations of X and Y (sample standard deviation over X u Y)."""
    return float((s_x.mean() - s_y.mean()) / np.concatenate([s_x, s_y]).std(ddof=1))


def permutation_p(s_x: np.ndarray, s_y: np.ndarray, *, samples: int = SAMPLES, seed: int = SEED,
                  exact_limit: int = EXACT_LIMIT) -> tuple[float, bool]:
    """(one-sided p, exact) of the statistic sum s_x - sum s_y over re-partitions of X u Y.

    With n = |X| + |Y| and k = |X|, a partition's statistic is 2 sum_{X_i} s - total, so only
    the sum over the X side varies; exact: every one of C(n, k) subsets (the observed one
    included), else `samples` uniformly random subsets from numpy's generator seeded `seed`.
    """
    s = np.concatenate([s_x, s_y]).astype(np.float64)
    n, k = len(s), len(s_x)
    observed = s_x.sum()
    # The observed sum's float rounding must not count it (or a tie) as "greater".
    slack = 4 * np.finfo(np.float64).eps * np.abs(s).sum()
    if math.comb(n, k) <= exact_limit:
        sums = np.array([s[list(c)].sum() for c in itertools.combinations(range(n), k)])
        return float(np.mean(sums > observed + slack)), True
    rng = np.random.default_rng(seed)
    greater = 0
    for start in range(0, samples, 10_000):
        m = min(10_000, samples - start)
        keys = rng.random((m, n))
        chosen = np.argpartition(keys, k - 1, axis=1)[:, :k]  # a uniform random k-subset per row
        greater += int(np.sum(s[chosen].sum(axis=1) > observed + slack))
    return greater / samples, False


@dataclasses.dataclass(frozen=True)
class SeatResult:
    name: str
    effect_size: float
    p_value: float
    exact: bool
    sizes: tuple[int, int, int, int]  # sentences in X, Y, A, B


def seat(name: str, X: np.ndarray, Y: np.ndarray, A: np.ndarray, B: np.ndarray, **p_options) -> SeatResult:
    """Effect size and one-sided permutation p of targets X, Y vs attributes A, B (embedding rows)."""
    s_x, s_y = association(X, A, B), association(Y, A, B)
    p, exact = permutation_p(s_x, s_y, **p_options)
    return SeatResult(name, effect_size(s_x, s_y), p, exact, (len(X), len(Y), len(A), len(B)))


def run_tests(encode, tests, *, templates: int | None = None, transform=None, **p_options) -> list[SeatResult]:
    """SEAT of each `weat_sets.WordTest` with `encode(sentences) -> [N, D]` (then `transform`)."""
    from safety import weat_sets

    out = []
    for test in tests:
        sents = weat_sets.sentences(test, templates=templates)
        emb = {k: encode(v) for k, v in sents.items()}
        if transform is not None:
            emb = {k: transform(v) for k, v in emb.items()}
        out.append(seat(test.name, emb["X"], emb["Y"], emb["A"], emb["B"], **p_options))
    return out
