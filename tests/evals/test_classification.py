"""evals.metrics.classification against scikit-learn 1.9.1: random integer and string labels,
every average, `labels` subsets with absent classes, zero_division, and the edge cases (a class
never predicted, one class only, binary pos_label); the same inputs scikit-learn rejects are
one-line ValueErrors."""

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

from evals.metrics import classification as cls

# Both sides compute the same float64 expression; only summation order can differ.
TOL = 16 * np.finfo(np.float64).eps


def _same(ours, theirs):
    return (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, rel=TOL, abs=TOL)


def _cases(n, seed=0):
    rng = np.random.default_rng(seed)
    names = np.array(["cat", "dog", "émeu", "ant", "zèbre", "B"])
    for i in range(n):
        k, size = rng.integers(1, 6), rng.integers(1, 25)
        y_true, y_pred = rng.integers(0, k, size), rng.integers(0, k + 1, size)
        if i % 3 == 0:
            y_true, y_pred = names[y_true].tolist(), names[y_pred].tolist()
        elif i % 3 == 1:
            y_true, y_pred = y_true.tolist(), y_pred.astype(np.float64)  # floats holding integers
        yield y_true, y_pred


def _sklearn_or_error(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning: the value is what we compare
        try:
            return fn(*args, **kwargs)
        except ValueError:
            return "error"


def _ours_or_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as error:
        assert "\n" not in str(error)
        return "error"


def test_f1_equals_sklearn_on_random_labels():
    # scikit-learn's input validation costs milliseconds per call: few cases, every average on each,
    # zero_division cycling through its three values.
    counted = 0
    for i, (y_true, y_pred) in enumerate(_cases(n=24)):
        classes = sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))
        absent = "zz" if isinstance(classes[0], str) else 99
        zero_division = (0.0, 1.0, float("nan"))[i % 3]
        for average in ("macro", "micro", "weighted", "binary"):
            for labels in (None, classes[:1] + [absent] if i % 2 else classes[::-1]):
                kwargs = {"average": average, "labels": labels, "zero_division": zero_division}
                theirs = _sklearn_or_error(sk.f1_score, y_true, y_pred, **kwargs)
                ours = _ours_or_error(cls.f1_score, y_true, y_pred, **kwargs)
                assert (ours == "error") == (theirs == "error"), (y_true, y_pred, kwargs, ours, theirs)
                if ours != "error":
                    assert _same(ours, theirs), (y_true, y_pred, kwargs, ours, theirs)
                    counted += 1
    assert counted > 120  # binary rejects the multiclass cases, as scikit-learn does


def test_accuracy_and_mcc_equal_sklearn_on_random_labels():
    for y_true, y_pred in _cases(n=40, seed=1):
        assert _same(cls.accuracy(y_true, y_pred), sk.accuracy_score(y_true, y_pred))
        assert _same(cls.matthews_corrcoef(y_true, y_pred), sk.matthews_corrcoef(y_true, y_pred))


@pytest.mark.parametrize("y_true, y_pred, kwargs", [
    ([0, 1, 2, 2, 1], [0, 2, 2, 2, 0], {}),  # class 1 never predicted: its F1 0 counts in macro
    ([3, 3, 3], [3, 3, 3], {}),  # one class only
    ([1, 1, 1], [0, 0, 0], {"average": "binary"}),  # pos_label 1 never predicted
    ([0, 0, 0], [0, 0, 0], {"average": "binary"}),  # pos_label absent: zero_division
    ([0, 0, 0], [0, 0, 0], {"average": "binary", "zero_division": 1.0}),
    (["no", "yes", "yes", "no"], ["yes", "yes", "no", "no"], {"average": "binary", "pos_label": "yes"}),
    ([True, False, True], [True, True, True], {"average": "binary"}),
    ([0, 1, 2, 3], [0, 1, 1, 1], {"average": "weighted", "labels": [2, 3]}),  # counted classes never predicted
    ([0, 1, 2, 3], [0, 1, 1, 1], {"average": "weighted", "labels": [7]}),  # no true examples: unweighted
    ([0, 1, 2, 3], [0, 1, 1, 1], {"average": "micro", "labels": [1, 2]}),
])
def test_edge_cases_equal_sklearn(y_true, y_pred, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = (sk.f1_score(y_true, y_pred, **{"average": "macro", **kwargs}),
                    sk.accuracy_score(y_true, y_pred), sk.matthews_corrcoef(y_true, y_pred))
    ours = (cls.f1_score(y_true, y_pred, **kwargs), cls.accuracy(y_true, y_pred), cls.matthews_corrcoef(y_true, y_pred))
    assert all(_same(o, e) for o, e in zip(ours, expected)), (ours, expected)


def test_hand_computed_values():
    # F1 = 2 TP / (true + predicted): class 0: 2*1/(1+2); class 1 (never predicted): 0; class 2: 2*2/(2+3).
    y_true, y_pred = [0, 1, 2, 2, 1], [0, 2, 2, 2, 0]
    assert cls.f1_score(y_true, y_pred) == pytest.approx((2 / 3 + 0 + 4 / 5) / 3)
    assert cls.f1_score(y_true, y_pred, average="micro") == pytest.approx(3 / 5) == cls.accuracy(y_true, y_pred)
    assert cls.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert cls.matthews_corrcoef([0, 0, 1], [0, 0, 0]) == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda: cls.accuracy([0, 1], [0]), "y_true has 2 labels but y_pred has 1"),
    (lambda: cls.f1_score([0, 1], [0, 1, 1]), "y_true has 2 labels but y_pred has 3"),
    (lambda: cls.f1_score([0, 1], [0, 1], average="samples"), "unknown average 'samples'"),
    (lambda: cls.f1_score([0, 1, 2], [0, 1, 1], average="binary"), "average='binary' needs at most two classes"),
    (lambda: cls.f1_score(["a", "b"], ["a", "a"], average="binary"), "pos_label=1 is not one of the labels"),
    (lambda: cls.f1_score([0, 1], [0, 1], zero_division=0.5), "zero_division=0.5"),
    (lambda: cls.f1_score([0, 1], [0, 1], labels=[]), "labels is empty"),
    (lambda: cls.matthews_corrcoef(["a", "b"], [0, 1]), "mix string and number labels"),
    (lambda: cls.accuracy([0.5, 1.0], [1.0, 1.0]), "non-integer floats"),
    (lambda: cls.accuracy([], []), "empty"),
    (lambda: cls.accuracy([[0, 1], [1, 0]], [[0, 1], [1, 0]]), "shape"),
])
def test_bad_input_is_one_line_naming_it(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
