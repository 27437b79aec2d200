"""evals.harness + evals.metrics.registry: requests go to the model as the task says, and the
answers are scored as lm-eval scores them (its process_results and aggregations on the same
log-likelihoods); standard errors are lm-eval's sample stderr for means and a bootstrap over
examples for corpus metrics; results.json and the records are written whole, once.

The model here is a stand-in with lm-eval's three request methods (the harness's logic alone;
the real model is evals.lm.ModelLM, whose parity with lm-eval's `hf` backend is
tests/evals/test_lm.py and, end to end, test_lm_eval_parity.py)."""

import hashlib
import importlib
import json
import math
import os
import textwrap

import numpy as np
import pytest

from evals import harness, tasks
from evals.metrics import registry


class RecordingLM:
    """Log-likelihoods that depend on the text (a hash) and, weakly, on its length, so that
    acc and acc_norm disagree on some documents; greedy when the hash says so."""

    def __init__(self, generate=lambda context: "0"):
        self.calls = []
        self._generate = generate

    @staticmethod
    def _score(context, continuation):
        digest = hashlib.sha256(f"{context}\x00{continuation}".encode()).digest()
        return -0.3 * len(continuation) - 4.0 * digest[0] / 255.0, digest[1] % 3 == 0

    def loglikelihood(self, requests):
        self.calls.append(("loglikelihood", list(requests)))
        return [self._score(c, x) for c, x in requests]

    def loglikelihood_rolling(self, texts):
        self.calls.append(("loglikelihood_rolling", list(texts)))
        return [-1.7 * len(t) - self._score("", t)[0] for t in texts]

    def generate_until(self, requests):
        self.calls.append(("generate_until", list(requests)))
        return [self._generate(c) for c, _ in requests]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


MC_RECORDS = [{"question": f"Item {i}: which is it?", "choices": ["a", "bb" * (1 + i % 4), "a longer choice", f"c{i}"],
               "label": i % 4} for i in range(40)]


@pytest.fixture(scope="module")
def mc_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc")
    data = _write_jsonl(root / "mc.jsonl", MC_RECORDS)
    (root / "toy_mc.yaml").write_text(textwrap.dedent(f"""
        task: toy_mc
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {data}}}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}\\nAnswer:"
        doc_to_choice: choices
        doc_to_target: label
        metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
        """))
    return root


def test_multiple_choice_scores_equal_lm_evals_process_results(mc_yaml):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.api.metrics import mean, mean_stderr
    from lm_eval.tasks import TaskManager

    task, = tasks.load_tasks([str(mc_yaml / "toy_mc.yaml")])
    lm = RecordingLM()
    results = harness.evaluate(lm, [task], bootstrap_iters=100)
    (method, requests), = lm.calls
    assert method == "loglikelihood" and len(requests) == 4 * len(MC_RECORDS)  # one call, every choice

    reference = TaskManager(include_path=str(mc_yaml), include_defaults=False).load_task_or_group(["toy_mc"])["toy_mc"]
    expected = {"acc": [], "acc_norm": []}
    for doc, record in zip(reference.eval_docs, results.records["toy_mc"]):
        context = reference.fewshot_context(doc, 0)
        answers = [RecordingLM._score(context, " " + c) for c in doc["choices"]]
        scores = reference.process_results(doc, answers)
        assert record["loglikelihoods"] == [ll for ll, _ in answers]
        assert (record["acc"], record["acc_norm"]) == (scores["acc"], scores["acc_norm"])
        for metric, values in expected.items():
            values.append(scores[metric])
    assert expected["acc"] != expected["acc_norm"]  # the length normalization matters on this data
    for metric, values in expected.items():
        assert results["toy_mc"][metric]["value"] == pytest.approx(mean(values), abs=1e-12)
        assert results["toy_mc"][metric]["stderr"] == pytest.approx(mean_stderr(values), rel=1e-12)


