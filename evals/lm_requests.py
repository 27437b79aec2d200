"""lm-eval's conventions for turning LM requests into token rows, as pure functions.

What lm-evaluation-harness 0.4's `hf` backend (`HFLM`, `TemplateLM`) does, written here so that
`evals.lm.ModelLM` scores the same tokens it scores:

  * encoding: a text is encoded inside the tokenizer's own special tokens (transformers'
    `encode(text)`, add_special_tokens=True: a LLaMA tokenizer.json's leading bos, nothing for
    GPT-2), unless it already starts with the prefix token's text;
  * (context, continuation): trailing whitespace of the context moves into the continuation;
    the continuation is what `encode(context + continuation)` has past `encode(context)`'s
    length (so a merge across the boundary lands in the continuation); an empty context
    conditions on the prefix token (bos, else eos), unless the continuation itself starts
    with it;
  * scoring: the row `(context + continuation)[-(max_length + 1):]` feeds its first tokens
    to the model and scores the continuation's (left truncation);
  * rolling log-likelihood: the text's tokens in disjoint windows of at most `max_length`
    predicted tokens, the first conditioned on the prefix token, each next one on the
    tokens just before it, filling the window to `max_length` inputs;
  * generation: `until` stop strings (plus the eos text), `max_gen_toks` (aliases
    max_new_tokens, max_tokens, max_completion_tokens; default 256), greedy unless
    `do_sample` / `temperature > 0`; the text is cut before the first of each stop string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from inference.sampling import SamplingConfig

DEFAULT_MAX_GEN_TOKS = 256
# lm-eval's aliases of max_gen_toks, highest priority first (normalize_gen_kwargs).
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# Sampling settings a request may carry besides until / max tokens / do_sample (transformers' names).
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
GEN_KEYS = ("until", "do_sample", "seed", *MAX_TOKEN_KEYS, *SAMPLING_KEYS)


def encode(tokenizer, text: str, prefix_id: int, add_special_tokens: bool | None = None) -> list[int]:
    """lm-eval's `tok_encode`: ids of `text`, inside the tokenizer's template of special tokens.

    Args:
      tokenizer: a `data.tokenizer.Tokenizer`.
      text: the text.
      prefix_id: the prefix token (bos, else eos).
      add_special_tokens: False: plain ids; True: with the template's specials; None: with
        them unless `text` already starts with the prefix token's text.
    """
    if add_special_tokens is False or (add_special_tokens is None and text.startswith(tokenizer.decode([prefix_id]))):
        return tokenizer.encode(text)
    return tokenizer.encode_with_specials(text)


def context_continuation(tokenizer, prefix_id: int, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The (context ids, continuation ids) lm-eval scores for one loglikelihood request."""
    if context == "":
        ids = encode(tokenizer, continuation, prefix_id, add_special_tokens=False)
        if not ids:
            return [prefix_id], []
        return (ids[:1], ids[1:]) if ids[0] == prefix_id else ([prefix_id], ids)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation, prefix_id)
    context_ids = encode(tokenizer, context, prefix_id)
    return context_ids, whole[len(context_ids):]


def scored_row(context_ids: Sequence[int], continuation_ids: Sequence[int],
               max_length: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one scored row: the model reads `inputs` (at most `max_length`),
    `targets[t]` is the token after inputs[t]; the last len(continuation_ids) targets are scored."""
    whole = (list(context_ids) + list(continuation_ids))[-(max_length + 1):]
    return whole[:-1], whole[1:]


def rolling_windows(ids: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (`get_rolling_token_windows` with context_len=1, then
    `make_disjoint_window`) of a text's ids: (context ids, predicted ids) pairs whose predicted
    ids cover `ids` once, in order."""
    ids = list(ids)
    if not ids:
        return []
    first = min(max_length, len(ids))
    windows = [([prefix_id], ids[:first])]
    done = first
    while done < len(ids):
        end = min(len(ids), done + max_length)
        # The row's max_length inputs are the tokens just before `end`; the context is the part
        # of them already predicted by earlier windows.
        windows.append((ids[end - max_length - 1:done], ids[done:end]))
        done = end
    return windows


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """One generate_until request's settings, normalized as lm-eval normalizes them (hashable:
    requests with equal settings are batched together).

    Attributes:
      until: stop strings; the text is cut before the first occurrence of each.
      max_gen_toks: the most new tokens.
      sampling: greedy (temperature 0) unless do_sample / temperature > 0.
      seed: the sampling seed.
    """

    until: tuple[str, ...]
    max_gen_toks: int
    sampling: SamplingConfig
    seed: int = 0


def gen_settings(kwargs: Any, eos_text: str | None, where: str) -> GenSettings:
    """The `GenSettings` of a request's generation kwargs (lm-eval's `normalize_gen_kwargs` and
    `handle_stop_sequences`: the eos text joins the stop strings).

    Raises:
      ValueError: one line naming `where` and the bad key or value.
    """
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: generation kwargs must be a dict, got {type(kwargs).__name__}")  # noqa: TRY004
    unknown = sorted(set(kwargs) - set(GEN_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown generation kwarg {unknown[0]!r}; expected some of {GEN_KEYS}")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"{where}: until must be a string or a list of strings, got {kwargs.get('until')!r}")
    until = list(until)
    if eos_text is not None and eos_text not in until:
        until.append(eos_text)
    given = [kwargs[k] for k in MAX_TOKEN_KEYS if kwargs.get(k) is not None]
    max_gen_toks = given[0] if given else DEFAULT_MAX_GEN_TOKS
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise ValueError(f"{where}: max_gen_toks must be a positive integer, got {max_gen_toks!r}")
    temperature = kwargs.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"{where}: temperature must be a number >= 0, got {temperature!r}")
    do_sample = kwargs.get("do_sample")
    if do_sample is False:
        temperature = 0.0
    elif do_sample is True and temperature == 0:
        raise ValueError(f"{where}: do_sample=True needs a temperature > 0 (transformers refuses 0); "
                         "set temperature or do_sample=False")
    seed = kwargs.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}: seed must be an integer, got {seed!r}")  # noqa: TRY004
    try:
        sampling = SamplingConfig(float(temperature), *(kwargs.get(k) for k in SAMPLING_KEYS[1:]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return GenSettings(tuple(until), max_gen_toks, sampling, seed)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of each stop string in turn (lm-eval's
    `postprocess_generated_text`; empty stop strings are ignored)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def stopped(text: str, until: Sequence[str]) -> bool:
    """Whether the text holds a stop string: lm-eval's stopping criterion for a row (what
    follows is cut away)."""
    return any(stop and stop in text for stop in until)
