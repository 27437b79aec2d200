"""The last stage: tokenize, split by hash, write array_record shards and a TFDS dataset info.

    Documents -> TokenizeFn (the tokenizer loaded once per worker, in `setup`)
              -> ((split, shard), (id, text, ids))  by a hash of the id
              -> GroupByKey -> WriteShardFn: each shard's records sorted by id, one
                 array_record file per (split, shard), written by exactly one worker
    then, once, by the launching process (`finish_dataset`): empty files for shards no
    document reached, and `dataset_info.json` / `features.json` (`tfds.folder_dataset`).

Split and shard are functions of the document id alone: with h = SHA-256(id), a document
is in `validation` when int(h[0:8]) / 2^64 < validation_fraction, and in shard
int(h[8:16]) mod num_shards of its split. So the output does not depend on the runner, the
number of workers or the order documents arrive in: the shard files are byte for byte the
same on 1 and on 2 workers. A shard's records are held in memory by its writer to be sorted:
choose `--num_shards` so that a shard is a few hundred MB at most.

Records are TFDS examples of the features {"id": Text, "text": Text, "tokens": Sequence(int32)}
(the id traces a record to its file and line; tokens are `tokenizer.encode(text)`), serialized
as `FeaturesDict.serialize_example` does but with the feature map in key order (`serialize`;
no TensorFlow needed), so `tfds.builder_from_directory`,
`tfds.data_source(NAME, data_dir=DIR)` and grain read them. Counters (namespace
`data.prepare.write`): `documents.<split>`, `tokens.<split>`, `bytes.<split>`, `shards_written`.
"""

import hashlib
import os

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from data.prepare.stage import Document
from data.prepared import SPLITS

NAMESPACE = "data.prepare.write"
FILE_FORMAT = "array_record"
# One record per chunk: the readers' random access to a record reads only that record.
WRITER_OPTIONS = "group_size:1"


def features():
    """The TFDS features of a prepared record."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text(),
                                       "tokens": tfds.features.Sequence(np.int32)})


def serialize(features_dict, record: dict) -> bytes:
    """A record as tf.train.Example bytes, its feature map in key order.

    `FeaturesDict.serialize_example` writes the map in the order of its hash table, which
    differs between processes (the same record gave different bytes on 1 and 2 workers);
    protobuf's deterministic serialization sorts map keys.
    """
    encoded = features_dict.encode_example(record)
    return features_dict._example_serializer.get_tf_example(encoded).SerializeToString(  # pylint: disable=protected-access
        deterministic=True)


def split_and_shard(document_id: str, validation_fraction: float, num_shards: int) -> tuple[str, int]:
    """(split, shard) of a document: a function of its id alone (see the module docstring)."""
    digest = hashlib.sha256(document_id.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    split = "validation" if position < validation_fraction else "train"
    return split, int.from_bytes(digest[8:16], "big") % num_shards


def shard_path(dataset_dir: str, name: str, split: str, shard: int, num_shards: int) -> str:
    """TFDS's default file name of a shard: NAME-SPLIT.array_record-SSSSS-of-NNNNN."""
    return os.path.join(dataset_dir, f"{name}-{split}.{FILE_FORMAT}-{shard:05d}-of-{num_shards:05d}")


class TokenizeFn(beam.DoFn):
    """Document -> ((split, shard), (id, text, token ids as int32))."""

    def __init__(self, tokenizer_path: str, validation_fraction: float, num_shards: int):
        self._tokenizer_path = tokenizer_path
        self._validation_fraction = validation_fraction
        self._num_shards = num_shards
        self._tokenizer = None
        self._counters = {}

    def setup(self):
        from data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

        self._tokenizer = load_tokenizer(self._tokenizer_path)

    def _count(self, name: str, amount: int) -> None:
        if name not in self._counters:
            self._counters[name] = Metrics.counter(NAMESPACE, name)
        self._counters[name].inc(amount)

    def process(self, document: Document):
        split, shard = split_and_shard(document.id, self._validation_fraction, self._num_shards)
        ids = np.asarray(self._tokenizer.encode(document.text), dtype=np.int32)
        self._count(f"documents.{split}", 1)
        self._count(f"tokens.{split}", len(ids))
        self._count(f"bytes.{split}", len(document.text.encode("utf-8")))
        yield (split, shard), (document.id, document.text, ids)


class WriteShardFn(beam.DoFn):
    """((split, shard), records) -> the shard's array_record file, records sorted by id."""

    def __init__(self, dataset_dir: str, name: str, num_shards: int):
        self._dataset_dir = dataset_dir
        self._name = name
        self._num_shards = num_shards
        self._features = None
        self._shards = Metrics.counter(NAMESPACE, "shards_written")

    def setup(self):
        self._features = features()

    def process(self, keyed):
        from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

        (split, shard), records = keyed
        path = shard_path(self._dataset_dir, self._name, split, shard, self._num_shards)
        partial = f"{path}.partial"  # a retried bundle rewrites it; the rename makes it whole
        writer = ArrayRecordWriter(partial, WRITER_OPTIONS)
        count = 0
        for document_id, text, ids in sorted(records, key=lambda record: record[0]):
            writer.write(serialize(self._features, {"id": document_id, "text": text, "tokens": ids}))
            count += 1
        writer.close()
        os.replace(partial, path)
        self._shards.inc()
        yield split, shard, count


class WriteShards(beam.PTransform):
    """Documents -> array_record shards under `dataset_dir`; outputs (split, shard, records)."""

    def __init__(self, dataset_dir: str, name: str, tokenizer_path: str, *, validation_fraction: float,
                 num_shards: int):
        super().__init__(label="write")
        self._dataset_dir = dataset_dir
        self._name = name
        self._tokenizer_path = tokenizer_path
        self._validation_fraction = validation_fraction
        self._num_shards = num_shards

    def expand(self, documents):
        return (documents
                | "tokenize" >> beam.ParDo(TokenizeFn(self._tokenizer_path, self._validation_fraction,
                                                      self._num_shards))
                | "by shard" >> beam.GroupByKey()
                | "write shards" >> beam.ParDo(WriteShardFn(self._dataset_dir, self._name, self._num_shards)))


def finish_dataset(dataset_dir: str, name: str, num_shards: int, version: str) -> dict[str, list[int]]:
    """Fills in the shards no document reached and writes the TFDS metadata; once, after the run.

    Returns:
        The records of each shard, per split.

    Raises:
        ValueError: a split that holds no document (tfds cannot open an empty split).
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from array_record.python.array_record_module import (  # pylint: disable=g-import-not-at-top
        ArrayRecordReader, ArrayRecordWriter)

    lengths, split_infos = {}, []
    for split in SPLITS:
        lengths[split], num_bytes = [], 0
        for shard in range(num_shards):
            path = shard_path(dataset_dir, name, split, shard, num_shards)
            if not os.path.exists(path):
                ArrayRecordWriter(path, WRITER_OPTIONS).close()
            reader = ArrayRecordReader(path)
            lengths[split].append(reader.num_records())
            reader.close()
            num_bytes += os.path.getsize(path)
        if not sum(lengths[split]):
            raise ValueError(
                f"the {split} split is empty: no document that the stages kept hashed into it; give more input, "
                "or a larger --validation_fraction (or look at report.json for what the stages dropped)")
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths[split], num_bytes=num_bytes))
    tfds.folder_dataset.write_metadata(data_dir=dataset_dir, features=features(), split_infos=split_infos,
                                       version=version, check_data=False,
                                       description="Written by `python -m data.prepare` (lmlab).")
    return lengths
