"""Quality filters: C4's line rules (Raffel et al. 2020) and Gopher's rules (Rae et al. 2021, app. A).

First C4's line filter rewrites the text (`--quality_c4_lines`, on by default), then every
rule below is checked in order on what remains; the first that fails drops the document with
its reason (one counter per rule, `dropped.<reason>` under `data.prepare.quality`). Every
threshold is an option `--quality_<field>`.

Definitions. words: `text.split()`. lines: the non-blank lines, stripped. paragraphs: the
non-blank blocks between blank lines, stripped. "chars" of a set of words: the sum of their
lengths (white space not counted). An n-gram: n consecutive words.

C4 (rules on "lines": by default paragraphs, see below):

| reason / count        | rule                                                                | option                 |
|-----------------------|---------------------------------------------------------------------|------------------------|
| lines_removed (count) | a line is removed unless it has >= 3 words, ends in `. ! ? "` (not  | c4_min_words_per_line  |
|                       | an ellipsis), and mentions neither "javascript" nor cookie / terms  |                        |
|                       | / privacy-policy boilerplate                                       |                        |
| c4_lorem_ipsum        | a kept line contains "lorem ipsum"                                  | c4_lines               |
| c4_curly_bracket      | a kept line contains `{` (code)                                     | c4_lines               |
| c4_too_few_sentences  | fewer than 5 sentences (`. ! ?` then white space or end) remain     | c4_min_sentences       |

C4 also drops pages with a "bad words" list; that list is not part of this repository and
not applied. C4's unit is a line of text, because its web pages put a paragraph on one line.
Hard-wrapped text (one sentence over several lines, like CPython's embedded documentation)
loses most of its lines to the punctuation rule that way, so by default the rules apply to
blank-line separated paragraphs, each joined into one line (`--quality_c4_unit=paragraph`;
HTML stripped by `normalize` ends its paragraphs with blank lines, and a menu of `<li>` items
is one paragraph without terminal punctuation, removed). `--quality_c4_unit=line` is C4's.
Measured on the 79 topics of `pydoc_data.topics` (CPython 3.11, after `normalize`): 45 pass
with the defaults (dropped: 15 c4_too_few_sentences, 8 dup_5gram, 7 c4_curly_bracket,
3 too_few_words, 1 alpha_words), 30 with c4_unit=line (35 c4_too_few_sentences), 62 without
the C4 rules (c4_lines=false; 8 dup_5gram, 5 too_few_words, 4 alpha_words). Gopher's own
defaults are kept: the 8 dup_5gram topics are reference text that repeats a phrase per item
("... operation can be customized using the special method ...", "the body of a coroutine
function" five times each) and alpha_words drops the grammar of integer literals.

Gopher (Rae et al. 2021, appendix A.1.1):

| reason                 | the document is dropped when                                       | default      |
|------------------------|--------------------------------------------------------------------|--------------|
| too_few_words          | words < min_words (or no words at all)                             | 50           |
| too_many_words         | words > max_words                                                  | 100,000      |
| mean_word_length       | mean word length (chars / words) outside [min, max]                | [3, 10]      |
| hash_ratio             | count of `#` / words > max                                         | 0.1          |
| ellipsis_ratio         | count of `...` and `…` / words > max                               | 0.1          |
| bullet_lines           | fraction of lines starting with a bullet (`•-*‣◦▪●–`) > max        | 0.9          |
| ellipsis_lines         | fraction of lines ending in `...` or `…` > max                     | 0.3          |
| alpha_words            | fraction of words with an alphabetic character < min               | 0.8          |
| stop_words             | distinct words of {the, be, to, of, and, that, have, with} < min   | 2            |
| dup_line_fraction      | lines equal to an earlier line / lines > max                       | 0.3          |
| dup_paragraph_fraction | paragraphs equal to an earlier paragraph / paragraphs > max        | 0.3          |
| dup_line_chars         | chars of those duplicate lines / chars of all lines > max           | 0.2          |
| dup_paragraph_chars    | chars of those duplicate paragraphs / chars of all paragraphs > max | 0.2          |
| top_{2,3,4}gram        | chars of the most frequent n-gram x its count / word chars > max   | .20 .18 .16  |
|                        | (only an n-gram occurring at least twice counts; of equally        |              |
|                        | frequent ones, the one with the most characters)                   |              |
| dup_{5..10}gram        | chars of the words covered by some n-gram occurring 2+ times (all  | .15 .14 .13  |
|                        | its occurrences, overlaps once) / word chars > max                 | .12 .11 .10  |

Stop words are matched lowercased with surrounding punctuation stripped.

    >>> from data.prepare.quality import QualityFilter
    >>> QualityFilter(QualityFilter.Options())("Buy now!\\nBuy now!\\nBuy now!").reason
    'c4_too_few_sentences'
"""

import collections
import dataclasses
import re
import string

from data.prepare import stage

