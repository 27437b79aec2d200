"""Near-duplicate removal with MinHash + LSH, in Beam: one document kept per cluster.

    documents -> signatures (`minhash.MinHasher`) -> (band, bucket key) buckets
      -> candidate pairs: documents sharing a bucket
      -> clusters: connected components of the candidate pairs (`components`)
      -> each cluster keeps its smallest `Document.id`; the others are dropped ("near_duplicate").

Without verification (`verify` = 0), a bucket of m documents contributes the m - 1 edges from
its smallest id to the others: the same components as all its pairs, in linear work. With
`verify` > 0, every pair within a bucket is a candidate, and an edge only when its estimated
Jaccard (the full signature's agreement) is at least `verify`; this trims the S-curve's
false positives below the threshold but costs m (m - 1) / 2 comparisons per bucket.

Documents without words have no shingles and pass through (counted `no_shingles`). The
clusters are the connected components of the candidate graph, so two documents can share a
cluster through a chain A~B~C with A and C dissimilar: the standard single-linkage choice.

What scales: signatures are computed per document on any worker; the shuffles carry ids
(16 bands x a few dozen bytes per document; with `verify`, each also carries its 1 KB
signature); the components shuffle only the candidate edges (`components`); the last
step joins the labels with the documents, one shuffle of the corpus. What does not: one
bucket's members meet in one worker (its ids in memory, and with `verify` its m^2 / 2
comparisons), so a text repeated in millions of slight variants makes one large bucket;
exact deduplication, which runs first, removes verbatim repeats so they never get here.

Counters (namespace `data.prepare.minhash`): `documents`, `no_shingles`, `candidate_pairs`
(distinct edges into the components), `rejected_pairs` (bucket pairs below `verify`,
counted per bucket), `clusters`, `unconverged_nodes`, `kept`, `dropped`,
`dropped.near_duplicate`.
"""

import dataclasses
import itertools

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from data.prepare import minhash
from data.prepare.components import ConnectedComponents
from data.prepare.stage import Document, field
from data.prepare.transforms import DROPPED, NAMESPACE

NAME = "minhash"
_METRICS = f"{NAMESPACE}.{NAME}"


@dataclasses.dataclass(frozen=True)
class Options:
    """Near-deduplication settings, the flags `--minhash_<field>`; checked when built."""

    shingle: int = field(5, "Words per shingle.")
    num_perm: int = field(128, "MinHash permutations (signature length).")
    bands: int = field(16, "LSH bands; bands * rows <= num_perm. Threshold ~ (1/bands)^(1/rows).")
    rows: int = field(8, "Signature entries per LSH band.")
    seed: int = field(1, "Seed of the MinHash permutations.")
    verify: float = field(0.0, "Keep only candidate pairs whose estimated Jaccard is >= this (0: no check).")
    rounds: int = field(16, "Connected-components rounds (each two shuffles); raise if unconverged_nodes > 0.")

    def __post_init__(self):
        check(self)


def check(options: Options) -> None:
    """Raises ValueError naming a bad option and the fix (before any pipeline runs)."""
    for name in ("shingle", "num_perm", "bands", "rows", "rounds"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{NAME}_{name} must be >= 1, got {getattr(options, name)}")
    if options.bands * options.rows > options.num_perm:
        raise ValueError(f"--{NAME}_bands * --{NAME}_rows = {options.bands * options.rows} exceeds "
                         f"--{NAME}_num_perm = {options.num_perm}; lower bands or rows, or raise num_perm")
    if not 0.0 <= options.verify <= 1.0:
        raise ValueError(f"--{NAME}_verify must be a Jaccard in [0, 1], got {options.verify}")


class _Band(beam.DoFn):
    """Document -> ((band, key), member) for each band; member is the id, or (id, signature) to verify."""

    def __init__(self, options: Options):
        self._options = options

    def setup(self):
        o = self._options
        self._hasher = minhash.MinHasher(o.shingle, o.num_perm, o.seed)
        self._documents = Metrics.counter(_METRICS, "documents")
        self._no_shingles = Metrics.counter(_METRICS, "no_shingles")

    def process(self, document: Document):
        self._documents.inc()
        sig = self._hasher(document.text)
        if sig is None:
            self._no_shingles.inc()
            return
        member = (document.id, sig.tobytes()) if self._options.verify > 0 else document.id
        for key in minhash.band_keys(sig, self._options.bands, self._options.rows):
            yield key, member


class _BucketEdges(beam.DoFn):
    """A bucket's members -> candidate edges (smaller id, larger id)."""

    def __init__(self, verify: float):
        self._verify = verify

    def setup(self):
        self._rejected = Metrics.counter(_METRICS, "rejected_pairs")

    def process(self, item):
        _, members = item
        if self._verify <= 0:
            ids = sorted(set(members))
            for other in ids[1:]:
                yield ids[0], other
            return
        unique = sorted(dict(members).items())
        for (id_a, sig_a), (id_b, sig_b) in itertools.combinations(unique, 2):
            if _agree_enough(sig_a, sig_b, self._verify):
                yield id_a, id_b
            else:
                self._rejected.inc()


def _agree_enough(sig_a: bytes, sig_b: bytes, verify: float) -> bool:
    """Whether two signatures (as bytes) agree on at least a `verify` fraction of entries."""
    a, b = np.frombuffer(sig_a, np.uint64), np.frombuffer(sig_b, np.uint64)
    return minhash.estimate_jaccard(a, b) >= verify


class _CountEdges(beam.DoFn):
    def setup(self):
        self._edges = Metrics.counter(_METRICS, "candidate_pairs")

    def process(self, edge):
        self._edges.inc()
        yield edge


class _KeepSmallest(beam.DoFn):
    """(id, {'document': [doc], 'label': [label?]}) -> the document, or dropped when label < id."""

    def setup(self):
        self._kept = Metrics.counter(_METRICS, "kept")
        self._dropped = Metrics.counter(_METRICS, "dropped")
        self._near = Metrics.counter(_METRICS, "dropped.near_duplicate")

    def process(self, item):
        doc_id, groups = item
        labels = list(groups["label"])
        for document in groups["document"]:
            if labels and labels[0] < doc_id:
                self._dropped.inc()
                self._near.inc()
                yield beam.pvalue.TaggedOutput(DROPPED, (doc_id, NAME, "near_duplicate"))
            else:
                self._kept.inc()
                yield document


class NearDedup(beam.PTransform):
    """Documents -> `.kept` (one per near-duplicate cluster) and `.dropped` ((id, "minhash", reason))."""

    def __init__(self, options: Options | None = None, label: str = NAME):
        super().__init__(label=label)
        self._options = options or Options()

    def expand(self, documents):
        o = self._options
        edges = (documents
                 | "band" >> beam.ParDo(_Band(o))
                 | "bucket" >> beam.GroupByKey()
                 | "bucket edges" >> beam.ParDo(_BucketEdges(o.verify))
                 | "distinct edges" >> beam.Distinct()
                 | "count edges" >> beam.ParDo(_CountEdges()))
        labels = edges | "components" >> ConnectedComponents(o.rounds, _METRICS)
        by_id = documents | "by id" >> beam.Map(lambda d: (d.id, d))
        return ({"document": by_id, "label": labels}
                | "join labels" >> beam.CoGroupByKey()
                | "keep smallest" >> beam.ParDo(_KeepSmallest()).with_outputs(DROPPED, main="kept"))
