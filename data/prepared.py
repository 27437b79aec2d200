"""A dataset written by `python -m data.prepare`, as the trainer reads it (no Beam needed).

    DIR/
      prepared.json          what this is: name, version, splits, the tokenizer's fingerprint
      tokenizer/             the tokenizer the shards were tokenized with (`load_tokenizer`)
      NAME/1.0.0/            a TFDS dataset: NAME-{train,validation}.array_record-SSSSS-of-NNNNN,
                             dataset_info.json, features.json; features {"id": Text,
                             "text": Text, "tokens": Sequence(int32)} (`tokenizer.encode(text)`)
      report.json            counters, documents and bytes per stage, throughput
      dead_letter/, dropped/ JSONL: what could not be read; what the stages dropped and why

`data.source=prepared:DIR` trains on it (`data.sources`): the text of each split, and,
when the run's tokenizer is the prepared one, the stored token ids, so that training does not
tokenize again (`token_source`). Two tokenizers are the same when their fingerprints are:
a SHA-256 of the files `Tokenizer.save` writes, which holds the vocabulary, the merges and the
special tokens, whatever path the tokenizer was loaded from.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np

PREPARED_FILE = "prepared.json"
FORMAT = "lmlab-prepared/1"
TOKENIZER_DIR = "tokenizer"
VERSION = "1.0.0"
SPLITS = ("train", "validation")


def tokenizer_fingerprint(tokenizer) -> str:
    """A SHA-256 (hex) of what `tokenizer.save` writes: equal for equal tokenizers."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save(directory)
        for root, _, files in sorted(os.walk(directory)):
            for name in sorted(files):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, directory).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
                digest.update(b"\0")
    return digest.hexdigest()


def is_prepared(directory: str) -> bool:
    """Whether `directory` holds a dataset written by `python -m data.prepare`."""
    return os.path.isfile(os.path.join(directory, PREPARED_FILE))


def read_manifest(directory: str) -> dict:
    """`DIR/prepared.json`; a directory without one is an error that says what to run."""
    path = os.path.join(directory, PREPARED_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} holds no prepared dataset ({PREPARED_FILE} is missing); write one with "
            f"`python -m data.prepare --input=GLOB --output={directory} --tokenizer=PATH`")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, not {FORMAT!r}; prepare the data again "
                         "with this version of `python -m data.prepare`")
    return manifest


def dataset_dir(directory: str) -> str:
    """The TFDS dataset directory (NAME/VERSION) inside a prepared `directory`."""
    manifest = read_manifest(directory)
    return os.path.join(directory, manifest["name"], manifest["version"])


def tokenizer_path(directory: str) -> str:
    """The tokenizer a prepared dataset was tokenized with."""
    return os.path.join(directory, TOKENIZER_DIR)


def open_records(directory: str, split: str):
    """The records ({"id", "text", "tokens"}) of one split: a random-access array_record data source."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder_from_directory(dataset_dir(directory))
    if split not in builder.info.splits:
        raise ValueError(f"prepared dataset {directory} has no split {split!r}; its splits are "
                         f"{sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def check_tokenizer(directory: str, tokenizer, name: str = "the run's tokenizer") -> None:
    """Raises a ValueError naming both tokenizers when `tokenizer` is not the prepared one."""
    expected = read_manifest(directory)["tokenizer_fingerprint"]
    got = tokenizer_fingerprint(tokenizer)
    if got != expected:
        raise ValueError(
            f"data.source=prepared:{directory} was tokenized with {tokenizer_path(directory)} (fingerprint "
            f"{expected[:12]}), but {name} differs (fingerprint {got[:12]}); leave tokenizer.path empty to use "
            f"the prepared one, or prepare the data again with --tokenizer set to yours")


class TokenSource(Sequence):
    """The stored token ids of one split, each document's an int32 array (grain's source protocol)."""

    def __init__(self, directory: str, split: str):
        self._records = open_records(directory, split)
        self.name = f"prepared:{directory}[{split}] tokens"

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} is out of range for {self.name} ({len(self)} documents)")
        return np.asarray(self._records[index]["tokens"], dtype=np.int32)

    def __repr__(self) -> str:
        return f"TokenSource({self.name}, {len(self)} documents)"
