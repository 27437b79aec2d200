"""Tiny LLaMA and Mixtral trained a few steps under a strategy on the 8 simulated CPU devices.

`run(model_name, strategy, mesh)` builds, compiles and trains once per session (the
equivalence, memory and collective tests share the runs). Sizes divide by 8 so that every
leaf splits evenly: Ψ of the LLaMA is 90,432.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from models.gpt import GPT, llama_config, mixtral_config
from sharding import mesh as mesh_lib
from sharding import step as sharded
from sharding.strategies import get_strategy
from train.optimizer import make_optimizer

BATCH, SEQ, VOCAB, STEPS = 16, 16, 128, 5
# Adam's m / (sqrt(v) + eps) is about sign(g): with the default eps 1e-8, float32 rounding of
# a near-zero gradient (summed in another order on 8 devices) can move a weight by a whole
# lr step, up to 3e-5 of a leaf's norm in 5 steps. eps 1e-6 bounds that sensitivity, so the
# comparison measures the layouts, not Adam's conditioning.
ADAM_EPS = 1e-6
SMALL = {"vocab_size": VOCAB, "d_model": 64, "num_heads": 4, "num_kv_heads": 2, "max_len": 32}


def tiny_model(name: str, num_layers: int = 2) -> GPT:
    if name == "llama":
        return GPT(llama_config(num_layers=num_layers, d_ff=128, **SMALL))
    # Capacity mode: the dispatch expert parallelism shards (x_ECD over `expert`).
    return GPT(mixtral_config(num_experts=4, capacity_factor=2.0, aux_loss_weight=0.01, num_layers=num_layers,
                              d_ff=64, **SMALL))


def tiny_batch() -> dict[str, np.ndarray]:
    """Two packed documents per row, the last 3 tokens padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    segments = np.where(np.arange(SEQ) < SEQ // 2, 1, 2).astype(np.int32)
    segments[-3:] = 0
    positions = np.where(segments == 1, np.arange(SEQ), np.arange(SEQ) - SEQ // 2)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.tile(segments, (BATCH, 1)),
            "positions": np.tile(positions, (BATCH, 1)).astype(np.int32),
            "loss_mask": np.tile(segments > 0, (BATCH, 1)).astype(np.int32)}


@dataclasses.dataclass
class Run:
    program: sharded.ShardedProgram
    compiled: jax.stages.Compiled
    init_params: dict
    params: dict
    state: object
    losses: list[float]


@functools.cache
def run(model_name: str, strategy: str, mesh: str = "", num_layers: int = 2, train: bool = True) -> Run:
    """Trains STEPS steps (or with train=False only compiles); mesh "data=1" is one device."""
    chosen = get_strategy(strategy)
    devices = jax.devices()[:1] if mesh == "data=1" else None
    program = sharded.build(tiny_model(model_name, num_layers), make_optimizer(learning_rate=3e-3, eps=ADAM_EPS),
                            lambda step: 3e-3, strategy=chosen, mesh=mesh_lib.make_mesh(mesh or chosen.default_mesh,
                                                                                          devices),
                            seq_len=SEQ, batch_size=BATCH)
    compiled = program.step.lower(program.abstract_state, program.abstract_batch(BATCH, SEQ),
                                  jax.random.key(1)).compile()
    if not train:
        return Run(program, compiled, {}, {}, None, [])
    state = program.init(jax.random.key(0))
    init_params = jax.device_get(state.params)
    batch = {k: jax.device_put(v, program.layout.batch) for k, v in tiny_batch().items()}
    losses = []
    for _ in range(STEPS):
        state, metrics = program.step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return Run(program, compiled, init_params, jax.device_get(state.params), state, losses)


@pytest.fixture(scope="session")
def tiny_run():
    return run


@pytest.fixture(scope="session")
def make_tiny_model():
    return tiny_model
