"""Batched autoregressive generation with a KV cache: prefill once, then one token per step.

Axis letters: B batch (prompts decoded together), T prompt length (the longest prompt),
S cache length, V vocabulary, N new tokens.

    prompts --right-pad--> prefill [B, T] (writes slots 0..T-1, logits at each row's last token)
            --> repeat: sample a token per row, write it at the row's own position

Prompts of different lengths are right-padded and each row writes and reads at its own
positions (`models.layers.attention.write_cache`): position ids match an unpadded run of
each prompt (and transformers' left-padded batches, whose positions count real tokens
only), and no row ever attends to padding, which sits past its length under the causal
mask until the row's own tokens overwrite it.

Two decode loops with the same arithmetic and the same random numbers:
  * without a callback, `jax.lax.while_loop` inside one `jit`: no host round trip per
    token, and it stops early once every row has produced a stop token;
  * with a `callback`, a jitted single step called from Python, whose tokens reach the
    host after every step (streaming). The step compiles once: every step has the same
    shapes and the position is data, not a static argument.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.kv_cache import init_cache
from inference.sampling import SamplingConfig, sample
from models.gpt import GPT

PAD_ID = 0  # the id padding prompts and finished rows; never read as a token (masked or cut)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raises ValueError naming the first empty prompt or one with ids outside the vocabulary."""
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size})")


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T] right-padded with PAD_ID, lengths [B]) of a list of token-id lists."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    ids = np.full((len(prompts), lengths.max()), PAD_ID, np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    return ids, lengths


