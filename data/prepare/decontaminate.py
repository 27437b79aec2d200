"""Decontamination: drop training documents that share long word n-grams with evaluation sets.

As in GPT-3 (Brown et al. 2020, appendix C), a training document is contaminated when it
shares at least `min_shared` distinct word n-grams (n = `ngram`, 13 by default) with any
evaluation example. Words are those of `minhash.words` (casefolded, punctuation-insensitive),
so formatting differences do not hide an overlap; each n-gram is hashed to 64 bits
(BLAKE2b; a false match needs a collision, probability ~ (eval n-grams) / 2^64 per n-gram).

The evaluation files (`eval_files`, a glob of local or remote paths Beam's file systems can
open, gzip/zstd by suffix) hold one example per non-empty line in `.txt` files, or one per
JSON line (its text under `text_key`) in `.jsonl` files. Their n-gram hashes are read in
the pipeline, merged into one sorted uint64 array (8 bytes per distinct n-gram: a 14k-question
benchmark of ~60 words each is about 7 MB) and broadcast to every worker as a side input;
each document's n-grams are looked up by binary search. Evaluation examples shorter than
n words have no n-gram and cannot match (counted `eval_too_short`; lower `ngram` for them).

Counters (namespace `data.prepare.decontam`): `documents`, `eval_examples`,
`eval_too_short`, `kept`, `dropped`, `dropped.contaminated`.
"""

import dataclasses
import hashlib
import json

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from data.prepare import minhash
from data.prepare.stage import Document, field
from data.prepare.transforms import DROPPED, NAMESPACE

NAME = "decontam"
_METRICS = f"{NAMESPACE}.{NAME}"


@dataclasses.dataclass(frozen=True)
class Options:
    """Decontamination settings, the flags `--decontam_<field>`."""

    eval_files: str = field("", "Glob of evaluation files (.txt: one example per line; .jsonl), "
                                "optionally .gz/.zst; empty: the stage keeps every document.")
    text_key: str = field("text", "The key of an example's text in JSONL evaluation files.")
    ngram: int = field(13, "Words per n-gram (GPT-3: 13).")
    min_shared: int = field(1, "Distinct n-grams shared with the evaluation sets that make a document contaminated.")

    def __post_init__(self):
        if self.ngram < 1:
            raise ValueError(f"--{NAME}_ngram must be >= 1, got {self.ngram}")
        if self.min_shared < 1:
            raise ValueError(f"--{NAME}_min_shared must be >= 1, got {self.min_shared}")


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """The sorted distinct 64-bit hashes of the text's word n-grams (empty if < n words)."""
    tokens = minhash.words(text)
    grams = {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}
    hashes = np.fromiter((int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "little")
                          for g in grams), np.uint64, len(grams))
    return np.unique(hashes)


def shared_ngrams(document_hashes: np.ndarray, eval_hashes: np.ndarray) -> int:
    """How many of the document's distinct n-gram hashes are in the sorted `eval_hashes`."""
    if not eval_hashes.size or not document_hashes.size:
        return 0
    where = np.searchsorted(eval_hashes, document_hashes)
    where[where == eval_hashes.size] = 0
    return int(np.count_nonzero(eval_hashes[where] == document_hashes))


def eval_paths(pattern: str) -> list[str]:
    """The files the glob matches, sorted; raises ValueError naming the glob when none."""
    matched = FileSystems.match([pattern])[0].metadata_list
    paths = sorted(m.path for m in matched)
    if not paths:
        raise ValueError(f"--{NAME}_eval_files={pattern!r} matches no file; give a glob of .txt or .jsonl "
                         "evaluation files")
    unreadable = [p for p in paths if _format(p) is None]
    if unreadable:
        raise ValueError(f"--{NAME}_eval_files matched {unreadable[0]!r}, which is neither .txt nor .jsonl "
                         "(optionally .gz/.zst); narrow the glob")
    return paths


def _format(path: str) -> str | None:
    name = path.removesuffix(".gz").removesuffix(".zst")
    return next((s for s in (".txt", ".jsonl") if name.endswith(s)), None)


