"""data.squad: SQuAD windows against transformers' BertTokenizerFast (overflowing windows with a
stride, offsets) and Hugging Face's run_qa answer positions; the span post-processing against a
brute force (the gold spans score 100 with `evals.metrics.squad`, tested in tests/evals); SQuAD
data from JSONL, SQuAD JSON and tfds `squad` under mock_data."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers

from data import squad, tasks
from data.tokenizer import load_tokenizer
from evals.metrics.squad import squad as squad_exact_match_f1
from tests.minilm import minilm_path

T, STRIDE, MAX_QUERY = 40, 8, 12

CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region "
           "in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, "
           "under their leader Rollo, agreed to swear fealty to King Charles III of West Francia. Through "
           "generations of assimilation and mixing with the native Frankish and Roman-Gaulish populations, their "
           "descendants would gradually merge with the Carolingian-based cultures of West Francia.")
QUESTIONS = [  # (question, answer): answers early, late (a later window only) and spanning many tokens
    ("In what country is Normandy located?", "France"),
    ("Who was the Norse leader?", "Rollo"),
    ("What cultures did the descendants merge with?", "the Carolingian-based cultures of West Francia"),
    ("Who did they swear fealty to?", "King Charles III"),
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


def _examples():
    return [squad.QAExample(str(i), q, CONTEXT, ((a, CONTEXT.index(a)),), f"ex{i}") for i, (q, a) in
            enumerate(QUESTIONS)]


def _run_qa_reference(minilm_dir, examples):
    """transformers' windows and Hugging Face run_qa's prepare_train_features positions."""
    fast = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    enc = fast([e.question.lstrip() for e in examples], [e.context for e in examples], truncation="only_second",
               max_length=T, stride=STRIDE, return_overflowing_tokens=True, return_offsets_mapping=True,
               padding="max_length")
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        example = examples[enc["overflow_to_sample_mapping"][i]]
        sequence_ids = enc.sequence_ids(i)
        text, start_char = example.answers[0]
        end_char = start_char + len(text)
        token_start = sequence_ids.index(1)
        token_end = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            starts.append(0)
            ends.append(0)
            continue
        while token_start < len(offsets) and offsets[token_start][0] <= start_char:
            token_start += 1
        starts.append(token_start - 1)
        while offsets[token_end][1] >= end_char:
            token_end -= 1
        ends.append(token_end + 1)
    return enc, starts, ends


def test_windows_and_positions_equal_transformers_and_run_qa(minilm_dir, tokenizer):
    examples = _examples()
    features = squad.featurize(examples, tokenizer, T, STRIDE, MAX_QUERY)
    enc, starts, ends = _run_qa_reference(minilm_dir, examples)
    assert len(features.input_ids) == len(enc["input_ids"]) > 2 * len(examples)  # several windows each
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(features.batch_arrays()[key], np.asarray(enc[key]), err_msg=key)
    np.testing.assert_array_equal(features.example_index, enc["overflow_to_sample_mapping"])
    np.testing.assert_array_equal(features.start_positions, starts)
    np.testing.assert_array_equal(features.end_positions, ends)
    assert (features.start_positions > 0).sum() >= len(examples)  # every answer lies in some window
    for n in range(len(features.input_ids)):
        context = np.asarray(enc.sequence_ids(n)) == 1
        np.testing.assert_array_equal(features.offsets[n][context], np.asarray(enc["offset_mapping"][n])[context])
        assert (features.offsets[n][~context] == -1).all()


def _brute_force(examples, features, start_NT, end_NT, n_best, max_len):
    best = {}
    for n, ex in enumerate(features.example_index):
        top_s = np.argsort(start_NT[n])[::-1][:n_best]
        top_e = np.argsort(end_NT[n])[::-1][:n_best]
        for s in top_s:
            for e in top_e:
                offsets = features.offsets[n]
                if offsets[s, 0] < 0 or offsets[e, 0] < 0 or not 0 <= e - s < max_len:
                    continue
                score = start_NT[n, s] + end_NT[n, e]
                if score > best.get(ex, (-np.inf,))[0]:
                    best[ex] = (score, examples[ex].context[offsets[s, 0]:offsets[e, 1]])
    return [best.get(i, (0, ""))[1] for i in range(len(examples))]


@pytest.mark.parametrize("n_best, max_len", [(3, 30), (20, 4), (40, 40)])
def test_postprocess_equals_brute_force_and_recovers_gold_spans(tokenizer, n_best, max_len):
    examples = _examples()
    features = squad.featurize(examples, tokenizer, T, STRIDE, MAX_QUERY)
    rng = np.random.default_rng(n_best)
    start_NT, end_NT = rng.normal(size=(2, *features.input_ids.shape)).astype(np.float32)
    predictions = squad.postprocess(examples, features, *squad.top_k(start_NT, n_best), *squad.top_k(end_NT, n_best),
                                    max_answer_length=max_len)
    assert predictions == _brute_force(examples, features, start_NT, end_NT, n_best, max_len)

    # Logits that peak on the labelled tokens give back each gold answer's exact text.
    peaked_s, peaked_e = np.zeros_like(start_NT), np.zeros_like(end_NT)
    for n, (s, e) in enumerate(zip(features.start_positions, features.end_positions)):
        if s > 0:
            peaked_s[n, s], peaked_e[n, e] = 5.0, 5.0
    predictions = squad.postprocess(examples, features, *squad.top_k(peaked_s, 20), *squad.top_k(peaked_e, 20),
                                    max_answer_length=30)
    assert predictions == [a for _, a in QUESTIONS]
    assert squad_exact_match_f1(predictions, [[a] for _, a in QUESTIONS]) == {"exact_match": 100.0, "f1": 100.0}


def _squad_json(path, examples):
    qas = [{"id": e.id, "question": e.question, "answers": [{"text": t, "answer_start": s} for t, s in e.answers]}
           for e in examples]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Normans", "paragraphs": [
        {"context": CONTEXT, "qas": qas}]}]}))


def test_squad_json_and_jsonl_read_the_same_examples(tmp_path, tokenizer):
    examples = _examples()
    _squad_json(tmp_path / "dev.json", examples)
    rows = [{"id": e.id, "question": e.question, "context": e.context,
             "answers": {"text": [e.answers[0][0]], "answer_start": [e.answers[0][1]]}} for e in examples]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = [tasks.qa_examples(tasks.TaskConfig(kind="qa", source=f"files:{tmp_path}/{{split}}.{suffix}"), "dev")
            for suffix in ("json", "jsonl")]
    for got in read:
        assert [(e.id, e.question, e.context, e.answers) for e in got] == [
            (e.id, e.question, e.context, e.answers) for e in examples]
    assert read[0][1].where.endswith("dev.json: data[0].paragraphs[0].qas[1]")
    assert read[1][1].where.endswith("dev.jsonl:2")


def test_answer_not_in_context_is_named_with_file_line_and_key(tmp_path):
    rows = [{"id": "a", "question": "q?", "context": "Paris is in France.",
             "answers": {"text": ["France"], "answer_start": [12]}},
            {"id": "b", "question": "q?", "context": "Paris is in France.",
             "answers": {"text": ["Spain"], "answer_start": [12]}}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tasks.TaskConfig(kind="qa", source=f"files:{tmp_path}/{{split}}.jsonl")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: answers text 'Spain' is not at answer_start=12 .*does not "
                                         r"occur in the context"):
        tasks.qa_examples(config, "train")
    rows[1]["answers"] = {"text": ["France"], "answer_start": [3]}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"train\.jsonl:2: .*it occurs at 12"):
        tasks.qa_examples(config, "train")
    rows[1] = {"id": "c", "question": "q?", "answers": []}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"train\.jsonl:2 has no key 'context'"):
        tasks.qa_examples(config, "train")


def test_tfds_squad_under_mock_data(tmp_path, tokenizer):
    config = tasks.TaskConfig(kind="qa", source="tfds:squad", seq_len=T, doc_stride=STRIDE, max_query_len=MAX_QUERY,
                              data_dir=str(tmp_path))
    # tfds' random mock examples put random answer texts at random offsets: named, not silently trained on.
    with tfds.testing.mock_data(num_examples=3):
        with pytest.raises(ValueError, match=r"tfds:squad\[validation\] example 0: answers text .* is not at "
                                             r"answer_start="):
            tasks.qa_examples(config, "validation")

    def as_data_source(builder, split, **kwargs):  # consistent examples, in tfds' own types
        return [{"id": e.id.encode(), "title": b"Normans", "question": e.question.encode(),
                 "context": e.context.encode(),
                 "answers": {"text": np.asarray([t.encode() for t, _ in e.answers], dtype=object),
                             "answer_start": np.asarray([s for _, s in e.answers], np.int32)}}
                for e in _examples()]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        evaluation = tasks.EvalSet(config, tokenizer)
    assert [(e.question, e.answers) for e in evaluation.examples] == [(e.question, e.answers) for e in _examples()]
    reference = squad.featurize(_examples(), tokenizer, T, STRIDE, MAX_QUERY)
    np.testing.assert_array_equal(evaluation.features.input_ids, reference.input_ids)
