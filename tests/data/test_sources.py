"""Sources: builders write array_record files that read back the source texts; the
embedded split is disjoint and complete; every bad input fails with a message that names
it and the fix; `tfds:NAME` reads through `tfds.testing.mock_data` without TensorFlow."""

import glob
import json
import os
from pydoc_data.topics import topics

import pytest
import tensorflow_datasets as tfds

from data import builders, sources


def _read_split(builder, split):
    records = builder.as_data_source(split=split)
    return {r["key"].decode(): r["text"].decode() for r in (records[i] for i in range(len(records)))}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return builders.embedded_builder(str(tmp_path_factory.mktemp("tfds")))


def test_embedded_builder_writes_array_record_files(embedded):
    for split in ("train", "validation"):
        assert glob.glob(os.path.join(embedded.data_dir, f"*-{split}.array_record-*")), split


def test_embedded_split_is_disjoint_complete_and_about_five_percent(embedded):
    train, validation = _read_split(embedded, "train"), _read_split(embedded, "validation")
    assert not train.keys() & validation.keys()
    assert {**train, **validation} == topics  # every topic once, text unchanged
    held_bytes = sum(len(t.encode()) for t in validation.values())
    total_bytes = sum(len(t.encode()) for t in topics.values())
    assert 0.04 <= held_bytes / total_bytes <= 0.05


def test_holdout_split_is_deterministic_within_budget_and_keeps_both_sides():
    sizes = {f"doc{i}": 10 + (i * 37) % 100 for i in range(200)}
    held = builders.holdout_split(sizes, 0.1)
    assert held == builders.holdout_split(dict(reversed(sizes.items())), 0.1)
    held_bytes = sum(sizes[k] for k in held)
    assert 0.09 * sum(sizes.values()) <= held_bytes <= 0.1 * sum(sizes.values())
    # Documents larger than the budget: one is still held out, one still trained on.
    assert len(builders.holdout_split({"a": 100, "b": 200}, 0.05)) == 1


def test_text_files_builder_reads_back_txt_paragraphs_and_jsonl(tmp_path):
    whole = tmp_path / "whole.txt"
    whole.write_text("One document,\n\nblank line and all. é\n")
    paragraphs = tmp_path / "paras.txt"
    paragraphs.write_text("first paragraph\nline two\n\n\nsecond\n \t\nthird ✓")
    lines = tmp_path / "docs.jsonl"
    lines.write_text("\n".join(json.dumps({"id": i, "body": f"json doc {i}"}) for i in range(5)) + "\n")

    builder = builders.text_files_builder(
        [str(whole), str(lines)], str(tmp_path / "tfds"), text_key="body", validation_fraction=0.3
    )
    read = {**_read_split(builder, "train"), **_read_split(builder, "validation")}
    assert sorted(read.values()) == sorted([whole.read_text()] + [f"json doc {i}" for i in range(5)])
    assert f"{lines}:3" in read  # JSONL documents are keyed file:line

    builder = builders.text_files_builder([str(paragraphs)], str(tmp_path / "tfds"), split_paragraphs=True)
    train, validation = _read_split(builder, "train"), _read_split(builder, "validation")
    assert sorted([*train.values(), *validation.values()]) == ["first paragraph\nline two", "second", "third ✓"]
    assert train and validation and not train.keys() & validation.keys()


def test_files_spec_expands_globs(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / name).write_text("x")
    spec = sources.parse_source(f"files:{tmp_path}/*.txt, {tmp_path}/c.jsonl")
    assert spec.paths == (f"{tmp_path}/a.txt", f"{tmp_path}/b.txt", f"{tmp_path}/c.jsonl")
    with pytest.raises(FileNotFoundError, match=r"\*\.md.*matches no file"):
        sources.parse_source(f"files:{tmp_path}/*.md")


@pytest.mark.parametrize("spec", ["", "embeded", "files:", "files", "tfds:", "tfds:a:b:c", "hf:wikitext"])
def test_unknown_source_spec_lists_the_accepted_forms(spec):
    with pytest.raises(ValueError, match=r"unknown data source .*accepted forms: 'embedded'.*'files:PATH.*'tfds:NAME"):
        sources.parse_source(spec)


