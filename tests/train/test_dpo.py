"""objective=dpo through `train.trainer.run` on a tiny GPT and preference JSONL written here:
fsdp with the reference's log-probs on the fly, stopped and resumed == dp precomputed
uninterrupted on 8 devices, DPO with LoRA from a pretrained run (the reference is the base),
KTO, SimPO/ORPO without a reference, evaluation before and after, one-line errors."""

import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.loader import load_config
from data import preference
from models.layers.peft import is_peft_path
from tests.cli_output import REPO, assert_one_line_error, run_module
from tests.data.test_preference import TEXT, _hf_dir
from train import trainer, validate

EPS32 = float(np.finfo(np.float32).eps)
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
         "checkpoint.async_save=false", "logging.log_every_steps=1"]
BATCH, SEQ, STEPS, LR = 8, 32, 4, 1e-2
KEYWORDS = ["if", "for", "while", "def", "class", "try", "with", "lambda", "pass", "yield", "global", "return",
            "del", "import", "raise", "assert"]
BUILTINS = ["len", "print", "range", "open", "sum", "min", "max", "zip", "map", "sorted", "repr", "iter", "next",
            "abs", "round", "hash"]


def _pairs():
    """Asked about a word, the chosen answer helps and the rejected one refuses (32 lines): a
    preference the held-out lines share, so a few steps raise their margins."""
    return [{"prompt": f"Can you explain {word}?", "chosen": f" Sure: {word} is a Python name.",
             "rejected": " No."} for word in KEYWORDS + BUILTINS]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_files")
    (root / "tok").mkdir()
    tokenizer = _hf_dir(root / "tok")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(line) + "\n" for line in _pairs()))
    kto = root / "kto.jsonl"
    kto.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}) + "\n"
                           for i, p in enumerate(_pairs()) for side in (("chosen", "rejected")[i % 2],)))
    text = root / "text.jsonl"  # one document per line
    text.write_text("".join(json.dumps({"text": line}) + "\n" for line in TEXT.splitlines() if line.strip()))
    return {"tokenizer": tokenizer, "pairs": pairs, "kto": kto, "text": text, "root": root}


def _overrides(files, *extra, source="pairs", tokenizer=True):
    return ["objective=dpo", f"data.source=files:{files[source]}", f"data.seq_len={SEQ}", f"model.max_len={SEQ}",
            f"data.batch_size={BATCH}", f"steps={STEPS}", "schedule.name=constant", "schedule.warmup_steps=1",
            f"optimizer.lr={LR}", "checkpoint.save_interval_steps=2", "data.validation_fraction=0.25",
            "eval.max_batches=0", *([f"tokenizer.path={files['tokenizer']}"] if tokenizer else []), *QUIET, *extra]


def _config(files, *extra, **kw):
    return load_config(os.path.join(REPO, "configs/gpt.py:tiny"), _overrides(files, *extra, **kw))


def _run(files, workdir, *extra, **kw):
    summary = trainer.run(_config(files, *extra, **kw), str(workdir))
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return summary, {x["step"]: x for x in lines if "loss" in x}


def _state(workdir, step, key="params"):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))[key]


def _leaves(tree):
    return [("/".join(str(getattr(k, "key", k)) for k in p), np.asarray(x))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _assert_same_run(a_dir, a_metrics, b_dir, b_metrics, steps=range(1, STEPS + 1)):
    """Parameters and losses equal up to the float32 reordering of another layout: a gradient
    element moves by ~4 eps32 sqrt(B T) |g| / sqrt(P), Adam's update by lr * dg / eps at most."""
    a, b = _leaves(_state(a_dir, STEPS)), _leaves(_state(b_dir, STEPS))
    num_params = sum(x.size for _, x in a)
    dg = max(4 * EPS32 * math.sqrt(2 * BATCH * SEQ) * a_metrics[s]["grad_norm"] / math.sqrt(num_params)
             for s in steps)
    atol = STEPS * LR * dg / 1e-8
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=2 * EPS32, atol=atol, err_msg=path)
    for s in steps:
        for key in ("loss", "rewards_chosen", "rewards_margins", "logps_chosen"):
            scale = 1 + abs(a_metrics[s][key])
            np.testing.assert_allclose(a_metrics[s][key], b_metrics[s][key], rtol=0,
                                       atol=64 * EPS32 * SEQ * scale, err_msg=f"step {s} {key}")


