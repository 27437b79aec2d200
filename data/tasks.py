"""Task data for BERT fine-tuning: sequence classification and extractive QA (SQuAD format).

Sources (`TASK_SOURCES`):
  * `files:PATH`: a local `.jsonl`, `.csv` or (question answering) SQuAD `.json` file. A `{split}`
    in PATH is replaced by the split's name (`files:/data/sst2_{split}.jsonl`); without it, the
    file's examples are split: every k-th (k = round(1 / validation_fraction)) is `validation`,
    the rest `train`.
  * `tfds:NAME[:CONFIG]`: a TFDS dataset prepared as array_record (`glue/sst2`, `squad`), read
    through `tfds.data_source`, so TensorFlow is never needed.
  * `pydoc_classification`, `pydoc_squad`: lmlab's own task data from CPython's documentation
    (`data.pydoc_tasks`), written under `data_dir` on first use.

Classification examples hold `text_key`, optionally `text_pair_key`, and `label_key`: integer
labels are class ids; string labels map to ids in sorted order over the training split (or the
order of `labels`), and the mapping is kept (`ClassificationData.label_names`, written as
config.json's id2label by `models.hf.save_pretrained`). QA examples hold `id`, `question`,
`context` and `answers` ({"text": [...], "answer_start": [...]}, or a list of such dicts); see
`data.squad` for the windows and the post-processing.

Batches (TEAM11 interface 1): classification `input_ids`, `token_type_ids`, `attention_mask`
[B, T] and `labels` [B]; qa the same three and `start_positions`, `end_positions` [B]; all int32.
Rows that only pad an evaluation's last batch have `labels` (or `start_positions`) = -1 and an
all-zero attention mask. Every process builds the same global batch and keeps its rows
(`data.pipeline.process_rows`); the training iterator has `get_state` / `set_state`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from data import pydoc_tasks, squad
from data.pipeline import process_rows

TASK_SOURCES = ("'files:PATH' (.jsonl, .csv or SQuAD .json; '{split}' in PATH is replaced by the split name), "
                "'tfds:NAME[:CONFIG]' (a TFDS dataset prepared as array_record under data_dir) or "
                "'pydoc_classification' / 'pydoc_squad' (lmlab's, data/pydoc_tasks.py)")
KINDS = ("classification", "qa")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What to read and how to encode it.

    Attributes:
      kind: "classification" or "qa".
      source: see `TASK_SOURCES`.
      seq_len, batch_size: T and the global batch B.
      seed, shuffle, num_epochs: the training order (None epochs: repeat forever).
      data_dir: where tfds looks for prepared datasets (tfds's default when None).
      train_split, eval_split, validation_fraction: see the module docstring.
      text_key, text_pair_key, label_key: classification fields ("" text_pair_key: single texts).
      labels: class names in id order; () derives them from the training split.
      num_labels: 0 derives it from the labels.
      question_key, context_key, answers_key, id_key: QA fields.
      doc_stride: tokens shared by consecutive windows of a long context.
      max_query_len: questions are cut to this many tokens.
    """

    kind: str = "classification"
    source: str = ""
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    validation_fraction: float = 0.1
    text_key: str = "text"
    text_pair_key: str = ""
    label_key: str = "label"
    labels: tuple[str, ...] = ()
    num_labels: int = 0
    question_key: str = "question"
    context_key: str = "context"
    answers_key: str = "answers"
    id_key: str = "id"
    doc_stride: int = 128
    max_query_len: int = 64


@dataclasses.dataclass(frozen=True)
class Record:
    """One example's fields and where it came from (`file:line`, for error messages)."""

    fields: dict[str, Any]
    where: str


# --- Reading records.

def read_records(config: TaskConfig, split: str) -> tuple[list[Record], dict[str, Any]]:
    """The records of `split` and the source's metadata (tfds ClassLabel names under "label_names")."""
    kind, _, rest = config.source.partition(":")
    if config.source in pydoc_tasks.SOURCES:
        pydoc_tasks.split([], split)  # a known split name
        return _file_records(_pydoc_path(config).replace("{split}", split)), {}
    if kind == "tfds" and rest and rest.count(":") <= 1 and all(rest.split(":")):
        return _tfds_records(rest.replace(":", "/"), split, config)
    if kind != "files" or not rest:
        raise ValueError(f"unknown task data source {config.source!r}; accepted forms: {TASK_SOURCES}")
    if "{split}" in rest:
        return _file_records(rest.replace("{split}", split)), {}
    records = _file_records(rest)
    if split not in ("train", "validation"):
        raise ValueError(f"{rest} is split into 'train' and 'validation' only, not {split!r}; or put {{split}} in "
                         "the path")
    every = max(round(1 / config.validation_fraction), 2)
    return [r for i, r in enumerate(records) if (i % every == every - 1) == (split == "validation")], {}


