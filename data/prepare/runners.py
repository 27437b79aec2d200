"""Which Beam runner a run uses, checked before any work; how to launch on a cluster.

Here (one machine) the DirectRunner runs the pipeline in three modes:

    --direct_running_mode=in_memory                          one process (the default)
    --direct_running_mode=multi_threading --direct_num_workers=N
    --direct_running_mode=multi_processing --direct_num_workers=N   N worker processes

On a cluster the same command takes Beam's portable runners. Flink and Spark need Beam's job
server, a Java jar (`beam-runners-flink-<flink version>-job-server-<beam version>.jar`,
`beam-runners-spark-3-job-server-<beam version>.jar`) that Beam downloads from Maven Central on
first use into `~/.apache_beam/cache/jars/`, and Java to start it. Without network access,
download the jar elsewhere and pass `--flink_job_server_jar=PATH` / `--spark_job_server_jar=PATH`
(or copy it into the cache), or point `--job_endpoint=HOST:8099` at a job server already
running. `check_runner` finds out before the pipeline starts and says so in one line (Beam
itself fails only when it starts the job, with a traceback).

    # Flink (a session cluster; the workers run the Python SDK harness in Docker)
    python -m data.prepare --input='/shared/raw/*.jsonl.zst' --output=/shared/prepared \
        --tokenizer=/shared/tokenizer --runner=FlinkRunner --flink_master=JOBMANAGER:8081 \
        --flink_version=1.20 --parallelism=64 --environment_type=DOCKER \
        --sdk_container_image=REGISTRY/lmlab-beam:latest
    # Spark (standalone master)
    python -m data.prepare ... --runner=SparkRunner --spark_master_url=spark://MASTER:7077 \
        --environment_type=DOCKER --sdk_container_image=REGISTRY/lmlab-beam:latest
    # either, with the SDK harness as a sidecar worker pool instead of Docker-in-Docker:
    #   on each worker node: python -m apache_beam.runners.worker.worker_pool_main --service_port=50000
    #   and: --environment_type=EXTERNAL --environment_config=localhost:50000

The SDK harness must be able to import lmlab: build the container image from
`apache/beam_python3.11_sdk:2.77.0` with this repository `pip install .[data]`-ed into it, or pass
`--setup_file=./setup.py` to have Beam install the package on the workers. The output (and the
staging directory next to it) must be a POSIX path that the launching process and every worker
see (NFS, Lustre, a bucket mounted with gcsfuse): shards are written with array_record's local
writer and swapped into place with renames. Inputs can be any Beam file system (gs://, s3://
with Beam's extras). `--environment_type=LOOPBACK` (Beam's default for `--flink_master=[local]`)
runs the Python code in the launching process: for trying a runner locally, not for scale.
"""

import os
import shutil
import socket
import urllib.parse

from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions

JOB_SERVER_RUNNERS = ("FlinkRunner", "SparkRunner")
# Seconds to wait for Maven Central before calling it unreachable.
CONNECT_TIMEOUT = 5.0


def runner_name(options: PipelineOptions) -> str:
    """The runner's class name (`--runner`; Beam's default is the DirectRunner)."""
    name = options.view_as(StandardOptions).runner or "DirectRunner"
    return name.rsplit(".", 1)[-1]


def job_server_jar(options: PipelineOptions) -> str:
    """The job-server jar (a local path or a Maven URL) Beam would start for a Flink or Spark run."""
    if runner_name(options) == "FlinkRunner":
        from apache_beam.runners.portability.flink_runner import FlinkJarJobServer  # pylint: disable=g-import-not-at-top

        return FlinkJarJobServer(options).path_to_jar()
    from apache_beam.runners.portability.spark_runner import SparkJarJobServer  # pylint: disable=g-import-not-at-top

    return SparkJarJobServer(options).path_to_jar()


def _reachable(url: str) -> str:
    """"" when the host of `url` answers, else why not."""
    parsed = urllib.parse.urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=CONNECT_TIMEOUT):
            return ""
    except OSError as e:
        return f"{parsed.hostname} is unreachable ({e})"


def check_runner(options: PipelineOptions, reachable=_reachable) -> None:
    """Raises a one-line error when the runner cannot start here, before any work.

    Checks that Beam knows the runner and, for Flink and Spark without `--job_endpoint`, that
    Java is installed and the job-server jar is a local file, in Beam's cache, or downloadable.

    Args:
        options: the run's Beam options.
        reachable: url -> "" or why it cannot be fetched (a parameter for tests).
    """
    from apache_beam.runners import runner as beam_runner  # pylint: disable=g-import-not-at-top

    name = runner_name(options)
    try:
        beam_runner.create_runner(options.view_as(StandardOptions).runner or "DirectRunner")
    except (ValueError, ImportError) as e:
        raise ValueError(f"--runner={name} cannot be used: {e}") from None
    if name not in JOB_SERVER_RUNNERS or options.view_as(PortableOptions).job_endpoint:
        return
    flag = "--flink_job_server_jar" if name == "FlinkRunner" else "--spark_job_server_jar"
    if shutil.which("java") is None:
        raise ValueError(f"--runner={name} starts Beam's job server, a Java program, but `java` is not on PATH; "
                         "install a JRE (11 or later) or give --job_endpoint=HOST:PORT of a running job server")
    given = options.get_all_options().get(flag[2:])
    if given and not os.path.exists(given) and not urllib.parse.urlparse(given).scheme:
        raise ValueError(f"{flag}={given} does not exist; give the path (or URL) of Beam's {name} job-server jar, "
                         "beam-runners-...-job-server-<beam version>.jar from Maven Central")
    try:
        jar = job_server_jar(options)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"--runner={name}: {flag} is not usable: {e}") from None
    cache = os.path.expanduser("~/.apache_beam/cache/jars")
    if os.path.exists(jar) or os.path.exists(os.path.join(cache, os.path.basename(jar))):
        return
    why = reachable(jar)
    if why:
        extra = " (and --flink_master=[local] for a local Flink)" if name == "FlinkRunner" else ""
        raise ValueError(
            f"--runner={name} needs Beam's job server {os.path.basename(jar)}, which is not in Beam's cache "
            f"{cache} and cannot be downloaded from {jar}: {why}; download it on a machine with network access "
            f"and pass {flag}=PATH{extra}, or copy it into {cache}, or give --job_endpoint=HOST:PORT")

