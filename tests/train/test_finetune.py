"""Every fine-tuning method through the trainer's own program (`train.program.build_for_run` on a
model `train.build.model` makes from the run config) under dp, fsdp and tp on 8 devices: the
loss falls, only the method's parameters move and hold optimizer state (bytes measured), the
frozen base (QLoRA: its stored codes) comes out bit-identical, and fsdp / tp end where dp ends
within the float32 error of summing the gradients in another order. QLoRA's stored base is
measured against f32 and bf16 bases.

Every strategy starts from the same base state (dp's init, placed in the strategy's layout),
so the comparison is about the step; QLoRA's init under fsdp quantizes in the split layout
itself (its own test)."""

import functools
import math

import jax
import numpy as np
import pytest

from configs import base
from models import quant
from models.layers.peft import is_peft_path
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from train import build
from train import program as program_lib
from train import trainable
from train.optimizer import make_optimizer

BATCH, SEQ, VOCAB, STEPS, LR = 16, 16, 128, 3, 1e-2
EPS32 = float(np.finfo(np.float32).eps)
# Adam's eps: m / (sqrt(v) + eps) of a gradient near 0 amplifies its rounding by 1 / eps
# (tests/sharding/conftest.py); 1e-5 keeps the comparison about the layouts.
ADAM_EPS = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}
STRATEGIES = {"dp": "data=8", "fsdp": "fsdp=8", "tp": "data=4,tensor=2"}

# finetune.* overrides per method; the variants (rsLoRA + DoRA on other targets, int8, the
# parallel adapter, prefix with its MLP) ride along at the price of one more small program each.
METHODS = {
    "full": dict(method="full", freeze=r"^layer_0/mlp/|^embed/"),
    "lora": dict(method="lora", lora=dict(rank=4)),
    "dora": dict(method="lora", lora=dict(rank=4, rslora=True, dora=True, targets=r"(query|value|wo)$|^lm_head$")),
    "qlora_nf4": dict(method="qlora", lora=dict(rank=4), qlora=dict(quant="nf4", block_size=64, double_quant=True)),
    "qlora_int8": dict(method="qlora", lora=dict(rank=4), qlora=dict(quant="int8", block_size=32,
                                                                     double_quant=False)),
    "prefix": dict(method="prefix", prefix=dict(length=4, mlp_hidden=16)),
    "houlsby": dict(method="adapter", adapter=dict(kind="houlsby", hidden=8)),
    "parallel": dict(method="adapter", adapter=dict(kind="parallel", hidden=8)),
}


def _config(method: str):
    config = base.get_config()
    config.model.update(family="llama", num_layers=1, max_len=32, positional="rope", tie_embeddings=False)
    config.model.block.update(d_model=64, num_heads=4, num_kv_heads=2, d_ff=128, mlp_activation="swiglu",
                              norm="rmsnorm", use_bias=False)
    config.data.update(seq_len=SEQ, batch_size=BATCH)
    for key, value in METHODS[method].items():
        if isinstance(value, dict):
            config.finetune[key].update(value)
        else:
            config.finetune[key] = value
    return config


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    mask = np.tile(np.where(np.arange(SEQ) < SEQ - 3, 1, 0), (BATCH, 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": mask,
            "positions": np.tile(np.arange(SEQ), (BATCH, 1)).astype(np.int32), "loss_mask": mask}


def _program(method: str, strategy: str):
    config = _config(method)
    tx = make_optimizer(learning_rate=LR, eps=ADAM_EPS)
    return program_lib.build_for_run(config, build.model(config, VOCAB), tx, lambda step: LR,
                                     strategy=get_strategy(strategy), mesh=mesh_lib.make_mesh(STRATEGIES[strategy]))


@functools.cache
def _base(method: str):
    """dp's initial state of `method`'s model on the host (the base every strategy starts from)."""
    program = _program(method, "dp")
    rng = jax.random.key(0)
    return jax.device_get(program.init.lower(rng).compile(FAST_COMPILE)(rng))


@functools.cache
def _run(method: str, strategy: str):
    """STEPS steps from the base under `strategy`: (start, end on the host, metrics, end state, program)."""
    program = _program(method, strategy)
    start = _base(method)
    state = jax.device_put(start, program.layout.state)
    batch = {k: jax.device_put(v, program.layout.batch) for k, v in _batch().items()}
    rng = jax.random.key(1)
    step = program.step.lower(state, batch, rng).compile(FAST_COMPILE)
    metrics = []
    for _ in range(STEPS):
        state, m = step(state, batch, rng)
        metrics.append(jax.device_get(m))
    return start, jax.device_get(state), metrics, state, program


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def _nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in _leaves(tree))


