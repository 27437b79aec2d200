"""JSON Lines files read line by line, each problem one line naming `file:line`.

    for path, number, record in jsonl.records(paths, kind="conversation", forms=LINE_FORMS): ...

The readers of chat (`data.sft`), preference (`data.preference`) and prompt (`data.prompts`)
files share it: blank lines are skipped, a line that is not JSON and a file without a single
line are ValueErrors naming the file (and line) and the form a line must have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any


def records(paths: Sequence[str], *, kind: str, forms: str) -> Iterator[tuple[str, int, Any]]:
    """(path, line number, record) of every non-blank line of `paths`, in order.

    Args:
      paths: the JSONL files.
      kind: what a line holds, for the error of an empty file ("conversation", "prompt", ...).
      forms: the form(s) a line must have, for the errors.

    Raises:
      ValueError: a line that is not JSON (`file:line`), or a file without any line.
    """
    for path in paths:
        found = False
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}); each line must "
                                     f"be one JSON object, {forms}") from None
                found = True
                yield path, number, record
        if not found:
            raise ValueError(f"{path}: holds no {kind}; each line must be {forms}")


def file_paths(source: str, *, reads: str, lines: str, forms: str) -> tuple[str, ...]:
    """The existing files of a `files:PATH[,PATH]` source; reads nothing (a run checks its
    config with it before any work).

    Args:
      source: `config.data.source`.
      reads: who reads it, for the error of another form ("fine-tuning reads", ...).
      lines: what a file's lines hold, for the error of a missing file ("chat lines", ...).
      forms: the source forms the reader takes, for the error of another form.

    Raises:
      ValueError: one line: a source of another form, or a file that does not exist.
    """
    from data import sources

    if not source.startswith("files:"):
        raise ValueError(f"config key `data.source`={source!r}: {reads} {forms}")
    try:
        paths = sources.parse_source(source).paths
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"config key `data.source`: {e}") from None
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"data file {path} does not exist; set data.source to files:PATH.jsonl of {lines}")
    return paths
