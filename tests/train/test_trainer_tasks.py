"""Training-time harness tasks (`eval.tasks`, train/task_eval.py): what the trainer logs at step
k equals `evals.harness.evaluate` run separately on checkpoint k of the same run, under dp (all
parameters train) and fsdp (a LoRA run: the sharded frozen base and its adapters) on the 8
simulated devices; a bad `eval.tasks` is one line before any work, a task the model cannot score
fails before the first step, and a PPO run is scored as its policy.

One tiny GPT run per strategy (4 steps, an evaluation and a checkpoint at step 2 and at the end)
scores three tasks of the three request kinds: multiple choice by log-likelihood (the built-in
pydoc_continuation), greedy generation (a task file: data.verifiable's held-out additions, checked
by their verifier) and rolling perplexity (the built-in pydoc_perplexity), `eval.task_limit`
examples each.
"""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.loader import load_config
from inference.generate import lm_logits
from tests.cli_output import REPO, assert_one_line_error, run_module
from tests.train.test_metrics import read_tensorboard_scalars
from train import build, task_eval, trainer, validate

ADDITION_YAML = """task: addition
dataset_path: verifiable:addition
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
generation_kwargs: {until: ["\\n"], max_gen_toks: 8}
metric_list: [{metric: verified, task: addition}]
"""
BUILTIN = ("pydoc_continuation", "pydoc_perplexity")
LIMIT, BATCH, STEPS, EVERY = 8, 8, 4, 2
CONTEXT = 128  # model.max_len: the longest continuation of pydoc_continuation's first 8 documents fits
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
         "checkpoint.async_save=false", "eval.num_samples=0", "eval.max_batches=1"]
# The logged numbers and the separate harness run compute the same float32 programs on the same
# parameters (a checkpoint holds the live state's floats exactly) and the same requests. Where the
# layouts match, XLA compiles the same program and the numbers are identical; a different split
# of a reduction moves a token's log-prob by a few eps32 relative to the logits' magnitude, so a
# sum over at most a few thousand tokens (a perplexity's exponent) moves by ~eps32 * sqrt(n) *
# |log p| relative: 1e-5 bounds it with room. Counted metrics (accuracy, verified) are equal.
RTOL = 1e-5


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(config overrides: a data_dir and a trained tokenizer shared by this module's runs, the tasks)."""
    root = tmp_path_factory.mktemp("shared")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [f"data.data_dir={root / 'tfds'}"])
    build.tokenizer(config, str(root), build.data_config(config, str(root)))
    (root / "addition.yaml").write_text(ADDITION_YAML)
    tasks = [BUILTIN[0], str(root / "addition.yaml"), BUILTIN[1]]
    return [f"data.data_dir={root / 'tfds'}", f"tokenizer.path={root / 'tokenizer'}"], tasks


def _config(shared, *overrides):
    return load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [*shared[0], *QUIET, *overrides])


# fsdp trains LoRA adapters on a frozen base: the harness then reads both, sharded, and the adapters.
RUNS = {"dp": ["sharding.strategy=dp", "logging.tensorboard=true"],
        "fsdp_lora": ["sharding.strategy=fsdp", "finetune.method=lora", "finetune.lora.rank=4"]}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, shared, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    config = _config(shared, f"steps={STEPS}", f"eval.every_steps={EVERY}", f"checkpoint.save_interval_steps={EVERY}",
                     "schedule.warmup_steps=1", f"data.batch_size={BATCH}", f"eval.tasks={','.join(shared[1])}",
                     f"eval.task_limit={LIMIT}", f"model.max_len={CONTEXT}", *RUNS[request.param])
    summary = trainer.run(config, str(workdir))
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return config, workdir, summary, lines


def _harness_on_checkpoint(config, workdir, step) -> dict[str, float]:
    """`eval/<task>/<metric>` of the harness run on checkpoint `step` alone (as `python -m evals` does)."""
    from evals import harness, tasks
    from evals.lm import ModelLM

    lm = ModelLM.from_path(str(workdir), step=step, batch_size=BATCH, strategy=config.sharding.strategy)
    results = harness.evaluate(lm, tasks.load_tasks(config.eval.tasks.split(",")), limit=LIMIT)
    return {f"eval/{task}/{metric}": score["value"] for task, scores in results.results.items()
            for metric, score in scores.items()}


def _assert_equal_metrics(logged: dict[str, float], expected: dict[str, float]) -> None:
    assert sorted(logged) == sorted(expected)
    for key, want in expected.items():
        if key.endswith(("/acc", "/acc_norm", "/verified")):
            assert logged[key] == want, key
        else:
            assert math.isfinite(want) and logged[key] == pytest.approx(want, rel=RTOL), key


