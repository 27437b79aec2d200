"""exact_dedup: the Beam groups equal a plain-Python grouping of the normalized texts, the smallest
id kept per group, on planted copies, Unicode-composition, case and white-space variants."""

import operator
import unicodedata

import apache_beam as beam
import faker
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to

from data.prepare import exact_dedup, planted
from data.prepare.stage import Document


def make_documents():
    corpus = planted.generate(num_bases=40, duplicates_per_level=4, exact_copies=10, seed=5)
    documents = list(corpus.documents)
    fake = faker.Faker(["de_DE", "fr_FR", "ja_JP"])
    fake.seed_instance(0)
    for i in range(30):
        text = fake.paragraph(nb_sentences=4)
        documents.append(Document(f"faker:{i:03d}", text))
        if i % 3 == 0:  # the same content decomposed (NFD), re-cased and re-spaced
            variant = unicodedata.normalize("NFD", text).swapcase().replace(" ", " \t\n ")
            documents.append(Document(f"faker:{i:03d}:variant", "  " + variant))
        if i % 5 == 0:  # one character more: not a duplicate
            documents.append(Document(f"faker:{i:03d}:longer", text + "."))
    documents += [Document("straße:1", "Die Straße"), Document("straße:0", "DIE STRASSE")]
    documents += [Document(f"boiler:{n:03d}", "Accept all cookies") for n in (7, 3, 99, 42, 5, 12)]
    return documents, corpus


def reference_kept(documents, casefold=True):
    """The smallest id per content, normalized here with str.split (independent of the module's regex)."""
    groups = {}
    for d in documents:
        text = unicodedata.normalize("NFC", d.text)
        key = " ".join((text.casefold() if casefold else text).split())
        groups.setdefault(key, []).append(d.id)
    return sorted(min(ids) for ids in groups.values())


@pytest.fixture(scope="module")
def run():
    documents, corpus = make_documents()
    pipeline = beam.Pipeline()
    created = pipeline | beam.Create(documents)
    result = created | exact_dedup.ExactDedup()
    kept = reference_kept(documents)
    assert_that(result.kept | beam.Map(operator.attrgetter("id")), equal_to(kept), label="kept")
    assert_that(result.dropped, equal_to([(d.id, "exact", "exact_duplicate") for d in documents if d.id not in kept]),
                label="dropped")
    case_sensitive = created | "case" >> exact_dedup.ExactDedup(exact_dedup.Options(casefold=False), label="case")
    assert_that(case_sensitive.kept | "case ids" >> beam.Map(operator.attrgetter("id")),
                equal_to(reference_kept(documents, casefold=False)), label="case kept")
    outcome = pipeline.run()
    outcome.wait_until_finish()
    counters = {c.key.step.split("/")[0] + ":" + c.key.metric.name: c.committed
                for c in outcome.metrics().query(MetricsFilter().with_namespace("data.prepare.exact"))["counters"]}
    return documents, corpus, kept, counters


def test_beam_equals_reference_grouping(run):
    """(assert_that inside the pipeline compared kept and dropped with the reference.)"""
    documents, _corpus, kept, counters = run
    assert counters["exact:documents"] == len(documents)
    assert counters["exact:groups"] == counters["exact:kept"] == len(kept)
    assert counters["exact:dropped"] == counters["exact:dropped.exact_duplicate"] == len(documents) - len(kept)


def test_the_planted_and_variant_copies_are_dropped(run):
    _documents, corpus, kept, _ = run
    kept = set(kept)
    for base, copy in corpus.exact:
        assert (base in kept) != (copy in kept) and min(base, copy) in kept
    assert {"faker:000", "faker:000:longer", "straße:0", "boiler:003"} <= kept
    assert not {"faker:000:variant", "straße:1", "boiler:007"} & kept


def test_normalization():
    assert exact_dedup.normalized("  Cafe\u0301\tAU  lait \n") == "café au lait"
    assert exact_dedup.content_key("Straße") == exact_dedup.content_key("STRASSE")
    assert exact_dedup.content_key("Straße", casefold=False) != exact_dedup.content_key("STRASSE", casefold=False)
    assert exact_dedup.content_key("a b") != exact_dedup.content_key("ab")
