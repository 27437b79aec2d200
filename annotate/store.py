"""One annotator's judgments: DIR/NAME.jsonl, a line per judgment, in the order they were made.

A judgment line holds the item's id, the annotator's name and the choice, with the item's text
in the form its training file takes:

    {"prompt": ..., "chosen": ..., "rejected": ..., "id", "annotator", "choice": "a" | "b"}   (a pair)
    {"prompt": ..., "a": ..., "b": ..., "id", "annotator", "choice": "tie" | "skip"}
    {"text": ...[, "text_pair"], "label": L, "id", "annotator", "choice": L}            (a label)
    {"text": ...[, "text_pair"], "id", "annotator", "choice": "skip"}

so that the a/b lines of a pair file are lines `data.preference` reads as they are (it ignores
the extra keys) and the labeled lines of a label file are lines `data.tasks` reads;
`annotate.merge` writes the training file of several annotators.

Durability: a judgment is one `write` of one whole line on a file opened for appending,
then fsync; undo truncates the file to where its last line starts. A crash can leave only a
partial last line, which the next start (`AnnotatorFile`) cuts off and readers
(`read_directory`) ignore. One server per annotator: the file is locked (flock) while a
server has it open, so a second server for the same name is refused.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import threading
from collections.abc import Sequence

from annotate.tasks import LABEL, PREFERENCE, SKIP, Item, TaskSet

log = logging.getLogger(__name__)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_annotator(name: str) -> str:
    """The annotator's name, which names their file; ValueError unless it is a plain word."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"--annotator={name!r} must be 1-64 letters, digits, '_', '.' or '-' (it names the "
                         "annotator's file DIR/NAME.jsonl)")
    return name


def judgment(tasks: TaskSet, item: Item, annotator: str, choice: str) -> dict:
    """The line that records `annotator`'s `choice` on `item` (the module docstring's forms)."""
    fields = item.fields
    if tasks.kind == PREFERENCE and choice in ("a", "b"):
        chosen, rejected = (fields["a"], fields["b"]) if choice == "a" else (fields["b"], fields["a"])
        row = {"prompt": fields["prompt"], "chosen": chosen, "rejected": rejected}
    else:
        row = dict(fields)
        if tasks.kind == LABEL and choice != SKIP:
            row["label"] = choice
    return {**row, "id": item.id, "annotator": annotator, "choice": choice}


def judgment_kind(row: dict) -> str:
    """LABEL for a class-label judgment (it has "text"), else PREFERENCE."""
    return LABEL if "text" in row else PREFERENCE


def _parse(data: bytes, path: str) -> list[dict]:
    """The judgment lines of a file's complete lines; ValueError naming a bad line."""
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); an annotator file holds one judgment per "
                             "line, written by `python -m annotate`") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("choice"), str):
            raise ValueError(f'{path}:{number}: a judgment is a JSON object with string "id" and "choice"; this '  # noqa: TRY004
                             "file was not written by `python -m annotate`: move it out of the directory")
        rows.append(row)
    return rows


def _complete_lines(data: bytes) -> bytes:
    """`data` up to its last newline: a partial last line is a write a crash cut short."""
    return data[:data.rfind(b"\n") + 1]


