"""evals.metrics.bleu equals sacrebleu 2.6.0 (corpus_bleu, sentence_bleu, BLEU's statistics).

Both compute in float64 through the same formula, so agreement is asserted to 1e-9 (the promise
is 1e-6); counts, totals and lengths are integers and must be identical."""

import itertools
import random

import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import BLEU

from evals.metrics.bleu import bleu, bleu_from_statistics, bleu_statistics, sentence_bleu

TOL = 1e-9

# Unicode (CJK, accents, full-width forms), punctuation, numbers with separators, HTML escapes,
# empty hypotheses and references, and 1-3 references per hypothesis.
HYPOTHESES = [
    "The cat sat on the mat.",
    "It costs $1,000.50 -- or 3-4 euros (roughly).",
    "",
    "北京欢迎你！今天天气很好。",
    "Café naïve résumé, ÉCOLE déjà vu…",
    "&quot;Quoted&quot; &amp; &lt;tagged&gt; text <skipped> here",
    "Ｆｕｌｌ－ｗｉｄｔｈ ｔｅｘｔ，and “curly” quotes — dashes",
    "a.,5 b..c 1.2.3 x,y 2024. end",
    "the the the the the the",
    "Mixed 中文 and English, 12,5% ¿qué? «oui»",
    "line one\nline two-\nthree  ",
    "short",
    "one two three &amp;lt;b&amp;gt; &amp;quot;",
]
REFERENCES = [
    ["The cat is on the mat.", "There is a cat on the mat."],
    ["It costs $1,000.50 or 3-4 euros, roughly."],
    ["Nothing was said."],
    ["北京欢迎您！今天天气很好。", "北京欢迎你，今天天气不错。", "欢迎来到北京！"],
    ["cafe naive resume, École déjà vu..."],
    ['"Quoted" & <tagged> text here'],
    ["Full-width text, and \"curly\" quotes - dashes"],
    ["a., 5 b.. c 1.2.3 x, y 2024 . end"],
    ["the cat", "the the mat"],
    [""],
    ["line one line two three"],
    ["", "a short one"],
    # 9 tokens against 11 and 7, equally close: BLEU takes the shorter as the reference length
    ["one two three four five six seven eight nine ten eleven", "one two three four five six seven"],
]


def _streams(references):
    """sacrebleu's layout: reference streams, padded with None where a hypothesis has fewer."""
    width = max(len(refs) for refs in references)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


def _assert_same(ours, theirs):
    assert abs(ours.score - theirs.score) <= TOL, (ours.score, theirs.score)
    assert abs(ours.bp - theirs.bp) <= TOL, (ours.bp, theirs.bp)
    np.testing.assert_allclose(ours.precisions, theirs.precisions, rtol=0, atol=TOL)
    assert list(ours.counts) == list(theirs.counts)
    assert list(ours.totals) == list(theirs.totals)
    assert (ours.sys_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)


@pytest.mark.parametrize("tokenize", ["13a", "intl", "zh", "char", "none"])
def test_corpus_bleu_equals_sacrebleu(tokenize):
    for smooth_method, effective_order, lowercase in itertools.product(
            ["exp", "floor", "add-k", "none"], [False, True], [False, True]):
        options = {"tokenize": tokenize, "smooth_method": smooth_method, "lowercase": lowercase}
        ours = bleu(HYPOTHESES, REFERENCES, effective_order=effective_order, **options)
        theirs = sacrebleu.corpus_bleu(HYPOTHESES, _streams(REFERENCES), use_effective_order=effective_order,
                                       **options)
        _assert_same(ours, theirs)
    assert 0 < bleu(HYPOTHESES, REFERENCES, tokenize=tokenize).score < 100  # neither hopeless nor perfect


@pytest.mark.parametrize("tokenize", ["13a", "intl", "zh", "char", "none"])
def test_sentence_bleu_equals_sacrebleu(tokenize):
    scores = []
    for hypothesis, refs in zip(HYPOTHESES, REFERENCES):
        for smooth_method in ["exp", "floor", "add-k", "none"]:
            ours = sentence_bleu(hypothesis, refs, tokenize=tokenize, smooth_method=smooth_method)
            _assert_same(ours, sacrebleu.sentence_bleu(hypothesis, refs, tokenize=tokenize,
                                                       smooth_method=smooth_method))
            scores.append(ours.score)
    assert min(scores) == 0 and max(scores) > 50


def test_smooth_values_and_ngram_orders_equal_sacrebleu():
    for smooth_method, smooth_value in [("floor", 0.25), ("add-k", 0.5), ("add-k", 3), ("floor", 1)]:
        for max_ngram_order in [1, 2, 4, 6]:
            options = {"smooth_method": smooth_method, "smooth_value": smooth_value, "max_ngram_order": max_ngram_order}
            _assert_same(bleu(HYPOTHESES, REFERENCES, **options),
                         BLEU(**options).corpus_score(HYPOTHESES, _streams(REFERENCES)))
            _assert_same(sentence_bleu(HYPOTHESES[0], REFERENCES[0], **options),
                         BLEU(effective_order=True, **options).sentence_score(HYPOTHESES[0], REFERENCES[0]))


