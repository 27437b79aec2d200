"""Per-device memory of the tiny LLaMA (Ψ = 90,432, every leaf divisible by 8) on 8 devices:
measured from the arrays' addressable shards and from the shardings, against the f32 ZeRO
formulas (params 4Ψ, grads 4Ψ, Adam 8Ψ, each divided by N = 8 from its stage on), and the
compiled step's argument bytes against that accounting."""

import math

import jax
import numpy as np
import pytest

from sharding import analysis

N = 8
# Adam's step count (int32), replicated beside the split moments.
COUNT_BYTES = 4


def _num_params(run) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(run.program.abstract_state.params))


@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2", "zero3"])
def test_state_bytes_match_zero_formulas(tiny_run, strategy):
    run = tiny_run("llama", strategy, "data=8")
    psi = _num_params(run)
    assert psi == 90_432
    expected = analysis.zero_bytes(psi, N, strategy, precision="f32")
    from_shardings = analysis.state_bytes(run.program.layout, run.program.abstract_state)
    assert from_shardings["params"] == expected["params"]
    assert from_shardings["grads"] == expected["grads"]
    assert from_shardings["opt_state"] == expected["opt_state"] + COUNT_BYTES
    # The arrays the step returned hold exactly that.
    assert analysis.addressable_bytes(run.state.params) == expected["params"]
    assert analysis.addressable_bytes(run.state.opt_state) == expected["opt_state"] + COUNT_BYTES

    # XLA's arguments: the state (params, Adam state, step) and this device's rows of the batch.
    batch_bytes = 5 * (16 // N) * 16 * 4
    compiled = analysis.compiled_memory(run.compiled)
    state = from_shardings["params"] + from_shardings["opt_state"] + 4
    assert compiled["argument"] == state + batch_bytes
    assert compiled["alias"] >= state - 8  # the donated state is updated in place


def test_zero_formulas_match_the_paper():
    """ZeRO paper Table 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12)."""
    gb = {s: analysis.zero_bytes(7.5e9, 64, s)["total"] / 1e9 for s in ("dp", "zero1", "zero2", "zero3")}
    np.testing.assert_allclose(list(gb.values()), [120, 31.40625, 16.640625, 1.875])
    f32 = analysis.zero_bytes(1000, 10, "zero2", precision="f32")
    assert (f32["params"], f32["grads"], f32["opt_state"]) == (4000, 400, 800)


def test_model_parallel_split(tiny_run):
    """tp halves every weight but the 5 norms over tensor=2; fsdp_tp then splits by fsdp=2."""
    tp = analysis.state_bytes(tiny_run("llama", "tp", "data=4,tensor=2").program.layout,
                              tiny_run("llama", "tp", "data=4,tensor=2").program.abstract_state)
    norms = 5 * 64
    assert tp["params"] == 4 * ((90_432 - norms) // 2 + norms)
    two_d = tiny_run("llama", "fsdp_tp", "data=2,fsdp=2,tensor=2")
    assert analysis.state_bytes(two_d.program.layout, two_d.program.abstract_state)["params"] == \
        4 * ((90_432 - norms) // 4 + norms // 2)
