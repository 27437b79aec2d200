"""The per-token and sequence log-probs dpo scores preference rows with (`train.logprobs` through
`train.preference_reference.sequence_logps` and the objective) equal `log_softmax` of
transformers' LlamaForCausalLM logits on the same weights, in float64, on right-padded rows."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from models import hf
from train import logprobs, preference_reference
from train.objectives.dpo import DPOObjective

EPS32 = float(np.finfo(np.float32).eps)
VOCAB, T = 61, 14


def _llama(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms off their 1s, larger weights: log-probs far from uniform
        for p in model.parameters():
            p.mul_(3.0) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model.double()


def _padded(seed):
    rng = np.random.default_rng(seed)
    lengths = np.array([T, 9, 5, 11])
    ids = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(1, VOCAB, n)
        mask[b, rng.integers(1, n - 1):n] = 1  # the response: after a prompt of at least one token
    return ids, mask, lengths


def _float64(reference, ids, lengths):
    """[B, T] log p(ids[t] | ids[<t]) in float64 (0 at t = 0) from transformers' logits."""
    attention = torch.tensor(np.arange(T)[None] < lengths[:, None]).long()
    with torch.no_grad():
        logits = reference(torch.tensor(ids).long(), attention_mask=attention).logits
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, torch.tensor(ids[:, 1:, None]).long())[..., 0]
    return np.pad(logp.numpy(), ((0, 0), (1, 0))), float(logits.abs().max())


def test_token_and_sequence_logps_equal_transformers_llama_hf_torch(tmp_path):
    reference = _llama(tmp_path)
    model, params = hf.load_pretrained(str(tmp_path))
    (chosen, chosen_mask, chosen_len), (rejected, rejected_mask, rejected_len) = _padded(0), _padded(1)
    want_chosen, scale = _float64(reference, chosen, chosen_len)
    want_rejected, _ = _float64(reference, rejected, rejected_len)
    # A logit moves by ~eps32 * sqrt(width) * its magnitude per layer; log_softmax adds ~eps32 * log V.
    tol = 16 * EPS32 * np.sqrt(32) * (scale + np.log(VOCAB))
    token_logps, _ = logprobs.of_model(model, params, jnp.asarray(chosen))
    valid = np.arange(T)[None] < chosen_len[:, None]  # padding positions are never scored
    np.testing.assert_allclose(np.where(valid, np.asarray(token_logps), 0), np.where(valid, want_chosen, 0),
                               rtol=0, atol=tol)
    assert np.abs(want_chosen[valid]).max() > 1.0  # far from a trivial distribution

    batch = {"chosen_ids": jnp.asarray(chosen), "chosen_mask": jnp.asarray(chosen_mask),
             "rejected_ids": jnp.asarray(rejected), "rejected_mask": jnp.asarray(rejected_mask)}
    sequences = preference_reference.sequence_logps(model, params, batch, unpaired=False)
    for key, want, mask in (("ref_chosen_logps", want_chosen, chosen_mask),
                            ("ref_rejected_logps", want_rejected, rejected_mask)):
        np.testing.assert_allclose(np.asarray(sequences[key]), (want * mask).sum(-1), rtol=0, atol=tol * T)
    # The policy's side of the objective (the same rows): its logps metric is their mean.
    objective = DPOObjective(model, loss_type="simpo", beta=1.0)
    batch.update(chosen_len=jnp.asarray(chosen_len), rejected_len=jnp.asarray(rejected_len))
    sums = objective.eval_sums(params, batch, None)
    mean_chosen = (want_chosen * chosen_mask).sum(-1) / chosen_mask.sum(-1)
    np.testing.assert_allclose(float(sums["logps_chosen"]), mean_chosen.sum(), rtol=0, atol=tol * 4)
