"""compress.prune: exact sparsities, N:M groups, and structured pruning that shrinks the model
into one whose logits equal the full model's with the removed units zeroed (LLaMA-style GQA +
SwiGLU and GPT-2-style, per-layer and scanned stacks)."""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.deepseek
import configs.gpt
import configs.llama
import configs.moe
from compress import masks, methods, prune
from train import build

EPS32 = float(np.finfo(np.float32).eps)
VOCAB = 96


def make_source(module, *, scan=False, seed=0, **block):
    """A tiny model of `module`'s preset with random params: every leaf (biases and norm scales
    too, so that slicing them wrongly would show) normal with std 1/sqrt(its first axis)."""
    config = module.get_config("tiny")
    config.model.scan_layers = scan
    config.model.vocab_size = VOCAB
    for key, value in block.items():
        config.model.block[key] = value
    model = build.model(config, VOCAB)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape, scale=1 / math.sqrt(s.shape[-2] if len(s.shape) > 1 else 4)),
                              s.dtype), shapes)
    return methods.Source(model=model, params=params, config=config)


def batches(n=2, B=2, T=16, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=(B, T)).astype(np.int32) for _ in range(n)]


def logits_of(config, params, ids):
    return np.asarray(jax.jit(build.model(config, VOCAB).apply)({"params": params}, jnp.asarray(ids)))


