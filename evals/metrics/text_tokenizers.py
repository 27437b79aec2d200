"""BLEU's tokenizers, written by hand to split text exactly as sacrebleu 2.6.0's do.

  13a   mteval-v13a.pl, WMT's standard: unescapes &quot; &amp; &lt; &gt;, splits off ASCII
        punctuation, and splits `.` `,` from words but not inside numbers (1,000.5).
  intl  mteval-v14.pl's international tokenization: splits Unicode punctuation unless it sits
        between digits, and every Unicode symbol.
  zh    every CJK character (and, as in sacrebleu, much of U+2001..U+2A6D) becomes a token;
        the rest is split like 13a.
  char  every non-space character is a token.
  none  whitespace only.

Each tokenizer maps a string to its list of tokens (sacrebleu returns the tokens joined by
spaces, and BLEU splits them on whitespace: the same tokens).
"""

import re
import string
from collections.abc import Callable

import regex

# mteval-v13a's first rule puts spaces around every ASCII punctuation mark except ' , - .
# (its character ranges {-~ [-` space-& (-+ :-@ /); a per-character rule, so a table does it.
_13A_SPACED = str.maketrans({c: f" {c} " for c in string.punctuation if c not in "',-."})
# The remaining rules look at neighbours; re.sub's left-to-right, non-overlapping matching is part
# of their definition ("a.,5" keeps ",5" together), so they stay regular expressions.
_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([.,])")
_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")

# mteval-v14's international rules, on Unicode categories: N number, P punctuation, S symbol.
_INTL_RULES = (
    (regex.compile(r"(\P{N})(\p{P})"), r"\1 \2 "),
    (regex.compile(r"(\p{P})(\P{N})"), r" \1 \2"),
    (regex.compile(r"(\p{S})"), r" \1 "),
)

# The code points sacrebleu's zh tokenizer treats as Chinese characters. Two of its ranges are
# written as "\u20000".."\u2a6d6" and "\u2f800".."\u2fa1d": Python reads "\u2000" + "0", so by
# string comparison they cover U+2001..U+2A6D (general punctuation, currency, arrows, maths...)
# and U+2F81..U+2FA1, not CJK Extension B. We match what it does, not what it meant.
_ZH_RANGES = (
    (0x3400, 0x4DB5), (0x4E00, 0x9FA5), (0x9FA6, 0x9FBB), (0xF900, 0xFA2D), (0xFA30, 0xFA6A),
    (0xFA70, 0xFAD9), (0x2001, 0x2A6D), (0x2F81, 0x2FA1), (0xFF00, 0xFFEF), (0x2E80, 0x2EFF),
    (0x3000, 0x303F), (0x31C0, 0x31EF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF), (0x3100, 0x312F),
    (0x31A0, 0x31BF), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F), (0x2600, 0x26FF), (0x2700, 0x27BF),
    (0x3200, 0x32FF), (0x3300, 0x33FF),
)
_ZH_CHAR = re.compile("([" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _ZH_RANGES) + "])")


def _split_13a_punctuation(line: str) -> list[str]:
    """mteval-v13a's language-dependent rules (shared by 13a and zh)."""
    line = line.translate(_13A_SPACED)
    if "." in line or "," in line:
        line = _PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", line)
        line = _PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", line)
    if "-" in line:
        line = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", line)
    return line.split()


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a.pl's tokenization (sacrebleu's default)."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        # In this order: "&amp;lt;" becomes "<", "&amp;quot;" stays "&quot;".
        for escaped, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            line = line.replace(escaped, char)
    # The padding lets the period/comma rules see a non-digit at both ends of the line.
    return _split_13a_punctuation(f" {line} ")


def tokenize_intl(line: str) -> list[str]:
    """mteval-v14.pl's international tokenization (Unicode punctuation and symbols)."""
    for pattern, replacement in _INTL_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def tokenize_zh(line: str) -> list[str]:
    """Chinese: one token per CJK character, the rest as 13a (without its unescaping)."""
    return _split_13a_punctuation(_ZH_CHAR.sub(r" \1 ", line.strip()))


def tokenize_char(line: str) -> list[str]:
    """One token per character; whitespace separates but is no token."""
    return [c for c in line if not c.isspace()]


def tokenize_none(line: str) -> list[str]:
    """Whitespace-separated words, untouched."""
    return line.split()


TOKENIZERS: dict[str, Callable[[str], list[str]]] = {
    "13a": tokenize_13a,
    "intl": tokenize_intl,
    "zh": tokenize_zh,
    "char": tokenize_char,
    "none": tokenize_none,
}


def get_tokenizer(name: str) -> Callable[[str], list[str]]:
    """Returns the tokenizer called `name` (sacrebleu's `tokenize=` names).

    Args:
      name: one of "13a", "intl", "zh", "char", "none".

    Returns:
      A function from a string to its list of tokens.

    Raises:
      ValueError: for any other name.
    """
    if name not in TOKENIZERS:
        raise ValueError(
            f"unknown tokenize {name!r}; use one of {', '.join(TOKENIZERS)} "
            "(sacrebleu's ja-mecab, ko-mecab and spm tokenizers are not available)")
    return TOKENIZERS[name]
