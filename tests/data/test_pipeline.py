"""Pipeline: packed rows keep every next-token pair inside its document and hold each
token once; the stream is deterministic, resumes exactly from a JSON round-tripped state,
and splits per process into slices that make up the global batch; eval is finite and
scores exactly the validation text."""

import dataclasses
import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import packing, pipeline

EOS, BOS = 256, 257


class ByteTokenizer:
    """UTF-8 bytes as ids, plus EOS and (optionally) BOS: the `data.tokenizer` interface."""

    def __init__(self, with_bos=True):
        self.eos_id, self.bos_id, self.pad_id = EOS, BOS if with_bos else None, None
        self.vocab_size = 258

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _pairs(docs, start=BOS):
    return [packing.document_pairs(list(d), start_id=start, eos_id=EOS) for d in docs]


def _rows(docs, seq_len):
    return list(packing.PackedRows(grain.MapDataset.source(_pairs(docs)).to_iter_dataset(), seq_len))


def _segments(rows):
    """(inputs, targets, positions) of each piece of a document, row by row."""
    for row in rows:
        for segment in range(1, row["segment_ids"].max() + 1):
            at = row["segment_ids"] == segment
            yield row["inputs"][at], row["targets"][at], row["positions"][at]


RAGGED_DOCS = [b"a" * n for n in (0, 1, 5, 7, 8, 9, 30, 2, 16, 3)]  # around seq_len=8
RAGGED_DOCS = [bytes(range(65 + i, 65 + i + len(d))) for i, d in enumerate(RAGGED_DOCS)]


@pytest.mark.parametrize("seq_len", [1, 3, 8, 64])
def test_packed_rows_hold_each_document_pair_once_in_order(seq_len):
    rows = _rows(RAGGED_DOCS, seq_len)
    # Reference: each document is [BOS, bytes..., EOS]; its pairs are (ids[i], ids[i+1]).
    framed = [[BOS, *doc, EOS] for doc in RAGGED_DOCS]
    all_inputs = np.concatenate([row["inputs"][row["loss_mask"] == 1] for row in rows])
    all_targets = np.concatenate([row["targets"][row["loss_mask"] == 1] for row in rows])
    np.testing.assert_array_equal(all_inputs, np.concatenate([ids[:-1] for ids in framed]))
    np.testing.assert_array_equal(all_targets, np.concatenate([ids[1:] for ids in framed]))
    for row in rows[:-1]:  # only the last row may have padding
        assert row["loss_mask"].all()
    for row in rows:
        assert {name: value.shape for name, value in row.items()} == {name: (seq_len,) for name in packing.ROW_FEATURES}
        np.testing.assert_array_equal(row["loss_mask"], row["segment_ids"] > 0)
        pad = row["segment_ids"] == 0
        assert not row["inputs"][pad].any() and not row["targets"][pad].any() and not row["positions"][pad].any()


def test_targets_are_next_tokens_of_the_same_document_and_positions_restart():
    rows = _rows(RAGGED_DOCS, 8)
    for inputs, targets, positions in _segments(rows):
        # Inside a piece, each target is the next piece input: no pair crosses a boundary.
        np.testing.assert_array_equal(targets[:-1], inputs[1:])
        np.testing.assert_array_equal(positions, np.arange(len(positions)))
        assert EOS not in inputs and BOS not in targets  # EOS ends, BOS starts, one document
    for row in rows:
        segments = row["segment_ids"][row["segment_ids"] > 0]
        np.testing.assert_array_equal(np.unique(segments), np.arange(1, segments.max() + 1))
        assert (np.diff(segments) >= 0).all()


def test_tokenizer_without_bos_starts_documents_with_eos():
    (pairs,) = _pairs([b"hi"], start=EOS)
    np.testing.assert_array_equal(pairs["inputs"], [EOS, ord("h"), ord("i")])
    np.testing.assert_array_equal(pairs["targets"], [ord("h"), ord("i"), EOS])


