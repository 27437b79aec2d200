"""SEAT's statistic against a hand-checked toy case and an independent float64 loop; the sampled
p-value against the exact one; SENT-DEBIAS's projection; the quick SEAT report on MiniLM
(the gender subspace's removal shrinks the gender tests' effect sizes) and its command line."""

import itertools
import math

import numpy as np
import pytest

from safety import debias, seat, seat_report, weat_sets
from tests.cli_output import assert_one_line_error, run_module
from tests.minilm import minilm_path

EPS64 = float(np.finfo(np.float64).eps)


def test_toy_case_by_hand():
    # s(x) = 3, 1 and s(y) = 2, 0: means 2 and 1, sample std of (3, 1, 2, 0) = sqrt(5/3), so
    # d = 1 / sqrt(5/3); of the 6 ways to pick 2 of 4 for X, only {3, 2} (sum 5) beats 3 + 1 = 4.
    s_x, s_y = np.array([3.0, 1.0]), np.array([2.0, 0.0])
    assert seat.effect_size(s_x, s_y) == pytest.approx(1 / math.sqrt(5 / 3), rel=1e-15)
    assert seat.permutation_p(s_x, s_y) == (pytest.approx(1 / 6), True)
    # Embeddings: x along a, y along b -> s(x) = 1, s(y) = -1; d = 2 / sqrt(2); p = 0 (1 of 2 partitions ties).
    e = np.eye(2)
    r = seat.seat("toy", e[:1], e[1:], e[:1], e[1:])
    assert r.effect_size == pytest.approx(math.sqrt(2)) and r.p_value == 0.0 and r.exact


def _reference(X, Y, A, B):
    """Caliskan's formulas one cosine at a time, float64, and the exact p by enumeration."""
    def cos(u, v):
        return float(np.dot(u, v) / math.sqrt(np.dot(u, u) * np.dot(v, v)))

    def s(w):
        return sum(cos(w, a) for a in A) / len(A) - sum(cos(w, b) for b in B) / len(B)

    sx, sy = [s(x) for x in X], [s(y) for y in Y]
    union = sx + sy
    mean = sum(union) / len(union)
    std = math.sqrt(sum((v - mean) ** 2 for v in union) / (len(union) - 1))
    d = (sum(sx) / len(sx) - sum(sy) / len(sy)) / std
    observed = sum(sx) - sum(sy)
    stats = [2 * sum(union[i] for i in c) - sum(union) for c in itertools.combinations(range(len(union)), len(sx))]
    return d, sum(t > observed + 1e-12 for t in stats) / len(stats)


def test_statistic_equals_an_independent_float64_loop_and_sampling_matches_exact():
    rng = np.random.default_rng(0)
    X, Y, A, B = (rng.normal(size=(n, 16)).astype(np.float32) + shift for n, shift in
                  ((7, 0.3), (7, 0.0), (5, 0.2), (6, 0.0)))
    d, p = _reference(*(m.astype(np.float64) for m in (X, Y, A, B)))
    r = seat.seat("random", X, Y, A, B)
    assert r.exact and r.effect_size == pytest.approx(d, rel=1e3 * EPS64) and r.p_value == pytest.approx(p)
    sampled, exact = seat.permutation_p(seat.association(X, A, B), seat.association(Y, A, B), exact_limit=0,
                                        samples=20_000)
    assert not exact and abs(sampled - p) < 5 * math.sqrt(p * (1 - p) / 20_000) + 1e-4
    again, _ = seat.permutation_p(seat.association(X, A, B), seat.association(Y, A, B), exact_limit=0,
                                  samples=20_000)
    assert again == sampled  # the fixed seed


def test_sent_debias_projects_the_subspace_out():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=8)
    direction /= np.linalg.norm(direction)
    base = rng.normal(size=(20, 8))
    a, b = base + 0.5 * direction + 0.01 * rng.normal(size=(20, 8)), base - 0.5 * direction
    debiaser = debias.fit(a, b, k=1)
    assert abs(abs(debiaser.basis_KD[0] @ direction) - 1) < 1e-3 and debiaser.explained[0] > 0.99
    out = debiaser(rng.normal(size=(5, 8)))
    np.testing.assert_allclose(out @ debiaser.basis_KD.T, 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-12)


def test_bleaching():
    assert weat_sets.bleach(["aster", "iris"], names=False, templates=("This is {}.", "{} is here.")) == [
        "This is an aster.", "An aster is here.", "This is an iris.", "An iris is here."]
    assert weat_sets.bleach(["Adam"], names=True)[:2] == ["This is Adam.", "That is Adam."]
    test = weat_sets.TESTS[0]
    assert {k: len(v) for k, v in weat_sets.sentences(test).items()} == {
        k: len(getattr(test, k)) * len(weat_sets.THING_TEMPLATES) for k in "XYAB"}


@pytest.fixture(scope="module")
def quick_report():
    return seat_report.report(seat_report.encoder(str(minilm_path())), quick=True)


def test_quick_report_on_minilm(quick_report):
    r = quick_report
    print("\n" + seat_report.format_report(r))
    assert [x.name for x in r.before] == [t.name for t in weat_sets.TESTS]
    # Flowers/insects vs pleasant/unpleasant is the association every encoder shows.
    c1 = r.before[0]
    assert c1.effect_size > 0.5 and c1.p_value < 0.01
    # Male/female names vs career/family is significant before; removing the gender direction
    # shrinks it and the gender tests' summed |d|, and barely moves C1 (no gender in it).
    c6 = next(i for i, t in enumerate(weat_sets.TESTS) if t.name == "C6")
    assert r.before[c6].effect_size > 0.8 and r.before[c6].p_value < 0.01
    assert r.after[c6].effect_size < r.before[c6].effect_size - 0.1
    gender = [i for i, t in enumerate(weat_sets.TESTS) if t.name in weat_sets.GENDER_TESTS]
    assert sum(abs(r.after[i].effect_size) for i in gender) < sum(abs(r.before[i].effect_size) for i in gender)
    assert abs(r.after[0].effect_size - c1.effect_size) < 0.1
    # The downstream probe still works after the projection (within 5 points of accuracy).
    assert r.downstream["before"]["accuracy"] > 0.6
    assert r.downstream["after"]["accuracy"] > r.downstream["before"]["accuracy"] - 0.05


def test_seat_cli_bad_k_is_one_line():
    assert_one_line_error(run_module("safety.seat_report", "--k=0"), "--k=0")
