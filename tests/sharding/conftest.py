"""Tiny LLaMA and Mixtral trained a few steps under a strategy on the 8 simulated CPU devices.

`run(model_name, strategy, mesh)` builds, compiles and trains once per session (the
equivalence, memory and collective tests share the runs). Sizes divide by 8 so that every
leaf splits evenly: Ψ of the LLaMA is 90,432.

Models: "llama"; "moe", a Mixtral of 4 experts, top-2, dropless (every token reaches its
experts: sorted by expert, grouped matmuls); "moe_dense", the same computed by the dense
masked reference (dropless_impl="dense"); "moe_capacity", the same in capacity mode, whose
one-hot dispatch of tokens to experts is what expert parallelism turns into all-to-alls;
"moe_a2a" and "moe_capacity_a2a", "moe" and "moe_capacity" with `dispatch="all_to_all"` (tokens
sent to their experts' devices by explicit all-to-alls, models/layers/expert_dispatch.py).
"llama_ring", the LLaMA with attention impl "ring" (context parallelism's; blockwise where
the sequence is not split).

To keep the suite quick every run starts from the same initial state (one device's init,
placed by the run's layout; `test_equivalence` checks that the sharded init equals it), and
steps are compiled for speed, not for fast code (`FAST_COMPILE`). `run(..., defaults=True)`
trains as users do instead: Adam's default eps and XLA's default compile options.
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
from train import program as program_lib
from train.optimizer import make_optimizer

BATCH, SEQ, VOCAB, STEPS = 16, 16, 128, 5
# LLVM at -O0 and XLA's older elemental emitters instead of its MLIR fusion emitters: a third
# of the compile time on CPU. The HLO passes (sharding propagation, SPMD partitioning, the
# collectives) and the buffer assignment are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# Adam's m / (sqrt(v) + eps) is about sign(g): with the default eps 1e-8, float32 rounding of
# a near-zero gradient (an embedding or output row of a token the batch hardly has, summed in
# another order on 8 devices) can move a weight by a whole lr step. eps 1e-5 (still far below
# the typical |g|) bounds that sensitivity, so the comparison measures the layouts, not
# Adam's conditioning: the worst leaf then differs by about 2e-6 relative (6.5e-6 with eps 1e-6).
ADAM_EPS = 1e-5
SMALL = {"vocab_size": VOCAB, "d_model": 64, "num_heads": 4, "num_kv_heads": 2, "max_len": 32}
MODELS = ("llama", "moe", "moe_dense", "moe_capacity", "moe_a2a", "moe_capacity_a2a", "llama_ring")


def tiny_model(name: str, num_layers: int = 2) -> GPT:
    if name in ("llama", "llama_ring"):
        return GPT(llama_config(num_layers=num_layers, d_ff=128, **SMALL,
                                **({"attention_impl": "ring"} if name == "llama_ring" else {})))
    if name not in MODELS:
        raise ValueError(f"tiny model {name!r}; expected one of {MODELS}")
    config = mixtral_config(num_experts=4, capacity_factor=2.0 if name.startswith("moe_capacity") else 0.0,
                            aux_loss_weight=0.01, num_layers=num_layers, d_ff=64, **SMALL)
    changes = {"moe_dense": {"dropless_impl": "dense"}}.get(name, {"dispatch": "all_to_all"} if "a2a" in name else {})
    if changes:
        config = dataclasses.replace(config, block=dataclasses.replace(
            config.block, moe=dataclasses.replace(config.block.moe, **changes)))
    return GPT(config)


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
def build(model_name: str, strategy: str, mesh: str = "", num_layers: int = 2,
          defaults: bool = False) -> sharded.ShardedProgram:
    """The sharded program of a tiny model; mesh "data=1" is one device; `defaults`: Adam's default eps."""
    chosen = get_strategy(strategy)
    devices = jax.devices()[:1] if mesh == "data=1" else None
    eps = {} if defaults else {"eps": ADAM_EPS}
    return program_lib.build(tiny_model(model_name, num_layers), make_optimizer(learning_rate=3e-3, **eps),
                             lambda step: 3e-3, strategy=chosen,
                             mesh=mesh_lib.make_mesh(mesh or chosen.default_mesh, devices), seq_len=SEQ,
                             batch_size=BATCH)


def init(program: sharded.ShardedProgram):
    """`program.init(key(0))`, compiled like the steps."""
    return program.init.lower(jax.random.key(0)).compile(FAST_COMPILE)(jax.random.key(0))


@functools.cache
def initial_state(model_name: str, num_layers: int = 2):
    """One device's initial state, on the host (every run starts from it)."""
    return jax.device_get(init(build(model_name, "dp", "data=1", num_layers)))


@functools.cache
def run(model_name: str, strategy: str, mesh: str = "", num_layers: int = 2, train: bool = True,
        defaults: bool = False) -> Run:
    """Trains STEPS steps (or with train=False only compiles); mesh "data=1" is one device;
    `defaults`: Adam's default eps and XLA's default compile options (not FAST_COMPILE)."""
    program = build(model_name, strategy, mesh, num_layers, defaults)
    compiled = program.step.lower(program.abstract_state, program.abstract_batch(BATCH, SEQ),
                                  jax.random.key(1)).compile(None if defaults else FAST_COMPILE)
    if not train:
        return Run(program, compiled, {}, {}, None, [])
    start = initial_state(model_name, num_layers)
    state = jax.device_put(start, program.layout.state)
    batch = {k: jax.device_put(v, program.layout.batch) for k, v in tiny_batch().items()}
    losses = []
    for _ in range(STEPS):
        state, metrics = compiled(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return Run(program, compiled, start.params, jax.device_get(state.params), state, losses)


@pytest.fixture(scope="session")
def tiny_run():
    return run


@pytest.fixture(scope="session")
def tiny_program():
    return build


@pytest.fixture(scope="session")
def tiny_initial_state():
    return initial_state


@pytest.fixture(scope="session")
def tiny_init():
    return init


@pytest.fixture(scope="session")
def make_tiny_model():
    return tiny_model
