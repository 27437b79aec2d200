"""Grain pipelines for pretraining: documents -> tokens -> packed rows -> per-process batches.

    train: source[train] -> shuffle(seed) -> repeat(num_epochs) -> tokenize -> PackedRows
           -> window shuffle of rows -> batch(global batch_size) -> this process's rows
    eval:  source[validation] (the text eval_documents selects) -> tokenize -> PackedRows
           -> batch, last one padded -> this process's rows (each pass re-reads and re-tokenizes)

A `prepared:DIR` source (`data.prepared`) trains on the token ids stored at preparation when
the tokenizer is the one it was prepared with (checked by fingerprint; another tokenizer is an
error naming both), instead of tokenizing again; evaluation reads its validation text like any
other source, so bits per byte measure exactly that text.

A batch is a dict of int32 arrays of shape [batch_size / process_count, seq_len]: `inputs`,
`targets`, `segment_ids`, `positions`, `loss_mask` (see `data.packing`). Every process
builds the same global batch and keeps its own contiguous slice of rows, so the slices of
all processes together are exactly the single-process batch. The stream is a pure function
of the config: the same seed gives the same batches, and `iterator.get_state()` (a
JSON-serialisable dict) restored with `set_state` continues it exactly.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import jax
import numpy as np

from data import packing, prepared, sources


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it into batches.

    Attributes:
        source: 'embedded', 'files:PATH[,PATH...]', 'tfds:NAME[:CONFIG]' or 'prepared:DIR'
            (see `data.sources.SOURCE_FORMS`; a prepared source has its own splits and tokens:
            text_key, split_paragraphs and validation_fraction do not apply to it).
        text_key: the JSONL key of the text (files) or the text feature (tfds).
        split_paragraphs: one document per blank-line separated paragraph of a .txt file.
        seq_len: tokens per row.
        batch_size: rows per global batch, over all processes.
        seed: the shuffle seed; each epoch is shuffled differently from it.
        shuffle: shuffle the training documents, and the packed rows within windows of
            `shuffle_window` rows, so that a batch mixes documents (off: source order).
        shuffle_window: rows per shuffle window (a long document fills many rows in a
            row; without this a batch would be consecutive pieces of one document).
        data_dir: where array_record files are written and read (tfds's default when None).
        validation_fraction: share of bytes held out as validation (embedded, files).
        train_split: the split trained on ('train'; any TFDS split for tfds sources).
        eval_split: the split evaluated on ('validation'; any TFDS split for tfds sources).
        num_epochs: passes over the training documents; None repeats forever.
        worker_count: grain worker processes; 0 reads in the main process. Workers need
            absl flags parsed first, and change the (still deterministic) stream.
    """

    source: str = "embedded"
    text_key: str = "text"
    split_paragraphs: bool = False
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    shuffle_window: int = 1024
    data_dir: str | None = None
    validation_fraction: float = 0.05
    train_split: str = "train"
    eval_split: str = "validation"
    num_epochs: int | None = None
    worker_count: int = 0


class RawText(NamedTuple):
    """The raw text of a split, for bits-per-byte and compression baselines."""

    documents: list[str]
    num_bytes: int  # total UTF-8 bytes of `documents`


def open_split(config: DataConfig, split: str) -> sources.TextSource:
    """The documents of `split` of the config's source (built on first use)."""
    return sources.open_split(
        config.source,
        split,
        data_dir=config.data_dir,
        text_key=config.text_key,
        split_paragraphs=config.split_paragraphs,
        validation_fraction=config.validation_fraction,
    )


