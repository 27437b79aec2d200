"""A vector index over chunk embeddings: exact (numpy), faiss flat, or faiss IVF; saved and loaded.

Axis letters: N chunks, Q queries, D embedding width, K hits per query.

Scores are inner products of unit vectors (cosine similarity).
  * `exact`: every chunk scored in numpy (float32 matmul); ties keep chunk order.
  * `flat`: `faiss.IndexFlatIP`, the same exhaustive search in faiss.
  * `ivf`: `faiss.IndexIVFFlat`: a k-means coarse quantizer of `nlist` cells trained on the chunk
    embeddings; a query scans the `nprobe` nearest cells (nprobe = nlist scans all: exact again).

    index = Index.build(embedder, chunks, kind="ivf", nlist=64, nprobe=8)
    hits = index.search(["how do I open a file?"], k=5)[0]      # [Hit(chunk, score, rank=1), ...]
    index.save("my_index")                                      # manifest.json, chunks.jsonl, vectors
    index = Index.load("my_index")                              # loads the embedder it names

A saved index is a directory: `manifest.json` (format, kind, nlist, nprobe, the embedder's path,
dim and max_tokens, chunk count), `chunks.jsonl` (one chunk per line, in vector order) and
`index.faiss` (faiss.write_index) or `vectors.npy` (exact). It is written into a temporary
sibling directory and renamed into place, by process 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from rag.chunk import Chunk

KINDS = ("exact", "flat", "ivf")
FORMAT = "lmlab-rag-index"
MANIFEST, CHUNKS, FAISS_FILE, VECTORS = "manifest.json", "chunks.jsonl", "index.faiss", "vectors.npy"

__all__ = ["KINDS", "Chunk", "Hit", "Index", "default_nlist"]


@dataclasses.dataclass(frozen=True)
class Hit:
    """A retrieved chunk, its score (inner product) and rank (1 = best)."""

    chunk: Chunk
    score: float
    rank: int


def default_nlist(num_chunks: int) -> int:
    """About sqrt(N) cells, with at least 39 training points per cell (faiss' k-means minimum)."""
    return max(1, min(round(math.sqrt(num_chunks)), num_chunks // 39))


def _faiss_index(kind: str, vectors_ND: np.ndarray, nlist: int, nprobe: int):
    import faiss

    dim = vectors_ND.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0  # reproducible k-means
        index.train(vectors_ND)
        index.nprobe = nprobe
    index.add(vectors_ND)
    return index


class Index:
    """Chunks, their embeddings and a search structure of one `kind` (see the module docstring)."""

    def __init__(self, embedder, chunks: Sequence[Chunk], kind: str, *, vectors_ND: np.ndarray | None = None,
                 faiss_index=None, nlist: int | None = None, nprobe: int | None = None):
        self.embedder, self.chunks, self.kind = embedder, list(chunks), kind
        self.vectors_ND, self.faiss_index, self.nlist, self.nprobe = vectors_ND, faiss_index, nlist, nprobe

    @classmethod
    def build(cls, embedder, chunks: Sequence[Chunk], *, kind: str = "exact", nlist: int | None = None,
              nprobe: int | None = None, vectors_ND: np.ndarray | None = None, batch_size: int = 32) -> Index:
        """Embeds the chunks (unless `vectors_ND` are given) and builds the index.

        Args:
          embedder: an `rag.embed.Embedder` (queries are embedded with it too).
          chunks: the chunks, in the order hits refer to.
          kind: 'exact', 'flat' or 'ivf'.
          nlist: IVF cells (default `default_nlist`); at most the number of chunks.
          nprobe: IVF cells scanned per query (default nlist // 4, at least 1).
          vectors_ND: precomputed chunk embeddings [N, D] (shared between indexes of one corpus).
          batch_size: chunks per embedder call.

        Returns:
          The Index.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        if not chunks:
            raise ValueError("no chunks to index; give documents with some text")
        if kind == "ivf":
            nlist = nlist or default_nlist(len(chunks))
            if not 1 <= nlist <= len(chunks):
                raise ValueError(f"nlist={nlist} must be between 1 and the number of chunks ({len(chunks)})")
            nprobe = nprobe or max(1, nlist // 4)
            if not 1 <= nprobe <= nlist:
                raise ValueError(f"nprobe={nprobe} must be between 1 and nlist={nlist}")
        elif nlist is not None or nprobe is not None:
            raise ValueError(f"nlist/nprobe apply to kind='ivf' only, not {kind!r}")
        if vectors_ND is None:
            vectors_ND = embedder.encode([c.text for c in chunks], batch_size=batch_size)
        vectors_ND = np.ascontiguousarray(vectors_ND, np.float32)
        if vectors_ND.shape != (len(chunks), embedder.dim):
            raise ValueError(f"vectors of shape {vectors_ND.shape} for {len(chunks)} chunks of dim {embedder.dim}")
        if kind == "exact":
            return cls(embedder, chunks, kind, vectors_ND=vectors_ND)
        return cls(embedder, chunks, kind, faiss_index=_faiss_index(kind, vectors_ND, nlist, nprobe),
                   nlist=nlist, nprobe=nprobe)

    def __len__(self) -> int:
        return len(self.chunks)

    def set_nprobe(self, nprobe: int) -> None:
        """IVF cells scanned per query from now on (1..nlist)."""
        if self.kind != "ivf" or not 1 <= nprobe <= self.nlist:
            raise ValueError(f"nprobe applies to an ivf index with 1 <= nprobe <= nlist; this is {self.kind!r} "
                             f"with nlist={self.nlist}")
        self.nprobe = self.faiss_index.nprobe = nprobe

    def search_vectors(self, queries_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k chunk ids and scores of embedded queries.

        Returns:
          (ids [Q, K] int64, -1 where fewer than k chunks were found; scores [Q, K] float32).
        """
        if k < 1:
            raise ValueError(f"k={k} must be at least 1")
        queries_QD = np.ascontiguousarray(queries_QD, np.float32)
        k_eff = min(k, len(self.chunks))
        if self.kind == "exact":
            scores_QN = queries_QD @ self.vectors_ND.T
            ids_QK = np.argsort(-scores_QN, axis=1, kind="stable")[:, :k_eff]
            scores_QK = np.take_along_axis(scores_QN, ids_QK, axis=1)
        else:
            scores_QK, ids_QK = self.faiss_index.search(queries_QD, k_eff)
        pad = k - k_eff
        return (np.pad(ids_QK.astype(np.int64), ((0, 0), (0, pad)), constant_values=-1),
                np.pad(scores_QK.astype(np.float32), ((0, 0), (0, pad)), constant_values=-np.inf))

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """The top-k hits of each query text (fewer when the index holds fewer chunks)."""
        if isinstance(queries, str):
            raise TypeError("search takes a sequence of query texts, not a single str; wrap it in a list")
        ids_QK, scores_QK = self.search_vectors(self.embedder.encode(queries), k)
        return [[Hit(self.chunks[i], float(s), rank) for rank, (i, s) in enumerate(zip(ids, scores), 1) if i >= 0]
                for ids, scores in zip(ids_QK, scores_QK)]

    def manifest(self) -> dict:
        """What `save` records in manifest.json."""
        return {"format": FORMAT, "version": 1, "kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe,
                "num_chunks": len(self.chunks), "embedder": {"path": self.embedder.name, "dim": self.embedder.dim,
                                                             "max_tokens": self.embedder.max_tokens}}

    def save(self, directory: str, *, overwrite: bool = False) -> None:
        """Writes the index directory atomically (process 0 only; see the module docstring).

        Args:
          directory: where to write; it must not exist unless `overwrite`.
          overwrite: replace an existing directory (only once the new one is complete).
        """
        import jax

        directory = os.path.abspath(directory)
        if os.path.exists(directory) and not overwrite:
            raise FileExistsError(f"{directory} already exists; pass overwrite=True (--overwrite) to replace it")
        if jax.process_index() != 0:
            return
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
        try:
            with open(os.path.join(tmp, CHUNKS), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(dataclasses.asdict(c), ensure_ascii=False) + "\n" for c in self.chunks)
            if self.kind == "exact":
                np.save(os.path.join(tmp, VECTORS), self.vectors_ND)
            else:
                import faiss

                faiss.write_index(self.faiss_index, os.path.join(tmp, FAISS_FILE))
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:  # last: marks it complete
                json.dump(self.manifest(), f, indent=1)
            if os.path.exists(directory):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old.", dir=parent)
                os.replace(directory, os.path.join(old, "index"))
                os.replace(tmp, directory)
                shutil.rmtree(old)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str, embedder=None) -> Index:
        """Loads a saved index.

        Args:
          directory: a directory written by `save`.
          embedder: the query embedder (default: `Embedder.load` of the path the manifest names);
            its dim must match.

        Returns:
          The Index.
        """
        manifest = read_manifest(directory)
        chunks = _read_chunks(directory, manifest["num_chunks"])
        if embedder is None:
            from rag.embed import Embedder

            path = manifest["embedder"]["path"]
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"index {directory} was built with the embedding model {path}, which is not "
                                        "there now; pass the model directory (--embedding_model)")
            embedder = Embedder.load(path, max_tokens=manifest["embedder"]["max_tokens"])
        if embedder.dim != manifest["embedder"]["dim"]:
            raise ValueError(f"index {directory} holds {manifest['embedder']['dim']}-dim vectors but the embedder "
                             f"gives {embedder.dim}; use the model it was built with ({manifest['embedder']['path']})")
        kind = manifest["kind"]
        if kind == "exact":
            vectors_ND = np.load(os.path.join(directory, VECTORS))
            if vectors_ND.shape != (len(chunks), embedder.dim):
                raise ValueError(f"{directory}/{VECTORS} has shape {vectors_ND.shape}, not "
                                 f"({len(chunks)}, {embedder.dim}); rebuild the index")
            return cls(embedder, chunks, kind, vectors_ND=vectors_ND)
        import faiss

        faiss_index = faiss.read_index(os.path.join(directory, FAISS_FILE))
        if faiss_index.ntotal != len(chunks) or faiss_index.d != embedder.dim:
            raise ValueError(f"{directory}/{FAISS_FILE} holds {faiss_index.ntotal} vectors of dim {faiss_index.d}, "
                             f"not {len(chunks)} of dim {embedder.dim}; rebuild the index")
        if kind == "ivf":
            faiss_index.nprobe = manifest["nprobe"]
        return cls(embedder, chunks, kind, faiss_index=faiss_index, nlist=manifest["nlist"], nprobe=manifest["nprobe"])


def read_manifest(directory: str) -> dict:
    """The manifest of a saved index, checked; one clear error for anything else."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"index directory {directory} does not exist; build one with `python -m rag build`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory} is not an lmlab RAG index (no readable {MANIFEST}: {e}); build one with "
                         "`python -m rag build`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") not in KINDS:
        raise ValueError(f"{path} is not an lmlab RAG index manifest (format {FORMAT!r}, kind in {KINDS})")
    needed = CHUNKS, VECTORS if manifest["kind"] == "exact" else FAISS_FILE
    missing = [name for name in needed if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise ValueError(f"index {directory} lacks {', '.join(missing)}; it is incomplete, rebuild it")
    return manifest


def _read_chunks(directory: str, expected: int) -> list[Chunk]:
    path = os.path.join(directory, CHUNKS)
    chunks = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                chunks.append(Chunk(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{n} is not a chunk record ({e}); rebuild the index") from e
    if len(chunks) != expected:
        raise ValueError(f"{path} holds {len(chunks)} chunks but the manifest says {expected}; rebuild the index")
    return chunks
