"""Documents and their token chunks with overlap.

A document is split on the tokens of a tokenizer (the embedder's WordPiece, or any lmlab
`Tokenizer` that gives character offsets): chunk i holds tokens [i*stride, i*stride + window),
so consecutive chunks share `window - stride` tokens and the last chunk ends at the document's
end. Each chunk keeps its token span (`start`, `end`) and its character span (`char_start`,
`char_end`); its text is the document's characters over that span, so a retrieved chunk can be
located in its source exactly.

    docs = load_documents("embedded")                       # CPython's pydoc topics
    docs = load_documents("notes/*.md,faq.jsonl")           # files: .txt/.md one document each,
                                                            # .jsonl one per line ({"text", "id"?})
    chunks = chunk_documents(docs, embedder.tokenizer, window=128, stride=96)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterable, Sequence

DOCUMENT_FORMS = ("'embedded' (CPython's pydoc topics) or a comma-separated list of .txt, .md or .jsonl "
                  "files (globs allowed; .jsonl lines are objects with a 'text' and optionally an 'id')")
TEXT_SUFFIXES = (".txt", ".md")


@dataclasses.dataclass(frozen=True)
class Document:
    """A text with an id (unique in its collection) and the source it came from."""

    doc_id: str
    text: str
    source: str


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A window of a document: tokens [start, end) and characters [char_start, char_end)."""

    text: str
    doc_id: str
    source: str
    start: int
    end: int
    char_start: int = 0
    char_end: int = 0


def embedded_documents() -> list[Document]:
    """CPython's embedded documentation (`pydoc_data.topics`), one document per topic, sorted."""
    from pydoc_data.topics import topics

    return [Document(key, topics[key], "pydoc_data.topics") for key in sorted(topics)]


def _file_documents(path: str) -> list[Document]:
    if path.endswith(TEXT_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            return [Document(path, f.read(), path)]
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not JSON ({e}); each .jsonl line must be an object with 'text'") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{n} has no string 'text' field; each .jsonl line must be an object with "
                                 "'text' (and optionally 'id')")
            docs.append(Document(str(record.get("id", f"{path}:{n}")), record["text"], path))
    return docs


def load_documents(spec: str) -> list[Document]:
    """Documents named by `spec` (see `DOCUMENT_FORMS`).

    Args:
      spec: 'embedded', or comma-separated .txt/.md/.jsonl paths or globs.

    Returns:
      The documents, in the order given (files) or sorted by topic (embedded).
    """
    if spec == "embedded":
        return embedded_documents()
    paths = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise FileNotFoundError(f"the pattern {part!r} matches no file; give {DOCUMENT_FORMS}")
        paths += matches
    if not paths:
        raise ValueError(f"no documents named by {spec!r}; give {DOCUMENT_FORMS}")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"document file {path} does not exist; give {DOCUMENT_FORMS}")
        if not path.endswith((*TEXT_SUFFIXES, ".jsonl")):
            raise ValueError(f"document file {path} is not .txt, .md or .jsonl; give {DOCUMENT_FORMS}")
    docs = [doc for path in paths for doc in _file_documents(path)]
    seen = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise ValueError(f"document id {doc.doc_id!r} appears twice; ids must be unique across {spec!r}")
        seen.add(doc.doc_id)
    return docs


def token_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of a `num_tokens` document: starts 0, stride, ... until one
    reaches the end (no chunk lies wholly inside the one before it)."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"chunking needs window >= 1 and 1 <= stride <= window, got window={window} stride={stride}")
    spans, start = [], 0
    while True:
        spans.append((start, min(start + window, num_tokens)))
        if start + window >= num_tokens:
            return spans
        start += stride


def chunk_document(doc: Document, tokenizer, *, window: int, stride: int) -> list[Chunk]:
    """The chunks of one document (none for a document without tokens).

    Args:
      doc: the document.
      tokenizer: an lmlab `Tokenizer` with `encode_with_offsets`.
      window: tokens per chunk.
      stride: tokens between chunk starts (overlap = window - stride).

    Returns:
      Chunks in document order; their text is `doc.text[char_start:char_end]`.
    """
    _, offsets = tokenizer.encode_with_offsets(doc.text)
    if not offsets:
        return []
    chunks = []
    for start, end in token_spans(len(offsets), window, stride):
        char_start, char_end = offsets[start][0], max(o[1] for o in offsets[start:end])
        chunks.append(Chunk(doc.text[char_start:char_end], doc.doc_id, doc.source, start, end, char_start, char_end))
    return chunks


def chunk_documents(docs: Iterable[Document], tokenizer, *, window: int = 128, stride: int = 96) -> list[Chunk]:
    """All documents' chunks, in order (see `chunk_document`)."""
    token_spans(window, window, stride)  # validates before any tokenizing
    return [chunk for doc in docs for chunk in chunk_document(doc, tokenizer, window=window, stride=stride)]


def chunk_records(chunks: Sequence[Chunk]) -> list[dict]:
    """Chunks as JSON-able dicts (the index's metadata lines)."""
    return [dataclasses.asdict(c) for c in chunks]
