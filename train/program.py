"""A run's sharded program: `train.step`'s init and step, bound to an objective (its model)
and optimizer and handed to `sharding.step.build`, which lays them out by a strategy.

    program = train.program.build(model, tx, schedule, strategy=get_strategy("zero3"),
                                  mesh=make_mesh("data=-1"), seq_len=64, batch_size=8,
                                  objective=objective)      # None: the next-token objective
    state = program.init(jax.random.key(0))
    state, metrics = program.step(state, batch, rng)   # batch placed by program.layout.batch

`build_for_run` takes the objective, what trains and the step settings from a run config
(the trainer, the validation and the sharding CLIs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sharding import step as sharded_step
from sharding.strategies import Strategy, model_shards
from train import step as step_lib
from train import trainable as trainable_lib


def build(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, *, strategy: Strategy,
          mesh: Mesh, seq_len: int, batch_size: int | None = None, objective=None, grad_accum_steps: int = 1,
          split: Callable | None = None, store_frozen: Callable | None = None,
          **lm_settings) -> sharded_step.ShardedProgram:
    """`train.step.init_state` and `train.step.train_step` laid out by `strategy` on `mesh`.

    Args:
      model: the flax model (its params named by logical axes).
      tx: the optimizer (of the trainable params).
      schedule: the learning-rate schedule (for the step's metrics).
      strategy: the sharding strategy.
      mesh: the mesh.
      seq_len: the training sequence length (shape of the init sample and the batch spec;
        sequence parallelism).
      batch_size: the global (micro-)batch, checked against the batch axes if given.
      objective: the objective (`train.objectives`); None: the next-token objective of
        `model` with `lm_settings` (or the masked LM with `mlm=MLMConfig`).
      grad_accum_steps: micro-batches per step.
      split: params -> (trainable, frozen) (`train.trainable.split`); None: all train.
      store_frozen: frozen -> as stored (qlora's quantization); None: as is.
      **lm_settings: z_loss, label_smoothing, mtp_loss_weight, bias_update_rate, mlm (only
        without `objective`).

    Returns:
      The `sharding.step.ShardedProgram`.
    """
    if objective is None:
        from train.objectives import lm, mlm

        mlm_config = lm_settings.pop("mlm", None)
        objective = (lm.LMObjective(model, **lm_settings) if mlm_config is None else
                     mlm.MLMObjective(model, mlm=mlm_config, **lm_settings))
    elif lm_settings:
        raise TypeError(f"{sorted(lm_settings)} are settings of the default objective; set them on `objective`")
    init_state = functools.partial(step_lib.init_state, sample_ids_BT=jnp.zeros((1, seq_len), jnp.int32),
                                   model=model, tx=tx, split=split, store_frozen=store_frozen)
    train_step = functools.partial(step_lib.train_step, objective=objective, tx=tx, schedule=schedule,
                                   grad_accum_steps=grad_accum_steps)
    return sharded_step.build(init_state=init_state, train_step=train_step, tx=tx, strategy=strategy, mesh=mesh,
                              seq_len=seq_len, batch_size=batch_size, batch_spec=objective.batch_spec)


def build_for_run(config, model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, *,
                  strategy: Strategy, mesh: Mesh, objective=None) -> sharded_step.ShardedProgram:
    """`build` with the settings of a run config (`configs/base.py`): the objective (see
    `train.objectives.get`; None: the config's, built without a tokenizer, for plans that only
    compile), sequence length, micro-batch (data.batch_size / optimizer.grad_accum_steps) and
    what trains (`finetune.*`, `train.trainable`)."""
    if objective is None:
        from train import objectives

        objective = objectives.get(config, model, None)
    accum = config.optimizer.grad_accum_steps
    if config.data.batch_size % accum:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                         f"optimizer.grad_accum_steps={accum}")
    split = functools.partial(trainable_lib.split, config=config,
                              objective_head=getattr(objective, "trainable_head", ""))
    return build(model, tx, schedule, strategy=strategy, mesh=mesh, seq_len=config.data.seq_len,
                 batch_size=config.data.batch_size // accum, objective=objective, grad_accum_steps=accum,
                 split=split, store_frozen=functools.partial(trainable_lib.store_frozen, config=config,
                                                             shards=model_shards(strategy, mesh)))
