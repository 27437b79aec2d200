"""objective=distill through `python -m train`'s loop: a tiny GPT teacher pretrained by the
trainer, then a smaller student distilled from it (logits: the loss falls; laid out by fsdp on 8
devices, stopped and resumed == dp uninterrupted), sequence-level distillation (the written
continuations are the teacher's greedy ones, recomputed without a cache; the student reads
them), MiniLM transfer between tiny BERTs of other widths and head counts (the relation KLs
fall), and bad keys (a student tokenizer other than the teacher's among them) as one-line
errors before any work."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.loader import load_config
from inference.load import load
from tests.cli_output import REPO
from tests.minilm import minilm_path
from tests.train.test_dpo import _leaves, _state
from train import build, teacher_sequences, trainer, validate
from train.objectives import distill

EPS32 = float(np.finfo(np.float32).eps)
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
         "checkpoint.async_save=false", "logging.log_every_steps=1"]
BATCH, SEQ, STEPS, LR = 8, 32, 4, 1e-2
RUN = [f"data.seq_len={SEQ}", f"model.max_len={SEQ}", f"data.batch_size={BATCH}", "eval.max_batches=1",
       "eval.num_samples=0", "schedule.name=constant", "schedule.warmup_steps=1", f"optimizer.lr={LR}",
       "checkpoint.save_interval_steps=2", *QUIET]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A GPT wider and deeper than the tiny student (3 layers, width 96, 6 heads), 8 steps."""
    workdir = tmp_path_factory.mktemp("teacher")
    trainer.run(load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [
        *RUN, "steps=8", "checkpoint.save_interval_steps=8", "tokenizer.vocab_size=300", "model.num_layers=3", "model.block.d_model=96",
        "model.block.num_heads=6", "model.block.d_ff=192"]), str(workdir))
    return workdir


def _student(teacher, *extra):
    """The tiny GPT (2 layers, width 64, 4 heads) distilled from `teacher`."""
    return load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [
        *RUN, f"steps={STEPS}", "objective=distill", f"distill.teacher={teacher}", "model.block.dropout_rate=0",
        *extra])


def _run(config, workdir):
    summary = trainer.run(config, str(workdir))
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return summary, {x["step"]: x for x in lines if "loss" in x}


@pytest.fixture(scope="module")
def dp_run(teacher, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dp")
    return (workdir, *_run(_student(teacher, "distill.kl=reverse", "distill.temperature=1.5"), workdir))


def test_logit_distillation_lowers_the_mix_and_reports_its_terms(dp_run):
    workdir, summary, metrics = dp_run
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < before["loss"] and after["kl"] < before["kl"] and after["ce"] < before["ce"]
    for m in (before, after):  # the mix of the reported terms, with alpha 0.5 and T 1.5
        assert m["loss"] == pytest.approx(0.5 * 1.5 ** 2 * m["kl"] + 0.5 * m["ce"], rel=1e-6)
        assert m["perplexity"] == pytest.approx(math.exp(m["ce"]), rel=1e-6)
    assert {"loss", "ce", "kl", "accuracy"} <= set(metrics[1])
    # The student keeps the teacher's tokenizer in its own workdir and loads like any run.
    assert load(str(workdir)).tokenizer.vocab_size == 300 and summary["val_bits_per_byte"] > 0


def test_fsdp_stopped_and_resumed_equals_dp_uninterrupted(teacher, dp_run, tmp_path):
    """The teacher laid out by fsdp over 8 devices like the student, stopped at step 2 and
    resumed (the teacher rebuilt, the data where it stopped) ends where dp_run ends: parameters
    equal up to the float32 reordering of another layout (a gradient element moves by
    ~4 eps32 sqrt(B T) |g| / sqrt(P); Adam's update by lr * dg / eps at most)."""
    workdir = tmp_path / "fsdp"
    extra = ("distill.kl=reverse", "distill.temperature=1.5", "sharding.strategy=fsdp")
    _run(_student(teacher, *extra, "steps=2"), workdir)
    _, metrics = _run(_student(teacher, *extra), workdir)
    a_dir, _, a_metrics = dp_run
    a, b = _leaves(_state(a_dir, STEPS)), _leaves(_state(workdir, STEPS))
    num_params = sum(x.size for _, x in a)
    dg = max(4 * EPS32 * math.sqrt(BATCH * SEQ) * a_metrics[s]["grad_norm"] / math.sqrt(num_params)
             for s in range(1, STEPS + 1))
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=2 * EPS32, atol=STEPS * LR * dg / 1e-8, err_msg=path)
    for s in range(3, STEPS + 1):  # the resumed steps
        for key in ("loss", "kl", "ce"):
            np.testing.assert_allclose(metrics[s][key], a_metrics[s][key], rtol=0,
                                       atol=64 * EPS32 * SEQ * (1 + abs(a_metrics[s][key])), err_msg=f"{s} {key}")


