"""The whole preparation pipeline: read -> the chosen stages, in a fixed order -> write.

    read ─> normalize ─> langid ─> quality ─> pii ─> exact ─> minhash ─> decontam ─> write
     │          └──────────┴─────────┴────────┴──────┴─────────┴──────────┴─> dropped/
     └─> dead_letter/

`STAGES` names the stages in that order; `--stages` picks a subset (the order stays). The
first four are per-document functions (`stage.DocumentStage`), run by `transforms.ApplyStage`;
the last three group documents (hashes, LSH buckets, n-grams) and are PTransforms of their own
with `.kept` and `.dropped` outputs. Each stage's options come from its `Options` dataclass,
as flags `--<stage>_<field>` (`stage.add_arguments`).

Besides each stage's own counters, the pipeline counts what leaves every step (namespace
`data.prepare.<stage>`: `documents_out`, `bytes_out`, UTF-8 bytes of the texts), so the
report can say what went into and came out of each stage. Every dropped document is written,
without its text, to `dropped/` as JSONL {"id", "stage", "reason"}: all of them, not a sample,
since an id is a few dozen bytes where the document was kilobytes.
"""

import dataclasses
import importlib
import json
import os
import time
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from data.prepare import read, write
from data.prepare.stage import Document
from data.prepare.transforms import NAMESPACE, ApplyStage


class StageSpec(NamedTuple):
    """Where a stage lives: `module.attribute` is a DocumentStage class or a PTransform class."""

    name: str  # its name in --stages and its flags' prefix
    module: str
    attribute: str
    per_document: bool