@pytest.fixture(scope="module")
def dp_run(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dp")
    return (workdir, *_run(files, workdir, "sharding.strategy=dp"))


def test_dpo_learns_and_reports_trl_metrics(dp_run):
    _, summary, metrics = dp_run
    before, after = summary["eval_before"], summary["eval_after"]
    print(f"held-out DPO loss {before['loss']:.4f} -> {after['loss']:.4f}, accuracy "
          f"{before['rewards_accuracies']:.2f} -> {after['rewards_accuracies']:.2f}")
    # Before the first step the policy is the reference: every reward is 0, the loss log 2.
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["rewards_chosen"] == before["rewards_margins"] == before["rewards_accuracies"] == 0
    assert after["loss"] < math.log(2) - 0.05 and after["rewards_margins"] > 0 and after["rewards_accuracies"] > 0.5
    assert summary["val_loss"] == after["loss"] and summary["final_step"] == STEPS
    assert set(metrics) == set(range(1, STEPS + 1))
    for key in ("rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies", "logps_chosen",
                "logps_rejected"):
        assert all(np.isfinite(m[key]) for m in metrics.values()), key
    m = metrics[STEPS]
    assert m["rewards_margins"] == pytest.approx(m["rewards_chosen"] - m["rewards_rejected"], abs=1e-6)


def test_fsdp_on_the_fly_and_resumed_equals_dp_precomputed(files, dp_run, tmp_path):
    """One run that changes three things at once ends where dp_run ends: laid out by fsdp over
    8 devices (sharded == unsharded), dpo.precompute_reference=False (the reference's log-probs
    per batch from its sharded params == the precomputed table), stopped at step 2 and resumed
    (== uninterrupted)."""
    workdir = tmp_path / "fly"
    _run(files, workdir, "sharding.strategy=fsdp", "dpo.precompute_reference=false", "steps=2")
    summary, metrics = _run(files, workdir, "sharding.strategy=fsdp", "dpo.precompute_reference=false")
    assert summary["final_step"] == STEPS and summary["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    _assert_same_run(dp_run[0], dp_run[2], workdir, metrics)
    assert summary["eval_after"]["loss"] == pytest.approx(dp_run[1]["eval_after"]["loss"], abs=1e-5)


@pytest.fixture(scope="module")
def base_run(files, tmp_path_factory):
    """A tiny GPT pretrained (objective lm) for a step on plain text with the same tokenizer."""
    workdir = tmp_path_factory.mktemp("base")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [
        f"tokenizer.path={files['tokenizer']}", f"data.source=files:{files['text']}", f"data.seq_len={SEQ}",
        f"model.max_len={SEQ}", "steps=1", "schedule.warmup_steps=0", "eval.max_batches=1", "eval.num_samples=0",
        *QUIET])  # fmt: skip
    trainer.run(config, str(workdir))
    return workdir


def test_lora_dpo_from_a_pretrained_run(files, base_run, tmp_path):
    """init_from=run: of a pretrained run, LoRA, fsdp, reference on the fly: the reference is the
    base (the policy equals it before the first step), only the adapters train, the loss falls."""
    workdir = tmp_path / "lora"
    summary, _ = _run(files, workdir, f"init_from=run:{base_run}", "finetune.method=lora", "sharding.strategy=fsdp",
                      "dpo.precompute_reference=false", "optimizer.lr=3e-2", tokenizer=False)
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["rewards_chosen"] == 0
    assert after["loss"] < before["loss"] - 0.02 and after["rewards_margins"] > 0
    trained = _leaves(_state(workdir, STEPS))
    assert trained and all(is_peft_path(p) for p, _ in trained)
    base = dict(_leaves(_state(base_run, 1)))
    frozen = _leaves(_state(workdir, STEPS, "frozen"))
    assert frozen and all(np.array_equal(x, base[p]) for p, x in frozen)


def test_kto_run(files, tmp_path):
    summary, metrics = _run(files, tmp_path / "kto", "dpo.loss=kto", "steps=2", source="kto")
    before, after = summary["eval_before"], summary["eval_after"]
    # At the reference every log-ratio and the KL estimate are 0: each row's loss is 1 - sigmoid(0).
    assert before["loss"] == pytest.approx(0.5, abs=1e-6) and before["kl"] == 0
    assert after["loss"] < 0.5 and after["rewards_margins"] > 0
    assert {"kl", "rewards_chosen", "rewards_rejected", "logps_chosen"} <= set(metrics[2])


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_build_no_reference(files, tmp_path, loss, monkeypatch):
    """SimPO's and ORPO's batches are the data's rows as they are: no reference is built (the
    trainer's whole run of a reference-free loss is the same loop; its losses are
    test_dpo_losses')."""
    from train import reference

    def refuse(run):
        raise AssertionError(f"{loss} built a reference")

    monkeypatch.setattr(reference, "build", refuse)
    r = trainer.setup(_config(files, f"dpo.loss={loss}"), str(tmp_path / loss), write_config=False)
    train_iter = r.objective.train_iterator(r.config, r.data, r.tokenizer)
    batch, boundary = next(r.objective.batches(r, train_iter, lambda: None))
    assert boundary and set(batch) == set(r.objective.batch_spec(BATCH, SEQ)) == set(preference.PAIRED_KEYS)
    _, metrics = r.objective.evaluate_run(r, r.init_fn(jax.random.key(0)), r.objective.eval_batches(
        r.config, r.data, r.tokenizer))
    assert np.isfinite(metrics["loss"]) and metrics["rewards_chosen"] < 0  # beta * a mean log-prob


# ------------------------------------------------------------------------------ bad input


def _cli(files, workdir, *extra, **kw):
    return run_module("train", "--config=configs/gpt.py:tiny", f"--workdir={workdir}",
                      *(f"--config.{o}" for o in _overrides(files, *extra, **kw)))


@pytest.mark.parametrize(("line", "fragments"), [
    ({"prompt": "Can you explain if?", "chosen": " Yes."}, ('missing key "rejected"', "preference.rejected_key")),
    ({"prompt": "Can you explain if?", "chosen": " No.", "rejected": " No."}, ('"chosen" and "rejected" are identical',)),
])
def test_bad_preference_line_is_one_line_error_naming_file_line_key(files, tmp_path, line, fragments):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in [*_pairs()[:5], line, *_pairs()[5:]]))
    bad = {**files, "pairs": path}
    result = _cli(bad, tmp_path / "run")
    assert_one_line_error(result, f"{path}:6:", *fragments)
    assert not (tmp_path / "run").exists()  # found by the config check, before anything is written


