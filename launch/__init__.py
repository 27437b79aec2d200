"""Cluster launch files for lmlab: SLURM scripts and Kubernetes manifests, rendered from templates.

    python -m launch render TEMPLATE --set KEY=VALUE ... [--out FILE]

    slurm/train.sbatch           multi-node `python -m train`, one process per node or per GPU
    k8s/train-indexed-job.yaml   the same on Kubernetes: an Indexed Job + a headless Service
    k8s/prepare-flink.yaml       `python -m data.prepare` on a Flink session cluster (FlinkRunner)
    slurm/prepare_spark.sbatch   `python -m data.prepare` on a standalone Spark cluster (SparkRunner)

Training: every process runs the same `python -m train` with `--coordinator_address` (process
0's host: the first node of the SLURM allocation, or pod 0 of the Indexed Job, `NAME-0.NAME`
through the headless Service), `--num_processes` and `--process_id` (SLURM_PROCID, or the
pod's JOB_COMPLETION_INDEX); see train/distributed.py. The workdir lives on storage every
process shares.

Corpus preparation: Beam's portable runners hand the pipeline to the cluster; the Python code
of each stage runs in a Beam SDK worker pool beside every Flink TaskManager or Spark worker
(`--environment_type=EXTERNAL --environment_config=localhost:PORT`), started from the lmlab
installation so that `data.prepare`'s modules are importable there.

`launch.values` holds the kinds of value (checked before rendering), `launch.catalog` each
template's values, `launch.render` the rendering; the templates are in launch/templates/.
"""
