"""Sampled continuations of a prompt, for a look at what a model has learned.

This recomputes the whole prefix at each new token (no KV cache): it is for a few
samples at the end of a run. Efficient generation lives in the inference package.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "num_tokens", "temperature"))
def _sample(params, tokens_BL, rng, *, model: nn.Module, prompt_len: int, num_tokens: int, temperature: float):
    def step(t, tokens_BL):
        logits_BV = model.apply({"params": params}, tokens_BL)[:, t - 1]
        if temperature == 0.0:
            nxt = jnp.argmax(logits_BV, axis=-1)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(rng, t), logits_BV / temperature)
        return tokens_BL.at[:, t].set(nxt.astype(tokens_BL.dtype))

    return jax.lax.fori_loop(prompt_len, prompt_len + num_tokens, step, tokens_BL)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a sample starts from: BOS (if the tokenizer has one) and the encoded prompt.

    Cheap, so a run can call it before training to fail early.

    Raises:
      ValueError: the prompt is empty and the tokenizer has no BOS token, so there is no
        position to predict the first token from.
    """
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the sampling prompt is empty and the tokenizer has no BOS token to start from; "
                         "set a non-empty prompt (eval.prompt) or use a tokenizer with a BOS token")
    return ids


def sample_ids(model: nn.Module, params, ids: list[int], *, num_samples: int, num_tokens: int, temperature: float,
               max_len: int, seed: int = 0) -> np.ndarray:
    """[num_samples, n] tokens sampled after the prompt `ids` (its last max_len - 1 kept), n =
    `num_tokens` or fewer if the context ends; temperature 0 is greedy."""
    ids = list(ids)[-(max_len - 1):]
    num_tokens = min(num_tokens, max_len - len(ids))
    tokens = np.zeros((num_samples, len(ids) + num_tokens), np.int32)
    tokens[:, : len(ids)] = ids
    out = _sample(params, jnp.asarray(tokens), jax.random.key(seed), model=model, prompt_len=len(ids),
                  num_tokens=num_tokens, temperature=float(temperature))
    return np.asarray(out)[:, len(ids):]


def sample_continuations(model: nn.Module, params, tokenizer, prompt: str, *, num_samples: int, num_tokens: int,
                         temperature: float, max_len: int, seed: int = 0) -> list[str]:
    """`num_samples` continuations of `prompt`, each `num_tokens` long (fewer if the context ends).

    Raises:
      ValueError: from `prompt_ids`, for an empty prompt and no BOS token.
    """
    texts = []
    for row in sample_ids(model, params, prompt_ids(tokenizer, prompt), num_samples=num_samples,
                          num_tokens=num_tokens, temperature=temperature, max_len=max_len, seed=seed):
        row = row.tolist()
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        texts.append(prompt + tokenizer.decode(row))
    return texts
