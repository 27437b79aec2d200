"""Sharded == unsharded: every strategy trains the tiny models to the same losses and
parameters as one device (float32, within 1e-5 relative)."""

import jax
import numpy as np
import pytest

TOLERANCE = 1e-5

LLAMA_LAYOUTS = [
    ("dp", "data=8"), ("zero1", "data=8"), ("zero2", "data=8"), ("zero3", "data=8"),
    ("zero3", "data=2,fsdp=4"), ("fsdp", "data=2,fsdp=4"), ("tp", "data=4,tensor=2"),
    ("tp_sp", "data=4,tensor=2"), ("fsdp_tp", "data=2,fsdp=2,tensor=2"),
]
MOE_LAYOUTS = [("ep", "data=2,expert=4"), ("ep", "data=4,expert=2"), ("fsdp_tp", "fsdp=4,tensor=2")]


def _relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def _check_same(run, reference):
    np.testing.assert_allclose(run.losses, reference.losses, rtol=TOLERANCE)
    assert reference.losses[-1] < reference.losses[0]  # it trained
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), run.init_params,
                           reference.init_params)
    worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(_relative, run.params, reference.params)))
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("strategy,mesh", LLAMA_LAYOUTS)
def test_llama_matches_one_device(tiny_run, strategy, mesh):
    run = tiny_run("llama", strategy, mesh)
    assert run.program.layout.mesh.size == 8
    _check_same(run, tiny_run("llama", "dp", "data=1"))


@pytest.mark.parametrize("strategy,mesh", MOE_LAYOUTS)
def test_mixtral_matches_one_device(tiny_run, strategy, mesh):
    run = tiny_run("mixtral", strategy, mesh)
    _check_same(run, tiny_run("mixtral", "dp", "data=1"))
