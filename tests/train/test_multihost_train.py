"""Multi-host `python -m train`: two processes of two CPU devices each, joined by
`jax.distributed` (gloo collectives), train the tiny LLaMA as one 4-device mesh and end where
one process with four devices ends; SIGTERM to process 1 alone stops both at one step.

One module fixture runs every job once (the costly part is each process's start and compile):

    fsdp: 2 x 2 until SIGTERM reaches process 1 (both save step k, exit 143), resumed by
          2 x 2 to step k + 2; reference 1 x 4 straight to step k + 2
    dp:   2 x 2 and 1 x 4, STEPS steps each

The constant learning rate (no warmup) makes a run's trajectory independent of
config.steps, so the interrupted run (steps=100000) and the reference (steps=k+2) follow the
same schedule, and every step moves every parameter.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 420  # one job (start, compile, train, evaluate), on a loaded 2-core machine
STEPS = 4
# Fast compiles (XLA -O0, no fusion emitters): the same options for every job compared.
XLA_FAST = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# Tolerance. Both sides run the same SPMD program over 4 devices; only the order in which the
# cross-device sums (gradients, loss) add their partial sums differs (gloo between processes vs
# in-process), a relative error of a few eps32 (1.2e-7) per sum. Adam's m / (sqrt(v) + eps) turns
# a near-zero gradient's rounding into up to a whole lr step at the default eps 1e-8, so, as in
# tests/sharding (conftest.ADAM_EPS), eps is 1e-5: still far below the typical |g|, it bounds
# that sensitivity. Each leaf's relative difference (Frobenius norm) and the validation loss
# then agree within 1e-5, the tolerance (measured on one machine: 4e-7 for the worst
# leaf, 2.5e-6 at eps 1e-8; 2e-8 for the loss).
TOLERANCE = 1e-5
ADAM_EPS = "--config.optimizer.eps=1e-5"
COMMON = ["--config=configs/llama.py:tiny", "--config.logging.progress_bar=false", "--config.logging.peak_flops=1e11",
          "--config.logging.log_every_steps=1", "--config.schedule.name=constant",
          "--config.schedule.warmup_steps=0", "--config.checkpoint.save_interval_steps=100000",
          "--config.eval.num_samples=1", "--config.eval.sample_tokens=4", ADAM_EPS]
# The dp runs also score harness tasks (train/task_eval.py) at the start and the end: every
# process runs the batches, process 0 writes.
TASKS = ["--config.eval.tasks=pydoc_cloze,pydoc_perplexity", "--config.eval.task_limit=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Jobs:
    """Started `python -m train` processes; every one still running is killed on exit."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, workdir, local_devices: int, *args, process: tuple[int, int, int] | None = None):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices} {XLA_FAST}",
                   JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "train", *COMMON, f"--workdir={workdir}", *args]
        if process is not None:
            port, pid, count = process
            cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}", f"--process_id={pid}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def two_processes(self, workdir, *args):
        port = _free_port()
        return [self.start(workdir, 2, *args, process=(port, pid, 2)) for pid in range(2)]

    def kill_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait(procs, codes=(0,)) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr), once all have exited with a code in `codes`."""
    deadline = time.time() + TIMEOUT_S
    outputs = [p.communicate(timeout=max(1.0, deadline - time.time())) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode in codes, f"exit {p.returncode}: {err[-3000:]}"
    return outputs


def _committed_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _params(workdir, step):
    """The saved parameters of `step`, whole, as numpy (whatever devices saved them)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        return jax.tree.map(np.asarray, checkpointer.restore(path, abstract)["params"])


