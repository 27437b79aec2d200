"""A retrieval question set with known answer paragraphs, made mechanically from the embedded corpus.

Source: CPython's `pydoc_data.topics` (the `embedded` documents, one per topic). Each topic's text
splits into blocks at blank lines; a prose block (not indented code, not a heading underline) is a
paragraph. Every sentence of a paragraph that *defines* something,

    "[The|A|An] SUBJECT is|are REST."        e.g. "Private names are transformed to a longer form ..."

becomes the question "What is|are [the|a|an] SUBJECT?" ("What are Private names?"), whose answer
paragraph is that paragraph, known by its topic and character span. The SUBJECT must be 2-8 words,
without a comma, and not start with a pronoun or a conjunction ("It is", "If the primary is", "When
a name is" give no question) nor point elsewhere ("the following methods", "this"); a subject asked in two places is dropped (the answer would be
ambiguous). A retrieved chunk answers a question when it comes from the question's topic and its
character span overlaps the answer paragraph's.

    questions = make_questions()                   # [Question(text, doc_id, char_start, char_end, sentence)]
    correct = answers(question, hit.chunk)
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

_BLOCK = re.compile(r"(?:[^\n]|\n(?!\s*\n))+")  # text between blank lines
_UNDERLINE = re.compile(r"^\s*[=\-*~^]{3,}\s*$", re.MULTILINE)
_SENTENCE = re.compile(r"[^.!?]+[.!?](?=\s|$)")
_DEFINITION = re.compile(r"^\s*((?:The|A|An) )?([A-Za-z\"*][^,;:]{2,80}?) (is|are) (\S.{8,})[.!?]$", re.DOTALL)
_NOT_SUBJECTS = frozenset(
    "it this that these those they there which what who when whenever if for as because since although though "
    "unless while where so but and or in on at to of with by from each every otherwise note however then thus "
    "here such both all one".split())
# Words that make a subject point elsewhere ("the following methods", "the exact behavior").
_VAGUE = frozenset("this these that those following above below such other same exact result case".split())
MIN_WORDS, MAX_WORDS = 2, 8


@dataclasses.dataclass(frozen=True)
class Question:
    """A question and where its answer paragraph lies: topic `doc_id`, chars [char_start, char_end)."""

    text: str
    doc_id: str
    char_start: int
    char_end: int
    sentence: str  # the definition sentence it was made from


def paragraphs(text: str) -> list[tuple[int, int]]:
    """Character spans of the prose blocks of a topic (no indented code, no headings)."""
    spans = []
    for match in _BLOCK.finditer(text):
        block = match.group()
        if block.strip() and not block.startswith("   ") and not _UNDERLINE.search(block):
            spans.append((match.start(), match.end()))
    return spans


def definition_question(sentence: str) -> str | None:
    """'What is|are [the|a|an] SUBJECT?' for a defining sentence, else None (see the module docstring)."""
    match = _DEFINITION.match(sentence)
    if not match:
        return None
    article, subject, verb = match.group(1) or "", match.group(2).strip(), match.group(3)
    words = subject.split()
    if (not MIN_WORDS <= len(words) <= MAX_WORDS or words[0].lower() in _NOT_SUBJECTS
            or _VAGUE & {w.lower().strip('"*') for w in words}):
        return None
    return f"What {verb} {article.lower()}{subject}?"


def make_questions(topics: dict[str, str] | None = None) -> list[Question]:
    """The question set of `topics` (default: all of `pydoc_data.topics`), in topic order.

    Returns:
      Questions, each with a distinct text.
    """
    if topics is None:
        from pydoc_data.topics import topics
    found = []
    for doc_id in sorted(topics):
        text = topics[doc_id]
        for start, end in paragraphs(text):
            prose = " ".join(line.strip() for line in text[start:end].splitlines())
            for sentence in _SENTENCE.findall(prose):
                question = definition_question(sentence.strip())
                if question:
                    found.append(Question(question, doc_id, start, end, sentence.strip()))
    counts = Counter(q.text for q in found)
    return [q for q in found if counts[q.text] == 1]


def answers(question: Question, chunk) -> bool:
    """Whether a chunk holds (part of) the question's answer paragraph."""
    return chunk.doc_id == question.doc_id and chunk.char_start < question.char_end and \
        chunk.char_end > question.char_start
