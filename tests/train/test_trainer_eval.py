"""The trainer's final evaluation honours eval.max_batches, streamed, and its bits per byte and
xz baseline measure exactly the documents it evaluated."""

import lzma
import os

import numpy as np
import pytest

from configs.loader import load_config
from data import pipeline
from train import build, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_final_evaluation_of_max_batches_measures_exactly_its_documents(tmp_path):
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [
        "steps=2", "schedule.warmup_steps=1", "eval.max_batches=1", "data.batch_size=8", "tokenizer.vocab_size=300",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
        "checkpoint.async_save=false", "eval.sample_tokens=2",
    ])  # fmt: skip
    summary = trainer.run(config, str(tmp_path))
    data = build.data_config(config, str(tmp_path))
    tokenizer = build.tokenizer(config, str(tmp_path), data)
    every = pipeline.validation_text(data).documents
    whole = summary["val_documents"] - 1  # the documents evaluated whole, then a head of the next
    head = every[whole][: len(pipeline.eval_documents(data, tokenizer, 1).head)]
    evaluated = [*every[:whole], head]
    pairs = [len(tokenizer.encode(d)) + 1 for d in evaluated]
    # The text that fills one batch of 8 x 64 targets, and no more (the embedded documents are
    # longer than one batch, so this is the head of the first one).
    assert 0 < len(head) < len(every[whole]) and summary["val_tokens"] == sum(pairs) <= 8 * config.data.seq_len
    one_more = every[whole][: len(head) + 1]
    assert sum(pairs[:-1]) + len(tokenizer.encode(one_more)) + 1 > 8 * config.data.seq_len
    num_bytes = sum(len(d.encode("utf-8")) for d in evaluated)
    assert summary["val_bytes"] == num_bytes
    assert summary["val_bits_per_byte"] == pytest.approx(
        summary["val_loss"] * summary["val_tokens"] / np.log(2) / num_bytes, rel=1e-6)
    xz = 8.0 * len(lzma.compress("\n".join(evaluated).encode("utf-8"), preset=9)) / num_bytes
    assert summary["xz_bits_per_byte"] == pytest.approx(xz, rel=1e-12)
