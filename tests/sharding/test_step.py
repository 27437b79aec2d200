"""`sharding.step.build` lays out whatever pure step and init it is given: here a least-squares
objective that is not the language model's, with its own state, trained under ZeRO-3 on 8
devices and on 1 device."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharding import mesh as mesh_lib
from sharding import step as sharded
from sharding.strategies import get_strategy

D_IN, D_OUT, BATCH, STEPS = 16, 32, 16, 3


@flax.struct.dataclass
class State:
    step: jax.Array
    params: Any
    opt_state: Any


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x_BD):
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp"))
        return x_BD @ self.param("kernel", init, (D_IN, D_OUT))


def init_state(rng, *, tx):
    params = Linear().init(rng, jnp.zeros((1, D_IN)))["params"]
    return State(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(nn.unbox(params)))


def least_squares_step(state, batch, rng, *, grad_shardings, tx, seen):
    seen.append(grad_shardings)

    def loss_fn(params):
        return jnp.mean((Linear().apply({"params": params}, batch["x"]) - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    if grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return State(state.step + 1, optax.apply_updates(state.params, updates), opt_state), {"loss": loss}


def _train(strategy: str, devices) -> tuple[sharded.ShardedProgram, list, list[float], Any]:
    tx, seen = optax.sgd(0.1), []
    chosen = get_strategy(strategy)
    program = sharded.build(init_state=functools.partial(init_state, tx=tx),
                            train_step=functools.partial(least_squares_step, tx=tx, seen=seen), tx=tx,
                            strategy=chosen, mesh=mesh_lib.make_mesh("data=-1", devices), batch_size=BATCH,
                            batch_spec=lambda b, _: {"x": jax.ShapeDtypeStruct((b, D_IN), jnp.float32),
                                                     "y": jax.ShapeDtypeStruct((b, D_OUT), jnp.float32),
                                                     "weight": jax.ShapeDtypeStruct((b,), jnp.float32)})
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(BATCH, D_IN)).astype(np.float32),
             "y": rng.normal(size=(BATCH, D_OUT)).astype(np.float32)}
    batch = {k: jax.device_put(v, program.layout.batch) for k, v in batch.items()}
    state, losses = program.init(jax.random.key(0)), []
    for _ in range(STEPS):
        state, metrics = program.step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return program, seen, losses, jax.device_get(state.params)


def test_a_given_step_under_zero3_on_8_devices_equals_one_device():
    program, seen, losses, params = _train("zero3", jax.devices())
    _, seen_1, losses_1, params_1 = _train("dp", jax.devices()[:1])
    # The step got the gradients' layout under ZeRO-3 (split like the params), none under dp.
    assert seen == [program.layout.grads] and seen_1 == [None]
    assert len(program.abstract_state.params["kernel"].sharding.device_set) == 8
    assert not program.abstract_state.params["kernel"].sharding.is_fully_replicated
    assert losses[-1] < losses[0]
    # The step's own batch spec, its rows over the 8 devices whatever the rank of a leaf.
    abstract = program.abstract_batch(BATCH, 0)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
        "x": ((BATCH, D_IN), jnp.float32), "y": ((BATCH, D_OUT), jnp.float32), "weight": ((BATCH,), jnp.float32)}
    assert abstract["weight"].sharding.shard_shape((BATCH,)) == (BATCH // 8,)
    assert abstract["x"].sharding.shard_shape((BATCH, D_IN)) == (BATCH // 8, D_IN)
    # Sums of 16 float32 products in another order: a few eps32 * sqrt(16) relative per step.
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    np.testing.assert_allclose(params["kernel"], params_1["kernel"], rtol=1e-5, atol=1e-6)
