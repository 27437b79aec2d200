"""The Porter stemmer that rouge-score stems with: NLTK's `PorterStemmer()` in its default
NLTK_EXTENSIONS mode (Porter 1980, with Martin Porter's later changes and NLTK's own).

What the extensions change from the 1980 paper:
  - a short table of irregular forms is looked up first ("skies" -> "sky", "dying" -> "die");
  - words of one or two letters are returned unchanged;
  - step 1a: "ies" of a four-letter word -> "ie" ("ties" -> "tie");
  - step 1b: "ied" -> "ie" in a four-letter word, "i" otherwise;
  - step 1c: "y" -> "i" only after a consonant that is not the whole stem ("happy", not "enjoy");
  - step 2: "bli" -> "ble" (the paper's "abli" -> "able"), "alli" -> "al" tried first and the
    result stemmed by step 2 again, "fulli" -> "ful", "logi" -> "log" with the "l" in the stem;
  - condition *o also holds for a two-letter vowel-consonant stem.

Only lower-case ASCII letters are vowels; any other character (digits) counts as a consonant.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

_VOWELS = frozenset("aeiou")

# word -> stem, looked up before any rule (NLTK's irregular forms)
_IRREGULAR = {
    "sky": "sky", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
    "exceed": "exceed", "succeed": "succeed",
}


def _consonant_flags(word: str) -> list[bool]:
    """True where word[i] is a consonant: not a vowel, and a "y" only when it follows a vowel
    (or starts the word)."""
    flags = []
    for i, ch in enumerate(word):
        flags.append(ch not in _VOWELS and (ch != "y" or i == 0 or not flags[i - 1]))
    return flags


def _measure(stem: str) -> int:
    """m of the form [C](VC)^m[V]: the number of vowel -> consonant transitions."""
    flags = _consonant_flags(stem)
    return sum(1 for before, after in itertools.pairwise(flags) if not before and after)


def _has_vowel(stem: str) -> bool:
    return not all(_consonant_flags(stem))


def _ends_double_consonant(word: str) -> bool:
    """Condition *d."""
    return len(word) >= 2 and word[-1] == word[-2] and _consonant_flags(word)[-1]


def _ends_cvc(word: str) -> bool:
    """Condition *o: consonant-vowel-consonant, the last not w, x or y (or a two-letter "vc")."""
    if len(word) == 2:
        flags = _consonant_flags(word)
        return not flags[0] and flags[1]
    if len(word) < 3:
        return False
    flags = _consonant_flags(word)
    return flags[-3] and not flags[-2] and flags[-1] and word[-1] not in "wxy"


def _m_above(k: int) -> Callable[[str], bool]:
    return lambda stem: _measure(stem) > k


def _first_suffix(word: str, rules, default_condition: Callable[[str], bool]) -> str:
    """Applies the rule of the first listed suffix that `word` ends with.

    The first suffix that matches decides: when its condition fails on the stem the word is
    returned unchanged, shorter suffixes further down the list are not tried.

    Args:
      word: the word.
      rules: (suffix, replacement) or (suffix, replacement, condition) tuples, in order.
      default_condition: the condition of rules that give none.

    Returns:
      The word with the rule applied, or unchanged.
    """
    for suffix, replacement, *condition in rules:
        if word.endswith(suffix):
            stem = word[:-len(suffix)]
            return stem + replacement if (condition[0] if condition else default_condition)(stem) else word
    return word


def _step1a(word: str) -> str:
    if len(word) == 4 and word.endswith("ies"):
        return word[:-1]
    for suffix, replacement in (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")):
        if word.endswith(suffix):
            return word[:-len(suffix)] + replacement
    return word


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-1] if len(word) == 4 else word[:-2]
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[:-len(suffix)]):
            stem = word[:-len(suffix)]
            break
    else:
        return word
    # The -e goes back on -at, -bl, -iz so that steps 2-4 see -ate, -ble, -ize.
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if _ends_double_consonant(stem):
        return stem if stem[-1] in "lsz" else stem[:-1]
    if _measure(stem) == 1 and _ends_cvc(stem):
        return stem + "e"
    return stem


def _step1c(word: str) -> str:
    if word.endswith("y"):
        stem = word[:-1]
        return stem + "i" if len(stem) > 1 and _consonant_flags(stem)[-1] else word
    return word


_STEP2 = (
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
    ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
    ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
    ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
    ("fulli", "ful"),
    # The "l" of "logi" stays with the stem, so short stems ("geo", "theo") have m > 0.
    ("logi", "log", lambda stem: _measure(stem + "l") > 0),
)
_STEP3 = (("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
          ("ness", ""))
_STEP4 = (
    ("al", ""), ("ance", ""), ("ence", ""), ("er", ""), ("ic", ""), ("able", ""), ("ible", ""), ("ant", ""),
    ("ement", ""), ("ment", ""), ("ent", ""),
    ("ion", "", lambda stem: _measure(stem) > 1 and stem[-1:] in ("s", "t")),
    ("ou", ""), ("ism", ""), ("ate", ""), ("iti", ""), ("ous", ""), ("ive", ""), ("ize", ""),
)


def _step2(word: str) -> str:
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        return _step2(word[:-2])
    return _first_suffix(word, _STEP2, _m_above(0))


def _step5(word: str) -> str:
    """Steps 5a (drop a final -e) and 5b (-ll -> -l)."""
    if word.endswith("e"):
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            word = stem
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]
    return word


@functools.lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """The stem of one word, lower-cased first (NLTK's `PorterStemmer().stem(word)`).

    Args:
      word: one word.

    Returns:
      Its stem.
    """
    lowered = word.lower()
    if lowered in _IRREGULAR:
        return _IRREGULAR[lowered]
    if len(word) <= 2:
        return lowered
    for step in (_step1a, _step1b, _step1c, _step2):
        lowered = step(lowered)
    lowered = _first_suffix(lowered, _STEP3, _m_above(0))
    lowered = _first_suffix(lowered, _STEP4, _m_above(1))
    return _step5(lowered)
