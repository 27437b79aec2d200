"""The launch templates and the values each takes: name, kind (`launch.values`), default, help.

A value without a default must be given (`--set name=value`). Checks that involve several values
(one process per node or per GPU; a workdir on the shared volume) are the template's `check`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from launch import values as v


@dataclasses.dataclass(frozen=True)
class Value:
    """One value of a template: `check` turns its text into what the template reads."""

    name: str
    check: v.Check
    help: str
    default: str | None = None  # None: required


@dataclasses.dataclass(frozen=True)
class Template:
    """A file under launch/templates/ and its values."""

    path: str
    help: str
    values: tuple[Value, ...]
    check: Callable[[dict[str, Any]], None] = lambda _: None  # cross-value checks


# Values every SLURM script takes.
_SLURM = (
    Value("job_name", v.word, "The SLURM job name.", "lmlab"),
    Value("nodes", v.positive_int, "Nodes to allocate."),
    Value("time", v.slurm_time, "The time limit (HH:MM:SS or D-HH:MM:SS).", "24:00:00"),
    Value("partition", v.optional(v.word), "The partition (empty: the cluster's default).", ""),
    Value("account", v.optional(v.word), "The account to charge (empty: your default).", ""),
    Value("log", v.word, "Where SLURM writes the job's output (%x job name, %j job id).", "%x-%j.out"),
    Value("repo", v.abs_path, "The lmlab checkout on shared storage (the commands run from it)."),
    Value("python", v.word, "The Python with lmlab installed, on every node.", "python"),
    Value("setup", lambda _, text: text, "Shell run first on the batch node, e.g. 'source /shared/venv/bin/activate' "
          "(srun's tasks inherit its environment).", ""),
)

# Values every Kubernetes manifest takes.
_K8S = (
    Value("namespace", v.dns_label, "The namespace.", "default"),
    Value("image", v.image, "The lmlab container image (lmlab installed with its data extra, the checkout at "
          "working_dir)."),
    Value("working_dir", v.abs_path, "Where the image holds the lmlab checkout.", "/lmlab"),
    Value("python", v.word, "The image's Python.", "python"),
    Value("pvc", v.dns_label, "A ReadWriteMany PersistentVolumeClaim every pod mounts (data, workdirs)."),
    Value("mount_path", v.abs_path, "Where pods mount the claim.", "/shared"),
)


def _check_processes_per_node(values: dict[str, Any]) -> None:
    tasks, gpus = values["tasks_per_node"], values["gpus_per_node"]
    if gpus and tasks not in (1, gpus):
        raise v.LaunchError(f"tasks_per_node={tasks} with gpus_per_node={gpus}: run one process per node "
                            f"(tasks_per_node=1, it drives all {gpus} GPUs) or one per GPU (tasks_per_node={gpus})")


def _check_on_volume(*keys: str) -> Callable[[dict[str, Any]], None]:
    def check(values: dict[str, Any]) -> None:
        root = values["mount_path"].rstrip("/") + "/"
        for key in keys:
            if "://" not in values[key] and not values[key].startswith(root):  # gs://, s3://: fine
                raise v.LaunchError(f"{key}={values[key]!r} is not on the shared volume: every pod sees only "
                                    f"mount_path={values['mount_path']!r}; write {root}... (or a gs:// or s3:// URL)")
    return check


def _check_train_job(values: dict[str, Any]) -> None:
    _check_on_volume("workdir")(values)
    if len(values["name"]) + 1 + len(str(values["num_processes"] - 1)) > 63:  # pod hostname NAME-INDEX
        raise v.LaunchError(f"name={values['name']!r} is too long: pod hostnames {values['name']}-INDEX must fit in "
                            "63 characters")


# Beam 2.77's FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS (tests/launch checks the two agree).
FLINK_VERSIONS = ("1.19", "1.20", "2.0", "2.1", "2.2")


def _check_flink(values: dict[str, Any]) -> None:
    _check_on_volume("input", "output")(values)
    if values["flink_version"] not in FLINK_VERSIONS:
        raise v.LaunchError(f"flink_version={values['flink_version']!r}: Beam's FlinkRunner runs on Flink "
                            f"{', '.join(FLINK_VERSIONS)}")
    if len(values["name"] + "-taskmanager") > 63:
        raise v.LaunchError(f"name={values['name']!r} is too long: {values['name']}-taskmanager must fit in 63 "
                            "characters")


_TRAIN_FLAGS = (
    Value("config", v.word, "The training config, FILE.py:PRESET (relative to the checkout)."),
    Value("workdir", v.abs_path, "The run's workdir on shared storage (checkpoints, metrics, data)."),
    Value("overrides", v.config_flags, "Config overrides, e.g. '--config.steps=1000 --config.data.batch_size=64'.",
          ""),
    Value("port", v.port, "The port of jax.distributed's coordinator on process 0.", "12345"),
    Value("xla_flags", v.flags, "Extra XLA flags ($LMLAB_XLA_FLAGS, added to XLA_FLAGS by python -m train).", ""),
)

_PREPARE_FLAGS = (
    Value("input", v.word, "The raw corpus: a file glob data.prepare reads (text, JSONL, .gz, .zst)."),
    Value("output", v.word, "The prepared dataset's directory."),
    Value("tokenizer", v.word, "The tokenizer (data.tokenizer.load_tokenizer's path)."),
    Value("worker_pool_port", v.port, "The port of each node's Beam SDK worker pool.", "50000"),
    Value("prepare_args", v.flags, "More flags of python -m data.prepare (stage options, --overwrite, ...).", ""),
)

TEMPLATES = {t.path: t for t in (
    Template(
        "slurm/train.sbatch",
        "Multi-node python -m train: one process per node or per GPU, joined by jax.distributed.",
        _SLURM + _TRAIN_FLAGS + (
            Value("tasks_per_node", v.positive_int, "Processes per node: 1, or gpus_per_node (one per GPU).", "1"),
            Value("gpus_per_node", v.count, "GPUs per node (0: CPU nodes).", "8"),
            Value("cpus_per_task", v.positive_int, "CPU cores per process (input pipeline, host work).", "16"),
            Value("nccl_socket_ifname", v.optional(v.word), "NCCL_SOCKET_IFNAME, the network interface NCCL uses "
                  "(empty: NCCL chooses).", ""),
        ),
        _check_processes_per_node),
    Template(
        "slurm/prepare_spark.sbatch",
        "python -m data.prepare on a standalone Spark cluster started on the allocation (SparkRunner).",
        _SLURM + _PREPARE_FLAGS + (
            Value("spark_home", v.abs_path, "A Spark 3 installation on shared storage (its sbin/ and bin/)."),
            Value("spark_port", v.port, "The Spark master's port.", "7077"),
            Value("spark_ui_port", v.port, "The Spark master's web UI port.", "8080"),
            Value("cores_per_node", v.positive_int, "Cores each node's Spark worker offers.", "16"),
            Value("memory_per_node", v.word, "Memory each node's Spark worker offers (Spark's 64g, 512m).", "32g"),
            Value("spark_job_server_jar", v.optional(v.word), "Beam's Spark job server jar (path or URL; empty: "
                  "Beam downloads the one of its version from Maven Central).", ""),
        )),
    Template(
        "k8s/train-indexed-job.yaml",
        "Multi-host python -m train as an Indexed Job; a headless Service names pod 0 for the coordinator.",
        _K8S + _TRAIN_FLAGS + (
            Value("name", v.dns_label, "The Job's (and its Service's) name.", "lmlab-train"),
            Value("num_processes", v.positive_int, "Pods, one python -m train process each."),
            Value("gpus_per_pod", v.count, "nvidia.com/gpu per pod (0: CPU pods).", "8"),
            Value("cpu", v.word, "CPU request per pod.", "16"),
            Value("memory", v.word, "Memory request per pod (Kubernetes quantity).", "64Gi"),
        ),
        _check_train_job),
    Template(
        "k8s/prepare-flink.yaml",
        "python -m data.prepare on a Flink session cluster (FlinkRunner): JobManager, TaskManagers with a Beam "
        "SDK worker-pool sidecar, and a Job that submits the pipeline.",
        _K8S + _PREPARE_FLAGS + (
            Value("name", v.dns_label, "Prefix of every object's name.", "lmlab-prepare"),
            Value("flink_version", v.word, f"Flink's version: Beam's FlinkRunner speaks {', '.join(FLINK_VERSIONS)}.",
                  "1.20"),
            Value("flink_image", v.optional(v.image), "The Flink image (empty: flink:<flink_version>).", ""),
            Value("taskmanagers", v.positive_int, "TaskManager pods."),
            Value("task_slots", v.positive_int, "Task slots per TaskManager.", "4"),
            Value("taskmanager_memory", v.word, "Flink's taskmanager.memory.process.size.", "8g"),
            Value("taskmanager_cpu", v.word, "CPU request of each TaskManager's Flink container.", "2"),
            Value("worker_cpu", v.word, "CPU request of each TaskManager's Beam worker pool (the stages' Python: "
                  "one process per task slot).", "4"),
            Value("worker_memory", v.word, "Memory request of each Beam worker pool.", "8Gi"),
            Value("flink_job_server_jar", v.optional(v.word), "Beam's Flink job server jar (path or URL; empty: "
                  "Beam downloads the one of its version from Maven Central).", ""),
        ),
        _check_flink),
)}
