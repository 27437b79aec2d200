"""Accuracy, F1 (binary, micro, macro, weighted) and the Matthews correlation coefficient of
label sequences, equal to scikit-learn's `accuracy_score`, `f1_score` and `matthews_corrcoef`.

Labels are any sortable values of one kind: integers (or floats holding integers), bools or
strings; a mix of strings and numbers, or non-integer floats, is an error (as in scikit-learn).
The classes are the sorted union of the labels in `y_true` and `y_pred`.

F1 of one class: 2 TP / (2 TP + FP + FN) = 2 TP / (true count + predicted count); a class with
neither true nor predicted examples has F1 `zero_division` (scikit-learn's default gives 0.0).
  - binary: the F1 of `pos_label` (at most two classes; `labels` is ignored, as in scikit-learn).
  - micro: TP, true and predicted counts summed over the classes first (equal to accuracy when
    every class is counted).
  - macro: the unweighted mean of the per-class F1 (a class never predicted counts with its 0).
  - weighted: the mean weighted by each class's true count (unweighted when those are all 0).
`labels` chooses the classes counted by micro, macro and weighted (absent ones included).
NaN per-class values (`zero_division=nan`) are left out of the means.
MCC: the multiclass formula (Gorodkin 2004) on the confusion matrix; 0.0 when undefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

AVERAGES = ("macro", "micro", "binary", "weighted")


def _labels(name: str, y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} has shape {y.shape}; pass one label per example (a 1-D sequence)")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.floor(y))):
        raise ValueError(f"{name} holds non-integer floats (continuous values); pass class labels")
    return y


def _kind(y: np.ndarray) -> str:
    if y.dtype.kind in "US" or (y.dtype.kind == "O" and all(isinstance(v, str) for v in y)):
        return "string"
    if y.dtype.kind in "biuf":
        return "number"
    raise ValueError(f"labels of dtype {y.dtype} are not supported; pass integer, bool or string labels")


def _encode(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, class index of every y_true, of every y_pred), after one-line input checks."""
    y_true, y_pred = _labels("y_true", y_true), _labels("y_pred", y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}; pass one prediction "
                         "per example")
    if len(y_true) == 0:
        raise ValueError("y_true and y_pred are empty; pass at least one example")
    kinds = {_kind(y_true), _kind(y_pred)}
    if len(kinds) > 1:
        raise ValueError("y_true and y_pred mix string and number labels; use one kind of label for both")
    classes = np.unique(np.concatenate([y_true, y_pred]))
    return classes, np.searchsorted(classes, y_true), np.searchsorted(classes, y_pred)


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of examples whose predicted label equals the true one.

    Args:
      y_true: true labels, one per example.
      y_pred: predicted labels, one per example.

    Returns:
      The accuracy in [0, 1].
    """
    _, true_idx, pred_idx = _encode(y_true, y_pred)
    return float(np.mean(true_idx == pred_idx))


def _divide(numerator: np.ndarray, denominator: np.ndarray, zero_division: float) -> np.ndarray:
    out = np.full(numerator.shape, zero_division, np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    """scikit-learn's NaN-ignoring (weighted) mean; all weights 0 -> unweighted."""
    keep = ~np.isnan(values)
    if not keep.any():
        return math.nan
    if weights is None or weights[keep].sum() == 0:
        return float(np.mean(values[keep]))
    return float(np.average(values[keep], weights=weights[keep]))


def f1_score(y_true: Sequence, y_pred: Sequence, *, average: str = "macro", labels: Sequence | None = None,
             pos_label=1, zero_division: float = 0.0) -> float:
    """F1 score (see the module docstring).

    Args:
      y_true: true labels, one per example.
      y_pred: predicted labels, one per example.
      average: "macro", "micro", "binary" or "weighted".
      labels: the classes that micro / macro / weighted count (default: every class present).
      pos_label: the positive class of average="binary".
      zero_division: the F1 of a class with no true and no predicted example: 0.0, 1.0 or nan.

    Returns:
      The F1 in [0, 1] (nan only when every counted class is nan).
    """
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}; use one of {', '.join(AVERAGES)}")
    if not (zero_division in (0, 1) or (isinstance(zero_division, float) and math.isnan(zero_division))):
        raise ValueError(f"zero_division={zero_division!r}; use 0.0, 1.0 or float('nan')")
    classes, true_idx, pred_idx = _encode(y_true, y_pred)
    if average == "binary":
        if len(classes) > 2:
            raise ValueError(f"average='binary' needs at most two classes but the labels hold {len(classes)} "
                             f"({classes.tolist()}); use average='macro', 'micro' or 'weighted'")
        if pos_label not in classes.tolist() and len(classes) == 2:
            raise ValueError(f"pos_label={pos_label!r} is not one of the labels {classes.tolist()}; pass one of "
                             "them as pos_label")
        labels = [pos_label]
    elif labels is not None and len(labels) == 0:
        raise ValueError("labels is empty; pass the classes to count, or None for every class present")
    true_count = np.bincount(true_idx, minlength=len(classes))
    pred_count = np.bincount(pred_idx, minlength=len(classes))
    tp = np.bincount(true_idx[true_idx == pred_idx], minlength=len(classes))
    if labels is not None:
        # Counts of the chosen classes, in their order; a class absent from the data counts 0.
        index = {label: i for i, label in enumerate(classes.tolist())}
        where = [index.get(label, -1) for label in labels]
        true_count, pred_count, tp = (np.array([c[i] if i >= 0 else 0 for i in where], np.int64)
                                      for c in (true_count, pred_count, tp))
    if average == "micro":
        true_count, pred_count, tp = (np.sum(c, keepdims=True) for c in (true_count, pred_count, tp))
    per_class = _divide(2.0 * tp, (true_count + pred_count).astype(np.float64), zero_division)
    return _mean(per_class, true_count.astype(np.float64) if average == "weighted" else None)


def matthews_corrcoef(y_true: Sequence, y_pred: Sequence) -> float:
    """Matthews correlation coefficient, multiclass (binary is its two-class case).

    Args:
      y_true: true labels, one per example.
      y_pred: predicted labels, one per example.

    Returns:
      MCC in [-1, 1]; 0.0 when y_true or y_pred holds a single class.
    """
    classes, true_idx, pred_idx = _encode(y_true, y_pred)
    t_sum = np.bincount(true_idx, minlength=len(classes)).astype(np.float64)
    p_sum = np.bincount(pred_idx, minlength=len(classes)).astype(np.float64)
    n = float(len(true_idx))
    correct = float(np.sum(true_idx == pred_idx))
    cov_true_pred = correct * n - np.dot(t_sum, p_sum)
    cov_pred_pred = n * n - np.dot(p_sum, p_sum)
    cov_true_true = n * n - np.dot(t_sum, t_sum)
    if cov_pred_pred * cov_true_true == 0:
        return 0.0
    return float(cov_true_pred / np.sqrt(cov_pred_pred * cov_true_true))
