"""Corpus preparation on Apache Beam: raw files -> clean, filtered, deduplicated, tokenized shards.

    python -m data.prepare --input=GLOB --output=DIR --tokenizer=PATH [--runner=...] [options]

    read (text / JSONL, gzip / zstd; unreadable files -> dead letter)
      -> normalize -> langid -> quality -> pii        per-document stages (`stage.DocumentStage`)
      -> exact dedup -> MinHash LSH dedup -> decontaminate    grouping stages (PTransforms)
      -> tokenize, split by hash -> array_record shards + TFDS dataset info

Every stage counts what it kept and dropped, and why, in Beam metrics (namespace
`data.prepare.<stage>`); the run writes them to the output's report. The same pipeline runs on
the DirectRunner here and on Flink, Spark or Dataflow (`--runner`, Beam's own options).
Per-document stages are plain functions of a text, testable and usable without Beam; only
`transforms` and the pipeline itself import `apache_beam` (the `data` extra of setup.py).
"""
