"""train_step and eval_step: accumulation == one batch, sharded == one device, split gradients, float64 NLL, RNG per step;
the MoE auxiliary losses, correction-bias update and multi-token prediction loss in the step."""

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models.gpt import GPT, GPTConfig
from models.layers import moe as moe_lib
from models.layers.blocks import BlockConfig
from models.layers.moe import MoEConfig
from models.layers.positional import RopeConfig
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from train import losses
from train import step as step_lib
from train.objectives.lm import LMObjective
from train.optimizer import make_optimizer
from train.schedules import make_schedule

B, T, VOCAB = 8, 8, 32
# Every test compares two runs compiled alike: LLVM -O0 compiles ~3x faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SCHEDULE = make_schedule("cosine", peak_lr=0.5, total_steps=10, warmup_steps=2)
# Plain SGD: the update is -lr * grad, so the new params show any error in the gradient
# (Adam's m / sqrt(v) would hide a wrong scale).
SGD = optax.sgd(SCHEDULE)


def _model(dropout_rate=0.0) -> GPT:
    block = BlockConfig(d_model=16, num_heads=2, d_ff=32, mlp_activation="gelu_tanh", norm_position="pre",
                        dropout_rate=dropout_rate, attention_dropout_rate=dropout_rate)
    return GPT(GPTConfig(vocab_size=VOCAB, block=block, num_layers=1, max_len=T))


def _state(model, tx, seed=0) -> step_lib.TrainState:
    """Random params drawn in numpy (compiling flax's threefry init costs ~15 s on a loaded CPU)."""
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape) + (1.0 if len(s.shape) == 1 else 0.0), s.dtype),
        shapes)
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _batch(seed=0):
    """Packed and padded rows; the counted tokens per row are 2,2,8,8,5,3,0,0, so micro-batches
    of 2 rows count 4, 16, 8 and 0 tokens, and of 4 rows 20 and 8."""
    rng = np.random.default_rng(seed)
    counted = [2, 2, 8, 8, 5, 3, 0, 0]
    loss_mask = (np.arange(T)[None, :] < np.asarray(counted)[:, None]).astype(np.int32)
    segment_ids = loss_mask.copy()
    positions = np.broadcast_to(np.arange(T), (B, T)).copy()
    segment_ids[2], positions[2] = [1, 1, 1, 2, 2, 2, 2, 2], [0, 1, 2, 0, 1, 2, 3, 4]  # two documents
    targets = rng.integers(0, VOCAB, (B, T))
    targets[loss_mask == 0] = -1  # padding targets are out of range: they must never be read
    batch = {"inputs": rng.integers(0, VOCAB, (B, T)), "targets": targets, "segment_ids": segment_ids,
             "positions": positions, "loss_mask": loss_mask}
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@functools.cache
def _step_fn(grad_accum_steps=1, dropout_rate=0.0):
    """One compile per setting, shared by the tests (each is 2-5 s on a loaded CPU)."""
    return jax.jit(functools.partial(step_lib.train_step, objective=LMObjective(_model(dropout_rate), z_loss=1e-3),
                                     tx=SGD, schedule=SCHEDULE, grad_accum_steps=grad_accum_steps),
                   compiler_options=FAST_COMPILE)


def _at_step(state, step):
    """`state` as if `step` steps had run: the step and the optimizer's step counters."""
    opt_state = jax.tree_util.tree_map(lambda x: jnp.full_like(x, step) if x.dtype == jnp.int32 else x,
                                       state.opt_state)
    return state.replace(step=jnp.asarray(step, jnp.int32), opt_state=opt_state)


# Float32 rounding, from which every tolerance below is derived. A gradient element is a sum
# over the N = B * T tokens; summed in another order (micro-batches, 8 devices) it moves by
# about EPS32 * sqrt(N) times the size of its terms (the random-walk estimate of float32
# summation error), the terms taken as the rms gradient element |g|_2 / sqrt(P) (P
# parameters). ROUNDING_SPREAD = 4 covers terms above the rms (the position embedding's
# first rows see every row of the batch) and the spread of a random walk.
EPS32 = float(np.finfo(np.float32).eps)
ROUNDING_SPREAD = 4
# The same estimate for a mean over the batch's tokens (the loss) or a norm of such sums: 3.8e-6.
METRICS_RTOL = ROUNDING_SPREAD * EPS32 * math.sqrt(B * T)