def read_examples(path: str, text_key: str):
    """The evaluation examples of one file (a `.txt` line or a `.jsonl` record's text each)."""
    jsonl = _format(path) == ".jsonl"
    with FileSystems.open(path) as handle:
        for number, raw in enumerate(iter(handle.readline, b""), 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{number}: evaluation file line is not valid UTF-8; "
                                 "re-encode the file as UTF-8") from None
            if not line:
                continue
            if not jsonl:
                yield line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: evaluation line is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(  # noqa: TRY004 (bad file content, not a bad argument)
                    f"{path}:{number}: an evaluation record needs a string under {text_key!r}; "
                    f"set --{NAME}_text_key")
            yield record[text_key]


class _EvalHashes(beam.DoFn):
    def __init__(self, options: Options):
        self._options = options

    def setup(self):
        self._examples = Metrics.counter(_METRICS, "eval_examples")
        self._short = Metrics.counter(_METRICS, "eval_too_short")

    def process(self, path: str):
        for text in read_examples(path, self._options.text_key):
            self._examples.inc()
            hashes = ngram_hashes(text, self._options.ngram)
            if not hashes.size:
                self._short.inc()
                continue
            yield hashes


class _UnionSorted(beam.CombineFn):
    """Arrays of hashes -> one sorted array of the distinct hashes.

    The accumulator is a list of arrays, compacted (concatenated and deduplicated) every
    `_COMPACT` additions, so the work is O(total log total) rather than a union per example.
    """

    _COMPACT = 1024

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, hashes):
        accumulator.append(hashes)
        return [_unique(accumulator)] if len(accumulator) >= self._COMPACT else accumulator

    def merge_accumulators(self, accumulators):
        return [_unique([a for acc in accumulators for a in acc])]

    def extract_output(self, accumulator):
        return _unique(accumulator)


def _unique(arrays) -> np.ndarray:
    return np.unique(np.concatenate([np.zeros(0, np.uint64), *arrays])).astype(np.uint64)


class _Filter(beam.DoFn):
    def __init__(self, options: Options):
        self._options = options

    def setup(self):
        self._documents = Metrics.counter(_METRICS, "documents")
        self._kept = Metrics.counter(_METRICS, "kept")
        self._dropped = Metrics.counter(_METRICS, "dropped")
        self._contaminated = Metrics.counter(_METRICS, "dropped.contaminated")

    def process(self, document: Document, eval_hashes):
        self._documents.inc()
        shared = shared_ngrams(ngram_hashes(document.text, self._options.ngram), eval_hashes)
        if shared >= self._options.min_shared:
            self._dropped.inc()
            self._contaminated.inc()
            yield beam.pvalue.TaggedOutput(DROPPED, (document.id, NAME, "contaminated"))
        else:
            self._kept.inc()
            yield document


class Decontaminate(beam.PTransform):
    """Documents -> `.kept` and `.dropped` ((id, "decontam", "contaminated")).

    The evaluation files are matched and read once when the transform is built, so a glob
    that matches nothing, or a record that is not UTF-8, not JSON or lacks `text_key`, is a
    one-line ValueError before the pipeline runs; the pipeline reads them again to hash
    (evaluation sets are small; hashing there keeps a large n-gram set out of the job graph).
    """

    def __init__(self, options: Options | None = None, label: str = NAME):
        super().__init__(label=label)
        self._options = options or Options()
        self._paths = eval_paths(self._options.eval_files) if self._options.eval_files else []
        for path in self._paths:  # small files: reading them here turns a bad record into an early error
            for _ in read_examples(path, self._options.text_key):
                pass

    def expand(self, documents):
        eval_hashes = (documents.pipeline
                       | "eval files" >> beam.Create(self._paths)
                       | "eval n-grams" >> beam.ParDo(_EvalHashes(self._options))
                       | "union" >> beam.CombineGlobally(_UnionSorted()))
        return documents | "filter" >> beam.ParDo(
            _Filter(self._options), beam.pvalue.AsSingleton(eval_hashes)).with_outputs(DROPPED, main="kept")