def _summary(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    jobs = _Jobs()
    try:
        # fsdp, 2 x 2, interrupted: process 0 prepares the data and trains the tokenizer, process 1
        # waits at a barrier and reads them; SIGTERM reaches process 1 once training runs.
        interrupted = root / "fsdp_2x2"
        procs = jobs.two_processes(interrupted, "--config.sharding.strategy=fsdp", "--config.steps=100000")
        metrics = interrupted / "metrics.jsonl"
        deadline = time.time() + TIMEOUT_S
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no training step was logged"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        stopped = _wait(procs, codes=(143,))
        saved = _committed_steps(interrupted)
        shared = [f"--config.data.data_dir={interrupted / 'tfds'}",
                  f"--config.tokenizer.path={interrupted / 'tokenizer'}"]
        final = saved[-1] + 2 if saved else 2
        resumed_procs = jobs.two_processes(interrupted, "--config.sharding.strategy=fsdp", f"--config.steps={final}")
        reference = root / "fsdp_1x4"
        reference_proc = jobs.start(reference, 4, "--config.sharding.strategy=fsdp", f"--config.steps={final}", *shared)
        resumed = _wait(resumed_procs)
        _wait([reference_proc])

        dp_two, dp_one = root / "dp_2x2", root / "dp_1x4"
        dp = ["--config.sharding.strategy=dp", f"--config.steps={STEPS}", *shared, *TASKS]
        dp_procs = jobs.two_processes(dp_two, *dp)
        dp_reference = jobs.start(dp_one, 4, *dp)
        _wait(dp_procs)
        _wait([dp_reference])
    finally:
        jobs.kill_all()
    return dict(interrupted=interrupted, stopped=stopped, saved=saved, final=final, resumed=resumed,
                reference=reference, dp_two=dp_two, dp_one=dp_one)


def _assert_same_run(two, one, step):
    got, want = _params(two, step), _params(one, step)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        relative = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert relative < TOLERANCE, (jax.tree_util.keystr(path), relative)
    s2, s1 = _summary(two), _summary(one)
    assert s2["final_step"] == s1["final_step"] == step
    assert s2["val_tokens"] == s1["val_tokens"]  # both evaluated the whole split
    np.testing.assert_allclose(s2["val_loss"], s1["val_loss"], rtol=TOLERANCE)


def test_sigterm_to_one_process_saves_one_step_that_both_resume_from(runs):
    saved, (out0, err0), (_, err1) = runs["saved"], *runs["stopped"]
    assert len(saved) == 1 and 0 < saved[0] < 100000, saved  # one checkpoint, off the save interval
    for err in (err0, err1):  # both processes stopped after that same step
        assert f"saved a checkpoint at step {saved[0]}" in err, err[-2000:]
    assert "new run in" in out0
    (resumed_out, _), _ = runs["resumed"]
    assert f"resumed from step {saved[0]}" in resumed_out
    assert sorted(_committed_steps(runs["interrupted"])) == [saved[0], runs["final"]]


def test_fsdp_two_processes_resumed_match_one_process(runs):
    _assert_same_run(runs["interrupted"], runs["reference"], runs["final"])
    with open(runs["interrupted"] / "config.json") as f:
        prompt = json.load(f)["eval"]["prompt"]
    samples = _summary(runs["interrupted"])["samples"]  # sampled from parameters spread over both processes
    assert len(samples) == 1 and samples[0].startswith(prompt) and len(samples[0]) > len(prompt)


def test_dp_two_processes_match_one_process(runs):
    _assert_same_run(runs["dp_two"], runs["dp_one"], STEPS)
    # One process writes the shared files: one metrics line per step, not one per process.
    lines = [json.loads(x) for x in (runs["dp_two"] / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, STEPS + 1))
    assert [x["step"] for x in lines if "eval/pydoc_cloze/acc" in x] == [0]  # the start's task scores, once
    # The tasks scored on parameters spread over both processes equal those of one process; the
    # log-likelihood metrics move with the parameters' and the loss's rounding (TOLERANCE).
    s2, s1 = _summary(runs["dp_two"]), _summary(runs["dp_one"])
    scores = sorted(k for k in s1 if k.startswith("eval/"))
    assert scores == sorted(k for k in s2 if k.startswith("eval/")) and len(scores) == 5, scores
    for key in scores:
        np.testing.assert_allclose(s2[key], s1[key], rtol=TOLERANCE, err_msg=key)


@pytest.mark.parametrize("flags,complaint", [
    (dict(num_processes=2), "--num_processes needs --coordinator_address and --process_id too"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), "--process_id=2 must lie in [0, 1]"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), "is not HOST:PORT"),
    (dict(coordinator_address="10.0.0.1:99999", num_processes=2, process_id=0), "is not HOST:PORT"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=0, process_id=0), "--num_processes=0 must be >= 1"),
])
def test_inconsistent_distributed_flags_are_refused(flags, complaint):
    from train import distributed

    with pytest.raises(distributed.DistributedError) as e:
        distributed.check_flags(flags.get("coordinator_address"), flags.get("num_processes"),
                                flags.get("process_id"))
    assert complaint in str(e.value)
    assert distributed.check_flags(None, None, None) is False
    assert distributed.check_flags("[::1]:1234", 2, 1) is True


def test_cli_refuses_bad_distributed_flags_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "train", f"--workdir={tmp_path}", "--coordinator_address=host:port",
                          "--num_processes=2", "--process_id=0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: --coordinator_address='host:port' is not HOST:PORT (e.g. 10.0.0.1:1234: process 0's host and a free "
        "port, 1-65535)"]
    assert not os.listdir(tmp_path)  # nothing was started


def test_a_slurm_job_of_several_tasks_is_detected(monkeypatch):
    from train import distributed

    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "KUBERNETES_", "TPU_"))]:
        monkeypatch.delenv(key)
    slurm = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="node[01-02]", SLURM_PROCID="1", SLURM_LOCALID="0")
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detect_cluster() == "SlurmCluster"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: nothing to join
    assert distributed.detect_cluster() is None
    monkeypatch.delenv("SLURM_JOB_ID")
    assert distributed.detect_cluster() is None


def test_a_failure_on_the_lead_while_preparing_data_stops_the_others_at_once(tmp_path):
    # A file that passes validation (it exists, is readable and non-empty; every process checks
    # that before any work) but fails while the lead prepares it: its second line is not JSON.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first document"}\n{not json}\n')
    jobs = _Jobs()
    try:
        procs = jobs.two_processes(tmp_path / "run", f"--config.data.source=files:{bad}")
        # Both exit 1 at once, not with an abort (134) after the coordinator's 5-minute shutdown barrier.
        (_, err0), (_, err1) = _wait(procs, codes=(1,))
    finally:
        jobs.kill_all()
    assert "is not valid JSON" in err0.strip().splitlines()[-1]
    last = err1.strip().splitlines()[-1]
    assert last.startswith("error: process 0 failed (data), so this process stops too: ValueError: "), last
    assert "is not valid JSON" in last, last
