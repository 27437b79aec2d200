"""TFDS builders that write local text as array_record files: the embedded corpus and text files.

Both write one example per document, `{"key": str, "text": str}`, into a `train` and a
`validation` split under `data_dir`, in the array_record format, which
`tfds.data_source` / grain read with random access and without TensorFlow. Input files are
streamed line by line and written shard by shard, in source order: preparing holds each
document's key digest, size and position, never the text of more than one shard.

  * `EmbeddedDocs`: the English documentation CPython ships in `pydoc_data.topics`
    (79 topics, ~466 KB on Python 3.11), one document per topic. Nothing is downloaded.
  * `TextFiles`: `.txt` files (one document per file, or one per blank-line separated
    paragraph with `split_paragraphs`) and `.jsonl` files (one document per line, its
    text under `text_key`).

The validation documents are chosen by `holdout_split`: a fixed pseudo-random order (a
SHA-256 of each document key) filled greedily up to `validation_fraction` of the bytes.
"""

import array
import dataclasses
import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
_VERSION = tfds.core.Version("1.0.0")
# Text per array_record shard: a shard is what preparing holds in memory at once.
SHARD_BYTES = 32 << 20
# A document's position, from which `_documents` reads on: (path, byte offset, line, paragraph).
_POSITION_WIDTH = 4


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"key": tfds.features.Text(), "text": tfds.features.Text()})


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction={validation_fraction} must lie strictly between 0 and 1 "
            "(the share of bytes held out for the validation split)"
        )


def key_digest(key: str) -> bytes:
    """The SHA-256 of a document key, which orders documents for `holdout_split`."""
    return hashlib.sha256(key.encode()).digest()


def holdout_split(sizes: Mapping[str, int], validation_fraction: float) -> set[str]:
    """Chooses the validation documents: about `validation_fraction` of the bytes.

    Documents are visited in the order of the SHA-256 of their key, a fixed order that
    is unrelated to their names, and taken while they fit in the byte budget. At least
    one document goes to each side.

    Args:
        sizes: document key -> size in bytes.
        validation_fraction: share of the bytes to hold out, in (0, 1).

    Returns:
        The keys of the validation documents.
    """
    keys = list(sizes)
    digests = np.array([key_digest(key) for key in keys], dtype="S32")
    held = holdout_mask(digests, np.array([sizes[k] for k in keys], dtype=np.int64), validation_fraction)
    return {key for key, is_held in zip(keys, held) if is_held}


def holdout_mask(digests: np.ndarray, sizes: np.ndarray, validation_fraction: float) -> np.ndarray:
    """`holdout_split` over arrays: which documents (by index) are held out.

    Args:
        digests: `key_digest` of each document key, as a numpy `S32` array.
        sizes: size in bytes of each document.
        validation_fraction: share of the bytes to hold out, in (0, 1).

    Returns:
        A boolean array, True for the validation documents.
    """
    _check_fraction(validation_fraction)
    if len(sizes) < 2:
        raise ValueError(
            f"a train/validation split needs at least 2 documents, got {len(sizes)}; "
            "add files, or split .txt files into paragraphs with split_paragraphs=True"
        )
    order = np.argsort(digests, kind="stable")
    budget = validation_fraction * int(sizes.sum())
    held = np.zeros(len(sizes), dtype=bool)
    held_bytes = 0
    for index, size in zip(order.tolist(), sizes[order].tolist()):
        if held_bytes + size <= budget:
            held[index] = True
            held_bytes += size
    if not held.any():  # every document is larger than the budget: hold out the smallest
        held[order[np.argmin(sizes[order])]] = True
    if held.all():  # possible only for documents of size 0
        held[order[-1]] = False
    return held


