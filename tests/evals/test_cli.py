"""`python -m evals` (evals/__main__.py, evals/cli.py) on a `python -m train` workdir and on a Hugging
Face directory: results.json, its records and the printed table agree; a finished results.json is
kept unless --overwrite; bad input is one line `error: ...`, found before the model's weights are
read. (The numbers themselves: the harness against lm-eval in test_lm_eval_parity.py.)"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from evals import cli
from tests.cli_output import assert_one_line_error, run_module
from tests.evals.tiny_hf import save_tiny_llama

BUILTINS = ("pydoc_continuation", "pydoc_cloze", "pydoc_perplexity", "arithmetic_addition")


def _cli(*args):
    return run_module("evals", *args)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 2-step `python -m train` run of the tiny preset (its BPE trained into the workdir), on one
    device: the trainer's compilations for 8 simulated devices cost more than the run."""
    root = str(tmp_path_factory.mktemp("run"))
    overrides = ["steps=2", "schedule.warmup_steps=1", "model.max_len=128", "logging.progress_bar=false",
                 "logging.tensorboard=false", "logging.peak_flops=1e11", "eval.num_samples=1", "eval.sample_tokens=2",
                 "eval.max_batches=1", "checkpoint.async_save=false"]
    result = run_module("train", "--config=configs/gpt.py:tiny", f"--workdir={root}",
                        *(f"--config.{o}" for o in overrides), env={"XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("hf")))


def _saved(out):
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    records = {}
    for task, name in summary["records"].items():
        with open(os.path.join(out, name)) as f:
            records[task] = [json.loads(line) for line in f]
    return summary, records


def test_cli_on_a_train_workdir(workdir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"stale": true}')  # replaced: --overwrite
    result = _cli(f"--checkpoint={workdir}", f"--tasks={','.join(BUILTINS)}", f"--out={out}", "--limit=3",
                  "--bootstrap_iters=50", "--batch_size=4", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    summary, records = _saved(out)
    assert list(summary["results"]) == list(BUILTINS) and summary["num_examples"] == dict.fromkeys(BUILTINS, 3)
    assert summary["meta"]["checkpoint"] == os.path.abspath(workdir) and summary["meta"]["limit"] == 3
    assert all(len(r) == 3 for r in records.values())
    results = summary["results"]
    # results.json is what its records add up to
    for metric in ("acc", "acc_norm"):
        assert results["pydoc_continuation"][metric]["value"] == pytest.approx(
            np.mean([r[metric] for r in records["pydoc_continuation"]]))
    rolling = records["pydoc_perplexity"]
    assert results["pydoc_perplexity"]["word_perplexity"]["value"] == pytest.approx(
        math.exp(-sum(r["loglikelihood"] for r in rolling) / sum(r["words"] for r in rolling)), rel=1e-9)
    assert results["pydoc_cloze"]["perplexity"]["value"] == pytest.approx(
        math.exp(-np.mean([r["loglikelihood"] for r in records["pydoc_cloze"]])), rel=1e-9)
    assert results["arithmetic_addition"]["verified"]["stderr"] is not None
    # the table on stdout: a header, a rule and one row per task and metric
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + sum(len(m) for m in results.values())
    assert f"{results['pydoc_continuation']['acc']['value']:.4f}" in result.stdout


def test_cli_on_a_hugging_face_directory_keeps_finished_results(hf_dir, tmp_path):
    task = tmp_path / "capitals.jsonl"
    task.write_text("".join(json.dumps({"query": f"The capital of {c} is", "choices": [" Paris", " Rome", " Oslo"],
                                        "gold": g}) + "\n" for c, g in (("France", 0), ("Italy", 1), ("Norway", 2))))
    out = str(tmp_path / "out")
    first = _cli(f"--checkpoint={hf_dir}", f"--tasks={task}", f"--out={out}", "--limit=2")
    assert first.returncode == 0, first.stderr[-3000:]
    summary, records = _saved(out)
    assert summary["num_examples"] == {"capitals": 2} and summary["meta"]["checkpoint"] == hf_dir
    assert [r["gold"] for r in records["capitals"]] == [0, 1]
    assert all(len(r["loglikelihoods"]) == 3 for r in records["capitals"])
    assert summary["results"]["capitals"]["acc"]["value"] == np.mean([r["acc"] for r in records["capitals"]])
    saved = (tmp_path / "out" / "results.json").read_bytes()

    again = _cli(f"--checkpoint={hf_dir}", f"--tasks={task}", f"--out={out}", "--limit=1")
    assert_one_line_error(again, "results.json already exists", "--overwrite")
    assert (tmp_path / "out" / "results.json").read_bytes() == saved


def test_bad_input_is_one_line_before_the_weights_are_read(tmp_path, hf_dir):
    # a directory that looks like a Hugging Face model but whose weights cannot be read: every
    # error below is found before the weights are
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((Path(hf_dir) / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    no_field = tmp_path / "t.yaml"
    no_field.write_text("task: t\ndataset_path: embedded:cloze\ntest_split: test\noutput_type: loglikelihood\n"
                        "doc_to_text: context\n")
    bad_metric = tmp_path / "m.yaml"
    bad_metric.write_text(no_field.read_text() + "doc_to_target: target\nmetric_list: [{metric: rouge1}]\n")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    cases = [
        ({"task_names": ["no_such_task"]}, r"unknown task 'no_such_task'"),
        ({"task_names": [str(no_field)]}, r"t.yaml has no 'doc_to_target'"),
        ({"task_names": [str(bad_metric)]}, r"unknown metric 'rouge1' for loglikelihood tasks"),
        ({"checkpoint": str(tmp_path)}, r"neither a `python -m train` workdir .* nor a Hugging Face directory"),
        ({"checkpoint": str(tmp_path / "nowhere")}, r"nowhere is not a directory"),
        ({"out_dir": str(finished)}, r"results.json already exists .* --overwrite"),
        ({"limit": 0}, r"--limit=0 must be >= 1"),
        ({"batch_size": 0}, r"--batch_size=0 must be >= 1"),
    ]
    for changes, message in cases:
        kwargs = {"checkpoint": str(broken), "task_names": ["pydoc_cloze"], "out_dir": str(tmp_path / "o"), **changes}
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            cli.run(kwargs.pop("checkpoint"), kwargs.pop("task_names"), kwargs.pop("out_dir"), **kwargs)
        assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "o") and (finished / "results.json").read_text() == "{}"
    with pytest.raises(Exception, match="safetensors|header|deserializ"):  # the weights: read last
        cli.run(str(broken), ["pydoc_cloze"], str(tmp_path / "o"))

    result = _cli(f"--checkpoint={broken}", "--tasks=pydoc_cloze,nope", f"--out={tmp_path / 'o'}")
    assert_one_line_error(result, "unknown task 'nope'")
    assert result.stdout == ""
