"""A planted corpus: base documents, their near-duplicates at chosen Jaccard similarities and
exact copies, with the ground truth; and the measurement of MinHash LSH on it.

Base documents are runs of paragraphs of Python's own documentation (`pydoc_data.topics`,
shipped with CPython, ~65k words) of at least `words_per_doc` words each, or given texts.
A near-duplicate at target similarity t replaces words of its base by words drawn from the
corpus vocabulary, at positions in a seeded random order; the number of replacements m is
found by bisection so that the exact shingle Jaccard J(m) (which falls as m grows, each
replacement removing up to k shingles) brackets t, then refined by also replacing the first
e < 2k words (the first e words only take part in e shingles), and the closest to t is kept
(`near_duplicate`); the achieved J is recorded. An exact copy differs from its base only in
its first letter's case and in spacing, which exact deduplication's normalization ignores.

`measure` runs the LSH of `near_dedup.Options` locally on the corpus and reports
  * per planted level: the fraction of planted pairs that became candidates, next to the
    S-curve's prediction at their achieved Jaccard;
  * per threshold t: precision and recall of the candidate pairs, and of the pairs that
    share a cluster, against the truth "exact Jaccard >= t", computed exactly over every pair
    of a sample of documents (whole planted clusters, so the planted pairs are in it).
`compare_with_datasketch` sets our Jaccard estimates beside `datasketch.MinHash`'s.
"""

import dataclasses
import itertools
import re

import numpy as np

from data.prepare import minhash
from data.prepare.near_dedup import Options
from data.prepare.stage import Document

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9)
_SPACES = re.compile(r"(\s+)")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


@dataclasses.dataclass(frozen=True)
class PlantedPair:
    """A near-duplicate and its base (document ids), with the target and achieved Jaccard."""

    base: str
    duplicate: str
    target: float
    achieved: float


@dataclasses.dataclass(frozen=True)
class PlantedCorpus:
    """Documents (ids `planted:<n>`, in shuffled order) with their ground truth.

    clusters: id -> the index of its base (a base and all its copies share it).
    pairs: every planted near-duplicate pair.
    exact: (base id, copy id) of every exact copy.
    """

    documents: list[Document]
    clusters: dict[str, int]
    pairs: list[PlantedPair]
    exact: list[tuple[str, str]]
    shingle: int


def base_texts(words_per_doc: int = 120) -> list[str]:
    """Documents of >= `words_per_doc` words cut at paragraph ends from `pydoc_data.topics`."""
    from pydoc_data.topics import topics

    texts = []
    for name in sorted(topics):
        current, count = [], 0
        for paragraph in topics[name].split("\n\n"):
            current.append(paragraph)
            count += len(paragraph.split())
            if count >= words_per_doc:
                texts.append("\n\n".join(current))
                current, count = [], 0
    return texts


def vocabulary(texts: list[str]) -> list[str]:
    """The distinct alphabetic words (3+ letters, lowercased) of the texts, sorted."""
    return sorted({w.lower() for t in texts for w in t.split() if _WORD.match(w)})


def near_duplicate(text: str, target: float, shingle: int, rng: np.random.Generator,
                   vocab: list[str]) -> tuple[str, float]:
    """The text with words replaced so that its shingle Jaccard with `text` is closest to `target`.

    Returns:
      The edited text and the achieved exact Jaccard.
    """
    pieces = _SPACES.split(text)  # words at even indices, the whitespace between at odd ones
    positions = rng.permutation(np.arange(0, len(pieces), 2))
    replacements = [vocab[i] for i in rng.integers(0, len(vocab), size=positions.size)]
    leading = [vocab[i] for i in rng.integers(0, len(vocab), size=2 * shingle)]
    original = minhash.shingles(text, shingle)

    def edited(m: int, prefix: int = 0) -> tuple[str, float]:
        out = list(pieces)
        edits = list(zip(positions[:m], replacements[:m])) + list(zip(range(0, 2 * prefix, 2), leading))
        for pos, word in edits:
            if pos < len(out):
                out[pos] = word if word != out[pos].lower() else word + "s"
        result = "".join(out)
        return result, minhash.exact_jaccard(original, minhash.shingles(result, shingle))

    low, high = 0, positions.size  # J(low) >= target > J(high) once bisected
    while high - low > 1:
        middle = (low + high) // 2
        if edited(middle)[1] >= target:
            low = middle
        else:
            high = middle
    # A replaced word inside the text removes up to k shingles; the first e words only e: finer steps.
    candidates = [edited(high)] + [edited(low, prefix) for prefix in range(2 * shingle + 1)]
    return min(candidates, key=lambda c: abs(c[1] - target))


def _exact_copy(text: str) -> str:
    """The same content to exact deduplication: first letter's case swapped, doubled spaces, a newline."""
    return text[:1].swapcase() + text[1:].replace(" ", "  ") + "\n"


