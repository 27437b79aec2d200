"""`data.prepare` on a planted corpus: MinHash LSH accuracy, language ID accuracy, pipeline throughput.

Measured side by side in one run:
  * MinHash LSH (`near_dedup.Options` defaults: 128 permutations, 16 bands of 8 rows, 5-word
    shingles) on `data.prepare.planted`'s corpus: per planted level (Jaccard 0.5 .. 0.9) the
    fraction of planted pairs that became candidates next to the S-curve 1 - (1 - J^r)^b at
    their achieved Jaccard; per threshold t, precision and recall of the candidate pairs (and of
    the pairs put in one cluster) against the truth "exact Jaccard >= t", computed pairwise over
    a sample of whole clusters (`planted.measure`);
  * our MinHash Jaccard estimates against `datasketch.MinHash`'s on the same shingles of every
    planted pair (`planted.compare_with_datasketch`; datasketch is a test extra, skipped if absent);
  * language ID precision and recall of the keep-list (English) on a labelled sample of pydoc
    English and Faker's lorem text in ten languages (`langid.evaluate`; Faker is a test extra);
  * documents/s and MB/s (of the input read) of the whole pipeline, `pipeline.run` with every stage,
    on Beam's DirectRunner in multi_processing mode with 1 and with 2 workers, and the ratio; in
    full mode also with 2 workers and no stages (read -> tokenize -> write) and with every stage but
    langid, the slow one, for the per-stage picture, and with 1 worker and
    no stages: the wall time of every stage less that of none is the stages' own time, without
    Beam's start-up, reading, tokenizing and writing, and its 1 / 2 worker ratio their scaling.

The pipeline's corpus (JSONL files): the planted corpus (bases, their near-duplicates, exact
copies), more edited copies of each base at Jaccard ~0.3 with it (kept by near deduplication:
they give the throughput its bulk), some of them with e-mail addresses, phone numbers and IP
addresses appended (PII), junk the quality filter drops (symbol soup, a few words), and Faker
paragraphs in ten languages the language filter drops (skipped with a note without Faker).
Throughput includes Beam's start-up (worker processes, ~2-5 s), as `report.json` counts it. In
full mode each configuration runs twice, interleaved, and the faster run is reported: on a
shared machine the slower one measures the other load as much as the pipeline (the load
average before the runs is printed; 2 workers cannot scale without 2 idle cores).

Run:
  python benchmarks/data_prepare.py                 # ~3000 documents, ~2.5 MB (a few minutes)
  python benchmarks/data_prepare.py --quick         # ~300 documents, for tests
  python benchmarks/data_prepare.py --quick --json=results.json
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sys
import tempfile

import numpy as np

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from data.prepare import langid, near_dedup, pipeline, planted

# Symbols and few words: the quality filter's symbol-to-word, alphabetic-word and length rules.
_SYMBOLS = list("$#%@!^&*~|<>")


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big each part of one run is."""

    num_bases: int  # planted base documents (<= 409, the pydoc texts)
    duplicates_per_level: int  # planted near-duplicate pairs per Jaccard level
    exact_copies: int
    edited_rounds: int  # edited copies (Jaccard ~0.3) of every base, for bulk
    pii: int  # of the edited copies, how many get PII appended
    junk: int
    foreign_per_language: int  # Faker paragraphs per language (10 languages)
    langid_per_language: int  # labelled sample for langid's precision / recall
    sample_documents: int  # documents compared pairwise for LSH precision / recall
    stage_runs: bool  # also run 'none' and 'every stage but langid' with 2 workers
    repeats: int  # runs of each configuration; the fastest is reported (the least disturbed by other load)


FULL = Scale(400, 20, 10, 5, 200, 200, 30, 50, 400, True, 2)
QUICK = Scale(100, 8, 10, 1, 20, 20, 3, 10, 160, False, 1)
SEED = 0


def planted_settings(scale: Scale) -> dict:
    """The arguments of `planted.generate` for this scale (also written to the results)."""
    return {"num_bases": scale.num_bases, "duplicates_per_level": scale.duplicates_per_level,
            "exact_copies": scale.exact_copies, "seed": SEED}


