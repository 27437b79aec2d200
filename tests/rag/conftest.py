"""Fixtures shared by tests/rag: the MiniLM embedder (loaded once per session) and a small corpus
of embedded pydoc topics chunked and embedded once (about 150 chunks)."""

import pytest

from rag.chunk import chunk_documents, embedded_documents
from rag.embed import Embedder
from tests.minilm import minilm_path

TOPICS = ("assert", "break", "class", "continue", "del", "exprlists", "global", "if", "import", "pass", "raise",
          "return", "try", "while", "with")
WINDOW, STRIDE = 64, 48


@pytest.fixture(scope="session")
def embedder():
    return Embedder.load(minilm_path())


@pytest.fixture(scope="session")
def corpus(embedder):
    """(documents, chunks, vectors [N, 384]) of TOPICS, chunked WINDOW/STRIDE tokens."""
    docs = [d for d in embedded_documents() if d.doc_id in TOPICS]
    chunks = chunk_documents(docs, embedder.tokenizer, window=WINDOW, stride=STRIDE)
    return docs, chunks, embedder.encode([c.text for c in chunks])
