"""Run tasks on a language model, score them, estimate standard errors, write and print the results.

    results = harness.evaluate(lm, tasks.load_tasks(["pydoc_continuation"]), limit=100)
    results["pydoc_continuation"]["acc"]    # {"value": 0.31, "stderr": 0.046}
    harness.write(out_dir, results, meta={"checkpoint": path})
    print(harness.table(results))

`lm` is anything with lm-eval's three request methods (`evals.lm.ModelLM` on an lmlab decoder):
  loglikelihood([(context, continuation)]) -> [(log p, is_greedy)]
  loglikelihood_rolling([text]) -> [log p]
  generate_until([(context, {"until": [...], "max_gen_toks": n, ...})]) -> [text]
Each task's requests go to the model in one call (the model batches and orders them). Scoring
is lm-eval's: multiple choice by the choices' log-likelihoods (acc; acc_norm divides each by
the choice's length in characters), loglikelihood tasks by perplexity and greedy accuracy,
rolling perplexity per word and per byte over the whole split, generations by the metrics of
`evals.metrics.registry`. Standard errors: the sample standard error for a mean metric, a
bootstrap over examples for a corpus metric (`registry.Metric.aggregate`), drawn from a
generator seeded by (seed, task, metric), so they do not depend on which other tasks ran.

Every process of a multi-process run calls `evaluate` with the same tasks (the model shards
the batches) and gets the same results; `write` is called by all of them, process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evals.metrics import registry
from evals.tasks import Task

RESULTS_FILE = "results.json"


@dataclasses.dataclass
class Results:
    """What `evaluate` measured.

    Attributes:
      results: task -> metric -> {"value": float, "stderr": float | None}.
      records: task -> one dict per example (prompt, model outputs, per-example scores).
      num_examples: task -> examples scored.
      higher_is_better: task -> metric -> bool.
    """

    results: dict[str, dict[str, dict[str, float | None]]]
    records: dict[str, list[dict]]
    num_examples: dict[str, int]
    higher_is_better: dict[str, dict[str, bool]]

    def __getitem__(self, task: str) -> dict[str, dict[str, float | None]]:
        return self.results[task]


def evaluate(lm, tasks: Sequence[Task], *, limit: int | None = None, bootstrap_iters: int = 1000,
             seed: int = 0) -> Results:
    """Scores `lm` on `tasks`.

    Args:
      lm: a model with lm-eval's request methods (see the module docstring).
      tasks: from `evals.tasks.load_tasks`.
      limit: score only each task's first `limit` documents (None: all).
      bootstrap_iters: resamples for the corpus metrics' standard errors; 0: no standard errors.
      seed: seeds the bootstrap.

    Returns:
      The `Results`.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}; give a positive number of documents per task (or None for all)")
    if bootstrap_iters < 0:
        raise ValueError(f"bootstrap_iters={bootstrap_iters}; give 0 (no standard errors) or more")
    out = Results({}, {}, {}, {})
    for task in tasks:
        docs = list(task.docs[:limit] if limit is not None else task.docs)
        items, records = _run(lm, task, docs)
        out.results[task.name], out.higher_is_better[task.name] = {}, {}
        for spec in task.metrics:
            metric = registry.get(spec.name, task.output_type, spec.options)
            stats_NK = metric.item_statistics(items, **spec.options)
            rng = np.random.default_rng([seed, zlib.crc32(f"{task.name}/{spec.name}".encode())])
            value, stderr = metric.aggregate(stats_NK, bootstrap_iters=bootstrap_iters, rng=rng, **spec.options)
            out.results[task.name][spec.name] = {"value": value, "stderr": stderr}
            out.higher_is_better[task.name][spec.name] = metric.higher_is_better
            if metric.from_sums is None:  # a mean: the example's own score
                for record, score in zip(records, stats_NK[:, 0].tolist()):
                    record[spec.name] = score
        out.records[task.name] = records
        out.num_examples[task.name] = len(docs)
    return out


