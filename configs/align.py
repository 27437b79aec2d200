"""Alignment on a verifiable task, on CPU: SFT warm start, then GRPO, PPO, DPO and a reward model.

A tiny GPT (2 layers, width 64, 0.12M parameters) with a byte-level tokenizer (256 bytes +
<|endoftext|>) learns 2-digit addition (`data.verifiable`, `task:addition`): `12+34=` -> `46`.
One SFT run of 1000 steps keeps its checkpoints; its step-250 checkpoint is the warm start
(deliberately short: ~30% greedy exact match on the held-out problems, room for the methods
to show a gain), which GRPO, PPO and DPO start from (`init_from=run:ROOT/sft@250`, also their
reference); its last checkpoint (~93%) is the reward model's base. `benchmarks/alignment.py`
writes the files these presets read (the tokenizer, the SFT lines, the preference pairs built
from the warm start's own samples), runs them all and prints the table:

    python benchmarks/alignment.py
    python -m train --config=configs/align.py:sft    --workdir=/tmp/lmlab_align/sft
    python -m train --config=configs/align.py:grpo   --workdir=/tmp/lmlab_align/grpo
    python -m train --config=configs/align.py:ppo    --workdir=/tmp/lmlab_align/ppo
    python -m train --config=configs/align.py:dpo    --workdir=/tmp/lmlab_align/dpo \
        --config.data.validation_fraction=HELD_OUT_PAIRS/ALL_PAIRS   (the benchmark prints it)
    python -m train --config=configs/align.py:reward --workdir=/tmp/lmlab_align/reward \
        --config.data.validation_fraction=HELD_OUT_PAIRS/ALL_PAIRS

Presets:
    sft:    objective=sft on ROOT/addition_sft.jsonl ({"prompt", "completion"} lines of the
            task's 2000 training problems; plain text, so a row is [eos] 12+34= 46 [eos]),
            from scratch, 1000 steps of 32 x 32 tokens, a checkpoint every 250 steps, all kept
    grpo:   objective=grpo on task:addition: 300 rollouts of 32 prompts x 8 completions
            (temperature 0.7), the accuracy reward, one update each
    ppo:    objective=ppo on task:addition: 300 rollouts of 64 prompts (temperature 0.7), the
            accuracy reward, a value head on the policy's trunk
    dpo:    objective=dpo (sigmoid, beta 2) on ROOT/preferences.jsonl, 200 steps of 32 pairs
    reward: objective=reward on the same pairs from the SFT run's last checkpoint, 3000 steps
            of 32 pairs (cosine schedule)
    grpo_rm: grpo with the reward model's score (rl.rewards=model, rl.reward_model=run:ROOT/reward)
            instead of the verifier, and a KL loss to the SFT model (rl.kl_coef=0.2: without it
            the policy found answers the reward model overrates and exact match fell)
"""

from __future__ import annotations

import os

import ml_collections

from configs import base

PRESETS = ("sft", "grpo", "ppo", "dpo", "reward", "grpo_rm")
ROOT = "/tmp/lmlab_align"  # where benchmarks/alignment.py writes the files and runs
TASK = "addition"
WARM_START_STEP = 250  # the SFT checkpoint the policies start from


def paths(root: str = ROOT) -> dict[str, str]:
    """The files and workdirs of the pipeline under `root`."""
    return {"tokenizer": os.path.join(root, "bytes"), "sft_data": os.path.join(root, f"{TASK}_sft.jsonl"),
            "preferences": os.path.join(root, "preferences.jsonl"), "sft": os.path.join(root, "sft")}


def _tiny(c: ml_collections.ConfigDict) -> None:
    c.model.update(num_layers=2, max_len=32)
    c.model.block.update(d_model=64, num_heads=4, d_ff=256)
    c.verifiable.update(num_train=2000, num_eval=200, digits=2)
    c.optimizer.update(weight_decay=0.0)
    c.checkpoint.update(async_save=False, save_interval_steps=1000)
    c.logging.update(tensorboard=False, progress_bar=False, log_every_steps=25)
    c.eval.update(every_steps=0, num_samples=0)


def _sft(c: ml_collections.ConfigDict, root: str) -> None:
    p = paths(root)
    c.objective = "sft"
    c.steps = 1000
    c.tokenizer.path = p["tokenizer"]
    c.data.update(source=f"files:{p['sft_data']}", seq_len=32, batch_size=32, validation_fraction=0.05)
    c.sft.update(packing="greedy")
    c.optimizer.update(lr=3e-3)
    # Constant: the step-250 checkpoint is what a 250-step run would end with.
    c.schedule.update(name="constant", warmup_steps=20)
    c.checkpoint.update(save_interval_steps=WARM_START_STEP, max_to_keep=100)
    c.eval.update(max_batches=2)


def _rl(c: ml_collections.ConfigDict, root: str, objective: str) -> None:
    c.objective = objective
    c.init_from = f"run:{paths(root)['sft']}@{WARM_START_STEP}"
    c.steps = 300
    c.data.update(source=f"task:{TASK}", seq_len=16)
    # The sampled completions' accuracy (~12% at temperature 1) is too sparse a signal; 0.7
    # gives ~20-30% and the greedy answer still gains.
    c.rl.update(max_new_tokens=5, temperature=0.7, rewards="accuracy", kl_coef=0.0)
    c.optimizer.update(lr=3e-4)
    c.schedule.update(name="constant", warmup_steps=0)


def _preferences(c: ml_collections.ConfigDict, root: str, objective: str) -> None:
    p = paths(root)
    c.objective = objective
    c.init_from = f"run:{p['sft']}@{WARM_START_STEP}"
    # The held-out prompts' pairs are the file's last lines: benchmarks/alignment.py sets the
    # validation share to their count.
    c.data.update(source=f"files:{p['preferences']}", seq_len=16, batch_size=32, validation_fraction=0.02)
    c.schedule.update(name="constant", warmup_steps=10)
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
        c.data.batch_size = 32  # 16 prompts reached +19 to +30 points from run to run; 32 steadier
        c.rl.update(num_generations=8)
    elif preset == "grpo_rm":
        _rl(c, ROOT, "grpo")
        c.data.batch_size = 32
        c.rl.update(num_generations=8, rewards="model", reward_model=f"run:{os.path.join(ROOT, 'reward')}",
                    kl_coef=0.2)
    elif preset == "ppo":
        _rl(c, ROOT, "ppo")
        c.data.batch_size = 64
    elif preset == "dpo":
        _preferences(c, ROOT, "dpo")
        c.steps = 200
        # beta 2: a strong pull to the SFT model (at beta 0.1 the chosen answers' log-probs fell
        # with the rejected ones and exact match dropped)
        c.dpo.update(loss="sigmoid", beta=2.0)
        c.optimizer.update(lr=3e-4)
    elif preset == "reward":
        _preferences(c, ROOT, "reward")
        c.init_from = f"run:{paths(ROOT)['sft']}"  # the SFT run's last checkpoint: it knows the sums
        c.steps = 3000
        c.optimizer.update(lr=1e-3)
        c.schedule.update(name="cosine", warmup_steps=100)
        c.logging.update(log_every_steps=100)
    return c