def test_perplexity_metrics_equal_lm_evals_aggregations(tmp_path):
    from lm_eval.api.metrics import bits_per_byte, perplexity, weighted_perplexity
    from lm_eval.api.task import ConfigurableTask

    texts = ["One two  three.", "Ünïcode — bytes\nand words", "x", "a b c d e f g h"]
    cloze = [{"context": f"context {i}", "continuation": f" word{i}"} for i in range(6)]
    rolling, lambada = tasks.load_tasks([_write_jsonl(tmp_path / "wiki.jsonl", [{"text": t} for t in texts]),
                                         _write_jsonl(tmp_path / "lambada.jsonl", cloze)])
    lm = RecordingLM()
    results = harness.evaluate(lm, [rolling, lambada], bootstrap_iters=0)
    lls = lm.loglikelihood_rolling(texts)
    words = [ConfigurableTask.count_words(t) for t in texts]
    nbytes = [ConfigurableTask.count_bytes(t) for t in texts]
    got = results["wiki"]
    assert got["word_perplexity"]["value"] == pytest.approx(weighted_perplexity(list(zip(lls, words))), rel=1e-12)
    assert got["byte_perplexity"]["value"] == pytest.approx(weighted_perplexity(list(zip(lls, nbytes))), rel=1e-12)
    assert got["bits_per_byte"]["value"] == pytest.approx(bits_per_byte(list(zip(lls, nbytes))), rel=1e-12)
    assert all(entry["stderr"] is None for entry in got.values())  # bootstrap_iters=0: none, as lm-eval
    scored = [RecordingLM._score(d["context"], d["continuation"]) for d in cloze]
    assert results["lambada"]["perplexity"]["value"] == pytest.approx(perplexity([ll for ll, _ in scored]), rel=1e-12)
    assert results["lambada"]["acc"]["value"] == pytest.approx(np.mean([g for _, g in scored]), abs=1e-12)


def test_bootstrap_stderr_of_a_corpus_metric():
    """A corpus metric whose value is a mean (sum x / sum 1): the bootstrap's standard error
    tends to the population standard deviation over sqrt(N); with R resamples its relative
    Monte Carlo error is about 1/sqrt(2R) (0.5% at R=20000), so 3% is six of them. Against
    lm-eval's own bootstrap (other draws, R=2000 each: ~2.2% apart) within 10%."""
    from lm_eval.api.metrics import bootstrap_stderr, perplexity

    rng = np.random.default_rng(0)
    lls = rng.normal(-2.0, 0.5, size=60)
    metric = registry.get("perplexity", "loglikelihood")
    stats = metric.item_statistics([{"loglikelihood": ll, "is_greedy": False} for ll in lls])
    value, stderr = metric.aggregate(stats, bootstrap_iters=2000, rng=np.random.default_rng(1))
    assert value == pytest.approx(perplexity(list(lls)), rel=1e-12)
    os.environ["DISABLE_MULTIPROC"] = "1"
    assert stderr == pytest.approx(bootstrap_stderr(perplexity, list(lls), iters=2000), rel=0.10)

    mean_of = registry.Metric("mean_ratio", "loglikelihood", None, lambda sums: sums[0] / sums[1])
    _, stderr = mean_of.aggregate(np.c_[lls, np.ones_like(lls)], bootstrap_iters=20000, rng=np.random.default_rng(2))
    assert stderr == pytest.approx(lls.std(ddof=0) / math.sqrt(len(lls)), rel=0.03)


def test_generation_requests_carry_the_tasks_kwargs_and_are_verified(tmp_path):
    yaml = tmp_path / "add.yaml"
    yaml.write_text("task: add\ndataset_path: verifiable:addition\ndataset_kwargs: {num_eval: 30}\ntest_split: test\n"
                    "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
                    "generation_kwargs: {until: [\"\\n\", \";\"], max_gen_toks: 5}\n"
                    "metric_list: [{metric: verified, task: addition}]\n")
    task, = tasks.load_tasks([str(yaml)])

    def solve(context):  # right on even sums, with the spaces and leading zeros the verifier forgives
        total = sum(int(x) for x in context[:-1].split("+"))
        return f" 0{total} " if total % 2 == 0 else str(total + 1)

    lm = RecordingLM(solve)
    results = harness.evaluate(lm, [task], limit=20)
    (method, requests), = lm.calls
    assert method == "generate_until" and len(requests) == 20
    assert all(kwargs == {"until": ["\n", ";"], "max_gen_toks": 5} for _, kwargs in requests)
    right = [sum(int(x) for x in d["prompt"][:-1].split("+")) % 2 == 0 for d in task.docs[:20]]
    assert [r["verified"] for r in results.records["add"]] == [float(x) for x in right]
    assert results["add"]["verified"]["value"] == pytest.approx(np.mean(right))
    assert results.num_examples == {"add": 20}


