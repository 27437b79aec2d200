"""int8 and fp8 KV caches (models/layers/kv_cache.py, inference/kv_quant.py): the quantizer
against numpy and ml_dtypes, attention over a quantized cache against a float64 re-implementation
over the dequantized cache (exact up to float32 rounding) and against the float cache (within the
bound the quantization step implies), cached decoding equal to a recompute, exact byte counts,
and decoding through generate, the engine (contiguous and paged) and the server.

Axis letters: B batch, T new tokens, S cache slots, D model width, N heads, K kv heads, H head dim.
"""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import httpx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs.loader import load_config
from data.tokenizer import ByteLevelBPE
from data.tokenizer.hf_json import export_bpe
from inference import cache_nbytes, generate, init_cache, kv_cache_bytes
from inference import paged as paged_lib
from inference.engine import Engine, Request
from inference.generate import generate_text
from inference.kv_quant import kv_quant_report, with_kv_cache_quant
from inference.load import Loaded, load
from models.deepseek import deepseek_v3_config
from models.gpt import GPT, GPTConfig, llama_config
from models.hf import save_pretrained
from models.layers.attention import gather_pages
from models.layers.blocks import BlockConfig
from models.layers.kv_cache import CODE_MAX, dequantize, fake_quantize, quantize
from models.layers.multihead import MultiHeadAttention
from models.random_params import random_params
from train import build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS32 = float(np.finfo(np.float32).eps)
QUANTS = ("int8", "fp8")
LLAMA = llama_config(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_len=64)
GPT2 = GPTConfig(vocab_size=40, num_layers=2, max_len=64, block=BlockConfig(
    d_model=32, num_heads=4, d_ff=64, mlp_activation="gelu_tanh", norm_position="pre", dropout_rate=0.0))
# Latent attention with dense MLPs (first_dense_layers = num_layers: no experts to compile).
MLA = deepseek_v3_config(vocab_size=40, d_model=32, num_layers=2, num_heads=4, d_ff=40, moe_d_ff=12, num_experts=4, n_group=2, topk_group=1,
                         num_experts_per_tok=2, first_dense_layers=2, q_lora_rank=16, kv_lora_rank=12,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_len=64)


def quantized(cfg: GPTConfig, quant: str) -> GPTConfig:
    return dataclasses.replace(cfg, block=dataclasses.replace(cfg.block, kv_cache_quant=quant))


def step_bound(x: np.ndarray, scale: np.ndarray, quant: str) -> np.ndarray:
    """|x - dequantize(quantize(x))| per element from the format's step: int8 rounds to the nearest
    multiple of s (s / 2); e4m3 keeps 3 mantissa bits (2^-4 |x|) down to 2^-6 s, below which its
    subnormal step is 2^-9 s (2^-10 s). Plus the float32 roundings of x / s and q * s."""
    s = scale[..., None]
    half_step = s / 2 if quant == "int8" else np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * s)
    return half_step + 4 * EPS32 * np.abs(x)


# ---------------------------------------------------------------------------------------- the quantizer

@pytest.mark.parametrize("quant", QUANTS)
def test_quantize_against_numpy_and_ml_dtypes(quant):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 2, 16)) * np.exp(rng.uniform(-6, 6, (3, 5, 2, 1)))  # scales 1e-3 .. 1e3
    x[0, 0, 0] = 0.0  # an all-zero vector
    x = x.astype(np.float32)
    codes, scale = jax.jit(quantize, static_argnums=1)(x, quant)
    codes, scale = np.asarray(codes), np.asarray(scale)
    assert codes.dtype == (np.int8 if quant == "int8" else ml_dtypes.float8_e4m3fn) and scale.dtype == np.float32
    absmax = np.abs(x.astype(np.float64)).max(-1)
    np.testing.assert_allclose(scale, absmax / CODE_MAX[quant], rtol=EPS32, atol=0)
    # The largest element of each vector maps to the format's largest code, within one rounding.
    top = np.take_along_axis(codes.astype(np.float64), np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    np.testing.assert_array_equal(np.abs(top)[absmax > 0], CODE_MAX[quant])
    assert (codes[0, 0, 0].astype(np.float64) == 0).all() and scale[0, 0, 0] == 0
    # Codes equal the float64 reference (numpy's round half to even, ml_dtypes' e4m3 cast) except
    # where x / s lies within float32 rounding of a rounding boundary.
    y = x.astype(np.float64) / np.where(absmax > 0, absmax / CODE_MAX[quant], 1.0)[..., None]
    want = np.round(y) if quant == "int8" else y.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    near = np.abs(np.abs(y - np.trunc(y)) - 0.5) < 1e-5 if quant == "int8" else np.zeros_like(y, bool)
    got = codes.astype(np.float64)
    assert (got == want)[~near].all() and (np.abs(got - want) <= 1)[near].all()
    back = np.asarray(dequantize(codes, scale, jnp.float32), np.float64)
    err = np.abs(back - x)
    assert (err <= step_bound(x, scale, quant)).all()
    assert err.max() > 0  # it did quantize
    # Without a cache the same rounding is applied, with the identity as its gradient (straight through).
    np.testing.assert_array_equal(np.asarray(fake_quantize(x, quant)), back.astype(np.float32))
    w = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda a: (fake_quantize(a, quant) * w).sum())(x)), w)


