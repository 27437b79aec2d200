"""models/quant.py against a float64 numpy reference written here from the QLoRA paper's
definitions, against bitsandbytes' CPU implementation, its error bounds, its byte counts,
and its layout on 8 simulated devices."""

import functools
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import quant
from models.gpt import GPT, llama_config
from sharding import mesh as mesh_lib
from sharding.layout import param_shardings
from sharding.strategies import get_strategy

EPS32 = float(np.finfo(np.float32).eps)
# QLoRA: the largest probability is the mean of the quantiles' outer edges for 15 and 16
# values, 1 - (1/30 + 1/32) / 2, so that the code has no infinite end and 0 is exact.
OFFSET = 1 - (1 / (2 * 15) + 1 / (2 * 16)) / 2
# bitsandbytes evaluates the quantiles at probabilities rounded to float32 (from the literal
# 0.9677083): each is at most 1e-7 off, which moves a value by that times the quantile's slope.
PROB_ERROR = 1e-7
# As tests/sharding: quicker compiles, the same partitioning.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def nf4_reference() -> tuple[np.ndarray, np.ndarray]:
    """(the NF4 table in float64, each value's tolerance): 8 normal quantiles on [1/2, OFFSET]
    for the positive half (with 0), 7 for the negative half, normalized to [-1, 1]."""
    normal = statistics.NormalDist()
    positive = np.linspace(OFFSET, 0.5, 9)[:-1]
    negative = np.linspace(OFFSET, 0.5, 8)[:-1]
    values = [normal.inv_cdf(p) for p in positive] + [0.0] + [-normal.inv_cdf(p) for p in negative]
    slopes = [1 / normal.pdf(normal.inv_cdf(p)) for p in positive] + [0.0] + \
             [1 / normal.pdf(normal.inv_cdf(p)) for p in negative]
    order = np.argsort(values)
    top = normal.inv_cdf(OFFSET)
    table = np.asarray(values)[order] / top
    tolerance = np.asarray(slopes)[order] * PROB_ERROR / top * (1 + np.abs(table)) + 2 * EPS32
    return table, tolerance


