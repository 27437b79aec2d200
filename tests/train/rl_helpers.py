"""Shared pieces of the RL tests: a tiny LLaMA run (config, model, program) without data files,
a stand-in tokenizer and hand-made prompts."""

from __future__ import annotations

import os
import types

import jax
import numpy as np

from configs import base
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from train import build
from train import program as program_lib
from train.optimizer import make_optimizer

VOCAB = 64
EOS = 3
STRATEGIES = {"dp": "data=8", "fsdp": "fsdp=8", "fsdp1": "fsdp=1"}


def tiny_config(*, seq_len: int = 16, batch_size: int = 8, method: str = "full", objective: str = "",
                max_new_tokens: int = 6):
    config = base.get_config()
    config.objective = objective
    config.model.update(family="llama", num_layers=1, max_len=32, positional="rope", tie_embeddings=False)
    config.model.block.update(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, mlp_activation="swiglu",
                              norm="rmsnorm", use_bias=False)
    config.data.update(seq_len=seq_len, batch_size=batch_size)
    config.finetune.method = method
    if method == "lora":
        config.finetune.lora.update(rank=4)
    config.rl.update(max_new_tokens=max_new_tokens, num_generations=2)
    return config


class Tokenizer:
    """Decodes ids as space-separated numbers; eos EOS."""

    eos_id = EOS
    bos_id = None
    vocab_size = VOCAB

    def decode(self, ids):
        return " ".join(str(i) for i in ids)

    def encode(self, text):
        return [int(t) if t.isdigit() else 1 for t in text.split() for _ in range(1 if t.isdigit() else 2)]


def optimizer(lr: float = 1e-2):
    """The tests' Adam (eps 1e-5: a near-zero gradient's rounding is not amplified into a whole step)."""
    return make_optimizer(learning_rate=lr, eps=1e-5)


def tiny_run(config, strategy: str = "dp", *, objective=None, lr: float = 1e-2):
    """A Run-like namespace (config, model, layout, init and step) for `strategy` on its mesh;
    `objective`: model -> the objective (None: the config's lm)."""
    model = build.model(config, VOCAB)
    tx = optimizer(lr)
    objective = objective(model) if objective is not None else None
    program = program_lib.build_for_run(config, model, tx, lambda step: lr, strategy=get_strategy(strategy),
                                        mesh=mesh_lib.make_mesh(STRATEGIES[strategy]), objective=objective)
    return types.SimpleNamespace(config=config, model=model, objective=objective, layout=program.layout,
                                 init_fn=program.init,
                                 step_fn=program.step, tokenizer=Tokenizer(), is_lead=jax.process_index() == 0,
                                 batch_sharding=program.layout.batch, abstract_state=program.abstract_state)


def prompt_rows(num: int, width: int = 8, seed: int = 0) -> dict:
    """`num` prompts of lengths 1..width-2 (ids 4..VOCAB-1), right-padded with 0."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width - 1, num).astype(np.int32)
    ids = np.zeros((num, width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(4, VOCAB, n)
    return {"prompt_ids": ids, "prompt_len": lengths, "index": np.arange(num, dtype=np.int32)}


REWARD_LOG = "LMLAB_TEST_REWARD_LOG"  # a file each call of digit_reward appends "process rows" to


def digit_reward(prompts, completions, **fields):
    """The share of a completion's characters that are digits (a reward with spread for tests).
    With $LMLAB_TEST_REWARD_LOG set, each call appends the calling process and its row count."""
    if os.environ.get(REWARD_LOG):
        with open(os.environ[REWARD_LOG], "a") as f:
            f.write(f"{jax.process_index()} {len(completions)}\n")
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
