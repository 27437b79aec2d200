"""data.prepare.pipeline: the Beam pipeline's output equals the per-document stages run locally
(`stage.run_local`, no Beam) on the same documents, document for document, with the same drop
reasons; the report's flow of documents and bytes per stage adds up."""

import glob
import json
import os

import pytest
import tensorflow_datasets as tfds

from data import builders, prepared
from data.prepare import pipeline
from data.prepare.stage import options_from
from data.tokenizer.bpe import ByteLevelBPE
from tests.data.prepare.raw_corpus import EMAILS, IPS, JUNK, PHONES, base_documents, with_pii

PER_DOCUMENT = ("normalize", "langid", "quality", "pii")
GERMAN = ("Die Katze sitzt auf der Matte und schaut aus dem Fenster, während draußen der Regen fällt. "
          "Niemand weiß, warum sie so ruhig ist, aber alle im Haus mögen sie sehr. ") * 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    base = base_documents(6)
    texts = [base[0], f"<p>{base[1]}</p>\n\x07", with_pii(base[2], 0), with_pii(base[3], 1), base[4],
             base[5].replace(" ", "   "), GERMAN, *JUNK]
    (root / "in").mkdir()
    with open(root / "in" / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    ByteLevelBPE.train(base, 300, special_tokens=("<|endoftext|>",)).save(root / "tok")
    config = pipeline.PrepareConfig(inputs=(str(root / "in" / "*.jsonl"),), tokenizer=str(root / "tok"),
                                    stages=PER_DOCUMENT, validation_fraction=0.3, num_shards=2)
    report = pipeline.run(config, str(root / "out"))
    return {"root": root, "config": config, "report": report, "path": str(root / "in" / "docs.jsonl")}


def _local(path: str):
    """Each document through the stages' plain functions: kept {id: text}, dropped {id: (stage, reason)}."""
    kept, dropped = {}, {}
    for key, text in builders.read_documents(path).items():
        doc_id = f"{path}:{int(key.rsplit(':', 1)[1]) - 1:09d}"  # builders count lines from 1
        for spec in pipeline.STAGES[:4]:
            stage = pipeline.stage_class(spec)(options_from({}, spec.name, pipeline.options_type(spec)))
            outcome = stage(text)
            if outcome.text is None:
                dropped[doc_id] = (spec.name, outcome.reason)
                break
            text = outcome.text
        else:
            kept[doc_id] = text
    return kept, dropped


def test_the_pipeline_equals_the_stages_run_locally(run):
    kept, dropped = _local(run["path"])
    assert len(dropped) >= len(JUNK) + 1 and len(kept) >= 4  # the test means something
    directory = str(run["root"] / "out")
    builder = tfds.builder_from_directory(prepared.dataset_dir(directory))
    written = {}
    for split in ("train", "validation"):
        records = builder.as_data_source(split=split)
        written.update({records[i]["id"].decode(): records[i]["text"].decode() for i in range(len(records))})
    assert written == kept
    lines = [json.loads(line) for p in glob.glob(os.path.join(directory, "dropped", "*.jsonl")) for line in open(p)]
    assert {d["id"]: (d["stage"], d["reason"]) for d in lines} == dropped


def test_no_pii_is_left_and_placeholders_are_in(run):
    builder = tfds.builder_from_directory(prepared.dataset_dir(str(run["root"] / "out")))
    texts = [r["text"].decode() for split in ("train", "validation") for r in builder.as_data_source(split=split)]
    joined = "\n".join(texts)
    for secret in (*EMAILS, *IPS, *PHONES):
        assert secret not in joined
    options = run["config"].stage_options.get("pii") or pipeline.options_type(pipeline.STAGES[3])()
    for placeholder in (options.email_placeholder, options.phone_placeholder, options.ip_placeholder):
        assert joined.count(placeholder) >= 2  # the two documents with PII are kept, scrubbed


def test_the_report_flow_adds_up(run):
    report = run["report"]
    rows = report["stages"]
    assert [r["stage"] for r in rows] == ["read", *PER_DOCUMENT]
    for before, after in zip(rows, rows[1:]):
        assert after["documents_in"] == before["documents_out"]
        assert after["documents_in"] - after["documents_out"] == after["documents_dropped"] == \
            sum(after["dropped"].values())
    assert rows[-1]["documents_out"] == sum(s["documents"] for s in report["splits"].values())
    kept, dropped = _local(run["path"])
    assert report["documents_dropped"] == len(dropped) and rows[0]["documents_out"] == len(kept) + len(dropped)


def test_stage_names_parse_in_the_fixed_order():
    assert pipeline.parse_stages("decontam,normalize,exact") == ("normalize", "exact", "decontam")
    assert pipeline.parse_stages("none") == ()
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.parse_stages("normalize,none")