def _open_files(tmp_path, *paths, **options):
    spec = "files:" + ",".join(str(p) for p in paths)
    return sources.open_split(spec, "train", data_dir=str(tmp_path / "tfds"), **options)


def test_missing_file_is_named(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("text")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/nope\.txt does not exist; fix the path"):
        _open_files(tmp_path, ok, tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.txt", "", r"empty\.txt is empty"),
        ("blank.txt", "  \n\n ", r"blank\.txt holds no text"),
        ("empty_texts.jsonl", '{"text": ""}\n{"text": "  "}\n', r"empty_texts\.jsonl holds no text under key 'text'"),
        ("data.csv", "a,b", r"data\.csv has an unknown suffix; accepted: \.txt, \.jsonl"),
    ],
)
def test_files_without_text_are_named(tmp_path, name, content, fragment):
    ok = tmp_path / "ok.txt"
    ok.write_text("some text")
    bad = tmp_path / name
    bad.write_text(content)
    with pytest.raises(ValueError, match=fragment):
        _open_files(tmp_path, ok, bad)


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("some text")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("naïve café".encode() + " déjà".encode("latin-1"))
    offset = len("naïve café d".encode())  # the Latin-1 'é' of 'déjà'
    with pytest.raises(ValueError, match=rf"latin1\.txt is not valid UTF-8: byte offset {offset} .*re-encode"):
        _open_files(tmp_path, ok, bad)


