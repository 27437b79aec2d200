"""A generated JSONL corpus prepared, tokenized and trained on for a few steps, with the run's peak RSS.

Two corpora are run side by side, each in a fresh subprocess (so its peak RSS, VmHWM, is that run's
own): a small one (1/10 of the size) and the full one. Each run prepares the `files:` source
(array_record splits), trains a byte-level BPE on `tokenizer.train_bytes` of it, trains the
tiny GPT for `--steps` steps and evaluates `eval.max_batches` batches. Printed: prepare time
and MB/s, tokenizer and training time, peak RSS of each run, and the ratio of RSS growth to
corpus growth (0 for a data path that streams; about 1 or more for one that holds the text).

Run:
  python benchmarks/corpus_scale.py --mb=200              # the scale run (a few minutes)
  python benchmarks/corpus_scale.py --quick               # 4 MB, for tests
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Pseudo-words, a few with multi-byte UTF-8 and the line separators that only JSONL's "\n"
# rule keeps inside documents (U+2028, U+2029, U+0085).
_SYLLABLES = ["ka", "to", "ri", "mu", "sen", "dal", "or", "vi", "que", "lan", "é", "ß", "数", "据"]
_EXTRAS = ["\u2028", "\u2029", "\u0085", "naïve", "—", "\n\n"]


def write_corpus(path: str, num_bytes: int, seed: int = 0) -> int:
    """Writes a JSONL corpus of about `num_bytes` (streamed, a document at a time); returns its size."""
    rng = np.random.default_rng(seed)
    syllables = rng.integers(0, len(_SYLLABLES), size=(30_000, 3))
    counts = rng.integers(1, 4, size=30_000)
    words = {"".join(_SYLLABLES[i] for i in row[:n]) for row, n in zip(syllables.tolist(), counts.tolist())}
    vocab = np.array(sorted(words) + _EXTRAS, dtype=object)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < num_bytes:  # a chunk of 50 documents at a time
            lengths = rng.integers(50, 1500, size=50)
            ranks = np.minimum(rng.zipf(1.3, size=int(lengths.sum())), len(vocab)) - 1
            documents = np.split(vocab[ranks], np.cumsum(lengths)[:-1])
            lines = "".join(json.dumps({"text": " ".join(d)}, ensure_ascii=False) + "\n" for d in documents)
            f.write(lines)
            written += len(lines.encode("utf-8"))
    return written


def _child(corpus: str, workdir: str, overrides: list[str]) -> None:
    """One run in this process: prepare, train the tokenizer, train; prints its numbers as JSON."""
    from configs.loader import load_config  # pylint: disable=g-import-not-at-top
    from data import pipeline  # pylint: disable=g-import-not-at-top
    from train import build, trainer  # pylint: disable=g-import-not-at-top

    config = load_config(os.path.join(_ROOT, "configs/gpt.py:tiny"), [
        f"data.source=files:{corpus}", f"data.data_dir={workdir}/tfds", "tokenizer.trainer=tokenizers",
        "eval.every_steps=0", "eval.max_batches=2", "logging.peak_flops=1e11", "logging.tensorboard=false",
        "logging.progress_bar=false", "checkpoint.async_save=false", "schedule.warmup_steps=1", *overrides,
    ])  # fmt: skip
    data = build.data_config(config, workdir)
    start = time.perf_counter()
    train_split = pipeline.open_split(data, data.train_split)  # writes the array_record splits
    prepared = time.perf_counter()
    build.tokenizer(config, workdir, data)  # trained and saved; the run below reloads it
    tokenized = time.perf_counter()
    summary = trainer.run(config, workdir)
    done = time.perf_counter()
    print("RESULT " + json.dumps({
        "prepare_s": prepared - start, "tokenizer_s": tokenized - prepared, "train_s": done - tokenized,
        "train_documents": len(train_split), "final_step": summary["final_step"],
        "val_bytes": summary["val_bytes"], "val_bits_per_byte": summary["val_bits_per_byte"],
        "peak_rss_mb": peak_rss_mb(),
    }), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: VmHWM, the high-water mark of its own address space.

    Not `ru_maxrss`: Linux carries that across exec from the process that forked it, so a run started
    by a large parent (a pytest worker) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; no /proc: as reported


def run_one(corpus_mb: float, root: str, overrides: list[str]) -> dict:
    """Writes a corpus of `corpus_mb` MB under `root` and runs it in a fresh subprocess."""
    corpus = os.path.join(root, f"corpus_{corpus_mb:g}mb.jsonl")
    start = time.perf_counter()
    size = write_corpus(corpus, int(corpus_mb * 1e6))
    generate_s = time.perf_counter() - start
    workdir = os.path.join(root, f"run_{corpus_mb:g}mb")
    command = [sys.executable, os.path.abspath(__file__), "--child", corpus, workdir, *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=_ROOT, check=False,
                            env={**os.environ, "PYTHONPATH": _ROOT})
    lines = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"the {corpus_mb:g} MB run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    os.remove(corpus)
    return {"corpus_mb": size / 1e6, "generate_s": generate_s, **json.loads(lines[-1][len("RESULT "):])}


def main(argv: list[str] | None = None) -> dict:
    """Runs the small and the full corpus, prints the comparison and returns both results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=200.0, help="size of the full corpus in MB")
    parser.add_argument("--quick", action="store_true", help="a 4 MB corpus and 2 steps (tests)")
    parser.add_argument("--steps", type=int, default=5, help="training steps of each run")
    parser.add_argument("--dir", default="", help="where corpora and workdirs go (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="more config overrides, e.g. tokenizer.train_bytes=2000000")
    args = parser.parse_args(argv)
    mb, steps = (4.0, 2) if args.quick else (args.mb, args.steps)
    overrides = [f"steps={steps}", *args.overrides]
    with tempfile.TemporaryDirectory(dir=args.dir or None) as root:
        small, full = run_one(mb / 10, root, overrides), run_one(mb, root, overrides)
    print(f"{'':28}{'small':>12}{'full':>12}")
    for label, key, fmt in (("corpus (MB)", "corpus_mb", ".1f"), ("generate (s)", "generate_s", ".1f"),
                            ("prepare (s)", "prepare_s", ".1f"), ("tokenizer training (s)", "tokenizer_s", ".1f"),
                            ("train + eval (s)", "train_s", ".1f"), ("peak RSS (MB)", "peak_rss_mb", ".0f")):
        print(f"{label:28}{small[key]:>12{fmt}}{full[key]:>12{fmt}}")
    for result in (small, full):
        result["prepare_mb_per_s"] = result["corpus_mb"] / result["prepare_s"]
    growth = (full["peak_rss_mb"] - small["peak_rss_mb"]) / (full["corpus_mb"] - small["corpus_mb"])
    print(f"prepare throughput: {full['prepare_mb_per_s']:.1f} MB/s (small: {small['prepare_mb_per_s']:.1f}); "
          f"{full['train_documents']} training documents; {full['final_step']} steps")
    print(f"peak RSS growth / corpus growth: {growth:.3f} (0: streamed; >= 1: the corpus held in memory)")
    return {"small": small, "full": full, "rss_growth_per_corpus_mb": growth}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