# ------------------------------------------------------------------- attention over a quantized cache

D, N, K, H = 32, 4, 2, 8
PREFILL, DECODE, SLOTS = 5, 3, 16


def _attention_layer_outputs(quant: str, paged: bool):
    """A GQA layer (no RoPE) decoding 2 rows: a prefill of 5 tokens, then 3 single tokens.
    Returns (x [B, 8, D], its outputs [B, 8, D], params, the final cache as contiguous [B, S, ...]
    numpy arrays keyed key, value, key_scale, value_scale)."""
    layer = MultiHeadAttention(num_heads=N, num_kv_heads=K, head_dim=H, use_bias=True, kv_cache_quant=quant)
    rng = np.random.default_rng(1)
    B, T = 2, PREFILL + DECODE
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    params = nn.unbox(layer.init(jax.random.key(0), x[:, :1])["params"])
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
    if paged:
        blocks = 4  # 4 positions each; rows take blocks in an interleaved order
        table = np.array([[3, 5, 1, 7], [2, 8, 4, 6]], np.int32)
        pool = {name + "_pages": jnp.zeros((9, blocks, *shape[2:]), dtype) for name, (shape, dtype) in
                _cache_layout(layer, params, x, B, SLOTS).items()}
        cache = {**pool, "block_table": jnp.asarray(table)}
    else:
        cache = init_layer_cache(layer, params, x, B, SLOTS)

    @jax.jit
    def call(cache, x_BTD, positions_BT):
        out, state = layer.apply({"params": params, "cache": cache}, x_BTD, causal=True, q_positions=positions_BT,
                                 mutable=["cache"])
        return out, state["cache"]

    outs = []
    out, cache = call(cache, x[:, :PREFILL], np.broadcast_to(np.arange(PREFILL), (B, PREFILL)))
    outs.append(out)
    for t in range(PREFILL, T):
        out, cache = call(cache, x[:, t:t + 1], np.full((B, 1), t))
        outs.append(out)
    if paged:
        cache = {name.removesuffix("_pages"): gather_pages(v, cache["block_table"])
                 for name, v in cache.items() if name != "block_table"}
    return x, np.asarray(jnp.concatenate(outs, 1), np.float64), params, {k: np.asarray(v) for k, v in cache.items()}


def _cache_layout(layer, params, x, B, S):
    shapes = jax.eval_shape(lambda: layer.apply({"params": params}, jnp.zeros((B, S, D)), causal=True,
                                                mutable=["cache"])[1]["cache"])
    return {name: (s.shape, s.dtype) for name, s in shapes.items()}


def init_layer_cache(layer, params, x, B, S):
    return {name: jnp.zeros(shape, dtype) for name, (shape, dtype) in _cache_layout(layer, params, x, B, S).items()}


ROUNDINGS = 64  # float32 roundings of the output's terms allowed (as tests/torch_reference.py)