__all__ = ["BULLETS", "STOP_WORDS", "QualityFilter", "QualityOptions", "c4_filter_lines"]

BULLETS = ("•", "-", "*", "‣", "◦", "▪", "●", "–")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
TERMINAL_PUNCTUATION = (".", "!", "?", '"')
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
TOP_NGRAM_SIZES = (2, 3, 4)
DUP_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)


@dataclasses.dataclass(frozen=True)
class QualityOptions:
    c4_lines: bool = stage.field(True, "apply C4's line filter and page rules (lorem ipsum, curly "
                                       "bracket, minimum sentences)")
    c4_unit: str = stage.field("paragraph", "what C4's line rules apply to: paragraph (blank-line "
                                            "separated, for hard-wrapped text) or line (C4's own)")
    c4_min_words_per_line: int = stage.field(3, "C4: a line with fewer words is removed")
    c4_min_sentences: int = stage.field(5, "C4: a page with fewer sentences left is dropped")
    min_words: int = stage.field(50, "Gopher: fewest words")
    max_words: int = stage.field(100_000, "Gopher: most words")
    min_mean_word_length: float = stage.field(3.0, "Gopher: smallest mean word length")
    max_mean_word_length: float = stage.field(10.0, "Gopher: largest mean word length")
    max_hash_ratio: float = stage.field(0.1, "Gopher: most '#' per word")
    max_ellipsis_ratio: float = stage.field(0.1, "Gopher: most '...' or '…' per word")
    max_bullet_lines: float = stage.field(0.9, "Gopher: largest fraction of lines starting with a bullet")
    max_ellipsis_lines: float = stage.field(0.3, "Gopher: largest fraction of lines ending in an ellipsis")
    min_alpha_words: float = stage.field(0.8, "Gopher: smallest fraction of words with a letter")
    min_stop_words: int = stage.field(2, "Gopher: fewest distinct stop words present")
    max_dup_line_fraction: float = stage.field(0.3, "Gopher: largest fraction of duplicate lines")
    max_dup_paragraph_fraction: float = stage.field(0.3, "Gopher: largest fraction of duplicate paragraphs")
    max_dup_line_chars: float = stage.field(0.2, "Gopher: largest character fraction in duplicate lines")
    max_dup_paragraph_chars: float = stage.field(0.2, "Gopher: largest character fraction in duplicate "
                                                      "paragraphs")
    max_top_2gram_chars: float = stage.field(0.20, "Gopher: largest character fraction of the top 2-gram")
    max_top_3gram_chars: float = stage.field(0.18, "Gopher: largest character fraction of the top 3-gram")
    max_top_4gram_chars: float = stage.field(0.16, "Gopher: largest character fraction of the top 4-gram")
    max_dup_5gram_chars: float = stage.field(0.15, "Gopher: largest character fraction in duplicate 5-grams")
    max_dup_6gram_chars: float = stage.field(0.14, "Gopher: largest character fraction in duplicate 6-grams")
    max_dup_7gram_chars: float = stage.field(0.13, "Gopher: largest character fraction in duplicate 7-grams")
    max_dup_8gram_chars: float = stage.field(0.12, "Gopher: largest character fraction in duplicate 8-grams")
    max_dup_9gram_chars: float = stage.field(0.11, "Gopher: largest character fraction in duplicate 9-grams")
    max_dup_10gram_chars: float = stage.field(0.10, "Gopher: largest character fraction in duplicate "
                                                    "10-grams")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (bool, str)) and value < 0:
                raise ValueError(f"--quality_{f.name}={value} is negative; thresholds are counts or "
                                 f"fractions, >= 0")
        if self.c4_unit not in ("line", "paragraph"):
            raise ValueError(f"--quality_c4_unit={self.c4_unit!r}; use line or paragraph")
        if self.min_words > self.max_words:
            raise ValueError(f"--quality_min_words={self.min_words} exceeds --quality_max_words="
                             f"{self.max_words}")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError("--quality_min_mean_word_length exceeds --quality_max_mean_word_length")


# --- C4 -------------------------------------------------------------------------------------

def _c4_keeps(line: str, min_words: int) -> bool:
    lowered = line.lower()
    return (len(line.split()) >= min_words
            and line.endswith(TERMINAL_PUNCTUATION) and not line.endswith("...")
            and "javascript" not in lowered
            and not any(p in lowered for p in POLICY_SUBSTRINGS))


def c4_filter_lines(text: str, min_words: int = 3, unit: str = "line") -> tuple[str, int]:
    """C4's line filter: the kept units joined (by newlines), and how many were removed.

    A unit (a line, or with unit="paragraph" a blank-line-separated paragraph, its lines
    joined by spaces) is kept when it has >= `min_words` words, ends in terminal punctuation
    (not an ellipsis) and has no "javascript" or policy boilerplate.
    """
    if unit == "paragraph":
        units = [" ".join(p.split()) for p in _PARAGRAPH_BREAK.split(text)]
        separator = "\n\n"
    else:
        units = [line.strip() for line in text.split("\n")]
        separator = "\n"
    units = [u for u in units if u]
    kept = [u for u in units if _c4_keeps(u, min_words)]
    return separator.join(kept), len(units) - len(kept)


