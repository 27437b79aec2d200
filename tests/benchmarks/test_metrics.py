"""benchmarks/metrics.py runs in quick mode, every metric agrees with its reference package within
its tolerance, and the printed table says what the returned numbers say.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import math
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("metrics_benchmark", os.path.join(REPO, "benchmarks", "metrics.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_sentence_pairs_are_deterministic_and_varied():
    bench = _load_benchmark()
    hypotheses, references = bench.sentence_pairs(400)
    assert (hypotheses, references) == bench.sentence_pairs(400)
    assert len(hypotheses) == len(references) == 400
    assert {len(r) for r in references} == {1, 2}  # some hypotheses have a second reference
    assert "" in hypotheses and any(h == r[0] for h, r in zip(hypotheses, references))  # empty and exact
    assert sum(h != r[0] for h, r in zip(hypotheses, references)) > 300  # mostly perturbed


def test_metrics_benchmark_quick_mode(capsys):
    results = _load_benchmark().main(["--quick"])
    out = capsys.readouterr().out
    assert "300 sentence pairs from CPython's pydoc topics" in out
    rows = {}
    for line in out.splitlines()[2:]:
        name = line[:16].strip()
        rows[name] = line[16:].split()
    assert list(rows) == list(results)
    assert results["BERTScore"]["pairs"] == 16 and results["BLEU"]["pairs"] == 300
    assert list(results) == ["BLEU", "sentence BLEU", "chrF", "chrF++", "ROUGE", "SQuAD EM/F1", "classification",
                            "BERTScore"]
    for name, numbers in results.items():
        assert numbers["max_diff"] <= numbers["tolerance"], (name, numbers)
        assert numbers["pairs"] > 0 and math.isfinite(numbers["ratio"]), (name, numbers)
        assert numbers["lmlab_s"] > 0 and numbers["reference_s"] > 0, (name, numbers)
        pairs, lmlab_s, reference_s, ratio, max_diff, tolerance = rows[name][:6]
        assert int(pairs) == numbers["pairs"]
        assert lmlab_s == f"{numbers['lmlab_s']:.3f}" and reference_s == f"{numbers['reference_s']:.3f}"
        assert ratio == f"{numbers['ratio']:.2f}"
        assert float(max_diff) <= float(tolerance) == numbers["tolerance"], (name, max_diff, tolerance)
