"""Sharded == unsharded: every strategy trains the tiny LLaMA and the tiny Mixtral (dropless,
and in capacity mode for expert parallelism's all-to-all) to the same losses and parameters
as one device (float32, within 1e-5 relative), and initialises the same parameters; the sparse
dropless Mixtral under expert parallelism also trains like the dense reference on one device, and
so does the Mixtral whose tokens move by explicit all-to-alls (dropless and capacity);
once more at Adam's default eps and XLA's default compile options (ZeRO-3), with the tolerance
of its float32 rounding derived below."""

import math

import jax
import numpy as np
import pytest

# At Adam eps 1e-5 (tests/sharding/conftest.py says why) the runs stay within 1e-5 of one
# device's, relative, in the losses and in each parameter leaf's norm (the README's number).
# Why that holds: a gradient element summed in another order moves by about
# 4 * EPS32 * sqrt(N) * (rms gradient) = 7e-6 of the rms gradient (N = 208 tokens, see the
# last test); Adam turns that into the same relative error of the element's step (less where
# |g| < eps), and 5 steps of lr 3e-3 are ~0.5 of a weight leaf's norm: ~3.5e-6 relative for
# gradients at the rms, with room to 1e-5 for leaves whose elements sit below it.
TOLERANCE = 1e-5
EPS32 = float(np.finfo(np.float32).eps)
# Tokens the loss counts: 16 rows of 16, the last 3 of each padding.
COUNTED_TOKENS = 16 * 13

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


@pytest.mark.parametrize("model_name,reference", [("moe_a2a", "moe"), ("moe_capacity_a2a", "moe_capacity")])
def test_all_to_all_dispatch_with_expert_parallelism_matches_one_device(tiny_run, model_name, reference):
    """Tokens sent to their experts' devices by explicit all-to-alls (model.moe.dispatch=all_to_all),
    dropless and in capacity mode, train like the default dispatch on one device."""
    _check_same(tiny_run(model_name, "ep", "data=2,expert=4"), tiny_run(reference, "dp", "data=1"))


@pytest.mark.parametrize("model_name,strategy,mesh", [
    ("llama", "zero3", "data=8"), ("llama", "fsdp_tp", "data=2,fsdp=2,tensor=2"), ("moe", "ep", "data=2,expert=4"),
    ("moe_a2a", "ep", "data=2,expert=4"),  # init traces a one-row sample, which the all-to-alls cannot split
])
def test_sharded_init_equals_one_device(tiny_program, tiny_init, tiny_initial_state, model_name, strategy, mesh):
    """`program.init` creates each shard in place (out_shardings) with the values one device draws."""
    program = tiny_program(model_name, strategy, mesh)
    state = tiny_init(program)
    shardings = jax.tree_util.tree_leaves(program.layout.state)
    assert [x.sharding for x in jax.tree_util.tree_leaves(state)] == shardings
    assert any(not s.is_fully_replicated for s in shardings)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state), tiny_initial_state(model_name))


def test_zero3_at_default_eps_and_compile_options_matches_one_device(tiny_run):
    """The suite's runs use Adam eps 1e-5 and FAST_COMPILE; this one runs as users do.

    Losses: each is a mean over N = 208 tokens; summed in another order it moves by about
    EPS32 * sqrt(N) of itself (the random-walk estimate; x4 for its spread): 6.9e-6. The
    parameter differences add only at second order (first order is sum g_i dp_i, and Adam
    amplifies rounding only where g_i ~ 0).

    Parameters: at eps 1e-8 Adam's step lr * m / sqrt(v) is scale-free per element, so a
    gradient element's relative rounding error becomes the same relative error of its step.
    That error is EPS32 * sqrt(N) * (rms gradient) / |g_i| (x4 as above); allowing elements
    down to 1% of their leaf's rms gradient, each leaf's difference stays within
    4 * EPS32 * sqrt(N) * 100 = 6.9e-4 of the norm of its own update (measured on one
    AVX-512 CPU: 6.3e-5, an MLP up-projection). A layout error (a missing or doubled reduction) moves
    the steps by O(1) of themselves.
    """
    rounding = 4 * EPS32 * math.sqrt(COUNTED_TOKENS)
    run = tiny_run("llama", "zero3", "data=8", defaults=True)
    reference = tiny_run("llama", "dp", "data=1", defaults=True)
    assert run.program.layout.mesh.size == 8
    np.testing.assert_allclose(run.losses, reference.losses, rtol=rounding)
    assert reference.losses[-1] < reference.losses[0]
    for (path, got), want, start in zip(jax.tree_util.tree_leaves_with_path(run.params),
                                        jax.tree_util.tree_leaves(reference.params),
                                        jax.tree_util.tree_leaves(reference.init_params)):
        got, want, start = (np.asarray(x, np.float64) for x in (got, want, start))
        step_error = np.linalg.norm(got - want) / np.linalg.norm(want - start)
        assert step_error < 100 * rounding, (jax.tree_util.keystr(path), step_error)
