"""TFDS builders that write local text as array_record files: the embedded corpus and text files.

Both write one example per document, `{"key": str, "text": str}`, into a `train` and a
`validation` split under `data_dir`, in the array_record format, which
`tfds.data_source` / grain read with random access and without TensorFlow.

  * `EmbeddedDocs`: the English documentation CPython ships in `pydoc_data.topics`
    (79 topics, ~466 KB on Python 3.11), one document per topic. Nothing is downloaded.
  * `TextFiles`: `.txt` files (one document per file, or one per blank-line separated
    paragraph with `split_paragraphs`) and `.jsonl` files (one document per line, its
    text under `text_key`).

The validation documents are chosen by `holdout_split`: a fixed pseudo-random order (a
SHA-256 of each document key) filled greedily up to `validation_fraction` of the bytes.
"""

import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
_VERSION = tfds.core.Version("1.0.0")


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"key": tfds.features.Text(), "text": tfds.features.Text()})


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction={validation_fraction} must lie strictly between 0 and 1 "
            "(the share of bytes held out for the validation split)"
        )


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
    _check_fraction(validation_fraction)
    if len(sizes) < 2:
        raise ValueError(
            f"a train/validation split needs at least 2 documents, got {len(sizes)}; "
            "add files, or split .txt files into paragraphs with split_paragraphs=True"
        )
    order = sorted(sizes, key=lambda key: (hashlib.sha256(key.encode()).hexdigest(), key))
    budget = validation_fraction * sum(sizes.values())
    held_out, held_bytes = set(), 0
    for key in order:
        if held_bytes + sizes[key] <= budget:
            held_out.add(key)
            held_bytes += sizes[key]
    if not held_out:  # every document is larger than the budget: hold out the smallest
        held_out.add(min(order, key=lambda key: sizes[key]))
    if len(held_out) == len(sizes):  # possible only for documents of size 0
        held_out.remove(order[-1])
    return held_out


class _SplitBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes `_documents()` (key -> text) as a `train` and a `validation` split."""

    VERSION = _VERSION

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features())

    def _documents(self) -> dict[str, str]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        documents = self._documents()
        sizes = {key: len(text.encode("utf-8")) for key, text in documents.items()}
        held_out = holdout_split(sizes, self.builder_config.validation_fraction)
        train = {key: text for key, text in documents.items() if key not in held_out}
        validation = {key: text for key, text in documents.items() if key in held_out}
        return {"train": self._generate_examples(train), "validation": self._generate_examples(validation)}

    def _generate_examples(self, documents: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
        for key, text in documents.items():
            yield key, {"key": key, "text": text}


@dataclasses.dataclass(eq=False, kw_only=True)
class EmbeddedConfig(tfds.core.BuilderConfig):
    """Options of `EmbeddedDocs`."""

    validation_fraction: float = 0.05


class EmbeddedDocs(_SplitBuilder, skip_registration=True):
    """CPython's embedded documentation (`pydoc_data.topics`), one document per topic."""

    def _documents(self) -> dict[str, str]:
        from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

        return dict(sorted(topics.items()))


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

    def _documents(self) -> dict[str, str]:
        config = self.builder_config
        documents = {}
        for path in config.paths:
            documents.update(read_documents(path, text_key=config.text_key, split_paragraphs=config.split_paragraphs))
        if len(documents) < 2:
            raise ValueError(
                f"the 'files:' source {list(config.paths)} holds {len(documents)} document; a train/validation "
                "split needs at least 2: add files, or set split_paragraphs=True to cut .txt files at blank lines"
            )
        return documents


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


def read_utf8(path: str) -> str:
    """Returns the text of `path`; a clear error names the first byte that is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 4]
        raise ValueError(
            f"text file {path} is not valid UTF-8: byte offset {e.start} ({bad!r}...); "
            "re-encode it as UTF-8 (for example `iconv -f latin1 -t utf-8`)"
        ) from None


def read_documents(path: str, *, text_key: str = "text", split_paragraphs: bool = False) -> dict[str, str]:
    """Reads one .txt or .jsonl file into documents.

    Args:
        path: a .txt file (one document, or one per paragraph) or a .jsonl file (one
            document per line).
        text_key: the key of the text in each JSONL object.
        split_paragraphs: cut a .txt file on blank lines, one document per paragraph.

    Returns:
        document key (`PATH#PARAGRAPH` or `PATH:LINE`) -> text, in file order. Empty
        paragraphs and empty JSONL texts are left out; a file with no text is an error.
    """
    _check_suffix(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist; fix the path in the 'files:' source")
    text = read_utf8(path)
    if path.endswith(JSONL_SUFFIXES):
        documents = _jsonl_documents(path, text, text_key)
    elif split_paragraphs:
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
        documents = {f"{path}#{i}": p for i, p in enumerate(paragraphs) if p.strip()}
    else:
        documents = {f"{path}#0": text} if text.strip() else {}
    if not documents:
        what = f"no text under key {text_key!r}" if path.endswith(JSONL_SUFFIXES) else "no text"
        raise ValueError(f"text file {path} holds {what}; remove it from the 'files:' source or give it text")
    return documents


def _jsonl_documents(path: str, text: str, text_key: str) -> dict[str, str]:
    documents = {}
    for line_number, line in enumerate(text.splitlines(), 1):
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
            documents[where] = value
    return documents


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Writes `builder`'s array_record files if they are not there yet; never downloads."""
    if not builder.is_prepared():
        tfds.disable_progress_bar()  # a few small files: the bars are only noise
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
