"""Agreement (annotate/kappa.py, annotate/agreement.py): Cohen's kappa against sklearn's
`cohen_kappa_score` on random and crafted label sets (identical, independent, systematically
opposed, a single category, categories only one annotator used), Fleiss' kappa against the
published worked example (Fleiss 1971 as tabulated by Wikipedia's "Fleiss' kappa": 0.210) and
its per-item agreement against a brute-force count of agreeing annotator pairs; the directory
report aligns items both judged and leaves skips out; `python -m annotate.agreement` prints it.
"""

import itertools
import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from annotate import agreement, kappa
from tests.cli_output import assert_one_line_error, run_module

# float64 sums of at most a few thousand terms of size <= 1: a few eps64.
TOL = 1e-12


def _sklearn(first, second):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its single-label warnings
        return cohen_kappa_score(first, second)


def _observed_expected(first, second):
    """p_o and p_e in float64 by their definitions, independently of kappa.py's counting."""
    n = len(first)
    observed = sum(x == y for x, y in zip(first, second)) / n
    expected = sum(first.count(c) * second.count(c) for c in set(first) | set(second)) / n ** 2
    return observed, expected


@pytest.mark.parametrize("seed", range(8))
def test_cohen_kappa_equals_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 300)), int(rng.integers(2, 6))
    categories = [f"c{i}" for i in range(k)]
    first = list(rng.choice(categories, n))
    # the second annotator copies the first with probability q, else picks at random
    q = rng.uniform()
    second = [x if rng.uniform() < q else str(rng.choice(categories)) for x in first]
    result = kappa.cohen_kappa(first, second)
    assert result.kappa == pytest.approx(_sklearn(first, second), abs=TOL)
    assert (result.observed, result.expected) == pytest.approx(_observed_expected(first, second), abs=TOL)
    assert result.items == n


def test_cohen_kappa_on_crafted_label_sets():
    labels = ["a", "b", "tie", "a", "b", "b", "a", "tie"] * 5
    identical = kappa.cohen_kappa(labels, labels)
    assert identical.kappa == pytest.approx(1.0, abs=TOL) and identical.observed == 1.0
    # Systematic disagreement: one annotator says b whenever the other says a and vice versa.
    flipped = [{"a": "b", "b": "a"}[x] for x in ["a", "b"] * 20]
    opposed = kappa.cohen_kappa(["a", "b"] * 20, flipped)
    assert opposed.kappa == pytest.approx(_sklearn(["a", "b"] * 20, flipped), abs=TOL) and opposed.kappa == -1.0
    # A category only one annotator used counts in the expected agreement with rate 0 for the other.
    first, second = ["x", "x", "y", "z"], ["x", "y", "y", "y"]
    assert kappa.cohen_kappa(first, second).kappa == pytest.approx(_sklearn(first, second), abs=TOL)
    # One category for both: p_e = 1, kappa undefined (NaN), as sklearn says.
    single = kappa.cohen_kappa(["pos"] * 6, ["pos"] * 6)
    assert math.isnan(single.kappa) and math.isnan(_sklearn(["pos"] * 6, ["pos"] * 6))
    assert (single.observed, single.expected) == (1.0, 1.0) and single.as_dict()["kappa"] is None
    # One annotator always the same, the other not: defined (p_e < 1) and 0, as sklearn says.
    first, second = ["pos"] * 6, ["pos", "neg"] * 3
    assert kappa.cohen_kappa(first, second).kappa == pytest.approx(_sklearn(first, second), abs=TOL) == 0.0
    with pytest.raises(ValueError, match="equal, non-empty"):
        kappa.cohen_kappa(["a"], ["a", "b"])


def test_cohen_kappa_of_independent_annotators_is_near_zero():
    """Independent choices: E[kappa] ~ 0 with standard deviation ~ sqrt(p_o(1 - p_o) / n) / (1 - p_e)
    (the delta method's large-sample term); 4 such deviations bound it."""
    rng = np.random.default_rng(0)
    n = 4000
    first = list(rng.choice(["a", "b", "tie"], n, p=[0.45, 0.45, 0.1]))
    second = list(rng.choice(["a", "b", "tie"], n, p=[0.4, 0.4, 0.2]))
    result = kappa.cohen_kappa(first, second)
    sd = math.sqrt(result.observed * (1 - result.observed) / n) / (1 - result.expected)
    assert abs(result.kappa) < 4 * sd, (result.kappa, sd)
    assert result.kappa == pytest.approx(_sklearn(first, second), abs=TOL)


# Fleiss (1971)'s example as tabulated in Wikipedia's "Fleiss' kappa": 10 items, 14 raters, 5
# categories (n_ik); the article gives P = 0.378, P_e = 0.213 and kappa = 0.210.
FLEISS_TABLE = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_fleiss_kappa_reproduces_the_published_example():
    ratings = [[k for k, count in enumerate(row) for _ in range(count)] for row in FLEISS_TABLE]
    result = kappa.fleiss_kappa(ratings)
    assert (round(result.observed, 3), round(result.expected, 3), round(result.kappa, 3)) == (0.378, 0.213, 0.210)


