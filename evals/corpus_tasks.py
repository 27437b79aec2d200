"""Evaluation tasks made from the embedded corpus (CPython's documentation, `pydoc_data.topics`),
so that a model can be evaluated with nothing downloaded.

The `test` split is made from the topics the `embedded` training source holds out as its
validation split (`data.builders.holdout_split` at validation_fraction 0.05, the data config's
default), so a model trained on `embedded` is scored on text it did not train on; the `train`
split (few-shot examples) from the others. The same CPython version gives the same documents.

  * `continuation` (multiple choice, HellaSwag-like): a prose sentence of at least
    `MIN_WORDS` words, cut after its first half; the context is the paragraph's previous
    sentence (if any) and that half, the choices are the sentence's true ending and the
    endings of `CHOICES - 1` other sentences of the split, in a seeded order.
    {"topic", "query", "choices", "gold"}.
  * `cloze` (loglikelihood, LAMBADA-like): a prose paragraph of at least `MIN_WORDS` words
    whose last word is a word of letters; the context is the paragraph up to that word, the
    target the word with its leading space (its final punctuation dropped). {"topic",
    "context", "target"}.
  * `documents` (rolling perplexity): each topic's whole text. {"topic", "text"}.
"""

from __future__ import annotations

import functools
import random
import re

from data import builders, pydoc_chat

VALIDATION_FRACTION = 0.05  # data.pipeline's default: the held-out topics of `embedded`
MIN_WORDS = 10
CHOICES = 4
_SENTENCE = re.compile(r"\S.*?(?:[.!?](?=\s+[A-Z\"*(])|$)")
_UNDERLINE = re.compile(r"^\s*([=\-*~^])\1+\s*$", re.MULTILINE)
_LAST_WORD = re.compile(r"\s([A-Za-z]{3,})[.!?]?$")


@functools.lru_cache(maxsize=2)
def _topics(split: str) -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    held = builders.holdout_split({k: len(v.encode("utf-8")) for k, v in topics.items()}, VALIDATION_FRACTION)
    return tuple((k, topics[k]) for k in sorted(topics) if (k in held) == (split == "test"))


def _paragraphs(split: str) -> list[tuple[str, str]]:
    """(topic, paragraph) of every prose block (not code, not a heading), whitespace collapsed."""
    return [(key, pydoc_chat._prose(block)) for key, text in _topics(split) for block in pydoc_chat._blocks(text)
            if not pydoc_chat._is_code(block) and not _UNDERLINE.search(block)]


def continuation_docs(split: str) -> list[dict]:
    """The `continuation` task's documents (see the module docstring)."""
    items = []  # (topic, previous sentence, first half, ending)
    for topic, paragraph in _paragraphs(split):
        sentences = [m.group() for m in _SENTENCE.finditer(paragraph)]
        for i, sentence in enumerate(sentences):
            words = sentence.split()
            if len(words) >= MIN_WORDS:
                half = len(words) // 2
                items.append((topic, sentences[i - 1] if i else "", " ".join(words[:half]), " ".join(words[half:])))
    endings = [ending for *_, ending in items]
    docs = []
    for n, (topic, previous, start, ending) in enumerate(items):
        rng = random.Random(f"continuation/{split}/{n}")
        others = [e for e in dict.fromkeys(rng.sample(endings, min(len(endings), 3 * CHOICES))) if e != ending]
        choices = [ending, *others[:CHOICES - 1]]
        rng.shuffle(choices)
        docs.append({"topic": topic, "query": f"{previous} {start}".strip(), "choices": choices,
                     "gold": choices.index(ending)})
    return docs


def cloze_docs(split: str) -> list[dict]:
    """The `cloze` task's documents (see the module docstring)."""
    docs = []
    for topic, paragraph in _paragraphs(split):
        last = _LAST_WORD.search(paragraph)
        if last and len(paragraph.split()) >= MIN_WORDS:
            docs.append({"topic": topic, "context": paragraph[:last.start()], "target": " " + last.group(1)})
    return docs


def documents(split: str) -> list[dict]:
    """The `documents` task's documents: each topic's text."""
    return [{"topic": key, "text": text} for key, text in _topics(split)]


def docs(kind: str, split: str) -> list[dict]:
    """The documents of `kind` (continuation | cloze | documents) in `split` (test | train)."""
    return {"continuation": continuation_docs, "cloze": cloze_docs, "documents": documents}[kind](split)
