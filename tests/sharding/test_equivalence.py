"""Sharded == unsharded: every strategy trains the tiny LLaMA and the tiny Mixtral (dropless,
and in capacity mode for expert parallelism's all-to-all) to the same losses and parameters
as one device (float32, within 1e-5 relative), and initialises the same parameters; the sparse
dropless Mixtral under expert parallelism also trains like the dense reference on one device."""

import jax
import numpy as np
import pytest

TOLERANCE = 1e-5

LLAMA_LAYOUTS = [
    ("dp", "data=8"), ("zero1", "data=8"), ("zero2", "data=8"), ("zero3", "data=8"),
    ("zero3", "data=2,fsdp=4"), ("fsdp", "data=2,fsdp=4"), ("tp", "data=4,tensor=2"),
    ("tp_sp", "data=4,tensor=2"), ("fsdp_tp", "data=2,fsdp=2,tensor=2"),
]
MOE_LAYOUTS = [
    ("dp", "data=8"), ("zero1", "data=8"), ("zero2", "data=8"), ("zero3", "data=8"), ("fsdp", "data=2,fsdp=4"),
    ("tp", "data=4,tensor=2"), ("tp_sp", "data=4,tensor=2"), ("fsdp_tp", "data=2,fsdp=2,tensor=2"),
    ("ep", "data=2,expert=4"),
]


def _relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def _check_same(run, reference):
    assert run.program.layout.mesh.size == 8
    np.testing.assert_allclose(run.losses, reference.losses, rtol=TOLERANCE)
    assert reference.losses[-1] < reference.losses[0]  # it trained
    worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(_relative, run.params, reference.params)))
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("strategy,mesh", LLAMA_LAYOUTS)
def test_llama_matches_one_device(tiny_run, strategy, mesh):
    _check_same(tiny_run("llama", strategy, mesh), tiny_run("llama", "dp", "data=1"))


@pytest.mark.parametrize("strategy,mesh", MOE_LAYOUTS)
def test_dropless_moe_matches_one_device(tiny_run, strategy, mesh):
    _check_same(tiny_run("moe", strategy, mesh), tiny_run("moe", "dp", "data=1"))


def test_sparse_dropless_moe_with_expert_parallelism_matches_the_dense_reference(tiny_run):
    """The grouped matmuls over sorted assignments, experts split over 4 devices, train like the
    dense masked einsum on one device (the same sums in another order)."""
    _check_same(tiny_run("moe", "ep", "data=2,expert=4"), tiny_run("moe_dense", "dp", "data=1"))


def test_capacity_moe_with_expert_parallelism_matches_one_device(tiny_run):
    """Capacity is computed over the global batch, so dropping is the same on 8 devices."""
    _check_same(tiny_run("moe_capacity", "ep", "data=2,expert=4"), tiny_run("moe_capacity", "dp", "data=1"))


@pytest.mark.parametrize("model_name,strategy,mesh", [
    ("llama", "zero3", "data=8"), ("llama", "fsdp_tp", "data=2,fsdp=2,tensor=2"), ("moe", "ep", "data=2,expert=4"),
])
def test_sharded_init_equals_one_device(tiny_program, tiny_init, tiny_initial_state, model_name, strategy, mesh):
    """`program.init` creates each shard in place (out_shardings) with the values one device draws."""
    program = tiny_program(model_name, strategy, mesh)
    state = tiny_init(program)
    shardings = jax.tree_util.tree_leaves(program.layout.state)
    assert [x.sharding for x in jax.tree_util.tree_leaves(state)] == shardings
    assert any(not s.is_fully_replicated for s in shardings)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state), tiny_initial_state(model_name))