STAGES = (
    StageSpec("normalize", "data.prepare.normalize", "Normalize", True),
    StageSpec("langid", "data.prepare.langid", "LanguageId", True),
    StageSpec("quality", "data.prepare.quality", "QualityFilter", True),
    StageSpec("pii", "data.prepare.pii", "ScrubPii", True),
    StageSpec("exact", "data.prepare.exact_dedup", "ExactDedup", False),
    StageSpec("minhash", "data.prepare.near_dedup", "NearDedup", False),
    StageSpec("decontam", "data.prepare.decontaminate", "Decontaminate", False),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_class(spec: StageSpec) -> type:
    """The class that implements a stage (imported on demand)."""
    return getattr(importlib.import_module(spec.module), spec.attribute)


def options_type(spec: StageSpec) -> type:
    """The stage's `Options` dataclass: the DocumentStage's own, or its module's for PTransforms."""
    if spec.per_document:
        return stage_class(spec).Options
    return importlib.import_module(spec.module).Options


def parse_stages(text: str) -> tuple[str, ...]:
    """`--stages` -> the chosen stage names in pipeline order ('none': read -> write only)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown or not names:
        raise ValueError(f"--stages={text!r} names unknown stage(s) {unknown}; the stages are "
                         f"{','.join(STAGE_NAMES)} (run in that order: give a subset, or 'none' for read -> write)")
    return tuple(n for n in STAGE_NAMES if n in names)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What one run reads, does and writes (the flags of `python -m data.prepare`).

    Attributes:
        inputs: file patterns to read.
        tokenizer: the tokenizer path (`data.tokenizer.load_tokenizer`) the shards are tokenized with.
        name: the TFDS dataset name.
        text_key: the JSONL key of the text.
        split_paragraphs: one document per blank-line separated paragraph of a .txt file.
        validation_fraction: the share of documents (by a hash of their id) in `validation`.
        num_shards: array_record files per split.
        stages: the stages to run, in `STAGE_NAMES` order.
        stage_options: stage name -> its Options.
    """

    inputs: tuple[str, ...]
    tokenizer: str
    name: str = "corpus"
    text_key: str = "text"
    split_paragraphs: bool = False
    validation_fraction: float = 0.05
    num_shards: int = 4
    stages: tuple[str, ...] = STAGE_NAMES
    stage_options: dict[str, Any] = dataclasses.field(default_factory=dict)


class CountFn(beam.DoFn):
    """Passes documents through, counting `documents_out` and `bytes_out` of a stage."""

    def __init__(self, stage_name: str):
        self._documents = Metrics.counter(f"{NAMESPACE}.{stage_name}", "documents_out")
        self._bytes = Metrics.counter(f"{NAMESPACE}.{stage_name}", "bytes_out")

    def process(self, document: Document):
        self._documents.inc()
        self._bytes.inc(len(document.text.encode("utf-8")))
        yield document


def _dropped_line(dropped) -> str:
    document_id, stage_name, reason = dropped
    return json.dumps({"id": document_id, "stage": stage_name, "reason": reason}, ensure_ascii=False)


def apply_stages(documents, config: PrepareConfig):
    """Documents -> (the documents every chosen stage kept, [dropped PCollection of each stage])."""
    dropped = []
    for spec in STAGES:
        if spec.name not in config.stages:
            continue
        options = config.stage_options.get(spec.name) or options_type(spec)()
        cls = stage_class(spec)
        transform = ApplyStage(cls(options)) if spec.per_document else cls(options)
        outputs = documents | spec.name >> transform
        documents = outputs.kept | f"count {spec.name}" >> beam.ParDo(CountFn(spec.name))
        dropped.append(outputs.dropped)
    return documents, dropped


def build(pipeline: beam.Pipeline, config: PrepareConfig, output_dir: str, dataset_dir: str,
          tokenizer_path: str) -> None:
    """Adds the whole preparation to `pipeline`, writing under `output_dir`.

    Args:
        pipeline: the Beam pipeline.
        config: what to read and do.
        output_dir: where dead_letter/ and dropped/ go.
        dataset_dir: where the array_record shards go (created already).
        tokenizer_path: the tokenizer every worker loads (the copy in the output).
    """
    read_outputs = pipeline | read.ReadInputs(config.inputs, config.text_key, config.split_paragraphs)
    documents, dropped = apply_stages(read_outputs.documents, config)
    documents | write.WriteShards(dataset_dir, config.name, tokenizer_path,
                                  validation_fraction=config.validation_fraction, num_shards=config.num_shards)
    (read_outputs.dead_letter
     | "write dead letter" >> beam.io.WriteToText(os.path.join(output_dir, "dead_letter", "dead_letter"),
                                                  file_name_suffix=".jsonl"))
    (dropped
     | "all dropped" >> beam.Flatten(pipeline=pipeline)
     | "as json" >> beam.Map(_dropped_line)
     | "write dropped" >> beam.io.WriteToText(os.path.join(output_dir, "dropped", "dropped"),
                                              file_name_suffix=".jsonl"))


def run(config: PrepareConfig, output: str, *, overwrite: bool = False, beam_args=()) -> dict:
    """Runs the preparation into `output` (staged, then swapped in) and returns its report.

    Args:
        config: what to read and do.
        output: the output directory (new, empty, or a prepared dataset with `overwrite`).
        overwrite: replace a prepared dataset in `output` once the new one is complete.
        beam_args: Beam pipeline options as command-line flags (runner, workers, ...).

    Returns:
        The report written to `output/report.json` (see `data.prepare.report`).
    """
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

    from data import prepared  # pylint: disable=g-import-not-at-top
    from data.prepare import output as output_dir  # pylint: disable=g-import-not-at-top
    from data.prepare import report as run_report  # pylint: disable=g-import-not-at-top
    from data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

    output_dir.check_output(output, overwrite)
    staging = output_dir.staging_dir(output)
    try:
        tokenizer = load_tokenizer(config.tokenizer)
        tokenizer_copy = prepared.tokenizer_path(staging)
        tokenizer.save(tokenizer_copy)
        dataset_dir = os.path.join(staging, config.name, prepared.VERSION)
        os.makedirs(dataset_dir)
        start = time.perf_counter()
        pipeline = beam.Pipeline(options=PipelineOptions(list(beam_args)))
        build(pipeline, config, staging, dataset_dir, tokenizer_copy)
        result = pipeline.run()
        result.wait_until_finish()
        wall_seconds = time.perf_counter() - start
        lengths = write.finish_dataset(dataset_dir, config.name, config.num_shards, prepared.VERSION)
        manifest = {"format": prepared.FORMAT, "name": config.name, "version": prepared.VERSION,
                    "splits": {split: sum(n) for split, n in lengths.items()},
                    "tokenizer_fingerprint": prepared.tokenizer_fingerprint(tokenizer),
                    "tokenizer_source": config.tokenizer, "inputs": list(config.inputs),
                    "stages": list(config.stages)}
        report = {**run_report.build_report(result, config.stages, wall_seconds, staging, lengths),
                  "beam_options": list(beam_args), "inputs": list(config.inputs), "stages_run": list(config.stages)}
        _write_json(os.path.join(staging, "report.json"), report)
        _write_json(os.path.join(staging, prepared.PREPARED_FILE), manifest)
        output_dir.commit(staging, output)
    except BaseException:
        output_dir.discard(staging)
        raise
    return report


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.write("\n")