def _num_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def _grad_rounding(grad_norm, num_params) -> float:
    """The float32 summation error of one gradient element (see EPS32)."""
    return ROUNDING_SPREAD * EPS32 * math.sqrt(B * T) * float(grad_norm) / math.sqrt(num_params)


def _assert_trees_close(a, b, rtol, atol=0.0):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("grad_accum_steps", [2, 4])
def test_grad_accumulation_equals_one_batch(grad_accum_steps):
    state, batch, rng = _at_step(_state(_model(), SGD), 2), _batch(), jax.random.key(0)  # past warmup
    whole, whole_metrics = _step_fn(1)(state, batch, rng)
    accum, accum_metrics = _step_fn(grad_accum_steps)(state, batch, rng)

    lr = float(whole_metrics["learning_rate"])
    assert lr > 0
    for key in ("loss", "z_loss", "accuracy", "grad_norm", "num_tokens", "learning_rate"):
        np.testing.assert_allclose(accum_metrics[key], whole_metrics[key], rtol=METRICS_RTOL, err_msg=key)
    # SGD moves a parameter by lr * g, so by lr * (the gradient's rounding) between the two
    # summation orders; adding it to the parameter rounds once more, within an ulp, EPS32 * |p|.
    # (Here 1.2e-7; measured on one AVX-512 CPU: 3.4e-8.)
    update_rounding = lr * _grad_rounding(whole_metrics["grad_norm"], _num_params(state.params))
    _assert_trees_close(accum.params, whole.params, rtol=2 * EPS32, atol=update_rounding)
    # The updates themselves (-lr * grad), not only the params they are added to: each differs
    # by the gradient's rounding and by the ulp of the parameter it was added to.
    def update(new):
        return jax.tree_util.tree_map(jnp.subtract, new.params, state.params)

    ulp_of_params = jax.tree_util.tree_map(lambda p: 2 * EPS32 * jnp.abs(p), state.params)
    for u_accum, u_whole, ulp in zip(*map(jax.tree_util.tree_leaves, (update(accum), update(whole), ulp_of_params))):
        assert np.all(np.abs(np.asarray(u_accum) - np.asarray(u_whole)) <= update_rounding + ulp)


ADAM_EPS_DP = 1e-3


def test_data_parallel_equals_one_device():
    assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
    model, rules = _model(), rules_lib.rules_for("dp")
    # eps=1e-3, not 1e-8: some gradients are zero in exact arithmetic (a key bias shifts every
    # logit of a query alike), and Adam would blow their rounding noise up to lr-sized steps.
    tx = make_optimizer(learning_rate=SCHEDULE, eps=ADAM_EPS_DP, weight_decay=0.1, grad_clip_norm=1.0)
    batches = [_batch(seed) for seed in range(3)]

    def run(mesh):
        batch_sharding, replicated = rules_lib.batch_sharding(mesh, rules), rules_lib.replicated(mesh)
        # Tracing inside the mesh and the rules makes the models' logical constraints real ones.
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            step_fn = jax.jit(functools.partial(step_lib.train_step, objective=LMObjective(model), tx=tx,
                                                schedule=SCHEDULE),
                              in_shardings=(replicated, batch_sharding, replicated),
                              out_shardings=(replicated, replicated), compiler_options=FAST_COMPILE)
            state, losses = jax.device_put(_state(model, tx), replicated), []
            for batch in batches:
                batch = jax.device_put(batch, batch_sharding)
                assert batch["inputs"].sharding.shard_shape((B, T)) == (B // mesh.size, T)
                state, metrics = step_fn(state, batch, jax.random.key(0))
                losses.append(metrics)
        return state, losses

    sharded, sharded_metrics = run(mesh_lib.make_mesh("data=-1"))
    single, single_metrics = run(mesh_lib.make_mesh("data=1", devices=jax.devices()[:1]))
    assert len(jax.tree_util.tree_leaves(sharded.params)[0].sharding.device_set) == 8
    for step, (m8, m1) in enumerate(zip(sharded_metrics, single_metrics)):
        # The loss is a mean of at most 64 positive per-token terms: any summation order is
        # within 64 * EPS32 = 7.6e-6 of exact (the worst case for the sum, not an estimate).
        for key in ("loss", "grad_norm", "accuracy", "num_tokens"):
            np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=f"step {step} {key}")
    # Adam's update lr * m / (sqrt(v) + eps) moves by at most lr * dg / eps when the gradient
    # moves by dg (the worst case is a gradient near 0, like the key bias's); dg is the
    # gradient's rounding (`_grad_rounding`, at the clipped norm) and the steps add up. Here
    # that is 5.3e-5; measured on one AVX-512 CPU: 2.0e-6. Each parameter is also rounded
    # within an ulp. Adam's moments follow the gradient: m within dg, v (a (1 - b2) share
    # of 2 g dg per step) far within it.
    num_params = _num_params(single.params)
    grad_rounding = [_grad_rounding(min(float(m["grad_norm"]), 1.0), num_params) for m in single_metrics]
    lrs = [float(SCHEDULE(step)) for step in range(len(batches))]
    params_atol = sum(lr * dg for lr, dg in zip(lrs, grad_rounding)) / ADAM_EPS_DP
    _assert_trees_close(sharded.params, single.params, rtol=2 * EPS32, atol=params_atol)
    _assert_trees_close(sharded.opt_state, single.opt_state, rtol=2 * EPS32, atol=max(grad_rounding))


