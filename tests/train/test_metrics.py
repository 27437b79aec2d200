"""MetricsWriter files read back independently; throughput and MFU arithmetic."""

import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from train.metrics import MetricsWriter, Throughput, measure_matmul_peak, mfu


def read_tensorboard_scalars(logdir):
    """{tag: [(step, value)]} from TFRecord event files, parsed by hand.

    A record is: uint64 length, uint32 length crc, `length` bytes of an Event proto,
    uint32 data crc (little-endian).
    """
    scalars = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_lines_parse_and_a_second_writer_appends(tmp_path):
    workdir = str(tmp_path / "run")
    with MetricsWriter(workdir, total_steps=10, use_tensorboard=False, progress=False) as writer:
        writer.write(1, {"loss": 2.5, "lr": np.float32(1e-3)})
        writer.write(2, {"loss": jnp.float32(2.25)})
        # Flushed per line: readable before close.
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            assert len(f.readlines()) == 2
    with MetricsWriter(workdir, total_steps=10, use_tensorboard=False, progress=False) as writer:
        writer.write(3, {"loss": 2.0})
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records == [
        {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3)},
        {"step": 2, "loss": 2.25},
        {"step": 3, "loss": 2.0},
    ]


def test_tensorboard_events_hold_the_scalars(tmp_path):
    workdir = str(tmp_path)
    writer = MetricsWriter(workdir, total_steps=100, progress=False)
    writer.write(10, {"loss": 3.5, "tokens_per_second": 1234.0})
    writer.write(20, {"loss": 3.25})
    writer.close()
    writer.close()  # Idempotent.
    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert scalars["loss"] == [(10, 3.5), (20, 3.25)]
    assert scalars["tokens_per_second"] == [(10, 1234.0)]


def test_progress_bar_shows_loss_and_throughput(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path), total_steps=100, use_tensorboard=False)
    writer.write(50, {"loss": 1.5, "tokens_per_second": 2048.0})
    writer.write(60, {"loss": 1.25, "tokens_per_second": 4096.0})
    assert writer._bar.n == 60 and writer._bar.total == 100
    writer.close()
    err = capsys.readouterr().err
    assert "loss=1.2500" in err and "tok/s=4096" in err


def test_matmul_peak_is_positive_and_finite():
    flops = measure_matmul_peak(n=64, repeats=3, matmuls_per_call=2)
    assert math.isfinite(flops) and flops > 0
    with pytest.raises(ValueError, match="repeats=0"):
        measure_matmul_peak(n=64, repeats=0)


def test_mfu_arithmetic():
    # 1e4 tokens/s of a 1e8-parameter model (6N = 6e8 FLOPs per token) on a 1e13 FLOP/s chip.
    assert mfu(1e4, 6e8, 1e13) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="peak_flops=0"):
        mfu(1e4, 6e8, 0)


def test_throughput_weighs_steps_by_their_time():
    throughput = Throughput(flops_per_token=6e8, peak_flops=1e13)
    throughput.add(tokens=100, seconds=1.0)
    throughput.add(tokens=100, seconds=0.1)
    report = throughput.report()
    # 200 tokens in 1.1 s, not the mean (550) of the per-step rates 100 and 1000.
    assert report["tokens_per_second"] == pytest.approx(200 / 1.1)
    assert report["flops_per_second"] == pytest.approx(200 / 1.1 * 6e8)
    assert report["mfu"] == pytest.approx(200 / 1.1 * 6e8 / 1e13)
    assert throughput.report() == {}  # The window restarts after each report.
    throughput.add(tokens=4096, seconds=2.0)
    assert throughput.report()["tokens_per_second"] == pytest.approx(2048.0)


def test_throughput_without_peak_reports_no_mfu():
    throughput = Throughput(flops_per_token=6e8)
    throughput.add(tokens=10, seconds=1.0)
    assert set(throughput.report()) == {"tokens_per_second", "flops_per_second"}