def generate(num_bases: int = 200, levels: tuple[float, ...] = LEVELS, duplicates_per_level: int = 20,
             exact_copies: int = 10, shingle: int = 5, seed: int = 0, texts: list[str] | None = None,
             words_per_doc: int = 120) -> PlantedCorpus:
    """A planted corpus: `num_bases` bases, some with one near-duplicate or an exact copy.

    Bases 0 .. len(levels) * duplicates_per_level - 1 each get one near-duplicate, the levels
    taken in turn; the next `exact_copies` bases get one exact copy; the rest stay unique.

    Args:
      num_bases: how many base documents (at most the number of texts).
      levels: the target Jaccard similarities of the near-duplicates.
      duplicates_per_level: near-duplicate pairs per level.
      exact_copies: bases that get an exact copy.
      shingle: words per shingle (as `near_dedup.Options.shingle`).
      seed: seeds the edits and the order of the documents.
      texts: the base documents (default: `base_texts(words_per_doc)`).
      words_per_doc: the base documents' minimum length in words, for the default texts.
    """
    texts = base_texts(words_per_doc) if texts is None else list(texts)
    planted = len(levels) * duplicates_per_level + exact_copies
    if num_bases > len(texts) or planted > num_bases:
        raise ValueError(f"{num_bases} bases requested, {len(texts)} texts available and {planted} bases "
                         "get a copy; need planted <= num_bases <= texts")
    rng = np.random.default_rng(seed)
    bases = [texts[i] for i in rng.choice(len(texts), size=num_bases, replace=False)]
    vocab = vocabulary(texts)
    entries = [(i, text, None) for i, text in enumerate(bases)]  # (base index, text, (target, achieved))
    for i in range(len(levels) * duplicates_per_level):
        target = levels[i % len(levels)]
        text, achieved = near_duplicate(bases[i], target, shingle, rng, vocab)
        entries.append((i, text, (target, achieved)))
    first_exact = len(levels) * duplicates_per_level
    entries += [(i, _exact_copy(bases[i]), "exact") for i in range(first_exact, first_exact + exact_copies)]
    order = rng.permutation(len(entries))
    ids = {int(e): f"planted:{rank:06d}" for rank, e in enumerate(order)}
    documents = sorted((Document(ids[e], entries[e][1]) for e in range(len(entries))), key=lambda d: d.id)
    base_id = {entries[e][0]: ids[e] for e in range(num_bases)}
    pairs = [PlantedPair(base_id[b], ids[e], info[0], info[1])
             for e, (b, _, info) in enumerate(entries) if isinstance(info, tuple)]
    exact = [(base_id[b], ids[e]) for e, (b, _, info) in enumerate(entries) if info == "exact"]
    clusters = {ids[e]: entries[e][0] for e in range(len(entries))}
    return PlantedCorpus(documents, clusters, pairs, exact, shingle)


@dataclasses.dataclass(frozen=True)
class LevelRow:
    """Planted pairs at one target level: how many became candidates vs the S-curve's prediction."""

    target: float
    pairs: int
    mean_jaccard: float
    predicted: float
    measured: float


@dataclasses.dataclass(frozen=True)
class ThresholdRow:
    """Detected pairs against the truth "exact Jaccard >= threshold" over all sampled pairs.

    Candidates are the LSH pairs (after `verify`); clustered pairs are those that near
    deduplication puts in one cluster (connected components of the candidates, which adds
    the pairs linked through a chain).
    """

    threshold: float
    true_pairs: int
    candidate_pairs: int
    precision: float
    recall: float
    clustered_pairs: int
    cluster_precision: float
    cluster_recall: float


@dataclasses.dataclass(frozen=True)
class Measurement:
    levels: list[LevelRow]
    thresholds: list[ThresholdRow]
    sampled_documents: int
    sampled_pairs: int


