"""rag.index: faiss flat and IVF (nprobe = nlist) against exact numpy search, save/load round trips,
atomic saving that never overwrites by accident, and one clear error per bad index directory."""

import json
import os

import numpy as np
import pytest

from rag.index import Hit, Index, read_manifest

K = 10
QUERIES = ["How do I raise an exception?", "What does the pass statement do?", "leave a loop early",
           "Which names are global?", "context manager enter and exit", "import a module from a package"]
# float32 inner products of unit 384-vectors: each summation order differs by a few ulp of 1.
SCORE_TOL = 1e-5


@pytest.fixture(scope="module")
def indexes(embedder, corpus):
    _, chunks, vectors = corpus
    nlist = 4
    return {"exact": Index.build(embedder, chunks, vectors_ND=vectors),
            "flat": Index.build(embedder, chunks, kind="flat", vectors_ND=vectors),
            "ivf": Index.build(embedder, chunks, kind="ivf", nlist=nlist, nprobe=nlist, vectors_ND=vectors)}


@pytest.fixture(scope="module")
def queries(embedder):
    return embedder.encode(QUERIES)


def _float64_topk(vectors, queries, k):
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return np.sort(scores, axis=1)[:, ::-1][:, :k]


def _assert_same_ranking(ids, scores, ref_ids, ref_scores):
    np.testing.assert_allclose(scores, ref_scores, atol=SCORE_TOL)
    # Ids must agree wherever the reference's neighbouring scores are apart (ties may swap).
    gap_before = np.diff(ref_scores, axis=1, prepend=np.inf)
    gap_after = np.diff(ref_scores, axis=1, append=-np.inf)
    clear = (np.abs(gap_before) > 2 * SCORE_TOL) & (np.abs(gap_after) > 2 * SCORE_TOL)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ids[clear], ref_ids[clear])


@pytest.mark.parametrize("kind", ["exact", "flat", "ivf"])
def test_every_kind_ranks_as_float64_exact_search(indexes, corpus, queries, kind):
    ids, scores = indexes[kind].search_vectors(queries, K)
    ref_ids, ref_scores = indexes["exact"].search_vectors(queries, K)
    np.testing.assert_allclose(scores, _float64_topk(corpus[2], queries, K), atol=SCORE_TOL)
    _assert_same_ranking(ids, scores, ref_ids, ref_scores)


def test_ivf_with_few_probes_scans_fewer_cells(indexes, queries, embedder, corpus):
    ivf = Index.build(embedder, corpus[1], kind="ivf", nlist=4, nprobe=1, vectors_ND=corpus[2])
    ids, _ = ivf.search_vectors(queries, K)
    exact_ids, _ = indexes["exact"].search_vectors(queries, K)
    assert (ids == exact_ids).mean() < 1.0  # one cell of four: some true neighbours are missed


def test_search_returns_ranked_hits_of_the_chunks(indexes, corpus):
    hits = indexes["exact"].search(QUERIES[:2], 3)
    assert [len(h) for h in hits] == [3, 3]
    assert all(isinstance(h, Hit) for h in hits[0]) and [h.rank for h in hits[0]] == [1, 2, 3]
    assert hits[0][0].score >= hits[0][1].score >= hits[0][2].score
    assert "raise" in {h.chunk.doc_id for h in hits[0]} and hits[1][0].chunk.doc_id == "pass"
    assert len(indexes["flat"].search(["x"], len(corpus[1]) + 5)[0]) == len(corpus[1])  # k > N: all chunks


@pytest.mark.parametrize("kind", ["exact", "flat", "ivf"])
def test_save_load_round_trip(tmp_path, indexes, embedder, queries, kind):
    index = indexes[kind]
    index.save(str(tmp_path / "index"))
    manifest = read_manifest(str(tmp_path / "index"))
    assert manifest["kind"] == kind and manifest["embedder"]["path"] == embedder.name
    loaded = Index.load(str(tmp_path / "index"), embedder)
    assert loaded.chunks == index.chunks and (loaded.nlist, loaded.nprobe) == (index.nlist, index.nprobe)
    for a, b in zip(loaded.search_vectors(queries, K), index.search_vectors(queries, K)):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no temporary directory left behind


def test_load_finds_the_embedder_the_manifest_names(tmp_path, indexes):
    indexes["flat"].save(str(tmp_path / "index"))
    loaded = Index.load(str(tmp_path / "index"))
    assert loaded.embedder.name == indexes["flat"].embedder.name
    assert [h.chunk for h in loaded.search(QUERIES[:1], 2)[0]] == [h.chunk for h in indexes["flat"].search(
        QUERIES[:1], 2)[0]]


def test_save_never_overwrites_without_asking(tmp_path, indexes):
    target = tmp_path / "index"
    indexes["exact"].save(str(target))
    before = (target / "chunks.jsonl").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        indexes["flat"].save(str(target))
    assert (target / "chunks.jsonl").read_text() == before and read_manifest(str(target))["kind"] == "exact"
    indexes["flat"].save(str(target), overwrite=True)
    assert read_manifest(str(target))["kind"] == "flat" and sorted(os.listdir(tmp_path)) == ["index"]


def test_bad_directories_get_one_clear_error(tmp_path, indexes, embedder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Index.load(str(tmp_path / "nowhere"), embedder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an lmlab RAG index"):
        Index.load(str(tmp_path / "empty"), embedder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an lmlab RAG index manifest"):
        Index.load(str(tmp_path / "other"), embedder)
    indexes["ivf"].save(str(tmp_path / "partial"))
    os.remove(tmp_path / "partial" / "index.faiss")
    with pytest.raises(ValueError, match="lacks index.faiss"):
        Index.load(str(tmp_path / "partial"), embedder)
    indexes["exact"].save(str(tmp_path / "short"))
    lines = (tmp_path / "short" / "chunks.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "short" / "chunks.jsonl").write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="manifest says"):
        Index.load(str(tmp_path / "short"), embedder)


def test_bad_build_arguments(embedder, corpus):
    _, chunks, vectors = corpus
    with pytest.raises(ValueError, match="unknown index kind"):
        Index.build(embedder, chunks, kind="hnsw", vectors_ND=vectors)
    with pytest.raises(ValueError, match="nlist"):
        Index.build(embedder, chunks, kind="ivf", nlist=len(chunks) + 1, vectors_ND=vectors)
    with pytest.raises(ValueError, match="nprobe"):
        Index.build(embedder, chunks, kind="ivf", nlist=4, nprobe=5, vectors_ND=vectors)
    with pytest.raises(ValueError, match="apply to kind='ivf' only"):
        Index.build(embedder, chunks, kind="flat", nlist=4, vectors_ND=vectors)
