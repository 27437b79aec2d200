"""Evaluate a checkpoint on tasks: `python -m evals --checkpoint=PATH --tasks=NAME,... --out=DIR`.

PATH is a `python -m train` workdir (its latest checkpoint, or --step) or a Hugging Face
directory; a task is a built-in (evals/task_data/) or a .yaml / .jsonl task file (evals/tasks.py):

    python -m evals --checkpoint=/tmp/tiny --tasks=pydoc_continuation,pydoc_cloze --out=/tmp/eval --limit=200
    python -m evals --checkpoint=/tmp/hf_llama --tasks=my_task.yaml --out=/tmp/eval --batch_size=16

DIR/results.json holds each task's metrics with standard errors, DIR/<task>.jsonl one record
per example; an existing DIR/results.json is kept unless --overwrite. Several devices: a mesh
over all of them, laid out by --strategy. Multi-host: every process runs the same command with
--coordinator_address, --num_processes and --process_id (as `python -m train`).
"""

from absl import app, flags

from train import cli as train_cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A `python -m train` workdir or a Hugging Face directory.")
_TASKS = flags.DEFINE_string("tasks", None, "Comma-separated built-in task names or .yaml / .jsonl task files.")
_OUT = flags.DEFINE_string("out", None, "Where results.json and the per-task records are written.")
_LIMIT = flags.DEFINE_integer("limit", None, "Score only each task's first N documents.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Requests per model batch.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Context window in tokens (default: the model's).")
_STRATEGY = flags.DEFINE_string("strategy", None, "Sharding strategy of sharding/ over all devices (default dp).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Params and compute dtype.")
_STEP = flags.DEFINE_integer("step", None, "The workdir checkpoint step (default: the latest).")
_BOOTSTRAP_ITERS = flags.DEFINE_integer("bootstrap_iters", 1000, "Bootstrap resamples for corpus metrics' "
                                        "standard errors; 0: no standard errors.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Overrides every task's number of few-shot examples.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where tfds: task data are prepared (default: tfds's).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing DIR/results.json.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["checkpoint", "tasks", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from evals import cli

    names = cli.parse_task_names(_TASKS.value)
    from train import distributed  # before anything touches a device

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    cli.run(_CHECKPOINT.value, names, _OUT.value, limit=_LIMIT.value, batch_size=_BATCH_SIZE.value,
            max_length=_MAX_LENGTH.value, strategy=_STRATEGY.value, dtype=_DTYPE.value, step=_STEP.value,
            bootstrap_iters=_BOOTSTRAP_ITERS.value, seed=_SEED.value, num_fewshot=_NUM_FEWSHOT.value,
            data_dir=_DATA_DIR.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
    train_cli.run(main)  # errors as one line `error: ...` (--verbose: traceback)
