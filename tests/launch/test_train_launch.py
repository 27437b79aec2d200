"""The rendered training commands really start one 2-process `python -m train` run here.

    Kubernetes: the Indexed Job's container command for JOB_COMPLETION_INDEX=0 and 1, `$(VAR)`
                expanded as the kubelet does, the coordinator pod-0 name rewritten to 127.0.0.1
                (no cluster DNS here), run from the container's workingDir with its env.
    SLURM:      the whole batch script, under a stand-in SLURM (tests/launch/fake_slurm.py) of
                one node with two tasks: its scontrol names the node, its srun starts the tasks.

Each process sees one CPU device. Both joined one run when process 0 reports a mesh of 2
devices, the shared workdir holds one run (one checkpoint at the last step, one metrics line
per step: only the lead writes) and both processes exit 0. The two jobs run side by side.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from inference.serve.testing import free_port
from launch import render
from tests.launch import fake_slurm
from tests.train.test_multihost_train import XLA_FAST, _committed_steps, _wait

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 2
OVERRIDES = " ".join([f"--config.steps={STEPS}", "--config.schedule.warmup_steps=0",
                      "--config.logging.progress_bar=false", "--config.logging.peak_flops=1e11",
                      "--config.logging.log_every_steps=1", "--config.eval.num_samples=0",
                      "--config.eval.max_batches=1", "--config.checkpoint.async_save=false"])
CONFIG = "configs/llama.py:tiny"


def _base_env() -> dict[str, str]:
    """This machine's environment with one CPU device per process (not the suite's eight)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH", "LMLAB_XLA_FLAGS")}
    env.update(XLA_FLAGS=XLA_FAST, JAX_PLATFORMS="cpu", LMLAB_COMPILATION_CACHE_DIR="none")
    return env


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container's command: $$ is a literal $, unknown names stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _start_k8s(root, procs):
    mount, port = root / "volume", free_port()
    job = list(yaml.safe_load_all(render.render("k8s/train-indexed-job.yaml", {
        "num_processes": "2", "image": "lmlab:test", "pvc": "runs", "mount_path": str(mount), "workdir": str(mount / "run"),
        "config": CONFIG, "overrides": OVERRIDES, "port": str(port), "gpus_per_pod": "0", "working_dir": ROOT,
        "python": sys.executable, "name": "tiny"})))[1]
    assert job["kind"] == "Job"
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pod0 = f"{job['metadata']['name']}-0.{spec['subdomain']}:{port}"
    for index in range(job["spec"]["completions"]):
        env = {**_base_env(), **{e["name"]: e["value"] for e in container["env"]},
               "JOB_COMPLETION_INDEX": str(index)}  # what the Job controller sets in pod `index`
        command = [kubelet_expand(a, env) for a in container["command"]]
        assert f"--coordinator_address={pod0}" in command
        command = [a.replace(pod0, f"127.0.0.1:{port}") for a in command]  # pod 0's name -> this machine
        procs.append(subprocess.Popen(command, cwd=container["workingDir"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return mount / "run"


def _start_slurm(root, procs):
    workdir, script = root / "slurm_run", root / "train.sbatch"
    script.write_text(render.render("slurm/train.sbatch", {
        "nodes": "1", "tasks_per_node": "2", "gpus_per_node": "0", "repo": ROOT, "python": sys.executable, "config": CONFIG,
        "workdir": str(workdir), "overrides": OVERRIDES, "port": str(free_port())}))
    env = fake_slurm.job_env(root / "bin", "localhost", nodes=1, tasks_per_node=2, base=_base_env())
    procs.append(subprocess.Popen(["bash", str(script)], cwd=root, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True))
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_train")
    k8s_procs, slurm_procs = [], []
    try:
        k8s_workdir = _start_k8s(root, k8s_procs)
        slurm_workdir = _start_slurm(root, slurm_procs)
        k8s_out = _wait(k8s_procs)
        (slurm_out,) = _wait(slurm_procs)
    finally:
        for proc in k8s_procs + slurm_procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"k8s": (k8s_workdir, k8s_out), "slurm": (slurm_workdir, [slurm_out])}


def _assert_one_run_of_two_processes(workdir, outputs):
    lead_stdout = outputs[0][0]
    assert "2 devices" in lead_stdout, lead_stdout[-2000:]  # one CPU device per process: both joined
    assert lead_stdout.count("new run in") == 1
    assert _committed_steps(workdir) == [STEPS]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, STEPS + 1))
    with open(workdir / "summary.json") as f:
        assert json.load(f)["final_step"] == STEPS


def test_the_indexed_job_command_starts_one_two_process_run(runs):
    workdir, outputs = runs["k8s"]
    assert len(outputs) == 2
    _assert_one_run_of_two_processes(workdir, outputs)
    assert "new run in" not in outputs[1][0]  # process 1 joined process 0's run


def test_the_slurm_script_starts_one_two_process_run(runs):
    workdir, outputs = runs["slurm"]
    _assert_one_run_of_two_processes(workdir, outputs)


def test_kubelet_expansion():
    env = {"JOB_COMPLETION_INDEX": "3"}
    assert kubelet_expand("--process_id=$(JOB_COMPLETION_INDEX)", env) == "--process_id=3"
    assert kubelet_expand("$$(JOB_COMPLETION_INDEX) $(OTHER) $HOME", env) == "$(JOB_COMPLETION_INDEX) $(OTHER) $HOME"