def _run(lm, task: Task, docs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(metric items, records) of `docs`: the task's requests sent to `lm` in one call."""
    if task.output_type == "loglikelihood_rolling":
        texts = [task.target(doc) for doc in docs]
        lls = _check_count(lm.loglikelihood_rolling(texts), texts, "loglikelihood_rolling")
        items = [{"loglikelihood": float(ll), "words": len(re.split(r"\s+", text)), "bytes": len(text.encode("utf-8"))}
                 for ll, text in zip(lls, texts)]  # lm-eval's count_words / count_bytes
        return items, [{"doc_id": i, "doc": doc, **item} for i, (doc, item) in enumerate(zip(docs, items))]
    rng = task.fewshot_rng()
    contexts = [task.context(doc, rng) for doc in docs]
    if task.output_type == "multiple_choice":
        return _multiple_choice(lm, task, docs, contexts)
    if task.output_type == "loglikelihood":
        requests = [(ctx, task.target(doc)) for ctx, doc in zip(contexts, docs)]
        answers = _check_count(lm.loglikelihood(requests), requests, "loglikelihood")
        items = [{"loglikelihood": float(ll), "is_greedy": bool(greedy)} for ll, greedy in answers]
        return items, [{"doc_id": i, "doc": doc, "context": ctx, "target": target, **item}
                       for i, (doc, (ctx, target), item) in enumerate(zip(docs, requests, items))]
    requests = [(ctx, dict(task.generation_kwargs)) for ctx in contexts]
    generations = _check_count(lm.generate_until(requests), requests, "generate_until")
    items = [{"prediction": text, "references": task.references(doc)} for text, doc in zip(generations, docs)]
    return items, [{"doc_id": i, "doc": doc, "context": ctx, "generation": item["prediction"],
                    "references": item["references"]}
                   for i, (doc, ctx, item) in enumerate(zip(docs, contexts, items))]


def _multiple_choice(lm, task: Task, docs: list[dict], contexts: list[str]) -> tuple[list[dict], list[dict]]:
    choices = [task.choices(doc) for doc in docs]
    requests = [(ctx, task.target_delimiter + choice) for ctx, cs in zip(contexts, choices) for choice in cs]
    answers = iter(_check_count(lm.loglikelihood(requests), requests, "loglikelihood"))
    items, records = [], []
    for i, (doc, ctx, cs) in enumerate(zip(docs, contexts, choices)):
        scored = [next(answers) for _ in cs]
        item = {"loglikelihoods": [float(ll) for ll, _ in scored], "is_greedy": [bool(g) for _, g in scored],
                "choice_lengths": [len(c) for c in cs], "gold": task.gold(doc)}
        items.append(item)
        records.append({"doc_id": i, "doc": doc, "context": ctx, "choices": cs, "gold": item["gold"],
                        "loglikelihoods": item["loglikelihoods"], "is_greedy": item["is_greedy"]})
    return items, records


def _check_count(answers: Sequence, requests: Sequence, method: str) -> list:
    answers = list(answers)
    if len(answers) != len(requests):
        raise RuntimeError(f"the model's {method} answered {len(answers)} of {len(requests)} requests")
    return answers


# --- Writing and printing.

def write(out_dir: str, results: Results, *, meta: Mapping[str, Any] | None = None) -> str:
    """Writes OUT_DIR/<task>.jsonl (the records) and then OUT_DIR/results.json; process 0
    writes, each file atomically (a reader never sees half of one), the others wait for it.

    Args:
      out_dir: the directory (made if missing).
      results: from `evaluate`.
      meta: what produced them (checkpoint, flags, ...), saved under "meta".

    Returns:
      The path of results.json.
    """
    import jax

    path = os.path.join(out_dir, RESULTS_FILE)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        for task, records in results.records.items():
            _atomic_write(os.path.join(out_dir, records_file(task)),
                          "".join(json.dumps(_finite(r), ensure_ascii=False, default=_jsonable) + "\n"
                                  for r in records))
        summary = {"results": results.results, "num_examples": results.num_examples,
                   "higher_is_better": results.higher_is_better,
                   "records": {task: records_file(task) for task in results.records}, "meta": dict(meta or {})}
        _atomic_write(path, json.dumps(_finite(summary), indent=2, ensure_ascii=False, default=_jsonable) + "\n")
    if jax.process_count() > 1:
        from train import distributed

        distributed.barrier("evals_write")
    return path


def records_file(task: str) -> str:
    """The file name of a task's records (characters unsafe in file names replaced)."""
    return re.sub(r"[^\w.+-]", "_", task) + ".jsonl"


def _atomic_write(path: str, text: str) -> None:
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinity as null: the files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def table(results: Results) -> str:
    """The results as a Markdown table: task, metric, value, standard error, examples."""
    rows = [("task", "metric", "value", "stderr", "n")]
    for task, metrics in results.results.items():
        for metric, entry in metrics.items():
            arrow = "↑" if results.higher_is_better[task][metric] else "↓"
            stderr = "" if entry["stderr"] is None else "±" + _number(entry["stderr"])
            rows.append((task, f"{metric} {arrow}", _number(entry["value"]), stderr, str(results.num_examples[task])))
    widths = [max(3, *(len(row[i]) for row in rows)) for i in range(5)]
    right = (False, False, True, True, True)
    lines = ["|" + "|".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + "|"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w - 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|")
    return "\n".join(lines)


def _number(value: float) -> str:
    """4 decimals; large values (an untrained model's perplexity) in exponent form."""
    return f"{value:.4f}" if abs(value) < 1e5 or not math.isfinite(value) else f"{value:.4e}"
