"""rag.chunk: token windows with overlap cover every token, chunks keep exact token and character
spans, documents load from txt/md/jsonl files and the embedded corpus, bad input is named."""

import json

import pytest

from data.tokenizer import load_tokenizer
from rag.chunk import Document, chunk_document, chunk_documents, embedded_documents, load_documents, token_spans
from tests.minilm import minilm_path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(minilm_path())


@pytest.mark.parametrize(("n", "window", "stride"), [(1, 4, 4), (10, 4, 4), (10, 4, 3), (11, 4, 3), (100, 16, 5),
                                                     (5, 8, 2), (17, 17, 1)])
def test_spans_cover_every_token_with_the_overlap_asked(n, window, stride):
    spans = token_spans(n, window, stride)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(end - start == window for start, end in spans[:-1]) and spans[-1][1] - spans[-1][0] <= window
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert s1 - s0 == stride and e0 - s1 == window - stride  # overlap, and no gap
    assert len(spans) == 1 or spans[-2][1] < n  # no chunk wholly inside the previous one


@pytest.mark.parametrize(("window", "stride"), [(0, 1), (4, 0), (4, 5)])
def test_bad_windows_are_refused(tokenizer, window, stride):
    with pytest.raises(ValueError, match="window"):
        chunk_documents([Document("d", "some text", "s")], tokenizer, window=window, stride=stride)


def test_chunks_keep_token_and_character_spans(tokenizer):
    doc = next(d for d in embedded_documents() if d.doc_id == "assert")
    ids, offsets = tokenizer.encode_with_offsets(doc.text)
    chunks = chunk_document(doc, tokenizer, window=32, stride=24)
    assert len(chunks) == len(token_spans(len(ids), 32, 24)) > 3
    for chunk in chunks:
        assert chunk.text == doc.text[chunk.char_start:chunk.char_end]
        assert chunk.char_start == offsets[chunk.start][0] and chunk.char_end == offsets[chunk.end - 1][1]
        assert tokenizer.encode(chunk.text) == ids[chunk.start:chunk.end]  # the window's tokens, re-encoded
        assert (chunk.doc_id, chunk.source) == ("assert", "pydoc_data.topics")
    assert chunk_document(Document("e", "  \n ", "s"), tokenizer, window=8, stride=8) == []


def test_documents_from_files_and_the_embedded_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text file.")
    (tmp_path / "b.md").write_text("# Title\n\nMarkdown body.")
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "q1", "text": "first"}) + "\n\n"
                                      + json.dumps({"text": "second"}) + "\n")
    docs = load_documents(f"{tmp_path}/*.txt,{tmp_path}/b.md, {tmp_path}/c.jsonl")
    assert [(d.doc_id, d.text) for d in docs] == [
        (f"{tmp_path}/a.txt", "Plain text file."), (f"{tmp_path}/b.md", "# Title\n\nMarkdown body."),
        ("q1", "first"), (f"{tmp_path}/c.jsonl:3", "second")]
    embedded = load_documents("embedded")
    from pydoc_data.topics import topics

    assert [d.doc_id for d in embedded] == sorted(topics) and embedded[0].text == topics[embedded[0].doc_id]


def test_bad_document_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_documents(str(tmp_path / "*.md"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="not .txt, .md or .jsonl"):
        load_documents(str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 has no string 'text'"):
        load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "dup.jsonl").write_text('{"id": "1", "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        load_documents(str(tmp_path / "dup.jsonl"))
