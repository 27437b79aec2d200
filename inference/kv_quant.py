"""KV-cache quantization at inference: run a trained model with an int8 or fp8 cache, and
measure what it saves and costs.

Axis letters: B prompts, T prompt length, N new tokens, V vocabulary.

The cache's storage is a model setting (`BlockConfig.kv_cache_quant`, config key
`model.block.kv_cache_quant`) that changes no parameter, so any trained model can decode
with a quantized cache:

    model = with_kv_cache_quant(loaded.model, "int8")      # same params
    generate(model, params, prompts, max_new_tokens=64)
    python -m inference --checkpoint=/tmp/tiny --prompt="The " --kv_cache=int8
    python -m inference.serve --checkpoint=/tmp/tiny --kv_cache=fp8 --block_size=16

`kv_quant_report` measures, side by side in one run and against the same model with its
cache in the compute dtype: the cache's bytes (`kv_cache_bytes`, codes + scales) and their
ratio to float32 and bf16 caches; the logit error under teacher forcing on the float
cache's greedy continuation; greedy-token agreement over N generated tokens; and decode
tokens/s. Those are the KV-cache rows of `benchmarks/compression_table.py`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.generate import decode_loop, generate, initial_state, pad_prompts, prefill
from inference.kv_cache import init_cache, kv_cache_bytes
from inference.sampling import SamplingConfig
from models.gpt import GPT

KV_CACHE_CHOICES = ("float", "int8", "fp8")  # --kv_cache: "float" is the compute dtype


def quant_of(kv_cache: str) -> str:
    """The `kv_cache_quant` value of a --kv_cache choice ("float" -> "")."""
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(f"--kv_cache={kv_cache!r}; expected one of {KV_CACHE_CHOICES}")
    return "" if kv_cache == "float" else kv_cache


def with_kv_cache_quant(model: GPT, kv_cache: str | None) -> GPT:
    """`model` with its KV cache stored as `kv_cache` ("float" | "int8" | "fp8"; None: unchanged).

    The parameters are the same: only how self-attention stores (and, without a cache,
    rounds) its keys and values changes.
    """
    if kv_cache is None:
        return model
    if not isinstance(model, GPT):
        raise TypeError(f"a KV cache format applies to a decoder-only models.gpt.GPT, got {type(model).__name__}")
    quant = quant_of(kv_cache)
    block = dataclasses.replace(model.config.block, kv_cache_quant=quant)
    return model.clone(config=dataclasses.replace(model.config, block=block))


def _bytes_in(config, dtype, batch: int, length: int) -> int:
    block = dataclasses.replace(config.block, kv_cache_quant="", dtype=dtype)
    return kv_cache_bytes(dataclasses.replace(config, block=block), batch, length)


def _decode_seconds(model: GPT, params, ids_BT: np.ndarray, lengths_B: np.ndarray, max_new_tokens: int,
                    repeats: int) -> float:
    """The fastest of `repeats` greedy decode loops of N tokens (prefill excluded), after one
    compiling run."""
    sampling = SamplingConfig()
    best = float("inf")
    for i in range(repeats + 1):
        ids, lengths = jnp.asarray(ids_BT), jnp.asarray(lengths_B)  # fresh: the decode loop donates its state
        logits, cache = prefill(model, params, init_cache(model, ids.shape[0], ids.shape[1] + max_new_tokens),
                                ids, lengths)
        state = initial_state(logits, cache, ids, lengths, max_new_tokens=max_new_tokens, sampling=sampling,
                              vocab_size=model.config.vocab_size)
        jax.block_until_ready(state)
        start = time.perf_counter()
        jax.block_until_ready(decode_loop(model, sampling, (), params, jax.random.key(0), state))
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def kv_quant_report(model: GPT, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                    formats: Sequence[str] = KV_CACHE_CHOICES, timing_repeats: int = 3) -> list[dict]:
    """Bytes, logit error, greedy agreement and decode speed of each KV-cache format.

    Args:
      model, params: a decoder-only `GPT` (any `kv_cache_quant`; "float" is its compute dtype).
      prompts: token-id lists (B of them), decoded together.
      max_new_tokens: N, greedy tokens generated per prompt (no stop tokens).
      formats: among KV_CACHE_CHOICES; "float" is the reference of every ratio and error.
      timing_repeats: timed decode loops per format (the fastest counts); 0: no timing.

    Returns:
      One dict per format: kv_cache; cache_bytes (B rows of T + N positions, `kv_cache_bytes`);
      bytes_vs_float32, bytes_vs_bf16 (ratios to those caches); max_logit_error and
      mean_logit_error (|logits - float logits| over the N continuation positions, teacher-
      forced on the float cache's greedy tokens); top1_agreement (share of those positions
      whose argmax agrees); greedy_agreement (share of the N greedy tokens equal to the float
      cache's, position by position) and greedy_prefix (mean share before the first
      difference); decode_tokens_per_s (B * N / the decode loop's seconds) and speed_vs_float.
    """
    for f in formats:
        quant_of(f)
    cfg = model.config
    ids, lengths = pad_prompts(prompts)
    B, T = ids.shape
    N = max_new_tokens
    models = {f: with_kv_cache_quant(model, f) for f in ("float", *formats)}
    greedy = {f: np.array([row + [-1] * (N - len(row)) for row in generate(m, params, prompts, max_new_tokens=N)])
              for f, m in models.items()}

    # Teacher forcing: prompt + the float cache's greedy tokens, one full forward per format (a
    # forward pass without a cache equals cached decoding, `models.layers.kv_cache`).
    full = np.zeros((B, T + N), np.int32)
    for b, p in enumerate(prompts):
        full[b, : len(p)], full[b, len(p): len(p) + N] = p, greedy["float"][b]
    cont = np.stack([np.arange(n - 1, n - 1 + N) for n in lengths])  # positions predicting the N tokens

    def continuation_logits(m):
        logits = jax.jit(lambda p, x: m.apply({"params": p}, x))(params, jnp.asarray(full))
        logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, np.float64)
        return np.take_along_axis(logits, cont[:, :, None], axis=1)  # [B, N, V]

    reference = continuation_logits(models["float"])
    seconds = {f: _decode_seconds(m, params, ids, lengths, N, timing_repeats) if timing_repeats else None
               for f, m in models.items()}
    rows = []
    for f in formats:
        m = models[f]
        logits = reference if f == "float" else continuation_logits(m)
        err = np.abs(logits - reference)
        same = greedy[f] == greedy["float"]
        first_diff = np.where(same.all(1), N, np.argmin(same, axis=1))
        nbytes = kv_cache_bytes(m.config, B, T + N)
        rows.append({
            "kv_cache": f,
            "cache_bytes": nbytes,
            "bytes_vs_float32": nbytes / _bytes_in(cfg, jnp.float32, B, T + N),
            "bytes_vs_bf16": nbytes / _bytes_in(cfg, jnp.bfloat16, B, T + N),
            "max_logit_error": float(err.max()),
            "mean_logit_error": float(err.mean()),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
            "greedy_agreement": float(same.mean()),
            "greedy_prefix": float(first_diff.mean() / N),
            "decode_tokens_per_s": B * N / seconds[f] if seconds[f] else None,
            "speed_vs_float": seconds["float"] / seconds[f] if seconds[f] else None,
        })
    return rows