def _check_frozen_unchanged(start, end):
    assert jax.tree_util.tree_structure(start.frozen) == jax.tree_util.tree_structure(end.frozen)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(start.frozen), _leaves(end.frozen)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_only_its_parameters_under_dp(method):
    start, end, metrics, _, _ = _run(method, "dp")
    config = _config(method)
    trained, frozen = trainable.paths(start.params), trainable.paths(start.frozen)
    assert trained and frozen
    if config.finetune.method == "full":
        assert all(p.startswith(("layer_0/mlp/", "embed/")) for p in frozen)
        assert not any(p.startswith(("layer_0/mlp/", "embed/")) for p in trained)
    else:
        assert all(is_peft_path(p) for p in trained)
        assert not any(is_peft_path(p) for p in frozen)
    if method == "dora":
        assert any(p.endswith("_lora_magnitude") for p in trained) and "lm_head_lora_a" in trained
    # It learns: the loss of the same batch falls and every trained leaf but LoRA's A at the
    # first step (B = 0 gives A no gradient then) moved.
    losses = [float(m["loss"]) for m in metrics]
    assert losses[-1] < losses[0], losses
    moved = [not np.array_equal(x, y) for x, y in zip(_leaves(start.params), _leaves(end.params))]
    assert sum(moved) >= len(moved) - 1 and any(moved)
    _check_frozen_unchanged(start, end)
    # Adam holds two moments per trained parameter and a step count: measured in bytes it is
    # twice the trained bytes, whatever the frozen base weighs.
    scalars = sum(np.asarray(x).nbytes for x in _leaves(end.opt_state) if np.ndim(x) == 0)
    assert _nbytes(end.opt_state) - scalars == 2 * _nbytes(end.params)
    assert _nbytes(end.frozen) > _nbytes(end.params)


@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_and_tp_end_where_dp_ends(method, strategy):
    assert jax.device_count() == 8
    _, dp_end, dp_metrics, _, _ = _run(method, "dp")
    start, end, metrics, state, program = _run(method, strategy)
    _check_frozen_unchanged(start, end)
    # The frozen base is laid out by the strategy: some of it is split over the devices.
    split = [x for x in _leaves(state.frozen) if len(x.sharding.device_set) == 8
             and x.sharding.shard_shape(x.shape) != x.shape]
    assert split, "no frozen leaf is split over the devices"
    scalars = sum(np.asarray(x).nbytes for x in _leaves(end.opt_state) if np.ndim(x) == 0)
    assert _nbytes(end.opt_state) - scalars == 2 * _nbytes(end.params)
    # A gradient element sums over the N = B*T tokens in another order under another layout:
    # it moves by about 4 EPS32 sqrt(N) times the rms element |g| / sqrt(P); Adam's update
    # moves by at most lr * dg / eps for it (a gradient near 0), and the steps add up.
    num_params = sum(x.size for x in _leaves(end.params))
    dg = [4 * EPS32 * math.sqrt(BATCH * SEQ) * float(m["grad_norm"]) / math.sqrt(num_params) for m in dp_metrics]
    atol = STEPS * LR * max(dg) / ADAM_EPS
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(end.params), _leaves(dp_end.params)):
        np.testing.assert_allclose(x, y, rtol=2 * EPS32, atol=atol, err_msg=jax.tree_util.keystr(path))
    for m, d in zip(metrics, dp_metrics):
        np.testing.assert_allclose(m["loss"], d["loss"], rtol=4 * EPS32 * math.sqrt(BATCH * SEQ))


