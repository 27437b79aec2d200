"""Tool-calling SFT (objective=sft, train/objectives/sft.py): a small Llama-style decoder learns to call the
calculator on synthetic arithmetic questions and to answer them directly (data/tool_calls.py).

    # the data (train.jsonl, held_out.jsonl) and its tokenizer, then the run
    python -c "from data import tool_calls; tool_calls.prepare('/tmp/lmlab_agent')"
    python -m train --config=configs/agent.py:default --workdir=/tmp/lmlab_agent/run
    # or all of it, with the agent measured against direct answers on the held-out questions:
    python benchmarks/agent.py

The lines are ChatML conversations (plain messages, the tool turns already written by
`agents.calls`), read through the sft objective's `files:` source with the loss on the
assistant's tokens only; conversations are packed best-fit decreasing. The model is trained
from scratch (the task needs no pretrained language) with RoPE, whose relative positions make
copying numbers from the question into the call easy to learn. The recipe's tokenizer
(`data.tool_calls.train_tokenizer`) writes digits one per token and the tools system prompt as
one token, so the longest conversation is 109 tokens and fits seq_len = 128.

Presets:
    default: Llama, 4 layers, width 64, 3000 steps of 16 x 128 tokens (~12 minutes on 2 CPU cores)
    tiny:    Llama, 2 layers, width 64, 30 steps (for tests: checks the pipeline, teaches nothing)
"""

from __future__ import annotations

import ml_collections

from configs import llama

PRESETS = ("default", "tiny")
DATA_DIR = "/tmp/lmlab_agent"  # where data.tool_calls.prepare writes (the command above)
SEQ_LEN = 128


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown agent preset {preset!r}; expected one of {PRESETS}")
    c = llama.get_config("tiny")
    c.objective = "sft"
    c.tokenizer.path = f"{DATA_DIR}/tokenizer"
    c.data.update(source=f"files:{DATA_DIR}/train.jsonl", validation_fraction=0.02, seq_len=SEQ_LEN)
    c.model.update(max_len=SEQ_LEN + 32)  # room to generate after the longest prompt
    c.sft.update(chat_template="chatml", packing="bfd")
    c.optimizer.update(weight_decay=0.0)
    c.eval.update(num_samples=0)
    if preset == "default":
        c.model.update(num_layers=4, rope_theta=10000.0)
        c.steps = 3000  # copying the numbers emerges late: 600 steps give 0%, 1500 give 4.5% (README)
        c.data.update(batch_size=16)
        c.optimizer.update(lr=5e-3)
        c.schedule.update(warmup_steps=50)
        c.eval.update(every_steps=0)
        c.checkpoint.update(save_interval_steps=500)
    return c
