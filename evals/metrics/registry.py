"""The harness's metrics by name: how each scores one example, and how the examples add up.

    metric = registry.get("bleu", "generate_until")
    stats_NK = metric.statistics(items)              # per-example statistics
    value, stderr = metric.aggregate(stats_NK, bootstrap_iters=1000, rng=np.random.default_rng(0))

A metric is either a *mean* (one statistic per example, the value is their mean and its
standard error is the sample standard deviation over sqrt(N), as lm-eval's `mean_stderr`) or a
*corpus* metric (several statistics per example that add up, e.g. BLEU's n-gram counts; the
value is `from_sums` of their sum, and the standard error is bootstrapped: resample the examples
with replacement, sum their statistics, re-aggregate, and take the sample standard deviation of
the replicates). Values are on the scale of the reference tool that prints them: BLEU, chrF and
SQuAD 0-100 (sacrebleu, the official SQuAD script), ROUGE and BERTScore 0-1 (rouge-score,
bert-score), accuracy 0-1 (lm-eval).

Items, one per example, by output type:
  multiple_choice: {"loglikelihoods": [float], "is_greedy": [bool], "choice_lengths": [int]
                    (characters, without the target delimiter), "gold": int | [int]}
  loglikelihood: {"loglikelihood": float, "is_greedy": bool}
  loglikelihood_rolling: {"loglikelihood": float, "words": int, "bytes": int}
  generate_until: {"prediction": str, "references": [str]}
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric of one output type.

    Attributes:
      name: its name in task files and results.
      output_type: the kind of task it scores.
      statistics: (items, **options) -> [N, K] float64 per-example statistics.
      from_sums: corpus metrics: the value of the statistics summed over examples; None: a mean
        of the single statistic.
      higher_is_better: for tables and model selection.
      options: keyword options a task's metric_list entry may give (passed to `statistics` and
        `from_sums`).
      required: the options that must be given.
    """

    name: str
    output_type: str
    statistics: Callable[..., np.ndarray]
    from_sums: Callable[..., float] | None = None
    higher_is_better: bool = True
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    def item_statistics(self, items: Sequence[Mapping[str, Any]], **options) -> np.ndarray:
        """[N, K] float64 statistics of the examples (see the module docstring for `items`)."""
        if not items:
            return np.zeros((0, 1))
        return np.asarray(self.statistics(items, **accepted(self.statistics, options)), np.float64).reshape(
            len(items), -1)

    def aggregate(self, stats_NK: np.ndarray, *, bootstrap_iters: int, rng: np.random.Generator,
                  **options) -> tuple[float, float | None]:
        """(value, standard error) over the examples; the error is None with fewer than two
        examples or `bootstrap_iters` = 0 (lm-eval's convention: no error estimates)."""
        options = accepted(self.from_sums, options) if self.from_sums is not None else {}
        stats_NK = np.asarray(stats_NK, np.float64).reshape(len(stats_NK), -1)
        count = len(stats_NK)
        if self.from_sums is None:
            values = stats_NK[:, 0]
            value = float(values.mean()) if count else math.nan
            if count < 2 or bootstrap_iters <= 0:
                return value, None
            return value, float(values.std(ddof=1) / math.sqrt(count))
        value = self.from_sums(stats_NK.sum(0), **options)
        if count < 2 or bootstrap_iters <= 0:
            return float(value), None
        return float(value), bootstrap_stderr(lambda sums: self.from_sums(sums, **options), stats_NK,
                                              bootstrap_iters, rng)


def accepted(fn: Callable, options: Mapping[str, Any]) -> dict[str, Any]:
    """The `options` that `fn` takes as keywords (all of them when it takes **kwargs)."""
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(options)
    names = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in options.items() if k in names}


