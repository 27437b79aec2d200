"""Text sources named by a spec string, opened as random-access sequences of documents.

Accepted specs (`SOURCE_FORMS`):
  * `embedded`: CPython's embedded documentation (`builders.EmbeddedDocs`).
  * `files:PATH[,PATH...]`: local .txt / .jsonl files (`builders.TextFiles`); a PATH may
    be a glob such as `/data/*.jsonl`.
  * `tfds:NAME[:CONFIG]`: a registered TFDS dataset already prepared in the array_record
    format under `data_dir`; its text is the feature `text_key`.
  * `prepared:DIR`: a dataset written by `python -m data.prepare` (`data.prepared`): its
    `train` and `validation` splits; the pipeline trains on its stored token ids when the
    run's tokenizer is the one it was prepared with.

Every source reads through `tfds.data_source`-style array_record readers, so TensorFlow
is never needed and nothing is downloaded.
"""

import dataclasses
import glob
import os
from collections.abc import Sequence

import tensorflow_datasets as tfds

from data import builders, prepared

SOURCE_FORMS = (
    "'embedded' (CPython's documentation), "
    "'files:PATH[,PATH...]' (.txt or .jsonl files, globs allowed), "
    "'tfds:NAME[:CONFIG]' (a TFDS dataset prepared as array_record under data_dir), "
    "'prepared:DIR' (written by `python -m data.prepare`)"
)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec: `kind` is 'embedded', 'files', 'tfds' or 'prepared' (`paths` = (DIR,))."""

    kind: str
    paths: tuple[str, ...] = ()
    tfds_name: str = ""


def parse_source(spec: str) -> SourceSpec:
    """Parses a source spec string; see `SOURCE_FORMS` for the accepted forms."""
    kind, _, rest = spec.partition(":")
    if spec == "embedded":
        return SourceSpec("embedded")
    if kind == "files" and rest:
        return SourceSpec("files", paths=_expand_paths(rest))
    if kind == "tfds" and rest and rest.count(":") <= 1 and all(rest.split(":")):
        return SourceSpec("tfds", tfds_name=rest.replace(":", "/"))
    if kind == "prepared" and rest:
        return SourceSpec("prepared", paths=(os.path.expanduser(rest),))
    raise ValueError(f"unknown data source {spec!r}; accepted forms: {SOURCE_FORMS}")


def _expand_paths(paths: str) -> tuple[str, ...]:
    expanded = []
    for path in (p.strip() for p in paths.split(",")):
        if not path:
            continue
        if glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise FileNotFoundError(f"the pattern {path!r} of the 'files:' source matches no file")
            expanded += matches
        else:
            expanded.append(path)
    return tuple(expanded)


class TextSource(Sequence[str]):
    """Documents of one split as a random-access sequence of `str` (grain's source protocol)."""

    def __init__(self, records: Sequence[dict], text_key: str, name: str):
        self._records = records
        self._text_key = text_key
        self.name = name

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            # Sequence iteration stops at IndexError, which not every data source raises.
            raise IndexError(f"document {index} is out of range for {self!r}")
        text = self._records[index][self._text_key]
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)

    def __repr__(self) -> str:
        return f"TextSource({self.name}, {len(self)} documents)"


def open_split(
    spec: str,
    split: str,
    *,
    data_dir: str | None = None,
    text_key: str = "text",
    split_paragraphs: bool = False,
    validation_fraction: float = 0.05,
) -> TextSource:
    """Opens one split of a source, building its array_record files first if needed.

    Args:
        spec: the source spec (see `SOURCE_FORMS`).
        split: the split to read ('train' or 'validation' for embedded, files and prepared
            sources; any split of the TFDS dataset, slices such as 'train[:10%]' included).
        data_dir: where the array_record files live (tfds's default when None).
        text_key: the JSONL key of the text (files source) or the TFDS text feature.
        split_paragraphs: one document per blank-line separated paragraph of a .txt file.
        validation_fraction: share of bytes held out as 'validation' (embedded, files).

    Returns:
        The split's documents as a `TextSource`.
    """
    source = parse_source(spec)
    if source.kind == "tfds":
        return _open_tfds(source.tfds_name, split, data_dir=data_dir, text_key=text_key)
    if source.kind == "prepared":
        return TextSource(prepared.open_records(source.paths[0], split), "text", f"{spec}[{split}]")
    if source.kind == "embedded":
        builder = builders.embedded_builder(data_dir, validation_fraction=validation_fraction)
    else:
        builder = builders.text_files_builder(
            source.paths,
            data_dir,
            text_key=text_key,
            split_paragraphs=split_paragraphs,
            validation_fraction=validation_fraction,
        )
    if split not in builder.info.splits:
        raise ValueError(f"source {spec!r} has no split {split!r}; its splits are {sorted(builder.info.splits)}")
    return TextSource(builder.as_data_source(split=split), "text", f"{spec}[{split}]")


def _open_tfds(name: str, split: str, *, data_dir: str | None, text_key: str) -> TextSource:
    try:
        records = tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"'tfds:{name}' names no registered TFDS dataset; `tfds.list_builders()` lists them "
            "(a config goes after a colon: 'tfds:NAME:CONFIG')"
        ) from None
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
        # tfds says "random access ... not supported" both for a dataset that is missing
        # and for one prepared as tfrecord.
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in the array_record format under data_dir={data_dir!r}. "
            f"Prepare it once on a machine with network access: `tfds build {name} "
            f"--file_format=array_record --data_dir=DATA_DIR`, then point data_dir there. (tfds: {e})"
        ) from None
    features = records.dataset_info.features
    if text_key not in features:
        raise ValueError(
            f"TFDS dataset {name!r} has no feature {text_key!r}; its features are {sorted(features.keys())}. "
            "Set the data config's text_key to the text feature"
        )
    return TextSource(records, text_key, f"tfds:{name}[{split}]")