def test_jsonl_line_without_the_key_names_file_line_and_keys(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"body": "x", "id": 3}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:3 has no key 'text'; its keys are \['body', 'id'\]"):
        _open_files(tmp_path, bad)
    bad.write_text('{"text": "fine"}\n{"text": "cut\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2 is not valid JSON"):
        _open_files(tmp_path, bad)


def test_single_document_cannot_be_split(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("only one document")
    with pytest.raises(ValueError, match=r"holds 1 document.*split_paragraphs=True"):
        _open_files(tmp_path, one)


def test_unprepared_or_unknown_tfds_dataset_says_how_to_fix(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"'imdb_reviews' is not prepared in the array_record format.*tfds build"
    ):
        sources.open_split("tfds:imdb_reviews", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"'tfds:no_such_dataset_xyz' names no registered TFDS dataset"):
        sources.open_split("tfds:no_such_dataset_xyz", "train", data_dir=str(tmp_path))


def test_tfds_source_reads_mocked_dataset_without_tensorflow(tmp_path):
    with tfds.testing.mock_data(num_examples=7):
        expected = tfds.data_source("imdb_reviews/plain_text", split="test", try_gcs=False)
        texts = sources.open_split("tfds:imdb_reviews:plain_text", "test", data_dir=str(tmp_path))
        assert len(texts) == 7
        assert list(texts) == [expected[i]["text"] for i in range(7)]
        assert all(isinstance(t, str) and t for t in texts)
        with pytest.raises(ValueError, match=r"no feature 'body'; its features are \['label', 'text'\]"):
            sources.open_split("tfds:imdb_reviews", "test", data_dir=str(tmp_path), text_key="body")


def test_jsonl_keeps_unicode_line_separators_inside_documents(tmp_path):
    # U+2028, U+2029, U+0085, \x0b, \x0c and \x1c are line breaks to str.splitlines but valid
    # (unescaped) characters inside a JSON string: only "\n" ends a JSONL line.
    texts = ["one\u2028line", "para\u2029graph", "next\u0085line", "tab\x0bff\x0cfs\x1cend", "crlf ending"]
    lines = tmp_path / "docs.jsonl"
    lines.write_bytes(("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n").encode())
    assert "\u2028" in lines.read_text(encoding="utf-8")  # written raw, not escaped
    documents = builders.read_documents(str(lines))
    assert list(documents.values()) == texts
    assert list(documents) == [f"{lines}:{i}" for i in range(1, 6)]
    builder = builders.text_files_builder([str(lines)], str(tmp_path / "tfds"), validation_fraction=0.3)
    read = {**_read_split(builder, "train"), **_read_split(builder, "validation")}
    assert sorted(read.values()) == sorted(texts)


def test_paragraphs_stream_like_the_blank_line_split(tmp_path):
    """Line-by-line paragraphs equal the old whole-file split on `\\n\\s*\\n` (CRLF folded)."""
    import re

    text = "first\r\npara  \r\n\r\n\n second\n \t \nthird\u2028still third\n\n\n\nlast\n"
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode())
    reference = [p.strip("\n") for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
    reference = [p for p in reference if p.strip()]
    assert list(builders.read_documents(str(path), split_paragraphs=True).values()) == reference
    whole = builders.read_documents(str(path))
    assert list(whole.values()) == [text]  # one document: the file byte for byte


def test_small_shards_write_the_same_splits_in_source_order(tmp_path, monkeypatch):
    """Preparing shard by shard (each re-reading the files from its first document) writes the
    same documents as one shard per split, in file order: what bounds memory changes nothing."""
    lines = tmp_path / "docs.jsonl"
    lines.write_text("\n".join(json.dumps({"text": f"document {i} " + "x" * (i % 50)}) for i in range(300)) + "\n\n")
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text("\n\n \n".join(f"paragraph {i}\nline" for i in range(100)))
    paths = [str(lines), str(paragraphs)]
    whole = builders.text_files_builder(paths, str(tmp_path / "a"), split_paragraphs=True, validation_fraction=0.1)
    monkeypatch.setattr(builders, "SHARD_BYTES", 300)
    sharded = builders.text_files_builder(paths, str(tmp_path / "b"), split_paragraphs=True, validation_fraction=0.1)
    assert sharded.info.splits["train"].num_shards > 10 and whole.info.splits["train"].num_shards == 1
    everything = {}
    for split in ("train", "validation"):
        a, b = _read_split(whole, split), _read_split(sharded, split)
        assert list(a.items()) == list(b.items())  # same documents, same order
        everything.update(a)
    expected = builders.read_documents(str(lines))
    expected.update(builders.read_documents(str(paragraphs), split_paragraphs=True))
    assert len(expected) == 400 and everything == expected
    keys = [*_read_split(sharded, "train")]
    assert keys == [k for k in expected if k in keys]  # source (file) order


def test_preparing_holds_one_shard_not_the_corpus(tmp_path, monkeypatch):
    """Python memory while preparing a JSONL corpus grows far slower than the corpus: the
    documents stream, and a shard (1 MB here) is the most written at once. Measured as the
    growth of the traced peak from a 3 MB to an 11 MB corpus, so fixed costs cancel."""
    import tracemalloc

    chunk = "".join(json.dumps({"text": f"doc {i} " + "lorem ipsum dolor " * 60}) + "\n" for i in range(1000))
    assert builders.SHARD_BYTES == 32 << 20  # the README's "about 32 MB"
    monkeypatch.setattr(builders, "SHARD_BYTES", 1 << 20)
    peaks, sizes = [], []
    for copies in (1, 3, 10):  # the first only warms tfds up (it loads its checksum tables once)
        lines = tmp_path / f"corpus{copies}.jsonl"
        lines.write_text(chunk * copies)
        tracemalloc.start()
        try:
            builder = builders.text_files_builder([str(lines)], str(tmp_path / "tfds"))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        sizes.append(lines.stat().st_size)
        splits = builder.info.splits
        assert splits["train"].num_examples + splits["validation"].num_examples == 1000 * copies
    assert splits["train"].num_shards > 5
    # Holding the text would grow the peak by at least the corpus growth (8 MB); streaming, it
    # grows by the per-document keys and sizes (73 bytes each, plus array growth) only.
    assert peaks[2] - peaks[1] < (sizes[2] - sizes[1]) / 2, (peaks, sizes)