def quantize_reference(x: np.ndarray, table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 block-wise absmax quantization to the nearest table value along the last axis:
    (codes [..., L], absmax [..., L/block], normalized values [..., L])."""
    blocks = x.astype(np.float64).reshape(*x.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1)
    normalized = (blocks / np.where(absmax == 0, 1, absmax)[..., None]).reshape(x.shape)
    codes = np.abs(normalized[..., None] - table).argmin(-1)
    return codes, absmax, normalized


def unpack(packed: np.ndarray) -> np.ndarray:
    """Two codes per byte, the first in the high nibble (bitsandbytes' order), in numpy."""
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.int64)
    out[..., 0::2] = packed >> 4
    out[..., 1::2] = packed & 0xF
    return out


def per_value(scales: np.ndarray, block: int) -> np.ndarray:
    return np.repeat(scales, block, axis=-1)


def weights(shape, seed=0) -> np.ndarray:
    """Normal weights with an all-zero block and an outlier (a block's absmax far above the rest)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x.reshape(-1, shape[-1])[0, :64] = 0.0
    x.reshape(-1, shape[-1])[1, 3] = 25.0
    return x


def test_nf4_table_is_the_qlora_normal_float():
    table, tolerance = nf4_reference()
    assert quant.NF4_CODE.dtype == np.float32 and len(quant.NF4_CODE) == 16
    assert quant.NF4_CODE[7] == 0.0 and quant.NF4_CODE[0] == -1.0 and quant.NF4_CODE[-1] == 1.0
    np.testing.assert_array_less(np.abs(quant.NF4_CODE - table), tolerance)


def test_nf4_codes_and_values_equal_the_float64_reference():
    x = weights((3, 4, 256))
    q = quant.quantize(jnp.asarray(x), "nf4", 64, double_quant=False)
    assert q.codes.shape == (3, 4, 128) and q.codes.dtype == jnp.uint8 and q.scales.shape == (3, 4, 4)
    table, tolerance = nf4_reference()
    ref_codes, ref_absmax, normalized = quantize_reference(x, table, 64)
    codes = unpack(np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(q.scales), ref_absmax)  # a max is exact
    # Equal codes, except where the value lies within rounding of a decision threshold, where
    # the neighbour is as right (float32 normalization, the table's float32 rounding).
    midpoints = (table[1:] + table[:-1]) / 2
    band = tolerance.max() + 4 * EPS32
    ambiguous = (np.abs(normalized[..., None] - midpoints) <= band).any(-1)
    assert np.all((codes == ref_codes) | (ambiguous & (np.abs(codes - ref_codes) == 1)))
    assert ambiguous.mean() < 1e-3
    assert np.all(codes.reshape(-1, 256)[0, :64] == 7)  # the zero block: exact zeros
    # Values: the codes' table values times the block's absmax, to float32 rounding.
    values = table[codes] * per_value(ref_absmax, 64)
    bound = (tolerance.max() + 2 * EPS32) * per_value(ref_absmax, 64)
    np.testing.assert_array_less(np.abs(np.asarray(q.dequantize(jnp.float32)) - values), bound + 1e-30)


def test_int8_codes_equal_the_float64_reference():
    x = weights((4, 192))
    q = quant.quantize(jnp.asarray(x), "int8", 64, double_quant=False)
    assert q.codes.shape == (4, 192) and q.codes.dtype == jnp.int8
    _, absmax, normalized = quantize_reference(x, np.zeros(1), 64)
    ref = np.round(normalized * 127)
    near_half = np.abs(np.abs(normalized * 127 - np.trunc(normalized * 127)) - 0.5) <= 4 * 127 * EPS32
    codes = np.asarray(q.codes).astype(np.int64)
    assert np.all((codes == ref) | (near_half & (np.abs(codes - ref) == 1)))
    values = codes * per_value(absmax, 64) / 127
    np.testing.assert_array_less(np.abs(np.asarray(q.dequantize()) - values), 2 * EPS32 * per_value(absmax, 64) + 1e-30)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_is_within_the_format_bound(kind, double_quant):
    x = weights((8, 40, 320), seed=1)
    q = quant.quantize(jnp.asarray(x), kind, 64, double_quant=double_quant)
    absmax = np.abs(x.astype(np.float64).reshape(8, 40, 5, 64)).max(-1)
    half_step = np.diff(quant.NF4_CODE.astype(np.float64)).max() / 2 if kind == "nf4" else 1 / 254
    bound = (half_step + 4 * EPS32) * absmax
    if double_quant:  # the codes were chosen with the exact absmax; the stored one is off by this
        bound = bound + np.abs(np.asarray(q.block_scales(), np.float64) - absmax)
    error = np.abs(np.asarray(q.dequantize(), np.float64) - x)
    np.testing.assert_array_less(error, per_value(bound, 64) + 1e-30)
    # The bound is not vacuous: the worst error is most of it.
    assert (error / (per_value(bound, 64) + 1e-30)).max() > 0.5


def test_double_quantized_scales_are_within_their_8_bit_bound():
    x = weights((600, 128), seed=2)  # 1200 scales: 4 full blocks of 256 and a partial one
    q = quant.quantize(jnp.asarray(x), "nf4", 64, double_quant=True)
    assert q.scales.dtype == jnp.uint8 and q.scales.shape == (600, 2)
    assert q.scale_absmax.shape == (5,) and q.scale_absmax.dtype == jnp.float32 and q.scale_offset.shape == ()
    absmax = np.abs(x.astype(np.float64).reshape(600, 2, 64)).max(-1)
    offset = absmax.mean()
    assert abs(float(q.scale_offset) - offset) <= 4 * EPS32 * offset
    centred = np.pad((absmax - offset).reshape(-1), (0, 80)).reshape(5, 256)
    np.testing.assert_allclose(np.asarray(q.scale_absmax), np.abs(centred).max(-1), rtol=8 * EPS32)
    code = quant.dynamic_code().astype(np.float64)
    assert len(np.unique(code)) == 256 and code[-1] == 1 and -1 < code[0] < -0.99 and 0 in code
    half_step = np.diff(code).max() / 2
    per_scale = np.repeat(np.asarray(q.scale_absmax, np.float64), 256)[:1200].reshape(600, 2)
    bound = half_step * per_scale + 4 * EPS32 * (per_scale + offset)
    np.testing.assert_array_less(np.abs(np.asarray(q.block_scales(), np.float64) - absmax), bound)


def test_packing_is_exact():
    codes = np.stack(np.meshgrid(np.arange(16), np.arange(16)), -1).reshape(-1, 2).astype(np.uint8)  # every pair
    packed = np.asarray(quant.pack_nibbles(jnp.asarray(codes.reshape(1, -1))))
    np.testing.assert_array_equal(packed.reshape(-1), codes[:, 0] * 16 + codes[:, 1])
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(jnp.asarray(packed))), codes.reshape(1, -1))
    np.testing.assert_array_equal(unpack(packed), codes.reshape(1, -1))


@pytest.mark.parametrize("kind,double_quant,shape", [("nf4", True, (64, 4, 16)), ("nf4", False, (128, 256)),
                                                      ("int8", True, (3, 300)), ("int8", False, (2, 5, 64))])
def test_nbytes_are_the_arrays_bytes(kind, double_quant, shape):
    q = quant.quantize(jnp.ones(shape), kind, 64, double_quant=double_quant)
    assert q.nbytes == sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(q))
    padded = -(-shape[-1] // 64) * 64
    rows = int(np.prod(shape[:-1]))
    codes = rows * padded // (2 if kind == "nf4" else 1)
    scales = rows * padded // 64
    expected = codes + (scales + 4 * -(-scales // 256) + 4 if double_quant else 4 * scales)
    assert q.nbytes == expected
    assert q.dequantize().shape == shape  # the padding is cut off


def test_dequantize_inside_a_jitted_matmul_equals_the_reference():
    w = weights((128, 96), seed=3)
    x = np.random.default_rng(4).standard_normal((5, 128)).astype(np.float32)
    q = quant.quantize(jnp.asarray(w), "nf4", 32)
    y = np.asarray(jax.jit(lambda x, q: x @ q.dequantize())(jnp.asarray(x), q), np.float64)
    # The reference: float64 table values of the codes times the float64 reconstruction of
    # the double-quantized scales, in a float64 matmul.
    table, tolerance = nf4_reference()
    dyn = quant.dynamic_code().astype(np.float64)
    scale_codes = np.asarray(q.scales).reshape(-1)
    scales = (dyn[scale_codes] * np.repeat(np.asarray(q.scale_absmax, np.float64), 256)[:scale_codes.size]
              + float(q.scale_offset)).reshape(128, 3)
    w_ref = table[unpack(np.asarray(q.codes))] * per_value(scales, 32)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w_ref)
    bound = (4 * np.sqrt(128) * EPS32 + tolerance.max() + 4 * EPS32) * magnitude
    np.testing.assert_array_less(np.abs(y - x.astype(np.float64) @ w_ref), bound)


def test_against_bitsandbytes():
    import bitsandbytes.functional as bnb
    import torch

    # bitsandbytes torch.compile's its dequantization: minutes of inductor for a few ops.
    with torch.compiler.set_stance("force_eager"):
        _compare_with_bitsandbytes(torch, bnb)


def _compare_with_bitsandbytes(torch, bnb):
    x = weights((40, 512), seed=5)  # 2-D with whole blocks per row: bitsandbytes' flat blocks are ours
    code = bnb.create_dynamic_map().numpy()
    assert np.abs(code.view(np.int32) - quant.dynamic_code().view(np.int32)).max() <= 1  # ulps
    packed, state = bnb.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=False)
    np.testing.assert_array_equal(state.code.numpy(), quant.NF4_CODE)
    q = quant.quantize(jnp.asarray(x), "nf4", 64, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.dequantize()), bnb.dequantize_4bit(packed, state).numpy())

    packed, state = bnb.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quant.quantize(jnp.asarray(x), "nf4", 64, double_quant=True)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
    offset = float(state.offset)
    assert abs(float(q.scale_offset) - offset) <= 4 * EPS32 * offset  # a float32 mean, summed in some order
    np.testing.assert_allclose(np.asarray(q.scale_absmax), state.state2.absmax.numpy(), rtol=8 * EPS32)
    # bitsandbytes' CPU kernel finds the 8-bit code by an approximate search; it agrees with
    # nearest rounding but for a few values close to a threshold, where it takes the neighbour.
    diff = np.asarray(q.scales).reshape(-1).astype(int) - state.absmax.numpy().astype(int)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.02
    theirs = bnb.dequantize_4bit(packed, state).numpy()
    step = np.diff(quant.dynamic_code().astype(np.float64)).max() * state.state2.absmax.numpy().max()
    np.testing.assert_array_less(np.abs(np.asarray(q.dequantize()) - theirs), step * np.abs(theirs) + 1e-6)


@functools.cache
def tiny_llama() -> GPT:
    return GPT(llama_config(num_layers=1, d_ff=128, vocab_size=128, d_model=64, num_heads=4, num_kv_heads=2,
                            max_len=32))


@functools.cache
def boxed_and_params(model):
    init = jax.jit(functools.partial(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return jax.eval_shape(init)["params"], nn.unbox(init()["params"])


def test_quantize_tree_quantizes_the_matrices_only():
    boxed, params = boxed_and_params(tiny_llama())
    q = quantized_whole(64)
    assert quant.is_quantized(q["layer_0"]["mlp"]["wi_gate"]) and quant.is_quantized(q["embed"]["embedding"])
    assert quant.is_quantized(q["lm_head"]) and q["layer_0"]["self_attention"]["query"].codes.shape == (64, 4, 32)
    assert not quant.is_quantized(q["final_norm"]["scale"])
    assert not quant.is_quantized(q["layer_0"]["mlp_block"]["norm"]["scale"])
    back = jax.jit(quant.dequantize_tree)(q)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), back) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
    np.testing.assert_array_equal(back["final_norm"]["scale"], params["final_norm"]["scale"])
    # The storage accounting equals the quantized tree's arrays.
    sizes = quant.storage_bytes(boxed, block_size=64, min_size=0)
    assert sizes["nf4+dq"] == sum(x.nbytes for x in jax.tree_util.tree_leaves(q))
    assert sizes["f32"] == 4 * sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert sizes["f32"] > sizes["bf16"] > sizes["int8"] > sizes["nf4"] > sizes["nf4+dq"]


def _lay_out(strategy: str, mesh_spec: str, block_size: int, shards=None):
    boxed, params = boxed_and_params(tiny_llama())
    make = functools.partial(quant.quantize_tree, kind="nf4", block_size=block_size, double_quant=True, min_size=0)
    mesh = mesh_lib.make_mesh(mesh_spec)
    boxed_q = quant.logically_partitioned(boxed, jax.eval_shape(make, params), shards)
    shardings = param_shardings(get_strategy(strategy), mesh, boxed_q, zero=True)
    sharded = jax.jit(make, out_shardings=shardings).lower(params).compile(FAST_COMPILE)(params)
    return sharded, quantized_whole(block_size), shardings


@functools.cache
def quantized_whole(block_size: int):
    return quant.quantize_tree(boxed_and_params(tiny_llama())[1], kind="nf4", block_size=block_size,
                               double_quant=True, min_size=0)


def test_fsdp_puts_an_eighth_of_the_codes_on_each_device():
    sharded, whole, _ = _lay_out("fsdp", "fsdp=8", 64)
    pairs = [(a, b) for a, b in zip(jax.tree_util.tree_leaves(sharded, is_leaf=quant.is_quantized),
                                    jax.tree_util.tree_leaves(whole, is_leaf=quant.is_quantized), strict=True)
             if quant.is_quantized(a)]
    assert len(pairs) == 1 + 1 + 7  # embedding, lm head, 7 kernels in the layer
    for a, b in pairs:
        assert len(a.codes.addressable_shards) == 8
        assert all(s.data.nbytes * 8 == a.codes.nbytes for s in a.codes.addressable_shards)
        # Sharded == unsharded: the same codes; the double quantization's mean is summed in
        # another order on 8 devices, which can move a scale's 8-bit code to its neighbour.
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        assert abs(float(a.scale_offset) - float(b.scale_offset)) <= 8 * EPS32 * float(b.scale_offset)
        np.testing.assert_allclose(a.scale_absmax, b.scale_absmax, rtol=0, atol=8 * EPS32 * float(b.scale_offset))
        assert np.abs(np.asarray(a.scales, int) - np.asarray(b.scales, int)).max() <= 1


def test_tensor_parallel_replicates_a_last_axis_the_reduced_size_cannot_split():
    """Block 128 over d_ff = 128: the MLP's scales have one block per row, which tensor=2 cannot
    split, so they are replicated; the codes (64 per row) stay split over `tensor`."""
    sharded, whole, shardings = _lay_out("tp", "data=4,tensor=2", 128, shards={"mlp": 2, "vocab": 2, "heads": 2,
                                                                              "kv_heads": 2})
    gate = shardings["layer_0"]["mlp"]["wi_gate"]
    assert gate.codes.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert gate.scales.spec == jax.sharding.PartitionSpec(None, None)
    np.testing.assert_array_equal(np.asarray(sharded["layer_0"]["mlp"]["wi_gate"].codes),
                                  np.asarray(whole["layer_0"]["mlp"]["wi_gate"].codes))


def test_bad_input_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"`finetune\.qlora\.block_size`=64 does not divide the last dimension 100; "
                                         r"use a block size that divides it \(e\.g\. 4\) or pad=True"):
        quant.quantize(jnp.ones((4, 100)), "nf4", 64, pad=False)
    with pytest.raises(ValueError, match=r"`finetune\.qlora\.block_size`=63; expected a positive even integer"):
        quant.quantize_tree({"w": jnp.ones((64, 64))}, kind="nf4", block_size=63)
    with pytest.raises(ValueError, match=r"`finetune\.qlora\.quant`='int4'; expected one of \('nf4', 'int8'\)"):
        quant.quantize(jnp.ones((4, 64)), "int4")
    for call in (lambda: quant.quantize(jnp.ones((4, 100)), "nf4", 64, pad=False),
                 lambda: quant.quantize(jnp.ones((4, 64)), "int4")):
        with pytest.raises(ValueError) as info:
            call()
        assert "\n" not in str(info.value)
