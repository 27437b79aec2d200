"""Retrieval recall@k on the embedded corpus's question set (`rag.questions`), exact vs IVF.

The pydoc topics are chunked on the embedder's tokenizer and embedded once; the same vectors
back an exact index and IVF indexes at several nprobe. For each question the top-k hits are
correct when one of them overlaps the question's answer paragraph (`questions.answers`).

Reported per index and k in KS:
  * recall@k: the fraction of questions with a correct chunk in the top k;
  * vs exact: IVF's top-k ids that are also in exact's top k, averaged (1.0 = same sets).

    rows = recall_table(embedder)                   # list of dicts
    print(format_table(rows))
    python -m rag eval --embedding_model=DIR [--quick]
"""

from __future__ import annotations

import time

import numpy as np

from rag.chunk import Document, chunk_documents
from rag.index import Index, default_nlist
from rag.questions import answers, make_questions

KS = (1, 5, 10)
QUICK_TOPICS = 12  # --quick: the first topics (by name) that hold questions


def _corpus(quick: bool) -> tuple[list[Document], list]:
    from pydoc_data.topics import topics

    questions = make_questions(topics)
    if quick:
        keep = sorted({q.doc_id for q in questions})[:QUICK_TOPICS]
        topics = {key: topics[key] for key in keep}
        questions = [q for q in questions if q.doc_id in topics]
    return [Document(key, topics[key], "pydoc_data.topics") for key in sorted(topics)], questions


def recall_table(embedder, *, quick: bool = False, window: int = 128, stride: int = 96, nlist: int | None = None,
                 nprobes: tuple[int, ...] | None = None) -> tuple[list[dict], dict]:
    """Recall@k of exact and IVF retrieval on the question set.

    Args:
      embedder: the `rag.embed.Embedder`.
      quick: only the first QUICK_TOPICS topics holding questions (for tests).
      window, stride: chunking (tokens).
      nlist: IVF cells (default `default_nlist` of the chunk count).
      nprobes: IVF cells scanned (default 1, nlist // 8, nlist // 4 and nlist, deduplicated).

    Returns:
      (rows, info): rows {"index", "nprobe", "recall@k"..., "vs_exact@k"...}; info {"chunks",
      "questions", "nlist", "embed_s"}.
    """
    docs, questions = _corpus(quick)
    chunks = chunk_documents(docs, embedder.tokenizer, window=window, stride=stride)
    start = time.perf_counter()
    vectors = embedder.encode([c.text for c in chunks])
    embed_s = time.perf_counter() - start
    queries = embedder.encode([q.text for q in questions])
    nlist = nlist or default_nlist(len(chunks))
    nprobes = nprobes or tuple(dict.fromkeys(max(1, p) for p in (1, nlist // 8, nlist // 4, nlist)))
    kmax = max(KS)
    exact = Index.build(embedder, chunks, kind="exact", vectors_ND=vectors)
    exact_ids, _ = exact.search_vectors(queries, kmax)
    rows = [_row("exact", None, exact_ids, exact_ids, chunks, questions)]
    ivf = Index.build(embedder, chunks, kind="ivf", nlist=nlist, nprobe=nprobes[0], vectors_ND=vectors)
    for nprobe in nprobes:
        ivf.set_nprobe(nprobe)
        rows.append(_row("ivf", nprobe, ivf.search_vectors(queries, kmax)[0], exact_ids, chunks, questions))
    return rows, {"chunks": len(chunks), "questions": len(questions), "nlist": nlist, "embed_s": embed_s}


def _row(kind: str, nprobe: int | None, ids_QK: np.ndarray, exact_QK: np.ndarray, chunks, questions) -> dict:
    row = {"index": kind, "nprobe": nprobe}
    for k in KS:
        hit = [any(i >= 0 and answers(q, chunks[i]) for i in ids[:k]) for q, ids in zip(questions, ids_QK)]
        row[f"recall@{k}"] = float(np.mean(hit))
        row[f"vs_exact@{k}"] = float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids_QK, exact_QK)]))
    return row


def format_table(rows: list[dict], info: dict) -> str:
    """A markdown table of `recall_table`'s rows, with the corpus sizes above it."""
    head = (f"{info['questions']} questions over {info['chunks']} chunks (IVF nlist={info['nlist']}; "
            f"chunks embedded in {info['embed_s']:.1f} s)")
    cols = [f"recall@{k}" for k in KS] + [f"vs_exact@{k}" for k in KS]
    lines = [head, "", "| index | nprobe | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row['index']} | {row['nprobe'] or '-'} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)