class _SplitBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
    """Writes `_documents()` as a `train` and a `validation` split, streaming.

    A first pass over the documents keeps only each one's key digest, size and position
    (72 bytes, in arrays); the splits are then written shard by shard (at most `SHARD_BYTES`
    of text each, in source order), each shard re-reading the input from its first
    document's position. Memory stays at one shard, whatever the size of the corpus (tfds's
    own writers hold a whole split in memory up to 1 GB, and need TensorFlow beyond it).
    """

    VERSION = _VERSION

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features())

    def _documents(self, start: tuple[int, ...] | None = None) -> Iterator[tuple[tuple[int, ...], str, str]]:
        """(position, key, text) of each document in source order, from position `start`
        (None: the first); a position is a tuple of `_POSITION_WIDTH` ints."""
        raise NotImplementedError

    def _check_documents(self, count: int) -> None:
        del count  # each builder says what too few documents means for its input

    def _shard_iterators_per_split(self, dl_manager):
        del dl_manager  # nothing is downloaded
        digests, sizes, positions = bytearray(), array.array("q"), array.array("q")
        for position, key, text in self._documents():
            digests += key_digest(key)
            sizes.append(len(text.encode("utf-8")))
            positions.extend(position)
        self._check_documents(len(sizes))
        held = holdout_mask(np.frombuffer(bytes(digests), dtype="S32"), np.frombuffer(sizes, dtype=np.int64),
                            self.builder_config.validation_fraction)
        del digests
        shards = {"train": [], "validation": []}  # per split: [first document, count, bytes] of each shard
        for index, (size, is_held) in enumerate(zip(sizes, held.tolist())):
            split = shards["validation" if is_held else "train"]
            if not split or split[-1][2] >= SHARD_BYTES:
                split.append([index, 0, 0])
            split[-1][1] += 1
            split[-1][2] += size
        return {
            name: [functools.partial(self._shard_examples, first, count, held,
                                     tuple(positions[first * _POSITION_WIDTH : (first + 1) * _POSITION_WIDTH]))
                   for first, count, _ in split]
            for name, split in shards.items()
        }

    def _shard_examples(self, first: int, count: int, held: np.ndarray, start: tuple[int, ...]):
        """The `count` documents from document `first` (at position `start`) on that share its side of `held`."""
        validation = held[first]
        for index, (_, key, text) in enumerate(self._documents(start), first):
            if held[index] == validation:
                yield key, {"key": key, "text": text}
                count -= 1
                if not count:
                    return


@dataclasses.dataclass(eq=False, kw_only=True)
class EmbeddedConfig(tfds.core.BuilderConfig):
    """Options of `EmbeddedDocs`."""

    validation_fraction: float = 0.05


class EmbeddedDocs(_SplitBuilder, skip_registration=True):
    """CPython's embedded documentation (`pydoc_data.topics`), one document per topic."""

    def _documents(self, start: tuple[int, ...] | None = None) -> Iterator[tuple[tuple[int, ...], str, str]]:
        from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

        first = start[0] if start else 0
        for index, (key, text) in enumerate(sorted(topics.items())):
            if index >= first:
                yield (index, 0, 0, 0), key, text


def embedded_config(validation_fraction: float = 0.05) -> EmbeddedConfig:
    """The config of `EmbeddedDocs`; its name carries the Python version (the topics differ)."""
    _check_fraction(validation_fraction)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return EmbeddedConfig(name=f"python{python}-holdout{validation_fraction:g}", version=_VERSION)


