"""evals.metrics.porter equals the stemmer rouge-score uses (NLTK's PorterStemmer in its default
NLTK_EXTENSIONS mode) word by word: every word of CPython's pydoc topics, words built to hit each
rule's suffix and condition boundaries, and the paper's and NLTK's own examples."""

import pydoc_data.topics
import random
import re

import pytest
from nltk.stem.porter import PorterStemmer
from rouge_score import tokenizers

from evals.metrics import porter

NLTK = PorterStemmer()

# Every suffix a rule looks at, and the endings that make the conditions flip (*d, *o, y after a vowel).
SUFFIXES = ["ational", "tional", "enci", "anci", "izer", "bli", "abli", "alli", "entli", "eli", "ousli", "ization",
            "ation", "ator", "alism", "iveness", "fulness", "ousness", "aliti", "iviti", "biliti", "fulli", "logi",
            "icate", "ative", "alize", "iciti", "ical", "ful", "ness", "al", "ance", "ence", "er", "ic", "able",
            "ible", "ant", "ement", "ment", "ent", "sion", "tion", "ion", "ou", "ism", "ate", "iti", "ous", "ive",
            "ize", "e", "ll", "sses", "ies", "ss", "s", "eed", "ed", "ing", "y", "ied", "at", "bl", "iz", "ly", "yed",
            "ying", "lled", "ssed", "zzed", "ied", "ye", "wed", "xing"]


def _built_words(n=6000, seed=0):
    rng = random.Random(seed)
    letters = "aeiouy" + "bcdfglmnrstvwxzy" + "07"
    words = set()
    while len(words) < n:
        stem = "".join(rng.choice(letters) for _ in range(rng.randint(0, 6)))
        words.add(stem + rng.choice(SUFFIXES) + (rng.choice(SUFFIXES) if rng.random() < 0.3 else ""))
    return sorted(words)


def test_rouge_score_stems_with_nltk_porter_in_nltk_extensions_mode():
    stemmer = tokenizers.DefaultTokenizer(use_stemmer=True)._stemmer
    assert isinstance(stemmer, PorterStemmer) and stemmer.mode == PorterStemmer.NLTK_EXTENSIONS


def test_every_word_of_the_pydoc_topics_stems_as_nltk():
    text = " ".join(pydoc_data.topics.topics.values())
    words = sorted(set(re.findall(r"[a-z0-9]+", text.lower())))
    assert len(words) > 3000
    capitalized = [w.capitalize() for w in words[::7]] + [w.upper() for w in words[3::11]]
    mismatches = [(w, porter.stem(w), NLTK.stem(w)) for w in words + capitalized if porter.stem(w) != NLTK.stem(w)]
    assert not mismatches


def test_words_built_on_every_rule_stem_as_nltk():
    words = _built_words()
    mismatches = [(w, porter.stem(w), NLTK.stem(w)) for w in words if porter.stem(w) != NLTK.stem(w)]
    assert not mismatches
    # The built words reach every step: many lose a suffix, and stems of every length occur.
    assert sum(porter.stem(w) != w for w in words) > len(words) // 2


@pytest.mark.parametrize("word, expected", [
    # The 1980 paper's examples.
    ("caresses", "caress"), ("ponies", "poni"), ("cats", "cat"), ("feed", "feed"), ("agreed", "agre"),
    ("plastered", "plaster"), ("bled", "bled"), ("motoring", "motor"), ("sing", "sing"), ("conflated", "conflat"),
    ("troubled", "troubl"), ("sized", "size"), ("hopping", "hop"), ("falling", "fall"), ("hissing", "hiss"),
    ("filing", "file"), ("failing", "fail"), ("relational", "relat"), ("digitizer", "digit"),
    ("hopefulness", "hope"), ("adoption", "adopt"), ("replacement", "replac"), ("controll", "control"),
    ("roll", "roll"),
    # NLTK's extensions: irregular forms, four-letter -ies / -ied, y -> i after a consonant only,
    # "alli" stemmed twice, "logi" with the "l" in the stem, *o of a two-letter stem.
    ("skies", "sky"), ("dying", "die"), ("news", "news"), ("innings", "inning"), ("proceeding", "proceed"),
    ("ties", "tie"), ("died", "die"), ("spied", "spi"), ("happy", "happi"), ("enjoy", "enjoy"),
    ("conditionally", "condit"), ("geology", "geolog"), ("owed", "owe"), ("ore", "ore"),
    # Case, digits, runs of y, one- and two-letter words.
    ("Running", "run"), ("1990s", "1990"), ("yyyyyyyy", "yyyyyyyi"), ("syzygy", "syzygi"), ("is", "is"), ("é", "é"),
])
def test_documented_examples(word, expected):
    assert porter.stem(word) == expected == NLTK.stem(word)
