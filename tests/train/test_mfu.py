"""MFU as the trainer reports it: over the peak of every device the step runs on, in the
compute dtype. The clock is faked, so runs on 1 and 8 devices see the same throughput."""

import itertools
import json
import os
import types

import jax
import pytest

from configs.loader import load_config
from sharding import mesh as mesh_lib
from train import build, trainer
from train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4


def _read_metrics(tmp_path, monkeypatch, num_devices: int, *overrides: str) -> list[dict]:
    """Feeds STEPS steps, one second apart, to the trainer's metrics reader on a mesh of
    `num_devices`; returns the metrics.jsonl lines."""
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"),
                         ["logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every_steps=1",
                          *overrides])
    workdir = tmp_path / f"devices{num_devices}"
    mesh = mesh_lib.make_mesh("data=-1", jax.devices()[:num_devices])
    run = types.SimpleNamespace(config=config, workdir=str(workdir), is_lead=True, mesh=mesh,
                                model=build.model(config, config.tokenizer.vocab_size),
                                tokenizer=types.SimpleNamespace(vocab_size=config.tokenizer.vocab_size),
                                objective=None)  # the lm's default: batch x seq_len tokens per step
    clock = itertools.count()
    monkeypatch.setattr(trainer.time, "time", lambda: float(next(clock)))
    reader = trainer._MetricsReader(run, start_step=0)
    for step in range(1, STEPS + 1):
        reader(step, {"loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-3})
    reader.close()
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_the_same_throughput_on_8_devices_is_an_eighth_of_the_mfu_on_1(tmp_path, monkeypatch):
    one, eight = (_read_metrics(tmp_path, monkeypatch, n, "logging.peak_flops=1e11") for n in (1, 8))
    timed = [line for line in one if "mfu" in line]
    assert len(timed) == STEPS - 1  # the first step (compilation) is not timed
    for a, b in zip(timed, [line for line in eight if "mfu" in line]):
        assert a["flops_per_second"] == b["flops_per_second"] > 0
        assert (a["num_devices"], b["num_devices"]) == (1, 8)
        assert a["peak_flops_per_device"] == b["peak_flops_per_device"] == 1e11
        assert a["mfu"] == pytest.approx(a["flops_per_second"] / 1e11, rel=1e-12)
        assert b["mfu"] == pytest.approx(a["mfu"] / 8, rel=1e-12)


def test_without_a_peak_the_trainer_measures_in_the_compute_dtype_on_its_devices(tmp_path, monkeypatch):
    """CPU devices are in no datasheet: the matmul is measured in bfloat16 on all 8 at once."""
    calls = []

    def fake_measure(n, dtype, **kwargs):
        calls.append((str(dtype), len(kwargs["devices"])))
        return 2e10

    monkeypatch.setattr(metrics_lib, "measure_matmul_peak", fake_measure)
    lines = _read_metrics(tmp_path, monkeypatch, 8, "model.dtype=bfloat16")
    assert calls == [("bfloat16", 8)]
    last = lines[-1]
    assert last["peak_flops_per_device"] == 2e10 and last["num_devices"] == 8
    assert last["mfu"] == pytest.approx(last["flops_per_second"] / (8 * 2e10), rel=1e-12)