@dataclasses.dataclass(eq=False, kw_only=True)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Options of `TextFiles`: the files and how to cut them into documents."""

    paths: tuple[str, ...] = ()
    text_key: str = "text"
    split_paragraphs: bool = False
    validation_fraction: float = 0.05


class TextFiles(_SplitBuilder, skip_registration=True):
    """Local .txt / .jsonl files, one example per document."""

    def _documents(self, start: tuple[int, ...] | None = None) -> Iterator[tuple[tuple[int, ...], str, str]]:
        config = self.builder_config
        first_path, *start_in_file = start or (0,)
        for path_index in range(first_path, len(config.paths)):
            documents = iter_documents(config.paths[path_index], text_key=config.text_key,
                                       split_paragraphs=config.split_paragraphs,
                                       start=tuple(start_in_file) if path_index == first_path and start else None)
            for position, key, text in documents:
                yield (path_index, *position), key, text

    def _check_documents(self, count: int) -> None:
        if count < 2:
            raise ValueError(
                f"the 'files:' source {list(self.builder_config.paths)} holds {count} document; a train/validation "
                "split needs at least 2: add files, or set split_paragraphs=True to cut .txt files at blank lines"
            )


def text_files_config(
    paths: Sequence[str],
    *,
    text_key: str = "text",
    split_paragraphs: bool = False,
    validation_fraction: float = 0.05,
) -> TextFilesConfig:
    """The config of `TextFiles` for `paths`, checked to exist and to have a known suffix.

    The config name is a hash of the absolute paths, their sizes and modification times
    and the options, so an edited file gets a fresh build instead of a stale cache.
    """
    _check_fraction(validation_fraction)
    if not paths:
        raise ValueError("the files source names no file; give it as 'files:PATH[,PATH...]'")
    paths = tuple(os.path.abspath(os.path.expanduser(p)) for p in paths)
    fingerprint = [text_key, split_paragraphs, validation_fraction]
    for path in paths:
        _check_suffix(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file {path} does not exist; fix the path in the 'files:' source")
        stat = os.stat(path)
        if stat.st_size == 0:
            raise ValueError(f"text file {path} is empty; remove it from the 'files:' source or give it text")
        fingerprint += [path, stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16]
    return TextFilesConfig(
        name=f"files-{digest}",
        version=_VERSION,
        paths=paths,
        text_key=text_key,
        split_paragraphs=split_paragraphs,
        validation_fraction=validation_fraction,
    )


def _check_suffix(path: str) -> None:
    if not path.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise ValueError(
            f"text file {path} has an unknown suffix; accepted: {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} "
            "(.txt: plain text, .jsonl: one JSON object per line)"
        )


def iter_lines(path: str, start: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, int, str]]:
    """Streams the lines of `path`, split on `\n` only, decoded as UTF-8.

    Only `\n` ends a line: `str.splitlines` would also split on U+2028, U+2029, U+0085 and
    other separators that valid text (and valid JSON strings) may hold.

    Args:
        path: the file.
        start: (byte offset, its line number) of the first line to read.

    Yields:
        (byte offset, line number, the line with its ending). A byte that is not UTF-8
        raises a ValueError naming its offset in the file.
    """
    with open(path, "rb") as f:
        f.seek(start[0])
        yield from decode_lines(f, path, start)


def decode_lines(raw_lines: Iterable[bytes], path: str, start: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, int, str]]:
    """`iter_lines` over lines already read as bytes (e.g. from a decompressing stream).

    Args:
        raw_lines: the file's lines, each ending in `\n` but perhaps the last.
        path: the file's name, for errors.
        start: (byte offset, line number) of the first of `raw_lines`.

    Yields:
        (byte offset, line number, the decoded line); a byte that is not UTF-8 raises a
        ValueError naming its offset.
    """
    offset, line_number = start
    for raw in raw_lines:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = raw[e.start : e.start + 4]
            raise ValueError(
                f"text file {path} is not valid UTF-8: byte offset {offset + e.start} ({bad!r}...); "
                "re-encode it as UTF-8 (for example `iconv -f latin1 -t utf-8`)"
            ) from None
        yield offset, line_number, line
        offset, line_number = offset + len(raw), line_number + 1


def iter_documents(
    path: str, *, text_key: str = "text", split_paragraphs: bool = False, start: tuple | None = None
) -> Iterator[tuple[tuple, str, str]]:
    """Streams the documents of one .txt or .jsonl file, line by line.

    Args:
        path: a .txt file (one document, or one per paragraph) or a .jsonl file (one
            document per line).
        text_key: the key of the text in each JSONL object.
        split_paragraphs: cut a .txt file on blank (whitespace-only) lines, one document
            per paragraph.
        start: the position of a document yielded before, to read on from it (None: the start).

    Yields:
        (position: (byte offset, line number, paragraph index), key, text) of each document
        in file order; the key is `PATH#PARAGRAPH`
        or `PATH:LINE`. Empty paragraphs and empty JSONL texts are left out; a file with no
        text is an error (raised once the whole file has been read).
    """
    _check_suffix(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist; fix the path in the 'files:' source")
    if path.endswith(JSONL_SUFFIXES):
        documents = _jsonl_documents(path, text_key, start[:2] if start else (0, 1))
    elif split_paragraphs:
        documents = _paragraphs(path, start or (0, 1, 0))
    else:
        documents = _whole_file(path)
    count = 0
    for count, document in enumerate(documents, 1):
        yield document
    if not count and start is None:
        what = f"no text under key {text_key!r}" if path.endswith(JSONL_SUFFIXES) else "no text"
        raise ValueError(f"text file {path} holds {what}; remove it from the 'files:' source or give it text")


def read_documents(path: str, *, text_key: str = "text", split_paragraphs: bool = False) -> dict[str, str]:
    """The documents of one file as a dict key -> text, in memory (for small files and tests)."""
    documents = iter_documents(path, text_key=text_key, split_paragraphs=split_paragraphs)
    return {key: text for _, key, text in documents}


def _whole_file(path: str) -> Iterator[tuple[tuple[int, int, int], str, str]]:
    # One document is one example, so it is held whole; only its decoding streams.
    text = "".join(line for _, _, line in iter_lines(path))
    if text.strip():
        yield (0, 1, 0), f"{path}#0", text


def _paragraphs(path: str, start: tuple[int, int, int]) -> Iterator[tuple[tuple[int, int, int], str, str]]:
    offset, line_number, index = start
    for position, text in paragraphs(iter_lines(path, (offset, line_number)), index):
        yield position, f"{path}#{position[2]}", text


def paragraphs(lines: Iterable[tuple[int, int, str]], index: int = 0) -> Iterator[tuple[tuple[int, int, int], str]]:
    """Paragraphs: runs of lines between whitespace-only lines, joined by `\n` (`\r\n` too).

    Args:
        lines: (byte offset, line number, line) as `iter_lines` / `decode_lines` give them.
        index: the index of the first paragraph.

    Yields:
        ((byte offset, line number, paragraph index) of the paragraph's first line, its text).
    """
    lines_of_paragraph, position = [], None
    for offset, line_number, line in lines:
        if line.strip():
            if not lines_of_paragraph:
                position = (offset, line_number, index)
            lines_of_paragraph.append(line.removesuffix("\n").removesuffix("\r") if line.endswith("\n") else line)
        elif lines_of_paragraph:
            yield position, "\n".join(lines_of_paragraph)
            index, lines_of_paragraph = index + 1, []
    if lines_of_paragraph:
        yield position, "\n".join(lines_of_paragraph)


def _jsonl_documents(
    path: str, text_key: str, start: tuple[int, int]
) -> Iterator[tuple[tuple[int, int, int], str, str]]:
    for offset, line_number, line in iter_lines(path, start):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg}); each line of a .jsonl file is one object") from None
        if not isinstance(record, dict):
            raise TypeError(f"{where} holds a {type(record).__name__}, not a JSON object with key {text_key!r}")
        if text_key not in record:
            raise ValueError(
                f"{where} has no key {text_key!r}; its keys are {sorted(record)}. "
                "Set the data config's text_key to the key that holds the text"
            )
        value = record[text_key]
        if not isinstance(value, str):
            raise TypeError(f"{where}: {text_key!r} holds a {type(value).__name__}, not a string")
        if value.strip():
            yield (offset, line_number, 0), where, value


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Writes `builder`'s array_record files if they are not there yet; never downloads."""
    if not builder.is_prepared():
        tfds.disable_progress_bar()  # the bars are only noise in training logs
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def embedded_builder(data_dir: str | None = None, *, validation_fraction: float = 0.05) -> EmbeddedDocs:
    """The prepared `EmbeddedDocs` builder under `data_dir` (tfds's default when None)."""
    config = embedded_config(validation_fraction)
    return prepare(EmbeddedDocs(data_dir=data_dir, config=config, file_format="array_record"))


def text_files_builder(
    paths: Sequence[str],
    data_dir: str | None = None,
    *,
    text_key: str = "text",
    split_paragraphs: bool = False,
    validation_fraction: float = 0.05,
) -> TextFiles:
    """The prepared `TextFiles` builder for `paths` under `data_dir` (tfds's default when None)."""
    config = text_files_config(
        paths, text_key=text_key, split_paragraphs=split_paragraphs, validation_fraction=validation_fraction
    )
    return prepare(TextFiles(data_dir=data_dir, config=config, file_format="array_record"))
