"""Human annotation: a local labeling page, agreement between annotators, training JSONL.

    python -m annotate --tasks=pairs.jsonl --out=DIR --annotator=alice      # the page, one annotator
    python -m annotate.agreement DIR                                         # Cohen's (and Fleiss') kappa
    python -m annotate.merge DIR --out=train.jsonl                           # the training file

    tasks.py      the task file: preference pairs {"id", "prompt", "a", "b"} or class-label
                  items {"id", "text"[, "text_pair"]} with a label set; checked in full at start
    store.py      one annotator's judgments: DIR/NAME.jsonl, one line appended per judgment,
                  undo by truncating the last one, resume by reading it back
    app.py        the FastAPI app: the page (static/) and its small JSON API
    kappa.py      Cohen's kappa of two annotators, Fleiss' kappa of several
    agreement.py  the judgments of DIR aligned per item -> the kappas (python -m annotate.agreement)
    merge.py      the judgments of DIR -> the JSONL `data.preference` (objective=reward, dpo) or
                  `data.tasks` (objective=classification) reads (python -m annotate.merge)
"""