def _loop_carry_bytes(compiled) -> int:
    """Bytes of the state of the compiled step's while loop (the accumulation scan's carry)."""
    (line,) = [x for x in compiled.as_text().splitlines() if re.search(r"= \(.*\) while\(", x)]
    arrays = re.findall(r"(f32|s32|u32)\[([\d,]*)\]", line.split(" while(")[0])
    return sum(4 * math.prod(int(d) for d in dims.split(",") if d) for _, dims in arrays)


def test_grad_shardings_split_the_accumulator_and_keep_the_numbers():
    """ZeRO-2's constraint: with `grad_shardings` the accumulated gradients live split over
    the 8 devices (a replicated optimizer state would otherwise keep them whole), and the step
    is the same update."""
    mesh = mesh_lib.make_mesh("data=8")
    model, rules = _model(), rules_lib.rules_for("dp")
    state, batch = _at_step(_state(model, SGD), 2), _batch()
    replicated, batch_sharding = rules_lib.replicated(mesh), rules_lib.batch_sharding(mesh, rules)

    def split(leaf):  # the first dimension that 8 divides, as ZeRO splits `embed`
        dims = [i for i, n in enumerate(leaf.shape) if n % 8 == 0]
        return NamedSharding(mesh, PartitionSpec(*[("data" if i == dims[0] else None) for i in range(leaf.ndim)])
                             if dims else PartitionSpec())

    grad_shardings = jax.tree_util.tree_map(split, state.params)
    grad_bytes = sum(4 * x.size for x in jax.tree_util.tree_leaves(state.params))
    runs = {}
    for name, shardings in (("whole", None), ("split", grad_shardings)):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            step = jax.jit(functools.partial(step_lib.train_step, objective=LMObjective(model, z_loss=1e-3), tx=SGD,
                                             schedule=SCHEDULE, grad_accum_steps=2, grad_shardings=shardings),
                           in_shardings=(replicated, batch_sharding, replicated),
                           out_shardings=(replicated, replicated))
            compiled = step.lower(state, batch, jax.random.key(0)).compile(FAST_COMPILE)
        runs[name] = (_loop_carry_bytes(compiled), *compiled(state, jax.device_put(batch, batch_sharding),
                                                             jax.random.key(0)))
    assert runs["whole"][0] >= grad_bytes
    assert runs["split"][0] < runs["whole"][0] - 0.8 * grad_bytes, (runs["split"][0], runs["whole"][0], grad_bytes)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(runs["split"][2][key], runs["whole"][2][key], rtol=METRICS_RTOL, err_msg=key)
    # A reduce-scatter sums the gradients in another order than an all-reduce: SGD moves the
    # parameters by lr times that rounding, and each is rounded within an ulp (as in accumulation).
    update_rounding = float(SCHEDULE(2)) * _grad_rounding(runs["whole"][2]["grad_norm"], _num_params(state.params))
    _assert_trees_close(runs["split"][1].params, runs["whole"][1].params, rtol=2 * EPS32, atol=update_rounding)


