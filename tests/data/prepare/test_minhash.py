"""minhash: exact modular hashing, estimates within their binomial bounds of exact Jaccard and of
datasketch's, and LSH candidate rates on the S-curve."""

import os
import subprocess
import sys

import datasketch
import numpy as np
import pytest
from scipy import stats

from data.prepare import minhash, planted

NUM_PERM = 128
ALPHA = 1e-3  # family-wise false-alarm rate of each statistical test below (Bonferroni over its cases)


@pytest.fixture(scope="module")
def corpus():
    return planted.generate(num_bases=60, duplicates_per_level=8, exact_copies=5, seed=3)


def pair_sets(corpus):
    texts = {d.id: d.text for d in corpus.documents}
    return [(minhash.shingles(texts[p.base], 5), minhash.shingles(texts[p.duplicate], 5)) for p in corpus.pairs]


def test_mul_mod_is_exact():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(1, minhash.MERSENNE_PRIME, 200, dtype=np.uint64),
                        np.array([1, minhash.MERSENNE_PRIME - 1], np.uint64)])
    x = np.concatenate([rng.integers(0, 1 << 32, 50, dtype=np.uint64), np.array([0, (1 << 32) - 1], np.uint64)])
    got = minhash._mul_mod(a[:, None], x[None, :])
    want = [[int(ai) * int(xi) % minhash.MERSENNE_PRIME for xi in x] for ai in a]
    assert got.tolist() == want


def test_signature_is_the_minimum_of_the_permuted_hashes():
    a, b = minhash.permutations(16, seed=5)
    hashes = [minhash.hash32(s) for s in ("alpha beta", "beta gamma", "gamma delta")]
    want = [min((int(ai) * h + int(bi)) % minhash.MERSENNE_PRIME for h in hashes) for ai, bi in zip(a, b)]
    assert minhash.signature(np.array(hashes, np.uint64), a, b).tolist() == want
    chunked = minhash.signature(np.arange(10_000, dtype=np.uint64), a, b)  # crosses the chunk size
    assert chunked.tolist() == [min((int(ai) * h + int(bi)) % minhash.MERSENNE_PRIME for h in range(10_000))
                                for ai, bi in zip(a, b)]


def test_shingles_normalization():
    assert minhash.words("Hello, World!  It's_fine-ish") == ["hello", "world", "it", "s", "fine", "ish"]
    assert minhash.shingles("A b. C d e", 3) == {"a b c", "b c d", "c d e"}
    assert minhash.shingles("Too short!", 5) == {"too short"}
    assert minhash.shingles(" ... ", 5) == set()
    assert minhash.MinHasher(5, 8, 0)("?!") is None
    assert minhash.exact_jaccard({"a", "b"}, {"b", "c"}) == 1 / 3


def test_signatures_are_the_same_in_another_process():
    """No salted hash(): a worker with another PYTHONHASHSEED signs identically."""
    text = "the same words give the same signature on every worker of a pipeline"
    code = ("from data.prepare import minhash; "
            f"print(minhash.MinHasher(5, 32, 7)({text!r}).tolist())")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.getcwd())
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(minhash.MinHasher(5, 32, 7)(text).tolist())


def test_estimate_within_binomial_bounds_of_exact_jaccard(corpus):
    """The number of agreeing entries is Binomial(num_perm, J): each estimate lies in its
    two-sided (ALPHA / pairs) quantiles, and the mean error over pairs within 5 of its sd."""
    a, b = minhash.permutations(NUM_PERM, seed=11)
    errors, variances, sets = [], [], pair_sets(corpus)
    for left, right in sets:
        j = minhash.exact_jaccard(left, right)
        sig = [minhash.signature(np.array([minhash.hash32(s) for s in x], np.uint64), a, b) for x in (left, right)]
        agree = round(minhash.estimate_jaccard(*sig) * NUM_PERM)
        low, high = stats.binom.ppf([ALPHA / len(sets) / 2, 1 - ALPHA / len(sets) / 2], NUM_PERM, j)
        assert low <= agree <= high, (j, agree)
        errors.append(agree / NUM_PERM - j)
        variances.append(j * (1 - j) / NUM_PERM)
    assert abs(np.mean(errors)) <= 5 * np.sqrt(np.sum(variances)) / len(errors)