def measure(corpus: PlantedCorpus, options: Options | None = None, thresholds: tuple[float, ...] = LEVELS,
            sample_documents: int = 400, seed: int = 0) -> Measurement:
    """LSH candidates on the planted corpus: detection per level, precision/recall per threshold.

    Args:
      corpus: from `generate`, with `corpus.shingle == options.shingle`.
      options: the near-deduplication options (shingle, num_perm, bands, rows, seed, verify; default:
        the defaults).
      thresholds: the Jaccard values defining "true duplicate" for precision and recall.
      sample_documents: about how many documents (whole clusters) to compare pairwise.
      seed: seeds the sample.
    """
    options = options or Options()
    if corpus.shingle != options.shingle:
        raise ValueError(f"the corpus was planted with {corpus.shingle}-word shingles but the options use "
                         f"{options.shingle}; generate it with shingle={options.shingle}")
    hasher = minhash.MinHasher(options.shingle, options.num_perm, options.seed)
    signatures = {d.id: hasher(d.text) for d in corpus.documents}
    candidates = minhash.candidate_pairs(signatures, options.bands, options.rows, options.verify)
    levels = []
    for target in sorted({p.target for p in corpus.pairs}):
        planted = [p for p in corpus.pairs if p.target == target]
        achieved = np.array([p.achieved for p in planted])
        found = [tuple(sorted((p.base, p.duplicate))) in candidates for p in planted]
        levels.append(LevelRow(target, len(planted), float(achieved.mean()),
                               float(minhash.candidate_probability(achieved, options.bands, options.rows).mean()),
                               float(np.mean(found))))
    sample = _sample_clusters(corpus, sample_documents, seed)
    shingle_sets = {i: minhash.shingles(text, corpus.shingle) for i, text in sample}
    cluster = _cluster_labels(signatures, candidates)
    jaccards, predicted, clustered = [], [], []
    for a, b in itertools.combinations(sorted(shingle_sets), 2):
        jaccards.append(minhash.exact_jaccard(shingle_sets[a], shingle_sets[b]))
        predicted.append((a, b) in candidates)
        clustered.append(cluster[a] == cluster[b])
    jaccards = np.array(jaccards)
    predicted, clustered = np.array(predicted, dtype=bool), np.array(clustered, dtype=bool)
    rows = []
    for t in thresholds:
        truth = jaccards >= t
        rows.append(ThresholdRow(t, int(truth.sum()), int(predicted.sum()), *_precision_recall(predicted, truth),
                                 int(clustered.sum()), *_precision_recall(clustered, truth)))
    return Measurement(levels, rows, len(sample), len(jaccards))


def _precision_recall(detected: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of boolean detections; nan where a denominator is empty."""
    hits = int(np.count_nonzero(detected & truth))
    precision = hits / int(detected.sum()) if detected.any() else float("nan")
    recall = hits / int(truth.sum()) if truth.any() else float("nan")
    return precision, recall


def _cluster_labels(ids, pairs) -> dict[str, str]:
    """id -> the smallest id of its connected component over `pairs` (union-find)."""
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i: root(i) for i in ids}


def _sample_clusters(corpus: PlantedCorpus, size: int, seed: int) -> list[tuple[str, str]]:
    """(id, text) of whole clusters drawn at random until about `size` documents."""
    members = {}
    for document in corpus.documents:
        members.setdefault(corpus.clusters[document.id], []).append(document)
    rng = np.random.default_rng(seed)
    sample = []
    for cluster in rng.permutation(sorted(members)):
        if len(sample) >= size:
            break
        sample += [(d.id, d.text) for d in members[int(cluster)]]
    return sample


@dataclasses.dataclass(frozen=True)
class DatasketchComparison:
    """Our Jaccard estimates against datasketch.MinHash's on the planted pairs' shingles.

    Both are unbiased with standard deviation sqrt(J (1 - J) / num_perm) and use independent
    hash functions, so their difference has standard deviation sqrt(2 J (1 - J) / num_perm);
    `expected_mean_abs_difference` is the mean over pairs of sqrt(2/pi) times that.
    """

    pairs: int
    mean_difference: float
    mean_abs_difference: float
    expected_mean_abs_difference: float
    ours_mean_abs_error: float
    datasketch_mean_abs_error: float


def compare_with_datasketch(corpus: PlantedCorpus, options: Options | None = None) -> DatasketchComparison:
    """Estimates of every planted pair's Jaccard by our MinHash and by datasketch's (test extra)."""
    options = options or Options()
    import datasketch  # the reference implementation, in setup.py's test extras

    hasher = minhash.MinHasher(corpus.shingle, options.num_perm, options.seed)
    texts = {d.id: d.text for d in corpus.documents}
    rows = []
    for pair in corpus.pairs:
        sets = [minhash.shingles(texts[i], corpus.shingle) for i in (pair.base, pair.duplicate)]
        ours = minhash.estimate_jaccard(*(hasher(texts[i]) for i in (pair.base, pair.duplicate)))
        sketches = [datasketch.MinHash(num_perm=options.num_perm, seed=options.seed) for _ in sets]
        for sketch, items in zip(sketches, sets):
            sketch.update_batch([s.encode("utf-8") for s in items])
        rows.append((minhash.exact_jaccard(*sets), ours, sketches[0].jaccard(sketches[1])))
    exact, ours, theirs = (np.array(column) for column in zip(*rows))
    expected = np.sqrt(2 / np.pi) * np.sqrt(2 * exact * (1 - exact) / options.num_perm)
    return DatasketchComparison(len(rows), float(np.mean(ours - theirs)), float(np.mean(np.abs(ours - theirs))),
                                float(expected.mean()), float(np.mean(np.abs(ours - exact))),
                                float(np.mean(np.abs(theirs - exact))))