def test_eval_nll_sum_matches_float64_numpy():
    model, batch = _model(), _batch()
    params = _state(model, SGD).params
    out = jax.jit(functools.partial(step_lib.eval_step, objective=LMObjective(model)),
                  compiler_options=FAST_COMPILE)(params, {}, batch, None)
    logits = jax.jit(lambda p: model.apply({"params": p}, batch["inputs"], positions=batch["positions"],
                                           segment_ids=batch["segment_ids"]), compiler_options=FAST_COMPILE)(params)

    logits64 = np.asarray(logits, np.float64)
    peak = logits64.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits64 - peak).sum(-1)) + peak[..., 0]
    counted = np.asarray(batch["loss_mask"]) > 0
    targets = np.where(counted, np.asarray(batch["targets"]), 0)
    nll = log_z - np.take_along_axis(logits64, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(out["nll_sum"]), nll[counted].sum(), rtol=1e-6)
    assert float(out["num_tokens"]) == counted.sum() == 28


def test_learning_rate_reported_and_applied_is_schedule_of_step():
    step_fn, state, batch = _step_fn(1), _state(_model(), SGD), _batch()
    for s in range(4):
        new, metrics = step_fn(state, batch, jax.random.key(0))
        assert int(state.step) == s
        np.testing.assert_allclose(metrics["learning_rate"], SCHEDULE(s), rtol=1e-7)
        # With SGD, |update| = lr * |grad|: the rate the optimizer applied is schedule(s) too.
        update_norm = optax.global_norm(jax.tree_util.tree_map(jnp.subtract, new.params, state.params))
        np.testing.assert_allclose(update_norm, SCHEDULE(s) * metrics["grad_norm"], rtol=1e-4, atol=1e-7)
        state = new
    assert float(SCHEDULE(0)) == 0.0 and float(SCHEDULE(2)) == 0.5  # warmup, then peak


def test_masked_target_does_not_change_the_gradient():
    step_fn, state, batch = _step_fn(1), _at_step(_state(_model(), SGD), 2), _batch()
    masked = np.asarray(batch["loss_mask"]) == 0
    rng = np.random.default_rng(1)
    other = dict(batch, targets=jnp.where(masked, rng.integers(0, VOCAB, (B, T)), batch["targets"]))
    reference, ref_metrics = step_fn(state, batch, jax.random.key(0))
    changed, metrics = step_fn(state, other, jax.random.key(0))
    for key in ("loss", "grad_norm", "accuracy"):
        assert float(metrics[key]) == float(ref_metrics[key]), key
    for x, y in zip(jax.tree_util.tree_leaves(changed.params), jax.tree_util.tree_leaves(reference.params)):
        np.testing.assert_array_equal(x, y)
    # Control: a counted target does change it.
    counted = dict(batch, targets=batch["targets"].at[2, 3].set((batch["targets"][2, 3] + 1) % VOCAB))
    _, counted_metrics = step_fn(state, counted, jax.random.key(0))
    assert float(counted_metrics["grad_norm"]) != float(ref_metrics["grad_norm"])