def test_estimates_agree_with_datasketch(corpus):
    """Ours and datasketch's (independent hash functions, both unbiased) differ by less than
    z sqrt(2 J (1 - J) / num_perm) with z Bonferroni-safe over the pairs; identical sets agree exactly."""
    hasher = minhash.MinHasher(5, NUM_PERM, seed=1)
    sets = pair_sets(corpus)
    z = stats.norm.ppf(1 - ALPHA / len(sets) / 2)
    differences, variances = [], []
    for left, right in sets:
        j = minhash.exact_jaccard(left, right)
        ours = [minhash.signature(np.array([minhash.hash32(s) for s in x], np.uint64), hasher.a, hasher.b)
                for x in (left, right)]
        theirs = [datasketch.MinHash(num_perm=NUM_PERM, seed=1) for _ in range(2)]
        for sketch, items in zip(theirs, (left, right)):
            sketch.update_batch([s.encode("utf-8") for s in items])
        difference = minhash.estimate_jaccard(*ours) - theirs[0].jaccard(theirs[1])
        assert abs(difference) <= z * np.sqrt(2 * j * (1 - j) / NUM_PERM) + 1e-12, (j, difference)
        differences.append(difference)
        variances.append(2 * j * (1 - j) / NUM_PERM)
    assert abs(np.mean(differences)) <= 5 * np.sqrt(np.sum(variances)) / len(differences)
    print(f"mean |ours - datasketch| over {len(sets)} pairs: {np.mean(np.abs(differences)):.4f}")


def test_lsh_candidate_rate_follows_the_s_curve(corpus):
    """For a fixed pair, each seed is an independent trial with success probability P(J): the
    count over pairs x seeds is Poisson-binomial; it lies within z of its sd of the S-curve's sum."""
    bands, rows, seeds = 8, 4, 60
    sets = pair_sets(corpus)
    z = stats.norm.ppf(1 - ALPHA / len(planted.LEVELS) / 2)
    for level in planted.LEVELS:
        chosen = [(left, right) for (left, right), p in zip(sets, corpus.pairs) if p.target == level]
        js = np.array([minhash.exact_jaccard(left, right) for left, right in chosen])
        hashes = [[np.array([minhash.hash32(s) for s in x], np.uint64) for x in pair] for pair in chosen]
        hits = 0
        for seed in range(seeds):
            a, b = minhash.permutations(bands * rows, seed)
            for left, right in hashes:
                keys = [set(minhash.band_keys(minhash.signature(h, a, b), bands, rows)) for h in (left, right)]
                hits += bool(keys[0] & keys[1])
        p = minhash.candidate_probability(js, bands, rows)
        expected, sd = seeds * p.sum(), np.sqrt(seeds * np.sum(p * (1 - p)))
        assert abs(hits - expected) <= z * sd + 1, (level, hits, expected, sd)


def test_threshold_and_band_errors():
    for bands, rows in ((16, 8), (20, 5), (9, 13)):
        s = minhash.threshold(bands, rows)
        assert s ** rows == pytest.approx(1 / bands)
        assert minhash.candidate_probability(s, bands, rows) == pytest.approx(1 - (1 - 1 / bands) ** bands)
    with pytest.raises(ValueError, match="bands \\* rows = 136 exceeds"):
        minhash.band_keys(np.zeros(128, np.uint64), 17, 8)
    with pytest.raises(ValueError, match="different lengths"):
        minhash.estimate_jaccard(np.zeros(3, np.uint64), np.zeros(4, np.uint64))


def test_candidate_pairs_are_the_pairs_sharing_a_band():
    sig = {"a": np.array([1, 2, 3, 4], np.uint64), "b": np.array([1, 2, 9, 9], np.uint64),
           "c": np.array([7, 7, 3, 4], np.uint64), "d": None}
    assert minhash.candidate_pairs(sig, bands=2, rows=2) == {("a", "b"), ("a", "c")}
    assert minhash.candidate_pairs(sig, bands=2, rows=2, verify=0.6) == set()
    assert minhash.candidate_pairs(sig, bands=1, rows=2) == {("a", "b")}
