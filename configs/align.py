"""Alignment on a verifiable task, on CPU: SFT warm start, then GRPO, PPO, DPO and a reward model.

A tiny GPT (2 layers, width 64) with a byte-level tokenizer (256 bytes + <|endoftext|>)
learns 2-digit addition (`data.verifiable`, `task:addition`): `12+34=` -> `46`. The SFT run
is deliberately short, so that its greedy exact match on the held-out problems is partial
(~30%); each method then starts from it (`init_from=run:ROOT/sft`). `benchmarks/alignment.py`
writes the files these presets read (the tokenizer, the SFT lines, the preference pairs built
from the SFT model's own samples) and runs them all:

    python benchmarks/alignment.py                      # everything, the table at the end
    python -m train --config=configs/align.py:sft  --workdir=/tmp/lmlab_align/sft
    python -m train --config=configs/align.py:grpo --workdir=/tmp/lmlab_align/grpo
    python -m train --config=configs/align.py:ppo  --workdir=/tmp/lmlab_align/ppo
    python -m train --config=configs/align.py:dpo  --workdir=/tmp/lmlab_align/dpo
    python -m train --config=configs/align.py:reward --workdir=/tmp/lmlab_align/reward

Presets:
    sft:    objective=sft on ROOT/addition_sft.jsonl ({"prompt", "completion"} lines of the
            task's training split; plain text, so a row is [eos] 12+34= 46 [eos]), from scratch
    grpo:   objective=grpo on task:addition (8 prompts x 8 completions per rollout, accuracy reward)
    ppo:    objective=ppo on task:addition
    dpo:    objective=dpo on ROOT/preferences.jsonl (the SFT model's correct vs wrong samples)
    reward: objective=reward on the same pairs (a score head on the SFT model)
"""

from __future__ import annotations

import os

import ml_collections

from configs import base

PRESETS = ("sft", "grpo", "ppo", "dpo", "reward")
ROOT = "/tmp/lmlab_align"  # where benchmarks/alignment.py writes the files and runs
TASK = "addition"


def paths(root: str = ROOT) -> dict[str, str]:
    """The files and workdirs of the pipeline under `root`."""
    return {"tokenizer": os.path.join(root, "bytes"), "sft_data": os.path.join(root, f"{TASK}_sft.jsonl"),
            "preferences": os.path.join(root, "preferences.jsonl"), "sft": os.path.join(root, "sft")}


def _tiny(c: ml_collections.ConfigDict) -> None:
    c.model.update(num_layers=2, max_len=32)
    c.model.block.update(d_model=64, num_heads=4, d_ff=256)
    c.verifiable.update(num_train=2000, num_eval=200, digits=2)
    c.optimizer.update(weight_decay=0.0)
    c.checkpoint.update(async_save=False)
    c.logging.update(tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=0, num_samples=0)


def _sft(c: ml_collections.ConfigDict, root: str) -> None:
    p = paths(root)
    c.objective = "sft"
    c.steps = 250  # ~30% held-out exact match: room for the methods to show a gain
    c.tokenizer.path = p["tokenizer"]
    c.data.update(source=f"files:{p['sft_data']}", seq_len=32, batch_size=32, validation_fraction=0.05)
    c.sft.update(packing="greedy")
    c.optimizer.update(lr=3e-3)
    c.schedule.update(name="constant", warmup_steps=20)
    c.checkpoint.update(save_interval_steps=250)
    c.logging.update(log_every_steps=50)
    c.eval.update(max_batches=2)


def _rl(c: ml_collections.ConfigDict, root: str, objective: str) -> None:
    c.objective = objective
    c.init_from = f"run:{paths(root)['sft']}"
    c.data.update(source=f"task:{TASK}", seq_len=16, batch_size=8)
    c.rl.update(max_new_tokens=5, temperature=1.0, rewards="accuracy", kl_coef=0.0)
    c.optimizer.update(lr=1e-3)
    c.schedule.update(name="constant", warmup_steps=0)
    c.checkpoint.update(save_interval_steps=1000)
    c.logging.update(log_every_steps=10)


def _preferences(c: ml_collections.ConfigDict, root: str, objective: str) -> None:
    p = paths(root)
    c.objective = objective
    c.init_from = f"run:{p['sft']}"
    # The held-out prompts' pairs are the file's last lines: benchmarks/alignment.py sets the
    # validation share to their count.
    c.data.update(source=f"files:{p['preferences']}", seq_len=16, batch_size=32, validation_fraction=0.1)
    c.schedule.update(name="constant", warmup_steps=10)
    c.checkpoint.update(save_interval_steps=1000)
    c.logging.update(log_every_steps=10)
    c.eval.update(max_batches=0)


def get_config(preset: str = "sft") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown align preset {preset!r}; expected one of {PRESETS}")
    c = base.get_config()
    _tiny(c)
    if preset == "sft":
        _sft(c, ROOT)
    elif preset == "grpo":
        _rl(c, ROOT, "grpo")
        c.steps = 100
        c.rl.update(num_generations=8)
    elif preset == "ppo":
        _rl(c, ROOT, "ppo")
        c.steps = 100
    elif preset == "dpo":
        _preferences(c, ROOT, "dpo")
        c.steps = 200
        # beta 2: a strong pull to the SFT model (beta 0.1 lowered the chosen answers' log-probs
        # with the rejected ones and exact match fell)
        c.dpo.update(loss="sigmoid", beta=2.0)
        c.optimizer.update(lr=3e-4)
    elif preset == "reward":
        _preferences(c, ROOT, "reward")
        c.steps = 200
        c.optimizer.update(lr=1e-3)
    return c