def test_dropout_mask_depends_on_step_and_is_reproducible():
    step_fn, state, batch, rng = _step_fn(1, dropout_rate=0.2), _state(_model(0.2), SGD), _batch(), jax.random.key(0)
    first, first_metrics = step_fn(state, batch, rng)
    again, again_metrics = step_fn(state, batch, rng)
    for key in ("loss", "grad_norm"):
        assert float(first_metrics[key]) == float(again_metrics[key]), key
    for x, y in zip(jax.tree_util.tree_leaves(first.params), jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_array_equal(x, y)

    # The same params and batch at the next step number: only the dropout masks differ.
    _, next_metrics = step_fn(state.replace(step=state.step + 1), batch, rng)
    assert float(next_metrics["loss"]) != float(first_metrics["loss"])
    # And the masks do act: the dropout-free loss of these params is different again.
    _, plain_metrics = _step_fn(1)(state, batch, rng)
    assert float(plain_metrics["loss"]) not in (float(first_metrics["loss"]), float(next_metrics["loss"]))


# --- auxiliary losses: mixture of experts, multi-token prediction ------------------------


def _moe_model() -> GPT:
    """One dense layer, then a sigmoid-routed 4-expert top-2 layer with a correction bias."""
    moe = MoEConfig(num_experts=4, num_experts_per_tok=2, expert_d_ff=16, score_func="sigmoid", aux_loss_weight=0.1,
                    router_z_loss_weight=0.01, score_correction_bias=True)
    block = BlockConfig(d_model=16, num_heads=2, d_ff=32, mlp_activation="swiglu", norm="rmsnorm", norm_position="pre",
                        dropout_rate=0.0, use_bias=False, moe=moe, rope=RopeConfig())
    return GPT(GPTConfig(vocab_size=VOCAB, block=block, num_layers=2, max_len=T, positional="rope",
                         first_dense_layers=1))


def _mtp_model() -> GPT:
    return GPT(dataclasses.replace(_model().config, mtp_depth=2))


def _moe_state(tx=SGD):
    """Random params, correction biases at 0 (their init) so that the scores decide routing."""
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "score_correction_bias" in jax.tree_util.keystr(path) else x,
        _state(_moe_model(), tx).params)
    return _at_step(step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)), 2)


@functools.cache
def _aux_step_fn(model_name, grad_accum_steps=1, bias_update_rate=0.0, frozen=False):
    model = {"moe": _moe_model, "mtp": _mtp_model}[model_name]()
    tx = optax.sgd(0.0) if frozen else SGD
    objective = LMObjective(model, z_loss=1e-3, mtp_loss_weight=0.5, bias_update_rate=bias_update_rate)
    return jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx, schedule=SCHEDULE,
                                     grad_accum_steps=grad_accum_steps), compiler_options=FAST_COMPILE)


def _apply_with_intermediates(model, params, batch):
    logits, variables = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                    segment_ids=batch["segment_ids"], mutable=["intermediates"])
    return logits, variables["intermediates"]


def test_moe_aux_losses_enter_the_gradient_and_the_metrics():
    model, state, batch = _moe_model(), _moe_state(), _batch()
    new, metrics = _aux_step_fn("moe")(state, batch, jax.random.key(0))

    def loss_fn(params, with_aux):
        logits, intermediates = _apply_with_intermediates(model, params, batch)
        _, aux = losses.cross_entropy(logits, batch["targets"], mask_BT=batch["loss_mask"], z_loss=1e-3)
        ce = jnp.sum(aux["per_token"]) / aux["num_tokens"]
        return ce + (moe_lib.total_aux_loss(intermediates) if with_aux else 0.0)

    lr = float(SCHEDULE(2))
    grads = jax.jit(jax.grad(functools.partial(loss_fn, with_aux=True)))(state.params)
    _assert_trees_close(new.params, jax.tree_util.tree_map(lambda p, g: p - lr * g, state.params, grads),
                        rtol=1e-4, atol=1e-6)
    # Control: without the aux losses the router would have moved differently.
    plain = jax.jit(jax.grad(functools.partial(loss_fn, with_aux=False)))(state.params)
    router = state.params["layer_1"]["mlp"]["router"] - lr * plain["layer_1"]["mlp"]["router"]
    assert not np.allclose(new.params["layer_1"]["mlp"]["router"], router, rtol=1e-5, atol=1e-7)

    _, intermediates = _apply_with_intermediates(model, state.params, batch)
    stats = intermediates["layer_1"]["mlp"]["router_stats"][0]
    np.testing.assert_allclose(metrics["moe_aux_loss"], stats["weighted_loss"], rtol=1e-5)
    load = np.asarray(stats["tokens_per_expert"]) / np.mean(np.asarray(stats["tokens_per_expert"]))
    np.testing.assert_allclose([metrics["moe_load_max"], metrics["moe_load_min"]], [load.max(), load.min()],
                               rtol=1e-6)
    assert float(metrics["moe_dropped_fraction"]) == 0.0  # dropless
    assert "mtp_loss" not in metrics