def _quantized(tree):
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=quant.is_quantized) if quant.is_quantized(x)]


def _check_same_quantization(a, b):
    """The same codes; the double quantization's mean is summed in another order by another
    program, which moves it by float32 rounding and can move a scale's 8-bit code by one."""
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    if not a.double_quant:
        np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(b.scales))  # a max: exact
        return
    offset = float(b.scale_offset)
    assert abs(float(a.scale_offset) - offset) <= 8 * EPS32 * offset
    np.testing.assert_allclose(a.scale_absmax, b.scale_absmax, rtol=0, atol=8 * EPS32 * offset)
    assert np.abs(np.asarray(a.scales, int) - np.asarray(b.scales, int)).max() <= 1


def test_qlora_stores_the_base_quantized_at_the_measured_bytes():
    """The frozen base of qlora is the lora run's base quantized: every matrix a QuantizedTensor
    in the state, its bytes what `models.quant.storage_bytes` counts, and that a fraction of
    the f32 and bf16 bases; the step reads it dequantized (the loss at step 0 is the
    dequantized base's, near the float base's)."""
    lora = _base("lora")
    sizes = quant.storage_bytes(lora.frozen)
    stored = {}
    for method, kind in (("qlora_nf4", "nf4+dq"), ("qlora_int8", "int8")):
        block_size = METHODS[method]["qlora"]["block_size"]
        start = _base(method)
        q = _quantized(start.frozen)
        assert len(q) == 1 + 1 + 7  # embedding, lm head and the layer's 7 kernels
        assert all(x.kind == kind.split("+")[0] for x in q)
        stored[kind] = _nbytes(start.frozen)
        assert stored[kind] == quant.storage_bytes(lora.frozen, block_size=block_size)[kind]
        # The float base, quantized once on the host, is what init stored.
        q_config = METHODS[method]["qlora"]
        whole = quant.quantize_tree(lora.frozen, kind=q_config["quant"], block_size=block_size,
                                    double_quant=q_config["double_quant"])
        for x, y in zip(q, _quantized(whole)):
            _check_same_quantization(x, y)
    print(f"\nfrozen base bytes: f32 {sizes['f32']}, bf16 {sizes['bf16']}, int8 {stored['int8']}, "
          f"nf4+dq {stored['nf4+dq']} ({sizes['f32'] / stored['nf4+dq']:.2f}x smaller than f32)")
    assert sizes["f32"] > sizes["bf16"] > stored["int8"] > stored["nf4+dq"]
    # Every matrix is quantized, only norm scales stay. The MLP, embedding and head store 4.125
    # bits a value (codes + 8-bit scales per 64); the attention kernels end in head_dim 16,
    # padded to a block of 64: 4x their codes. Over this model's mix that is > 5x below f32.
    assert sizes["quantized_fraction"] > 0.99 and sizes["f32"] / stored["nf4+dq"] > 5


def test_qlora_init_under_fsdp_quantizes_into_the_split_layout():
    """Init under fsdp quantizes inside the jitted init straight into the layout: each device
    holds an eighth of every matrix's codes, and they equal dp's."""
    program = _program("qlora_nf4", "fsdp")
    rng = jax.random.key(0)
    state = program.init.lower(rng).compile(FAST_COMPILE)(rng)
    dp = _quantized(_base("qlora_nf4").frozen)
    fsdp = _quantized(state.frozen)
    assert len(fsdp) == len(dp) == 9
    for a, b in zip(fsdp, dp):
        assert len(a.codes.addressable_shards) == 8
        assert all(s.data.nbytes * 8 == a.codes.nbytes for s in a.codes.addressable_shards)
        _check_same_quantization(a, b)
    per_device = sum(s.data.nbytes for x in fsdp for s in x.codes.addressable_shards if s.device == jax.devices()[0])
    assert per_device * 8 == sum(x.codes.nbytes for x in dp)
