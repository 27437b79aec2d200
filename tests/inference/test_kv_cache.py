"""KV-cache decoding (models/layers/attention.write_cache, inference/kv_cache.py): cached logits
equal a full recompute for every decoder family, the cache compiles once, and its size
follows the formula.

Axis letters: B batch, T length, S cache length, V vocabulary.

Measured max |cached - recomputed| per family is printed (run with `-s`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference import cache_nbytes, generate, init_cache, kv_cache_bytes
from inference.generate import decode_step
from models.deepseek import deepseek_v3_config
from models.gpt import GPT, GPTConfig, llama_config, mixtral_config, qwen3_config, scan_params
from models.layers.blocks import BlockConfig
from models.layers.positional import RopeConfig

VOCAB = 53
LLAMA = {"vocab_size": VOCAB, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "d_ff": 48,
         "max_len": 32}
FAMILIES = {
    "gpt2": GPTConfig(vocab_size=VOCAB, num_layers=2, max_len=32, block=BlockConfig(
        d_model=32, num_heads=4, d_ff=64, mlp_activation="gelu_tanh", norm_position="pre", dropout_rate=0.0)),
    "llama_gqa": llama_config(**LLAMA),
    "qwen3_qk_norm": qwen3_config(**{**LLAMA, "head_dim": 16}),
    "sliding_window": llama_config(**LLAMA, sliding_window=3),
    "mixtral_moe": mixtral_config(**{**LLAMA, "d_ff": 24}, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3_mla": deepseek_v3_config(
        vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, d_ff=40, moe_d_ff=12, num_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_dense_layers=1, q_lora_rank=16, kv_lora_rank=12,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_len=32,
        rope=RopeConfig(interleaved=True, scaling="yarn", factor=4.0, original_max_len=16, mscale=1.0,
                        mscale_all_dim=1.0)),
}
# Scanned layers with remat: the cache is stacked on a leading layers axis (DeepSeek: two
# groups, the dense first layer and the MoE rest).
SCANNED = {f"{name}_scan_remat": dataclasses.replace(FAMILIES[name], scan_layers=True, remat="full")
           for name in ("llama_gqa", "deepseek_v3_mla")}
FAST_COMPILE = {"xla_backend_optimization_level": 0}

LENGTHS = (5, 2, 7)  # prompts of different lengths in one batch
STEPS = (1, 3, 1)  # tokens per row written after the prefill: decode, a 3-token chunk (speculative verify), decode
CACHE_LEN = 16  # > 7 + 5: some slots are never written


def random_params(cfg: GPTConfig, seed: int = 0) -> dict:
    """Params of the model's shapes drawn in numpy (faster than compiling flax's init), with norm
    scales around 1 and biases around 0 so that none hides behind its initial value."""
    shapes = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 1:
            mean, std = (1.0, 0.1) if "norm" in name or "scale" in name else (0.0, 0.1)
        elif "embedding" in name:
            mean, std = 0.0, 0.5
        else:  # fan-in: the first axis of q/k/v [D, ., H], else every axis but the last
            fan_in = leaf.shape[0] if any(k in name for k in ("query", "key", "value")) else np.prod(leaf.shape[:-1])
            mean, std = 0.0, float(fan_in) ** -0.5
        return jnp.asarray(mean + std * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)["params"]


def _cached_and_recomputed(cfg: GPTConfig, params: dict):
    """Logits of the real tokens, decoded through a cache and recomputed without one: two lists
    over rows of [tokens, V] arrays."""
    model = GPT(cfg)
    rng = np.random.default_rng(1)
    total = sum(STEPS)
    seqs = [rng.integers(1, VOCAB, size=n + total) for n in LENGTHS]  # prompt + teacher-forced continuation
    B, T = len(LENGTHS), max(LENGTHS)
    lengths = np.array(LENGTHS)

    @jax.jit
    def write(cache, ids, positions):
        logits, state = model.apply({"params": params, "cache": cache}, ids, positions=positions, mutable=["cache"])
        return logits, state["cache"]

    prompt_ids = np.zeros((B, T), np.int32)
    for b, s in enumerate(seqs):
        prompt_ids[b, : LENGTHS[b]] = s[: LENGTHS[b]]
    cache = init_cache(model, B, CACHE_LEN)
    logits, cache = write(cache, prompt_ids, np.broadcast_to(np.arange(T), (B, T)))
    cached = [[np.asarray(logits[b, : LENGTHS[b]])] for b in range(B)]
    done = 0
    for n in STEPS:  # each row continues at its own length
        positions = lengths[:, None] + done + np.arange(n)
        ids = np.stack([s[p] for s, p in zip(seqs, positions)]).astype(np.int32)
        logits, cache = write(cache, ids, positions)
        for b in range(B):
            cached[b].append(np.asarray(logits[b]))
        done += n
    cached = [np.concatenate(rows) for rows in cached]

    full_ids = np.zeros((B, T + total), np.int32)
    for b, s in enumerate(seqs):
        full_ids[b, : len(s)] = s
    full = jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=FAST_COMPILE)(params, full_ids)
    recomputed = [np.asarray(full[b, : len(s)]) for b, s in enumerate(seqs)]
    return cached, recomputed, cache


@pytest.mark.parametrize("family", [*FAMILIES, *SCANNED])
def test_cached_decoding_equals_full_recompute(family):
    cfg = {**FAMILIES, **SCANNED}[family]
    if cfg.scan_layers:  # the same weights as the per-layer family
        params = scan_params(random_params(dataclasses.replace(cfg, scan_layers=False)), cfg)
    else:
        params = random_params(cfg)
    cached, recomputed, cache = _cached_and_recomputed(cfg, params)
    scale = max(np.abs(r).max() for r in recomputed)
    err = max(np.abs(c - r).max() for c, r in zip(cached, recomputed))
    print(f"\n{family}: max |cached - recomputed| = {err:.3g} (logits up to {scale:.3g})")
    assert err <= 1e-5 * max(1.0, scale)
    if cfg.scan_layers:  # stacked per group: [layers, B, S, ...]
        assert all(leaf.shape[0] in (cfg.first_dense_layers, cfg.num_layers - cfg.first_dense_layers)
                   and leaf.shape[1:3] == (len(LENGTHS), CACHE_LEN) for leaf in jax.tree.leaves(cache))


def test_sliding_window_cache_forgets_beyond_the_window():
    """The window is real in the cached path: a token outside it does not change the logits."""
    cfg = FAMILIES["sliding_window"]  # window 3
    model, params = GPT(cfg), random_params(cfg)

    def last_logits(ids):
        cache = init_cache(model, 1, 8)
        logits, state = model.apply({"params": params, "cache": cache}, jnp.asarray([ids[:-1]]), mutable=["cache"])
        logits, _ = model.apply({"params": params, "cache": state["cache"]}, jnp.asarray([ids[-1:]]),
                                positions=jnp.asarray([[len(ids) - 1]]), mutable=["cache"])
        return np.asarray(logits[0, -1])

    # With 2 layers the receptive field of the last token is 2 * (3 - 1) = 4 positions back.
    a, b = [7, 1, 2, 3, 4, 5, 6], [9, 1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(last_logits(a), last_logits(b))
    assert np.abs(last_logits([7, 1, 2, 3, 4, 5]) - last_logits([7, 1, 2, 9, 4, 5])).max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "deepseek_v3_mla", "llama_gqa_scan_remat", "llama_bf16"])
def test_cache_bytes_follow_the_formula(family):
    cfg = {**FAMILIES, **SCANNED, "llama_bf16": llama_config(**LLAMA, dtype=jnp.bfloat16)}[family]
    batch, length = 3, 24
    cache = init_cache(GPT(cfg), batch, length)
    b = cfg.block
    if b.mla is not None:
        formula = cfg.num_layers * (b.mla.kv_lora_rank + b.mla.qk_rope_head_dim) * length * batch
    else:
        formula = 2 * cfg.num_layers * b.kv_heads * b.head_size * length * batch
    formula *= jnp.dtype(b.dtype).itemsize
    print(f"\n{family}: KV cache for batch {batch} x {length} positions = {cache_nbytes(cache)} bytes "
          f"(formula {formula})")
    assert kv_cache_bytes(cfg, batch, length) == formula == cache_nbytes(cache)
    assert all(leaf.dtype == b.dtype for leaf in jax.tree.leaves(cache))


def test_decode_step_compiles_once_for_all_tokens():
    """The streaming path jits one step; positions are data, so every token reuses one program."""
    cfg = dataclasses.replace(FAMILIES["llama_gqa"], max_len=48)  # a config no other test compiles
    model, params = GPT(cfg), random_params(cfg)
    before = decode_step._cache_size()
    steps = []
    generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=8, callback=lambda i, toks: steps.append(toks))
    assert len(steps) == 8
    assert decode_step._cache_size() == before + 1
    generate(model, params, [[6, 7, 8], [9, 10]], max_new_tokens=8, callback=lambda i, toks: None)
    assert decode_step._cache_size() == before + 1


def test_cache_refuses_packed_rows_and_dynamic_rope_latents():
    cfg = FAMILIES["llama_gqa"]
    model, params = GPT(cfg), random_params(cfg)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model.apply({"params": params, "cache": init_cache(model, 1, 8)}, ids, segment_ids=ids, mutable=["cache"])
    mla_cfg = FAMILIES["deepseek_v3_mla"]
    dynamic = dataclasses.replace(mla_cfg, block=dataclasses.replace(
        mla_cfg.block, rope=RopeConfig(interleaved=True, scaling="dynamic", factor=2.0, original_max_len=16)))
    with pytest.raises(ValueError, match="dynamic RoPE"):
        init_cache(GPT(dynamic), 1, 8)