class AnnotatorFile:
    """DIR/NAME.jsonl opened by the annotator's server: read back (resume), appended, undone.

    Attributes:
      path: the file.
      rows: the judgments in the order they were made.
    """

    def __init__(self, directory: str, annotator: str, tasks: TaskSet):
        self.annotator, self.tasks = check_annotator(annotator), tasks
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"--out={directory} is a file; --out names the directory of the annotators' files")
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"{annotator}.jsonl")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ValueError(f"{self.path} is open in another `python -m annotate` server for annotator {annotator}; "
                             "stop that one or give another --annotator") from None
        try:
            self.rows, self._starts = self._read_back()
        except Exception:
            self.close()
            raise
        self._lock = threading.Lock()

    def _read_back(self) -> tuple[list[dict], list[int]]:
        with open(self.path, "rb") as f:
            data = f.read()
        complete = _complete_lines(data)
        if len(complete) < len(data):
            log.warning("%s ended in a partial line (an interrupted write); it is cut off", self.path)
            os.ftruncate(self._fd, len(complete))
        rows = _parse(complete, self.path)
        starts, offset = [], 0
        for line in complete.splitlines(keepends=True):
            starts.append(offset)
            offset += len(line)
        items, seen = self.tasks.by_id(), set()
        for number, row in enumerate(rows, start=1):
            where = f"{self.path}:{number}"
            if row.get("annotator") != self.annotator:
                raise ValueError(f"{where} is a judgment of {row.get('annotator')!r}, not of {self.annotator!r}; "
                                 "each annotator's file is DIR/NAME.jsonl")
            if row["id"] not in items:
                raise ValueError(f"{where}: item {row['id']!r} is not in the task file {self.tasks.path}; give the "
                                 "task file these judgments were made on, or a new --out")
            if row["id"] in seen:
                raise ValueError(f"{where}: item {row['id']!r} was judged on an earlier line; the file is damaged")
            if row["choice"] not in self.tasks.choices:
                raise ValueError(f"{where}: {row['choice']!r} is not one of the choices {list(self.tasks.choices)}; "
                                 "pass the label set these judgments were made with (--labels)")
            if row != judgment(self.tasks, items[row["id"]], self.annotator, row["choice"]):
                raise ValueError(f"{where}: item {row['id']!r} differs from the task file's row with that id (the "
                                 "task file changed since it was judged); give the old file or a new --out")
            seen.add(row["id"])
        return rows, starts

    def judged(self) -> set[str]:
        return {row["id"] for row in self.rows}

    def next_item(self) -> Item | None:
        """The first item of the task file not judged yet (None: all are)."""
        judged = self.judged()
        return next((item for item in self.tasks.items if item.id not in judged), None)

    def append(self, item: Item, choice: str) -> dict:
        """Records `choice` on `item`: one line appended, synced to disk; returns it."""
        row = judgment(self.tasks, item, self.annotator, choice)
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            start = os.fstat(self._fd).st_size
            written = os.write(self._fd, line)
            if written != len(line):
                os.ftruncate(self._fd, start)
                raise OSError(f"wrote {written} of {len(line)} bytes to {self.path} (disk full?); nothing recorded")
            os.fsync(self._fd)
            self.rows.append(row)
            self._starts.append(start)
        return row

    def undo(self) -> dict | None:
        """Removes the last judgment from the file and returns it (None: there is none)."""
        with self._lock:
            if not self.rows:
                return None
            os.ftruncate(self._fd, self._starts.pop())
            os.fsync(self._fd)
            return self.rows.pop()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def read_directory(directory: str) -> dict[str, list[dict]]:
    """Every annotator's judgments under `directory` (`read_files` of its NAME.jsonl files)."""
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), "*.jsonl")))
    if not os.path.isdir(directory) or not paths:
        raise ValueError(f"{directory} holds no annotator file (NAME.jsonl); give the --out directory of "
                         "`python -m annotate`")
    return read_files(paths)


def item_content(row: dict) -> str:
    """What a judgment was made on, whatever the choice: the prompt and the two responses (in
    either order), or the text and its pair; as canonical JSON, to compare across annotators."""
    if judgment_kind(row) == LABEL:
        return json.dumps([row.get("text"), row.get("text_pair")], sort_keys=True)
    responses = [row.get("chosen"), row.get("rejected")] if "chosen" in row else [row.get("a"), row.get("b")]
    return json.dumps([row.get("prompt"), sorted(json.dumps(r, sort_keys=True) for r in responses)], sort_keys=True)


def read_files(paths: Sequence[str]) -> dict[str, list[dict]]:
    """The judgments of annotator files ({name: rows}, names sorted), read-only; a partial last
    line (a write in progress) is left out.

    Raises:
      ValueError: a missing file, two files of one name, a line that is no judgment, a row whose
        annotator is not its file's name, an item judged twice, judgments of both kinds, or one
        item id whose text differs between two files (judged on different task files).
    """
    out, kinds, contents = {}, {}, {}
    for path in paths:
        name = os.path.basename(path).removesuffix(".jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"annotator file {path} does not exist; give files written by `python -m annotate`")
        if name in out:
            raise ValueError(f"two annotator files are named {name}.jsonl; an annotator's judgments are one file")
        with open(path, "rb") as f:
            rows = _parse(_complete_lines(f.read()), path)
        seen = set()
        for number, row in enumerate(rows, start=1):
            if row.get("annotator") != name:
                raise ValueError(f"{path}:{number}: the judgment of {row.get('annotator')!r} in the file of {name!r}; "
                                 "each annotator's judgments are in DIR/NAME.jsonl only")
            if row["id"] in seen:
                raise ValueError(f"{path}:{number}: item {row['id']!r} is judged twice; the file is damaged")
            seen.add(row["id"])
            kinds.setdefault(judgment_kind(row), f"{path}:{number}")
            where = contents.setdefault(row["id"], (item_content(row), f"{path}:{number}"))
            if where[0] != item_content(row):
                raise ValueError(f"{path}:{number}: item {row['id']!r} differs from the item of that id at {where[1]}; "
                                 "these files were judged on different task files")
        if len(kinds) > 1:
            raise ValueError(f"the annotator files mix preference judgments ({kinds[PREFERENCE]}) and label "
                             f"judgments ({kinds[LABEL]}); keep one task's files per directory")
        out[name] = rows
    return dict(sorted(out.items()))


def kind_of(judgments: dict[str, list[dict]]) -> str | None:
    """PREFERENCE or LABEL, the kind of every judgment (`read_files` checked they agree); None: none."""
    return next((judgment_kind(row) for rows in judgments.values() for row in rows), None)
