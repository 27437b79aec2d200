"""MetricsWriter files read back independently; throughput and MFU arithmetic; peaks per device."""

import glob
import json
import math
import os
import struct
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from train import metrics as metrics_lib
from train.metrics import (
    MetricsWriter,
    Throughput,
    datasheet_peak_flops,
    measure_matmul_peak,
    mfu,
    peak_flops_per_device,
)


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
    # 1e4 tokens/s of a 1e8-parameter model (6N = 6e8 FLOPs per token) on one 1e13 FLOP/s chip,
    # then on 8 of them: the same throughput is 1/8 of their peak.
    assert mfu(1e4, 6e8, 1e13, 1) == pytest.approx(0.6)
    assert mfu(1e4, 6e8, 1e13, 8) == pytest.approx(0.6 / 8)
    with pytest.raises(ValueError, match="peak_flops_per_device=0"):
        mfu(1e4, 6e8, 0, 1)
    with pytest.raises(ValueError, match="num_devices=0"):
        mfu(1e4, 6e8, 1e13, 0)


def test_throughput_weighs_steps_by_their_time():
    throughput = Throughput(flops_per_token=6e8, peak_flops_per_device=1e13, num_devices=1)
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


def test_throughput_mfu_divides_by_the_peak_of_every_device():
    """The same tokens/s on 8 devices of the same per-device peak is 1/8 of the MFU on 1."""
    reports = {}
    for devices in (1, 8):
        throughput = Throughput(flops_per_token=6e8, peak_flops_per_device=1e13, num_devices=devices)
        throughput.add(tokens=1000, seconds=0.5)
        reports[devices] = (throughput.report(), throughput.totals())
    for report, totals in reports.values():
        assert report == totals
    one, eight = reports[1][0], reports[8][0]
    assert one["flops_per_second"] == eight["flops_per_second"] == pytest.approx(2000 * 6e8)
    assert one["mfu"] == pytest.approx(2000 * 6e8 / 1e13) and eight["mfu"] == pytest.approx(one["mfu"] / 8)
    assert (one["num_devices"], eight["num_devices"]) == (1, 8)
    assert one["peak_flops_per_device"] == eight["peak_flops_per_device"] == 1e13
    with pytest.raises(ValueError, match="num_devices"):
        Throughput(flops_per_token=6e8, peak_flops_per_device=1e13)


def test_throughput_without_peak_reports_no_mfu():
    throughput = Throughput(flops_per_token=6e8)
    throughput.add(tokens=10, seconds=1.0)
    assert set(throughput.report()) == {"tokens_per_second", "flops_per_second"}


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494e12),  # TF32 tensor cores at JAX's default precision
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA H200 NVL", "bfloat16", 835e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "float16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("NVIDIA L40S", "bfloat16", 362e12),
    ("NVIDIA L40", "bfloat16", 181e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA L4", "float32", 60e12),
    ("NVIDIA A10", "bfloat16", 125e12),
    ("NVIDIA A10G", "bfloat16", None),  # AWS's variant: not the A10's datasheet, measured
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("TPU v6 lite", "float32", 918e12),  # one bfloat16 pass at JAX's default precision
    ("TPU v4 lite", "bfloat16", None),  # not in the table: measured
    ("cpu", "float32", None),
    ("NVIDIA H100 80GB HBM3", "float8_e4m3fn", None),
])
def test_datasheet_peak_by_device_kind_and_compute_dtype(kind, dtype, peak):
    assert datasheet_peak_flops(kind, dtype) == peak


def test_datasheet_float32_peak_holds_at_the_default_precision_only():
    with jax.default_matmul_precision("highest"):
        assert datasheet_peak_flops("NVIDIA H100 80GB HBM3", jnp.float32) is None
        assert datasheet_peak_flops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989e12


def test_peak_per_device_is_configured_else_datasheet_else_measured_in_the_compute_dtype(monkeypatch):
    calls = []

    def fake_measure(n, dtype, **kwargs):
        calls.append((n, jnp.dtype(dtype), kwargs["devices"]))
        return 5e10

    monkeypatch.setattr(metrics_lib, "measure_matmul_peak", fake_measure)
    cpus = jax.devices()
    assert peak_flops_per_device(1e11, "bfloat16", cpus) == (1e11, "logging.peak_flops")
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", process_index=0)
    assert peak_flops_per_device(0.0, "bfloat16", [h100] * 8)[0] == 989e12
    assert calls == []
    for dtype in ("bfloat16", "float32"):
        peak, source = peak_flops_per_device(0.0, dtype, cpus)
        assert peak == 5e10 and "measured" in source
    # Every local device, together, in the compute dtype.
    assert [(dtype, devices) for _, dtype, devices in calls] == [(jnp.bfloat16, cpus), (jnp.float32, cpus)]


def test_measured_peak_runs_on_many_devices_in_bfloat16():
    flops = measure_matmul_peak(n=64, dtype=jnp.bfloat16, repeats=1, matmuls_per_call=2, devices=jax.devices())
    assert math.isfinite(flops) and flops > 0
