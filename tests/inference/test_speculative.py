"""inference/speculative.py: greedy speculative decoding reproduces the target's greedy output,
and sampled speculative decoding draws from the target's distribution (chi-square against
the exact joint distribution of the first three tokens).

The acceptance rates and the p-values are printed (run with `-s`).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from inference import generate, speculative_generate
from inference.sampling import SamplingConfig, process_logits
from models.gpt import GPT, llama_config
from models.random_params import random_params

PROMPTS = [[3, 7, 8, 2], [5], [9, 10, 2, 11, 6, 4, 1]]


def _pair(vocab, seed_target=0, seed_draft=1, scale=1.0):
    """A 2-layer target and a 1-layer, narrower draft with unrelated weights."""
    target_cfg = llama_config(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                              max_len=40)
    draft_cfg = llama_config(vocab_size=vocab, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=40)
    target, draft = GPT(target_cfg), GPT(draft_cfg)
    return target, random_params(target, seed_target, scale), draft, random_params(draft, seed_draft, scale)


def _noisy_copy(params, sigma, seed):
    """The target's weights plus noise: a draft that agrees with the target some of the time."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + sigma * jnp.std(x) * rng.standard_normal(x.shape).astype(x.dtype), params)


@pytest.mark.parametrize("num_draft_tokens", [1, 3])
def test_greedy_speculative_equals_target_alone(num_draft_tokens):
    target, t_params, _, _ = _pair(vocab=12)
    draft, d_params = target, _noisy_copy(t_params, 0.05, seed=7)
    want = generate(target, t_params, PROMPTS, max_new_tokens=12)
    stop = want[0][5]
    want_stopped = generate(target, t_params, PROMPTS, max_new_tokens=12, stop_tokens=(stop,))
    got, stats = speculative_generate(target, t_params, draft, d_params, PROMPTS, max_new_tokens=12,
                                      num_draft_tokens=num_draft_tokens)
    got_stopped, _ = speculative_generate(target, t_params, draft, d_params, PROMPTS, max_new_tokens=12,
                                          num_draft_tokens=num_draft_tokens, stop_tokens=(stop,))
    print(f"\ngreedy, G={num_draft_tokens}: acceptance rate {stats.acceptance_rate:.3f}, "
          f"{stats.tokens_per_round:.2f} tokens per target forward, {stats.rounds} rounds")
    assert got == want and got_stopped == want_stopped
    assert 0 < stats.acceptance_rate < 1  # both branches of the verification ran

    # The target as its own draft: every proposal is accepted, G + 1 tokens per forward.
    same, stats = speculative_generate(target, t_params, target, t_params, PROMPTS, max_new_tokens=12,
                                       num_draft_tokens=num_draft_tokens)
    assert same == want and stats.acceptance_rate == 1.0


def _exact_joint(model, params, prompt, sampling, vocab) -> np.ndarray:
    """p(t0, t1, t2 | prompt) [V, V, V] from full forwards over every (t0, t1)."""
    pairs = np.array(list(itertools.product(range(vocab), repeat=2)))
    ids = np.concatenate([np.broadcast_to(prompt, (len(pairs), len(prompt))), pairs], axis=1)
    logits = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))[:, len(prompt) - 1:]

    def probs(logits_BV):
        # The softmax in float64: a float32 one sums to 1 only within ~1e-7, and chi-square
        # needs expected counts that sum to the number of draws.
        x_BV = np.asarray(process_logits(logits_BV, sampling), np.float64)
        e_BV = np.exp(x_BV - x_BV.max(axis=-1, keepdims=True))  # filtered tokens (-inf) give 0
        return e_BV / e_BV.sum(axis=-1, keepdims=True)

    p0 = probs(logits[:1, 0])[0]
    p1 = probs(logits[::vocab, 1])  # rows with t1 = 0 give p(t1 | t0) for each t0
    p2 = probs(logits[:, 2]).reshape(vocab, vocab, vocab)
    joint = p0[:, None, None] * p1[:, :, None] * p2
    return joint / joint.sum()  # exactly a distribution, up to float64 rounding


def test_sampled_speculative_follows_the_target_distribution():
    """20,000 copies of one prompt, three tokens each: their joint counts against the target's
    exact joint (chi-square), and, as a check that the test can fail, against the draft's."""
    vocab, n, prompt = 6, 20000, [1, 4, 2]
    target, t_params, draft, d_params = _pair(vocab, scale=2.0)  # peaked, unlike distributions
    sampling = SamplingConfig(temperature=0.8, top_k=5)
    tokens, stats = speculative_generate(target, t_params, draft, d_params, [prompt] * n, max_new_tokens=3,
                                         num_draft_tokens=2, temperature=0.8, top_k=5, seed=0)
    counts = np.zeros((vocab,) * 3)
    np.add.at(counts, tuple(np.array(tokens).T), 1)

    def p_value(joint):
        expected = n * joint.ravel()  # float64, sums to n
        # Cells expected under 5 counts are pooled into one, as chi-square needs.
        small = expected < 5
        obs = np.append(counts.ravel()[~small], counts.ravel()[small].sum())
        exp = np.append(expected[~small], expected[small].sum())
        keep = exp > 0
        assert obs[~keep].sum() == 0, "a token the filters remove was drawn"
        return scipy.stats.chisquare(obs[keep], exp[keep]).pvalue

    target_p = p_value(_exact_joint(target, t_params, prompt, sampling, vocab))
    draft_p = p_value(_exact_joint(draft, d_params, prompt, sampling, vocab))
    print(f"\nsampled, G=2: acceptance rate {stats.acceptance_rate:.3f}, chi-square p-value vs target "
          f"{target_p:.3g}, vs draft {draft_p:.3g}")
    assert target_p > 1e-3
    assert draft_p < 1e-6
    assert 0.2 < stats.acceptance_rate < 0.95  # rejections (the residual draw) happened often
