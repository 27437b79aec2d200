"""inference/sampling.py: each filter against a float64 numpy reference written from its
definition, the chain against transformers' logits processors, and the sampler's draws
against the filtered softmax.

Axis letters: B batch, V vocabulary.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers.generation.logits_process as hf_lp

from inference.sampling import (
    SamplingConfig,
    min_p_filter,
    process_logits,
    repetition_penalty,
    sample,
    top_k_filter,
    top_p_filter,
)

B, V = 4, 13
LOGITS = np.random.default_rng(0).normal(0.0, 2.0, size=(B, V)).astype(np.float32)
LOGITS[1, 3] = LOGITS[1, 7]  # a tie, for top-k's "ties with the k-th stay"


def _kept(filtered) -> np.ndarray:
    return np.isfinite(np.asarray(filtered))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("k", [1, 3, 7, V, V + 5])
def test_top_k_keeps_the_k_largest(k):
    x = LOGITS.astype(np.float64)
    kth = np.sort(x, axis=-1)[:, ::-1][:, min(k, V) - 1 : min(k, V)]
    np.testing.assert_array_equal(_kept(top_k_filter(jnp.asarray(LOGITS), k)), x >= kth)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_top_p_keeps_the_smallest_nucleus(p):
    """Reference: walk tokens from most to least likely and keep them until the kept mass
    reaches p (the token that crosses p is kept, the most likely one always)."""
    probs = _softmax(LOGITS.astype(np.float64))
    want = np.zeros((B, V), bool)
    for b in range(B):
        mass = 0.0
        for v in np.argsort(-probs[b], kind="stable"):
            want[b, v] = True
            mass += probs[b, v]
            if mass >= p:
                break
    np.testing.assert_array_equal(_kept(top_p_filter(jnp.asarray(LOGITS), p)), want)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_keeps_tokens_near_the_top(min_p):
    probs = _softmax(LOGITS.astype(np.float64))
    want = probs >= min_p * probs.max(-1, keepdims=True)
    np.testing.assert_array_equal(_kept(min_p_filter(jnp.asarray(LOGITS), min_p)), want)


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits(penalty):
    seen = np.random.default_rng(1).random((B, V)) < 0.4
    x = LOGITS.astype(np.float64)
    want = np.where(seen, np.where(x > 0, x / penalty, x * penalty), x)
    got = repetition_penalty(jnp.asarray(LOGITS), jnp.asarray(seen), penalty)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05, repetition_penalty=1.3),
    SamplingConfig(temperature=1.5, top_p=0.6),
    SamplingConfig(temperature=0.5, min_p=0.2, repetition_penalty=0.8),
], ids=["all", "top_p", "min_p_penalty"])
def test_chain_equals_transformers_logits_processors_hf_torch(config):
    """The order and arithmetic of transformers' generate (repetition penalty, then the warpers)."""
    rng = np.random.default_rng(2)
    input_ids = rng.integers(0, V, size=(B, 6))
    seen = np.zeros((B, V), bool)
    seen[np.arange(B)[:, None], input_ids] = True
    processors = [hf_lp.RepetitionPenaltyLogitsProcessor(config.repetition_penalty)] if config.repetition_penalty \
        else []
    processors.append(hf_lp.TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(hf_lp.TopKLogitsWarper(config.top_k))
    if config.top_p:
        processors.append(hf_lp.TopPLogitsWarper(config.top_p))
    if config.min_p:
        processors.append(hf_lp.MinPLogitsWarper(config.min_p))
    want = hf_lp.LogitsProcessorList(processors)(torch.tensor(input_ids), torch.tensor(LOGITS)).numpy()
    got = np.asarray(process_logits(jnp.asarray(LOGITS), config, jnp.asarray(seen)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_greedy_is_the_argmax_of_the_penalised_logits():
    seen = np.zeros((B, V), bool)
    seen[np.arange(B), LOGITS.argmax(-1)] = True  # penalise each row's best token
    config = SamplingConfig(temperature=0.0, top_k=1, repetition_penalty=100.0)
    got = sample(jnp.asarray(LOGITS), config, jax.random.key(0), jnp.asarray(seen))
    want = np.where(seen, np.where(LOGITS > 0, LOGITS / 100, LOGITS * 100), LOGITS).argmax(-1)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_sampled_tokens_follow_the_filtered_softmax():
    """Chi-square of 20000 draws of one row against softmax(top_k(logits / T))."""
    config = SamplingConfig(temperature=0.8, top_k=6)
    n = 20000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS[0]), (n, V))
    draws = np.asarray(jax.jit(lambda x, r: sample(x, config, r))(logits, jax.random.key(3)))
    want = _softmax(np.asarray(process_logits(jnp.asarray(LOGITS[:1]), config), np.float64))[0]
    kept = want > 0
    assert set(np.unique(draws)) <= set(np.flatnonzero(kept))
    counts = np.bincount(draws, minlength=V)[kept]
    p_value = scipy.stats.chisquare(counts, n * want[kept] / want[kept].sum()).pvalue  # float64, sums to n
    print(f"\nsampler chi-square p-value: {p_value:.3g}")
    assert p_value > 1e-3


def test_bad_settings_are_named():
    for kwargs, match in [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
                          ({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p"),
                          ({"repetition_penalty": 0.0}, "repetition_penalty")]:
        with pytest.raises(ValueError, match=match):
            SamplingConfig(**kwargs)
