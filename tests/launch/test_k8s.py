"""Kubernetes manifests: schema-valid for Kubernetes 1.37 (strict: no unknown field), wired together
(names, labels, ports, volumes), and the data.prepare command's flags as Beam 2.77 reads them.

The Beam SDK worker-pool sidecar's command is run here, as it is in the TaskManager pod, and a
pipeline with the manifest's EXTERNAL environment runs its Python in it (through Beam's Python job
service: Flink itself needs its job server jar from Maven Central, unreachable offline).
"""

import os
import socket
import subprocess
import sys
import time

import apache_beam as beam
import kubernetes_validate
import pytest
import yaml
from apache_beam.options import pipeline_options as po

from inference.serve.testing import free_port
from launch import catalog, render
from tests.launch import beam_flags
from tests.launch.samples import SAMPLES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S_VERSION = "1.37.0"


def _docs(path, **change):
    return list(yaml.safe_load_all(render.render(path, {**SAMPLES[path], **change})))


def _kind(docs, kind, name_suffix=""):
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    return doc


@pytest.mark.parametrize("path", [p for p in catalog.TEMPLATES if p.startswith("k8s/")])
@pytest.mark.parametrize("change", [{}, {"gpus_per_pod": "0", "xla_flags": "", "overrides": "", "namespace": "ml"}])
def test_every_document_is_valid_for_kubernetes(path, change):
    change = {k: x for k, x in change.items() if k in {v.name for v in catalog.TEMPLATES[path].values}}
    docs = _docs(path, **change)
    assert len(docs) >= 2
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error


