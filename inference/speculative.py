"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model
proposes G tokens, the target model scores them all in one forward pass.

Axis letters: B batch, G draft tokens per round (gamma), V vocabulary, N new tokens.

One round, for every row at once (each row at its own position, as in `generate`):

    draft:  x_0 = the pending token; x_i -> d_{i+1} ~ q_i for i < G (G + 1 draft steps: the
            last only writes d_G into the draft's cache)
    target: one forward over [x_0, d_1 .. d_G] -> p_0 .. p_G
    accept: d_i while u_i < p_{i-1}(d_i) / q_{i-1}(d_i)   (greedy: while d_i == argmax p_{i-1})
    then:   after n accepted, one more token from norm(max(0, p_n - q_n)) if n < G, or from
            p_G if all were accepted (greedy: argmax p_n in both cases)

A row emits n + 1 tokens per target forward. The accepted prefix and the corrected token are
distributed exactly as the target's own samples (Leviathan et al., Theorem 1), and with
greedy decoding the output equals the target's greedy output. Rejected drafts leave stale
entries in both caches past the row's new position; the causal mask hides them until the
next round overwrites them.

The acceptance rate (accepted / proposed draft tokens) sets the speed-up: with rate a and
G drafts a round emits (1 - a^(G+1)) / (1 - a) tokens on average for one target forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.generate import PAD_ID, check_prompts, cut_at_stop, pad_prompts, prefill
from inference.kv_cache import init_cache
from inference.sampling import SamplingConfig, process_logits
from models.gpt import GPT


@dataclasses.dataclass
class SpeculativeStats:
    """Counts over the rounds, for the rows still generating in each round.

    Attributes:
      num_draft_tokens: G.
      rounds: target verification forwards (after the prefill).
      row_rounds: rounds summed over the rows active in them.
      proposed: draft tokens proposed (G per active row per round).
      accepted: draft tokens the target accepted.
      emitted: tokens produced by the rounds (accepted + one per active row per round).
    """

    num_draft_tokens: int
    rounds: int = 0
    row_rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens a row emits per target forward (1 = no gain over plain decoding)."""
        return self.emitted / max(self.row_rounds, 1)


def _next_token_probs(logits_BV: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """The distribution a token is drawn from: softmax of the filtered logits (greedy: one-hot argmax)."""
    logits_BV = process_logits(logits_BV, sampling)
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_BV, -1), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(logits_BV, axis=-1)


def _draw(probs_BV: jax.Array, rng: jax.Array) -> jax.Array:
    """A token per row from probabilities (one-hot rows give their argmax)."""
    return jax.random.categorical(rng, jnp.log(probs_BV), axis=-1).astype(jnp.int32)


def _propose(draft: GPT, sampling: SamplingConfig, gamma: int, params, cache, pending_B, positions_B, rng):
    """G + 1 draft steps from the pending token: (drafts [B, G], their probs q [B, G, V], cache)."""

    def body(carry, i):
        cache, token_B = carry
        logits_B1V, new = draft.apply({"params": params, "cache": cache}, token_B[:, None],
                                      positions=(positions_B + i)[:, None], mutable=["cache"])
        q_BV = _next_token_probs(logits_B1V[:, 0], sampling)
        next_B = _draw(q_BV, jax.random.fold_in(rng, i))
        return (new["cache"], next_B), (next_B, q_BV)

    (cache, _), (drafts_GB, q_GBV) = jax.lax.scan(body, (cache, pending_B), jnp.arange(gamma + 1))
    return drafts_GB[:gamma].T, jnp.swapaxes(q_GBV[:gamma], 0, 1), cache


def _verify(p_BGV: jax.Array, q_BGV: jax.Array, drafts_BG: jax.Array, sampling: SamplingConfig, rng: jax.Array):
    """Accept/reject: (accepted count n [B], the token after them [B]).

    p_BGV: target probs [B, G + 1, V] after x_0, d_1, .., d_G; q_BGV: draft probs [B, G, V].
    """
    B, G = drafts_BG.shape
    accept_rng, residual_rng = jax.random.split(rng)
    p_drafted_BG = jnp.take_along_axis(p_BGV[:, :G], drafts_BG[..., None], axis=-1)[..., 0]
    q_drafted_BG = jnp.take_along_axis(q_BGV, drafts_BG[..., None], axis=-1)[..., 0]
    if sampling.greedy:  # one-hot p: accept exactly when the draft is the target's argmax
        accept_BG = p_drafted_BG > 0
    else:  # u < p / q, written without the division (q > 0 for a drafted token)
        accept_BG = jax.random.uniform(accept_rng, (B, G)) * q_drafted_BG < p_drafted_BG
    n_B = jnp.sum(jnp.cumprod(accept_BG, axis=1), axis=1)
    # A zero q row at index G makes the all-accepted case draw from p_G itself.
    q_padded_BGV = jnp.concatenate([q_BGV, jnp.zeros_like(q_BGV[:, :1])], axis=1)
    p_n_BV = jnp.take_along_axis(p_BGV, n_B[:, None, None], axis=1)[:, 0]
    q_n_BV = jnp.take_along_axis(q_padded_BGV, n_B[:, None, None], axis=1)[:, 0]
    residual_BV = jnp.maximum(p_n_BV - q_n_BV, 0.0)
    # p == q leaves no residual mass; a rejection then has probability 0, but guard the draw.
    residual_BV = jnp.where(jnp.sum(residual_BV, -1, keepdims=True) > 0, residual_BV, p_n_BV)
    return n_B, _draw(residual_BV / jnp.sum(residual_BV, -1, keepdims=True), residual_rng)


@functools.partial(jax.jit, static_argnames=("target", "draft", "sampling", "gamma", "stop_tokens"),
                   donate_argnames=("state",))
def speculative_round(target: GPT, draft: GPT, sampling: SamplingConfig, gamma: int, stop_tokens: tuple[int, ...],
                      target_params, draft_params, rng, state):
    """One propose-verify round for every row; returns (state, (accepted n [B], active [B])).

    state: round, target cache, draft cache, pending token [B] (emitted, not yet in the
    caches), its position [B], output [B, N + G + 1], emitted count [B], done [B].
    """
    rnd, t_cache, d_cache, pending_B, pos_B, out_BN, count_B, done_B = state
    max_new_tokens = out_BN.shape[1] - gamma - 1
    draft_rng, verify_rng = jax.random.split(jax.random.fold_in(rng, rnd))
    drafts_BG, q_BGV, d_cache = _propose(draft, sampling, gamma, draft_params, d_cache, pending_B, pos_B, draft_rng)

    inputs_BG = jnp.concatenate([pending_B[:, None], drafts_BG], axis=1)  # [B, G + 1]
    positions_BG = pos_B[:, None] + jnp.arange(gamma + 1)
    logits_BGV, new = target.apply({"params": target_params, "cache": t_cache}, inputs_BG, positions=positions_BG,
                                   mutable=["cache"])
    B, _, V = logits_BGV.shape
    p_BGV = _next_token_probs(logits_BGV.reshape(B * (gamma + 1), V), sampling).reshape(B, gamma + 1, V)
    n_B, next_B = _verify(p_BGV, q_BGV, drafts_BG, sampling, verify_rng)

    # Emit d_1 .. d_n then the corrected token, cut after a stop token; finished rows emit nothing.
    slots_G = jnp.arange(gamma + 1)
    # Slot i < n holds d_{i+1}, slot n the corrected (or bonus) token; later slots are not emitted.
    emitted_BG = jnp.where(slots_G < n_B[:, None], jnp.pad(drafts_BG, ((0, 0), (0, 1))), next_B[:, None])
    emit_B, stopped_B = n_B + 1, jnp.zeros((B,), bool)
    if stop_tokens:
        is_stop_BG = jnp.isin(emitted_BG, jnp.asarray(stop_tokens, jnp.int32)) & (slots_G <= n_B[:, None])
        stopped_B = jnp.any(is_stop_BG, axis=1)
        emit_B = jnp.where(stopped_B, jnp.argmax(is_stop_BG, axis=1) + 1, emit_B)
    emit_B = jnp.where(done_B, 0, emit_B)
    out_size = out_BN.shape[1]
    write_BG = jnp.where(slots_G < emit_B[:, None], count_B[:, None] + slots_G, out_size)  # out_size: dropped
    out_BN = out_BN.at[jnp.arange(B)[:, None], write_BG].set(emitted_BG, mode="drop")

    active_B = ~done_B
    count_B = count_B + emit_B
    pending_B = jnp.where(active_B, next_B, pending_B)
    pos_B = jnp.where(active_B, pos_B + n_B + 1, pos_B)  # finished rows stay put, within the cache
    done_B = done_B | stopped_B | (count_B >= max_new_tokens)
    state = (rnd + 1, new["cache"], d_cache, pending_B, pos_B, out_BN, count_B, done_B)
    return state, (n_B, active_B)


def speculative_generate(target: GPT, target_params, draft: GPT, draft_params, prompts: Sequence[Sequence[int]],
                         *, max_new_tokens: int, num_draft_tokens: int = 4, temperature: float = 0.0,
                         top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                         stop_tokens: Sequence[int] = (), seed: int = 0) -> tuple[list[list[int]], SpeculativeStats]:
    """`generate` with a draft model proposing `num_draft_tokens` tokens per target forward.

    Args:
      target, target_params: the model whose output distribution is produced.
      draft, draft_params: a cheaper model over the same vocabulary.
      prompts, max_new_tokens, temperature, top_k, top_p, min_p, stop_tokens, seed: as
        `generate` (the filters shape both the draft's and the target's distributions).
      num_draft_tokens: G, draft tokens per round.

    Returns:
      (new token ids per prompt, cut after a stop token; the round statistics).
    """
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocab_size={draft.config.vocab_size} differs from the target's "
                         f"{target.config.vocab_size}; speculative decoding needs one vocabulary")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
    check_prompts(prompts, target.config.vocab_size)
    sampling = SamplingConfig(temperature, top_k, top_p, min_p)
    stop_tokens, gamma = tuple(int(t) for t in stop_tokens), num_draft_tokens
    ids, lengths = pad_prompts(prompts)
    B, T = ids.shape
    # A round writes G tokens past the pending one, which sits at most at prompt + N - 2.
    need = int(lengths.max()) + max_new_tokens + gamma
    for name, model in (("target", target), ("draft", draft)):
        if need > model.config.max_len:
            raise ValueError(f"longest prompt + max_new_tokens + num_draft_tokens = {need} exceeds the {name}'s "
                             f"context length max_len={model.config.max_len}")
    ids, lengths = jnp.asarray(ids), jnp.asarray(lengths)
    S = T + max_new_tokens + gamma
    first_rng, rng = jax.random.split(jax.random.key(seed))
    logits_BV, t_cache = prefill(target, target_params, init_cache(target, B, S), ids, lengths)
    _, d_cache = prefill(draft, draft_params, init_cache(draft, B, S), ids, lengths)
    # The first token comes from the target's prefill, as in plain decoding.
    first_B = _draw(_next_token_probs(logits_BV, sampling), first_rng)
    out_BN = jnp.full((B, max_new_tokens + gamma + 1), PAD_ID, jnp.int32).at[:, 0].set(first_B)
    done_B = jnp.isin(first_B, jnp.asarray(stop_tokens, jnp.int32)) | (max_new_tokens <= 1)
    state = (jnp.int32(0), t_cache, d_cache, first_B, lengths, out_BN, jnp.ones((B,), jnp.int32), done_B)
    stats = SpeculativeStats(num_draft_tokens=gamma)
    while not bool(np.all(np.asarray(state[7]))):
        state, (n_B, active_B) = speculative_round(target, draft, sampling, gamma, stop_tokens, target_params,
                                                   draft_params, rng, state)
        n_B, active_B = np.asarray(n_B), np.asarray(active_B)
        stats.rounds += 1
        stats.row_rounds += int(active_B.sum())
        stats.proposed += gamma * int(active_B.sum())
        stats.accepted += int(n_B[active_B].sum())
        stats.emitted += int((n_B[active_B] + 1).sum())
    tokens_BN = np.asarray(state[5])[:, :max_new_tokens]
    return [cut_at_stop(row, stop_tokens) for row in tokens_BN], stats