def test_limit_keeps_the_few_shot_draws_of_a_full_run(tmp_path):
    path = _write_jsonl(tmp_path / "mc.jsonl", [{"query": r["question"], "choices": r["choices"], "gold": r["label"]}
                                                for r in MC_RECORDS])
    task, = tasks.load_tasks([path], num_fewshot=3)
    full, short = RecordingLM(), RecordingLM()
    harness.evaluate(full, [task], bootstrap_iters=0)
    harness.evaluate(short, [task], limit=5, bootstrap_iters=0)
    assert short.calls[0][1] == full.calls[0][1][:5 * 4]
    assert all(r[0].count("\n\n") == 3 for r in short.calls[0][1])


def test_results_do_not_depend_on_the_other_tasks(tmp_path, mc_yaml):
    mc, = tasks.load_tasks([str(mc_yaml / "toy_mc.yaml")])
    wiki, = tasks.load_tasks([_write_jsonl(tmp_path / "wiki.jsonl", [{"text": f"doc {i} " * (i + 1)} for i in range(9)])])
    alone = harness.evaluate(RecordingLM(), [wiki], bootstrap_iters=200, seed=3)
    both = harness.evaluate(RecordingLM(), [mc, wiki], bootstrap_iters=200, seed=3)
    other_seed = harness.evaluate(RecordingLM(), [wiki], bootstrap_iters=200, seed=4)
    assert alone["wiki"] == both["wiki"]
    assert alone["wiki"]["word_perplexity"]["stderr"] != other_seed["wiki"]["word_perplexity"]["stderr"]