def junk_documents(count: int, rng: np.random.Generator) -> list[str]:
    """Half symbol soup, half a few words: documents the quality filter drops."""
    texts = []
    for i in range(count):
        if i % 2:
            texts.append(" ".join("".join(rng.choice(_SYMBOLS, size=3)) for _ in range(60)))
        else:
            texts.append(f"click here {i}")
    return texts


def with_pii(text: str, index: int) -> str:
    """The text with an e-mail address, a phone number and an IPv4 address appended."""
    return (f"{text}\n\nWrite to maintainer{index}@example.org or call +1 415 555 {index % 10000:04d}; "
            f"the mirror is at 10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}.")


def foreign_documents(per_language: int) -> list[str]:
    """Faker paragraphs in ten languages (langid's labelled sample without its English), or []."""
    if per_language == 0:
        return []
    try:
        sample = langid.labelled_sample(per_language, seed=SEED + 1)
    except ImportError:
        print("note: Faker is not installed (a test extra): no foreign-language documents in the corpus")
        return []
    return [text for text, language in sample if language != "en"]


def build_corpus(scale: Scale) -> tuple[planted.PlantedCorpus, dict[str, list[str]]]:
    """The planted corpus and the pipeline's documents, by kind."""
    corpus = planted.generate(**planted_settings(scale))
    rng = np.random.default_rng(SEED + 2)
    texts = planted.base_texts()
    vocab = planted.vocabulary(texts)
    duplicates = {p.duplicate for p in corpus.pairs}
    bases = [d.text for d in corpus.documents if d.id not in duplicates]
    edited = [planted.near_duplicate(text, 0.3, corpus.shingle, rng, vocab)[0]
              for _ in range(scale.edited_rounds) for text in bases]
    edited[:scale.pii] = [with_pii(text, i) for i, text in enumerate(edited[:scale.pii])]
    kinds = {"planted": [d.text for d in corpus.documents], "edited": edited,
             "junk": junk_documents(scale.junk, rng), "foreign": foreign_documents(scale.foreign_per_language)}
    return corpus, kinds


def write_jsonl(kinds: dict[str, list[str]], directory: str, files: int = 4) -> tuple[int, int]:
    """Writes the documents, interleaved, into `files` JSONL files; returns (documents, UTF-8 bytes of text)."""
    texts = [t for kind in kinds.values() for t in kind]
    order = np.random.default_rng(SEED + 3).permutation(len(texts))
    os.makedirs(directory, exist_ok=True)
    for f in range(files):
        with open(os.path.join(directory, f"part{f}.jsonl"), "w", encoding="utf-8") as out:
            out.writelines(json.dumps({"text": texts[i]}, ensure_ascii=False) + "\n" for i in order[f::files])
    return len(texts), sum(len(t.encode("utf-8")) for t in texts)


def measure_lsh(corpus: planted.PlantedCorpus, scale: Scale) -> dict:
    """`planted.measure` and `planted.compare_with_datasketch` with the default options, as dicts."""
    options = near_dedup.Options()
    measurement = planted.measure(corpus, options, sample_documents=scale.sample_documents, seed=SEED)
    try:
        comparison = dataclasses.asdict(planted.compare_with_datasketch(corpus, options))
    except ImportError:
        print("note: datasketch is not installed (a test extra): no comparison with its MinHash")
        comparison = None
    return {"levels": [dataclasses.asdict(r) for r in measurement.levels],
            "thresholds": [dataclasses.asdict(r) for r in measurement.thresholds],
            "sampled_documents": measurement.sampled_documents, "sampled_pairs": measurement.sampled_pairs,
            "num_perm": options.num_perm, "bands": options.bands, "rows": options.rows,
            "datasketch": comparison}


def measure_langid(per_language: int) -> dict | None:
    """Keep-list and per-language precision / recall of the default LanguageId on a labelled sample."""
    try:
        sample = langid.labelled_sample(per_language, seed=SEED)
    except ImportError:
        print("note: Faker is not installed (a test extra): no language ID precision / recall")
        return None
    report = langid.evaluate(langid.LanguageId(langid.LanguageId.Options()), sample)
    return {"keep_precision": report.keep_precision, "keep_recall": report.keep_recall, "total": report.total,
            "per_language": per_language, "keep": list(langid.LanguageId.Options().keep),
            "precision": report.precision, "recall": report.recall}


