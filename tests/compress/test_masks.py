"""compress.masks against a plain-Python selection: exact counts, ties by position, N:M groups
along the kernels' contraction axes, and the masks of a params tree."""

import numpy as np
import pytest

from compress import masks


def keep_largest(values, keep):
    """Reference: indices of the `keep` largest values, equal values kept in order of position."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return set(order[:keep])


def reference_mask(scores, sparsity, axis):
    scores = np.asarray(scores, np.float64)
    out = np.zeros(scores.shape, bool)
    if axis is None:
        flat = scores.reshape(-1)
        kept = keep_largest(list(flat), flat.size - round(sparsity * flat.size))
        out.reshape(-1)[list(kept)] = True
        return out
    moved = np.moveaxis(scores, axis, -1)
    out_moved = np.moveaxis(out, axis, -1)
    for index in np.ndindex(moved.shape[:-1]):
        row = list(moved[index])
        for i in keep_largest(row, len(row) - round(sparsity * len(row))):
            out_moved[index + (i,)] = True
    return out


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.3, 0.5, 0.75, 1.0])
def test_unstructured_matches_reference_with_ties(axis, sparsity):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(6, 10, 3)).astype(np.float32)  # many ties
    got = np.asarray(masks.unstructured_mask(scores, sparsity, axis=axis))
    np.testing.assert_array_equal(got, reference_mask(scores, sparsity, axis))
    if axis is None:
        assert got.size - got.sum() == round(sparsity * got.size)


def test_nm_mask_keeps_n_largest_of_every_group():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 3, size=(16, 5)).astype(np.float32)
    got = np.asarray(masks.nm_mask(scores, n=2, m=4, axis=0))
    for o in range(5):
        for g in range(4):
            group = list(scores[4 * g:4 * g + 4, o])
            want = {4 * g + i for i in keep_largest(group, 2)}
            assert {i for i in range(4 * g, 4 * g + 4) if got[i, o]} == want
    got1 = np.asarray(masks.nm_mask(scores.T, n=1, m=4, axis=1))
    assert (got1.reshape(5, 4, 4).sum(-1) == 1).all()


def test_nm_mask_refuses_indivisible_axis():
    with pytest.raises(ValueError, match="2:4 needs a dimension divisible by 4"):
        masks.nm_mask(np.ones((6, 8)), axis=0)
    with pytest.raises(ValueError, match="0 <= n <= m"):
        masks.nm_mask(np.ones((8,)), n=5, m=4)
    with pytest.raises(ValueError, match=r"sparsity=1.5"):
        masks.unstructured_mask(np.ones(4), 1.5)


def test_kernel_nm_runs_along_the_contraction_axes():
    rng = np.random.default_rng(2)
    out = rng.normal(size=(2, 3, 8, 5))  # scanned attention out [L, N, H, D]: contraction N*H
    matrix = np.abs(out).reshape(2, 24, 5)
    got = np.asarray(masks.kernel_nm_mask(("layers", "self_attention", "out"), np.abs(out)))
    want = np.zeros((2, 24, 5), bool)
    for layer, o, g in np.ndindex(2, 5, 6):
        for i in keep_largest(list(matrix[layer, 4 * g:4 * g + 4, o]), 2):
            want[layer, 4 * g + i, o] = True
    np.testing.assert_array_equal(got.reshape(2, 24, 5), want)
    query = rng.normal(size=(6, 2, 8))  # [D, N, H]: contraction D = 6
    with pytest.raises(ValueError, match="2:4 needs a dimension divisible by 4; kernel layer_0/self_attention/query"):
        masks.kernel_nm_mask(("layer_0", "self_attention", "query"), query)


def test_tree_masks_apply_and_count():
    params = {"embed": {"embedding": np.ones((10, 4), np.float32)},
              "layer_0": {"mlp": {"wi": np.arange(1, 9, dtype=np.float32).reshape(4, 2),
                                  "wi_bias": np.zeros(2, np.float32)},
                          "self_attention": {"out": np.ones((2, 2, 4), np.float32)},
                          "mlp_block": {"norm": {"scale": np.ones(4, np.float32)}}},
              "lm_head": np.ones((4, 10), np.float32)}
    assert set(masks.prunable(params)) == {("layer_0", "mlp", "wi"), ("layer_0", "self_attention", "out")}
    wi = params["layer_0"]["mlp"]["wi"]
    pruned = masks.apply_masks(params, {("layer_0", "mlp", "wi"): masks.unstructured_mask(np.abs(wi), 0.5)})
    np.testing.assert_array_equal(pruned["layer_0"]["mlp"]["wi"], [[0, 0], [0, 0], [5, 6], [7, 8]])
    assert masks.count_zeros(pruned) == (4, 8 + 16)
    assert masks.sparsity(pruned) == 4 / 24
    assert set(masks.nonzero_masks(pruned)) == set(masks.prunable(params))
    with pytest.raises(ValueError, match="does not match its kernel"):
        masks.apply_masks(params, {("layer_0", "mlp", "wi"): np.ones((2, 4), bool)})
