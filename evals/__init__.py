"""Evaluation: metrics equal to the field's reference tools, and a harness that evaluates any
lmlab workdir or Hugging Face checkpoint on tasks declared as data (`python -m evals`).

  metrics/   BLEU and chrF (= sacrebleu), ROUGE (= rouge-score), BERTScore (= bert-score, on
             lmlab's own BERT), SQuAD EM/F1, classification metrics (= scikit-learn), and
             sliding-window perplexity; each metric is a pure function of strings or numbers.
  lm.py      the model side: batched log-likelihoods, rolling log-likelihoods and KV-cache
             generation of a loaded checkpoint, under a sharding strategy (lm-eval's LM API).
  lm_requests.py  lm-eval's conventions for requests -> token rows (special tokens, rolling
             windows, stop strings), as pure functions.
  tasks.py   tasks as data (lm-eval's YAML task keys, or plain JSONL): multiple choice,
             generation, loglikelihood (cloze) and rolling perplexity; prompts as lm-eval builds them.
  sources.py where a task's documents come from: files:, json, tfds:, embedded:, verifiable:.
  corpus_tasks.py  tasks made from the embedded corpus's held-out topics (no download).
  task_data/ the built-in tasks' YAML files.
  metrics/registry.py  the harness's metrics by name: per-example statistics and aggregation.
  harness.py runs tasks on an LM: metrics with standard errors (sample stderr for means,
             bootstrap for corpus metrics), per-example records, results.json, a table.
  cli.py     `python -m evals --checkpoint=PATH --tasks=A,B --out=DIR`.
"""
