"""models/quant.py's kernel layout (int8 per channel, int4 groups sym/asym, NF4 + double
quantization, FP8 e4m3) against float64 numpy references written here from the formats'
definitions, and the quantized matmul inside the models (linear.project, the embedding, MoE,
MLA, scanned stacks), W8A8 against a numpy re-implementation of its integer arithmetic.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from models import quant
from models.gpt import GPT, llama_config
from models.layers import linear
from models.random_params import random_params

EPS32 = float(np.finfo(np.float32).eps)
NF4_HALF_STEP = float(np.diff(quant.NF4_CODE.astype(np.float64)).max() / 2)
# As tests/models/test_quant.py: quicker compiles of the same computation.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def compiled(fn, *args):
    """fn(*args) through a fast-compiled jit (the dequantization stays inside it)."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def kernel(shape, seed=0) -> np.ndarray:
    """Normal weights with an all-zero group (rows 0..31 of column 0) and an outlier."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w2 = w.reshape(-1, shape[-1])
    w2[:32, 0] = 0.0
    w2[5, 1] = 12.0
    return w


def groups_of(w_IO: np.ndarray, g: int) -> np.ndarray:
    """[I, O] -> [I/g, g, O] in float64."""
    return w_IO.astype(np.float64).reshape(w_IO.shape[0] // g, g, w_IO.shape[1])


def reference_scales(w_IO: np.ndarray, fmt: str, g: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 (scale, zero) per [I/g, O] group, from the formats' definitions."""
    blocks = groups_of(w_IO, g)
    absmax = np.abs(blocks).max(1)
    if fmt == "int4" and not sym:
        low, high = np.minimum(blocks.min(1), 0), np.maximum(blocks.max(1), 0)
        scale = (high - low) / 15
        return scale, np.clip(np.round(np.divide(-low, scale, out=np.zeros_like(low), where=scale > 0)), 0, 15)
    divisor = {"int8": 127.0, "int4": 7.0, "nf4": 1.0, "fp8": 448.0}[fmt]
    return absmax / divisor, np.zeros_like(absmax)


@pytest.mark.parametrize("fmt,group,sym", [("int8", None, True), ("int4", 32, True), ("int4", 64, False),
                                           ("int4", 128, True), ("int4", 128, False), ("nf4", 64, True),
                                           ("fp8", None, True)])
def test_round_trip_is_within_the_format_bound(fmt, group, sym):
    w = kernel((256, 48))
    q = quant.quantize_weight(jnp.asarray(w), fmt=fmt, group=group, sym=sym, double_quant=False)
    g = group or 256
    scale, zero = reference_scales(w, fmt, g, sym)
    np.testing.assert_allclose(np.asarray(q.scales, np.float64), scale, rtol=2 * EPS32, atol=0)
    deq = np.asarray(q.dequantize(), np.float64)
    error = np.abs(deq - w)
    per = lambda a: np.repeat(a, g, axis=0)
    if fmt == "fp8":  # e4m3: 3 mantissa bits, half a spacing 2^-4 relative; subnormals 2^-9 apart (x scale)
        bound = np.maximum(np.abs(w) * 2.0 ** -4, per(scale) * 2.0 ** -10) * (1 + 4 * EPS32)
    else:
        # Half a step of the grid, plus float32 rounding: the stored scale is off by ~eps relative,
        # which a code of magnitude q (<= 127) multiplies; the ratio w / s by ~eps |w| / s.
        half = NF4_HALF_STEP if fmt == "nf4" else 0.5
        bound = per(scale) * (half + 8 * EPS32 * (16 if fmt != "nf4" else 1)) + 4 * EPS32 * np.abs(w)
    np.testing.assert_array_less(error, bound + 1e-30)
    assert (error / (bound + 1e-30)).max() > 0.5  # the bound is not vacuous
    assert np.all(deq[:32, 0] == 0)  # an all-zero group stays exactly zero
    if fmt in ("int8", "int4"):  # the codes equal the float64 rounding except at exact-half ties
        ratio = w.astype(np.float64) / np.where(per(scale) > 0, per(scale), 1)
        codes = np.asarray(q.int_codes(), np.float64) - (per(zero) if not sym else 0)
        limit = 127 if fmt == "int8" else (7 if sym else 15)
        near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) <= 64 * EPS32
        ok = (codes == np.round(ratio)) | near_tie | (np.abs(codes) == limit)
        assert ok.all()


