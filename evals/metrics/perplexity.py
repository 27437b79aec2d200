"""Perplexity of a long token sequence under a fixed-context decoder, with a strided sliding
window: the computation transformers documents in "Perplexity of fixed-length models".

Axis letters: B batch (windows), T window length.

Windows begin every `stride` tokens; window w covers ids[b_w : e_w] with
e_w = min(b_w + max_length, n), and the last window is the first that reaches the end. Each
window scores the trg_w = e_w - e_{w-1} tokens the previous window did not (e_{-1} = 0),
conditioned on the rest of the window before them (their labels are -100 in the docs' loop);
the window's first token has no prediction, so a window scores min(trg_w, e_w - b_w - 1)
tokens. The documented loop then accumulates

    nll_sum  += mean NLL of the window's scored tokens * (trg_w - 1)
    n_tokens += trg_w - 1          ("num_valid_tokens - batch_size", for the label shift)
    perplexity = exp(nll_sum / n_tokens)

which is followed exactly: with overlapping windows (stride < max_length) a window's mean over
trg_w tokens is weighted by trg_w - 1, as there. One case differs: with stride == max_length
and n = k * stride + 1 the last window holds one token and scores nothing; the docs' loop then
adds 0 * NaN (a mean over no labels) and returns NaN, and here that window adds nothing.

Windows run `batch_size` at a time, the last one padded on the right: causal attention makes
that exact for dense decoders and dropless mixtures of experts (a capacity-limited MoE routes
per batch, so its numbers depend on the batching, as in training).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from inference.generate import lm_logits
from train.logprobs import token_logprobs


class PerplexityResult(NamedTuple):
    """exp(nll_sum / num_tokens), with the documented loop's nll_sum and token count."""

    perplexity: float
    nll_sum: float
    num_tokens: int


class Window(NamedTuple):
    """ids[begin:end] go through the model; the last `targets` of them are scored."""

    begin: int
    end: int
    targets: int


def sliding_windows(num_ids: int, *, max_length: int, stride: int) -> list[Window]:
    """The documented loop's windows over a sequence of `num_ids` tokens."""
    windows, prev_end = [], 0
    for begin in range(0, num_ids, stride):
        end = min(begin + max_length, num_ids)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == num_ids:
            break
    return windows


@functools.partial(jax.jit, static_argnames=("model",))
def _window_logprobs(model, params, ids_BT: jax.Array) -> jax.Array:
    """[B, T] log p(ids[t] | ids[< t]) within each window row (0 at t = 0)."""
    return token_logprobs(lm_logits(model.apply({"params": params}, ids_BT)), ids_BT)


def _to_host(x: jax.Array) -> np.ndarray:
    # Sharded params may leave the output spread over processes: gather it, never device_get it.
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, np.float64)


def _check(model, ids: np.ndarray, max_length: int, stride: int, batch_size: int) -> None:
    if ids.ndim != 1:
        raise ValueError(f"ids must be one sequence of token ids (1-D), got shape {ids.shape}; pass ids[0] "
                         "for a batch of one")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")
    if len(ids) < 2:
        raise ValueError(f"ids has {len(ids)} token(s); perplexity needs at least 2 (the first has no prediction)")
    if getattr(model.config, "head", "lm") == "score":
        raise ValueError("the model has a score head and no LM head (GPTConfig.head='score'); perplexity needs "
                         "next-token logits")
    context = model.config.max_len
    if not 2 <= max_length <= context:
        raise ValueError(f"max_length={max_length} must be in [2, {context}] (the model's context, "
                         "config.max_len)")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} must be in [1, max_length={max_length}]: windows that skip tokens "
                         "would leave them unscored")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        bad = ids[(ids < 0) | (ids >= vocab)][0]
        raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab})")


def _window_nll_means(model, params, ids: np.ndarray, windows: list[Window], max_length: int,
                      batch_size: int) -> list[tuple[float, int]]:
    """(mean NLL of the scored tokens, how many) per window."""
    # A power of two rows (at most batch_size): texts of any length share a few compiled shapes.
    out, rows = [], min(batch_size, 1 << (len(windows) - 1).bit_length())
    for start in range(0, len(windows), rows):
        batch = windows[start: start + rows]
        ids_BT = np.zeros((rows, max_length), np.int32)
        for row, w in enumerate(batch):
            ids_BT[row, : w.end - w.begin] = ids[w.begin: w.end]
        logps_BT = _to_host(_window_logprobs(model, params, jnp.asarray(ids_BT)))
        for row, w in enumerate(batch):
            length = w.end - w.begin
            first = max(1, length - w.targets)  # position 0 has no prediction
            scored = logps_BT[row, first:length]
            out.append((-scored.mean() if len(scored) else math.nan, len(scored)))
    return out


def sliding_window_perplexity(model, params, ids: Sequence[int] | np.ndarray, *, max_length: int, stride: int,
                              batch_size: int = 8) -> PerplexityResult:
    """Perplexity of `ids` with windows of `max_length` tokens every `stride` tokens.

    Args:
      model: an lmlab decoder (`models.gpt.GPT`: GPT-2, LLaMA, Qwen, ...).
      params: its parameters (may already be placed on devices, sharded over a mesh: every
        process then calls this with the same ids).
      ids: the token ids of the whole text, 1-D.
      max_length: tokens per window, at most the model's context (`config.max_len`).
      stride: tokens between window starts, in [1, max_length]; = max_length gives disjoint
        windows, smaller strides give each scored token more context.
      batch_size: windows per forward pass.

    Returns:
      PerplexityResult(perplexity, nll_sum, num_tokens) as the documented loop computes them.
    """
    ids = np.asarray(ids)
    _check(model, ids, max_length, stride, batch_size)
    windows = sliding_windows(len(ids), max_length=max_length, stride=stride)
    nll_sum, num_tokens = 0.0, 0
    for window, (mean, scored) in zip(windows, _window_nll_means(model, params, ids, windows, max_length,
                                                                  batch_size)):
        weight = window.targets - 1  # the docs' num_valid_tokens - batch_size
        if scored:  # a window that scores nothing has weight 0 (the docs' loop: 0 * NaN)
            nll_sum += mean * weight
            num_tokens += weight
    return PerplexityResult(math.exp(nll_sum / num_tokens), nll_sum, num_tokens)
