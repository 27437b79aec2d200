"""train/logprobs.py against float64 numpy on random logits."""

import jax.numpy as jnp
import numpy as np

from train import logprobs

EPS32 = float(np.finfo(np.float32).eps)


def _reference(logits, ids):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    B, T = ids.shape
    out = np.zeros((B, T))
    ent = np.zeros((B, T))
    for b in range(B):
        for t in range(1, T):
            out[b, t] = logp[b, t - 1, ids[b, t]]
            ent[b, t] = -(np.exp(logp[b, t - 1]) * logp[b, t - 1]).sum()
    return out, ent


def test_token_logprobs_entropy_and_sums_equal_float64():
    rng = np.random.default_rng(0)
    B, T, V = 3, 7, 11
    logits = (rng.normal(size=(B, T, V)) * 4).astype(np.float32)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    want, want_ent = _reference(logits, ids)
    got = np.asarray(logprobs.token_logprobs(jnp.asarray(logits), jnp.asarray(ids)))
    # log_softmax of logits of magnitude ~|x|max: error a few eps32 * (max |logit| + log V).
    tol = 8 * EPS32 * (np.abs(logits).max() + np.log(V))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert np.all(got[:, 0] == 0)
    ent = np.asarray(logprobs.token_entropy(jnp.asarray(logits)))
    np.testing.assert_allclose(ent, want_ent, rtol=0, atol=tol * V)
    seq = np.asarray(logprobs.sequence_logprobs(jnp.asarray(got), jnp.asarray(mask)))
    np.testing.assert_allclose(seq, (want * mask).sum(-1), rtol=0, atol=tol * T)
