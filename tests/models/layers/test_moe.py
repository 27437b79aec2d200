"""MoEFeedForward against numpy float64 references: routing, dropless and capacity outputs,
statistics and the load-balancing loss (also against transformers' load_balancing_loss_func);
the sparse dropless path (each grouped matmul) against the dense reference in outputs, gradients
and statistics; the grouped matmuls against a float64 loop, and the tiled one's FLOPs."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from jax.extend.core import ClosedJaxpr, Jaxpr

from models.gpt import GPT, mixtral_config
from models.layers.grouped_matmul import TILE_ROWS, grouped_matmul, padded_rows
from models.layers.moe import MoEConfig, MoEFeedForward, route, total_aux_loss

B, T, D, E, K, F = 2, 8, 16, 4, 2, 12
BASE = MoEConfig(num_experts=E, num_experts_per_tok=K, expert_d_ff=F)


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=(B, T, D)).astype(np.float32)


def _init(cfg, x):
    return nn.unbox(MoEFeedForward(cfg).init(jax.random.key(0), jnp.asarray(x))["params"])


def _apply(cfg, params, x):
    return MoEFeedForward(cfg).apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])


def _np_route(logits, cfg):
    logits = logits.astype(np.float64)
    if cfg.score_func == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    experts = np.argsort(-scores, -1, kind="stable")[:, :cfg.num_experts_per_tok]
    weights = np.take_along_axis(scores, experts, -1)
    if cfg.norm_topk_prob:
        weights /= weights.sum(-1, keepdims=True)
    return weights * cfg.routed_scaling_factor, experts


def _np_expert(p, e, x):
    g, u, w = (np.asarray(p[k], np.float64)[e] for k in ("wi_gate", "wi_up", "wo"))
    h = x @ g
    return ((h / (1 + np.exp(-h))) * (x @ u)) @ w


def _np_moe(p, x_BTD, cfg, capacity=None):
    """Per-token loop; with `capacity`, choice-major slots and drops beyond capacity."""
    x = x_BTD.reshape(-1, D).astype(np.float64)
    weights, experts = _np_route(x @ np.asarray(p["router"], np.float64), cfg)
    out = np.zeros_like(x)
    used = np.zeros(cfg.num_experts, int)
    kept = np.ones(experts.shape, bool)
    for k in range(cfg.num_experts_per_tok):
        for g in range(x.shape[0]):
            e = experts[g, k]
            if capacity is not None and used[e] >= capacity:
                kept[g, k] = False
                continue
            used[e] += 1
            out[g] += weights[g, k] * _np_expert(p, e, x[g])
    if cfg.num_shared_experts:
        s = p["shared"]
        h = x @ np.asarray(s["wi_gate"], np.float64)
        out += ((h / (1 + np.exp(-h))) * (x @ np.asarray(s["wi_up"], np.float64))) @ np.asarray(s["wo"], np.float64)
    return out.reshape(x_BTD.shape), experts, kept


@pytest.mark.parametrize("cfg", [
    BASE,
    dataclasses.replace(BASE, norm_topk_prob=False),
    dataclasses.replace(BASE, score_func="sigmoid", routed_scaling_factor=2.5),
    dataclasses.replace(BASE, score_func="sigmoid", norm_topk_prob=False, num_experts_per_tok=3),
], ids=["softmax_norm", "softmax_raw", "sigmoid_norm_scaled", "sigmoid_raw_k3"])
def test_route_matches_numpy(cfg):
    logits = np.random.default_rng(1).normal(size=(20, E)).astype(np.float32) * 3
    weights, experts = route(jnp.asarray(logits), cfg)
    want_w, want_e = _np_route(logits, cfg)
    np.testing.assert_array_equal(experts, want_e)
    np.testing.assert_allclose(weights, want_w, rtol=1e-6)
    if cfg.norm_topk_prob:
        np.testing.assert_allclose(np.sum(weights, -1), cfg.routed_scaling_factor, rtol=1e-6)


@pytest.mark.parametrize("cfg", [BASE, dataclasses.replace(BASE, score_func="sigmoid", norm_topk_prob=False),
                                 dataclasses.replace(BASE, num_shared_experts=2, shared_d_ff=8)],
                         ids=["softmax", "sigmoid", "shared_experts"])
def test_dropless_equals_per_token_numpy_loop(cfg):
    x = _x()
    params = _init(cfg, x)
    (y, stats), _ = _apply(cfg, params, x)
    want, experts, _ = _np_moe(params, x, cfg)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(stats["tokens_per_expert"], np.bincount(experts.ravel(), minlength=E))
    assert float(stats["dropped_fraction"]) == 0.0


def test_capacity_drops_exactly_the_tokens_beyond_capacity():
    cfg = dataclasses.replace(BASE, capacity_factor=0.5)
    x = _x(seed=3)
    params = _init(cfg, x)
    capacity = math.ceil(0.5 * B * T * K / E)
    assert cfg.capacity(B * T) == capacity
    (y, stats), _ = _apply(cfg, params, x)
    want, experts, kept = _np_moe(params, x, cfg, capacity=capacity)
    assert not kept.all()  # the test must exercise dropping
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assigned = np.bincount(experts.ravel(), minlength=E)
    kept_counts = np.bincount(experts[kept], minlength=E)
    np.testing.assert_array_equal(stats["tokens_per_expert"], assigned)
    np.testing.assert_array_equal(stats["kept_per_expert"], kept_counts)
    assert np.all(kept_counts <= capacity) and np.all(kept_counts == np.minimum(assigned, capacity))
    np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept.mean(), rtol=1e-6)


def test_large_capacity_drops_nothing_and_equals_dropless():
    x = _x(seed=4)
    params = _init(BASE, x)
    (dropless, _), _ = _apply(BASE, params, x)
    (capped, stats), _ = _apply(dataclasses.replace(BASE, capacity_factor=E / K), params, x)
    np.testing.assert_allclose(capped, dropless, rtol=1e-5, atol=1e-6)
    assert float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_array_equal(stats["kept_per_expert"], stats["tokens_per_expert"])


def test_statistics_and_losses_match_numpy_and_hf_load_balancing_loss():
    cfg = dataclasses.replace(BASE, aux_loss_weight=0.01, router_z_loss_weight=0.001)
    x = _x(seed=5)
    params = _init(cfg, x)
    (_, stats), state = _apply(cfg, params, x)
    logits = x.reshape(-1, D).astype(np.float64) @ np.asarray(params["router"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    _, experts = _np_route(logits, cfg)
    f = np.bincount(experts.ravel(), minlength=E) / (B * T)
    aux = E * np.sum(f * probs.mean(0))
    z = np.mean((np.log(np.exp(logits).sum(-1))) ** 2)
    assert float(np.sum(stats["tokens_per_expert"])) == B * T * K
    np.testing.assert_allclose(stats["aux_loss"], aux, rtol=1e-5)
    hf_aux = load_balancing_loss_func((torch.tensor(logits, dtype=torch.float32),), E, K)
    np.testing.assert_allclose(stats["aux_loss"], hf_aux.item(), rtol=1e-5)
    np.testing.assert_allclose(stats["router_z_loss"], z, rtol=1e-5)
    np.testing.assert_allclose(stats["weighted_loss"], 0.01 * aux + 0.001 * z, rtol=1e-5)
    np.testing.assert_allclose(total_aux_loss(state["intermediates"]), stats["weighted_loss"], rtol=1e-6)


def test_parameters_carry_logical_axis_names():
    cfg = dataclasses.replace(BASE, num_shared_experts=1)
    boxed = MoEFeedForward(cfg).init(jax.random.key(0), jnp.zeros((1, 2, D)))["params"]
    names = {k: v.names for k, v in boxed.items() if isinstance(v, nn.LogicallyPartitioned)}
    assert names == {"router": ("embed", "expert"), "wi_gate": ("expert", "embed", "mlp"),
                     "wi_up": ("expert", "embed", "mlp"), "wo": ("expert", "mlp", "embed")}
    assert boxed["shared"]["wi_gate"].names == ("embed", "mlp")


def test_gpt_with_moe_counts_params_and_sows_per_layer_losses():
    cfg = mixtral_config(vocab_size=50, d_model=D, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=F,
                         num_experts=E, num_experts_per_tok=K, aux_loss_weight=0.02)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (B, T)), jnp.int32)
    variables = GPT(cfg).init(jax.random.key(0), ids)
    assert cfg.num_params() == sum(leaf.size for leaf in jax.tree_util.tree_leaves(nn.unbox(variables["params"])))
    dense_flops = dataclasses.replace(cfg.block, moe=None).mlp_weights()
    assert cfg.block.mlp_weights() == D * E + K * dense_flops  # k experts + router per token
    _, state = GPT(cfg).apply({"params": variables["params"]}, ids, mutable=["intermediates"])
    per_layer = [state["intermediates"][f"layer_{i}"]["mlp"]["router_stats"][0] for i in range(2)]
    np.testing.assert_allclose(total_aux_loss(state["intermediates"]),
                               sum(s["weighted_loss"] for s in per_layer), rtol=1e-6)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="score_func"):
        MoEConfig(num_experts=4, num_experts_per_tok=2, expert_d_ff=8, score_func="relu")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEConfig(num_experts=4, num_experts_per_tok=5, expert_d_ff=8)


# Dropless sparse (sorted assignments, grouped matmuls) against the dense reference: the same
# sums in another order. Each output is K weighted SwiGLU experts (dots over D, then F), so
# float32 rounding is a few eps32 * sqrt(D + F + K) relative to the magnitude (~2.5e-6 here).
SPARSE_TOLERANCE = 4 * np.finfo(np.float32).eps * math.sqrt(D + F + K)
DEEPSEEK = dataclasses.replace(BASE, num_experts=8, score_func="sigmoid", n_group=4, topk_group=2,
                               score_correction_bias=True, routed_scaling_factor=2.5, num_shared_experts=1,
                               seq_aux_loss_weight=1e-4)


@pytest.mark.parametrize("grouped", ["ragged_dot", "tiled"])
@pytest.mark.parametrize("cfg", [
    dataclasses.replace(BASE, num_shared_experts=2, shared_d_ff=8, aux_loss_weight=0.01, router_z_loss_weight=1e-3),
    dataclasses.replace(BASE, score_func="sigmoid", norm_topk_prob=False, num_experts_per_tok=3),
    DEEPSEEK,
], ids=["softmax_shared_experts", "sigmoid_k3", "deepseek_group_routing"])
def test_sparse_dropless_equals_dense_reference_in_outputs_gradients_and_stats(cfg, grouped):
    assert SPARSE_TOLERANCE < 1e-5
    x = _x(seed=6)
    params = _init(cfg, x)
    if cfg.score_correction_bias:  # a bias that changes the choice (zeros at init)
        bias = np.random.default_rng(2).normal(size=cfg.num_experts) * 0.1
        params = {**params, "score_correction_bias": jnp.asarray(bias, jnp.float32)}
    probe = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)

    def run(impl):
        module = MoEFeedForward(dataclasses.replace(cfg, dropless_impl=impl, grouped_matmul=grouped))

        def loss(p, x):
            (y, stats), _ = module.apply({"params": p}, x, mutable=["intermediates"])
            return jnp.sum(y * probe) + stats["weighted_loss"], (y, stats)

        (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, jnp.asarray(x))
        return y, stats, grads

    y, stats, grads = run("sparse")
    want_y, want_stats, want_grads = run("dense")
    np.testing.assert_allclose(y, want_y, atol=SPARSE_TOLERANCE * np.abs(want_y).max(), rtol=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats, want_stats)  # routing is shared code
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=SPARSE_TOLERANCE * np.abs(want).max(), rtol=0)


def test_sparse_dropless_runs_grouped_matmuls_not_every_expert():
    """With grouped_matmul=ragged_dot the sparse path's forward is three ragged dots over the G * K
    assignments; no dot makes a [G, E, F] (every token through every expert) intermediate as the
    dense path does."""
    x = jnp.asarray(_x())
    params = _init(BASE, x)

    def dots(impl):
        cfg = dataclasses.replace(BASE, dropless_impl=impl, grouped_matmul="ragged_dot")
        jaxpr = jax.make_jaxpr(lambda p: MoEFeedForward(cfg).apply({"params": p}, x))(params)
        return [(e.primitive.name, e.outvars[0].aval.shape) for e in jaxpr.jaxpr.eqns
                if "dot" in e.primitive.name]

    sparse, dense = dots("sparse"), dots("dense")
    assert [s for name, s in sparse if name == "ragged_dot_general"] == [(B, T * K, F)] * 2 + [(B, T * K, D)]
    assert (B * T, E, F) in [s for _, s in dense]
    assert all(math.prod(s) < B * T * E * F for _, s in sparse)


def test_dropless_impl_and_grouped_matmul_are_validated():
    with pytest.raises(ValueError, match="dropless_impl"):
        dataclasses.replace(BASE, dropless_impl="ragged")
    with pytest.raises(ValueError, match="grouped_matmul"):
        dataclasses.replace(BASE, grouped_matmul="megablocks")
    with pytest.raises(ValueError, match="grouped matmul impl"):
        grouped_matmul(jnp.zeros((1, 2, 3)), jnp.zeros((2, 3, 4)), jnp.ones((1, 2), jnp.int32), "megablocks")


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled", "auto"])
def test_grouped_matmul_equals_float64_loop_when_one_expert_takes_everything(impl):
    """Row 0: every row in the last group, the others empty. Row 1: a row in each group, which
    pads every group to a full tile (the most padding there is: P = padded_rows exactly).
    Row 2: uneven groups, one empty, and 3 rows past the last group (zero, as ragged_dot)."""
    G, Dg, Fg = 5, 8, 6
    A = G * (TILE_ROWS - 1) + 3
    sizes = np.array([[0, 0, 0, 0, A], [1, 1, 1, 1, 1], [TILE_ROWS + 1, 0, 2 * TILE_ROWS - 1, 7, 11]], np.int32)
    sizes[1, 0] = A - (G - 1)
    sizes[2, 4] = A - 3 - sizes[2, :4].sum()
    assert padded_rows(G, G) == G * TILE_ROWS  # row 1's case when A == G: every padded row used
    rng = np.random.default_rng(11)
    lhs = rng.normal(size=(3, A, Dg)).astype(np.float32)
    rhs = rng.normal(size=(G, Dg, Fg)).astype(np.float32)
    want = np.zeros((3, A, Fg))
    for b in range(3):
        group = np.repeat(np.arange(G), sizes[b])
        for a, e in enumerate(group):
            want[b, a] = lhs[b, a].astype(np.float64) @ rhs[e].astype(np.float64)
    probe = rng.normal(size=want.shape).astype(np.float32)

    def loss(lhs, rhs, impl):
        return jnp.sum(grouped_matmul(lhs, rhs, jnp.asarray(sizes), impl) * probe)

    got = jax.jit(lambda l, r: grouped_matmul(l, r, jnp.asarray(sizes), impl))(lhs, rhs)
    tolerance = 4 * np.finfo(np.float32).eps * math.sqrt(Dg) * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=0)
    grads = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(lhs, rhs, impl)
    # Reference gradients in float64: d lhs[b, a] = probe[b, a] rhs[e]^T, d rhs[e] = sum lhs^T probe.
    d_lhs, d_rhs = np.zeros(lhs.shape), np.zeros(rhs.shape)
    for b in range(3):
        group = np.repeat(np.arange(G), sizes[b])
        for a, e in enumerate(group):
            d_lhs[b, a] = rhs[e].astype(np.float64) @ probe[b, a]
            d_rhs[e] += np.outer(lhs[b, a], probe[b, a])
    np.testing.assert_allclose(grads[0], d_lhs, atol=4 * np.finfo(np.float32).eps * math.sqrt(Fg)
                               * np.abs(d_lhs).max(), rtol=0)
    np.testing.assert_allclose(grads[1], d_rhs, atol=4 * np.finfo(np.float32).eps * math.sqrt(3 * A)
                               * np.abs(d_rhs).max(), rtol=0)


def _matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general, a scan body's times its length (XLA's
    cost_analysis counts a loop body once, so it cannot see the tiled path's work)."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        assert eqn.primitive.name not in ("while", "cond", "ragged_dot_general"), eqn.primitive.name
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                eqn.invars[0].aval.shape[d] for d in contracting)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                    total += eqn.params.get("length", 1) * _matmul_flops(sub)
    return total


def test_tiled_dropless_does_a_fraction_of_the_dense_paths_matmul_flops():
    """E=16, k=2, 64 tokens a row: forward + backward through the tiled path multiplies exactly
    the padded rows P = padded_rows(T * K, E) of each batch row once per expert matmul (6 FLOPs
    per multiply-add), plus the router and the weighted sum of the K outputs: well under the
    dense path's every token through every expert."""
    cfg = MoEConfig(num_experts=16, num_experts_per_tok=2, expert_d_ff=F)
    Bf, Tf = 2, 64
    x = jnp.asarray(np.random.default_rng(0).normal(size=(Bf, Tf, D)), jnp.float32)
    params = _init(cfg, x)

    def flops(**kw):
        module = MoEFeedForward(dataclasses.replace(cfg, **kw))
        grad = jax.grad(lambda p, x: jnp.sum(module.apply({"params": p}, x)[0]), (0, 1))
        return _matmul_flops(jax.make_jaxpr(grad)(params, x))

    dense, tiled = flops(dropless_impl="dense"), flops(grouped_matmul="tiled")
    router, combine = 6 * Bf * Tf * D * cfg.num_experts, 6 * Bf * Tf * 2 * D
    experts = 6 * 3 * D * F  # one token through one expert's three matrices, forward + backward
    assert dense >= Bf * Tf * cfg.num_experts * experts
    assert tiled == Bf * padded_rows(Tf * 2, 16) * experts + router + combine
    assert tiled < 0.4 * dense
