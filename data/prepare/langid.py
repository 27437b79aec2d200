"""Language identification with a keep-list: langid.py (Lui & Baldwin, 2012).

langid.py is a multinomial naive Bayes classifier over byte n-grams (1..4) selected for
being informative across languages and not across domains, trained on 97 languages. With
`norm_probs=True` it returns the posterior of its top language, normalized over the
candidate set:

    P(l | text) = exp(s_l) / sum_l' exp(s_l'),   s_l = log P(l) + sum_f count(f) log P(f | l)

A document is kept when its top language is in `--langid_keep` (comma-separated ISO 639-1
codes, default `en`) and that posterior is at least `--langid_min_prob`. Otherwise it is
dropped as `lang.<code>` (a confident other language: one counter per language, so the
report shows what the corpus held) or `low_confidence` (the top posterior below the minimum,
whatever the language).

Why `min_prob` = 0.5 by default: a posterior below one half means the model finds the text
more likely NOT to be its top language than to be it, so the keep-list cannot vouch for it.
In the measurements below no paragraph falls under it (the same precision and recall at any
min_prob up to 0.99); the sentences that do are short (4..9 words) or between close
languages (Danish read as Norwegian or Swedish).

`--langid_candidates` restricts the model to a subset of its languages (e.g. `en,de,fr`),
which removes confusions with languages the corpus cannot contain; empty means all 97.
Only the first `--langid_max_chars` characters are classified (the verdict of a long
document is settled long before its end, and the cost is linear in length).

The model (2.5 MB, packed) is loaded once per process, lazily, on first use, and is not pickled
with the stage (Beam ships the stage to workers; each worker loads its own copy).

Measured with `labelled_sample` and `evaluate`: English paragraphs of CPython's embedded
documentation (`pydoc_data.topics`) against Faker's per-locale lorem text in de, fr, es,
it, nl, pl, ru, cs, da and uk. Faker's lorem text is random words drawn from a per-language
word list, not natural prose (no syntax), so the numbers say how well the model tells the
languages' vocabularies apart, not how it does on real web text. Faker has no lorem word
list for some locales (pt_PT, sv_SE, en_GB, ... fall back to Latin), so those are not used.

Measured (seed 0, the defaults keep=en, min_prob=0.5): on paragraphs (60 per language, 660 in
all) the English keep-list's precision and recall are both 1.0 at any min_prob from 0 to
0.99; on single sentences (5..15 English words vs 8 lorem words, 100 per language) precision
0.990 and recall 0.970 (min_prob 0: 0.990 / 0.980; 0.8: 1.0 / 0.960).

    >>> from data.prepare.langid import LanguageId
    >>> language_id = LanguageId(LanguageId.Options(keep=("en",)))
    >>> language_id("The quick brown fox jumps over the lazy dog near the river bank.").reason
    ''
    >>> language_id("Der schnelle braune Fuchs springt über den faulen Hund am Flussufer.").reason
    'lang.de'
"""

import collections
import copy
import dataclasses
import functools
import random
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from data.prepare import stage

__all__ = [
    "FAKER_LOCALES",
    "LanguageId",
    "LanguageIdOptions",
    "Report",
    "english_paragraphs",
    "english_sentences",
    "evaluate",
    "labelled_sample",
]

# Faker locales with their own lorem word list, and the language code langid.py gives them.
FAKER_LOCALES = {"de_DE": "de", "fr_FR": "fr", "es_ES": "es", "it_IT": "it", "nl_NL": "nl",
                 "pl_PL": "pl", "ru_RU": "ru", "cs_CZ": "cs", "da_DK": "da", "uk_UA": "uk"}


@dataclasses.dataclass(frozen=True)
class LanguageIdOptions:
    keep: tuple = stage.field(("en",), "languages to keep, ISO 639-1 codes as langid.py names them")
    min_prob: float = stage.field(0.5, "minimum normalized probability of the top language; below "
                                       "it the document is dropped as low_confidence")
    candidates: tuple = stage.field((), "restrict the classifier to these languages (empty: all 97)")
    max_chars: int = stage.field(10000, "classify only the first this many characters")

    def __post_init__(self):
        if not self.keep:
            raise ValueError("--langid_keep is empty; give at least one language code, e.g. en")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"--langid_min_prob={self.min_prob} is not a probability; use 0..1")
        if self.max_chars < 1:
            raise ValueError(f"--langid_max_chars={self.max_chars} must be positive")
        known = set(_languages())
        for flag, codes in (("keep", self.keep), ("candidates", self.candidates)):
            unknown = sorted(set(codes) - known)
            if unknown:
                raise ValueError(f"--langid_{flag} names {','.join(unknown)}, which langid.py does "
                                 f"not know; its languages are {','.join(sorted(known))}")
        if self.candidates and set(self.keep) - set(self.candidates):
            missing = ",".join(sorted(set(self.keep) - set(self.candidates)))
            raise ValueError(f"--langid_keep has {missing}, not in --langid_candidates; "
                             f"add it there or the stage can never keep a document")


@functools.cache
def _languages() -> tuple[str, ...]:
    return tuple(_identifier(()).nb_classes)


@functools.cache
def _identifier(candidates: tuple[str, ...]):
    """The process's langid.py model (read-only once built; one per candidate set)."""
    if candidates:  # a copy of the full model, restricted (copying beats unpacking it again)
        identifier = copy.deepcopy(_identifier(()))
        identifier.set_languages(list(candidates))
        return identifier
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def classify(text: str, candidates: tuple[str, ...] = ()) -> tuple[str, float]:
    """langid.py's top language and its normalized probability."""
    language, probability = _identifier(tuple(candidates)).classify(text)
    return language, float(probability)


