"""Exact deduplication by a hash of the normalized content: one document kept per group.

The content is normalized before hashing (`normalized`): Unicode NFC, then `str.casefold`
(case-insensitive, including e.g. "ß" = "ss"), then every run of whitespace collapsed to
one space and the ends stripped; so copies that differ only in case, spacing or Unicode
composition are duplicates. The key is the 128-bit BLAKE2b digest of its UTF-8 bytes
(collisions are negligible: ~n^2 / 2^129 for n documents).

Documents are grouped by key (one shuffle, which carries the documents); a group keeps its
smallest `Document.id` and drops the others as "exact_duplicate", in one pass over the
group and constant memory, so a boilerplate text repeated millions of times costs no more
memory than one copy.

Counters (namespace `data.prepare.exact`): `documents`, `groups` (distinct contents),
`kept`, `dropped`, `dropped.exact_duplicate`.
"""

import dataclasses
import hashlib
import re
import unicodedata

import apache_beam as beam
from apache_beam.metrics import Metrics

from data.prepare.stage import Document, field
from data.prepare.transforms import DROPPED, NAMESPACE

NAME = "exact"
_METRICS = f"{NAMESPACE}.{NAME}"
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class Options:
    """Exact-deduplication settings, the flags `--exact_<field>`."""

    casefold: bool = field(True, "Ignore case (str.casefold) when comparing contents.")


def normalized(text: str, casefold: bool = True) -> str:
    """NFC, casefolded (if asked), whitespace runs collapsed to one space, ends stripped."""
    text = unicodedata.normalize("NFC", text)
    if casefold:
        text = text.casefold()
    return _WHITESPACE.sub(" ", text).strip()


def content_key(text: str, casefold: bool = True) -> bytes:
    """The 128-bit BLAKE2b digest of the normalized text: equal for exact duplicates."""
    return hashlib.blake2b(normalized(text, casefold).encode("utf-8"), digest_size=16).digest()


class _Key(beam.DoFn):
    def __init__(self, casefold: bool):
        self._casefold = casefold

    def setup(self):
        self._documents = Metrics.counter(_METRICS, "documents")

    def process(self, document: Document):
        self._documents.inc()
        yield content_key(document.text, self._casefold), document


class _KeepSmallest(beam.DoFn):
    """(key, documents) -> the smallest-id document; the others to `dropped`."""

    def setup(self):
        self._groups = Metrics.counter(_METRICS, "groups")
        self._kept = Metrics.counter(_METRICS, "kept")
        self._dropped = Metrics.counter(_METRICS, "dropped")
        self._exact = Metrics.counter(_METRICS, "dropped.exact_duplicate")

    def _drop(self, document: Document):
        self._dropped.inc()
        self._exact.inc()
        return beam.pvalue.TaggedOutput(DROPPED, (document.id, NAME, "exact_duplicate"))

    def process(self, item):
        _, documents = item
        smallest = None
        for document in documents:
            if smallest is None:
                smallest = document
            elif document.id < smallest.id:
                yield self._drop(smallest)
                smallest = document
            else:
                yield self._drop(document)
        self._groups.inc()
        self._kept.inc()
        yield smallest


class ExactDedup(beam.PTransform):
    """Documents -> `.kept` (one per distinct normalized content) and `.dropped` ((id, "exact", reason))."""

    def __init__(self, options: Options | None = None, label: str = NAME):
        super().__init__(label=label)
        self._options = options or Options()

    def expand(self, documents):
        return (documents
                | "key" >> beam.ParDo(_Key(self._options.casefold))
                | "group" >> beam.GroupByKey()
                | "keep smallest" >> beam.ParDo(_KeepSmallest()).with_outputs(DROPPED, main="kept"))