def roundings(config, T):
    """Rounding steps on the path to a logit (float32 reassociation when the zeroed terms of a
    sum are dropped): the contraction lengths of each layer's matmuls and the head, worst case
    (Higham: a dot of length n is within n * eps of exact relative to its sum of |terms|)."""
    b = config.model.block
    H = b.head_dim or b.d_model // b.num_heads
    per_layer = 3 * b.d_model + T + b.num_heads * H + 2 * b.d_model + b.d_ff
    return config.model.num_layers * per_layer + b.d_model


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_magnitude_sparsity_is_exact(scope, sparsity):
    source = make_source(configs.llama, scan=True)
    out = methods.apply("magnitude", source, options={"sparsity": str(sparsity), "scope": scope})
    kernels = masks.prunable(out.params)
    before = masks.prunable(source.params)
    if scope == "layer":  # every layer's slice of every kernel alone
        for path, w in kernels.items():
            per_layer = np.asarray(w).reshape(w.shape[0], -1)
            assert ((per_layer == 0).sum(-1) == round(sparsity * per_layer.shape[1])).all(), path
    else:
        total = sum(w.size for w in kernels.values())
        assert sum(int((np.asarray(w) == 0).sum()) for w in kernels.values()) == round(sparsity * total)
        # One threshold: every kept |w| is >= every pruned |w|.
        kept = np.concatenate([np.abs(np.asarray(before[p]))[np.asarray(w) != 0] for p, w in kernels.items()])
        dropped = np.concatenate([np.abs(np.asarray(before[p]))[np.asarray(w) == 0] for p, w in kernels.items()])
        assert kept.min() >= dropped.max()
    for path, w in kernels.items():  # kept weights unchanged
        w, b = np.asarray(w), np.asarray(before[path])
        np.testing.assert_array_equal(w[w != 0], b[w != 0])
    assert out.info["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    np.testing.assert_array_equal(out.params["embed"]["embedding"], source.params["embed"]["embedding"])


def test_two_four_groups_along_the_contraction_axis():
    source = make_source(configs.gpt)
    out = methods.apply("magnitude_nm", source)
    assert out.info["sparsity"] == 0.5
    for path, w in masks.prunable(out.params).items():
        matrix = np.asarray(masks.kernel_matrix(path, w))  # [I, O]
        groups = (matrix != 0).reshape(matrix.shape[0] // 4, 4, matrix.shape[1]).sum(1)
        assert (groups == 2).all(), path
        full = np.abs(np.asarray(masks.kernel_matrix(path, masks.prunable(source.params)[path])))
        kept = np.where(matrix != 0, full, np.inf).reshape(-1, 4, matrix.shape[1]).min(1)
        dropped = np.where(matrix == 0, full, -np.inf).reshape(-1, 4, matrix.shape[1]).max(1)
        assert (kept >= dropped).all()
    odd = make_source(configs.gpt, d_model=66, num_heads=6)
    with pytest.raises(ValueError, match="2:4 needs a dimension divisible by 4; kernel layer_0/mlp/wi"):
        methods.apply("magnitude_nm", odd)


SPARSITY = {"prune_heads": "0.5", "prune_neurons": "0.25", "prune_layers": "0.5"}
CASES = [(configs.llama, False, "prune_heads", "taylor"), (configs.llama, False, "prune_neurons", "taylor"),
         (configs.llama, False, "prune_layers", "block_influence"), (configs.llama, True, "prune_heads", "norm"),
         (configs.gpt, True, "prune_heads", "norm"), (configs.gpt, True, "prune_neurons", "taylor"),
         (configs.gpt, True, "prune_layers", "block_influence"), (configs.gpt, False, "prune_neurons", "norm")]


@pytest.mark.parametrize("family,scan,method,importance", CASES)
def test_shrunk_model_equals_zeroed_full_model(family, scan, method, importance):
    source = make_source(family, scan=scan)
    calib = batches()
    out = methods.apply(method, source, calibration=calib, options={"sparsity": SPARSITY[method],
                                                                    "importance": importance})
    before, after = prune._shape(source.config), prune._shape(out.config)
    kept = out.info["kept"]
    zeroing = {"prune_heads": {"heads": np.asarray(kept)}, "prune_neurons": {"neurons": np.asarray(kept)},
               "prune_layers": {"layers": kept}}[method]
    zeroed = prune.structured_zeroing(prune._per_layer(source), before, **zeroing)
    full_config = copy.deepcopy(source.config)
    full_config.model.scan_layers = False
    ids = calib[0]
    want = logits_of(full_config, zeroed, ids)
    got = logits_of(out.config, out.params, ids)
    tol = roundings(source.config, ids.shape[1]) * EPS32 * float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    # It really shrank, and pruning changed the model (the zeroed units mattered).
    assert prune._num_params(out.params) < prune._num_params(source.params)
    assert np.abs(want - logits_of(full_config, prune._per_layer(source), ids)).max() > 100 * tol
    if method == "prune_heads":
        assert (after.K, after.N, after.H) == (before.K // 2, before.N // 2, before.H)
    elif method == "prune_neurons":
        assert after.F == before.F - round(0.25 * before.F)
    else:
        assert after.L == before.L - 1
    assert out.info["sparsity"] > 0 and out.info["params"] == prune._num_params(out.params)
    shapes = jax.eval_shape(lambda: build.model(out.config, VOCAB).init(jax.random.key(0),
                                                                        jnp.zeros((1, 8), jnp.int32))["params"])
    assert jax.tree_util.tree_map(lambda s: s.shape, nn.unbox(shapes)) == \
        jax.tree_util.tree_map(np.shape, out.params)


def test_norm_importance_needs_no_data_and_keeps_the_largest():
    source = make_source(configs.llama)
    out = methods.apply("prune_neurons", source, calibration=batches(1),
                        options={"sparsity": "0.5", "importance": "norm"})
    params = prune._per_layer(source)
    mlp = params["layer_0"]["mlp"]
    norms = (np.square(np.asarray(mlp["wi_gate"])).sum(0) + np.square(np.asarray(mlp["wi_up"])).sum(0) +
             np.square(np.asarray(mlp["wo"])).sum(1))
    assert set(out.info["kept"][0]) == set(np.argsort(-norms, kind="stable")[:norms.size // 2].tolist())


def test_taylor_importance_predicts_the_loss_change_of_removing_a_group():
    """The Taylor score of a head group is (dLoss/da)^2 at gate a = 1: check dLoss/da against a
    finite difference of the loss with the group's out rows scaled by 1 +- h."""
    source = make_source(configs.llama)
    calib = batches(1)
    scores = prune.head_importance(source, calib, "taylor")
    params = prune._per_layer(source)
    s = prune._shape(source.config)
    config = copy.deepcopy(source.config)

    def loss(scale):
        p = jax.tree_util.tree_map(lambda x: x, params)
        out = p["layer_1"]["self_attention"]["out"]
        gate = np.ones(s.N, np.float32)
        gate[s.G:2 * s.G] = scale  # group 1 of layer 1
        p["layer_1"]["self_attention"]["out"] = out * gate[:, None, None]
        logits = logits_of(config, p, calib[0]).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
            logits.max(-1, keepdims=True)
        ids = calib[0]
        return -np.mean(np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1))

    h = 1e-2
    derivative = (loss(1 + h) - loss(1 - h)) / (2 * h)
    # Central difference: error O(h^2 * loss''') plus float32 loss noise / h.
    assert math.sqrt(scores[1, 1]) == pytest.approx(abs(derivative), rel=0.05, abs=1e-4)


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="does not apply to model family 'moe'"):
        methods.apply("prune_neurons", make_source(configs.moe, scan=True), calibration=batches(1))
    llama_moe = make_source(configs.llama)
    llama_moe.config.model.moe.num_experts = 4
    with pytest.raises(ValueError, match="does not prune mixture-of-experts MLPs"):
        methods.apply("prune_neurons", llama_moe, calibration=batches(1))
    with pytest.raises(ValueError, match="does not apply to model family 'deepseek'"):
        methods.apply("prune_heads", make_source(configs.deepseek), calibration=batches(1))
    source = make_source(configs.llama)
    with pytest.raises(ValueError, match="sparsity=0.9 would remove every one of the 2 key/value groups"):
        methods.apply("prune_heads", source, calibration=batches(1), options={"sparsity": "0.9"})
    with pytest.raises(ValueError, match="scope='block'"):
        methods.apply("magnitude", source, options={"scope": "block"})
    with pytest.raises(ValueError, match="needs calibration data"):
        methods.apply("prune_layers", source)
    out = methods.apply("magnitude", make_source(configs.moe, scan=True), options={"sparsity": "0.5"})
    assert out.info["sparsity"] == pytest.approx(0.5, abs=1e-3)  # experts' kernels pruned like any other
