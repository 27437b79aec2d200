"""evals.metrics.squad against implementations of the official SQuAD v1.1 script shipped in
lm-eval: qasper's `normalize_answer` / `f1_abstractive` ("taken from the official evaluation
script for v1.1"), T5's `normalize_squad` and `squad_f1_agg` (super_glue/record), with lm-eval's
`metric_max_over_ground_truths`; hand-computed cases; bad input."""

import random

import numpy as np
import pytest
from lm_eval.api.metrics import metric_max_over_ground_truths
from lm_eval.tasks.qasper.metrics import f1_abstractive
from lm_eval.tasks.qasper.metrics import normalize_answer as qasper_normalize
from lm_eval.tasks.super_glue.record.t5_utils import normalize_squad, squad_f1_agg

from evals.metrics.squad import exact_match, f1, normalize_answer, squad

PIECES = ["The", "the", "a", "An", "an", "theater", "Anna", "cat", "Cat!", "cat's", "U.S.", "1,000", "3.5", "don't",
          "A-team", "(an)", "“quoted”", "‘single’", "—", "…", "Café", "CAFÉ", "naïve", "İstanbul", "ÀN", "東京",
          "😀", "x_y", "\u00a0", "\t", "\n", " ", "", "  ", "rock-n-roll", "e.g.", "Ω", "ß"]


def _random_answer(rng):
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(0, 5)))


def _pairs(n=400, seed=0):
    rng = random.Random(seed)
    predictions, golds = [], []
    for _ in range(n):
        golds.append([_random_answer(rng) for _ in range(rng.randint(1, 3))])
        # Half the predictions are an edited gold answer so that EM and F1 are often above 0.
        if rng.random() < 0.5:
            words = rng.choice(golds[-1]).split()
            rng.shuffle(words)
            predictions.append(" ".join(words[:rng.randint(0, len(words))] + [rng.choice(PIECES)]))
        else:
            predictions.append(_random_answer(rng))
    return predictions, golds


def _reference_em(prediction, answers):
    return metric_max_over_ground_truths(lambda p, g: float(qasper_normalize(p) == qasper_normalize(g)), prediction,
                                         answers)


def _reference_f1(prediction, answers):
    return metric_max_over_ground_truths(lambda p, g: f1_abstractive([p], [g]), prediction, answers)


def test_normalize_answer_equals_the_official_normalization_in_lm_eval():
    predictions, golds = _pairs()
    for text in predictions + [g for gs in golds for g in gs] + PIECES:
        assert normalize_answer(text) == qasper_normalize(text) == normalize_squad(text), text


def test_exact_match_and_f1_per_item_equal_lm_eval():
    predictions, golds = _pairs()
    f1_values = []
    for prediction, answers in zip(predictions, golds):
        expected_em, expected_f1 = _reference_em(prediction, answers), _reference_f1(prediction, answers)
        assert exact_match(prediction, answers) == expected_em
        assert f1(prediction, answers) == pytest.approx(expected_f1, rel=1e-12, abs=0)
        f1_values.append(expected_f1)
    assert 0.2 < np.mean(f1_values) < 0.8  # the cases are neither all hits nor all misses


def test_corpus_squad_equals_lm_eval_means_and_t5_squad_f1():
    predictions, golds = _pairs(seed=1)
    ours = squad(predictions, golds)
    em = np.mean([_reference_em(prediction, answers) for prediction, answers in zip(predictions, golds)])
    assert ours["exact_match"] == pytest.approx(100 * em, rel=1e-12)
    # T5's aggregation reads "<group>_<answer>" references, so answers must hold no "_".
    keep = [i for i, answers in enumerate(golds) if not any("_" in a for a in answers)]
    items = [(predictions[i], f"{i}_{a}") for i in keep for a in golds[i]]
    ours_kept = squad([predictions[i] for i in keep], [golds[i] for i in keep])
    assert len(keep) > 300
    assert ours_kept["f1"] == pytest.approx(100 * squad_f1_agg(items), rel=1e-12)


def test_hand_computed_cases():
    assert normalize_answer("  The Cat, (an) apple!  ") == "cat apple"
    assert exact_match("The Cat!", "cat") == 1.0 and exact_match("The Cat!", ["dog", "a cat"]) == 1.0
    assert f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P = 1, R = 2/3
    assert f1("sat on the mat", ["the cat sat"]) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert f1("", "cat") == 0.0 and f1("the", "a") == 0.0  # nothing left after normalization
    assert f1("cat cat dog", "cat") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))  # counted with multiplicity
    predictions = ["France", "Rollo the Walker", "Carolingian cultures", "King Charles", "Denmark", "the"]
    golds = [["France", "in France"], ["Rollo"], ["the Carolingian-based cultures of West Francia"],
             ["Charles III", "King Charles III"], "Norway", ["a"]]
    scores = squad(predictions, golds)
    # EM counts "France" and "the" == "a" (both normalize to ""); F1 of those empty strings is 0,
    # "Carolingian-based" becomes one token "carolingianbased": F1 = (1 + 2/3 + 2/7 + 4/5) / 6.
    assert scores["exact_match"] == pytest.approx(200 / 6)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 7 + 4 / 5) / 6)


def test_questions_without_gold_answers_are_not_scored():
    assert squad(["Paris", "anything"], [["Paris"], []]) == {"exact_match": 100.0, "f1": 100.0}
    assert squad(["x"], [[]]) == {"exact_match": 0.0, "f1": 0.0}


@pytest.mark.parametrize("call, message", [
    (lambda: squad(["a", "b"], [["a"]]), "2 predictions but 1 references"),
    (lambda: squad("a", ["a"]), "predictions is one str"),
    (lambda: exact_match("a", []), "no gold answers"),
    (lambda: f1("a", []), "no gold answers"),
])
def test_bad_input_is_one_line_naming_it(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
