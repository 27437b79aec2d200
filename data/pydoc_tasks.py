"""BERT task data sets that ship with lmlab, made from CPython's own documentation
(`pydoc_data.topics`, the reference pages `help()` shows), so that task fine-tuning runs need
no network. `data.tasks` reads them as the sources `pydoc_classification` and `pydoc_squad`
(written under the data directory on first use).

  * classification (`classification_records`): 24-word snippets of the string documentation
    (label "strings") and of the statement documentation (label "statements"), balanced and
    interleaved. Nothing in a snippet names its topic: the model must tell string methods and
    formatting from control flow by the words themselves.
  * extractive QA in the SQuAD format (`squad_records`), cloze style: the context is one prose
    paragraph (30 to 120 words) of a topic's section; the question is one of its sentences
    (the i-th paragraph's (i mod sentences)-th) with its longest word of at least five letters
    replaced by a blank ("Fill in the blank: ... _____ ..."); the answer is that word, at its
    place in the context. The model must find the question's sentence in the paragraph and
    point at the word the blank hides.

Splits: every `VALIDATION_EVERY`-th record is `validation`, the rest `train`; the same CPython
version gives the same records in the same order.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from pydoc_data.topics import topics

from data import pydoc_chat

# Two groups of topics; a snippet's label is its group.
STRINGS = ("string-methods", "formatstrings", "strings", "typesseq")
STATEMENTS = ("for", "while", "if", "try", "with", "function", "class", "compound", "import", "raise", "return",
              "assignment", "del", "global", "nonlocal", "pass", "break", "continue", "assert")
SNIPPET_WORDS = 24
PER_CLASS = 400  # snippets per label (the string topics hold about 450)
PARAGRAPH_WORDS = (30, 120)
VALIDATION_EVERY = 5
BLANK = "_____"
SOURCES = {"pydoc_classification": "classification", "pydoc_squad": "qa"}
_SENTENCE = re.compile(r"\S.*?(?:[.!?](?=\s+[A-Z\"*(])|$)", re.S)
_WORD = re.compile(r"(?<![\w\"*'])[A-Za-z]{5,}(?![\w\"*'])")


def _snippets(names: tuple[str, ...], count: int) -> list[str]:
    out = []
    for name in names:
        words = topics[name].split()
        out += [" ".join(words[i:i + SNIPPET_WORDS]) for i in range(0, len(words) - SNIPPET_WORDS, SNIPPET_WORDS)]
    return [out[i] for i in np.random.default_rng(0).permutation(len(out))[:count]]


def classification_records() -> list[dict]:
    """`{"text", "label"}` records, "strings" and "statements" alternating (see the module docstring)."""
    strings, statements = _snippets(STRINGS, PER_CLASS), _snippets(STATEMENTS, PER_CLASS)
    return [{"text": text, "label": label} for pair in zip(strings, statements)
            for text, label in zip(pair, ("strings", "statements"))]


def _paragraphs() -> list[str]:
    out = []
    for key in sorted(topics):
        for _, text in pydoc_chat._sections(topics[key]):
            for block in pydoc_chat._blocks(text):
                if not pydoc_chat._is_code(block):
                    prose = pydoc_chat._prose(block)
                    if PARAGRAPH_WORDS[0] <= len(prose.split()) <= PARAGRAPH_WORDS[1]:
                        out.append(prose)
    return list(dict.fromkeys(out))  # a paragraph some topics share, once


def squad_records() -> list[dict]:
    """SQuAD-format records `{"id", "question", "context", "answers": {"text", "answer_start"}}`
    (see the module docstring)."""
    records = []
    for i, context in enumerate(_paragraphs()):
        sentences = [m for m in _SENTENCE.finditer(context) if _WORD.search(m.group())]
        if not sentences:
            continue
        sentence = sentences[i % len(sentences)]
        words = list(_WORD.finditer(sentence.group()))
        word = max(words, key=lambda m: (len(m.group()), -m.start()))  # the longest, the first of those
        text = sentence.group()
        question = f"Fill in the blank: {text[:word.start()]}{BLANK}{text[word.end():]}"
        start = sentence.start() + word.start()
        assert context[start:start + len(word.group())] == word.group()
        records.append({"id": f"pydoc-{i}", "question": question, "context": context,
                        "answers": {"text": [word.group()], "answer_start": [start]}})
    return records


def split(records: list[dict], name: str) -> list[dict]:
    """The `train` or `validation` records (every VALIDATION_EVERY-th is validation)."""
    if name not in ("train", "validation"):
        raise ValueError(f"the pydoc task data have the splits train and validation, not {name!r}; fix "
                         "data.train_split / data.eval_split")
    return [r for i, r in enumerate(records) if (i % VALIDATION_EVERY == VALIDATION_EVERY - 1) == (name == "validation")]


def write_jsonl(source: str, directory: str) -> str:
    """Writes `source`'s splits as DIRECTORY/SOURCE_{train,validation}.jsonl (atomically: a
    reader never sees half a file, and several processes may write the same bytes at once).
    Returns the path with `{split}` in place of the split name."""
    if source not in SOURCES:
        raise ValueError(f"unknown pydoc task data {source!r}; expected one of {tuple(SOURCES)}")
    records = classification_records() if SOURCES[source] == "classification" else squad_records()
    pattern = os.path.join(directory, f"{source}_{{split}}.jsonl")
    os.makedirs(directory, exist_ok=True)
    for name in ("train", "validation"):
        path = pattern.replace("{split}", name)
        temporary = f"{path}.tmp.{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split(records, name))
        os.replace(temporary, path)
    return pattern