def test_the_schema_check_can_fail():
    job = _kind(_docs("k8s/train-indexed-job.yaml"), "Job")
    job["spec"]["completionsMode"] = "Indexed"  # misspelled field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    job = _kind(_docs("k8s/train-indexed-job.yaml"), "Job")
    job["spec"]["parallelism"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_indexed_job_pod_zero_is_the_coordinator_and_the_index_is_the_process_id():
    docs = _docs("k8s/train-indexed-job.yaml", num_processes="4", name="run-a", port="23456")
    service, job = _kind(docs, "Service"), _kind(docs, "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "train"]
    flags = dict(a.split("=", 1) for a in command[3:])
    assert flags["--num_processes"] == "4"
    assert flags["--process_id"] == "$(JOB_COMPLETION_INDEX)"  # the Job controller's env var, expanded by the kubelet
    # Pod i's hostname is JOB-i and its subdomain the headless Service: pod 0 is JOB-0.SERVICE.
    host, port = flags["--coordinator_address"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}" == "run-a-0.run-a"
    assert service["metadata"]["name"] == pod["subdomain"]
    assert service["spec"]["clusterIP"] == "None"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"] == 23456
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"]
    # The workdir is on the claim every pod mounts.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "shared"]
    (volume,) = [x for x in pod["volumes"] if x["name"] == "shared"]
    assert volume["persistentVolumeClaim"]["claimName"] == "lmlab-shared"
    assert flags["--workdir"].startswith(mount["mountPath"] + "/")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["restartPolicy"] == "Never"
    assert flags["--config.steps"] == "1000" and flags["--config"] == "configs/llama.py:small"


def test_flink_cluster_is_wired_together():
    docs = _docs("k8s/prepare-flink.yaml", taskmanagers="3", task_slots="2", worker_pool_port="50001")
    service = _kind(docs, "Service")
    jobmanager, taskmanager = _kind(docs, "Deployment", "-jobmanager"), _kind(docs, "Deployment", "-taskmanager")
    submit = _kind(docs, "Job")
    for deployment in (jobmanager, taskmanager):  # a Deployment's selector must match its pods
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= jobmanager["spec"]["template"]["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= taskmanager["spec"]["template"]["metadata"]["labels"].items()
    assert taskmanager["spec"]["replicas"] == 3

    def properties(deployment, container_name):
        (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == container_name]
        (env,) = [e for e in container["env"] if e["name"] == "FLINK_PROPERTIES"]
        return dict(line.split(": ", 1) for line in env["value"].splitlines()), container

    jm_props, jm = properties(jobmanager, "jobmanager")
    tm_props, tm = properties(taskmanager, "taskmanager")
    assert jm_props == tm_props and jm["image"] == tm["image"] == "flink:1.20"
    assert jm_props["jobmanager.rpc.address"] == service["metadata"]["name"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"rpc": int(jm_props["jobmanager.rpc.port"]), "blob-server": int(jm_props["blob.server.port"]),
                     "rest": 8081}
    assert jm_props["taskmanager.numberOfTaskSlots"] == "2"

    # The submit Job: FlinkRunner to the JobManager's REST port, the stages' Python in the sidecar.
    (submit_container,) = submit["spec"]["template"]["spec"]["containers"]
    options, environment = beam_flags.parse(submit_container["command"])
    assert options.view_as(po.StandardOptions).runner == "FlinkRunner"
    flink = options.view_as(po.FlinkRunnerOptions)
    assert flink.flink_master == f"{service['metadata']['name']}:{ports['rest']}"
    assert flink.flink_version == "1.20" and flink.flink_submit_uber_jar
    assert flink.parallelism == 3 * 2 == int(jm_props["parallelism.default"])
    assert options.view_as(po.PortableOptions).environment_type == "EXTERNAL"
    assert int(options.view_as(po.PortableOptions).sdk_worker_parallelism) == 2  # one per task slot
    assert environment.url == "localhost:50001"
    (sidecar,) = [c for c in taskmanager["spec"]["template"]["spec"]["containers"] if c["name"] == "beam-worker-pool"]
    assert sidecar["command"][-1] == "--service_port=50001"
    assert sidecar["image"] == submit_container["image"] == "ghcr.io/example/lmlab:0.1.0"
    # The input, output and tokenizer: on the claim both the sidecar and the submitter mount.
    mounts = {c["name"]: c["volumeMounts"][0]["mountPath"] for c in (sidecar, submit_container)}
    assert set(mounts.values()) == {"/shared"}
    command = submit_container["command"]
    assert command[:3] == ["python", "-m", "data.prepare"]
    assert {"--input=/shared/raw/*.jsonl.gz", "--output=/shared/prepared/v1", "--tokenizer=/shared/tokenizers/llama",
            "--overwrite", "--stages=normalize"} <= set(command)


def test_beam_knows_the_flink_versions_the_catalog_offers():
    assert catalog.FLINK_VERSIONS == tuple(po.FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS)


def test_beam_refuses_what_the_checks_stand_for():
    # The parse in beam_flags.parse does fail: an unknown flag and a Flink version Beam lacks.
    with pytest.raises(AssertionError, match="flags apache-beam does not know"):
        beam_flags.parse(["python", "-m", "data.prepare", "--runner=FlinkRunner", "--flink_mastr=x:8081"])
    with pytest.raises(SystemExit):
        beam_flags.parse(["python", "-m", "data.prepare", "--flink_version=1.18"])


def _wait_for_port(port, proc, timeout_s=60):
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, f"exited {proc.returncode}"
            assert time.time() < deadline, f"nothing listens on {port}"
            time.sleep(0.2)


def test_the_worker_pool_sidecar_runs_the_pipelines_python(tmp_path):
    pool_port, job_port = free_port(), free_port()
    docs = _docs("k8s/prepare-flink.yaml", worker_pool_port=str(pool_port), python=sys.executable)
    taskmanager = _kind(docs, "Deployment", "-taskmanager")
    (sidecar,) = [c for c in taskmanager["spec"]["template"]["spec"]["containers"] if c["name"] == "beam-worker-pool"]
    (submit,) = _kind(docs, "Job")["spec"]["template"]["spec"]["containers"]
    env = {k: x for k, x in os.environ.items() if k != "PYTHONPATH"}  # lmlab importable from the working dir only
    # The pool starts each SDK worker as plain `python` from PATH (the image's python in the pod):
    # this interpreter's directory first, as in an activated virtual environment.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    procs = [subprocess.Popen(sidecar["command"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                               f"--port={job_port}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_for_port(pool_port, procs[0])
        _wait_for_port(job_port, procs[1])
        # The submit command's environment flags, on a runner that works offline.
        flags = [f for f in beam_flags.beam_flags(submit["command"]) if f.startswith(("--environment_", "--sdk_"))]
        options = po.PipelineOptions(["--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}", *flags])
        out = tmp_path / "out"
        with beam.Pipeline(options=options) as p:
            _ = (p | beam.Create(["first text", "second"])
                 | beam.Map(_upper_in_lmlab)
                 | beam.io.WriteToText(str(out)))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    lines = sorted(line for f in tmp_path.glob("out*") for line in f.read_text().splitlines())
    texts, pids = zip(*(line.split("\t") for line in lines))
    assert texts == ("FIRST TEXT", "SECOND")
    assert os.getpid() not in {int(x) for x in pids} and procs[1].pid not in {int(x) for x in pids}


def _upper_in_lmlab(text):
    # Runs in the worker pool's SDK worker: lmlab's data.prepare must import there.
    import os

    from data.prepare import stage

    return f"{stage.keep(text.upper()).text}\t{os.getpid()}"