def bootstrap_stderr(from_sums: Callable[[np.ndarray], float], stats_NK: np.ndarray, iters: int,
                     rng: np.random.Generator) -> float:
    """Sample standard deviation of `from_sums` over `iters` resamples (with replacement) of the
    examples' statistics; a resample is summed as the counts of each example times its row."""
    count = len(stats_NK)
    chunk = max(1, min(iters, (1 << 22) // count))  # counts matrices of at most 4M entries
    replicates = []
    for start in range(0, iters, chunk):
        counts_RN = rng.multinomial(count, np.full(count, 1.0 / count), size=min(chunk, iters - start))
        replicates += [from_sums(sums) for sums in counts_RN.astype(np.float64) @ stats_NK]
    replicates = np.asarray(replicates, np.float64)
    return float(replicates.std(ddof=1)) if len(replicates) > 1 else math.nan


def _module(name: str):
    """evals.metrics.NAME, the module (the package attribute of that name is the function)."""
    return importlib.import_module(f"evals.metrics.{name}")


# --- Log-likelihood metrics (lm-eval's process_results).

def _predictions(item: Mapping[str, Any], normalize: bool) -> int:
    lls = np.asarray(item["loglikelihoods"], np.float64)
    if normalize:  # lm-eval's acc_norm: the log-likelihood per character of the choice
        lls = lls / np.asarray(item["choice_lengths"], np.float64)
    return int(np.argmax(lls))  # ties: the first, as numpy's (and lm-eval's) argmax


def _golds(item: Mapping[str, Any]) -> list[int]:
    gold = item["gold"]
    return list(gold) if isinstance(gold, (list, tuple)) else [gold]


def _accuracy(items: Sequence[Mapping], *, normalize: bool = False) -> np.ndarray:
    return np.array([[float(_predictions(i, normalize) in _golds(i))] for i in items], np.float64).reshape(-1, 1)


def _confusion(items: Sequence[Mapping]) -> np.ndarray:
    """One-hot (gold, prediction) cells of a C x C confusion matrix, C the most choices."""
    classes = max((len(i["loglikelihoods"]) for i in items), default=1)
    out = np.zeros((len(items), classes * classes))
    for n, item in enumerate(items):
        out[n, _golds(item)[0] * classes + _predictions(item, False)] = 1.0
    return out


def _from_confusion(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[..., float]:
    def from_sums(sums: np.ndarray, **options) -> float:
        classes = math.isqrt(len(sums))
        cells = np.repeat(np.arange(classes * classes), np.rint(sums).astype(np.int64))
        return float(fn(cells // classes, cells % classes, **options))

    return from_sums


def _f1(y_true, y_pred, average="binary"):
    classification = _module("classification")

    return classification.f1_score(y_true, y_pred, average=average)


def _mcc(y_true, y_pred):
    classification = _module("classification")

    return classification.matthews_corrcoef(y_true, y_pred)


def _ll_columns(*keys: str) -> Callable[..., np.ndarray]:
    return lambda items: np.array([[float(i[k]) for k in keys] for i in items], np.float64).reshape(-1, len(keys))


def _perplexity(sums: np.ndarray) -> float:
    return math.exp(-sums[0] / sums[1])  # lm-eval's (weighted_)perplexity: exp(-sum ll / sum count)


def _bits_per_byte(sums: np.ndarray) -> float:
    return -sums[0] / sums[1] / math.log(2)


# --- Generation metrics (evals.metrics, loaded on first use).

def _texts(items: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    return [i["prediction"] for i in items], [list(i["references"]) for i in items]


def _bleu_statistics(items, **options):
    bleu = _module("bleu")

    return np.asarray(bleu.bleu_statistics(*_texts(items), **accepted(bleu.bleu_statistics, options)), np.float64).reshape(len(items), -1)


def _bleu_value(sums, **options):
    bleu = _module("bleu")

    return bleu.bleu_from_statistics(sums, **accepted(bleu.bleu_from_statistics, options)).score


def _chrf_statistics(word_order: int):
    def statistics(items, **options):
        chrf = _module("chrf")

        options = accepted(chrf.chrf_statistics, {"word_order": word_order, **options})
        stats = chrf.chrf_statistics(*_texts(items), **options)
        return np.asarray(stats, np.float64).reshape(len(items), -1)

    return statistics


def _chrf_value(word_order: int):
    def value(sums, **options):
        chrf = _module("chrf")

        return chrf.chrf_from_statistics(sums, **accepted(chrf.chrf_from_statistics,
                                                          {"word_order": word_order, **options})).score

    return value


def _rouge_statistics(rouge_type: str):
    def statistics(items, **options):
        rouge = _module("rouge")

        scores = rouge.rouge_items(*_texts(items), rouge_types=(rouge_type,), **options)
        return np.array([[s[rouge_type].fmeasure] for s in scores], np.float64).reshape(-1, 1)

    return statistics


def _bertscore_statistics(items, **options):
    bertscore = _module("bertscore")

    return np.asarray(bertscore.bertscore(*_texts(items), **options).f1, np.float64).reshape(-1, 1)


def _squad_statistics(name: str):
    def statistics(items):
        squad = _module("squad")

        score = getattr(squad, name)
        # squad.squad's 0-100 scale per example, so that the mean is the corpus score
        return np.array([[100.0 * float(score(p, refs))] for p, refs in zip(*_texts(items))],
                        np.float64).reshape(-1, 1)

    return statistics


def _verified_statistics(items, task: str = ""):
    from data import verifiable

    verify = verifiable.verifier(task)
    return np.array([[float(any(verify(p.strip(), r) for r in refs))] for p, refs in zip(*_texts(items))],
                    np.float64).reshape(-1, 1)


def _table() -> dict[tuple[str, str], Metric]:
    mc, ll, rolling, gen = OUTPUT_TYPES[0], OUTPUT_TYPES[2], OUTPUT_TYPES[3], OUTPUT_TYPES[1]
    metrics = [
        Metric("acc", mc, lambda items: _accuracy(items)),
        Metric("acc_norm", mc, lambda items: _accuracy(items, normalize=True)),
        Metric("f1", mc, _confusion, _from_confusion(_f1), options=("average",)),
        Metric("mcc", mc, _confusion, _from_confusion(_mcc)),
        Metric("acc", ll, _ll_columns("is_greedy")),
        Metric("perplexity", ll, lambda items: np.c_[_ll_columns("loglikelihood")(items), np.ones(len(items))],
               lambda sums: _perplexity(sums), higher_is_better=False),
        Metric("word_perplexity", rolling, _ll_columns("loglikelihood", "words"), lambda sums: _perplexity(sums),
               higher_is_better=False),
        Metric("byte_perplexity", rolling, _ll_columns("loglikelihood", "bytes"), lambda sums: _perplexity(sums),
               higher_is_better=False),
        Metric("bits_per_byte", rolling, _ll_columns("loglikelihood", "bytes"), lambda sums: _bits_per_byte(sums),
               higher_is_better=False),
        Metric("bleu", gen, _bleu_statistics, _bleu_value,
               options=("tokenize", "smooth_method", "smooth_value", "lowercase", "effective_order",
                        "max_ngram_order")),
        Metric("chrf", gen, _chrf_statistics(0), _chrf_value(0),
               options=("char_order", "beta", "lowercase", "whitespace", "eps_smoothing")),
        Metric("chrf++", gen, _chrf_statistics(2), _chrf_value(2),
               options=("char_order", "beta", "lowercase", "whitespace", "eps_smoothing")),
        *(Metric(t, gen, _rouge_statistics(t), options=("use_stemmer",))
          for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")),
        Metric("bertscore", gen, _bertscore_statistics, options=("model_dir", "num_layers", "idf", "batch_size"),
               required=("model_dir", "num_layers")),
        Metric("exact_match", gen, _squad_statistics("exact_match")),
        Metric("f1", gen, _squad_statistics("f1")),
        Metric("verified", gen, _verified_statistics, options=("task",)),
    ]
    return {(m.name, m.output_type): m for m in metrics}


METRICS = _table()
ALIASES = {"chrf_pp": "chrf++"}
# What a task that lists no metrics is scored by (lm-eval's defaults per output type).
DEFAULTS = {
    "multiple_choice": ("acc", "acc_norm"),
    "generate_until": ("exact_match",),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}


def names(output_type: str) -> list[str]:
    """The metrics that score tasks of `output_type`."""
    return [name for name, kind in METRICS if kind == output_type]


def get(name: str, output_type: str, options: Mapping[str, Any] | None = None) -> Metric:
    """The metric `name` for tasks of `output_type`, its `options` checked.

    Raises:
      ValueError: one line naming an unknown metric (and those that exist for the output
        type) or an unknown or missing option.
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    metric = METRICS.get((ALIASES.get(name, name), output_type))
    if metric is None:
        other = sorted({kind for n, kind in METRICS if n == ALIASES.get(name, name)})
        elsewhere = f" (it scores {', '.join(other)} tasks)" if other else ""
        raise ValueError(f"unknown metric {name!r} for {output_type} tasks{elsewhere}; expected one of "
                         f"{', '.join(names(output_type))}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(metric.options))
    if unknown:
        raise ValueError(f"metric {metric.name!r} has no option {unknown[0]!r}; its options are "
                         f"{list(metric.options) or 'none'}")
    missing = [k for k in metric.required if k not in options]
    if missing:
        raise ValueError(f"metric {metric.name!r} needs the option {missing[0]!r} in the task's metric_list entry "
                         f"(e.g. {{metric: {metric.name}, {', '.join(f'{k}: ...' for k in metric.required)}}})")
    return metric