def test_moe_accumulation_counts_each_micro_batch_aux_loss_once_over_a():
    model, state, batch = _moe_model(), _moe_state(), _batch()
    _, metrics = _aux_step_fn("moe", grad_accum_steps=2)(state, batch, jax.random.key(0))
    _, whole = _aux_step_fn("moe")(state, batch, jax.random.key(0))
    halves = [{k: v[i * 4:(i + 1) * 4] for k, v in batch.items()} for i in range(2)]
    aux = [moe_lib.total_aux_loss(_apply_with_intermediates(model, state.params, h)[1]) for h in halves]
    np.testing.assert_allclose(metrics["moe_aux_loss"], np.mean(aux), rtol=1e-5)
    for key in ("loss", "z_loss", "accuracy", "num_tokens"):  # the token losses are still the whole batch's
        np.testing.assert_allclose(metrics[key], whole[key], rtol=1e-5, err_msg=key)


def test_correction_bias_moves_towards_balanced_loads_after_the_update():
    model, state, batch = _moe_model(), _moe_state(optax.sgd(0.0)), _batch()
    step_fn = _aux_step_fn("moe", bias_update_rate=0.05, frozen=True)
    new, first = step_fn(state, batch, jax.random.key(0))
    _, intermediates = _apply_with_intermediates(model, state.params, batch)
    load = np.asarray(intermediates["layer_1"]["mlp"]["router_stats"][0]["tokens_per_expert"])
    np.testing.assert_allclose(new.params["layer_1"]["mlp"]["score_correction_bias"],
                               0.05 * np.sign(load.mean() - load), rtol=1e-6)
    # Everything else is the optimizer's (here: no change at all).
    for path, x in jax.tree_util.tree_leaves_with_path(new.params):
        if "score_correction_bias" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(x, _leaf(state.params, path))
    assert float(first["moe_load_max"]) > 1.2  # unbalanced to start with
    for _ in range(20):
        new, metrics = step_fn(new, batch, jax.random.key(0))
    assert float(metrics["moe_load_max"]) < float(first["moe_load_max"]), (first, metrics)


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.parametrize("grad_accum_steps", [2, 4])
def test_multi_token_prediction_loss_is_added_and_accumulates_exactly(grad_accum_steps):
    model, batch, rng = _mtp_model(), _batch(), jax.random.key(0)
    state = _at_step(_state(model, SGD), 2)
    whole, whole_metrics = _aux_step_fn("mtp")(state, batch, rng)
    accum, accum_metrics = _aux_step_fn("mtp", grad_accum_steps=grad_accum_steps)(state, batch, rng)
    for key in ("loss", "mtp_loss", "grad_norm", "num_tokens"):
        np.testing.assert_allclose(accum_metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
    _assert_trees_close(accum.params, whole.params, rtol=1e-5, atol=1e-6)

    _, intermediates = _apply_with_intermediates(model, state.params, batch)
    mtp, _ = losses.multi_token_prediction_loss(intermediates["mtp_logits"], batch["targets"], batch["loss_mask"],
                                                batch["segment_ids"])
    np.testing.assert_allclose(whole_metrics["mtp_loss"], mtp, rtol=1e-5)
    assert len(intermediates["mtp_logits"]) == 2 and "moe_aux_loss" not in whole_metrics

    def loss_fn(params):  # the update is that of cross-entropy + z-loss + 0.5 * the MTP loss
        logits, intermediates = _apply_with_intermediates(model, params, batch)
        _, aux = losses.cross_entropy(logits, batch["targets"], mask_BT=batch["loss_mask"], z_loss=1e-3)
        mtp, _ = losses.multi_token_prediction_loss(intermediates["mtp_logits"], batch["targets"],
                                                    batch["loss_mask"], batch["segment_ids"])
        return jnp.sum(aux["per_token"]) / aux["num_tokens"] + 0.5 * mtp

    grads = jax.jit(jax.grad(loss_fn))(state.params)
    _assert_trees_close(whole.params, jax.tree_util.tree_map(lambda p, g: p - float(SCHEDULE(2)) * g, state.params,
                                                             grads), rtol=1e-4, atol=1e-6)
