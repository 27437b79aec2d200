"""data.tasks: classification and SQuAD examples from JSONL / CSV / SQuAD JSON / tfds (under
`tfds.testing.mock_data`, without TensorFlow), encoded as transformers' BertTokenizerFast encodes
them, in batches with resumable order; bad input named by file, line and key."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers

from data import tasks
from data.tokenizer import load_tokenizer
from tests.minilm import minilm_path

T = 24


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    return transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))


PAIRS = [
    ("A man is eating food.", "He eats.", "yes"),
    ("The quick brown fox jumps over the lazy dog " * 4, "A fox.", "no"),  # the first text is cut
    ("Short.", "a much longer second sentence that has to be cut down to fit the row " * 2, "yes"),
    ("Stocks fell sharply on Monday.", "Markets dropped, analysts said; investors fled to bonds.", "maybe"),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _hf_rows(reference, texts, pairs=None):
    enc = reference(texts, pairs, truncation=True, max_length=T, padding="max_length", return_tensors="np")
    return {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def test_classification_pairs_equal_bert_tokenizer_fast_and_labels_map_sorted(tmp_path, tokenizer, reference):
    _write_jsonl(tmp_path / "train.jsonl", [{"s1": a, "s2": b, "y": y} for a, b, y in PAIRS])
    _write_jsonl(tmp_path / "validation.jsonl", [{"s1": a, "s2": b, "y": y} for a, b, y in PAIRS[:2]])
    config = tasks.TaskConfig(source=f"files:{tmp_path}/{{split}}.jsonl", seq_len=T, text_key="s1",
                              text_pair_key="s2", label_key="y")
    data = tasks.classification_data(config, tokenizer, "train")
    assert data.label_names == ("maybe", "no", "yes") and data.num_labels == 3
    np.testing.assert_array_equal(data.arrays["labels"], [2, 1, 2, 0])
    expected = _hf_rows(reference, [a for a, _, _ in PAIRS], [b for _, b, _ in PAIRS])
    for key, value in expected.items():
        np.testing.assert_array_equal(data.arrays[key], value, err_msg=key)
    # The validation split maps labels as the training split defines them.
    np.testing.assert_array_equal(tasks.classification_data(config, tokenizer, "validation").arrays["labels"], [2, 1])


def test_single_texts_from_csv_with_integer_labels(tmp_path, tokenizer, reference):
    lines = ["text,label"] + [f'"{a}",{i % 2}' for i, (a, _, _) in enumerate(PAIRS * 3)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    config = tasks.TaskConfig(source=f"files:{tmp_path}/data.csv", seq_len=T, validation_fraction=0.25)
    train = tasks.classification_data(config, tokenizer, "train")
    validation = tasks.classification_data(config, tokenizer, "validation")
    assert train.label_names is None and train.num_labels == 2
    assert len(train.arrays["labels"]) == 9 and len(validation.arrays["labels"]) == 3  # every 4th held out
    texts = [a for a, _, _ in PAIRS * 3]
    expected = _hf_rows(reference, [t for i, t in enumerate(texts) if i % 4 != 3])
    np.testing.assert_array_equal(train.arrays["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(train.arrays["labels"], [i % 2 for i in range(12) if i % 4 != 3])


@pytest.mark.parametrize("rows, fragment", [
    ([{"text": "ok", "label": "a"}, {"txt": "typo", "label": "b"}], r"train\.jsonl:2 has no key 'text'"),
    ([{"text": "ok", "label": "a"}, {"text": "no label"}], r"train\.jsonl:2 has no key 'label'"),
])
def test_missing_keys_are_named_with_file_and_line(tmp_path, tokenizer, rows, fragment):
    _write_jsonl(tmp_path / "train.jsonl", rows)
    config = tasks.TaskConfig(source=f"files:{tmp_path}/{{split}}.jsonl", seq_len=T)
    with pytest.raises(ValueError, match=fragment):
        tasks.classification_data(config, tokenizer, "train")


def test_unknown_label_is_named_with_file_line_and_key(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    _write_jsonl(tmp_path / "validation.jsonl", [{"text": "a", "label": "pos"}, {"text": "c", "label": "neutral"}])
    config = tasks.TaskConfig(source=f"files:{tmp_path}/{{split}}.jsonl", seq_len=T)
    with pytest.raises(ValueError, match=r"validation\.jsonl:2: label 'neutral' is not a known label \(known: "
                                         r"\['neg', 'pos'\]\)"):
        tasks.classification_data(config, tokenizer, "validation")
    with pytest.raises(ValueError, match=r"unknown task data source 'hf:x'"):
        tasks.read_records(tasks.TaskConfig(source="hf:x"), "train")


def test_glue_sst2_from_tfds_mock_data(tokenizer, reference, tmp_path):
    config = tasks.TaskConfig(source="tfds:glue/sst2", seq_len=T, text_key="sentence", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=6):
        data = tasks.classification_data(config, tokenizer, "train")
        import tensorflow_datasets.text.glue  # noqa: F401

        source = tfds.data_source("glue/sst2", split="train", try_gcs=False)
        sentences = [source[i]["sentence"] for i in range(6)]
        labels = [int(source[i]["label"]) for i in range(6)]
    sentences = [s.decode() if isinstance(s, bytes) else s for s in sentences]
    assert data.label_names == ("negative", "positive")
    np.testing.assert_array_equal(data.arrays["labels"], labels)
    np.testing.assert_array_equal(data.arrays["input_ids"], _hf_rows(reference, sentences)["input_ids"])


def test_train_iterator_resumes_and_eval_pads_with_marked_rows(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": f"example number {i}", "label": i % 3} for i in range(10)])
    _write_jsonl(tmp_path / "validation.jsonl", [{"text": f"held out {i}", "label": i % 3} for i in range(5)])
    config = tasks.TaskConfig(source=f"files:{tmp_path}/{{split}}.jsonl", seq_len=T, batch_size=4)
    iterator = tasks.train_iterator(config, tokenizer)
    first = next(iterator)
    assert first["input_ids"].shape == (4, T) and first["labels"].shape == (4,)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = tasks.train_iterator(config, tokenizer)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Two processes' rows together are the single-process batch.
    halves = [next(tasks.train_iterator(config, tokenizer, process_index=p, process_count=2)) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["labels"] for h in halves]), first["labels"])

    evaluation = tasks.EvalSet(config, tokenizer)
    batches = list(evaluation)
    assert len(batches) == len(evaluation) == 2 and list(evaluation)[1]["labels"].tolist() == [1, -1, -1, -1]
    assert not batches[1]["attention_mask"][1:].any()
