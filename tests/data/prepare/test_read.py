"""data.prepare.read in a Beam pipeline: the documents of text, JSONL, gzip and zstd files equal
those of the same files decompressed with Python's gzip / zstandard and read by data.builders
(the trainer's reader); unreadable files and bad JSONL lines go to the dead letter, counted,
without stopping the pipeline."""

import glob
import gzip
import json
import os

import apache_beam as beam
import pytest
import zstandard

from data import builders
from data.prepare import read

GOOD = {
    "plain.txt": "First paragraph,\nits second line.\n\n\n  \nSecond paragraph.\n\nThird: tabs\tand unicode é ∑.\n",
    "lines.jsonl": '{"text": "one"}\n\n{"text": "two \\u2028 separator", "meta": 1}\n{"text": "three"}\n',
    "packed.jsonl.gz": '{"text": "gzip one"}\n{"text": "gzip two"}\n',
    "story.txt.zst": "zstd paragraph one.\n\nzstd paragraph two.\n",
}
BAD_JSONL = '{"text": "kept"}\nnot json\n[1, 2]\n{"body": "no key"}\n{"text": 7}\n{"text": "also kept"}\n'


def _write(directory, name: str, text: str | bytes) -> str:
    path = os.path.join(directory, name)
    data = text.encode("utf-8") if isinstance(text, str) else text
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _reference(path: str, tmp_dir: str, split_paragraphs: bool) -> list[str]:
    """The file's documents: decompressed by Python, read by data.builders."""
    plain = os.path.join(tmp_dir, os.path.basename(path).removesuffix(".gz").removesuffix(".zst"))
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    with open(plain, "wb") as f:
        f.write(data)
    return list(builders.read_documents(plain, split_paragraphs=split_paragraphs).values())


@pytest.fixture(scope="module")
def read_run(tmp_path_factory):
    """One pipeline: the files read whole and cut into paragraphs, written back as JSON lines."""
    root = tmp_path_factory.mktemp("read")
    inputs, out = root / "in", root / "out"
    inputs.mkdir()
    paths = {name: _write(inputs, name, text) for name, text in GOOD.items()}
    paths["bad.jsonl"] = _write(inputs, "bad.jsonl", BAD_JSONL)
    paths["latin1.txt"] = _write(inputs, "latin1.txt", "ok line\n\nCaf\u00e9\n".encode("latin-1"))
    paths["corrupt.jsonl.gz"] = _write(inputs, "corrupt.jsonl.gz", b"")
    with open(paths["corrupt.jsonl.gz"], "wb") as f:
        f.write(gzip.compress(b"")[:10] + b"not a deflate stream at all" * 3)
    paths["notes.md"] = _write(inputs, "notes.md", "an unknown format\n")
    pipeline = beam.Pipeline()
    for label, split in (("whole", False), ("paragraphs", True)):
        outputs = pipeline | label >> read.ReadInputs([str(inputs / "*"), paths["plain.txt"]], "text", split)
        (outputs.documents | f"{label} json" >> beam.Map(lambda d: json.dumps(list(d)))
         | f"{label} write" >> beam.io.WriteToText(str(out / label / "docs")))
        outputs.dead_letter | f"{label} dead" >> beam.io.WriteToText(str(out / label / "dead"))
    result = pipeline.run()
    result.wait_until_finish()

    def lines(label, kind):
        return [json.loads(line) for p in sorted(glob.glob(str(out / label / f"{kind}*"))) for line in open(p)]

    return {"paths": paths, "tmp": str(root), "result": result,
            **{(label, kind): lines(label, kind) for label in ("whole", "paragraphs") for kind in ("docs", "dead")}}


@pytest.mark.parametrize("split_paragraphs", [False, True])
def test_documents_equal_the_builders_reading_of_the_decompressed_files(read_run, split_paragraphs):
    label = "paragraphs" if split_paragraphs else "whole"
    documents = dict(read_run[label, "docs"])
    assert len(documents) == len(read_run[label, "docs"])  # ids unique, the file matched twice read once
    for name in GOOD:
        path = read_run["paths"][name]
        got = [text for doc_id, text in sorted(documents.items()) if doc_id.rsplit(":", 1)[0] == path]
        assert got == _reference(path, read_run["tmp"], split_paragraphs or name.endswith(".jsonl")), name


def test_ids_are_path_and_zero_padded_record_index(read_run):
    ids = sorted(doc_id for doc_id, _ in read_run["paragraphs", "docs"])
    lines = read_run["paths"]["lines.jsonl"]
    # JSONL: the line index, blank lines counted; paragraphs: the paragraph index.
    assert [i for i in ids if i.startswith(lines)] == [f"{lines}:{n:09d}" for n in (0, 2, 3)]
    plain = read_run["paths"]["plain.txt"]
    assert [i for i in ids if i.startswith(plain)] == [f"{plain}:{n:09d}" for n in range(3)]


def test_bad_files_and_records_go_to_the_dead_letter(read_run):
    dead = read_run["whole", "dead"]
    by_file = {}
    for entry in dead:
        by_file.setdefault(entry["file"], []).append(entry)
    paths = read_run["paths"]
    assert set(by_file) == {paths["bad.jsonl"], paths["latin1.txt"], paths["corrupt.jsonl.gz"], paths["notes.md"]}
    assert [e["record"] for e in by_file[paths["bad.jsonl"]]] == [1, 2, 3, 4]
    assert "not valid JSON" in by_file[paths["bad.jsonl"]][0]["error"]
    assert "no key 'text'" in by_file[paths["bad.jsonl"]][2]["error"]
    assert "not valid UTF-8" in by_file[paths["latin1.txt"]][0]["error"]
    assert "zlib" in by_file[paths["corrupt.jsonl.gz"]][0]["error"]
    assert "unknown format" in by_file[paths["notes.md"]][0]["error"]
    kept = [text for doc_id, text in read_run["whole", "docs"] if doc_id.startswith(paths["bad.jsonl"])]
    assert sorted(kept) == ["also kept", "kept"]
    # A file that breaks partway keeps what was read before the fault: its first paragraph.
    before_fault = [text for doc_id, text in read_run["paragraphs", "docs"] if doc_id.startswith(paths["latin1.txt"])]
    assert before_fault == ["ok line"]


def test_counters_match_the_outputs(read_run):
    counters = {}
    for c in read_run["result"].metrics().query()["counters"]:
        if c.key.metric.namespace == read.NAMESPACE:
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed
    documents = read_run["whole", "docs"] + read_run["paragraphs", "docs"]
    assert counters["documents_out"] == len(documents)
    assert counters["bytes_out"] == sum(len(text.encode("utf-8")) for _, text in documents)
    assert counters["files"] == 2 * (len(GOOD) + 4)
    assert counters["dead_letter_files"] == 2 * 3  # latin1, corrupt gzip, unknown suffix
    assert counters["dead_letter_records"] == 2 * 4