def _pydoc_path(config: TaskConfig) -> str:
    """DATA_DIR/SOURCE_{split}.jsonl of a pydoc source, written first if it is not there."""
    directory = config.data_dir or "."
    pattern = os.path.join(directory, f"{config.source}_{{split}}.jsonl")
    if all(os.path.isfile(pattern.replace("{split}", s)) for s in ("train", "validation")):
        return pattern
    return pydoc_tasks.write_jsonl(config.source, directory)


def _file_records(path: str) -> list[Record]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task data file {path} does not exist; fix the path")
    if path.endswith(".jsonl"):
        records = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    fields = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number} is not valid JSON ({e.msg}); fix the line") from None
                if not isinstance(fields, dict):
                    raise ValueError(f"{path}:{line_number} is not a JSON object; each line must be one example")
                records.append(Record(fields, f"{path}:{line_number}"))
        return records
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            return [Record(dict(row), f"{path}:{reader.line_num}") for row in reader]
    if path.endswith(".json"):
        return _squad_json_records(path)
    raise ValueError(f"task data file {path} has an unknown suffix; accepted: .jsonl, .csv, .json (SQuAD)")


def _squad_json_records(path: str) -> list[Record]:
    """The official SQuAD layout: data[].paragraphs[].{context, qas[].{id, question, answers}}."""
    with open(path, encoding="utf-8") as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno} is not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(document, dict) or "data" not in document:
        raise ValueError(f"{path} is not in the SQuAD layout (a 'data' list of articles); use .jsonl for one "
                         "example per line")
    records = []
    for i, article in enumerate(document["data"]):
        for j, paragraph in enumerate(article.get("paragraphs", [])):
            for k, qa in enumerate(paragraph.get("qas", [])):
                records.append(Record({"context": paragraph.get("context"), **qa},
                                      f"{path}: data[{i}].paragraphs[{j}].qas[{k}]"))
    return records


def _tfds_records(name: str, split: str, config: TaskConfig) -> tuple[list[Record], dict[str, Any]]:
    import tensorflow_datasets as tfds

    if name.split("/")[0] == "glue":
        import tensorflow_datasets.text.glue  # noqa: F401  registers glue (not found lazily like newer datasets)
    try:
        source = tfds.data_source(name, split=split, data_dir=config.data_dir, download=False, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"'tfds:{name}' names no registered TFDS dataset (a config goes after a colon: "
                         "'tfds:NAME:CONFIG')") from None
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in the array_record format under data_dir={config.data_dir!r}; "
            f"prepare it once: `tfds build {name} --file_format=array_record --data_dir=DATA_DIR` (tfds: {e})"
        ) from None
    meta = {}
    if config.kind == "classification":
        features = source.dataset_info.features
        label = features[config.label_key] if config.label_key in features else None
        if label is not None and hasattr(label, "names"):
            meta["label_names"] = tuple(label.names)
    return [Record(_decoded(source[i]), f"tfds:{name}[{split}] example {i}") for i in range(len(source))], meta


def _decoded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _decoded(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_decoded(v) for v in value.tolist()] if value.ndim else _decoded(value.item())
    return value


def _field(record: Record, key: str) -> Any:
    if key not in record.fields or record.fields[key] is None:
        raise ValueError(f"{record.where} has no key {key!r}; its keys are {sorted(record.fields)}: fix the data "
                         "or the task's key setting")
    return record.fields[key]


# --- Classification.

@dataclasses.dataclass
class ClassificationData:
    """Encoded examples: `arrays` (input_ids, token_type_ids, attention_mask [N, T], labels [N])
    and the class names in id order (None for integer labels without names)."""

    arrays: dict[str, np.ndarray]
    label_names: tuple[str, ...] | None
    num_labels: int


def label_names(config: TaskConfig, train_records: Sequence[Record], meta: dict) -> tuple[str, ...] | None:
    """Class names in id order: `config.labels`, the tfds ClassLabel's, or the training split's
    string labels sorted; None when the labels are integers."""
    if config.labels:
        return tuple(config.labels)
    if "label_names" in meta:
        return meta["label_names"]
    values = {_field(r, config.label_key) for r in train_records}
    if all(_as_int(v) is not None for v in values):
        return None
    return tuple(sorted(str(v) for v in values))