def _reference(x, params, k_BSKH, v_BSKH):
    """Float64 attention of every token over slots 0..its position of the given keys and values.

    Returns (y [B, T, D], rounding [B, T, D]: ROUNDINGS float32 roundings of the sum of |terms| of
    y's last contraction, q [B, T, N, H], v [B, T, N, H], weights [B, N, T, S])."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    T = x.shape[1]
    x = x.astype(np.float64)
    q = np.einsum("BTD,DNH->BTNH", x, p["query"]) + p["query_bias"]
    k = np.repeat(k_BSKH[:, :T], N // K, axis=2)  # [B, T, N, H]: query head n reads kv head n // G
    v = np.repeat(v_BSKH[:, :T], N // K, axis=2)
    logits = np.where(np.tril(np.ones((T, T), bool)), np.einsum("BTNH,BSNH->BNTS", q, k) * H**-0.5, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("BNTS,BSNH->BTNH", w, v)
    y = np.einsum("BTNH,NHD->BTD", o, p["out"]) + p["out_bias"]
    magnitude = np.einsum("BTNH,NHD->BTD", np.abs(o), np.abs(p["out"])) + np.abs(p["out_bias"])
    return y, ROUNDINGS * EPS32 * magnitude, q, v, w


def _step_bound_on_outputs(q, v, w, bound_k, bound_v, w_out):
    """The most the outputs can move when every key and value element moves by at most its bound.

    A logit moves by at most a_s = |q| . bound_k[s] / sqrt(H), so a weight p_s by at most
    p_s r_s with r_s = max(e^(a_s) / sum_j p_j e^(-a_j) - 1, 1 - e^(-a_s) / sum_j p_j e^(a_j));
    as the weights sum to 1 either way, the output sum_s p_s v_s moves by at most
    sum_s p_s r_s |v_s - c| (c the midrange of the visible v) + sum_s p_s (1 + r_s) bound_v[s],
    and y by that through |w_out|."""
    G = N // K
    bk, bv = np.repeat(bound_k, G, axis=2), np.repeat(bound_v, G, axis=2)  # [B, T, N, H]
    a = np.einsum("BTNH,BSNH->BNTS", np.abs(q), bk) * H**-0.5
    lo = (w * np.exp(-a)).sum(-1, keepdims=True)
    hi = (w * np.exp(a)).sum(-1, keepdims=True)
    r = np.maximum(np.exp(a) / lo - 1, 1 - np.exp(-a) / hi)
    T = w.shape[-1]
    visible = np.tril(np.ones((T, T), bool))[None, None, :, :, None]  # [1, 1, T, S, 1]
    v_BNSH = v.transpose(0, 2, 1, 3)[:, :, None]  # [B, N, 1, S, H]
    center = (np.where(visible, v_BNSH, -np.inf).max(3) + np.where(visible, v_BNSH, np.inf).min(3)) / 2
    do = (np.einsum("BNTS,BNTSH->BTNH", w * r, np.abs(v_BNSH - center[:, :, :, None]))
          + np.einsum("BNTS,BSNH->BTNH", w * (1 + r), bv))
    return np.einsum("BTNH,NHD->BTD", do, np.abs(w_out))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("quant", QUANTS)
def test_attention_reads_the_dequantized_cache_and_stays_within_the_step_bound(quant, paged):
    x, got, params, cache = _attention_layer_outputs(quant, paged)
    assert cache["key"].dtype == np.dtype(np.int8 if quant == "int8" else ml_dtypes.float8_e4m3fn)
    assert cache["key_scale"].shape == cache["key"].shape[:3] and cache["key_scale"].dtype == np.float32
    deq = {n: cache[n].astype(np.float64) * cache[n + "_scale"].astype(np.float64)[..., None] for n in ("key", "value")}
    # 1. The exact invariant: the layer's outputs are attention over the cache's dequantized keys and values.
    want, rounding, *_ = _reference(x, params, deq["key"], deq["value"])
    float32_error = np.abs(got - want)
    assert (float32_error <= rounding).all(), float32_error.max()

    # 2. Against the float cache: the keys and values the layer computed (float64 from x) moved by at
    # most the step bound (the writes round trip), hence the outputs by at most `_step_bound_on_outputs`.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    T = x.shape[1]
    kv = {n: np.einsum("BTD,DKH->BTKH", x.astype(np.float64), p[n]) + p[n + "_bias"] for n in ("key", "value")}
    bound = {n: step_bound(kv[n], cache[n + "_scale"][:, :T].astype(np.float64), quant) for n in kv}
    assert all((np.abs(deq[n][:, :T] - kv[n]) <= bound[n]).all() for n in kv)
    exact, rounding, q, v, w = _reference(x, params, kv["key"], kv["value"])
    dy = _step_bound_on_outputs(q, v, w, bound["key"], bound["value"], p["out"])
    err = np.abs(got - exact)
    print(f"\n{quant} {'paged' if paged else 'contiguous'}: max |y - attention over the dequantized cache| = "
          f"{float32_error.max():.3g} (bound {rounding.max():.3g}); max |y - y_float| = {err.max():.3g} (bound "
          f"{dy.max():.3g}, outputs up to {np.abs(exact).max():.3g})")
    assert (err <= dy + rounding).all()
    assert err.max() > 100 * float32_error.max()  # the cache did quantize


# --------------------------------------------------------------------------------------- whole models

def _cached_logits(model, params, ids, prefill):
    """Logits of `ids` [B, T]: the first `prefill` tokens at once, then one token per call."""
    @jax.jit
    def call(cache, x, positions):
        out, state = model.apply({"params": params, "cache": cache}, x, positions=positions, mutable=["cache"])
        return out, state["cache"]

    B, T = ids.shape
    cache = init_cache(model, B, T)
    out, cache = call(cache, ids[:, :prefill], np.broadcast_to(np.arange(prefill), (B, prefill)))
    logits = [out]
    for t in range(prefill, T):
        out, cache = call(cache, ids[:, t:t + 1], np.full((B, 1), t))
        logits.append(out)
    return np.asarray(jnp.concatenate(logits, 1), np.float64)


@pytest.mark.parametrize("family,quant", [("llama", "int8"), ("deepseek_mla", "fp8")])
def test_cached_decoding_equals_a_recompute_over_quantized_keys_and_values(family, quant):
    """A model with a quantized cache is one function: without a cache, attention rounds its keys
    and values (or MLA's latents) exactly as the cache stores them, so decoding token by token equals
    a full forward within float32 rounding, while the float cache's logits differ."""
    cfg = {"llama": LLAMA, "deepseek_mla": MLA}[family]
    model, float_model = GPT(quantized(cfg, quant)), GPT(cfg)
    params = random_params(float_model)
    ids = np.random.default_rng(2).integers(1, 40, (2, 10)).astype(np.int32)
    cached = _cached_logits(model, params, ids, prefill=6)
    recomputed = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids), np.float64)
    floats = np.asarray(jax.jit(lambda p, x: float_model.apply({"params": p}, x))(params, ids), np.float64)
    scale = np.abs(recomputed).max()
    err, vs_float = np.abs(cached - recomputed).max(), np.abs(floats - recomputed).max()
    print(f"\n{family} {quant}: max |cached - recomputed| = {err:.3g}, |float cache - quantized| = {vs_float:.3g}")
    assert err <= 256 * EPS32 * max(1.0, scale)
    assert vs_float > 1e3 * EPS32 * scale


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", ["gpt2_mha", "llama_gqa", "deepseek_mla", "llama_scan"])
def test_quantized_cache_bytes_equal_the_formula(family, quant):
    base = {"gpt2_mha": GPT2, "llama_gqa": LLAMA, "deepseek_mla": MLA,
            "llama_scan": dataclasses.replace(LLAMA, scan_layers=True)}[family]
    cfg = quantized(base, quant)
    model = GPT(cfg)
    cache = init_cache(model, 3, 24)
    assert cache_nbytes(cache) == kv_cache_bytes(cfg, 3, 24)
    pool = paged_lib.init_paged_cache(model, 7, 4)
    assert cache_nbytes(pool) == paged_lib.paged_cache_bytes(cfg, 7, 4)
    # Each layer's block table sits beside its pools, [B, M] or [L, B, M] when scanned, whichever
    # pool (codes or scales, of rank 4, 3 or 2) is met last.
    tables = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(
        paged_lib.with_block_table(pool, np.zeros((3, 5), np.int32))) if "block_table" in str(path)]
    assert tables == [(cfg.num_layers, 3, 5) if cfg.scan_layers else (3, 5)] * (1 if cfg.scan_layers else
                                                                                 cfg.num_layers)
    codes = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(cache) if "scale" not in str(path)]
    assert all(leaf.dtype.itemsize == 1 for leaf in codes)
    ratio = kv_cache_bytes(cfg, 3, 24) / kv_cache_bytes(base, 3, 24)  # float32 cache
    per_vector = (cfg.block.mla.kv_lora_rank if cfg.block.mla else cfg.block.head_size)
    assert ratio < (per_vector + 4 + 4) / (4 * per_vector)  # under a quarter plus the scales' share