def test_write_and_table(tmp_path, mc_yaml):
    mc, = tasks.load_tasks([str(mc_yaml / "toy_mc.yaml")])
    odd = tasks.Task(name="a/b c", output_type="loglikelihood_rolling", docs=[{"text": "x y"}, {"text": "z"}],
                     doc_to_target="text", metrics=(tasks.MetricSpec("word_perplexity"),))
    results = harness.evaluate(RecordingLM(), [mc, odd], limit=10)
    out = tmp_path / "out"
    path = harness.write(str(out), results, meta={"checkpoint": "somewhere"})
    assert sorted(os.listdir(out)) == ["a_b_c.jsonl", "results.json", "toy_mc.jsonl"]  # no temporary left
    with open(path) as f:
        saved = json.load(f)
    assert saved["results"] == results.results and saved["meta"] == {"checkpoint": "somewhere"}
    assert saved["num_examples"] == {"toy_mc": 10, "a/b c": 2}
    assert saved["records"] == {"toy_mc": "toy_mc.jsonl", "a/b c": "a_b_c.jsonl"}
    lines = (out / "toy_mc.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == results.records["toy_mc"]
    text = harness.table(results)
    assert text.count("\n") == 2 + 2 and "toy_mc" in text and "acc_norm ↑" in text and "word_perplexity ↓" in text
    for metric in ("acc", "acc_norm"):
        entry = results["toy_mc"][metric]
        assert f"{entry['value']:.4f}" in text and f"±{entry['stderr']:.4f}" in text


def test_bad_arguments_and_answers():
    task = tasks.Task(name="t", output_type="loglikelihood_rolling", docs=[{"text": "x"}], doc_to_target="text",
                      metrics=(tasks.MetricSpec("bits_per_byte"),))
    with pytest.raises(ValueError, match="limit=0"):
        harness.evaluate(RecordingLM(), [task], limit=0)

    class Short(RecordingLM):
        def loglikelihood_rolling(self, texts):
            return []

    with pytest.raises(RuntimeError, match="answered 0 of 1 requests"):
        harness.evaluate(Short(), [task])


HYPOTHESES = ["The cats sat on the mats.", "", "Über naïve café — it's 3.5 °C!", "a b c d e f",
              "Dogs chase cats\nand cats chase mice.", "the the the the", "Paris", "東京は日本の首都です。"]
REFERENCES = [["The cat is on the mat.", "A cat sat on a mat."], ["Nothing here.", "Empty."],
              ["Uber naive cafe: it is 3.5 °C!", "Über naïve café, 3.5 degrees."], ["a b c", "d e f g"],
              ["Dogs chase cats.\nCats chase mice.", "Cats are chased by dogs."], ["the cat", "the the"],
              ["Paris", "paris, France"], ["東京は日本の首都。", "首都は東京です。"]]


@pytest.fixture(scope="module")
def generation_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    data = _write_jsonl(root / "gen.jsonl", [{"prompt": f"item {i}:", "references": refs}
                                              for i, refs in enumerate(REFERENCES)])
    metrics = ["bleu", "chrf", "chrf++", "rouge1", "rouge2", "rougeLsum", "exact_match", "f1"]
    (root / "gen.yaml").write_text(
        f"task: gen\ndataset_path: files:{data}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: prompt\ndoc_to_target: references\n"
        "metric_list: [" + ", ".join(f"{{metric: {m}}}" for m in metrics) + ", {metric: rougeL, use_stemmer: true}]\n")
    task, = tasks.load_tasks([str(root / "gen.yaml")])
    by_prompt = {f"item {i}:": h for i, h in enumerate(HYPOTHESES)}
    return task, harness.evaluate(RecordingLM(lambda c: by_prompt[c]), [task], bootstrap_iters=200)


def test_generation_metrics_equal_their_reference_packages(generation_results):
    import sacrebleu
    from rouge_score import rouge_scorer

    from evals.metrics.squad import squad

    _, results = generation_results
    got = results["gen"]
    refs_t = [list(r) for r in zip(*REFERENCES)]  # sacrebleu: one stream per reference position
    assert got["bleu"]["value"] == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, refs_t).score, abs=1e-9)
    assert got["chrf"]["value"] == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, refs_t).score, abs=1e-9)
    assert got["chrf++"]["value"] == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, refs_t, word_order=2).score,
                                                   abs=1e-9)
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        stem = rouge_type == "rougeL"  # the task file gives rougeL the option use_stemmer: true
        scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=stem)
        fs = [scorer.score_multi(refs, h)[rouge_type].fmeasure for h, refs in zip(HYPOTHESES, REFERENCES)]
        assert got[rouge_type]["value"] == pytest.approx(np.mean(fs), abs=1e-12)
        assert got[rouge_type]["stderr"] == pytest.approx(np.std(fs, ddof=1) / math.sqrt(len(fs)), rel=1e-9)
        if stem:  # the option mattered ("cats" / "cat", "mats" / "mat")
            plain = rouge_scorer.RougeScorer([rouge_type])
            assert np.mean(fs) > np.mean([plain.score_multi(r, h)[rouge_type].fmeasure
                                          for h, r in zip(HYPOTHESES, REFERENCES)])
    assert {k: got[k]["value"] for k in ("exact_match", "f1")} == pytest.approx(squad(HYPOTHESES, REFERENCES))
    # SQuAD's normalization drops articles: "the the the the" matches "the the" (both empty); and "Paris"
    assert got["exact_match"]["value"] == pytest.approx(200 / len(HYPOTHESES))
    assert all(got[m]["stderr"] > 0 for m in ("bleu", "chrf", "chrf++"))  # bootstrapped