def _c4_page_reason(text: str, options: QualityOptions) -> str:
    lowered = text.lower()
    if "lorem ipsum" in lowered:
        return "c4_lorem_ipsum"
    if "{" in text:
        return "c4_curly_bracket"
    if len(_SENTENCE_END.findall(text)) < options.c4_min_sentences:
        return "c4_too_few_sentences"
    return ""


# --- Gopher ---------------------------------------------------------------------------------

def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _duplicates(items: list[str]) -> tuple[float, float]:
    """(fraction of items equal to an earlier item, their characters / all characters)."""
    seen, duplicate_items, duplicate_chars = set(), 0, 0
    for item in items:
        if item in seen:
            duplicate_items += 1
            duplicate_chars += len(item)
        seen.add(item)
    total_chars = sum(map(len, items))
    return duplicate_items / max(len(items), 1), duplicate_chars / max(total_chars, 1)


def _top_ngram_chars(words: list[str], n: int, word_chars: int) -> float:
    counts = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0.0
    # The most frequent n-gram; of equally frequent ones, the longest (ties must not depend on
    # the order the n-grams were seen in).
    ngram, count = max(counts.items(), key=lambda item: (item[1], sum(map(len, item[0]))))
    return sum(map(len, ngram)) * count / word_chars if count > 1 else 0.0


def _dup_ngram_chars(words: list[str], n: int, word_chars: int) -> float:
    starts = collections.defaultdict(list)
    for i in range(len(words) - n + 1):
        starts[tuple(words[i:i + n])].append(i)
    covered = [False] * len(words)
    for positions in starts.values():
        if len(positions) > 1:
            for i in positions:
                covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / word_chars


def _gopher_reason(text: str, o: QualityOptions) -> str:
    words = text.split()
    if len(words) < max(o.min_words, 1):  # no words at all: nothing to measure
        return "too_few_words"
    if len(words) > o.max_words:
        return "too_many_words"
    word_chars = sum(map(len, words))
    if not o.min_mean_word_length <= word_chars / len(words) <= o.max_mean_word_length:
        return "mean_word_length"
    if text.count("#") / len(words) > o.max_hash_ratio:
        return "hash_ratio"
    if (text.count("...") + text.count("…")) / len(words) > o.max_ellipsis_ratio:
        return "ellipsis_ratio"
    lines = _lines(text)
    if sum(line.startswith(BULLETS) for line in lines) / len(lines) > o.max_bullet_lines:
        return "bullet_lines"
    if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > o.max_ellipsis_lines:
        return "ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / len(words) < o.min_alpha_words:
        return "alpha_words"
    present = {w.strip(string.punctuation).lower() for w in words} & set(STOP_WORDS)
    if len(present) < o.min_stop_words:
        return "stop_words"
    return _repetition_reason(words, word_chars, lines, _paragraphs(text), o)


def _repetition_reason(words, word_chars, lines, paragraphs, o: QualityOptions) -> str:
    line_fraction, line_chars = _duplicates(lines)
    paragraph_fraction, paragraph_chars = _duplicates(paragraphs)
    if line_fraction > o.max_dup_line_fraction:
        return "dup_line_fraction"
    if paragraph_fraction > o.max_dup_paragraph_fraction:
        return "dup_paragraph_fraction"
    if line_chars > o.max_dup_line_chars:
        return "dup_line_chars"
    if paragraph_chars > o.max_dup_paragraph_chars:
        return "dup_paragraph_chars"
    for n in TOP_NGRAM_SIZES:
        if _top_ngram_chars(words, n, word_chars) > getattr(o, f"max_top_{n}gram_chars"):
            return f"top_{n}gram"
    for n in DUP_NGRAM_SIZES:
        if _dup_ngram_chars(words, n, word_chars) > getattr(o, f"max_dup_{n}gram_chars"):
            return f"dup_{n}gram"
    return ""


@dataclasses.dataclass(frozen=True)
class QualityFilter(stage.DocumentStage):
    """C4's line filter, then C4's page rules and Gopher's rules: see the module docstring."""

    name = "quality"
    Options = QualityOptions
    options: QualityOptions = dataclasses.field(default_factory=QualityOptions)

    def __call__(self, text: str) -> stage.Outcome:
        o = self.options
        lines_removed = 0
        if o.c4_lines:
            text, lines_removed = c4_filter_lines(text, o.c4_min_words_per_line, o.c4_unit)
            reason = _c4_page_reason(text, o)
            if reason:
                return stage.drop(reason, lines_removed=lines_removed)
        reason = _gopher_reason(text, o)
        if reason:
            return stage.drop(reason, lines_removed=lines_removed)
        return stage.keep(text, lines_removed=lines_removed)
