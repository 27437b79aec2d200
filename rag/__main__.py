"""Retrieval-augmented generation from the command line: build an index, ask it, measure recall.

    python -m rag build --docs=embedded --embedding_model=DIR --out=INDEX [--kind=ivf --nlist=32 --nprobe=8]
    python -m rag build --docs="notes/*.md,faq.jsonl" --embedding_model=DIR --out=INDEX --overwrite
    python -m rag ask --index=INDEX --checkpoint=PATH --question="What is a code block?" [--k=3]
    python -m rag eval --embedding_model=DIR [--quick]          # recall@1/5/10, exact vs IVF

DIR is a sentence-transformers (or Hugging Face BERT) directory such as all-MiniLM-L6-v2; PATH a
`python -m train` workdir or a Hugging Face decoder directory. `build` never replaces an existing
INDEX without --overwrite, and writes it atomically from process 0.
"""

import json
import os

from absl import app, flags

from train import cli

COMMANDS = ("build", "ask", "eval")
_DOCS = flags.DEFINE_string("docs", None, "build: 'embedded' or comma-separated .txt/.md/.jsonl files (globs).")
_EMBEDDING_MODEL = flags.DEFINE_string("embedding_model", None, "A sentence-transformers/BERT directory "
                                       "(build, eval; ask: default the one the index names).")
_OUT = flags.DEFINE_string("out", None, "build: the index directory to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "build: replace an existing --out.")
_KIND = flags.DEFINE_enum("kind", "exact", ["exact", "flat", "ivf"], "build: the index kind.")
_NLIST = flags.DEFINE_integer("nlist", None, "build --kind=ivf: cells (default about sqrt(chunks)).")
_NPROBE = flags.DEFINE_integer("nprobe", None, "build --kind=ivf: cells scanned per query (default nlist/4).")
_WINDOW = flags.DEFINE_integer("window", 128, "build/eval: tokens per chunk.")
_STRIDE = flags.DEFINE_integer("stride", 96, "build/eval: tokens between chunk starts (overlap = window - stride).")
_INDEX = flags.DEFINE_string("index", None, "ask: the index directory.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "ask: a `python -m train` workdir or a Hugging Face decoder.")
_QUESTION = flags.DEFINE_string("question", None, "ask: the question.")
_K = flags.DEFINE_integer("k", 3, "ask: sources retrieved.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "ask: the most tokens generated.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "ask: 0 for greedy decoding.")
_TOP_P = flags.DEFINE_float("top_p", None, "ask: nucleus sampling.")
_SEED = flags.DEFINE_integer("seed", 0, "ask: sampling seed.")
_QUICK = flags.DEFINE_bool("quick", False, "eval: a few topics only (seconds, for tests).")


def _need(flag, command: str) -> str:
    if not flag.value:
        raise app.UsageError(f"`{command}` needs --{flag.name}")
    return flag.value


def build() -> None:
    from rag.chunk import chunk_documents, load_documents
    from rag.embed import Embedder
    from rag.index import Index

    docs_spec, model, out = _need(_DOCS, "build"), _need(_EMBEDDING_MODEL, "build"), _need(_OUT, "build")
    if os.path.exists(out) and not _OVERWRITE.value:
        raise FileExistsError(f"--out={out} already exists; pass --overwrite to replace it or choose another --out")
    if _KIND.value != "ivf" and (_NLIST.value or _NPROBE.value):
        raise app.UsageError("--nlist/--nprobe apply to --kind=ivf only")
    docs = load_documents(docs_spec)
    embedder = Embedder.load(model)
    chunks = chunk_documents(docs, embedder.tokenizer, window=_WINDOW.value, stride=_STRIDE.value)
    index = Index.build(embedder, chunks, kind=_KIND.value, nlist=_NLIST.value, nprobe=_NPROBE.value)
    index.save(out, overwrite=_OVERWRITE.value)
    print(f"{out}: {len(chunks)} chunks of {len(docs)} documents, {_KIND.value} index")


def ask() -> None:
    from inference.load import load
    from rag.embed import Embedder
    from rag.generate import answer
    from rag.index import Index, read_manifest

    index_dir, checkpoint = _need(_INDEX, "ask"), _need(_CHECKPOINT, "ask")
    question = _need(_QUESTION, "ask")
    if _K.value < 1:
        raise app.UsageError(f"--k={_K.value} must be at least 1")
    read_manifest(index_dir)  # a bad index fails before any model loads
    embedder = Embedder.load(_EMBEDDING_MODEL.value) if _EMBEDDING_MODEL.value else None
    index = Index.load(index_dir, embedder)
    loaded = load(checkpoint)
    result = answer(loaded, index, question, _K.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                    temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value)
    print(result.text.strip())
    print(json.dumps({"citations": result.citations, "cited": result.cited}, ensure_ascii=False))


def evaluate() -> None:
    from rag.embed import Embedder
    from rag.evaluate import format_table, recall_table

    embedder = Embedder.load(_need(_EMBEDDING_MODEL, "eval"))
    rows, info = recall_table(embedder, quick=_QUICK.value, window=_WINDOW.value, stride=_STRIDE.value)
    print(format_table(rows, info))


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {' | '.join(COMMANDS)} (got {argv[1:]}); e.g. "
                             "python -m rag build --docs=embedded --embedding_model=DIR --out=INDEX")
    {"build": build, "ask": ask, "eval": evaluate}[argv[1]]()


if __name__ == "__main__":
    cli.run(main)