def seen_tokens(ids_BT: jax.Array, lengths_B: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool: the tokens among each row's first `lengths` ids (for the repetition penalty)."""
    B, T = ids_BT.shape
    # Padding is sent to column V, past the end, where the scatter drops it.
    columns_BT = jnp.where(jnp.arange(T) < lengths_B[:, None], ids_BT, vocab_size)
    return jnp.zeros((B, vocab_size), bool).at[jnp.arange(B)[:, None], columns_BT].set(True, mode="drop")


def lm_logits(out):
    """The next-token logits of a decoder's output: the output itself, or the first of
    (logits, scores) of a policy with a value head (`GPTConfig.head="lm_score"`)."""
    return out[0] if isinstance(out, tuple) else out


def prefill_rows(model: GPT, params, cache, ids_BT: jax.Array, lengths_B: jax.Array):
    """Writes right-padded prompts into the cache; returns (logits at each row's last token [B, V], cache).

    Pure: `prefill` jits it alone; a caller's own jitted function (RL rollouts laid out on a
    mesh, `train.rollout`) calls it inside.
    """
    positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
    out, state = model.apply({"params": params, "cache": cache}, ids_BT, positions=positions_BT, mutable=["cache"])
    last_BV = jnp.take_along_axis(lm_logits(out), (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BV, state["cache"]


prefill = jax.jit(prefill_rows, static_argnames=("model",), donate_argnames=("cache",))


def initial_state(logits_BV: jax.Array, cache, ids_BT: jax.Array, lengths_B: jax.Array, *, max_new_tokens: int,
                  sampling: SamplingConfig, vocab_size: int):
    """The decode loop's state after a prefill (see `_decode_step`): nothing generated yet,
    each row's first new token going to position `lengths`."""
    B = ids_BT.shape[0]
    seen_BV = (seen_tokens(ids_BT, lengths_B, vocab_size) if sampling.penalises_repetition else
               jnp.zeros((B, vocab_size), bool))
    return (jnp.int32(0), cache, logits_BV, jnp.full((B, max_new_tokens), PAD_ID, jnp.int32),
            jnp.zeros((B,), bool), seen_BV, lengths_B)


def _decode_step(model: GPT, sampling: SamplingConfig, stop_tokens: tuple[int, ...], params, rng, state):
    """One token per row: sample from the state's logits, record it, feed it to the model.

    state: step, cache, logits_BV (the next token's logits), tokens_BN (output so far),
    done_B (row has produced a stop token), seen_BV, positions_B (where the token goes).
    Finished rows keep running (the shapes are static) but record PAD_ID.
    """
    step, cache, logits_BV, tokens_BN, done_B, seen_BV, positions_B = state
    token_B = sample(logits_BV, sampling, jax.random.fold_in(rng, step), seen_BV)
    token_B = jnp.where(done_B, PAD_ID, token_B)
    tokens_BN = tokens_BN.at[:, step].set(token_B)
    done_B = done_B | jnp.isin(token_B, jnp.asarray(stop_tokens, jnp.int32))
    seen_BV = seen_BV.at[jnp.arange(token_B.shape[0]), token_B].set(True)
    out, new = model.apply({"params": params, "cache": cache}, token_B[:, None], positions=positions_B[:, None],
                           mutable=["cache"])
    return step + 1, new["cache"], lm_logits(out)[:, 0], tokens_BN, done_B, seen_BV, positions_B + 1


decode_step = jax.jit(_decode_step, static_argnames=("model", "sampling", "stop_tokens"), donate_argnames=("state",))


def decode_rows(model: GPT, sampling: SamplingConfig, stop_tokens: tuple[int, ...], params, rng, state):
    """`_decode_step` until N tokens or until every row is done, as one `jax.lax.while_loop`
    (pure: `decode_loop` jits it alone, `train.rollout` inside its own jitted function)."""
    max_new_tokens = state[3].shape[1]

    def running(s):
        return (s[0] < max_new_tokens) & ~jnp.all(s[4])

    return jax.lax.while_loop(running, functools.partial(_decode_step, model, sampling, stop_tokens, params, rng),
                              state)


decode_loop = jax.jit(decode_rows, static_argnames=("model", "sampling", "stop_tokens"), donate_argnames=("state",))


def completion_lengths(tokens_BN: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    """[B] int32: each row's new tokens up to and including its first stop token (N if none);
    what `cut_at_stop` keeps, on device (PAD_ID may be a real token, so it is not a length)."""
    N = tokens_BN.shape[1]
    stop_BN = jnp.isin(tokens_BN, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else jnp.zeros_like(
        tokens_BN, bool)
    return jnp.where(jnp.any(stop_BN, axis=1), jnp.argmax(stop_BN, axis=1) + 1, N).astype(jnp.int32)


def cut_at_stop(tokens: np.ndarray, stop_tokens: tuple[int, ...]) -> list[int]:
    """The row's tokens up to and including the first stop token (transformers keeps the eos)."""
    out = []
    for t in tokens.tolist():
        out.append(t)
        if t in stop_tokens:
            break
    return out


def generate(model: GPT, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None, stop_tokens: Sequence[int] = (),
             seed: int = 0, rng: jax.Array | None = None,
             callback: Callable[[int, list[int | None]], None] | None = None) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens, all prompts in one batch.

    Args:
      model, params: a decoder-only `GPT` and its (unboxed) params.
      prompts: token-id lists, of different lengths if need be.
      max_new_tokens: N, the most tokens generated per prompt.
      temperature, top_k, top_p, min_p, repetition_penalty: see `sampling.SamplingConfig`;
        temperature 0 is greedy.
      stop_tokens: ids that end a row (eos); the stop token is included in its output, as
        transformers' generate returns it.
      seed: the sampling seed; step i draws with `fold_in(key(seed), i)`, so the output is
        the same with and without a callback.
      rng: a key used instead of `key(seed)` (an RL rollout's key, `train.rollout`).
      callback: if given, called after each step as callback(step, tokens) with the new
        token of each row, None for rows already finished (streaming).

    Returns:
      The new token ids of each prompt (not the prompt), cut after its first stop token.
    """
    cfg = model.config
    check_prompts(prompts, cfg.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    stop_tokens = tuple(int(t) for t in stop_tokens)
    ids, lengths = pad_prompts(prompts)
    B, T = ids.shape
    if lengths.max() + max_new_tokens > cfg.max_len:
        raise ValueError(f"longest prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context length max_len={cfg.max_len}")
    ids, lengths = jnp.asarray(ids), jnp.asarray(lengths)
    # The last step also feeds its token to the model (its logits unused): T + N slots.
    logits_BV, cache = prefill(model, params, init_cache(model, B, T + max_new_tokens), ids, lengths)
    state = initial_state(logits_BV, cache, ids, lengths, max_new_tokens=max_new_tokens, sampling=sampling,
                          vocab_size=cfg.vocab_size)
    rng = jax.random.key(seed) if rng is None else rng
    if callback is None:
        tokens_BN = np.asarray(decode_loop(model, sampling, stop_tokens, params, rng, state)[3])
    else:
        for step in range(max_new_tokens):
            was_done = np.asarray(state[4])
            state = decode_step(model, sampling, stop_tokens, params, rng, state)
            new = np.asarray(state[3][:, step])
            callback(step, [None if d else int(t) for t, d in zip(new, was_done)])
            if np.asarray(state[4]).all():
                break
        tokens_BN = np.asarray(state[3])
    return [cut_at_stop(row, stop_tokens) for row in tokens_BN]


def generate_text(model: GPT, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  **sampling) -> list[str]:
    """Text continuations: each prompt encoded after the tokenizer's bos (if it has one),
    continued until its eos or `max_new_tokens` (fewer if the context ends first), decoded.

    Args:
      model, params: a decoder-only `GPT` and its params.
      tokenizer: a `data.tokenizer.Tokenizer` of the model's vocabulary.
      prompts: texts; an empty one starts from the bos token, or else from the eos token
        (GPT-2's document separator).
      max_new_tokens: N.
      **sampling: temperature, top_k, top_p, min_p, repetition_penalty, seed, callback of
        `generate`.

    Returns:
      The new text of each prompt (the eos token left out).
    """
    start = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = [start + tokenizer.encode(p) for p in prompts]
    if any(not p for p in ids) and tokenizer.eos_id is None:
        raise ValueError("an empty prompt needs a bos or eos token to start from, and the tokenizer has neither")
    ids = [p if p else [tokenizer.eos_id] for p in ids]
    room = model.config.max_len - max(len(p) for p in ids)
    if room < 1:
        raise ValueError(f"the longest prompt has {max(len(p) for p in ids)} tokens, which fills the model's "
                         f"context of max_len={model.config.max_len}; shorten it")
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    out = generate(model, params, ids, max_new_tokens=min(max_new_tokens, room), stop_tokens=stop, **sampling)
    return [tokenizer.decode([t for t in row if t not in stop]) for row in out]
