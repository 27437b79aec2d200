"""python -m train.evaluate: a run's checkpoint evaluated with its objective equals the trainer's final
evaluation of the same step, written to eval.json without touching summary.json; and a fine-tuning
run with frozen parameters trains, checkpoints and evaluates through the same doors."""

import json
import os

import pytest

from configs.loader import load_config
from tests.cli_output import REPO, assert_one_line_error, run_module
from train import evaluate, trainer


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step tiny run with its first layer frozen (finetune.freeze), checkpointed at its end."""
    workdir = tmp_path_factory.mktemp("run")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [
        "steps=2", "schedule.warmup_steps=1", "eval.max_batches=1", "tokenizer.vocab_size=300",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
        "checkpoint.async_save=false", "eval.sample_tokens=2", r"finetune.freeze=^layer_0/",
    ])  # fmt: skip
    summary = trainer.run(config, str(workdir))
    return workdir, summary


def test_evaluate_writes_the_trainers_final_evaluation_and_leaves_the_summary(finished_run):
    workdir, summary = finished_run
    before = (workdir / "summary.json").read_bytes(), (workdir / "config.json").read_bytes()
    result = evaluate.evaluate_checkpoint(str(workdir))
    written = json.loads((workdir / "eval.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["step"] == 2 == summary["final_step"] and written["objective"] == "lm"
    # The same parameters through the same jitted evaluation: equal, not merely close.
    assert written["metrics"] == {"loss": summary["val_loss"], "accuracy": summary["val_accuracy"]}
    assert written["sums"]["num_tokens"] == summary["val_tokens"]
    assert ((workdir / "summary.json").read_bytes(), (workdir / "config.json").read_bytes()) == before


def test_evaluate_names_a_missing_workdir_or_step(finished_run, tmp_path):
    workdir, _ = finished_run
    with pytest.raises(FileNotFoundError, match=r"--workdir=.*nowhere does not exist"):
        evaluate.evaluate_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"holds no committed checkpoint"):
        evaluate.evaluate_checkpoint(str(tmp_path))
    result = run_module("train.evaluate", f"--workdir={workdir}", "--step=7")
    assert_one_line_error(result, "has no checkpoint at step 7; it holds steps [2]", "--step")