def _as_int(value: Any) -> int | None:
    """An integer label (CSV cells are strings: "1" counts), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _label_id(record: Record, key: str, names: tuple[str, ...] | None, num_labels: int) -> int:
    value = _field(record, key)
    if names is not None and str(value) in names:
        return names.index(str(value))
    label = _as_int(value)
    if label is None or names is not None and not isinstance(value, int):
        known = list(names) if names is not None else f"ids 0..{num_labels - 1}"
        raise ValueError(f"{record.where}: {key} {value!r} is not a known label (known: {known}); fix the label "
                         "or list it in the task's labels")
    if not 0 <= label < num_labels:
        raise ValueError(f"{record.where}: {key} {label} is outside 0..{num_labels - 1}; fix it or raise num_labels")
    return label


def encode_pair(tokenizer, text: str, pair: str | None, seq_len: int) -> tuple[list[int], list[int]]:
    """(ids, token types) of `[CLS] text [SEP] (pair [SEP])`, cut longest-first to `seq_len`."""
    a = tokenizer.encode(text)
    b = tokenizer.encode(pair) if pair is not None else None
    room = seq_len - (3 if b is not None else 2)
    while len(a) + len(b or ()) > room:
        if b is None or len(a) > len(b):
            a.pop()
        else:
            b.pop()
    ids = [tokenizer.cls_id, *a, tokenizer.sep_id]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, tokenizer.sep_id]
        types += [1] * (len(b) + 1)
    return ids, types


def _check_tokenizer(tokenizer) -> None:
    if getattr(tokenizer, "cls_id", None) is None or getattr(tokenizer, "sep_id", None) is None or not hasattr(
            tokenizer, "encode_with_offsets"):
        raise ValueError("BERT task data needs a WordPiece tokenizer with [CLS]/[SEP] and offsets: point "
                         "tokenizer.path at the model's tokenizer.json or vocab.txt")


def _labels(config: TaskConfig, train: Sequence[Record], meta: dict) -> tuple[tuple[str, ...] | None, int]:
    """(class names or None, number of classes) as the training split defines them."""
    names = label_names(config, train, meta)
    if names is not None:
        num_labels = config.num_labels or len(names)
        if num_labels != len(names):
            raise ValueError(f"num_labels={config.num_labels} but the labels are {list(names)}; set num_labels=0")
        return names, num_labels
    return None, config.num_labels or max(_as_int(_field(r, config.label_key)) for r in train) + 1


def num_labels(config: TaskConfig) -> int:
    """The number of classes of a classification task (`config.num_labels`, else its labels')."""
    return _labels(config, *read_records(config, config.train_split))[1]


def check(config: TaskConfig) -> None:
    """Reads both splits and checks every example's fields (and labels, and answer spans), so
    that bad data fail before any expensive work; ValueError / FileNotFoundError naming the
    file, line and key otherwise."""
    if config.kind not in KINDS:
        raise ValueError(f"task kind {config.kind!r}; expected one of {KINDS}")
    for split in dict.fromkeys((config.train_split, config.eval_split)):
        if config.kind == "qa":
            if not qa_examples(config, split):
                raise ValueError(f"{config.source}[{split}] holds no example; give it data")
            continue
        records, meta = read_records(config, split)
        if not records:
            raise ValueError(f"{config.source}[{split}] holds no example; give it data")
        names, count = _labels(config, records if split == config.train_split else
                               read_records(config, config.train_split)[0], meta)
        for record in records:
            _field(record, config.text_key)
            if config.text_pair_key:
                _field(record, config.text_pair_key)
            _label_id(record, config.label_key, names, count)


def classification_data(config: TaskConfig, tokenizer, split: str) -> ClassificationData:
    """The encoded examples of `split` (labels mapped as the training split defines them)."""
    _check_tokenizer(tokenizer)
    records, meta = read_records(config, split)
    train = records if split == config.train_split else read_records(config, config.train_split)[0]
    names, num_labels = _labels(config, train, meta)
    pad = tokenizer.pad_id or 0
    rows = {k: np.full((len(records), config.seq_len), v, np.int32)
            for k, v in (("input_ids", pad), ("token_type_ids", 0), ("attention_mask", 0))}
    labels = np.zeros(len(records), np.int32)
    for n, record in enumerate(records):
        text = str(_field(record, config.text_key))
        pair = str(_field(record, config.text_pair_key)) if config.text_pair_key else None
        labels[n] = _label_id(record, config.label_key, names, num_labels)
        ids, types = encode_pair(tokenizer, text, pair, config.seq_len)
        rows["input_ids"][n, :len(ids)] = ids
        rows["token_type_ids"][n, :len(ids)] = types
        rows["attention_mask"][n, :len(ids)] = 1
    return ClassificationData({**rows, "labels": labels}, names, num_labels)


# --- Question answering.

def qa_examples(config: TaskConfig, split: str) -> list[squad.QAExample]:
    """The SQuAD examples of `split`, answers checked against their contexts."""
    records, _ = read_records(config, split)
    examples = []
    for n, record in enumerate(records):
        answers = _field(record, config.answers_key)
        if isinstance(answers, dict):  # tfds / HF datasets: {"text": [...], "answer_start": [...]}
            pairs = list(zip(answers.get("text", []), answers.get("answer_start", [])))
        elif isinstance(answers, list) and all(isinstance(a, dict) and {"text", "answer_start"} <= set(a)
                                               for a in answers):
            pairs = [(a["text"], a["answer_start"]) for a in answers]
        else:
            raise ValueError(f"{record.where}: {config.answers_key} must be {{'text': [...], 'answer_start': [...]}}"
                             " or a list of {'text', 'answer_start'} objects")
        example = squad.QAExample(
            id=str(record.fields.get(config.id_key, n)), question=str(_field(record, config.question_key)),
            context=str(_field(record, config.context_key)), answers=tuple((str(t), int(s)) for t, s in pairs),
            where=record.where)
        squad.check_answers(example, config.answers_key)
        examples.append(example)
    return examples


def qa_features(config: TaskConfig, tokenizer, examples: Sequence[squad.QAExample]) -> squad.QAFeatures:
    _check_tokenizer(tokenizer)
    return squad.featurize(examples, tokenizer, config.seq_len, config.doc_stride, config.max_query_len)


# --- Batches.

def _rows_of(indices: np.ndarray, arrays: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    return {k: v[indices[rows]] for k, v in arrays.items()}


def train_arrays(config: TaskConfig, tokenizer) -> dict[str, np.ndarray]:
    """The model-facing arrays of every training example (classification) or window (qa)."""
    if config.kind == "classification":
        return classification_data(config, tokenizer, config.train_split).arrays
    if config.kind == "qa":
        return qa_features(config, tokenizer, qa_examples(config, config.train_split)).batch_arrays()
    raise ValueError(f"task kind {config.kind!r}; expected one of {KINDS}")


def train_iterator(config: TaskConfig, tokenizer, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
    """This process's rows of shuffled global batches (last partial batch of each pass dropped)."""
    arrays = train_arrays(config, tokenizer)
    count = len(next(iter(arrays.values())))
    if count < config.batch_size:
        raise ValueError(f"{config.source}[{config.train_split}] has {count} training rows, fewer than batch_size="
                         f"{config.batch_size}; lower the batch size or add data")
    rows = process_rows(config.batch_size, process_index, process_count)
    indices = grain.MapDataset.range(count)
    if config.shuffle:
        indices = indices.shuffle(seed=config.seed)
    batches = indices.repeat(config.num_epochs).batch(config.batch_size, drop_remainder=True)
    batches = batches.map(functools.partial(_rows_of, arrays=arrays, rows=rows))
    return iter(batches.to_iter_dataset())


class EvalSet:
    """The evaluation split, re-iterable as this process's rows of padded global batches.

    Attributes:
      arrays: the model-facing arrays of every example / window, in order.
      examples: QA examples (for post-processing); None for classification.
      features: QA windows; None for classification.
      label_names: classification's class names (None: integer labels).
    """

    def __init__(self, config: TaskConfig, tokenizer, *, process_index: int | None = None,
                 process_count: int | None = None):
        self.config = config
        self.examples = self.features = self.label_names = None
        if config.kind == "classification":
            data = classification_data(config, tokenizer, config.eval_split)
            self.arrays, self.label_names = data.arrays, data.label_names
        elif config.kind == "qa":
            self.examples = qa_examples(config, config.eval_split)
            self.features = qa_features(config, tokenizer, self.examples)
            self.arrays = self.features.batch_arrays()
        else:
            raise ValueError(f"task kind {config.kind!r}; expected one of {KINDS}")
        self._rows = process_rows(config.batch_size, process_index, process_count)

    def __len__(self) -> int:
        """Global batches per pass."""
        return -(-len(next(iter(self.arrays.values()))) // self.config.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        B, count = self.config.batch_size, len(next(iter(self.arrays.values())))
        marker = "labels" if self.config.kind == "classification" else "start_positions"
        for first in range(0, count, B):
            batch = {k: v[first:first + B] for k, v in self.arrays.items()}
            missing = B - len(batch[marker])
            if missing:  # padding rows: nothing attended, marked -1
                batch = {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1),
                                   constant_values=-1 if v.ndim == 1 else 0) for k, v in batch.items()}
            yield {k: v[self._rows] for k, v in batch.items()}
