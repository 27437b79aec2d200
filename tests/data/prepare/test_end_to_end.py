"""Raw files with planted defects -> `python -m data.prepare` (all stages, 2 worker processes) ->
`python -m train` on `data.source=prepared:DIR`: the report's counts equal what was planted, the
dead letter names the bad files, no PII is left in the shards, and the trainer trains on the
stored token ids with the prepared tokenizer (another tokenizer is an error naming both)."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.loader import load_config
from data import pipeline as data_pipeline
from data import prepared
from data.tokenizer import load_tokenizer
from data.tokenizer.bpe import ByteLevelBPE
from tests.cli_output import REPO, assert_one_line_error, run_module
from tests.data.prepare.raw_corpus import EMAILS, IPS, PHONES, write_corpus
from train import build

PII = re.compile("|".join(re.escape(s) for s in (*EMAILS, *IPS, *PHONES)))


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    planted = write_corpus(str(root / "raw"))
    contaminated = planted.base[7]  # an evaluation example quoting 20 of its words
    with open(root / "eval.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"question": " ".join(contaminated.split()[10:30])}) + "\n")
    ByteLevelBPE.train(planted.base, 320, special_tokens=("<|endoftext|>",)).save(root / "tokenizer")
    result = run_module(
        "data.prepare", f"--input={root / 'raw' / '*'}", f"--output={root / 'out'}",
        f"--tokenizer={root / 'tokenizer'}", "--split_paragraphs", "--validation_fraction=0.2", "--num_shards=2",
        f"--decontam_eval_files={root / 'eval.jsonl'}", "--decontam_text_key=question",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(root / "out" / "report.json", encoding="utf-8") as f:
        report = json.load(f)
    return {"root": root, "planted": planted, "report": report, "stdout": result.stdout}


def test_the_report_counts_what_was_planted(prepared_run):
    planted, report = prepared_run["planted"], prepared_run["report"]
    flow = {row["stage"]: row for row in report["stages"]}
    assert flow["read"]["documents_out"] == planted.documents_read
    per_document = sum(flow[s]["documents_dropped"] for s in ("normalize", "langid", "quality", "pii"))
    assert per_document == planted.junk
    assert flow["exact"]["documents_dropped"] == planted.exact_duplicates
    assert flow["minhash"]["documents_dropped"] == planted.near_duplicates
    assert flow["decontam"]["documents_dropped"] == 1
    kept = len(planted.base) - 1  # every base document once, but the contaminated one
    assert flow["decontam"]["documents_out"] == kept
    assert sum(split["documents"] for split in report["splits"].values()) == kept
    assert report["documents_dropped"] == planted.documents_read - kept
    assert "# wrote" in prepared_run["stdout"]


def test_the_dead_letter_names_the_bad_files(prepared_run):
    report = prepared_run["report"]
    assert report["dead_letter"]["files"] == sorted(prepared_run["planted"].bad_files)
    assert report["counters"]["data.prepare.read"]["dead_letter_files"] == 2
    lines = []
    for name in os.listdir(prepared_run["root"] / "out" / "dead_letter"):
        with open(prepared_run["root"] / "out" / "dead_letter" / name, encoding="utf-8") as f:
            lines += [json.loads(line) for line in f]
    errors = {entry["file"]: entry["error"] for entry in lines}
    assert "not valid UTF-8" in errors[prepared_run["planted"].bad_files[0]]


def test_no_pii_is_left_in_the_shards(prepared_run):
    directory = str(prepared_run["root"] / "out")
    tokenizer = load_tokenizer(prepared.tokenizer_path(directory))
    builder = tfds.builder_from_directory(prepared.dataset_dir(directory))
    texts = []
    for split in ("train", "validation"):
        for record in builder.as_data_source(split=split):
            texts += [record["text"].decode(), tokenizer.decode(np.asarray(record["tokens"]).tolist())]
    assert texts and not any(PII.search(t) for t in texts)
    assert sum("<EMAIL>" in t for t in texts[::2]) == prepared_run["planted"].pii_documents


def test_training_reads_the_stored_tokens_with_the_prepared_tokenizer(prepared_run, tmp_path):
    directory = str(prepared_run["root"] / "out")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [f"data.source=prepared:{directory}"])
    data = build.data_config(config, str(tmp_path))
    tokenizer = build.tokenizer(config, str(tmp_path), data)  # tokenizer.path empty: the prepared one
    assert prepared.tokenizer_fingerprint(tokenizer) == prepared.read_manifest(directory)["tokenizer_fingerprint"]
    documents = data_pipeline.train_documents(data, tokenizer)
    assert isinstance(documents, prepared.TokenSource)
    texts = data_pipeline.open_split(data, "train")
    assert [documents[i].tolist() for i in range(len(documents))] == \
        [tokenizer.encode(texts[i]) for i in range(len(texts))]
    other = tmp_path / "other"
    ByteLevelBPE.train(prepared_run["planted"].base, 280, special_tokens=("<|endoftext|>",)).save(other)
    mismatched = load_config(os.path.join(REPO, "configs/gpt.py:tiny"),
                             [f"data.source=prepared:{directory}", f"tokenizer.path={other}"])
    with pytest.raises(ValueError, match=f"tokenized with {re.escape(directory)}/tokenizer.*tokenizer.path={other}"):
        build.tokenizer(mismatched, str(tmp_path), data)


def test_python_m_train_trains_on_the_prepared_directory(prepared_run, tmp_path):
    directory = prepared_run["root"] / "out"
    result = run_module("train", "--config=configs/gpt.py:tiny", f"--workdir={tmp_path / 'run'}",
                        f"--config.data.source=prepared:{directory}", "--config.steps=2",
                        "--config.schedule.warmup_steps=1", "--config.logging.progress_bar=false",
                        "--config.logging.peak_flops=1e11", "--config.eval.max_batches=1",
                        "--config.eval.sample_tokens=2", "--config.eval.num_samples=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"step 2: val loss [\d.]+, [\d.]+ bits/byte", result.stdout), result.stdout
    vocab = load_tokenizer(prepared.tokenizer_path(str(directory))).vocab_size
    assert f"vocab {vocab};" in result.stdout


def test_another_tokenizer_is_one_line_before_the_workdir_exists(prepared_run, tmp_path):
    other = tmp_path / "other"
    ByteLevelBPE.train(prepared_run["planted"].base, 280, special_tokens=("<|endoftext|>",)).save(other)
    directory = prepared_run["root"] / "out"
    result = run_module("train", "--config=configs/gpt.py:tiny", f"--workdir={tmp_path / 'run'}",
                        f"--config.data.source=prepared:{directory}", f"--config.tokenizer.path={other}")
    assert_one_line_error(result, f"tokenized with {directory}/tokenizer", f"tokenizer.path={other} differs")
    assert not (tmp_path / "run").exists()
