"""MoE with `dispatch="all_to_all"` (models/layers/expert_dispatch.py) on 8 simulated devices,
experts split 4 ways under the `ep` strategy's axis rules, against the single-device layer with
the default dispatch: outputs, routing statistics and gradients, in capacity mode with tokens
dropped (DeepSeek-style routing: sigmoid scores, correction bias, groups, a shared expert) and
in sparse dropless mode; the compiled forward pass moves tokens by all-to-all and gathers no
expert weights."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from models.layers.moe import MoEConfig, MoEFeedForward, update_correction_bias
from sharding import analysis
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy

B, T, D, E, K, F = 16, 8, 32, 8, 2, 24  # 128 tokens, 16 per device; experts 2 per device
MESH, EXPERT_SHARDS = "data=2,expert=4", 4
EPS32 = float(np.finfo(np.float32).eps)
# Each compared value is a float32 sum of at most G + D + F = 176 products (a weight gradient
# sums over the 128 tokens after the D- and F-long matmuls); summed in another order it moves by
# at most n * EPS32 of the magnitudes summed (the worst-case bound; x4 for the chained sums).
# A token sent to the wrong expert or slot moves a value by O(1) of itself.
ROUNDING = 4 * EPS32 * (B * T + D + F)
# Compiled for speed of compiling (as tests/sharding/conftest.py does): the HLO passes that
# place the collectives are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
CASES = {
    # C = ceil(0.5 * 128 * 2 / 8) = 16 slots per expert: about half the assignments drop.
    "capacity": MoEConfig(num_experts=E, num_experts_per_tok=K, expert_d_ff=F, capacity_factor=0.5,
                          score_func="sigmoid", score_correction_bias=True, n_group=2, topk_group=1,
                          num_shared_experts=1, routed_scaling_factor=2.5, aux_loss_weight=0.01,
                          router_z_loss_weight=1e-3, seq_aux_loss_weight=1e-2),
    "dropless": MoEConfig(num_experts=E, num_experts_per_tok=K, expert_d_ff=F, aux_loss_weight=0.01,
                          router_z_loss_weight=1e-3),
}


def _loss(params, x, *, cfg):
    y, stats = MoEFeedForward(cfg).apply(params, x)
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * weights) + stats["weighted_loss"], (y, stats)


def _params(cfg, x):
    params = MoEFeedForward(cfg).init(jax.random.key(0), x)
    if cfg.score_correction_bias:  # a bias far from zero, so that it changes the choice of experts
        bias = params["params"]["score_correction_bias"]
        params = jax.tree_util.tree_map(lambda v: v, params)
        params["params"]["score_correction_bias"] = bias.replace_boxed(
            0.05 * jax.random.normal(jax.random.key(2), (E,)))
    return params


@functools.cache
def _runs(case: str):
    """(single device, 8 devices, compiled 8-device step) for one case."""
    cfg = CASES[case]
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    params = _params(cfg, x)
    grad = jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True)
    reference = _compiled(functools.partial(grad, cfg=cfg), nn.unbox(params), x)(nn.unbox(params), x)

    mesh = mesh_lib.make_mesh(MESH)
    rules = get_strategy("ep").activation_rules(mesh)

    def sharded(p, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return grad(p, x, cfg=dataclasses.replace(cfg, dispatch="all_to_all"))

    placed = jax.device_put(nn.unbox(params), nn.logical_to_mesh_sharding(nn.get_partition_spec(params), mesh, rules))
    x_placed = jax.device_put(x, NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch",), rules)))
    compiled = _compiled(sharded, placed, x_placed)
    return reference, compiled(placed, x_placed), compiled


def _compiled(f, *args):
    return jax.jit(f).lower(*args).compile(FAST_COMPILE)


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    assert np.max(np.abs(got - want)) <= ROUNDING * scale, (what, np.max(np.abs(got - want)) / scale)


@pytest.mark.parametrize("case", CASES)
def test_all_to_all_dispatch_matches_one_device(case):
    ((loss, (y, stats)), grads), ((loss8, (y8, stats8)), grads8), _ = _runs(case)
    _close(y8, y, "y")
    _close(loss8, loss, "loss")
    # Which assignments are kept is decided alike (global capacity, choice-major): exact counts.
    np.testing.assert_array_equal(stats8["tokens_per_expert"], stats["tokens_per_expert"])
    np.testing.assert_array_equal(stats8["kept_per_expert"], stats["kept_per_expert"])
    for key in ("dropped_fraction", "aux_loss", "router_z_loss", "seq_aux_loss", "weighted_loss"):
        _close(stats8[key], stats[key], key)
    if case == "capacity":
        assert 0.1 < float(stats["dropped_fraction"]) < 0.9  # tokens do drop, not all of them
    else:
        assert float(stats["dropped_fraction"]) == 0.0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads8), jax.tree_util.tree_leaves(grads),
                                 strict=True):
        _close(got, want, jax.tree_util.keystr(path))


def test_correction_bias_update_matches_one_device():
    """DeepSeek's aux-loss-free balancing reads the loads the sharded layer reports."""
    (_, (_, stats)), _ = _runs("capacity")[0]
    (_, (_, stats8)), _ = _runs("capacity")[1]
    bias = {"mlp": {"score_correction_bias": jnp.zeros(E)}}
    want = update_correction_bias(bias, {"mlp": {"router_stats": (stats,)}}, 1e-3)
    got = update_correction_bias(bias, {"mlp": {"router_stats": (stats8,)}}, 1e-3)
    np.testing.assert_array_equal(got["mlp"]["score_correction_bias"], want["mlp"]["score_correction_bias"])
    assert np.any(want["mlp"]["score_correction_bias"] != 0)


