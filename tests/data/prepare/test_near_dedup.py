"""near_dedup: the Beam pipeline equals plain-Python union-find over the same LSH candidate pairs,
deterministically, with 2 workers as with 1; components on long chains; option errors."""

import argparse
import collections
import json
import operator

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from data.prepare import minhash, near_dedup, planted, stage
from data.prepare.components import ConnectedComponents
from data.prepare.stage import Document

OPTIONS = near_dedup.Options()
VERIFIED = near_dedup.Options(verify=0.75)


def make_corpus():
    """Planted pairs and exact copies, chains of near-duplicates (A~B~C..., ends dissimilar), a wordless doc."""
    corpus = planted.generate(num_bases=60, duplicates_per_level=8, exact_copies=5, seed=3)
    documents = list(corpus.documents)
    texts = planted.base_texts()
    vocab = planted.vocabulary(texts)
    rng = np.random.default_rng(7)
    for chain in range(3):
        text = texts[-1 - chain]
        for link in range(8):
            documents.append(Document(f"chain{chain}:{link:02d}", text))
            text, _ = planted.near_duplicate(text, 0.9, 5, rng, vocab)
    documents.append(Document("empty:0", "!!! ... ???"))
    return documents


def union_find_kept(ids, pairs):
    """(kept ids, clusters of 2+) by plain union-find: planted's ground-truth clustering, which shares
    no code with the Beam stage's large-star/small-star rounds."""
    labels = planted._cluster_labels(ids, pairs)
    sizes = collections.Counter(labels.values())
    return set(sizes), sum(n > 1 for n in sizes.values())


def run_dedup(documents, options, out_dir, workers=1):
    """Runs NearDedup; returns (kept ids, dropped tuples, counters)."""
    mode = "multi_processing" if workers > 1 else "in_memory"
    pipeline = beam.Pipeline(options=PipelineOptions(direct_num_workers=workers, direct_running_mode=mode))
    result = pipeline | beam.Create(documents) | near_dedup.NearDedup(options)
    result.kept | "ids" >> beam.Map(operator.attrgetter("id")) | "write kept" >> beam.io.WriteToText(
        str(out_dir / "kept"), shard_name_template="")
    result.dropped | "json" >> beam.Map(json.dumps) | "write dropped" >> beam.io.WriteToText(
        str(out_dir / "dropped"), shard_name_template="")
    run = pipeline.run()
    run.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in run.metrics().query(MetricsFilter().with_namespace("data.prepare.minhash"))["counters"]}
    kept = sorted((out_dir / "kept").read_text().split())
    dropped = sorted(tuple(json.loads(line)) for line in (out_dir / "dropped").read_text().splitlines())
    return kept, dropped, counters


@pytest.fixture(scope="module")
def documents():
    return make_corpus()


@pytest.fixture(scope="module")
def runs(documents, tmp_path_factory):
    """The same input through NearDedup: twice on 1 worker, once on 2 workers, once verified."""
    return {name: run_dedup(documents, options, tmp_path_factory.mktemp(name), workers)
            for name, options, workers in (("one", OPTIONS, 1), ("again", OPTIONS, 1), ("two", OPTIONS, 2),
                                           ("verified", VERIFIED, 1))}


def reference(documents, options):
    hasher = minhash.MinHasher(options.shingle, options.num_perm, options.seed)
    signatures = {d.id: hasher(d.text) for d in documents}
    pairs = minhash.candidate_pairs(signatures, options.bands, options.rows, options.verify)
    kept, clusters = union_find_kept([d.id for d in documents], pairs)
    return signatures, kept, clusters


@pytest.mark.parametrize("name,options", [("one", OPTIONS), ("verified", VERIFIED)])
def test_beam_equals_union_find_reference(documents, runs, name, options):
    kept, dropped, counters = runs[name]
    _, want_kept, clusters = reference(documents, options)
    assert kept == sorted(want_kept)
    assert dropped == sorted((d.id, "minhash", "near_duplicate") for d in documents if d.id not in want_kept)
    assert counters["documents"] == len(documents)
    assert counters["no_shingles"] == 1
    assert counters["kept"] == len(want_kept) and counters["dropped"] == len(documents) - len(want_kept)
    assert counters["clusters"] == clusters
    assert counters.get("unconverged_nodes", 0) == 0
    for chain in range(3):  # each chain (links at J ~ 0.9, ends far apart) is one cluster
        assert f"chain{chain}:00" in kept and not any(f"chain{chain}:{link:02d}" in kept for link in range(1, 8))
    if options.verify:
        assert counters["rejected_pairs"] > 0