@dataclasses.dataclass(frozen=True)
class LanguageId(stage.DocumentStage):
    """Keeps documents confidently in a keep-listed language: see the module docstring."""

    name = "langid"
    Options = LanguageIdOptions
    options: LanguageIdOptions = dataclasses.field(default_factory=LanguageIdOptions)

    def __call__(self, text: str) -> stage.Outcome:
        language, probability = classify(text[: self.options.max_chars], self.options.candidates)
        if probability < self.options.min_prob:
            return stage.drop("low_confidence")
        if language not in self.options.keep:
            return stage.drop(f"lang.{language}")
        return stage.keep(text)


class Report(NamedTuple):
    """Per-language precision and recall of the stage's decision, and the confusion counts.

    precision[l]: of the documents the stage labelled l (confidently), the fraction truly l.
    recall[l]: of the documents truly l, the fraction the stage labelled l (confidently).
    confusion[(true, predicted)]: counts; predicted is "low_confidence" below min_prob.
    keep_precision / keep_recall: the same for the keep-list as one class (what the stage
    keeps vs the documents whose true language is in the keep-list).
    """

    precision: dict
    recall: dict
    confusion: collections.Counter
    keep_precision: float
    keep_recall: float
    total: int


def evaluate(stage_: LanguageId, sample: Iterable[tuple[str, str]]) -> Report:
    """Scores the stage on (text, true language) pairs.

    Args:
      stage_: the configured stage (its keep-list, min_prob and candidates are used).
      sample: (text, language code) pairs, e.g. from `labelled_sample`.

    Returns:
      A `Report`; a language never predicted has precision nan, never present recall nan.
    """
    options = stage_.options
    confusion = collections.Counter()
    for text, truth in sample:
        language, probability = classify(text[: options.max_chars], options.candidates)
        confusion[truth, language if probability >= options.min_prob else "low_confidence"] += 1
    truths = collections.Counter()
    predictions = collections.Counter()
    for (truth, predicted), n in confusion.items():
        truths[truth] += n
        predictions[predicted] += n
    languages = sorted(set(truths) | set(predictions) - {"low_confidence"})
    precision = {l: _ratio(confusion[l, l], predictions[l]) for l in languages}
    recall = {l: _ratio(confusion[l, l], truths[l]) for l in languages}
    keep = set(options.keep)
    kept = sum(n for (t, p), n in confusion.items() if p in keep)
    kept_right = sum(n for (t, p), n in confusion.items() if p in keep and t in keep)
    true_keep = sum(n for t, n in truths.items() if t in keep)
    return Report(precision, recall, confusion, _ratio(kept_right, kept),
                  _ratio(kept_right, true_keep), sum(truths.values()))


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def english_paragraphs(min_words: int = 20) -> list[str]:
    """Prose paragraphs of CPython's embedded documentation (no code, no grammar, no tables)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            lines = block.split("\n")
            if any(line.startswith(" ") for line in lines) or "*****" in block or "=====" in block:
                continue  # indented blocks are code, grammar or tables; underlines are headings
            paragraph = " ".join(line.strip() for line in lines)
            if len(paragraph.split()) >= min_words:
                paragraphs.append(paragraph)
    return paragraphs


def english_sentences(min_words: int = 5, max_words: int = 15) -> list[str]:
    """Sentences of `english_paragraphs()` with min_words..max_words words."""
    sentences = []
    for paragraph in english_paragraphs():
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            if min_words <= len(sentence.split()) <= max_words:
                sentences.append(sentence)
    return sentences


def labelled_sample(per_language: int, seed: int = 0, locales: Sequence[str] = tuple(FAKER_LOCALES),
                    unit: str = "paragraph") -> list[tuple[str, str]]:
    """A seeded labelled sample: `per_language` English texts from pydoc and Faker texts.

    English: a seeded choice (at most all of them) of `english_paragraphs()` (unit="paragraph") or of
    `english_sentences()` (unit="sentence", 5..15 words: the harder case). Other languages:
    `Faker(locale).paragraph(nb_sentences=5)` or `.sentence(nb_words=8)` (random words from the
    locale's lorem word list; Faker is a test extra of setup.py).

    Returns:
      (text, language code) pairs, English first.
    """
    try:
        from faker import Faker
    except ImportError as e:
        raise ImportError("labelled_sample needs Faker: pip install -e .[test]") from e
    unknown = [loc for loc in locales if loc not in FAKER_LOCALES]
    if unknown:
        raise ValueError(f"locales {unknown} have no Faker lorem word list of their own; "
                         f"use some of {sorted(FAKER_LOCALES)}")
    if unit not in ("paragraph", "sentence"):
        raise ValueError(f"unit={unit!r}; use paragraph or sentence")
    rng = random.Random(seed)
    english = english_paragraphs() if unit == "paragraph" else english_sentences()
    sample = [(text, "en") for text in rng.sample(english, min(per_language, len(english)))]
    for index, locale in enumerate(locales):
        fake = Faker(locale)
        fake.seed_instance(seed * 1000 + index)
        make = (lambda: fake.paragraph(nb_sentences=5)) if unit == "paragraph" else (
            lambda: fake.sentence(nb_words=8))
        sample += [(make(), FAKER_LOCALES[locale]) for _ in range(per_language)]
    return sample
