"""objective=sft through `python -m train`'s loop: a tiny GPT pretrained by the trainer, then
fine-tuned on chat JSONL (init_from=run:) fully and with LoRA; the held-out assistant loss
falls below the starting model's, the greedy reply changes, the saved data state resumes the
chat batches, train.evaluate gives the run's own final metrics, bad keys fail first."""

import builtins
import json
import keyword
import os
import random

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.loader import load_config
from data import sft as sft_data
from models.layers.peft import is_peft_path
from tests.cli_output import REPO
from train import evaluate, init_from, trainer, validate
from train import trainable as trainable_lib
from train.objectives import sft as sft_objective

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
         "checkpoint.async_save=false"]
# The tiny GPT with a 128-token context: the shipped conversations need it (at 64 few keep an answer).
SHAPE = ["model.max_len=128"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny GPT pretrained a few steps by the trainer (its BPE has only <|endoftext|>)."""
    workdir = tmp_path_factory.mktemp("base")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [
        "steps=4", "schedule.warmup_steps=1", "eval.max_batches=1", "tokenizer.vocab_size=300",
        "eval.sample_tokens=2", *SHAPE, *QUIET])  # fmt: skip
    trainer.run(config, str(workdir))
    return workdir


def _chat_lines() -> list[dict]:
    """Short conversations with a pattern a few steps learn: is WORD a keyword or a builtin?"""
    words = [(w, "Yes, {} is a keyword.") for w in keyword.kwlist] + [
        (w, "No, {} is a builtin.") for w in sorted(dir(builtins)) if w.islower() and not w.startswith("_")]
    random.Random(0).shuffle(words)
    return [{"messages": [{"role": "user", "content": f"Is {w} a keyword?"},
                          {"role": "assistant", "content": answer.format(w)}]} for w, answer in words]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "keywords.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in _chat_lines()))
    return path


def _sft_config(base_run, chat_file, *overrides):
    return load_config(os.path.join(REPO, "configs/sft.py:tiny"), [
        f"init_from=run:{base_run}", f"data.source=files:{chat_file}", "eval.prompt=Is lambda a keyword?",
        "data.seq_len=128", "steps=12", "optimizer.lr=1e-2", "schedule.name=constant",
        "schedule.warmup_steps=2", "checkpoint.save_interval_steps=6", "eval.sample_tokens=16", *SHAPE, *QUIET,
        *overrides])  # fmt: skip


def _params(workdir, step, key="params"):
    tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return tree[key]


def _reply(r, params, config):
    return sft_objective.chat_replies(r.model, params, r.tokenizer, config.eval.prompt, template=config.sft.chat_template,
                                      num_tokens=config.eval.sample_tokens, max_len=r.model.config.max_len)[0]


@pytest.fixture(scope="module")
def start(base_run, chat_file, tmp_path_factory):
    """The starting model (the base run's weights) evaluated with the sft objective, and its reply."""
    config = _sft_config(base_run, chat_file)
    r = trainer.setup(config, str(tmp_path_factory.mktemp("start")), write_config=False)
    state = init_from.initial_state(config, r.init_fn(jax.random.key(config.seed)), r)
    _, metrics = trainer.evaluate(r, state, r.objective.eval_batches(config, r.data, r.tokenizer))
    return metrics, _reply(r, trainable_lib.combine(state.params, state.frozen), config)


@pytest.fixture(scope="module")
def sft_run(base_run, chat_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    return workdir, trainer.run(_sft_config(base_run, chat_file), str(workdir))


def test_sft_lowers_the_held_out_assistant_loss_and_changes_the_reply(base_run, chat_file, start, sft_run):
    (before, reply_before), (workdir, summary) = start, sft_run
    print(f"held-out assistant loss {before['loss']:.3f} -> {summary['val_loss']:.3f}; reply {reply_before!r} -> "
          f"{summary['samples'][0]!r}")
    assert summary["val_loss"] < before["loss"] - 0.2
    assert summary["samples"][0] != reply_before
    # The lm objective's metrics on assistant tokens; no bits per byte or xz (not text the model reads whole).
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["final_step"] == 12 and 0 < on_disk["val_accuracy"] < 1
    assert not {"val_bits_per_byte", "xz_bits_per_byte"} & on_disk.keys()
    assert set(on_disk["padding_fraction"]) == {"none", "greedy", "bfd"}
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
    # ChatML's markers are text for this BPE: a reply is cut where the template ends a turn.
    assert sft_data.end_of_turn(init_from.tokenizer(_sft_config(base_run, chat_file))) == "<|im_end|>"


def test_evaluate_gives_the_runs_final_metrics(sft_run):
    workdir, summary = sft_run
    result = evaluate.evaluate_checkpoint(str(workdir))
    assert result["objective"] == "sft" and result["step"] == 12
    assert result["metrics"] == {"loss": summary["val_loss"], "accuracy": summary["val_accuracy"]}


def test_the_checkpoint_resumes_the_chat_data_where_the_run_stopped(base_run, chat_file, sft_run):
    """The data state the trainer saved at step 6 continues with the batches of steps 7-12. (The
    loop's resume of parameters and optimizer is the lm's, tests/train/test_trainer.py; a whole
    resumed sft run costs two more compilations.)"""
    workdir, _ = sft_run
    config = _sft_config(base_run, chat_file)
    saved = json.loads((workdir / "checkpoints" / "6" / "data" / "metadata").read_text())
    data_cfg, options = trainer.build.data_config(config, str(workdir)), sft_objective.sft_config(config)
    tokenizer = init_from.tokenizer(config)
    uninterrupted = sft_data.train_iterator(data_cfg, options, tokenizer)
    for _ in range(6):
        next(uninterrupted)
    resumed = sft_data.train_iterator(data_cfg, options, tokenizer)
    resumed.set_state(saved)
    for _ in range(6):
        a, b = next(resumed), next(uninterrupted)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_lora_sft_trains_its_adapters_and_keeps_the_base(base_run, chat_file, start, tmp_path):
    summary = trainer.run(_sft_config(base_run, chat_file, "steps=6", "finetune.method=lora"),
                          str(tmp_path))
    # B = 0 at init: the starting model is the base, whose held-out loss the adapters lower.
    assert summary["val_loss"] < start[0]["loss"]
    trained, frozen = _params(tmp_path, 6), _params(tmp_path, 6, "frozen")
    base = _params(base_run, 4)
    lora = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(trained)}
    assert lora and all(is_peft_path(k.replace("']['", "/").strip("[]'")) for k in lora)
    assert any(k.endswith("lora_b']") and np.abs(x).max() > 0 for k, x in lora.items())
    frozen_flat = jax.tree_util.tree_leaves_with_path(frozen)
    assert len(frozen_flat) == len(jax.tree_util.tree_leaves(base))
    for path, x in frozen_flat:
        node = base
        for key in path:
            node = node[key.key]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(node), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(("overrides", "message"), [
    (["init_from=", "tokenizer.path="], "set config key `init_from`"),
    (["data.source=embedded"], "fine-tuning reads"),
    (["data.source=files:/nowhere/chat.jsonl"], "/nowhere/chat.jsonl does not exist"),
    (["sft.chat_template={% if %}"], "config key `sft.chat_template`"),
])
def test_bad_sft_keys_fail_before_any_work(base_run, chat_file, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{")):
        validate.check(_sft_config(base_run, chat_file, *overrides), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_prepare_data_writes_the_shipped_chat_data_and_takes_the_base_tokenizer(base_run, chat_file, tmp_path):
    config = _sft_config(base_run, chat_file, "data.source=pydoc_chat")
    data_cfg = trainer.build.data_config(config, str(tmp_path))
    tokenizer = sft_objective.prepare_data(config, str(tmp_path), data_cfg)  # one process: the lead
    assert (tmp_path / "tfds" / "pydoc_chat.jsonl").is_file()  # under data_dir, WORKDIR/tfds by default
    assert tokenizer.vocab_size == 300 and not (tmp_path / "tokenizer").exists()  # the base run's, not trained
