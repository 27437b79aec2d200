"""A stand-in for SLURM on one machine: `scontrol show hostnames` and `srun`, put first on PATH.

`srun` starts its command once per task with the variables a task of a real step sees
(SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS) and waits for all of them;
--kill-on-bad-exit ends the others when one fails, and SIGTERM ends every task's whole
process group (as SLURM ends a step's cgroup). Tasks: --nodes x --ntasks-per-node when both
are given, else the job's SLURM_NTASKS. Every node is this machine.
"""

import os
import sys

SCONTROL = """\
#!/bin/bash
# scontrol show hostnames LIST: one host per line (plain comma-separated lists only)
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: only 'show hostnames'" >&2; exit 2; }
tr ',' '\\n' <<< "${3:-$SLURM_JOB_NODELIST}"
"""

SRUN = """\
#!PYTHON
import os, signal, subprocess, sys, time

args, options = sys.argv[1:], {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
if "nodes" in options and "ntasks-per-node" in options:
    tasks, per_node = int(options["nodes"]) * int(options["ntasks-per-node"]), int(options["ntasks-per-node"])
else:
    tasks = int(os.environ["SLURM_NTASKS"])
    per_node = int(options.get("ntasks-per-node") or os.environ.get("SLURM_NTASKS_PER_NODE") or tasks)
procs = [subprocess.Popen(args, start_new_session=True, env={
    **os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % per_node), "SLURM_NODEID": str(i // per_node),
    "SLURM_NTASKS": str(tasks), "SLURM_STEP_NUM_TASKS": str(tasks)}) for i in range(tasks)]

def end(*_):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(143)

signal.signal(signal.SIGTERM, end)
while any(p.poll() is None for p in procs):
    if "kill-on-bad-exit" in options and any(p.poll() not in (None, 0) for p in procs):
        end()
    time.sleep(0.1)
sys.exit(max(p.returncode for p in procs))
"""


def install(bin_dir) -> str:
    """Writes `scontrol` and `srun` into `bin_dir`; returns a PATH with them first."""
    os.makedirs(bin_dir, exist_ok=True)
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN.replace("PYTHON", sys.executable))):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def job_env(bin_dir, nodelist: str, nodes: int, tasks_per_node: int,
            base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a batch script in an allocation of `nodes` x `tasks_per_node` tasks:
    `base` (default: this process's environment) with the stand-ins first on PATH."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
    env.update(PATH=install(bin_dir), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST=nodelist, SLURM_NNODES=str(nodes),
               SLURM_NTASKS=str(nodes * tasks_per_node), SLURM_NTASKS_PER_NODE=str(tasks_per_node))
    return env
