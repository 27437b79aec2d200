"""planted: near-duplicates hit their target Jaccard, the ground truth is consistent, and the
measurement agrees with a direct count and with the S-curve."""

import itertools

import numpy as np
import pytest
from scipy import stats

from data.prepare import exact_dedup, minhash, near_dedup, planted

SHINGLE = 5


@pytest.fixture(scope="module")
def corpus():
    return planted.generate(num_bases=80, duplicates_per_level=10, exact_copies=8, seed=4)


def test_near_duplicates_hit_their_targets(corpus):
    """Achieved = the exact Jaccard recomputed, within one step of the target: replacing one more of
    the first words exchanges one shingle, moving J = I / U by (1 + J) / (U + 1) <= 2 / |base|."""
    texts = {d.id: d.text for d in corpus.documents}
    assert len(corpus.pairs) == 50 and {p.target for p in corpus.pairs} == set(planted.LEVELS)
    for pair in corpus.pairs:
        base, copy = (minhash.shingles(texts[i], SHINGLE) for i in (pair.base, pair.duplicate))
        assert pair.achieved == minhash.exact_jaccard(base, copy)
        assert abs(pair.achieved - pair.target) <= 2 / len(base), pair


def test_ground_truth_is_consistent(corpus):
    ids = [d.id for d in corpus.documents]
    assert ids == sorted(set(ids)) and len(ids) == 80 + 50 + 8
    texts = {d.id: d.text for d in corpus.documents}
    for base, copy in corpus.exact:
        assert corpus.clusters[base] == corpus.clusters[copy]
        assert texts[base] != texts[copy] and exact_dedup.normalized(texts[base]) == exact_dedup.normalized(texts[copy])
    for pair in corpus.pairs:
        assert corpus.clusters[pair.base] == corpus.clusters[pair.duplicate]
    assert len(set(corpus.clusters.values())) == 80
    again = planted.generate(num_bases=80, duplicates_per_level=10, exact_copies=8, seed=4)
    assert again == corpus


def test_measure_counts_and_s_curve(corpus):
    options = near_dedup.Options()
    result = planted.measure(corpus, options, sample_documents=60, seed=1)
    # precision and recall recounted directly over the same sample
    sample = sorted({d for d in result_sample_ids(corpus, 60, 1)})
    hasher = minhash.MinHasher(options.shingle, options.num_perm, options.seed)
    texts = {d.id: d.text for d in corpus.documents}
    signatures = {i: hasher(texts[i]) for i in sample}
    candidates = minhash.candidate_pairs(signatures, options.bands, options.rows)
    pairs = list(itertools.combinations(sample, 2))
    clusters = flood_clusters(signatures, candidates)
    assert result.sampled_documents == len(sample) and result.sampled_pairs == len(pairs)
    for row in result.thresholds:
        truth = {(a, b) for a, b in pairs
                 if minhash.exact_jaccard(minhash.shingles(texts[a], 5), minhash.shingles(texts[b], 5)) >= row.threshold}
        assert row.true_pairs == len(truth) and row.candidate_pairs == len(candidates)
        assert row.recall == pytest.approx(len(truth & candidates) / len(truth))
        assert row.precision == pytest.approx(len(truth & candidates) / len(candidates))
        clustered = {(a, b) for a, b in pairs if clusters[a] == clusters[b]}
        assert row.clustered_pairs == len(clustered) >= len(candidates & set(pairs))
        assert row.cluster_recall == pytest.approx(len(truth & clustered) / len(truth))
        assert row.cluster_precision == pytest.approx(len(truth & clustered) / len(clustered))
    # detection per level: a Poisson-binomial count, within z (Bonferroni over the levels) sd of the S-curve
    z = stats.norm.ppf(1 - 1e-3 / len(result.levels) / 2)
    for row in result.levels:
        achieved = np.array([p.achieved for p in corpus.pairs if p.target == row.target])
        p = minhash.candidate_probability(achieved, options.bands, options.rows)
        assert row.predicted == pytest.approx(p.mean())
        assert abs(row.measured * row.pairs - p.sum()) <= z * np.sqrt(np.sum(p * (1 - p))) + 1


def flood_clusters(ids, pairs):
    """id -> a frozenset of its component, by breadth-first flooding (independent of union-find)."""
    neighbours = {i: set() for i in ids}
    for a, b in pairs:
        neighbours[a].add(b)
        neighbours[b].add(a)
    out = {}
    for start in ids:
        if start not in out:
            component, frontier = {start}, [start]
            while frontier:
                for v in neighbours[frontier.pop()] - component:
                    component.add(v)
                    frontier.append(v)
            out.update(dict.fromkeys(component, frozenset(component)))
    return out


def test_compare_with_datasketch(corpus):
    """The mean difference is within 5 of its sd; the mean |difference| near its expectation."""
    result = planted.compare_with_datasketch(corpus)
    texts = {d.id: d.text for d in corpus.documents}
    js = np.array([minhash.exact_jaccard(*(minhash.shingles(texts[i], 5) for i in (p.base, p.duplicate)))
                   for p in corpus.pairs])
    variance = 2 * js * (1 - js) / 128
    assert result.pairs == len(corpus.pairs)
    assert abs(result.mean_difference) <= 5 * np.sqrt(variance.sum()) / len(js)
    # |d| has variance <= E d^2 = 2 J (1 - J) / k per pair: the mean of |d| is within 5 sd of its mean
    assert abs(result.mean_abs_difference - result.expected_mean_abs_difference) <= 5 * np.sqrt(variance.sum()) / len(js)


def result_sample_ids(corpus, size, seed):
    return [i for i, _ in planted._sample_clusters(corpus, size, seed)]


def test_bad_requests():
    with pytest.raises(ValueError, match="need planted <= num_bases <= texts"):
        planted.generate(num_bases=10, duplicates_per_level=5)
    small = planted.generate(num_bases=12, levels=(0.8,), duplicates_per_level=2, exact_copies=1)
    with pytest.raises(ValueError, match="planted with 5-word shingles but the options use 3"):
        planted.measure(small, near_dedup.Options(shingle=3))