@pytest.mark.parametrize("case", CASES)
def test_forward_moves_tokens_by_all_to_all_and_gathers_no_expert_weights(case):
    ops = analysis.collectives(_runs(case)[2])
    forward = [op for op in ops if op.kind == "all-to-all" and op.phase == "forward" and op.group_size == EXPERT_SHARDS]
    # The tokens there and back, in a buffer of S = min(C, G) slots per expert (capacity) or
    # of A = G * K rows per destination (dropless); G = 16 tokens per device.
    G = B * T // 8
    rows = E * min(CASES[case].capacity(B * T), G) if case == "capacity" else EXPERT_SHARDS * G * K
    assert sum(op.bytes == 4 * rows * D for op in forward) == 2, [op.bytes for op in forward]
    assert any(op.kind == "all-to-all" and op.phase == "backward" for op in ops)
    # Gathering an expert tensor would give at least all E of it (it is split only over experts).
    assert all(op.bytes < 4 * E * D * F for op in ops if op.kind == "all-gather"), [
        (op.kind, op.bytes) for op in ops if op.kind == "all-gather"]


def test_without_a_mesh_all_to_all_dispatch_is_the_layer_on_one_shard():
    """No mesh or axis rules in force: the shard_map body runs once on the whole batch (every
    collective the identity) and gives the single-device layer (capacity mode, tokens dropping)."""
    cfg = CASES["capacity"]
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    params = nn.unbox(_params(cfg, x))
    apply = MoEFeedForward(dataclasses.replace(cfg, dispatch="all_to_all")).apply
    y, _ = _compiled(apply, params, x)(params, x)
    (_, (want, _)), _ = _runs("capacity")[0]
    _close(y, want, "y")


def test_dense_dropless_cannot_dispatch_by_all_to_all():
    with pytest.raises(ValueError, match="dispatch='all_to_all' .* dropless_impl='sparse'"):
        dataclasses.replace(CASES["dropless"], dropless_impl="dense", dispatch="all_to_all")


def test_experts_split_over_an_axis_the_tokens_are_not_split_over_are_refused():
    mesh = mesh_lib.make_mesh(MESH)
    cfg = dataclasses.replace(CASES["dropless"], dispatch="all_to_all")
    x = jnp.zeros((B, T, D))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            nn.logical_axis_rules((("expert", "expert"), ("act_batch", "data"))), \
            pytest.raises(ValueError, match="tokens split over the expert mesh axis `expert`"):
        jax.eval_shape(MoEFeedForward(cfg).init, jax.random.key(0), x)
