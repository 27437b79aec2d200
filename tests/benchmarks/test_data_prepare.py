"""`python benchmarks/data_prepare.py --quick` runs as a script and its numbers hold what they must:
the pipeline's counts add up (read = kept + dropped = the corpus written), 1 and 2 workers write
byte-identical shards, the LSH table equals `planted.measure` recomputed on the regenerated
corpus, planted pairs at Jaccard 0.9 are found as often as the S-curve's binomial allows, and
our MinHash agrees with datasketch's and with exact Jaccard within bounds derived from the
estimators' standard deviation sqrt(J (1 - J) / num_perm).

No wall-clock time or speed ratio is asserted (those live in the benchmark's printout)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from data.prepare import langid, minhash, near_dedup, planted

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A bound is broken by chance with probability below this (a binomial tail, or ~6 sigma).
FAILURE_PROBABILITY = 1e-6
SIGMAS = 6.0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_prepare")
    # As a script, from the repository root: sys.path[0] is benchmarks/, so its file names must shadow nothing.
    result = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "data_prepare.py"), "--quick", f"--json={root / 'r.json'}",
         f"--dir={root}"], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(root / "r.json", encoding="utf-8") as f:
        return {**json.load(f), "stdout": result.stdout}


def test_pipeline_counts_add_up_and_workers_agree(results):
    corpus = results["corpus"]
    assert corpus["documents"] == sum(corpus["kinds"].values()) > 200
    runs = results["runs"]
    assert set(runs) == {"all_1", "all_2"}
    for run in runs.values():
        assert run["documents_read"] == corpus["documents"]
        assert run["documents_kept"] + run["documents_dropped"] == run["documents_read"]
        assert sum(run["dropped_by_stage"].values()) == run["documents_dropped"]
        assert run["dead_letter_entries"] == 0
        assert run["documents_per_second"] > 0 and run["megabytes_per_second"] > 0
        assert math.isclose(run["megabytes_per_second"] / run["documents_per_second"],
                            corpus["megabytes"] / corpus["documents"], rel_tol=1e-9)
    # Split and shard are functions of the document id: the files are the same whatever the workers.
    assert runs["all_1"]["shards"] and runs["all_1"]["shards"] == runs["all_2"]["shards"]
    assert runs["all_1"]["dropped_by_stage"] == runs["all_2"]["dropped_by_stage"]
    assert results["identical_shards"] is True
    assert "scaling, 2 workers / 1 worker" in results["stdout"] and "byte-identical" in results["stdout"]


def _same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture(scope="module")
def corpus(results):
    return planted.generate(**results["planted"])


def test_lsh_table_is_planted_measure_recomputed(results, corpus):
    lsh = results["lsh"]
    options = near_dedup.Options()
    again = planted.measure(corpus, options, sample_documents=results["sample_documents"],
                            seed=results["planted"]["seed"])
    assert (lsh["num_perm"], lsh["bands"], lsh["rows"]) == (options.num_perm, options.bands, options.rows)
    assert lsh["sampled_pairs"] == again.sampled_pairs == again.sampled_documents * (again.sampled_documents - 1) // 2
    for printed, row in zip(lsh["levels"] + lsh["thresholds"], again.levels + again.thresholds, strict=True):
        assert all(_same(printed[k], v) for k, v in row.__dict__.items()), (printed, row)
    assert [r["target"] for r in lsh["levels"]] == list(planted.LEVELS)


def test_planted_pairs_at_0_9_are_found_as_the_s_curve_allows(results, corpus):
    level = next(r for r in results["lsh"]["levels"] if r["target"] == 0.9)
    options = near_dedup.Options()
    achieved = [p.achieved for p in corpus.pairs if p.target == 0.9]
    # Each pair is missed with probability (1 - J^r)^b <= that at the smallest achieved J: misses
    # are at most Binomial(n, p_miss); allow the fewest misses m with P(X > m) < FAILURE_PROBABILITY.
    p_miss = float(1 - minhash.candidate_probability(min(achieved), options.bands, options.rows))
    n = len(achieved)
    allowed = next(m for m in range(n + 1) if sum(math.comb(n, x) * p_miss ** x * (1 - p_miss) ** (n - x)
                                                  for x in range(m + 1, n + 1)) < FAILURE_PROBABILITY)
    assert allowed < n  # the bound says something
    assert round((1 - level["measured"]) * n) <= allowed, (level, p_miss)


def test_our_minhash_agrees_with_datasketch_and_exact_jaccard(results, corpus):
    pytest.importorskip("datasketch")
    sketch = results["lsh"]["datasketch"]
    num_perm = results["lsh"]["num_perm"]
    exact = np.array([p.achieved for p in corpus.pairs])
    assert sketch["pairs"] == len(exact)
    n = len(exact)
    # Each estimate is unbiased with variance J (1 - J) / k; ours and datasketch's use independent hashes.
    variance_one = exact * (1 - exact) / num_perm
    # |X| of a centred normal with variance s^2: mean sqrt(2/pi) s, variance (1 - 2/pi) s^2.
    for mean_abs, variance in ((sketch["mean_abs_difference"], 2 * variance_one),
                               (sketch["ours_mean_abs_error"], variance_one),
                               (sketch["datasketch_mean_abs_error"], variance_one)):
        expected = float(np.mean(np.sqrt(2 / np.pi * variance)))
        spread = float(np.sqrt(np.sum((1 - 2 / np.pi) * variance))) / n
        assert mean_abs <= expected + SIGMAS * spread, (mean_abs, expected, spread)
    assert math.isclose(sketch["expected_mean_abs_difference"], float(np.mean(np.sqrt(4 / np.pi * variance_one))),
                        rel_tol=1e-9)
    assert abs(sketch["mean_difference"]) <= SIGMAS * float(np.sqrt(np.sum(2 * variance_one))) / n


def test_langid_line_is_the_keep_list_scores(results):
    lang = results["langid"]
    if lang is None:
        pytest.importorskip("faker")
    assert lang["total"] == lang["per_language"] * (1 + len(langid.FAKER_LOCALES))
    assert lang["keep"] == ["en"]  # the keep-list is one language: its scores are English's
    assert _same(lang["keep_precision"], lang["precision"]["en"]) and _same(lang["keep_recall"], lang["recall"]["en"])
    assert 0 <= lang["keep_precision"] <= 1 and 0 <= lang["keep_recall"] <= 1
