"""Multi-host: two CPU processes of two devices each, joined by `jax.distributed` (gloo), train
the tiny LLaMA with fsdp over the four global devices, each feeding only its own rows, and
match one process training the same global batch on four devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 240
# warmup 0: every step updates the parameters, so each of the 3 losses after the first checks one.
COMMON = ["--config=configs/llama.py:tiny", "--strategy=fsdp", "--steps=3", "--fast_compile",
          "--config.schedule.warmup_steps=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each process sets its device count
    return subprocess.Popen([sys.executable, "-m", "sharding.multihost_demo", *COMMON, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _report(proc: subprocess.Popen, stdout: str, stderr: str) -> dict:
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_two_processes_match_one():
    port = _free_port()
    procs = [_start("--num_processes=2", f"--process_id={i}", f"--coordinator=127.0.0.1:{port}",
                    "--local_devices=2") for i in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reports = [_report(p, *out) for p, out in zip(procs, outputs)]
    reference = _start("--local_devices=4")
    try:
        reference_report = _report(reference, *reference.communicate(timeout=TIMEOUT_S))
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    assert [(r["process"], r["num_processes"], r["devices"], r["rows"]) for r in reports] == [
        (0, 2, 4, [4, 8]), (1, 2, 4, [4, 8])]  # each process fed half of the 8 rows
    assert reference_report["num_processes"] == 1 and reference_report["mesh"] == {"fsdp": 4}
    assert len(set(reference_report["losses"])) == 3  # every step moved the parameters
    for r in reports:
        print(f"process {r['process']}: losses {r['losses']}, one process {reference_report['losses']}")
        np.testing.assert_allclose(r["losses"], reference_report["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["param_norm"], reference_report["param_norm"], rtol=1e-5)