def process_rows(batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """The rows of a global batch that belong to one process (jax's own by default)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"global batch_size={batch_size} is not divisible by process_count={process_count}; "
            f"use a multiple of {process_count}"
        )
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def _tokenize(document: str | np.ndarray, *, tokenizer: Any, start_id: int, eos_id: int) -> dict[str, np.ndarray]:
    """A document's (inputs, targets); a prepared source's documents are token ids already."""
    ids = document.tolist() if isinstance(document, np.ndarray) else tokenizer.encode(document)
    return packing.document_pairs(ids, start_id=start_id, eos_id=eos_id)


def train_documents(config: DataConfig, tokenizer: Any) -> Sequence:
    """The training split as grain reads it: texts, or a prepared source's stored token ids
    (after checking that `tokenizer` is the one they were made with)."""
    source = sources.parse_source(config.source)
    if source.kind != "prepared":
        return open_split(config, config.train_split)
    prepared.check_tokenizer(source.paths[0], tokenizer)
    return prepared.TokenSource(source.paths[0], config.train_split)


def _take_rows(batch: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    return {name: value[rows] for name, value in batch.items()}


def _pad_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a short last batch with all-zero rows (loss_mask 0), so shapes never change."""
    missing = batch_size - len(batch["inputs"])
    return {name: np.pad(value, ((0, missing), (0, 0))) for name, value in batch.items()}


def _packed_rows(config: DataConfig, documents: grain.MapDataset, tokenizer: Any) -> grain.IterDataset:
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_id; packing documents needs one to mark their ends")
    start_id = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
    tokenize = functools.partial(_tokenize, tokenizer=tokenizer, start_id=start_id, eos_id=tokenizer.eos_id)
    return packing.PackedRows(documents.map(tokenize).to_iter_dataset(), config.seq_len)


def _finish(config: DataConfig, batches: grain.IterDataset, rows: slice) -> grain.IterDataset:
    batches = batches.map(functools.partial(_take_rows, rows=rows))
    if config.worker_count > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return batches


def train_dataset(
    config: DataConfig,
    tokenizer: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The training batches of this process: packed, shuffled, batched, sliced.

    Args:
        config: the data config.
        tokenizer: anything with `encode(text) -> list[int]`, `eos_id` and `bos_id`
            (see `data.tokenizer.Tokenizer`).
        process_index, process_count: this process and how many there are; jax's by
            default, parameters so tests can simulate several hosts.

    Returns:
        A `grain.IterDataset`; `iter()` of it gives an iterator with `get_state()` /
        `set_state(state)`. Infinite when `config.num_epochs` is None; otherwise the last
        partial global batch is dropped.
    """
    rows = process_rows(config.batch_size, process_index, process_count)
    documents = grain.MapDataset.source(train_documents(config, tokenizer))
    if config.shuffle:
        documents = documents.shuffle(seed=config.seed)
    documents = documents.repeat(config.num_epochs)
    packed = _packed_rows(config, documents, tokenizer)
    if config.shuffle and config.shuffle_window > 1:
        packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=config.shuffle_window,
                                                             seed=config.seed)
    batches = packed.batch(config.batch_size, drop_remainder=True)
    return _finish(config, batches, rows)


def train_iterator(
    config: DataConfig,
    tokenizer: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """`iter(train_dataset(...))`: the checkpointable iterator of training batches."""
    return iter(train_dataset(config, tokenizer, process_index=process_index, process_count=process_count))


class EvalDocuments(NamedTuple):
    """Which validation text an evaluation covers: leading documents whole, then the head of one more."""

    whole: int  # the first `whole` documents of the eval split
    head: str = ""  # the longest head of the next document whose targets still fit ("": none)


class _EvalSource(Sequence):
    """The first `whole` documents of a source, then `head` as one more document."""

    def __init__(self, source: Sequence[str], selection: EvalDocuments):
        self._source, self._selection = source, selection

    def __len__(self) -> int:
        return self._selection.whole + bool(self._selection.head)

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} is out of range for {len(self)} evaluated documents")
        return self._source[index] if index < self._selection.whole else self._selection.head


def _head_that_fits(text: str, tokenizer: Any, pairs: int) -> str:
    """The longest head of `text` whose [start] + ids + [eos] has at most `pairs` targets.

    A search over characters that encodes heads of at most about twice the answer's length,
    however long the document.
    """

    def fits(length: int) -> bool:
        return len(tokenizer.encode(text[:length])) + 1 <= pairs

    low, high = 0, len(text)  # text[:low] fits, text[:high + 1] does not (checked by the caller)
    probe = max(pairs, 1)
    while probe < high:  # gallop up from `pairs` characters, then bisect
        if not fits(probe):
            high = probe - 1
            break
        low, probe = probe, 2 * probe
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return text[:low]


def eval_documents(config: DataConfig, tokenizer: Any, max_batches: int = 0) -> EvalDocuments:
    """The validation text an evaluation of `max_batches` global batches covers (all when 0).

    The leading documents whose every target fits, whole, then the longest head of the next
    one (cut between characters, evaluated as a document of its own) that fills the rest: so
    the evaluated tokens are exactly those of that text, and bits per byte and compression
    baselines measure exactly the text evaluated. Tokenizes only that text (and one more
    document).
    """
    source = open_split(config, config.eval_split)
    if max_batches <= 0:
        return EvalDocuments(len(source))
    budget, used = max_batches * config.batch_size * config.seq_len, 0
    for whole in range(len(source)):
        pairs = len(tokenizer.encode(source[whole])) + 1  # [start] + text + [eos], shifted
        if used + pairs > budget:
            return EvalDocuments(whole, _head_that_fits(source[whole], tokenizer, budget - used))
        used += pairs
    return EvalDocuments(len(source))


def eval_dataset(
    config: DataConfig,
    tokenizer: Any,
    *,
    documents: EvalDocuments | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The validation batches of this process: one pass, in source order, never shuffled.

    Every target of the validation text `documents` selects (all of the split when None; see
    `eval_documents`) is a target exactly once over all processes; the last global batch is
    padded with rows whose `loss_mask` is 0. Each `iter()` starts again from the beginning,
    reading and tokenizing as it goes: nothing is held between evaluations. Other arguments
    are those of `train_dataset`.
    """
    rows = process_rows(config.batch_size, process_index, process_count)
    source = open_split(config, config.eval_split)
    source = source if documents is None else _EvalSource(source, documents)
    batches = _packed_rows(config, grain.MapDataset.source(source), tokenizer)
    batches = batches.batch(config.batch_size, drop_remainder=False)
    batches = batches.map(functools.partial(_pad_rows, batch_size=config.batch_size))
    return _finish(config, batches, rows)


def eval_batches(
    config: DataConfig,
    tokenizer: Any,
    *,
    documents: EvalDocuments | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """`list(eval_dataset(...))`: the validation batches of this process, in memory (for tests
    and notebooks; the trainer streams `eval_dataset`)."""
    return list(eval_dataset(config, tokenizer, documents=documents, process_index=process_index,
                             process_count=process_count))


def validation_text(config: DataConfig, documents: EvalDocuments | None = None) -> RawText:
    """The raw validation text `documents` selects (all of the eval split when None), in eval
    order, and its UTF-8 byte count.

    Bits per byte is `sum of target NLL in nats / ln(2) / num_bytes` over the same text; the
    EOS targets count as part of the text's cost, the way a compressor must code where a
    document ends.
    """
    source = open_split(config, config.eval_split)
    source = source if documents is None else _EvalSource(source, documents)
    texts = [source[i] for i in range(len(source))]
    return RawText(texts, sum(len(d.encode("utf-8")) for d in texts))