def test_statistics_equal_sacrebleu_and_aggregate_like_a_corpus():
    stats = bleu_statistics(HYPOTHESES, REFERENCES, tokenize="intl")
    theirs = BLEU(tokenize="intl")._extract_corpus_statistics(HYPOTHESES, _streams(REFERENCES))
    assert stats.dtype == np.int64 and stats.shape == (len(HYPOTHESES), 10)
    np.testing.assert_array_equal(stats, np.asarray(theirs))
    # A bootstrap resample scored from re-summed rows is BLEU of the resampled corpus.
    rng = np.random.default_rng(0)
    for _ in range(5):
        sample = rng.integers(0, len(HYPOTHESES), len(HYPOTHESES))
        resampled = bleu([HYPOTHESES[i] for i in sample], [REFERENCES[i] for i in sample], tokenize="intl")
        assert bleu_from_statistics(stats[sample].sum(0)) == resampled
        assert bleu_from_statistics(stats[sample]) == resampled  # rows are summed when given


def test_a_str_reference_is_one_reference():
    assert bleu(["a b c d"], ["a b c e"]) == bleu(["a b c d"], [["a b c e"]])
    assert sentence_bleu("a b c d", "a b c e") == sentence_bleu("a b c d", ["a b c e"])


_ALPHABET = st.sampled_from(list("ab AB1 0.,-'\"&;<>()!?/$%\n\t") + ["&amp;", "&quot;", "北", "京", "é", "É", "…",
                                                                    "—", "“", "，", "。", "Ｈ", "𠀀", "\u3000"])
_TEXT = st.lists(_ALPHABET, max_size=24).map("".join)
_PAIR = st.tuples(_TEXT, st.lists(_TEXT, min_size=1, max_size=3))


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(_PAIR, min_size=1, max_size=5), tokenize=st.sampled_from(["13a", "intl", "zh", "char", "none"]),
       smooth_method=st.sampled_from(["exp", "floor", "add-k", "none"]), effective_order=st.booleans(),
       lowercase=st.booleans())
def test_random_text_equals_sacrebleu(pairs, tokenize, smooth_method, effective_order, lowercase):
    hypotheses, references = [h for h, _ in pairs], [r for _, r in pairs]
    options = {"tokenize": tokenize, "smooth_method": smooth_method, "lowercase": lowercase}
    _assert_same(bleu(hypotheses, references, effective_order=effective_order, **options),
                 sacrebleu.corpus_bleu(hypotheses, _streams(references), use_effective_order=effective_order,
                                       **options))


def test_sentence_bleu_of_an_identical_sentence_is_100_and_of_disjoint_text_0():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(50)]
    sentence = " ".join(rng.choice(words) for _ in range(12))
    assert sentence_bleu(sentence, [sentence]).score == pytest.approx(100.0, abs=TOL)
    assert sentence_bleu(sentence, ["x y z"]).score == 0.0


@pytest.mark.parametrize("call, words", [
    (lambda: bleu(["a", "b"], [["a"]]), ["2 hypotheses but 1 reference lists"]),
    (lambda: bleu(["a"], [["a"]], tokenize="moses"), ["unknown tokenize 'moses'", "13a"]),
    (lambda: bleu(["a"], [["a"]], smooth_method="add-one"), ["unknown smooth_method 'add-one'", "add-k"]),
    (lambda: bleu(["a"], [[None]]), ["hypotheses[0] has no references"]),
    (lambda: bleu(["a"], [[]]), ["hypotheses[0] has no references"]),
    (lambda: bleu("a b", ["a b"]), ["hypotheses is a single string", "sentence_bleu"]),
    (lambda: bleu([], []), ["no hypotheses"]),
    (lambda: bleu([None], [["a"]]), ["hypotheses[0] is a NoneType"]),
    (lambda: bleu(["a"], [["a", 3]]), ["reference of hypotheses[0] is a int"]),
    (lambda: bleu(["a"], [["a"]], max_ngram_order=0), ["max_ngram_order must be a positive integer"]),
    (lambda: sentence_bleu(["a"], ["a"]), ["hypothesis is a list", "use bleu"]),
    (lambda: bleu_from_statistics(np.zeros(7)), ["shape (7,)"]),
    (lambda: bleu_from_statistics(np.zeros(10), max_ngram_order=3), ["hold 4 n-gram orders but max_ngram_order=3"]),
])
def test_bad_input_is_one_line_naming_it(call, words):
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
