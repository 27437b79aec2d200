"""data.prepare.write and the run around it (stages off): shards identical on the DirectRunner's
three modes (in memory, 2 processes, 2 threads), every record's tokens equal to the tokenizer's encoding of its text, shards sorted by
id, tfds reading the dataset by directory and by name, the split fraction within its binomial
spread, and --overwrite that never loses the old dataset."""

import glob
import hashlib
import json
import math
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import prepared, sources
from data.prepare import pipeline, write
from data.tokenizer import load_tokenizer
from data.tokenizer.bpe import ByteLevelBPE

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]


def _texts(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) + f" #{i} é" for i in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("write")
    texts = _texts(120)
    (root / "in").mkdir()
    for part in range(3):
        with open(root / "in" / f"part{part}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in texts[part::3])
    tokenizer = ByteLevelBPE.train(texts, 300, special_tokens=("<|endoftext|>",))
    tokenizer.save(root / "tokenizer")
    config = pipeline.PrepareConfig(inputs=(str(root / "in" / "*.jsonl"),), tokenizer=str(root / "tokenizer"),
                                    name="greek", stages=(), validation_fraction=0.2, num_shards=3)
    reports = {
        "in_memory": pipeline.run(config, str(root / "one")),
        "two_processes": pipeline.run(config, str(root / "two"), beam_args=[
            "--direct_running_mode=multi_processing", "--direct_num_workers=2"]),
        "two_threads": pipeline.run(config, str(root / "threads"), beam_args=[
            "--direct_running_mode=multi_threading", "--direct_num_workers=2"]),
    }
    return {"root": root, "texts": texts, "config": config, "reports": reports}


def _shard_digests(directory) -> dict[str, str]:
    paths = sorted(glob.glob(os.path.join(directory, "greek", "1.0.0", "*.array_record-*")))
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def test_shards_are_byte_identical_on_one_worker_two_processes_and_two_threads(corpus):
    one, two = _shard_digests(corpus["root"] / "one"), _shard_digests(corpus["root"] / "two")
    assert len(one) == 2 * 3 and one == two == _shard_digests(corpus["root"] / "threads")


def test_records_hold_every_document_once_with_its_tokens_sorted_by_id(corpus):
    directory = str(corpus["root"] / "one")
    tokenizer = load_tokenizer(prepared.tokenizer_path(directory))
    builder = tfds.builder_from_directory(prepared.dataset_dir(directory))
    seen = []
    for split in ("train", "validation"):
        records = builder.as_data_source(split=split)
        ids = [records[i]["id"].decode() for i in range(len(records))]
        for i in range(len(records)):
            text = records[i]["text"].decode()
            assert np.asarray(records[i]["tokens"]).tolist() == tokenizer.encode(text)
            assert write.split_and_shard(ids[i], 0.2, 3)[0] == split
            seen.append(text)
        lengths = builder.info.splits[split].shard_lengths
        bounds = np.cumsum([0, *lengths])
        for start, end in zip(bounds[:-1], bounds[1:]):  # each shard sorted by id
            assert ids[start:end] == sorted(ids[start:end])
    assert sorted(seen) == sorted(corpus["texts"])


def test_the_copied_tokenizer_has_the_fingerprint_of_the_original(corpus):
    directory = str(corpus["root"] / "one")
    manifest = prepared.read_manifest(directory)
    original = load_tokenizer(corpus["config"].tokenizer)
    assert manifest["tokenizer_fingerprint"] == prepared.tokenizer_fingerprint(original)
    assert prepared.tokenizer_fingerprint(load_tokenizer(prepared.tokenizer_path(directory))) == \
        manifest["tokenizer_fingerprint"]
    other = ByteLevelBPE.train(corpus["texts"], 290, special_tokens=("<|endoftext|>",))
    assert prepared.tokenizer_fingerprint(other) != manifest["tokenizer_fingerprint"]


def test_tfds_by_name_and_the_prepared_source_read_it(corpus):
    directory = str(corpus["root"] / "one")
    by_name = sources.open_split("tfds:greek", "validation", data_dir=directory)
    by_dir = sources.open_split(f"prepared:{directory}", "validation")
    assert len(by_name) == len(by_dir) == corpus["reports"]["in_memory"]["splits"]["validation"]["documents"]
    assert list(by_name) == list(by_dir)


def test_report_counts_add_up(corpus):
    report = corpus["reports"]["two_processes"]
    assert report["stages"][0]["documents_out"] == len(corpus["texts"])
    assert report["stages"][0]["bytes_out"] == sum(len(t.encode()) for t in corpus["texts"])
    assert sum(s["documents"] for s in report["splits"].values()) == len(corpus["texts"])
    for split in report["splits"].values():
        assert sum(split["shard_lengths"]) == split["documents"]
    assert report["counters"]["data.prepare.write"]["shards_written"] == 6
    assert report["documents_per_second"] > 0 and report["dead_letter"]["entries"] == 0


def test_the_split_fraction_is_within_its_binomial_spread():
    n, fraction = 20000, 0.05
    held = sum(write.split_and_shard(f"/data/file{i // 100}.jsonl:{i % 100:09d}", fraction, 8)[0] == "validation"
               for i in range(n))
    # Each id is in validation with probability `fraction`, independently: 5 standard deviations.
    assert abs(held - n * fraction) < 5 * math.sqrt(n * fraction * (1 - fraction))
    shards = np.bincount([write.split_and_shard(f"doc{i}", fraction, 8)[1] for i in range(n)], minlength=8)
    assert np.all(np.abs(shards - n / 8) < 5 * math.sqrt(n * (1 / 8) * (7 / 8)))


def test_overwrite_replaces_only_after_success_and_a_failed_run_keeps_the_old(corpus, tmp_path):
    target = tmp_path / "out"
    config = corpus["config"]
    pipeline.run(config, str(target))
    before = _shard_digests(target)
    with pytest.raises(ValueError, match="already holds a prepared dataset"):
        pipeline.run(config, str(target))
    # A run that fails after the pipeline (no document lands in validation) leaves the old data in place.
    failing = pipeline.PrepareConfig(**{**vars(config), "validation_fraction": 1e-9})
    with pytest.raises(ValueError, match="validation split is empty"):
        pipeline.run(failing, str(target), overwrite=True)
    assert _shard_digests(target) == before and prepared.is_prepared(str(target))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory left behind
    bigger = pipeline.PrepareConfig(**{**vars(config), "num_shards": 4})
    pipeline.run(bigger, str(target), overwrite=True)
    assert len(_shard_digests(target)) == 8 and sorted(os.listdir(tmp_path)) == ["out"]
