"""Tool-calling SFT (objective=sft, train/objectives/sft.py): a small GPT learns to call the
calculator on synthetic arithmetic questions and to answer them directly (data/tool_calls.py).

    # the data (train.jsonl, held_out.jsonl) and its tokenizer, then the run
    python -c "from data import tool_calls; tool_calls.prepare('/tmp/lmlab_agent')"
    python -m train --config=configs/agent.py:default --workdir=/tmp/lmlab_agent/run
    # or all of it, with the agent measured against direct answers on the held-out questions:
    python benchmarks/agent.py

The lines are ChatML conversations (plain messages, the tool turns already written by
`agents.calls`), read through the sft objective's `files:` source with the loss on the
assistant's tokens only; conversations are packed best-fit decreasing. The model is trained
from scratch: the task needs no pretrained language, and the tool conversation (about 300
tokens, most of it the tools system prompt) fits seq_len = 320.

Presets:
    default: 4 layers, width 64 (0.25M parameters), 400 steps of 8 x 320 tokens (about 5 minutes
             on 2 idle CPU cores)
    tiny:    2 layers, width 64, 30 steps (for tests: checks the pipeline, teaches nothing)
"""

from __future__ import annotations

import ml_collections

from configs import gpt

PRESETS = ("default", "tiny")
DATA_DIR = "/tmp/lmlab_agent"  # where data.tool_calls.prepare writes (the command above)
SEQ_LEN = 320


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown agent preset {preset!r}; expected one of {PRESETS}")
    c = gpt.get_config("default" if preset == "default" else "tiny")
    c.objective = "sft"
    c.tokenizer.path = f"{DATA_DIR}/tokenizer"
    c.data.update(source=f"files:{DATA_DIR}/train.jsonl", validation_fraction=0.02, seq_len=SEQ_LEN)
    c.model.update(max_len=SEQ_LEN)
    c.sft.update(chat_template="chatml", packing="bfd")
    c.optimizer.update(weight_decay=0.0)
    c.eval.update(num_samples=0)
    if preset == "default":
        c.model.block.update(d_model=64, d_ff=256)
        c.steps = 400
        c.data.update(batch_size=8)
        c.optimizer.update(lr=5e-3)
        c.schedule.update(warmup_steps=50)
        c.eval.update(every_steps=0)
        c.checkpoint.update(save_interval_steps=100)
    else:
        c.data.update(batch_size=4)
    return c
