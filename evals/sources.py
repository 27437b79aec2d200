"""Where a task's documents come from: `dataset_path` (+ `dataset_name`, `dataset_kwargs`).

    docs = sources.read_docs("tfds:glue/sst2", "validation", data_dir=None)

Sources (`SOURCE_FORMS`):
  * `files:PATH.jsonl`: one JSON object per line (`data.jsonl`). A `{split}` in PATH is replaced
    by the split's name; without it, the file is every split.
  * `json` with `dataset_kwargs: {data_files: PATH | {SPLIT: PATH}}`: lm-eval's way to name
    local JSON Lines files (Hugging Face `datasets`' json loader; a bare PATH is split `train`),
    so that an lm-eval task file for local data reads the same documents here.
  * `tfds:NAME[/CONFIG]` (or `dataset_name: CONFIG`): a TFDS dataset prepared as array_record,
    read through `tfds.data_source` by `data.tasks.read_records` (no TensorFlow, no download).
  * `embedded:continuation | cloze | documents`: tasks made from the embedded corpus
    (`evals.corpus_tasks`); split `test` holds the held-out documents, `train` the others.
  * `verifiable:TASK`: the problems of `data.verifiable` (`addition`, `multiplication`, `sorting`,
    `math/arithmetic__MODULE`) as {"prompt", "answer"}; `dataset_kwargs` sets
    `verifiable.TaskConfig` fields (digits, seed, num_eval, ...); split `test` holds the held-out
    problems, `train` the training ones.
Relative paths are relative to `base_dir` (the task file's directory).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from typing import Any

SOURCE_FORMS = ("'files:PATH.jsonl' ('{split}' in PATH is replaced by the split name), 'json' with "
                "dataset_kwargs.data_files, 'tfds:NAME[/CONFIG]', 'embedded:continuation|cloze|documents' or "
                "'verifiable:TASK'")
EMBEDDED = ("continuation", "cloze", "documents")
LOCAL_SPLITS = ("test", "train")  # what the embedded and verifiable sources hold
LEGACY_TFDS = {"glue": "tensorflow_datasets.text.glue",
               "cnn_dailymail": "tensorflow_datasets.summarization.cnn_dailymail"}


def read_docs(source: str, split: str, *, name: str | None = None, kwargs: Mapping[str, Any] | None = None,
              base_dir: str = ".", data_dir: str | None = None) -> list[dict]:
    """The documents of one split, in order.

    Args:
      source: the task's `dataset_path` (see `SOURCE_FORMS`).
      split: the split's name.
      name: the task's `dataset_name` (a TFDS config), or None.
      kwargs: the task's `dataset_kwargs`.
      base_dir: what relative paths are relative to.
      data_dir: where TFDS datasets are prepared (tfds's default when None).

    Raises:
      ValueError / FileNotFoundError: one line naming the source, split or file and the fix.
    """
    kwargs = dict(kwargs or {})
    kind, _, rest = source.partition(":")
    if kind == "files" and rest:
        _no_kwargs(source, kwargs)
        return _jsonl(_path(rest, base_dir).replace("{split}", split))
    if source == "json":
        return _json_files(kwargs, split, base_dir)
    if kind == "tfds" and rest:
        _no_kwargs(source, kwargs)
        return _tfds(rest + (f"/{name}" if name else ""), split, data_dir)
    if kind == "embedded" and rest in EMBEDDED:
        _no_kwargs(source, kwargs)
        from evals import corpus_tasks

        return corpus_tasks.docs(rest, _local_split(source, split))
    if kind == "verifiable" and rest:
        return _verifiable(rest, _local_split(source, split), kwargs)
    raise ValueError(f"unknown task data source {source!r}; accepted: {SOURCE_FORMS}")


def _path(path: str, base_dir: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def _no_kwargs(source: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs:
        raise ValueError(f"dataset_kwargs {sorted(kwargs)} mean nothing to the source {source!r}; remove them")


def _local_split(source: str, split: str) -> str:
    if split not in LOCAL_SPLITS:
        raise ValueError(f"{source!r} has the splits {', '.join(LOCAL_SPLITS)}, not {split!r}; fix the task's "
                         "test_split / training_split / fewshot_split")
    return split


def _jsonl(path: str) -> list[dict]:
    from data import jsonl

    if not os.path.isfile(path):
        raise FileNotFoundError(f"task data file {path} does not exist; fix the path (relative paths are relative "
                                "to the task file)")
    docs = []
    for where, number, record in jsonl.records([path], kind="document", forms="a JSON object of fields"):
        if not isinstance(record, dict):
            raise ValueError(f"{where}:{number}: a {type(record).__name__}, not a JSON object; each line must be one "
                             "document's fields")
        docs.append(record)
    return docs


def _json_files(kwargs: dict, split: str, base_dir: str) -> list[dict]:
    files = kwargs.pop("data_files", None)
    _no_kwargs("json", kwargs)
    if isinstance(files, str):
        files = {"train": files}
    if not isinstance(files, Mapping) or not files:
        raise ValueError("the source 'json' reads dataset_kwargs.data_files (PATH or {SPLIT: PATH}); give it")
    if split not in files:
        raise ValueError(f"dataset_kwargs.data_files has the splits {sorted(files)}, not {split!r}; fix the task's "
                         "splits")
    paths = files[split] if isinstance(files[split], list) else [files[split]]
    return [doc for path in paths for doc in _jsonl(_path(str(path), base_dir))]


def _tfds(name: str, split: str, data_dir: str | None) -> list[dict]:
    from data import tasks

    if name.count("/") > 1 or not all(name.split("/")):
        raise ValueError(f"'tfds:{name}' is not NAME or NAME/CONFIG")
    if name.split("/")[0] in LEGACY_TFDS:  # registered on import only (not found lazily like newer datasets)
        importlib.import_module(LEGACY_TFDS[name.split("/")[0]])
    config = tasks.TaskConfig(source=f"tfds:{name.replace('/', ':')}", data_dir=data_dir)
    records, _ = tasks.read_records(config, split)
    return [record.fields for record in records]


def _verifiable(task: str, split: str, kwargs: dict) -> list[dict]:
    from data import verifiable

    verifiable.check_name(task)
    fields = {f.name for f in dataclasses.fields(verifiable.TaskConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"dataset_kwargs key {unknown[0]!r} is not a verifiable task setting; expected some of "
                         f"{sorted(fields)}")
    kwargs.setdefault("num_train", 1 if split == "test" else 2000)  # the held-out problems do not depend on it
    train, held_out = verifiable.generate(task, verifiable.TaskConfig(**kwargs))
    return [{"prompt": p.prompt, "answer": p.answer, "task": p.task} for p in (held_out if split == "test" else train)]
