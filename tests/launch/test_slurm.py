"""SLURM scripts: valid bash, #SBATCH directives where sbatch reads them, and the Spark script run
under a stand-in SLURM (tests/launch/fake_slurm.py) with a stand-in Spark installation that
records what it was asked: the master and workers come up before data.prepare starts, all on
one master URL, each node's Beam worker pool listens before its Spark worker starts, Beam 2.77
reads data.prepare's flags, and the cluster is stopped whether data.prepare succeeds or fails.
(Beam's Spark job server jar comes from Maven Central, unreachable here, so Spark itself does
not run; tests/launch/test_k8s.py runs the worker pool with the same EXTERNAL environment.)
"""

import os
import shlex
import socket
import subprocess
import sys

import pytest
from apache_beam.options import pipeline_options as po

from inference.serve.testing import free_port
from launch import catalog, render
from tests.launch import beam_flags, fake_slurm
from tests.launch.samples import SAMPLES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_TEMPLATES = [p for p in catalog.TEMPLATES if p.startswith("slurm/")]


def directives(text: str) -> dict[str, str]:
    """The #SBATCH options, read as sbatch does: from the top until the first command."""
    out = {}
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].strip().partition("=")
            assert key not in out, f"{key} twice"
            out[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return out


@pytest.mark.parametrize("path", SLURM_TEMPLATES)
def test_scripts_are_valid_bash_with_their_directives_first(path, tmp_path):
    text = render.render(path, SAMPLES[path])
    assert text.startswith("#!/bin/bash\n")
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    found = directives(text)
    assert text.count("#SBATCH") == len(found)  # none after the first command, where sbatch ignores them
    assert found["--nodes"] == SAMPLES[path]["nodes"]
    assert found.get("--partition", "") == SAMPLES[path].get("partition", "")
    assert found["--time"] == "24:00:00" and found["--output"] == "%x-%j.out"


def test_train_directives_follow_the_values():
    found = directives(render.render("slurm/train.sbatch", SAMPLES["slurm/train.sbatch"]))
    assert found == {"--job-name": "lmlab", "--nodes": "2", "--ntasks-per-node": "8", "--cpus-per-task": "16",
                     "--gpus-per-node": "8", "--time": "24:00:00", "--partition": "gpu", "--account": "llm",
                     "--output": "%x-%j.out"}
    cpu = directives(render.render("slurm/train.sbatch", {**SAMPLES["slurm/train.sbatch"], "gpus_per_node": "0",
                                                          "tasks_per_node": "4", "partition": "", "account": ""}))
    assert "--gpus-per-node" not in cpu and "--partition" not in cpu and cpu["--ntasks-per-node"] == "4"


# The master's status page (GET /json/), as Spark's: a worker is ALIVE once it has started.
MASTER_STATUS = """
import http.server, json, os, sys
class Status(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(os.environ["RECORD"]) as f:
            workers = [{"state": "ALIVE"} for line in f if line.startswith("worker")]
        body = json.dumps({"workers": workers}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Status).serve_forever()
"""
SPARK_STUBS = {  # name -> script; each appends what it was asked to $RECORD
    "sbin/start-master.sh": ('echo "master $*" >> "$RECORD"\n'
                             'REAL_PYTHON "$(dirname "$0")/master_status.py" "$6" & echo $! > "$(dirname "$0")/pid"\n'),
    "sbin/stop-master.sh": 'echo "stop-master" >> "$RECORD"\nkill "$(cat "$(dirname "$0")/pid")"\n',
    "sbin/master_status.py": MASTER_STATUS,
    # A worker: notes whether its node's Beam worker pool already listens, then runs until stopped.
    "bin/spark-class": ('pool=closed; (exec 3<>"/dev/tcp/localhost/$POOL_PORT") 2>/dev/null && pool=open\n'
                        'echo "worker pool=$pool $*" >> "$RECORD"\nexec sleep 600\n'),
}
# `python` for the script: data.prepare's command is recorded (and exits $PREPARE_EXIT); the rest
# (the Beam worker pool) is the real Python.
PYTHON_SHIM = """#!/bin/bash
if [ "$1 $2" = "-m data.prepare" ]; then
  line=$(printf ' %q' "$@"); echo "prepare$line" >> "$RECORD"; exit "${PREPARE_EXIT:-0}"
fi
exec REAL_PYTHON "$@"
"""


def _stub(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.startswith("#!") or str(path).endswith(".py") else "#!/bin/bash\n" + text)
    os.chmod(path, 0o755)


def _run_spark_script(tmp_path, prepare_exit: int):
    spark_home, record, pool_port = tmp_path / "spark", tmp_path / "record.txt", free_port()
    for name, text in SPARK_STUBS.items():
        _stub(spark_home / name, text.replace("REAL_PYTHON", sys.executable))
    _stub(tmp_path / "python", PYTHON_SHIM.replace("REAL_PYTHON", sys.executable))
    text = render.render("slurm/prepare_spark.sbatch", {
        **SAMPLES["slurm/prepare_spark.sbatch"], "nodes": "2", "repo": ROOT, "spark_home": str(spark_home),
        "python": str(tmp_path / "python"), "worker_pool_port": str(pool_port), "cores_per_node": "3",
        "memory_per_node": "5g", "spark_ui_port": str(free_port())})
    script = tmp_path / "prepare.sbatch"
    script.write_text(text)
    env = fake_slurm.job_env(tmp_path / "bin", "localhost,localhost", nodes=2, tasks_per_node=1)
    # Two "nodes" on one machine share one port: the second worker pool cannot bind it, so one pool
    # serves both stand-in workers here (each real node has its own localhost).
    env.update(RECORD=str(record), POOL_PORT=str(pool_port), PREPARE_EXIT=str(prepare_exit), TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    return result, record.read_text().splitlines(), pool_port


def _listening(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_spark_script_starts_the_cluster_runs_prepare_and_stops(tmp_path):
    result, record, pool_port = _run_spark_script(tmp_path, prepare_exit=0)
    assert result.returncode == 0, result.stderr[-3000:]
    # In order: the master, a worker per node, data.prepare once both registered, then the stop.
    assert [line.split()[0] for line in record] == ["master", "worker", "worker", "prepare", "stop-master"], record
    master = record[0].split()[1:]
    assert master[:4] == ["--host", "localhost", "--port", "7077"] and master[4] == "--webui-port"
    url = "spark://localhost:7077"
    workers = [line.split()[1:] for line in record if line.startswith("worker")]
    for worker in workers:  # its node's worker pool was up first; every worker joins the one master
        assert worker == ["pool=open", "org.apache.spark.deploy.worker.Worker", "--cores", "3", "--memory", "5g", url]
    (prepare,) = [shlex.split(line)[1:] for line in record if line.startswith("prepare")]
    options, environment = beam_flags.parse([sys.executable, *prepare])
    assert options.view_as(po.StandardOptions).runner == "SparkRunner"
    spark = options.view_as(po.SparkRunnerOptions)
    assert spark.spark_master_url == url
    assert spark.spark_job_server_jar == "/shared/jars/beam-runners-spark-3-job-server.jar"
    assert environment.url == f"localhost:{pool_port}"
    assert int(options.view_as(po.PortableOptions).sdk_worker_parallelism) == 3
    assert {"--input=/shared/raw/*.jsonl.gz", "--output=/shared/prepared/v1", "--tokenizer=/shared/tokenizers/llama",
            "--overwrite"} <= set(prepare)
    assert not _listening(pool_port)  # the worker pools ended with the job


def test_spark_script_fails_with_prepare_and_still_stops_the_cluster(tmp_path):
    result, record, pool_port = _run_spark_script(tmp_path, prepare_exit=3)
    assert result.returncode == 3, result.stderr[-3000:]
    assert record[-1] == "stop-master" and not _listening(pool_port)


def test_train_script_gives_each_task_its_process_id_and_gpu(tmp_path):
    # 2 nodes x 2 GPUs, one process per GPU, under the stand-in SLURM; `python` records each
    # task's command line and CUDA_VISIBLE_DEVICES instead of training.
    record = tmp_path / "record.txt"
    # One write per task (tasks run at once): the line is built first.
    _stub(tmp_path / "python", 'line=$(printf %q "${CUDA_VISIBLE_DEVICES-unset}"; printf " %q" "$@")\n'
                               'echo "$line" >> "$RECORD"\n')
    text = render.render("slurm/train.sbatch", {
        **SAMPLES["slurm/train.sbatch"], "nodes": "2", "tasks_per_node": "2", "gpus_per_node": "2", "repo": ROOT,
        "python": str(tmp_path / "python"), "port": "23456", "setup": "", "nccl_socket_ifname": ""})
    script = tmp_path / "train.sbatch"
    script.write_text(text)
    env = fake_slurm.job_env(tmp_path / "bin", "gpu-a,gpu-b", nodes=2, tasks_per_node=2)
    env["RECORD"] = str(record)
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    tasks = {}
    for line in record.read_text().splitlines():
        gpu, *argv = shlex.split(line)
        flags = dict(a.split("=", 1) for a in argv if a.startswith("--"))
        tasks[int(flags["--process_id"])] = (gpu, flags)
    assert sorted(tasks) == [0, 1, 2, 3]
    for process_id, (gpu, flags) in tasks.items():
        assert gpu == str(process_id % 2)  # SLURM_LOCALID: the process's GPU on its node
        assert flags["--coordinator_address"] == "gpu-a:23456"  # the allocation's first node
        assert flags["--num_processes"] == "4"
        assert flags["--config"] == "configs/llama.py:small" and flags["--workdir"] == "/shared/runs/small"
        assert flags["--config.data.source"] == "files:/shared/raw data/*.txt"  # quoted through bash and srun