def test_reference_of_another_architecture_is_one_line_error(files, base_run, tmp_path):
    """A policy of width 32 (tokenizer.path, random init) against a reference run of width 64."""
    result = _cli(files, tmp_path / "run", f"reference=run:{base_run}", "model.block.d_model=32")
    assert_one_line_error(result, "config key `reference`", "another architecture", "embed/embedding is (400, 64) there and (400, 32) in the policy")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("extra", "fragment"), [
    (("dpo.loss=dpo",), "config key `dpo.loss`='dpo'"),
    (("dpo.loss=ipo", "dpo.label_smoothing=0.1"), "config key `dpo.label_smoothing`=0.1 applies to"),
    (("dpo.beta=0",), "config key `dpo.beta`=0"),
    (("dpo.loss=simpo", "reference=run:/nowhere"), "uses no reference model"),
    (("reference=run:/nowhere",), "config key `reference`='run:/nowhere'"),
    (("data.source=embedded",), "preference data is 'files:PATH.jsonl"),
    (("preference.max_prompt_len=32",), "config key `preference.max_prompt_len`=32"),
])
def test_bad_keys_fail_in_validate(files, tmp_path, extra, fragment):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        validate.check(_config(files, *extra), str(tmp_path / "run"))
    assert fragment in str(e.value) and "\n" not in str(e.value)
