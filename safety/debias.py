"""SENT-DEBIAS (Liang et al. 2020): remove a bias subspace from sentence embeddings.

1. Bias attribute sentences: each template filled with each word of a definitional pair
   ("{} went to the store." x (man, woman), (he, she), ...). The templates here are NOT SEAT's
   bleached ones, so the probe does not grade its own fitting data.
2. Each pair's embeddings minus their mean (the component the swap changes), stacked, and PCA:
   the top `k` right singular vectors span the bias subspace V.
3. Debiased h = h - V^T V h (`Debiaser.__call__`), then L2-normalized again.

`logistic_probe` is the downstream task that prices the projection: a multinomial logistic
regression on frozen embeddings, trained on one split and scored on another.
"""

from __future__ import annotations

import dataclasses

import numpy as np

GENDER_PAIRS = (("man", "woman"), ("he", "she"), ("boy", "girl"), ("father", "mother"), ("son", "daughter"),
                ("brother", "sister"), ("husband", "wife"), ("king", "queen"), ("male", "female"),
                ("his", "her"), ("him", "her"), ("uncle", "aunt"), ("gentleman", "lady"), ("John", "Mary"))
TEMPLATES = ("{} went to the store yesterday.", "I had lunch with the {} today.", "The {} is reading a book.",
             "Everyone says the {} works very hard.", "We met the {} at the station.",
             "The {} wants to learn how to cook.", "Yesterday the {} called about the meeting.",
             "A photo of the {} hung on the wall.", "The {} laughed at the joke.", "My neighbor is a {}.")
PRONOUN_TEMPLATES = ("{} went to the store yesterday.", "Everyone says {} works very hard.",
                     "Yesterday {} called about the meeting.", "I think {} is reading a book.")
PRONOUNS = {"he", "she", "his", "her", "him"}


def pair_sentences(pairs=GENDER_PAIRS) -> tuple[list[str], list[str]]:
    """Parallel lists (one side, other side) of template x pair sentences."""
    a, b = [], []
    for x, y in pairs:
        pronoun = x.lower() in PRONOUNS
        proper = x[0].isupper()
        for template in PRONOUN_TEMPLATES if pronoun else TEMPLATES:
            if proper:
                template = template.replace("the {}", "{}").replace("a {}", "{}")
            for side, word in ((a, x), (b, y)):
                s = template.format(word)
                side.append(s[0].upper() + s[1:])
    return a, b


@dataclasses.dataclass(frozen=True)
class Debiaser:
    """Projection of embeddings off the bias subspace (rows of `basis_KD`, orthonormal)."""

    basis_KD: np.ndarray
    explained: np.ndarray  # share of the pair-difference variance along each basis vector

    def __call__(self, x_ND: np.ndarray) -> np.ndarray:
        x = np.asarray(x_ND, np.float64)
        x = x - (x @ self.basis_KD.T) @ self.basis_KD
        return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fit(a_ND: np.ndarray, b_ND: np.ndarray, *, k: int = 1) -> Debiaser:
    """The bias subspace of paired embeddings (row i of a and of b are a swapped pair): PCA of the
    pair-centred rows (uncentred across pairs, as Liang et al.), top `k` directions."""
    a, b = np.asarray(a_ND, np.float64), np.asarray(b_ND, np.float64)
    mean = (a + b) / 2
    d = np.concatenate([a - mean, b - mean])
    _, sv, vt = np.linalg.svd(d, full_matrices=False)
    return Debiaser(vt[:k], (sv**2 / np.sum(sv**2))[:k])


def logistic_probe(train_x, train_y, test_x, *, classes: int, l2: float = 1e-3, steps: int = 500,
                   lr: float = 2.0) -> np.ndarray:
    """Predicted classes of `test_x` by multinomial logistic regression (full-batch gradient
    descent from zero, float64) fitted on (train_x, train_y)."""
    x = np.asarray(train_x, np.float64)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    onehot = np.eye(classes)[np.asarray(train_y)]
    w = np.zeros((x.shape[1], classes))
    for _ in range(steps):
        logits = x @ w
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w -= lr * (x.T @ (p - onehot) / len(x) + l2 * w)
    t = np.asarray(test_x, np.float64)
    return np.argmax(np.concatenate([t, np.ones((len(t), 1))], axis=1) @ w, axis=1)
