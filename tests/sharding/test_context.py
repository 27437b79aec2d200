"""Context parallelism (`cp`, `fsdp_cp`; `sharding/context.py`): the zig-zag order balances causal
work, and the tiny LLaMA with ring attention trains under cp and fsdp_cp to the losses and
parameters of one device with full (xla) attention; its step passes K/V by collective-permutes
and gathers no activation along the sequence."""

import jax
import numpy as np
import pytest

from sharding import mesh as mesh_lib
from sharding.context import ring_size, zigzag_batch, zigzag_order
from sharding.strategies import check_applies, get_strategy

# As in test_equivalence (its docstring derives it): at Adam eps 1e-5 a layout that only sums
# in another order stays within 1e-5 relative of one device, in the losses and in each
# parameter leaf's norm.
TOLERANCE = 1e-5


def _relative(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def _causal_pairs_per_device(order: np.ndarray, ring: int) -> np.ndarray:
    """[C] live causal (query, key) pairs of each device's contiguous slice of `order`."""
    queries = order.reshape(ring, -1)
    return np.array([(q[:, None] >= order[None, :]).sum() for q in queries])


def test_zigzag_order_gives_each_device_chunks_i_and_2c_minus_1_minus_i():
    order = zigzag_order(32, 4)
    assert sorted(order) == list(range(32))
    slices = order.reshape(4, 8)
    for r in range(4):
        assert list(slices[r]) == [*range(4 * r, 4 * r + 4), *range(4 * (7 - r), 4 * (7 - r) + 4)]


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_zigzag_balances_causal_work_and_contiguous_does_not(ring):
    T = 16 * ring
    balanced = _causal_pairs_per_device(zigzag_order(T, ring), ring)
    assert (balanced == balanced[0]).all()
    contiguous = _causal_pairs_per_device(np.arange(T), ring)
    assert (np.diff(contiguous) > 0).all() and contiguous.sum() == balanced.sum()


def test_zigzag_batch_reorders_token_leaves_only():
    batch = {"inputs": np.arange(32).reshape(2, 16), "rows": np.arange(2), "other": np.zeros((2, 5))}
    out = zigzag_batch(batch, 16, 4)
    np.testing.assert_array_equal(out["inputs"], batch["inputs"][:, zigzag_order(16, 4)])
    assert out["rows"] is batch["rows"] and out["other"] is batch["other"]


def test_a_sequence_that_does_not_split_into_2c_chunks_is_refused():
    mesh = mesh_lib.make_mesh("data=2,context=4")
    with pytest.raises(ValueError, match=r"data.seq_len = 12\) into 2 x 4 zig-zag chunks .* multiple of 8"):
        check_applies(get_strategy("cp"), mesh, seq_len=12)
    with pytest.raises(ValueError, match="multiple of 8"):
        zigzag_order(12, 4)
    assert ring_size(get_strategy("cp"), mesh) == 4 and ring_size(get_strategy("dp"), mesh_lib.make_mesh("data=8")) == 1


@pytest.mark.parametrize("strategy,mesh", [("cp", "data=2,context=4"), ("fsdp_cp", "fsdp=2,context=4")])
def test_llama_with_ring_attention_matches_one_device(tiny_run, strategy, mesh):
    """The tiny batch packs two documents per row with padding: positions, segments and the
    loss mask all travel with the reordered tokens."""
    run, reference = tiny_run("llama_ring", strategy, mesh), tiny_run("llama", "dp", "data=1")
    np.testing.assert_allclose(run.losses, reference.losses, rtol=TOLERANCE)
    assert reference.losses[-1] < reference.losses[0]
    worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(_relative, run.params, reference.params)))
    assert worst < TOLERANCE, worst
    hlo = run.compiled.as_text()
    assert "collective-permute" in hlo
    if strategy == "cp":  # parameters replicated: nothing is gathered, the sequence stays split
        assert "all-gather" not in hlo
