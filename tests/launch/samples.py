"""Sample values for every launch template: what a user would --set, as texts."""

SAMPLES = {
    "slurm/train.sbatch": {"nodes": "2", "tasks_per_node": "8", "gpus_per_node": "8", "partition": "gpu", "account": "llm",
                               "repo": "/shared/lmlab", "config": "configs/llama.py:small", "workdir": "/shared/runs/small",
                               "overrides": "--config.steps=1000 '--config.data.source=files:/shared/raw data/*.txt'",
                               "xla_flags": "--xla_gpu_enable_latency_hiding_scheduler=true",
                               "nccl_socket_ifname": "ib0", "setup": "source /shared/venv/bin/activate"},
    "slurm/prepare_spark.sbatch": {"nodes": "4", "repo": "/shared/lmlab", "spark_home": "/shared/spark-3.5.5",
                                       "input": "/shared/raw/*.jsonl.gz", "output": "/shared/prepared/v1",
                                       "tokenizer": "/shared/tokenizers/llama", "prepare_args": "--overwrite",
                                       "spark_job_server_jar": "/shared/jars/beam-runners-spark-3-job-server.jar"},
    "k8s/train-indexed-job.yaml": {"num_processes": "4", "image": "ghcr.io/example/lmlab:0.1.0", "pvc": "lmlab-shared",
                                       "config": "configs/llama.py:small", "workdir": "/shared/runs/small",
                                       "overrides": "--config.steps=1000", "xla_flags": "--xla_dump_to=/shared/dump"},
    "k8s/prepare-flink.yaml": {"taskmanagers": "3", "image": "ghcr.io/example/lmlab:0.1.0", "pvc": "lmlab-shared",
                                   "input": "/shared/raw/*.jsonl.gz", "output": "/shared/prepared/v1",
                                   "tokenizer": "/shared/tokenizers/llama", "prepare_args": "--overwrite --stages=normalize"},
}