@pytest.fixture(scope="module")
def files_config(tmp_path_factory):
    """A small files source: 40 paragraphs of varied length, some multi-byte."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "naïve", "café", "→", "数据"]
    paragraphs = [" ".join(rng.choice(words, size=rng.integers(1, 25))) for _ in range(40)]
    (root / "corpus.txt").write_text("\n\n".join(paragraphs))
    return pipeline.DataConfig(
        source=f"files:{root / 'corpus.txt'}",
        split_paragraphs=True,
        seq_len=16,
        batch_size=4,
        seed=3,
        data_dir=str(root / "tfds"),
        validation_fraction=0.2,
    )


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_embedded_epoch_unshuffled_holds_every_training_token_once(tmp_path):
    config = pipeline.DataConfig(
        source="embedded", seq_len=256, batch_size=1, shuffle=False, num_epochs=1, data_dir=str(tmp_path)
    )
    documents = list(pipeline.open_split(config, "train"))
    batches = list(pipeline.train_dataset(config, ByteTokenizer(), process_index=0, process_count=1))
    targets = np.concatenate([b["targets"][b["loss_mask"] == 1] for b in batches])
    expected = np.concatenate([[*doc.encode("utf-8"), EOS] for doc in documents])
    np.testing.assert_array_equal(targets, expected)
    assert len(documents) > 60 and batches[0]["inputs"].shape == (1, 256)


def test_same_seed_same_batches_other_seed_other_batches(files_config):
    tokenizer = ByteTokenizer()
    first = _take(pipeline.train_iterator(files_config, tokenizer, process_index=0, process_count=1), 6)
    again = _take(pipeline.train_iterator(files_config, tokenizer, process_index=0, process_count=1), 6)
    _assert_same_batches(first, again)
    reseeded = dataclasses.replace(files_config, seed=files_config.seed + 1)
    other = _take(pipeline.train_iterator(reseeded, tokenizer, process_index=0, process_count=1), 6)
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


def test_each_epoch_is_a_new_shuffle_of_all_training_documents(files_config):
    # Rows not window-shuffled, so that documents read back in order.
    config = dataclasses.replace(files_config, batch_size=1, num_epochs=2, shuffle_window=1)
    tokenizer = ByteTokenizer()
    rows = list(pipeline.train_dataset(config, tokenizer, process_index=0, process_count=1))
    targets = np.concatenate([row["targets"][row["loss_mask"] == 1] for row in rows])
    texts = [tokenizer.decode(piece) for piece in np.split(targets, np.flatnonzero(targets == EOS) + 1)[:-1]]
    documents = list(pipeline.open_split(config, "train"))
    first, second = texts[: len(documents)], texts[len(documents) :]
    assert sorted(first) == sorted(second) == sorted(documents)
    assert first != second and first != documents


def test_row_window_shuffle_reorders_the_same_rows(files_config):
    """Window shuffling mixes packed rows across documents without losing or repeating any."""
    tokenizer = ByteTokenizer()

    def rows(window):
        config = dataclasses.replace(files_config, batch_size=1, num_epochs=1, shuffle_window=window)
        return [tuple(b["inputs"][0]) + tuple(b["segment_ids"][0])
                for b in pipeline.train_dataset(config, tokenizer, process_index=0, process_count=1)]

    in_order, shuffled = rows(1), rows(8)
    assert sorted(in_order) == sorted(shuffled)
    assert in_order != shuffled


def test_resume_from_json_state_continues_the_same_stream(files_config):
    tokenizer = ByteTokenizer()
    iterator = pipeline.train_iterator(files_config, tokenizer, process_index=0, process_count=1)
    _take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 5)
    restored = pipeline.train_iterator(files_config, tokenizer, process_index=0, process_count=1)
    restored.set_state(state)
    _assert_same_batches(_take(restored, 5), expected)


def test_processes_get_disjoint_slices_that_make_up_the_global_batch(files_config):
    tokenizer = ByteTokenizer()
    whole = _take(pipeline.train_iterator(files_config, tokenizer, process_index=0, process_count=1), 4)
    halves = [
        _take(pipeline.train_iterator(files_config, tokenizer, process_index=i, process_count=2), 4) for i in range(2)
    ]
    for step, batch in enumerate(whole):
        first, second = halves[0][step], halves[1][step]
        assert first["inputs"].shape == (files_config.batch_size // 2, files_config.seq_len)
        assert not np.array_equal(first["inputs"], second["inputs"])
        for name in batch:
            np.testing.assert_array_equal(np.concatenate([first[name], second[name]]), batch[name])
    with pytest.raises(ValueError, match=r"global batch_size=4 is not divisible by process_count=3"):
        pipeline.train_iterator(files_config, tokenizer, process_index=0, process_count=3)


def test_eval_batches_score_exactly_the_validation_text(files_config):
    tokenizer = ByteTokenizer()
    raw = pipeline.validation_text(files_config)
    batches = pipeline.eval_batches(files_config, tokenizer, process_index=0, process_count=1)
    assert all(b["inputs"].shape == (files_config.batch_size, files_config.seq_len) for b in batches)
    targets = np.concatenate([b["targets"][b["loss_mask"] == 1].ravel() for b in batches])
    assert (targets == EOS).sum() == len(raw.documents)
    texts = [tokenizer.decode(piece) for piece in np.split(targets, np.flatnonzero(targets == EOS) + 1)[:-1]]
    assert texts == raw.documents
    assert raw.num_bytes == sum(len(d.encode("utf-8")) for d in raw.documents) == len(targets) - len(raw.documents)
    # Finite and deterministic; the process slices make up the global batches.
    _assert_same_batches(batches, pipeline.eval_batches(files_config, tokenizer, process_index=0, process_count=1))
    halves = [pipeline.eval_batches(files_config, tokenizer, process_index=i, process_count=2) for i in range(2)]
    _assert_same_batches(batches, [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)])


def test_validation_documents_are_not_trained_on(files_config):
    validation = set(pipeline.validation_text(files_config).documents)
    train = set(pipeline.open_split(files_config, "train"))
    assert validation and train and not validation & train


def test_tokenizer_without_eos_is_rejected(files_config):
    tokenizer = ByteTokenizer()
    tokenizer.eos_id = None
    with pytest.raises(ValueError, match="tokenizer has no eos_id"):
        pipeline.train_iterator(files_config, tokenizer, process_index=0, process_count=1)


def test_tfds_source_feeds_the_pipeline_under_mock_data(tmp_path):
    config = pipeline.DataConfig(
        source="tfds:imdb_reviews", seq_len=16, batch_size=2, shuffle=False, num_epochs=1,
        eval_split="test", data_dir=str(tmp_path),
    )  # fmt: skip
    with tfds.testing.mock_data(num_examples=5):
        expected = tfds.data_source("imdb_reviews", split="train", try_gcs=False)
        texts = [expected[i]["text"] for i in range(5)]
        rows = list(pipeline.train_dataset(config, ByteTokenizer(), process_index=0, process_count=1))
        assert pipeline.eval_batches(config, ByteTokenizer(), process_index=0, process_count=1)
    targets = np.concatenate([b["targets"][b["loss_mask"] == 1] for b in rows])
    # Whole batches only: the stream is a prefix of the documents' tokens.
    reference = np.concatenate([[*t.encode("utf-8"), EOS] for t in texts])
    np.testing.assert_array_equal(targets, reference[: len(targets)])
    assert len(reference) - len(targets) < config.batch_size * config.seq_len


@pytest.mark.parametrize("max_batches", [1, 2, 3])
def test_eval_of_max_batches_scores_exactly_the_text_it_selects(files_config, max_batches):
    """A bounded evaluation covers the leading documents whose targets fit, then the longest
    head of the next one that fills the rest: its targets are exactly that text's, so bits
    per byte divides their NLL by exactly its bytes."""
    tokenizer = ByteTokenizer()
    every = pipeline.validation_text(files_config).documents
    selection = pipeline.eval_documents(files_config, tokenizer, max_batches)
    raw = pipeline.validation_text(files_config, selection)
    batches = pipeline.eval_batches(files_config, tokenizer, documents=selection, process_index=0, process_count=1)
    assert isinstance(pipeline.eval_dataset(files_config, tokenizer, documents=selection), grain.IterDataset)
    budget = max_batches * files_config.batch_size * files_config.seq_len
    pairs = [len(d.encode("utf-8")) + 1 for d in every]
    whole = selection.whole
    assert sum(pairs[:whole]) <= budget < sum(pairs[: whole + 1])  # the most whole documents that fit
    assert every[whole].startswith(selection.head) and len(selection.head) < len(every[whole])
    # Byte tokens: the head fills the batches up to its last character (a 1-4 byte UTF-8 one).
    assert 0 <= budget - sum(pairs[:whole]) - len(selection.head.encode()) - 1 < 4
    assert raw.documents == every[:whole] + ([selection.head] if selection.head else [])
    assert len(batches) == max_batches
    targets = np.concatenate([b["targets"][b["loss_mask"] == 1].ravel() for b in batches])
    texts = [tokenizer.decode(piece) for piece in np.split(targets, np.flatnonzero(targets == EOS) + 1)[:-1]]
    assert texts == raw.documents
    assert raw.num_bytes == len(targets) - len(raw.documents)
    assert pipeline.eval_documents(files_config, tokenizer, 0) == (len(every), "")
    assert pipeline.eval_documents(files_config, tokenizer, 10**6) == (len(every), "")