def test_logged_task_metrics_equal_the_harness_on_each_checkpoint(run):
    config, workdir, summary, lines = run
    scored = [x for x in lines if any(k.startswith("eval/") for k in x)]
    # The start's scores, then every eval.every_steps beside val_loss; the end's go to the summary.
    assert [x["step"] for x in scored] == [0, EVERY] and [x["step"] for x in lines if "val_loss" in x] == [EVERY]
    logged_start = {k: v for k, v in scored[0].items() if k.startswith("eval/")}
    logged_mid = {k: v for k, v in scored[1].items() if k.startswith("eval/")}
    logged_end = {k: v for k, v in summary.items() if k.startswith("eval/")}
    # Every task's metrics, next to val_loss at step 2 and in the summary at the end.
    expected_keys = {"eval/pydoc_continuation/acc", "eval/pydoc_continuation/acc_norm", "eval/addition/verified",
                     "eval/pydoc_perplexity/word_perplexity", "eval/pydoc_perplexity/byte_perplexity",
                     "eval/pydoc_perplexity/bits_per_byte"}
    assert set(logged_start) == set(logged_mid) == expected_keys == set(logged_end)
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert {k: on_disk[k] for k in logged_end} == logged_end
    if config.logging.tensorboard:  # the same scalars in TensorBoard (float32 there)
        events = read_tensorboard_scalars(workdir / "tensorboard")
        for key in expected_keys:
            assert [step for step, _ in events[key]] == [0, EVERY], key
            assert events[key][1][1] == pytest.approx(logged_mid[key], rel=1e-6), key
    _assert_equal_metrics(logged_mid, _harness_on_checkpoint(config, workdir, EVERY))
    _assert_equal_metrics(logged_end, _harness_on_checkpoint(config, workdir, STEPS))
    # Training moved what trains (a LoRA run: only the adapters): each evaluation scored other parameters.
    key = "eval/pydoc_perplexity/word_perplexity"
    assert len({logged_start[key], logged_mid[key], logged_end[key]}) == 3


@pytest.mark.parametrize("overrides, message", [
    (["eval.tasks=no_such_task"], "config key `eval.tasks`='no_such_task': unknown task 'no_such_task'"),
    (["eval.tasks=pydoc_cloze,/no/such/task.jsonl"], "/no/such/task.jsonl does not exist"),
    (["eval.task_limit=-1"], "config key `eval.task_limit`=-1 must be >= 0"),
])
def test_a_bad_task_config_is_refused_before_any_work(shared, tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=None) as e:
        trainer.run(_config(shared, *overrides), str(tmp_path / "run"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # no config.json, no data, no tokenizer


def test_an_encoder_run_naming_tasks_is_refused_in_one_line(tmp_path):
    result = run_module("train", "--config=configs/bert.py:tiny", f"--workdir={tmp_path / 'run'}",
                        "--config.eval.tasks=pydoc_cloze")
    assert_one_line_error(result, "config key `eval.tasks`='pydoc_cloze' needs a causal LM",
                          "objective 'mlm'", "BertForMaskedLM", "eval.tasks=''")
    assert not (tmp_path / "run").exists()


def test_a_task_the_model_cannot_score_fails_before_training(shared, tmp_path):
    """pydoc_continuation's 4th document has a 97-token ending, more than the tiny model's context
    (64): the run stops at its start-of-run scoring, in one line naming the task, before a step."""
    config = _config(shared, f"steps={STEPS}", "schedule.warmup_steps=1", f"eval.tasks={BUILTIN[0]}",
                     "eval.task_limit=4")
    with pytest.raises(ValueError) as e:
        trainer.run(config, str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and message.startswith("config key `eval.tasks`: task 'pydoc_continuation' cannot be "
                                                       "scored by this run's model: ")
    assert "more than max_length=64" in message
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
    assert "loss" not in (tmp_path / "metrics.jsonl").read_text()  # no training step ran


def test_a_reward_model_naming_tasks_is_refused(shared, tmp_path):
    """A score head (objective=reward) scores text, it has no next-token distribution."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": " good", "rejected": " bad"}) + "\n"
                             for i in range(20)))
    config = _config(shared, "objective=reward", f"data.source=files:{pairs}", "data.validation_fraction=0.25",
                     f"eval.tasks={BUILTIN[0]}")
    with pytest.raises(ValueError, match=r"config key `eval.tasks`='pydoc_continuation' needs a causal LM .*"
                                         r"objective 'reward'\) trains a decoder under a 'score' head"):
        validate.check(config, str(tmp_path / "run"))


@pytest.mark.parametrize("value_head", ["shared", "separate"])
def test_a_ppo_run_scores_its_policy(shared, value_head):
    """PPO's model (a value head on the trunk, or a separate value model) is scored as its policy:
    an LM-head decoder whose logits are the policy's."""
    config = _config(shared, "objective=ppo", f"rl.value_head={value_head}")
    model = build.model(config, 512)
    ids = jnp.asarray([[1, 5, 9, 2]], jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
    policy, policy_params = task_eval.policy_lm(model, params)
    assert policy.config.head == "lm" and "value_model" not in policy_params and "score" not in policy_params
    want = lm_logits(model.apply({"params": params}, ids))
    np.testing.assert_array_equal(np.asarray(policy.apply({"params": policy_params}, ids)), np.asarray(want))
