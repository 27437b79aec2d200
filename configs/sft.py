"""Instruction tuning (objective=sft, train/objectives/sft.py) presets that run on CPU.

Both fine-tune a model that `python -m train` pretrained, on lmlab's own chat data
(`data.source=pydoc_chat`: questions about Python answered from CPython's pydoc topics,
`data/pydoc_chat.py`, written under the workdir on first use, no network), with the loss on
the assistant's tokens only, conversations packed best-fit decreasing:

    # tiny: full fine-tuning of the tiny GPT (seconds)
    python -m train --config=configs/gpt.py:tiny --workdir=/tmp/lmlab_tiny
    python -m train --config=configs/sft.py:tiny --workdir=/tmp/lmlab_tiny_sft

    # lora_default: LoRA (r = 8) on the model `python -m train` pretrains by default (./workdir)
    python -m train
    python -m train --config=configs/sft.py:lora_default --workdir=workdir_sft

The model, its shape keys and its tokenizer come from the base run (init_from=run:); the
presets' model keys are those of the base's preset (a base pretrained with other shape keys:
override them alike, or the run names the keys that contradict the checkpoint).

The chat template is ChatML, but the base runs' byte-level BPE has only <|endoftext|>: the
markers <|im_start|> and <|im_end|> are encoded as ordinary text (about 5 tokens each, as
transformers would encode them, `data.chat`). The loss still covers exactly each assistant
turn's content and the <|im_end|> text after it, so the model learns to end its turn by
writing that text; the report's reply to `eval.prompt` (a user turn rendered with the
generation prompt, greedy) is cut where it first appears (`data.sft.end_of_turn`).

The shipped data (205 conversations, the last 5% held out) has paragraph-long answers; a
conversation longer than data.seq_len + 1 tokens keeps its start. At tiny's 64 tokens (vocab
512) only ~27 training conversations keep an assistant token, none whole: tiny checks the
pipeline in seconds, it does not make a chat model nor teach the end of turn. lora_default at
128 tokens (vocab 2048) keeps all 195, about a third of them whole (they teach the end of
turn).

Other chat data: `--config.data.source=files:PATH.jsonl` (lines {"messages": [...]} or
{"prompt", "completion"}); the template: `--config.sft.chat_template=llama3` (or the
tokenizer's own, from a Hugging Face directory given by init_from=hf:DIR).

Presets:
    tiny:         the tiny GPT (configs/gpt.py:tiny) from run:/tmp/lmlab_tiny, full fine-tuning,
                  30 steps of 8 x 64 tokens
    lora_default: the default GPT (configs/gpt.py:default) from run:workdir, LoRA r = 8 on the
                  attention and MLP projections, 200 steps of 16 x 128 tokens
"""

from __future__ import annotations

import ml_collections

from configs import gpt

PRESETS = ("tiny", "lora_default")
# Where the presets' base models are pretrained (the commands in the docstring).
TINY_BASE = "/tmp/lmlab_tiny"
DEFAULT_BASE = "workdir"  # `python -m train`'s default --workdir
PROMPT = "What is the \"while\" statement in Python?"


def _sft(c: ml_collections.ConfigDict, base_workdir: str) -> None:
    c.objective = "sft"
    c.init_from = f"run:{base_workdir}"  # its model and its BPE (the tokenizer comes with the checkpoint)
    c.data.update(source="pydoc_chat", validation_fraction=0.05)
    c.sft.update(chat_template="chatml", packing="bfd")
    c.optimizer.update(weight_decay=0.0)
    # The report's reply (greedy) to a held-out question (the validation split's first conversation asks it).
    c.eval.update(num_samples=1, temperature=0.0, prompt=PROMPT)


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown sft preset {preset!r}; expected one of {PRESETS}")
    if preset == "tiny":
        c = gpt.get_config("tiny")
        _sft(c, TINY_BASE)
        c.optimizer.update(lr=1e-3)
    else:
        c = gpt.get_config("default")
        _sft(c, DEFAULT_BASE)
        c.steps = 200
        c.finetune.update(method="lora")
        c.finetune.lora.update(rank=8, alpha=16.0)
        c.optimizer.update(lr=2e-3)
        c.schedule.update(warmup_steps=20)
        c.eval.update(every_steps=50, max_batches=0)
        c.checkpoint.update(save_interval_steps=100)
    return c
