"""The task file: what the annotators judge, one JSON object per line, all of one kind.

  * preference pairs: `{"id", "prompt", "a", "b"}`; the annotator says which response is better
    (a, b), that neither is (tie), or skips. `prompt`, `a` and `b` are strings, or all lists of
    `{"role", "content"}` messages (then `prompt` may be left out: it is the messages `a` and `b`
    share at their start, as `data.preference` reads such rows). Each row is checked by
    `data.preference.parse_paired` as the pair {prompt, chosen: a, rejected: b} it may become,
    so that every judgment can be written as a line the reward and DPO objectives read.
  * class labels: `{"id", "text"[, "text_pair"]}`; the annotator picks one of the label set or
    skips. The label set is `--labels=a,b,c` or the file's first line `{"labels": ["a", "b", "c"]}`
    (both given: they must be equal). "skip" is reserved.

Ids are strings or integers, compared as strings, and unique. Everything is checked when the
file is read, so that a bad file fails in one line naming the line and the fix before the page
starts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from data import jsonl

PREFERENCE, LABEL = "preference", "label"
SKIP = "skip"
PREFERENCE_CHOICES = ("a", "b", "tie")
FORMS = ('{"id", "prompt", "a", "b"} (a preference pair) or {"id", "text"[, "text_pair"]} (an item to label, '
         'after a first line {"labels": [...]} or with --labels)')


@dataclasses.dataclass(frozen=True)
class Item:
    """One task: its id and what the page shows (prompt, a, b; or text[, text_pair])."""

    id: str
    fields: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """A checked task file.

    Attributes:
      path: the file.
      kind: PREFERENCE or LABEL.
      items: in file order (the order the page shows them).
      labels: the label set (LABEL), or PREFERENCE_CHOICES.
    """

    path: str
    kind: str
    items: tuple[Item, ...]
    labels: tuple[str, ...]

    @property
    def choices(self) -> tuple[str, ...]:
        """What a judgment may say: a label (or a, b, tie) or SKIP."""
        return (*self.labels, SKIP)

    def by_id(self) -> dict[str, Item]:
        return {item.id: item for item in self.items}


def row_kind(record: dict) -> str | None:
    """PREFERENCE for a row with "a" or "b", LABEL for one with "text", else None."""
    if "a" in record or "b" in record:
        return PREFERENCE
    if "text" in record:
        return LABEL
    return None


def _item_id(record: dict) -> str:
    value = record.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f'"id" must be a non-empty string or an integer, found {value!r:.40}; give every row an id')
    return str(value)


def _preference_fields(record: dict) -> dict[str, Any]:
    from data import preference  # (imports grain: only files of pairs need it)

    for key in ("a", "b"):
        if key not in record:
            raise ValueError(f'missing key "{key}"; a preference pair is {{"id", "prompt", "a", "b"}}')
    pair = {"chosen": record["a"], "rejected": record["b"]}
    if "prompt" in record:
        pair["prompt"] = record["prompt"]
    try:
        prompt, a, b, _ = preference.parse_paired(pair, preference.PreferenceConfig())
    except ValueError as e:
        names = {'"chosen"': '"a"', '"rejected"': '"b"'}
        message = str(e)
        for old, new in names.items():
            message = message.replace(old, new)
        raise ValueError(message) from None
    return {"prompt": prompt, "a": a, "b": b}


def _label_fields(record: dict) -> dict[str, Any]:
    fields = {}
    for key in ("text", "text_pair"):
        if key in record:
            if not isinstance(record[key], str) or not record[key].strip():
                raise ValueError(f'"{key}" must be a non-empty string, found {record[key]!r:.40}')
            fields[key] = record[key]
    return fields


def check_labels(labels: Sequence[str], where: str) -> tuple[str, ...]:
    """The label set as a tuple; ValueError for an empty, repeated, non-string or reserved name."""
    labels = tuple(labels)
    if not labels or not all(isinstance(x, str) and x.strip() and x == x.strip() for x in labels):
        raise ValueError(f"{where}: the label set must be non-empty names without surrounding spaces, found "
                         f"{list(labels)!r:.80}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: the label set {list(labels)} repeats a name; list each label once")
    if SKIP in labels:
        raise ValueError(f'{where}: the label "{SKIP}" is reserved (the skip button); rename it')
    return labels


def read(path: str, labels: Sequence[str] = ()) -> TaskSet:
    """Reads and checks the task file at `path`.

    Args:
      path: the JSONL task file.
      labels: the label set of a class-label file (`--labels`); () to take it from the file.

    Raises:
      ValueError / FileNotFoundError: one line naming the file (and line) and the fix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path} does not exist; --tasks names a JSONL file of {FORMS}")
    try:
        return _read(path, labels)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save the task file as UTF-8") from None


def _read(path: str, labels: Sequence[str]) -> TaskSet:
    items, kind, first_kind_line, file_labels, seen = [], None, 0, None, set()
    for _, number, record in jsonl.records([path], kind="task", forms=FORMS):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: a line must be a JSON object, {FORMS}")  # noqa: TRY004
        if number == 1 and set(record) == {"labels"}:
            file_labels = check_labels(record["labels"] if isinstance(record["labels"], list) else (),
                                       f"{path}:{number}")
            continue
        this = row_kind(record)
        if this is None:
            raise ValueError(f"{path}:{number}: a row is {FORMS}; found keys {sorted(record)}")
        if kind is None:
            kind, first_kind_line = this, number
        elif this != kind:
            raise ValueError(f"{path}:{number} is a {this} task but line {first_kind_line} is a {kind} task; a task "
                             "file holds one kind: split it in two")
        try:
            item_id = _item_id(record)
            if item_id in seen:
                raise ValueError(f'"id" {item_id!r} is used by an earlier row; ids must be unique')
            seen.add(item_id)
            fields = _preference_fields(record) if kind == PREFERENCE else _label_fields(record)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        items.append(Item(item_id, fields))
    if kind is None:
        raise ValueError(f"{path} holds a label set but no task; add rows {FORMS}")
    if kind == PREFERENCE:
        if labels or file_labels:
            raise ValueError(f"{path} holds preference pairs, whose choices are a, b and tie; --labels and a "
                             '{"labels": ...} line apply to class-label tasks only: remove them')
        return TaskSet(path, kind, tuple(items), PREFERENCE_CHOICES)
    if labels:
        labels = check_labels(labels, "--labels")
        if file_labels is not None and file_labels != labels:
            raise ValueError(f"--labels={','.join(labels)} differs from the label set {list(file_labels)} on line 1 "
                             f"of {path}; give one of them, or make them equal")
    elif file_labels is None:
        raise ValueError(f'{path} holds items to label but no label set; pass --labels=a,b,c or make the first '
                         'line {"labels": ["a", "b", "c"]}')
    return TaskSet(path, kind, tuple(items), labels or file_labels)
