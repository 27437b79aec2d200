"""Reading raw input files into `Document`s, in Beam; what cannot be read goes to a dead letter.

    patterns -> fileio.MatchAll -> distinct paths -> Reshuffle (files spread over workers) -> ReadFiles
             -> main output: Document(id, text)
             -> `dead_letter`: {"file", "record", "error"} for each file or record that failed

Formats, told apart by the name (a `.gz` or `.zst` suffix after it means gzip or zstd,
decompressed as a stream through Beam's file systems):

  * `.txt`: one document per file, or one per blank-line separated paragraph
    (`split_paragraphs`; `data.builders.paragraphs` cuts them);
  * `.jsonl`: one document per line, its text under `text_key`.

A document's id is `<path>:<record index>` with the index zero-padded to `INDEX_WIDTH`
digits (the paragraph or line index, counting from 0; 0 for a whole file), so ids are unique,
stable across runs and workers, and sort in file order. Files are streamed line by line: a
worker holds one document at a time (a whole `.txt` file when it is one document). Each file
is read by one worker (compressed streams cannot be split), so a corpus that should be read in
parallel comes as many files.

Bad input never stops the pipeline. A file that cannot be opened, is not valid UTF-8, or
whose compressed stream is corrupt is a dead-letter entry with `record` null (the documents
read before the fault stay in the corpus; the error says where it stopped); a JSONL line that
is not a JSON object or lacks a string under `text_key` is an entry for that record. Empty
documents are skipped and counted. Counters (namespace `data.prepare.read`): `files`,
`documents_out`, `bytes_out` (UTF-8 bytes of the texts), `empty`, `dead_letter_files`,
`dead_letter_records`, `files_with_suffix.<suffix>`.
"""

import json

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from data import builders
from data.prepare.stage import Document

NAMESPACE = "data.prepare.read"
DEAD_LETTER = "dead_letter"  # the tag of ReadFiles' output of failures
INDEX_WIDTH = 9
COMPRESSION_SUFFIXES = (".gz", ".zst")
FORMAT_SUFFIXES = (".txt", ".jsonl")


def document_id(path: str, index: int) -> str:
    """The id of record `index` of file `path`: `<path>:<index zero-padded>`."""
    return f"{path}:{index:0{INDEX_WIDTH}d}"


def file_format(path: str) -> str | None:
    """'.txt' or '.jsonl' for a readable name (compressed or not), else None."""
    name = path
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return next((s for s in FORMAT_SUFFIXES if name.endswith(s)), None)


def dead_letter(path: str, error: str, record: int | None = None) -> str:
    """One dead-letter entry as a JSON line."""
    return json.dumps({"file": path, "record": record, "error": error}, ensure_ascii=False)


def _raw_lines(handle):
    """The lines of a binary file-like object (Beam's compressed files have no line iterator)."""
    return iter(handle.readline, b"")


def _error_name(error: Exception) -> str:
    kind = type(error)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _jsonl_record(line: str, text_key: str) -> str:
    """The text of one JSONL line; raises ValueError saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"holds a {type(record).__name__}, not a JSON object")
    if text_key not in record:
        raise ValueError(f"has no key {text_key!r} (its keys: {sorted(record)[:10]}); set --text_key")
    if not isinstance(record[text_key], str):
        raise ValueError(f"{text_key!r} holds a {type(record[text_key]).__name__}, not a string")
    return record[text_key]


class ReadFileFn(beam.DoFn):
    """A matched file -> its documents, and dead-letter lines for what cannot be read."""

    def __init__(self, text_key: str, split_paragraphs: bool):
        self._text_key = text_key
        self._split_paragraphs = split_paragraphs
        self._counters = {}

    def _count(self, name: str, amount: int = 1) -> None:
        if name not in self._counters:
            self._counters[name] = Metrics.counter(NAMESPACE, name)
        self._counters[name].inc(amount)

    def process(self, readable: fileio.ReadableFile):
        path = readable.metadata.path
        self._count("files")
        kind = file_format(path)
        self._count(f"files_with_suffix.{kind or 'unknown'}")
        if kind is None:
            self._count("dead_letter_files")
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                path, f"unknown format; expected one of {FORMAT_SUFFIXES}, optionally followed by "
                      f"{' or '.join(COMPRESSION_SUFFIXES)}"))
            return
        records = 0  # records read so far, whatever became of them
        try:
            with readable.open(compression_type=CompressionTypes.AUTO) as handle:
                lines = builders.decode_lines(_raw_lines(handle), path)
                for index, text, error in self._records(kind, lines):
                    records = index + 1
                    yield from self._emit(path, index, text, error)
        except Exception as e:  # noqa: BLE001 - any fault of one file is that file's dead letter
            self._count("dead_letter_files")
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                path, f"{_error_name(e)}: {e} (reading stopped after {records} records; those were kept)"))

    def _records(self, kind: str, lines):
        """(index, text, error) of each record of the file; error is "" or what is wrong."""
        if kind == ".jsonl":
            for index, (_, _, line) in enumerate(lines):
                if not line.strip():
                    yield index, "", ""
                    continue
                try:
                    yield index, _jsonl_record(line, self._text_key), ""
                except ValueError as e:
                    yield index, None, str(e)
        elif self._split_paragraphs:
            for (_, _, index), text in builders.paragraphs(lines):
                yield index, text, ""
        else:
            yield 0, "".join(line for _, _, line in lines), ""

    def _emit(self, path: str, index: int, text: str | None, error: str):
        if error:
            self._count("dead_letter_records")
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(path, f"line {index + 1}: {error}", index))
        elif not text.strip():
            self._count("empty")
        else:
            self._count("documents_out")
            self._count("bytes_out", len(text.encode("utf-8")))
            yield Document(document_id(path, index), text)


class ReadInputs(beam.PTransform):
    """Glob patterns -> Documents (`documents`) and dead-letter JSON lines (`dead_letter`).

    Args:
        patterns: file patterns Beam's file systems match (local paths, gs://... with the
            gcp extra); each must match something (checked before the pipeline starts).
        text_key: the JSONL key of the text.
        split_paragraphs: one document per blank-line separated paragraph of a .txt file.
    """

    def __init__(self, patterns, text_key: str = "text", split_paragraphs: bool = False):
        super().__init__(label="read")
        self._patterns = list(patterns)
        self._text_key = text_key
        self._split_paragraphs = split_paragraphs

    def expand(self, pbegin):
        files = (pbegin
                 | "patterns" >> beam.Create(self._patterns)
                 | "match" >> fileio.MatchAll()
                 | "paths" >> beam.Map(lambda metadata: metadata.path)
                 | "distinct" >> beam.Distinct()
                 | "spread" >> beam.Reshuffle()
                 | "open" >> fileio.ReadMatches(skip_directories=True))
        return files | "parse" >> beam.ParDo(ReadFileFn(self._text_key, self._split_paragraphs)).with_outputs(
            DEAD_LETTER, main="documents")


def matching_files(pattern: str) -> list[str]:
    """The files a pattern matches (Beam's file systems), for the checks before a run."""
    from apache_beam.io.filesystems import FileSystems

    return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
