"""`report.json`: what a run read, kept, dropped and wrote, from its Beam counters.

    {"counters": {namespace: {name: value}},     every Beam counter of the run
     "stages": [{"stage", "documents_in", "documents_out", "bytes_in", "bytes_out",
                 "documents_dropped", "dropped": {reason: documents}}, ...],   read, then each stage
     "splits": {split: {"documents", "tokens", "bytes", "shard_lengths"}},
     "dead_letter": {"entries", "files": [names of the files with an entry]},
     "documents_dropped": by all stages (their ids and reasons are in dropped/),
     "wall_seconds", "documents_per_second", "megabytes_per_second", ...}

Throughput is of the input: the documents and UTF-8 bytes `read` produced, over the wall time
of the pipeline (start to finish, Beam's start-up included; the metadata written after it is
not). Counters are the committed values, or the attempted ones on runners that report no
committed values; a counter reported by several steps is summed.
"""

import collections
import glob
import json
import os

from data.prepare.transforms import NAMESPACE

# At most this many dead-letter file names are listed (all entries are in dead_letter/).
MAX_LISTED_FILES = 1000


def counters(result) -> dict[str, dict[str, int]]:
    """The run's counters, {namespace: {name: value}}."""
    totals = collections.defaultdict(lambda: collections.defaultdict(int))
    for counter in result.metrics().query()["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.namespace][counter.key.metric.name] += int(value or 0)
    return {namespace: dict(sorted(names.items())) for namespace, names in sorted(totals.items())}


def stage_flow(all_counters: dict, stages) -> list[dict]:
    """Documents and bytes into and out of `read` and each stage run, with the drop reasons."""
    rows, previous = [], None
    for name in ("read", *stages):
        own = all_counters.get(f"{NAMESPACE}.{name}", {})
        row = {"stage": name, "documents_out": own.get("documents_out", 0), "bytes_out": own.get("bytes_out", 0)}
        if previous is not None:
            row = {"stage": name, "documents_in": previous["documents_out"], "bytes_in": previous["bytes_out"],
                   **{k: v for k, v in row.items() if k != "stage"},
                   "documents_dropped": previous["documents_out"] - row["documents_out"],
                   "dropped": {k.removeprefix("dropped."): v for k, v in own.items() if k.startswith("dropped.")}}
        rows.append(row)
        previous = row
    return rows


def dead_letter_summary(output_dir: str) -> dict:
    """The number of dead-letter entries and the names of the files they are about."""
    entries, files = 0, set()
    for path in sorted(glob.glob(os.path.join(output_dir, "dead_letter", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    entries += 1
                    files.add(json.loads(line)["file"])
    names = sorted(files)
    summary = {"entries": entries, "files": names[:MAX_LISTED_FILES]}
    if len(names) > MAX_LISTED_FILES:
        summary["files_not_listed"] = len(names) - MAX_LISTED_FILES
    return summary


def build_report(result, stages, wall_seconds: float, output_dir: str, shard_lengths: dict) -> dict:
    """The report of a finished run (see the module docstring)."""
    all_counters = counters(result)
    flow = stage_flow(all_counters, stages)
    written = all_counters.get("data.prepare.write", {})
    splits = {split: {"documents": written.get(f"documents.{split}", 0), "tokens": written.get(f"tokens.{split}", 0),
                      "bytes": written.get(f"bytes.{split}", 0), "shard_lengths": lengths}
              for split, lengths in shard_lengths.items()}
    read_documents, read_bytes = flow[0]["documents_out"], flow[0]["bytes_out"]
    return {
        "counters": all_counters,
        "stages": flow,
        "splits": splits,
        "dead_letter": dead_letter_summary(output_dir),
        "documents_dropped": sum(row.get("documents_dropped", 0) for row in flow),
        "wall_seconds": wall_seconds,
        "documents_per_second": read_documents / wall_seconds if wall_seconds else None,
        "megabytes_per_second": read_bytes / 1e6 / wall_seconds if wall_seconds else None,
    }