def test_candidate_pairs_counter_counts_the_distinct_star_edges(documents, runs):
    signatures, _, _ = reference(documents, OPTIONS)
    buckets = {}
    for doc_id, sig in signatures.items():
        if sig is not None:
            for key in minhash.band_keys(sig, OPTIONS.bands, OPTIONS.rows):
                buckets.setdefault(key, []).append(doc_id)
    edges = {(min(m), other) for m in buckets.values() for other in m if other != min(m)}
    assert runs["one"][2]["candidate_pairs"] == len(edges)


def test_deterministic_and_two_workers_equal_one(runs):
    assert runs["one"] == runs["again"]
    assert runs["one"][:2] == runs["two"][:2]
    assert runs["one"][2] == runs["two"][2]


def test_planted_duplicates_are_found(documents, runs):
    """Exact copies and the 0.9 pairs are in the reference's clusters (P(candidate | 0.9) ~ 1)."""
    corpus = planted.generate(num_bases=60, duplicates_per_level=8, exact_copies=5, seed=3)
    kept = set(runs["one"][0])
    for base, copy in corpus.exact:
        assert not (base in kept and copy in kept)
    for pair in corpus.pairs:
        if pair.target == 0.9:
            assert not (pair.base in kept and pair.duplicate in kept)


def components_pipeline(graphs, out_dir):
    """Runs ConnectedComponents over each (name, edges, rounds); returns labels and counters per name."""
    pipeline = beam.Pipeline()
    for name, edges, rounds in graphs:
        (pipeline | f"{name} edges" >> beam.Create(edges)
         | f"{name} components" >> ConnectedComponents(rounds, f"test.{name}", label=f"{name} cc")
         | f"{name} json" >> beam.Map(json.dumps)
         | f"{name} write" >> beam.io.WriteToText(str(out_dir / name), shard_name_template=""))
    run = pipeline.run()
    run.wait_until_finish()
    out = {}
    for name, _, _ in graphs:
        counters = {c.key.metric.name: c.committed
                    for c in run.metrics().query(MetricsFilter().with_namespace(f"test.{name}"))["counters"]}
        out[name] = dict(tuple(json.loads(line)) for line in (out_dir / name).read_text().splitlines()), counters
    return out


def test_connected_components_on_chains_and_random_graphs(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"n{i:04d}" for i in rng.permutation(500)]
    path = [(names[i], names[i + 1]) for i in range(199)]  # a 200-node chain in shuffled id order
    random_graph = [(names[200 + a], names[200 + b]) for a, b in rng.integers(0, 300, size=(220, 2))]
    edges = path + random_graph + [path[5], path[5][::-1]]  # repeats and reversed edges are harmless
    got = components_pipeline([("full", edges, near_dedup.Options().rounds), ("short", path, 1)], tmp_path)
    nodes = {n for e in edges for n in e if e[0] != e[1]}
    _, want_clusters = union_find_kept(sorted(nodes), edges)
    smallest = {}
    for node in nodes:  # the component minimum, by brute-force flooding
        if node not in smallest:
            component, frontier = {node}, [node]
            while frontier:
                current = frontier.pop()
                for a, b in edges:
                    for u, v in ((a, b), (b, a)):
                        if u == current and v not in component:
                            component.add(v)
                            frontier.append(v)
            smallest.update({n: min(component) for n in component})
    labels, counters = got["full"]
    assert labels == smallest
    assert counters["clusters"] == want_clusters and counters.get("unconverged_nodes", 0) == 0
    short, short_counters = got["short"]  # one round cannot finish a 200-node chain: said, never over-merged
    assert short_counters["unconverged_nodes"] > 0
    chain_min = min(n for e in path for n in e)
    assert short[chain_min] == chain_min and all(chain_min <= label <= node for node, label in short.items())


@pytest.mark.parametrize("kwargs,message", [
    ({"bands": 20, "rows": 8}, "bands \\* --minhash_rows = 160 exceeds --minhash_num_perm = 128"),
    ({"rows": 0}, "--minhash_rows must be >= 1"),
    ({"verify": 1.5}, "--minhash_verify must be a Jaccard in \\[0, 1\\]"),
])
def test_bad_options_fail_with_the_flag_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        near_dedup.Options(**kwargs)


def test_flags_round_trip_and_check():
    """The options as `--minhash_<field>` flags (stage.add_arguments); a bad combination fails when built."""
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser, "minhash", near_dedup.Options)
    args = parser.parse_args(["--minhash_bands=8", "--minhash_rows=16", "--minhash_verify=0.8"])
    assert stage.options_from(args, "minhash", near_dedup.Options) == near_dedup.Options(bands=8, rows=16, verify=0.8)
    with pytest.raises(ValueError, match="lower bands or rows, or raise num_perm"):
        stage.options_from(parser.parse_args(["--minhash_bands=32"]), "minhash", near_dedup.Options)