def test_sequence_distillation_trains_on_the_teachers_greedy_continuations(teacher, tmp_path):
    workdir = tmp_path / "sequence"
    config = _student(teacher, "distill.mode=sequence", "distill.num_prompts=6", "distill.prompt_tokens=8",
                      "distill.max_new_tokens=6", "steps=1")
    summary = trainer.run(config, str(workdir))
    assert summary["final_step"] == 1
    data_cfg = build.data_config(config, str(workdir))
    path = os.path.join(data_cfg.data_dir, teacher_sequences.sequence_file(config))
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(texts) == 6
    # Greedy continuations recomputed by full forward passes (no KV cache; the causal model
    # ignores what follows a row's end), each row stopped at eos.
    t = load(str(teacher))
    tok = t.tokenizer
    prompts = teacher_sequences.prompts_from(data_cfg, tok, num_prompts=6, prompt_tokens=8, seed=config.seed)
    ids = np.zeros((6, 1 + 8 + 6), np.int32)
    ids[:, 0], ids[:, 1:9] = tok.eos_id, prompts
    ends, done = np.full(6, 9), np.zeros(6, bool)
    forward = jax.jit(lambda x: t.model.apply({"params": t.params}, x))
    for _ in range(6):
        nxt = np.asarray(jnp.argmax(forward(jnp.asarray(ids)), -1))[np.arange(6), ends - 1]
        done |= nxt == tok.eos_id
        ids[~done, ends[~done]] = nxt[~done]
        ends += ~done
    for row, end, text in zip(ids, ends, texts):
        assert text == tok.decode(row[1:end].tolist())
    # The student's training rows are made of those texts.
    objective = distill.make(config, build.model(config, tok.vocab_size), tok)
    rows = next(objective.train_iterator(config, data_cfg, tok))
    first = rows["inputs"][0][rows["segment_ids"][0] == rows["segment_ids"][0][1]][1:]
    assert tok.decode(first.tolist())[:20] in "".join(texts)


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory):
    """A tiny BERT (2 layers, width 64, 4 heads) trained 2 steps on the masked LM."""
    workdir = tmp_path_factory.mktemp("bert_teacher")
    trainer.run(load_config(os.path.join(REPO, "configs/bert.py:tiny"), [
        *RUN, "steps=2", "tokenizer.vocab_size=300"]), str(workdir))
    return workdir


def test_minilm_transfer_between_berts_of_other_widths_lowers_the_relation_kls(bert_teacher, tmp_path):
    """A 1-layer student of width 48 with 2 heads learns the teacher's last-layer relations
    over R = 4 relation heads."""
    summary = trainer.run(load_config(os.path.join(REPO, "configs/bert.py:tiny"), [
        *RUN, "steps=4", "objective=distill", f"distill.teacher={bert_teacher}", "distill.mode=minilm",
        "distill.alpha=1.0", "distill.relation_heads=4", "model.num_layers=1", "model.block.d_model=48",
        "model.block.num_heads=2", "model.block.d_ff=96", "model.block.dropout_rate=0", "optimizer.lr=3e-3"]),
        str(tmp_path / "minilm"))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["attention_kl"] < before["attention_kl"] and after["value_kl"] < before["value_kl"]
    assert after["loss"] == pytest.approx(after["attention_kl"] + after["value_kl"], rel=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (["distill.mode=attention"], "`distill.mode`='attention'"),
    (["distill.alpha=1.5"], "`distill.alpha`=1.5 must be in [0, 1]"),
    (["distill.teacher=/nonexistent/teacher"], "neither a `python -m train` workdir"),
    (["distill.mode=minilm"], "a decoder student takes mode logits or sequence"),
    (["model.vocab_size=320"], "vocabulary of 300 logits, the student 320"),
    (["sharding.strategy=pp", "model.scan_layers=true", "sharding.pipeline_microbatches=1"], "teacher's forward is not pipelined"),
    (["tokenizer.path={bert_teacher}/tokenizer"], "the student's tokenizer differs from the teacher's"),
    (["distill.teacher={minilm}"], "a tokenizer without an end-of-text token"),  # WordPiece: no packing
])
def test_bad_distill_keys_fail_before_any_work(teacher, bert_teacher, tmp_path, overrides, message):
    overrides = [o.format(bert_teacher=bert_teacher, minilm=minilm_path()) for o in overrides]
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        validate.check(_student(teacher, *overrides), str(tmp_path / "bad"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "bad")