@pytest.mark.parametrize("name,reference", [("bleu", "BLEU"), ("chrf", "CHRF"), ("chrf++", "CHRF")])
def test_a_resample_of_summed_statistics_is_the_corpus_metric_of_the_resampled_corpus(name, reference):
    """What the bootstrap relies on: re-aggregating the per-example statistics of a resample
    (with repeats) equals sacrebleu scoring the resampled corpus itself."""
    import sacrebleu

    metric = registry.get(name, "generate_until")
    items = [{"prediction": h, "references": r} for h, r in zip(HYPOTHESES, REFERENCES)]
    stats = metric.item_statistics(items)
    scorer = getattr(sacrebleu.metrics, reference)(**({"word_order": 2} if name == "chrf++" else {}))
    rng = np.random.default_rng(5)
    for _ in range(4):
        picks = rng.integers(0, len(items), len(items))
        counts = np.bincount(picks, minlength=len(items)).astype(np.float64)
        resampled = scorer.corpus_score([HYPOTHESES[i] for i in picks],
                                        [[REFERENCES[i][k] for i in picks] for k in range(2)]).score
        assert metric.from_sums(counts @ stats) == pytest.approx(resampled, abs=1e-9)


WRITER = """
import json, os, sys
import jax
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
from evals import harness
results = harness.Results({"t": {"acc": {"value": 0.5 + pid, "stderr": None}}}, {"t": [{"doc_id": 0, "by": pid}]},
                          {"t": 1}, {"t": {"acc": True}})
if pid == 0:
    import time
    time.sleep(2)  # process 1 reaches write first: it must wait for process 0's files
path = harness.write(out, results, meta={"process": pid})
with open(path) as f:
    print(json.load(f)["meta"]["process"])
jax.distributed.shutdown()
"""


def test_process_zero_writes_and_the_others_wait(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(pid), str(port), str(tmp_path / "out")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [["0"], ["0"]]  # process 1 read process 0's file
    assert json.loads((tmp_path / "out" / "t.jsonl").read_text()) == {"doc_id": 0, "by": 0}
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "t.jsonl"]


def test_classification_metrics_of_multiple_choice_equal_scikit_learn(tmp_path):
    from sklearn.metrics import f1_score, matthews_corrcoef

    data = _write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    (tmp_path / "cls.yaml").write_text(
        f"task: cls\ndataset_path: files:{data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list: [{metric: f1, average: macro}, {metric: mcc}]\n")
    task, = tasks.load_tasks([str(tmp_path / "cls.yaml")])
    results = harness.evaluate(RecordingLM(), [task], bootstrap_iters=200)
    records = results.records["cls"]
    golds = [r["gold"] for r in records]
    predictions = [int(np.argmax(r["loglikelihoods"])) for r in records]
    assert results["cls"]["f1"]["value"] == pytest.approx(f1_score(golds, predictions, average="macro"), abs=1e-12)
    assert results["cls"]["mcc"]["value"] == pytest.approx(matthews_corrcoef(golds, predictions), abs=1e-12)
    assert results["cls"]["f1"]["stderr"] > 0 and results["cls"]["mcc"]["stderr"] > 0


def test_bertscore_is_the_mean_f1_of_evals_metrics_bertscore(tmp_path):
    from tests.minilm import minilm_path

    bertscore = importlib.import_module("evals.metrics.bertscore").bertscore
    hypotheses, references = HYPOTHESES[:4], REFERENCES[:4]
    data = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": f"p{i}", "references": r} for i, r in enumerate(references)])
    (tmp_path / "b.yaml").write_text(
        f"task: b\ndataset_path: files:{data}\ntest_split: test\noutput_type: generate_until\ndoc_to_text: prompt\n"
        f"doc_to_target: references\nmetric_list: [{{metric: bertscore, model_dir: {minilm_path()}, num_layers: 3}}]\n")
    task, = tasks.load_tasks([str(tmp_path / "b.yaml")])
    by_prompt = {f"p{i}": h for i, h in enumerate(hypotheses)}
    results = harness.evaluate(RecordingLM(lambda c: by_prompt[c]), [task])
    f1 = bertscore(hypotheses, references, model_dir=minilm_path(), num_layers=3).f1
    assert results["b"]["bertscore"]["value"] == pytest.approx(float(np.mean(f1)), abs=1e-12)
    assert [r["bertscore"] for r in results.records["b"]] == pytest.approx(list(f1), abs=1e-12)