def _file_digests(directory: str) -> dict[str, str]:
    """SHA-256 of every array_record shard under `directory`, by path relative to it."""
    paths = sorted(glob.glob(os.path.join(directory, "**", "*array_record*"), recursive=True))
    return {os.path.relpath(p, directory): hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in paths}


def run_pipeline(inputs: str, tokenizer: str, output: str, workers: int, stages: tuple[str, ...]) -> dict:
    """One `pipeline.run` on the DirectRunner with `workers` processes; its throughput and counts."""
    config = pipeline.PrepareConfig(inputs=(inputs,), tokenizer=tokenizer, stages=stages, num_shards=2)
    beam_args = ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    report = pipeline.run(config, output, beam_args=beam_args)
    flow = report["stages"]
    return {"workers": workers, "stages": list(stages), "wall_seconds": report["wall_seconds"],
            "documents_per_second": report["documents_per_second"],
            "megabytes_per_second": report["megabytes_per_second"],
            "documents_read": flow[0]["documents_out"], "documents_dropped": report["documents_dropped"],
            "documents_kept": sum(s["documents"] for s in report["splits"].values()),
            "dropped_by_stage": {row["stage"]: row["documents_dropped"] for row in flow[1:]},
            "dead_letter_entries": report["dead_letter"]["entries"],
            "pii_counters": report["counters"].get("data.prepare.pii", {}), "shards": _file_digests(output)}


def run_pipelines(inputs: str, tokenizer: str, root: str, scale: Scale) -> dict:
    """The pipeline with every stage on 1 and 2 workers (and the cheap variants in full mode)."""
    plan = {"all_1": (1, pipeline.STAGE_NAMES), "all_2": (2, pipeline.STAGE_NAMES)}
    if scale.stage_runs:
        plan["none_1"] = (1, ())
        plan["none_2"] = (2, ())
        plan["no_langid_2"] = (2, tuple(s for s in pipeline.STAGE_NAMES if s != "langid"))
    runs = {}
    for repeat in range(scale.repeats):  # interleaved, so that 1 and 2 workers see the same background load
        for label, (workers, stages) in plan.items():
            run = run_pipeline(inputs, tokenizer, os.path.join(root, f"{label}_{repeat}"), workers, stages)
            if label in runs and runs[label]["shards"] != run["shards"]:
                raise RuntimeError(f"the {label} runs wrote different shards: the pipeline is not deterministic")
            if label not in runs or run["wall_seconds"] < runs[label]["wall_seconds"]:
                runs[label] = run
            runs[label]["repeats"] = repeat + 1
    return runs