def test_packed_storage_and_bytes_are_exact():
    w = jnp.asarray(kernel((256, 48)))
    int4 = quant.quantize_weight(w, fmt="int4", group=64, sym=False)
    assert int4.codes.shape == (128, 48) and int4.codes.dtype == jnp.uint8
    assert int4.nbytes == 256 * 48 // 2 + 4 * (256 // 64) * 48 + (256 // 64) * 48  # codes, f32 scales, u8 zeros
    nibbles = np.asarray(int4.int_codes())
    packed = np.asarray(int4.codes).astype(np.int64)
    np.testing.assert_array_equal(packed, nibbles[0::2] * 16 + nibbles[1::2])  # row 2i high, 2i+1 low
    nf4 = quant.quantize_weight(w, fmt="nf4", group=64)
    blocks = math.ceil(4 * 48 / 256)
    assert nf4.nbytes == 256 * 48 // 2 + 4 * 48 + 4 * blocks + 4  # codes, u8 scales, f32 block absmax, offset
    fp8 = quant.quantize_weight(w, fmt="fp8")
    assert fp8.codes.dtype == jnp.float8_e4m3fn and fp8.nbytes == 256 * 48 + 4 * 48
    # The stored fp8 codes are ml_dtypes' round-to-nearest of w / s.
    s = np.asarray(fp8.scales)
    np.testing.assert_array_equal(np.asarray(fp8.codes).view(np.uint8),
                                  (np.asarray(w) / s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_from_int_follows_the_agreed_equation():
    rng = np.random.default_rng(3)
    I, O, g = 64, 12, 16
    scale = rng.uniform(0.5, 2.0, (I // g, O)).astype(np.float32)
    for bits, zero in ((4, None), (4, rng.integers(0, 16, (I // g, O))), (8, None)):
        top = 2 ** (bits - 1) - 1
        codes = rng.integers(-top, top + 1, (I, O)) if zero is None else rng.integers(0, 2 ** bits, (I, O))
        q = quant.QuantizedTensor.from_int(codes, scale, zero, bits=bits, group=g, shape=(I, 3, 4), in_dims=1)
        z = 0 if zero is None else np.repeat(zero, g, 0)
        want = ((codes - z) * np.repeat(scale.astype(np.float64), g, 0)).reshape(I, 3, 4)
        np.testing.assert_allclose(np.asarray(q.dequantize(), np.float64), want, rtol=EPS32, atol=0)
        np.testing.assert_array_equal(np.asarray(q.int_codes()), codes)
    with pytest.raises(ValueError, match="group=24 does not divide the contraction dimension 64"):
        quant.QuantizedTensor.from_int(codes, scale[:2], None, bits=8, group=24, shape=(I, O))


def test_contraction_axes_stacks_and_scan_slices():
    """[N, H, D] contracts N*H; experts [E, D, F] and stacked [L, ...] lead; a slice of every leaf
    (what nn.scan hands each layer) is that layer's tensor, double quantization included."""
    w = jnp.asarray(kernel((3, 4, 16, 24)))  # [L, N, H, D]
    q = quant.quantize_weight(w, fmt="nf4", group=32, contract_axes=(1, 2), lead=1)
    assert q.codes.shape == (3, 32, 24) and q.scale_absmax.shape == (3, 1) and q.scale_offset.shape == (3,)
    whole = np.asarray(q.dequantize())
    for layer in range(3):
        one = jax.tree_util.tree_map(lambda a, i=layer: a[i], q)
        assert one.logical_shape == (4, 16, 24)
        np.testing.assert_array_equal(np.asarray(one.dequantize()), whole[layer])
        alone = quant.quantize_weight(w[layer], fmt="nf4", group=32, contract_axes=(0, 1))
        np.testing.assert_array_equal(np.asarray(alone.dequantize()), whole[layer])  # blocks never cross layers
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 4, 16)), jnp.float32)
    one = jax.tree_util.tree_map(lambda a: a[1], q)
    y = jax.jit(lambda x, k: linear.project(x, k, in_dims=2))(x, one)
    ref = np.einsum("btnh,nhd->btd", np.asarray(x, np.float64), whole[1].astype(np.float64))
    bound = 2 * 64 * EPS32 * np.einsum("btnh,nhd->btd", np.abs(np.asarray(x, np.float64)), np.abs(whole[1]))
    np.testing.assert_array_less(np.abs(np.asarray(y) - ref), bound + 1e-30)


def test_the_rule_names_each_kernel_and_refuses_unknown_matrices():
    assert quant.contraction("layer_0/self_attention/out", (4, 16, 64)) == (0, (0, 1))
    assert quant.contraction("layers/self_attention/query", (2, 64, 4, 16)) == (1, (1,))
    assert quant.contraction("layer_0/mlp/wo", (4, 128, 64)) == (1, (1,))  # experts
    assert quant.contraction("layers/mlp/wi_up", (2, 4, 64, 128)) == (2, (2,))  # stacked experts
    assert quant.contraction("embed/embedding", (256, 64)) == (0, (1,))
    assert quant.contraction("positions/embedding", (64, 64)) is None
    assert quant.contraction("layer_0/mlp/router", (64, 4)) is None
    with pytest.raises(ValueError, match=r"^cannot quantize adapter/mystery .*no contraction rule") as e:
        quant.contraction("adapter/mystery", (8, 8))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="group=48 does not divide the contraction dimension 64"):
        quant.quantize_params({"lm_head": jnp.ones((64, 10))}, fmt="int4", group=48)


def _logit_bound(cfg) -> float:
    """Relative bound on |logits(quantized, dequantized in the jit) - logits(dequantized float)|.

    Both runs use bit-identical weights (dequantization is one float32 multiply per element),
    so only XLA's summation order may differ: a reassociated float32 sum of n terms moves by at
    most n * eps32 * sum|terms|. Each of the 2L residual sub-layers and the head adds such a
    dot of length <= n_max; we take sum|terms| ~ max|logits| (tests print the margin)."""
    n_max = max(cfg.block.d_ff, cfg.block.d_model, cfg.vocab_size)
    return (2 * cfg.num_layers + 1) * n_max * EPS32


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8"])
def test_quantized_model_matches_its_dequantized_float_model(fmt):
    cfg = llama_config(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96, max_len=32,
                       tie_embeddings=True)
    model = GPT(cfg)
    params = random_params(model)
    q = quant.quantize_params(params, fmt=fmt, group=32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    run = lambda p: compiled(lambda p: model.apply({"params": p}, ids), p)
    quantized, dequantized = np.asarray(run(q)), np.asarray(run(quant.dequantize_tree(q)))
    bound = _logit_bound(cfg) * np.abs(dequantized).max()
    print(f"\n{fmt}: |quantized - dequantized float| = {np.abs(quantized - dequantized).max():.2e} "
          f"(bound {bound:.2e}); vs the float model {np.abs(quantized - np.asarray(run(params))).max():.3e}")
    assert np.abs(quantized - dequantized).max() <= bound
    # ...and the quantization itself moves them (the matmul did read the codes).
    assert np.abs(quantized - np.asarray(run(params))).max() > 100 * bound


def test_the_compiled_decode_step_takes_the_integer_codes():
    import functools

    from inference.generate import _decode_step, initial_state, prefill
    from inference.kv_cache import init_cache
    from inference.sampling import SamplingConfig

    cfg = llama_config(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96, max_len=32)
    model = GPT(cfg)
    q = quant.quantize_params(random_params(model), fmt="int4", group=32)
    ids, lengths = jnp.ones((1, 4), jnp.int32), jnp.array([4], jnp.int32)
    cache = init_cache(model, 1, 16)
    logits, cache = prefill(model, q, cache, ids, lengths)
    state = initial_state(logits, cache, ids, lengths, max_new_tokens=4, sampling=SamplingConfig(), vocab_size=64)
    step = jax.jit(functools.partial(_decode_step, model, SamplingConfig(), ()))  # what decode_step jits
    lowered = step.lower(q, jax.random.key(0), state)
    args = jax.tree_util.tree_leaves(lowered.args_info[0][0])  # the params argument
    shapes = {(a.shape, np.dtype(a.dtype).name) for a in args}
    kernels = [x for x in jax.tree_util.tree_leaves(q, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    assert len(kernels) == 2 + 2 * 7  # the token table, the untied head and 7 kernels per layer
    for k in kernels:
        assert (k.codes.shape, "uint8") in shapes
        assert not any(s == k.logical_shape for s, _ in shapes)  # no float copy of any kernel is an argument


def test_w8a8_equals_the_integer_arithmetic_reference():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((48, 3, 8)).astype(np.float32)
    x = (rng.standard_normal((2, 5, 48)) * rng.uniform(0.1, 4, (2, 5, 1))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token
    q = quant.quantize_weight(jnp.asarray(w), fmt="int8").with_act_quant()
    y = np.asarray(jax.jit(linear.project)(jnp.asarray(x), q))
    # numpy: per-token absmax int8 (the same float32 division, then round half to even), an
    # exact integer dot, the rescale in float64.
    x2 = x.reshape(10, 48)
    s_x = np.abs(x2).max(-1) / np.float32(127)
    q_x = np.round(x2 / np.where(s_x > 0, s_x, 1)[:, None]).astype(np.int64)
    acc = q_x @ np.asarray(q.codes, np.int64)
    ref = (acc * s_x.astype(np.float64)[:, None] * np.asarray(q.scales[0], np.float64)).reshape(2, 5, 3, 8)
    np.testing.assert_allclose(y, ref, rtol=4 * EPS32, atol=1e-30)
    assert np.all(y[0, 0] == 0)
    with pytest.raises(ValueError, match="W8A8"):
        quant.quantize_weight(jnp.asarray(w), fmt="int4", group=16).with_act_quant()


@pytest.mark.parametrize("family,scan", [("deepseek", False), ("llama", True)])
def test_experts_mla_and_scanned_stacks_read_their_codes(family, scan):
    """DeepSeek's MoE expert stacks [E, D, F], MLA projections and multi-token head, and a
    scanned [L, ...] LLaMA stack: quantized logits equal the dequantized float model's."""
    import importlib

    from train import build

    config = importlib.import_module(f"configs.{family}").get_config("tiny")
    config.model.scan_layers = scan
    model = build.model(config, 128)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 8)), jnp.int32)
    params = random_params(model)
    q = quant.quantize_params(params, fmt="nf4" if scan else "int4", group=16)
    kinds = {path.split("/")[-1] for path in quant.describe(q)}
    assert {"deepseek": {"wi_gate", "wo", "kv_down", "key_up", "value_up", "query_up", "proj"},
            "llama": {"query", "out", "wi_up"}}[family] <= kinds
    if family == "deepseek":  # the experts' stack: E leads
        assert q["mtp_1"]["layer"]["mlp"]["wi_gate"].lead_shape == (params["mtp_1"]["layer"]["mlp"]["wi_gate"].shape[0],)
    run = lambda p: compiled(lambda p: model.apply({"params": p}, ids), p)
    first = lambda out: out[0] if isinstance(out, tuple) else out
    quantized, dequantized = np.asarray(first(run(q))), np.asarray(first(run(quant.dequantize_tree(q))))
    assert np.abs(quantized - dequantized).max() <= _logit_bound(model.config) * np.abs(dequantized).max()
