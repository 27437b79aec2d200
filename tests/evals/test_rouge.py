"""evals.metrics.rouge against rouge-score 0.1.2's RougeScorer: per item (`score_multi` over each
item's references) and corpus (the mean of rouge-score's per-item scores) within 1e-6, with and
without the stemmer, on varied text (Unicode, punctuation, digits, empty hypotheses, newline-split
sentences, several references); its LCS read-out against rouge-score's; hand-computed cases; bad
input."""

import pydoc_data.topics
import random

import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenizers
from rouge_score import tokenize as rs_tokenize

from evals.metrics.rouge import lcs_length, lcs_positions, rouge, rouge_items, tokenize

TYPES = ("rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum")
WORDS = " ".join(pydoc_data.topics.topics.values()).split()
ODD = ["Café", "naïve", "İstanbul", "ŞEHİR", "\u212a", "東京タワー", "—", "...", "1,000", "3.14", "don't", "e-mail",
       "straße", "Ünïcödé", "😀", "(see", "below)", "x_y", "\t", "\u00a0", "", "\n", "\n\n", " \n "]


def _text(rng, words):
    out = []
    for _ in range(rng.choice([0, 1, 2, 5, 12, 30])):
        out.append(rng.choice(words) if rng.random() < 0.8 else rng.choice(ODD))
        out.append("\n" if rng.random() < 0.15 else " ")
    return "".join(out)