def print_tables(results: dict) -> None:
    """The readable summary of `main`'s results."""
    corpus = results["corpus"]
    print(f"\ncorpus: {corpus['documents']} documents, {corpus['megabytes']:.2f} MB "
          f"({', '.join(f'{k} {v}' for k, v in corpus['kinds'].items())})")
    print(f"\n{'pipeline run (fastest of n)':28}{'docs read':>10}{'kept':>7}{'dropped':>9}{'wall s':>8}{'docs/s':>9}{'MB/s':>8}")
    for label, run in results["runs"].items():
        print(f"{label:28}{run['documents_read']:>10}{run['documents_kept']:>7}{run['documents_dropped']:>9}"
              f"{run['wall_seconds']:>8.1f}{run['documents_per_second']:>9.1f}{run['megabytes_per_second']:>8.3f}")
    print(f"scaling, 2 workers / 1 worker (docs/s): {results['scaling']:.2f}; 1 and 2 workers wrote "
          f"{'byte-identical' if results['identical_shards'] else 'DIFFERENT'} shards")
    all_2 = results["runs"]["all_2"]
    if "none_1" in results["runs"]:
        print(f"the stages' own time (wall of every stage - wall of none): 1 worker {results['stage_seconds_1']:.1f} s, "
              f"2 workers {results['stage_seconds_2']:.1f} s, scaling {results['stage_scaling']:.2f}; "
              f"load average before the runs {results['load_average']:.2f} on {os.cpu_count()} CPUs")
    print("dropped by stage (all_2): " + ", ".join(f"{k} {v}" for k, v in all_2["dropped_by_stage"].items()))
    print("PII stage counters (all_2): " + ", ".join(f"{k} {v}" for k, v in all_2["pii_counters"].items()))
    lsh = results["lsh"]
    print(f"\nMinHash LSH ({lsh['num_perm']} permutations, {lsh['bands']} bands x {lsh['rows']} rows): planted pairs")
    print(f"{'level':>8}{'pairs':>7}{'mean J':>8}{'S-curve':>9}{'found':>7}")
    for r in lsh["levels"]:
        print(f"{r['target']:>8.2f}{r['pairs']:>7}{r['mean_jaccard']:>8.3f}{r['predicted']:>9.3f}{r['measured']:>7.3f}")
    print(f"against exact Jaccard over {lsh['sampled_pairs']} pairs of {lsh['sampled_documents']} documents")
    print(f"{'J >=':>8}{'true':>6}{'cand':>6}{'precision':>11}{'recall':>8}{'cluster P':>11}{'cluster R':>11}")
    for r in lsh["thresholds"]:
        print(f"{r['threshold']:>8.2f}{r['true_pairs']:>6}{r['candidate_pairs']:>6}{r['precision']:>11.3f}"
              f"{r['recall']:>8.3f}{r['cluster_precision']:>11.3f}{r['cluster_recall']:>11.3f}")
    sketch = lsh["datasketch"]
    if sketch:
        print(f"ours vs datasketch on {sketch['pairs']} pairs: mean |difference| {sketch['mean_abs_difference']:.4f} "
              f"(expected for independent hashes {sketch['expected_mean_abs_difference']:.4f}), mean difference "
              f"{sketch['mean_difference']:+.4f}; mean |error| vs exact: ours {sketch['ours_mean_abs_error']:.4f}, "
              f"datasketch {sketch['datasketch_mean_abs_error']:.4f}")
    lang = results["langid"]
    if lang:
        print(f"\nlanguage ID (keep en) on {lang['total']} labelled paragraphs: precision {lang['keep_precision']:.3f}, "
              f"recall {lang['keep_recall']:.3f}")


def main(argv: list[str] | None = None) -> dict:
    """Builds the corpus, measures everything, prints the tables and returns the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~300 documents, 1 and 2 workers only (tests)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--dir", default="", help="where the corpus and outputs go (default: a temporary one)")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    # Beam's worker processes import data.prepare as the launching process does.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    from data.tokenizer.bpe import ByteLevelBPE  # pylint: disable=g-import-not-at-top

    corpus, kinds = build_corpus(scale)
    results = {"mode": "quick" if args.quick else "full", "planted": planted_settings(scale),
               "sample_documents": scale.sample_documents}
    with tempfile.TemporaryDirectory(dir=args.dir or None) as root:
        documents, num_bytes = write_jsonl(kinds, os.path.join(root, "raw"))
        results["corpus"] = {"documents": documents, "megabytes": num_bytes / 1e6,
                             "kinds": {k: len(v) for k, v in kinds.items()}, "pii": min(scale.pii, len(kinds["edited"]))}
        tokenizer = os.path.join(root, "tokenizer")
        ByteLevelBPE.train(planted.base_texts()[:50], 300, special_tokens=("<|endoftext|>",)).save(tokenizer)
        results["load_average"] = os.getloadavg()[0]  # other processes on the machine share the workers' CPUs
        results["runs"] = run_pipelines(os.path.join(root, "raw", "*.jsonl"), tokenizer, root, scale)
    runs = results["runs"]
    results["scaling"] = runs["all_2"]["documents_per_second"] / runs["all_1"]["documents_per_second"]
    if "none_1" in runs:  # start-up, read, tokenize and write taken out
        for workers in (1, 2):
            results[f"stage_seconds_{workers}"] = runs[f"all_{workers}"]["wall_seconds"] - runs[f"none_{workers}"]["wall_seconds"]
        results["stage_scaling"] = results["stage_seconds_1"] / results["stage_seconds_2"]
    results["identical_shards"] = runs["all_1"]["shards"] == runs["all_2"]["shards"]
    results["lsh"] = measure_lsh(corpus, scale)
    results["langid"] = measure_langid(scale.langid_per_language)
    print_tables(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)  # nan (an empty denominator) as NaN, which json.load reads
    return results


if __name__ == "__main__":
    main()