def test_fleiss_per_item_agreement_is_the_share_of_agreeing_pairs():
    rng = np.random.default_rng(1)
    ratings = [list(rng.choice(["a", "b", "c"], 4)) for _ in range(50)]
    pairs = [sum(r[i] == r[j] for i, j in itertools.permutations(range(4), 2)) / 12 for r in ratings]
    pooled = [c for r in ratings for c in r]
    expected = sum((pooled.count(c) / len(pooled)) ** 2 for c in "abc")
    result = kappa.fleiss_kappa(ratings)
    assert result.observed == pytest.approx(np.mean(pairs), abs=TOL)
    assert result.kappa == pytest.approx((np.mean(pairs) - expected) / (1 - expected), abs=TOL)
    assert kappa.fleiss_kappa([["a", "a"], ["b", "b"]]).kappa == 1.0
    with pytest.raises(ValueError, match="same number"):
        kappa.fleiss_kappa([["a", "b"], ["a"]])


def _judgments(name, choices):
    """An annotator's preference judgments {item id: choice} as `store` rows."""
    return [{"prompt": "p", "a": "x", "b": "y", "id": item, "annotator": name, "choice": choice}
            for item, choice in choices.items()]


def _write(directory, name, rows):
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_aligns_items_both_judged_and_leaves_skips_out(tmp_path):
    alice = {"1": "a", "2": "b", "3": "tie", "4": "a", "5": "skip", "6": "b"}
    bob = {"2": "b", "1": "a", "3": "a", "4": "skip", "5": "b", "6": "b", "7": "a"}
    carol = {"1": "a", "2": "a", "3": "tie", "6": "b"}
    for name, choices in (("alice", alice), ("bob", bob), ("carol", carol)):
        _write(tmp_path, name, _judgments(name, choices))
    result = agreement.report(agreement.store.read_directory(str(tmp_path)))
    pairs = {tuple(p["annotators"]): p for p in result["pairs"]}
    # alice & bob both judged 1, 2, 3, 6 (4 and 5 have a skip, 7 only bob)
    ab = pairs[("alice", "bob")]
    assert ab["items"] == 4
    assert ab["kappa"] == pytest.approx(_sklearn(["a", "b", "tie", "b"], ["a", "b", "a", "b"]), abs=TOL)
    assert pairs[("alice", "carol")]["items"] == 4 and pairs[("bob", "carol")]["items"] == 4
    # Fleiss on the items all three judged: 1, 2, 3, 6
    fleiss = kappa.fleiss_kappa([["a", "a", "a"], ["b", "b", "a"], ["tie", "a", "tie"], ["b", "b", "b"]])
    assert result["fleiss"]["kappa"] == pytest.approx(fleiss.kappa, abs=TOL) and result["fleiss"]["items"] == 4
    lines = agreement.render(result).splitlines()
    assert lines[0].startswith(f"alice vs bob: kappa {ab['kappa']:.3f} (observed 0.750, expected ")
    assert lines[-1] == (f"Fleiss (alice, bob, carol): kappa {fleiss.kappa:.3f} (observed {fleiss.observed:.3f}, "
                         f"expected {fleiss.expected:.3f}) on 4 items all judged")


def test_agreement_command_prints_each_pair_and_refuses_one_annotator(tmp_path):
    _write(tmp_path, "alice", _judgments("alice", {"1": "a", "2": "b", "3": "b"}))
    _write(tmp_path, "bob", _judgments("bob", {"1": "a", "2": "b", "3": "a"}))
    result = run_module("annotate.agreement", str(tmp_path))
    assert result.returncode == 0, result.stderr
    want = kappa.cohen_kappa(["a", "b", "b"], ["a", "b", "a"])
    assert result.stdout.strip() == (f"alice vs bob: kappa {want.kappa:.3f} (observed {want.observed:.3f}, "
                                     f"expected {want.expected:.3f}) on 3 items both judged")
    as_json = json.loads(run_module("annotate.agreement", str(tmp_path / "alice.jsonl"), str(tmp_path / "bob.jsonl"),
                                    "--json").stdout)
    assert as_json["pairs"][0]["kappa"] == pytest.approx(want.kappa, abs=TOL)
    (tmp_path / "bob.jsonl").unlink()
    assert_one_line_error(run_module("annotate.agreement", str(tmp_path)), "two or more annotators")
    (tmp_path / "bob.jsonl").write_text('{"id": "1", "choice": "a", "annotator": "alice"}\n')
    assert_one_line_error(run_module("annotate.agreement", str(tmp_path)), "bob.jsonl:1",
                          "the judgment of 'alice' in the file of 'bob'")
