"""The language model's sharded program: `train.step`'s init and step, bound to a model and
optimizer and handed to `sharding.step.build`, which lays them out by a strategy.

    program = train.program.build(model, tx, schedule, strategy=get_strategy("zero3"),
                                  mesh=make_mesh("data=-1"), seq_len=64, batch_size=8)
    state = program.init(jax.random.key(0))
    state, metrics = program.step(state, batch, rng)   # batch placed by program.layout.batch

`build_for_run` takes the step settings from a run config (the trainer and the sharding CLIs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sharding import step as sharded_step
from sharding.strategies import Strategy
from train import step as step_lib


def build(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, *, strategy: Strategy,
          mesh: Mesh, seq_len: int, batch_size: int | None = None, **step_kwargs) -> sharded_step.ShardedProgram:
    """`train.step.init_state` and `train.step.train_step` laid out by `strategy` on `mesh`.

    Args:
      model: the flax model (its params named by logical axes).
      tx: the optimizer.
      schedule: the learning-rate schedule (for the step's metrics).
      strategy: the sharding strategy.
      mesh: the mesh.
      seq_len: the training sequence length (shape of the init sample; sequence parallelism).
      batch_size: the global (micro-)batch, checked against the batch axes if given.
      **step_kwargs: further static arguments of `train.step.train_step` (grad_accum_steps,
        z_loss, ...).

    Returns:
      The `sharding.step.ShardedProgram`.
    """
    init_state = functools.partial(step_lib.init_state, sample_ids_BT=jnp.zeros((1, seq_len), jnp.int32),
                                   model=model, tx=tx)
    train_step = functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule, **step_kwargs)
    return sharded_step.build(init_state=init_state, train_step=train_step, tx=tx, strategy=strategy, mesh=mesh,
                              seq_len=seq_len, batch_size=batch_size)


def build_for_run(config, model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, *,
                  strategy: Strategy, mesh: Mesh, mlm=None) -> sharded_step.ShardedProgram:
    """`build` with the step settings of a run config (`configs/base.py`): sequence length,
    micro-batch (data.batch_size / optimizer.grad_accum_steps), z-loss, label smoothing, the
    multi-token-prediction weight and the MoE correction-bias rate; `mlm` for a masked LM."""
    accum = config.optimizer.grad_accum_steps
    if config.data.batch_size % accum:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                         f"optimizer.grad_accum_steps={accum}")
    return build(model, tx, schedule, strategy=strategy, mesh=mesh, seq_len=config.data.seq_len,
                 batch_size=config.data.batch_size // accum, grad_accum_steps=accum, z_loss=config.optimizer.z_loss,
                 label_smoothing=config.optimizer.label_smoothing, mlm=mlm,
                 mtp_loss_weight=config.model.mtp_loss_weight, bias_update_rate=config.model.moe.bias_update_rate)