# ------------------------------------------------------------------------ generate, engine, server

ENGINE_REQUESTS = [Request([3, 17, 8, 22], max_new_tokens=9), Request([5], max_new_tokens=12),
                   Request([9, 30, 2, 11, 6, 14, 1], max_new_tokens=7)]


@pytest.fixture(scope="module")
def llama_params():
    return random_params(GPT(LLAMA), scale=2.0)


def test_generate_and_the_engine_contiguous_and_paged_decode_alike(llama_params):
    """int8 here, fp8 through the server below."""
    model = with_kv_cache_quant(GPT(LLAMA), "int8")
    assert model.config.block.kv_cache_quant == "int8"
    # One batch (rows decode independently: quantization is per position and kv head), cut per request.
    greedy = generate(model, llama_params, [r.prompt for r in ENGINE_REQUESTS], max_new_tokens=12)
    alone = [row[: r.max_new_tokens] for row, r in zip(greedy, ENGINE_REQUESTS)]
    outputs = {}
    for paged in (False, True):
        engine = Engine(GPT(LLAMA), llama_params, num_slots=2, max_len=32, kv_cache="int8",
                        **({"block_size": 8, "num_blocks": 9} if paged else {}))
        assert engine.cache_bytes() == (paged_lib.paged_cache_bytes(engine.model.config, 9, 8) if paged
                                        else kv_cache_bytes(engine.model.config, 2, 32))
        ids = [engine.submit(r) for r in ENGINE_REQUESTS]
        engine.run()
        outputs[paged] = [engine.results[i] for i in ids]
    assert outputs[False] == outputs[True] == alone