def _corpus(n, seed, words):
    """Hypotheses and 1-3 references each; a third of the references share the hypothesis's words."""
    rng = random.Random(seed)
    hypotheses, references = [], []
    for _ in range(n):
        hypotheses.append(_text(rng, words))
        refs = [_text(rng, words) for _ in range(rng.choice([1, 1, 2, 3]))]
        if rng.random() < 0.5:
            shuffled = hypotheses[-1].split(" ")
            rng.shuffle(shuffled)
            refs.insert(rng.randrange(len(refs) + 1), " ".join(shuffled[: len(shuffled) // 2 + 1]))
        references.append(refs if len(refs) > 1 or rng.random() < 0.5 else refs[0])  # a str is one reference
    return hypotheses, references


def _assert_equal_to_rouge_score(hypotheses, references, use_stemmer, types=TYPES):
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    expected = [scorer.score_multi([r] if isinstance(r, str) else r, h) for h, r in zip(hypotheses, references)]
    ours = rouge_items(hypotheses, references, rouge_types=types, use_stemmer=use_stemmer)
    for theirs, mine in zip(expected, ours, strict=True):
        for rouge_type in types:
            np.testing.assert_allclose(tuple(mine[rouge_type]), tuple(theirs[rouge_type]), rtol=0, atol=1e-12)
    corpus = rouge(hypotheses, references, rouge_types=types, use_stemmer=use_stemmer)
    for rouge_type in types:
        mean = np.mean([tuple(s[rouge_type]) for s in expected], axis=0)
        np.testing.assert_allclose(tuple(corpus[rouge_type]), mean, rtol=0, atol=1e-9)
    return expected


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_items_and_corpus_equal_rouge_score(use_stemmer):
    hypotheses, references = _corpus(200, seed=int(use_stemmer), words=WORDS)
    expected = _assert_equal_to_rouge_score(hypotheses, references, use_stemmer)
    # The cases are not degenerate: overlaps of every size, empty hypotheses, several references.
    f_lsum = [s["rougeLsum"].fmeasure for s in expected]
    assert 0.3 < np.mean([f > 0 for f in f_lsum]) < 0.95 and max(f_lsum) == 1.0
    assert sum(h == "" for h in hypotheses) > 10 and sum(isinstance(r, list) and len(r) > 1 for r in references) > 50


def test_small_vocabulary_lsum_ties_and_repeats_equal_rouge_score():
    """Four words, many sentences: LCS ties everywhere, so the union of rouge-score's particular
    LCS read-out and the per-token clipping decide rougeLsum."""
    words = ["cat", "dog", "the", "Sat.", "sat\n", "the\n"]
    hypotheses, references = _corpus(250, seed=7, words=words)
    _assert_equal_to_rouge_score(hypotheses, references, use_stemmer=False, types=("rouge2", "rougeL", "rougeLsum"))


def test_lcs_positions_are_rouge_scores_read_out():
    rng = random.Random(3)
    for _ in range(1000):
        ref = [rng.choice("abc") for _ in range(rng.randint(0, 12))]
        can = [rng.choice("abc") for _ in range(rng.randint(0, 12))]
        assert lcs_positions(ref, can) == rouge_scorer.lcs_ind(ref, can)
        assert lcs_length(ref, can) == rouge_scorer._lcs_table(ref, can)[-1][-1]
    # Longer than a machine word: the bit-parallel rows are Python ints of any width.
    ref, can = [rng.choice("abcd") for _ in range(300)], [rng.choice("abcd") for _ in range(200)]
    assert lcs_positions(ref, can) == rouge_scorer.lcs_ind(ref, can)


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_tokens_equal_rouge_scores_tokenizer(use_stemmer):
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=use_stemmer)
    rng = random.Random(5)
    for text in ODD + [" ".join(ODD)] + [_text(rng, WORDS) for _ in range(200)]:
        assert tokenize(text, use_stemmer) == tokenizer.tokenize(text) == rs_tokenize.tokenize(
            text, tokenizer._stemmer)


def test_hand_computed_scores():
    scores = rouge_items(["the cat sat on the mat"], [["the cat is on the mat"]])[0]
    assert scores["rouge1"] == pytest.approx((5 / 6, 5 / 6, 5 / 6))
    assert scores["rouge2"] == pytest.approx((3 / 5, 3 / 5, 3 / 5))  # the cat, on the, the mat
    assert scores["rougeL"] == pytest.approx((5 / 6, 5 / 6, 5 / 6))
    # Lsum: reference sentence "a b c d" against hypothesis sentences "a b" and "c x d": the union of
    # the two LCS is a b c d (4 hits); precision 4/5, recall 4/4.
    lsum = rouge_items(["a b\nc x d"], ["a b c d"], rouge_types=["rougeLsum"])[0]["rougeLsum"]
    assert lsum == pytest.approx((4 / 5, 1.0, 2 * 0.8 / 1.8))
    assert rouge_items([""], ["a"])[0]["rougeL"] == (0.0, 0.0, 0.0)
    assert tokenize("Café İstanbul don't 3.14") == ["caf", "i", "stanbul", "don", "t", "3", "14"]


def test_several_references_take_the_best_f_per_type():
    # The first reference wins rouge1 (same words, shuffled), the second rouge2 and rougeL.
    hypothesis = "alpha beta gamma delta"
    references = ["delta gamma beta alpha", "alpha beta gamma zeta eta theta iota"]
    best = rouge_items([hypothesis], [references])[0]
    single = [rouge_items([hypothesis], [r])[0] for r in references]
    assert best["rouge1"] == single[0]["rouge1"] and best["rouge1"].fmeasure == 1.0
    assert best["rouge2"] == single[1]["rouge2"] and best["rougeL"] == single[1]["rougeL"]
    assert rouge([hypothesis], [references[0]]) == rouge([hypothesis], [[references[0]]])


@pytest.mark.parametrize("call, message", [
    (lambda: rouge(["a", "b"], [["a"]]), "2 hypotheses but 1 references"),
    (lambda: rouge(["a"], [["a"]], rouge_types=["rougeX"]), "unknown rouge type 'rougeX'"),
    (lambda: rouge(["a"], [["a"]], rouge_types=["rouge0"]), "unknown rouge type 'rouge0'"),
    (lambda: rouge(["a"], [["a"]], rouge_types=["rouge10"]), "unknown rouge type 'rouge10'"),
    (lambda: rouge(["a"], [["a"]], rouge_types=[]), "rouge_types is empty"),
    (lambda: rouge(["a"], [[]]), "item 0"),
    (lambda: rouge([None], [["a"]]), "item 0"),
    (lambda: rouge("a b", ["a b"]), "hypotheses is one str"),
    (lambda: rouge([], []), "no hypotheses"),
])
def test_bad_input_is_one_line_naming_it(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
