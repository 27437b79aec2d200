"""evals.metrics.chrf equals sacrebleu 2.6.0's CHRF: chrF and chrF++, corpus and sentence level.

Both compute in float64 through the same formula, so agreement is asserted to 1e-9 (the promise
is 1e-6); the statistics are integers and must be identical."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import CHRF

from evals.metrics.chrf import chrf, chrf_from_statistics, chrf_statistics, sentence_chrf

TOL = 1e-9

# Unicode (CJK, accents), punctuation at word ends and starts (chrF++ splits one off), numbers,
# case, whitespace runs, empty hypotheses and references, and 1-3 references per hypothesis.
HYPOTHESES = [
    "The cat sat on the mat.",
    "It costs $1,000.50 -- or 3-4 euros (roughly).",
    "",
    "北京欢迎你！今天天气很好。",
    "Café naïve résumé, ÉCOLE déjà vu…",
    "(hi) 'quoted' \"double\" ...end",
    "a   spaced\tout\nline  ",
    "THE CAT SAT ON THE MAT",
    "x",
    "Mixed 中文 and English, 12,5% ¿qué? «oui»",
]
REFERENCES = [
    ["The cat is on the mat.", "There is a cat on the mat."],
    ["It costs $1,000.50 or 3-4 euros, roughly."],
    ["Nothing was said."],
    ["北京欢迎您！今天天气很好。", "北京欢迎你，今天天气不错。", "欢迎来到北京！"],
    ["cafe naive resume, École déjà vu..."],
    ["hi 'quoted' double end"],
    ["a spaced out line"],
    ["the cat sat on the mat", "The cat sat on the mat."],
    [""],
    ["", "mixed Chinese and English, 12.5%"],
]


def _streams(references):
    """sacrebleu's layout: reference streams, padded with None where a hypothesis has fewer."""
    width = max(len(refs) for refs in references)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


@pytest.mark.parametrize("word_order", [0, 1, 2])
def test_corpus_and_sentence_chrf_equal_sacrebleu(word_order):
    for eps_smoothing, lowercase, whitespace in itertools.product([False, True], repeat=3):
        options = {"word_order": word_order, "eps_smoothing": eps_smoothing, "lowercase": lowercase,
                   "whitespace": whitespace}
        reference = CHRF(**options)
        ours = chrf(HYPOTHESES, REFERENCES, **options)
        assert abs(ours.score - reference.corpus_score(HYPOTHESES, _streams(REFERENCES)).score) <= TOL
        assert (ours.char_order, ours.word_order, ours.beta) == (6, word_order, 2)
        for hypothesis, refs in zip(HYPOTHESES, REFERENCES):
            ours = sentence_chrf(hypothesis, refs, **options).score
            assert abs(ours - reference.sentence_score(hypothesis, refs).score) <= TOL, (hypothesis, refs)
    assert 0 < chrf(HYPOTHESES, REFERENCES, word_order=word_order).score < 100


def test_other_orders_and_betas_equal_sacrebleu():
    for char_order, word_order, beta in [(1, 0, 2), (4, 2, 1), (6, 2, 3), (0, 2, 2), (8, 3, 0.5)]:
        options = {"char_order": char_order, "word_order": word_order, "beta": beta}
        assert abs(chrf(HYPOTHESES, REFERENCES, **options).score
                   - CHRF(**options).corpus_score(HYPOTHESES, _streams(REFERENCES)).score) <= TOL


def test_statistics_equal_sacrebleu_and_aggregate_like_a_corpus():
    options = {"word_order": 2}
    stats = chrf_statistics(HYPOTHESES, REFERENCES, **options)
    theirs = CHRF(**options)._extract_corpus_statistics(HYPOTHESES, _streams(REFERENCES))
    assert stats.dtype == np.int64 and stats.shape == (len(HYPOTHESES), 24)
    np.testing.assert_array_equal(stats, np.asarray(theirs))
    rng = np.random.default_rng(0)
    for _ in range(5):
        sample = rng.integers(0, len(HYPOTHESES), len(HYPOTHESES))
        resampled = chrf([HYPOTHESES[i] for i in sample], [REFERENCES[i] for i in sample], **options)
        assert chrf_from_statistics(stats[sample].sum(0), **options) == resampled
        assert chrf_from_statistics(stats[sample], **options) == resampled


def test_the_reference_with_the_best_sentence_f_is_kept():
    # The second reference matches better; its statistics (not the first's) enter the corpus sums.
    stats = chrf_statistics(["the cat"], [["a dog", "the cat", "the cat"]])
    np.testing.assert_array_equal(stats, chrf_statistics(["the cat"], [["the cat"]]))
    assert sentence_chrf("the cat", ["a dog", "the cat"]).score == pytest.approx(100.0, abs=TOL)


_ALPHABET = st.sampled_from(list("abAB 1.,-'\"()!?\n\t") + ["北", "京", "é", "É", "…", "“", "，", "ß", "\u3000"])
_TEXT = st.lists(_ALPHABET, max_size=24).map("".join)
_PAIR = st.tuples(_TEXT, st.lists(_TEXT, min_size=1, max_size=3))


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(_PAIR, min_size=1, max_size=5), word_order=st.sampled_from([0, 2]),
       eps_smoothing=st.booleans(), lowercase=st.booleans(), whitespace=st.booleans())
def test_random_text_equals_sacrebleu(pairs, word_order, eps_smoothing, lowercase, whitespace):
    hypotheses, references = [h for h, _ in pairs], [r for _, r in pairs]
    options = {"word_order": word_order, "eps_smoothing": eps_smoothing, "lowercase": lowercase,
               "whitespace": whitespace}
    ours = chrf(hypotheses, references, **options).score
    assert abs(ours - CHRF(**options).corpus_score(hypotheses, _streams(references)).score) <= TOL


@pytest.mark.parametrize("call, words", [
    (lambda: chrf(["a", "b"], [["a"]]), ["2 hypotheses but 1 reference lists"]),
    (lambda: chrf(["a"], [[None]]), ["hypotheses[0] has no references"]),
    (lambda: chrf("a b", ["a b"]), ["hypotheses is a single string", "sentence_chrf"]),
    (lambda: chrf(["a"], [["a"]], char_order=0, word_order=0), ["char_order + word_order is 0"]),
    (lambda: chrf(["a"], [["a"]], word_order=-1), ["word_order must be a non-negative integer"]),
    (lambda: sentence_chrf(["a"], ["a"]), ["hypothesis is a list", "use chrf"]),
    (lambda: chrf_from_statistics(np.zeros(18), word_order=2), ["shape (18,)", "word_order=2"]),
])
def test_bad_input_is_one_line_naming_it(call, words):
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