@pytest.fixture(scope="module")
def text_model():
    """A random Llama over a small byte-level BPE, as an `inference.load.Loaded`."""
    text = "The cache holds the keys and the values of every token seen so far. " * 4
    tokenizer = ByteLevelBPE.train(text, 290)
    cfg = dataclasses.replace(LLAMA, vocab_size=tokenizer.vocab_size)
    return Loaded(GPT(cfg), random_params(GPT(cfg), scale=2.0), tokenizer, "random llama")


def test_the_server_decodes_with_a_quantized_paged_cache(text_model):
    from inference.serve.app import create_app
    from inference.serve.testing import running_server

    loaded, tokenizer = text_model, text_model.tokenizer
    app = create_app(loaded, model_name="tiny", num_slots=2, max_len=64, block_size=8, kv_cache="fp8")
    assert app.state.loop.engine.model.config.block.kv_cache_quant == "fp8"
    prompt = "The cache holds"
    want = generate_text(with_kv_cache_quant(loaded.model, "fp8"), loaded.params, tokenizer, [prompt],
                         max_new_tokens=10)[0]
    with running_server(app) as url:
        body = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                         "temperature": 0}, timeout=120).json()
    assert body["choices"][0]["text"] == want


def test_the_cli_decodes_with_a_quantized_cache(text_model, tmp_path):
    """`python -m inference --kv_cache=int8` on a model saved without it (a Hugging Face directory)."""
    save_pretrained(text_model.model, text_model.params, str(tmp_path))
    export_bpe(text_model.tokenizer, tmp_path / "tokenizer.json")
    loaded = load(str(tmp_path))
    want = generate_text(with_kv_cache_quant(loaded.model, "int8"), loaded.params, loaded.tokenizer, ["The cache"],
                         max_new_tokens=10)[0]
    assert want != generate_text(loaded.model, loaded.params, loaded.tokenizer, ["The cache"], max_new_tokens=10)[0]
    result = subprocess.run([sys.executable, "-m", "inference", f"--checkpoint={tmp_path}", "--prompt=The cache",
                             "--max_new_tokens=10", "--kv_cache=int8"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": REPO}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "The cache" + want + "\n"


def test_kv_quant_report_rows(llama_params):
    rows = kv_quant_report(GPT(LLAMA), llama_params, [[3, 17, 8], [5, 9, 1, 2, 7]], max_new_tokens=8,
                           formats=("float", "int8"), timing_repeats=1)
    by = {r["kv_cache"]: r for r in rows}
    assert by["float"]["max_logit_error"] == 0 and by["float"]["greedy_agreement"] == 1
    assert by["float"]["bytes_vs_float32"] == 1 and by["float"]["bytes_vs_bf16"] == 2
    assert by["int8"]["cache_bytes"] == kv_cache_bytes(quantized(LLAMA, "int8"), 2, 13)
    assert by["int8"]["bytes_vs_float32"] == (8 + 4) / 32  # head_dim 8: 8 code bytes + a 4-byte scale
    assert 0 < by["int8"]["max_logit_error"] < np.inf and 0 <= by["int8"]["greedy_agreement"] <= 1
    assert by["int8"]["decode_tokens_per_s"] > 0 and by["float"]["speed_vs_float"] == 1  # timed, not asserted


# -------------------------------------------------------------------------------------- configuration

def test_the_config_switch_and_its_errors():
    config = load_config(os.path.join(REPO, "configs/llama.py:tiny"), ["model.block.kv_cache_quant=int8"])
    model = build.model(config, 64)
    assert model.config.block.kv_cache_quant == "int8"
    config.model.block.kv_cache_quant = "int4"
    with pytest.raises(ValueError, match=r"model.block.kv_cache_quant`='int4'"):
        build.model(config, 64)
    bert = load_config(os.path.join(REPO, "configs/bert.py:tiny"), ["model.block.kv_cache_quant=fp8"])
    with pytest.raises(ValueError, match="model.block.kv_cache_quant"):
        build.model(bert, 64)
    with pytest.raises(ValueError, match="--kv_cache='int4'"):
        with_kv_cache_quant(GPT(LLAMA), "int4")
