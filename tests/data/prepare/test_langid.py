"""langid: the stage's decision follows langid.py's own posterior (the package called directly);
the English keep-list's precision and recall on a seeded labelled sample (pydoc paragraphs vs
Faker's per-locale text), with `evaluate`'s per-language numbers checked against sklearn;
bad options fail with a message; the stage pickles without its model."""

import copy
import pickle

import pytest
from langid.langid import LanguageIdentifier, model
from sklearn.metrics import precision_score, recall_score

from data.prepare import langid
from data.prepare.langid import LanguageId

PER_LANGUAGE = 60


@pytest.fixture(scope="module")
def reference():
    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


@pytest.fixture(scope="module")
def sample():
    return langid.labelled_sample(PER_LANGUAGE, seed=0)


@pytest.fixture(scope="module")
def report(sample):
    return langid.evaluate(LanguageId(LanguageId.Options(keep=("en",), min_prob=0.5)), sample)


@pytest.fixture(scope="module")
def predicted(sample, reference):
    """langid.py's own verdicts on the sample, below 0.5 'low_confidence'."""
    verdicts = []
    for text, _ in sample:
        language, probability = reference.classify(text)
        verdicts.append(language if probability >= 0.5 else "low_confidence")
    return verdicts


def test_sample_is_labelled_and_seeded(sample):
    languages = [language for _, language in sample]
    assert {l: languages.count(l) for l in set(languages)} == {
        l: PER_LANGUAGE for l in ["en", *langid.FAKER_LOCALES.values()]}
    assert langid.labelled_sample(PER_LANGUAGE, seed=0) == sample
    assert langid.labelled_sample(PER_LANGUAGE, seed=1) != sample


def test_decisions_follow_langid_posterior(sample, reference):
    stage = LanguageId(LanguageId.Options(keep=("en", "de"), min_prob=0.9))
    texts = [text for text, _ in sample[::7]] + ["ok", "1 2 3", "Das ist gut. This is good.", "ciao"]
    for text in texts:
        language, probability = reference.classify(text)
        if probability < 0.9:
            expected = "low_confidence"
        else:
            expected = "" if language in ("en", "de") else f"lang.{language}"
        outcome = LanguageId.__call__(stage, text)
        assert outcome.reason == expected, (text, language, probability)
        assert outcome.text == (text if expected == "" else None)


def test_candidates_restrict_the_model(reference):
    restricted = copy.deepcopy(reference)
    restricted.set_languages(["en", "nl", "af"])
    stage = LanguageId(LanguageId.Options(keep=("nl",), candidates=("en", "nl", "af"), min_prob=0.0))
    for text in ["Dit is een huis met een tuin.", "Hierdie is 'n huis met 'n tuin.", "Het is koud."]:
        language, _ = restricted.classify(text)
        assert stage(text).reason == ("" if language == "nl" else f"lang.{language}")


def test_english_keep_list_precision_and_recall(report):
    print(f"\nlangid English keep-list on {report.total} documents: precision "
          f"{report.keep_precision:.4f}, recall {report.keep_recall:.4f}; per-language recall "
          + ", ".join(f"{l} {r:.2f}" for l, r in sorted(report.recall.items()) if r == r))
    # Requirements, not fitted to this run: at most 1 kept document in 100 foreign (every
    # miss costs 1/60 here, so this allows none), at most 3 of the 60 English paragraphs lost.
    assert report.keep_precision >= 0.99
    assert report.keep_recall >= 0.95


def test_evaluate_matches_sklearn(sample, report, predicted):
    truth = [language for _, language in sample]
    for language in sorted(set(truth)):
        assert report.precision[language] == pytest.approx(
            precision_score(truth, predicted, labels=[language], average="micro", zero_division=0))
        assert report.recall[language] == pytest.approx(
            recall_score(truth, predicted, labels=[language], average="micro"))
    is_en = [t == "en" for t in truth]
    kept = [p == "en" for p in predicted]
    assert report.keep_precision == pytest.approx(precision_score(is_en, kept))
    assert report.keep_recall == pytest.approx(recall_score(is_en, kept))
    assert sum(report.confusion.values()) == len(sample)


@pytest.mark.parametrize("options, message", [
    (dict(keep=("xx",)), "--langid_keep names xx"),
    (dict(keep=()), "--langid_keep is empty"),
    (dict(min_prob=1.5), "--langid_min_prob=1.5"),
    (dict(keep=("en",), candidates=("de", "fr")), "not in --langid_candidates"),
    (dict(max_chars=0), "--langid_max_chars=0"),
])
def test_bad_options_fail_with_a_message(options, message):
    with pytest.raises(ValueError, match=message):
        LanguageId.Options(**options)


def test_labelled_sample_refuses_locales_without_word_lists():
    with pytest.raises(ValueError, match="pt_PT"):
        langid.labelled_sample(1, locales=("pt_PT",))


def test_stage_pickles_without_its_model():
    stage = LanguageId(LanguageId.Options(keep=("en", "fr")))
    stage("warm the model up")
    data = pickle.dumps(stage)
    assert len(data) < 2000  # the model string alone is megabytes
    assert pickle.loads(data)("Ceci est une phrase en français, sans aucun doute.").text is not None


def test_english_keep_list_precision_on_sentences():
    sample = langid.labelled_sample(100, seed=0, unit="sentence")
    report = langid.evaluate(LanguageId(LanguageId.Options(keep=("en",))), sample)
    print(f"\nlangid English keep-list on {report.total} sentences: precision "
          f"{report.keep_precision:.4f}, recall {report.keep_recall:.4f}")
    # One 8-word sentence of random lorem words is a much harder case than a paragraph: a few
    # in a hundred foreign sentences taken for English is what the stage allows there.
    assert report.keep_precision >= 0.95
    assert report.keep_recall >= 0.9


def test_docstring_example():
    import doctest

    from data.prepare import langid as module

    result = doctest.testmod(module)
    assert result.attempted and not result.failed
