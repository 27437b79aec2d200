"""lm-eval's LM API on an lmlab decoder: batched log-likelihoods, rolling log-likelihoods and
KV-cache generation, laid out on a mesh (`python -m evals`, the trainer's evaluation).

Axis letters: B rows of a batch, T row length, V vocabulary, N new tokens.

    lm = ModelLM.from_path("/tmp/run")     # a `python -m train` workdir or a Hugging Face directory
    lm.loglikelihood([("The capital of France is", " Paris")])     # [(log p, is_greedy)]
    lm.loglikelihood_rolling(["a long text ..."])                   # [total log p]
    lm.generate_until([("Q: 2 + 2 =", {"until": ["\\n"], "max_gen_toks": 8})])   # [" 4"]

Requests become token rows by lm-eval's conventions (`evals.lm_requests`: special tokens,
trailing context whitespace, the prefix token, left truncation, rolling windows, stop
strings), so the numbers are those of lm-eval's `hf` backend on the same weights.

Batching: rows sorted longest first, `batch_size` rows per forward pass (rounded up to a
multiple of the data-parallel devices; a short last batch is padded with empty rows), each
row right-padded to a power of two (at least MIN_BUCKET, at most max_length) so that few
shapes compile. One jitted forward pass per batch returns each row's summed continuation
log-prob (log-softmax in float32) and whether every continuation token is the argmax.

Generation: prompts left-truncated to max_length - max_gen_toks, right-padded, prefilled and
decoded with `inference.generate`'s KV cache (`prefill_rows`, `decode_rows`) in chunks of
`ModelLM.decode_chunk` tokens; between chunks the host decodes the rows and stops once each
has produced the eos token or one of its stop strings (lm-eval's stopping criterion); the
text is cut before the eos and the stop strings.

Placement: params already laid out on a mesh (the trainer's live state) are used where they
are, never copied; others are laid out on `mesh` by `strategy` (default "dp") from their
logical axis names (`sharding.layout.param_shardings`; fsdp splits them). Batches are split
over the strategy's batch axes. Several processes: every process runs the same requests
(SPMD) and reads the results through `process_allgather`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from evals.lm_requests import (
    GenSettings,
    context_continuation,
    cut_at_stops,
    encode,
    gen_settings,
    rolling_windows,
    scored_row,
    stopped,
)
from inference.generate import PAD_ID, decode_rows, initial_state, lm_logits, prefill_rows
from inference.kv_cache import init_cache
from inference.sampling import SamplingConfig
from models import quant
from sharding import mesh as mesh_lib
from sharding.layout import param_shardings
from sharding.strategies import STRATEGIES, Strategy, axis_size, check_applies, get_strategy

MIN_BUCKET = 16  # the shortest padded row length
DECODE_CHUNK = 32  # tokens decoded between two host checks of the stop strings


class ModelLM:
    """lm-eval's LM API (loglikelihood, loglikelihood_rolling, generate_until) on a decoder.

    Attributes:
      model: the decoder-only `models.gpt.GPT`.
      params: its params, laid out on `mesh`.
      tokenizer: its `data.tokenizer.Tokenizer`.
      batch_size: rows per forward pass, as asked (see `rows`).
      rows: rows per forward pass: batch_size rounded up to the batch axes' devices.
      max_length: the most tokens a scored row feeds the model (default the model's max_len).
      mesh, strategy: where the params and batches live.
      decode_chunk: tokens generated between two checks of the stop strings.
      source: where `from_path` read the checkpoint ("" otherwise).
    """

    def __init__(self, model, params, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 mesh: Mesh | None = None, strategy: str | None = None):
        """Args:
          model: a decoder-only `models.gpt.GPT` with an LM head.
          params: its params: already laid out on a mesh (used as they are), or on the host or
            one device (laid out on `mesh` by `strategy`).
          tokenizer: the model's tokenizer; it needs an eos or a bos token.
          batch_size: rows per forward pass.
          max_length: the context of a scored row, at most the model's max_len (None: max_len).
          mesh: the mesh of the batches (and of the params when they are not laid out); None:
            the params' own mesh, else one over every device by `strategy`'s default.
          strategy: a `sharding.strategies` name; None: "dp" (params laid out already: dp, or
            fsdp when the mesh has an fsdp axis).
        """
        _check_model(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_length = model.config.max_len if max_length is None else _positive_int(max_length, "max_length")
        if self.max_length > model.config.max_len:
            raise ValueError(f"max_length={self.max_length} exceeds the model's context max_len="
                             f"{model.config.max_len}; use max_length <= {model.config.max_len}")
        self.params, self.mesh, self.strategy = place_params(model, params, mesh, strategy)
        self._rules = self.strategy.activation_rules(self.mesh)
        self._batch = NamedSharding(self.mesh, nn.logical_to_mesh_axes(("act_batch",), self._rules))
        shards = axis_size(self.mesh, self._batch.spec[0] if len(self._batch.spec) else None)
        self.rows = -(-self.batch_size // shards) * shards
        self.decode_chunk = DECODE_CHUNK
        self.source = ""

    @classmethod
    def from_path(cls, path: str, *, batch_size: int = 8, max_length: int | None = None, strategy: str | None = None,
                  dtype: str | None = None, step: int | None = None) -> ModelLM:
        """A ModelLM of a `python -m train` workdir or a Hugging Face directory (`inference.load`),
        laid out over every device by `strategy` (default "dp") on its default mesh.

        Args:
          path: the checkpoint directory.
          batch_size, max_length: as for the constructor.
          strategy: a `sharding.strategies` name (None: "dp").
          dtype: the params' and computation's dtype ("float32", "bfloat16", "float16"; None: as saved).
          step: the workdir checkpoint (None: the latest).

        Raises:
          ValueError, FileNotFoundError, TypeError: one line naming the bad argument or path.
        """
        from inference.load import load

        _positive_int(batch_size, "batch_size")
        if max_length is not None:
            _positive_int(max_length, "max_length")
        chosen = get_strategy(strategy or "dp")
        mesh = mesh_lib.make_mesh(chosen.default_mesh)  # checked before the weights are read
        loaded = load(path, step=step, dtype=dtype)
        lm = cls(loaded.model, loaded.params, loaded.tokenizer, batch_size=batch_size, max_length=max_length,
                 mesh=mesh, strategy=chosen.name)
        lm.source = loaded.source
        return lm

    # ------------------------------------------------------------------------------ lm-eval's names

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-text token (eos): generation stops at it."""
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: bos, else eos."""
        return self.tokenizer.eos_id if self.tokenizer.bos_id is None else self.tokenizer.bos_id

    def token_count(self, text: str) -> int:
        """Tokens of `text`, no special tokens (for per-token metrics)."""
        return len(self.tokenizer.encode(text))

    # ---------------------------------------------------------------------------------- the API

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether the continuation is the greedy one) of each
        (context, continuation) request (a tuple, or an lm-eval Instance whose `args` is one)."""
        rows = []
        for i, request in enumerate(requests):
            context, continuation = _args(request, (str, str), "loglikelihood", i)
            context_ids, continuation_ids = context_continuation(self.tokenizer, self.prefix_token_id, context,
                                                                 continuation)
            if not context_ids:  # lm-eval asserts it too
                raise ValueError(f"loglikelihood request {i}: the context {context!r} is whitespace only, which moves "
                                 "into the continuation and leaves no token to condition on; pass '' (the prefix "
                                 "token) or a context with text")
            if not continuation_ids:
                raise ValueError(f"loglikelihood request {i}: the continuation {continuation!r} is no token after "
                                 f"the context {context[-40:]!r}; every request must score at least one token")
            if len(continuation_ids) > self.max_length:
                raise ValueError(f"loglikelihood request {i}: the continuation has {len(continuation_ids)} tokens, "
                                 f"more than max_length={self.max_length}; shorten it or raise max_length")
            rows.append((context_ids, continuation_ids))
        return self._score(rows)

    def loglikelihood_rolling(self, texts: Sequence[Any]) -> list[float]:
        """Total log p of each text (a string, a 1-tuple or an lm-eval Instance), scored in
        lm-eval's disjoint rolling windows of max_length tokens after the prefix token."""
        windows, owners = [], []
        for i, text in enumerate(texts):
            (text,) = (text,) if isinstance(text, str) else _args(text, (str,), "loglikelihood_rolling", i)
            ids = encode(self.tokenizer, text, self.prefix_token_id)
            for window in rolling_windows(ids, self.prefix_token_id, self.max_length):
                windows.append(window)
                owners.append(i)
        totals = [0.0] * len(texts)
        for owner, (logp, _) in zip(owners, self._score(windows)):
            totals[owner] += logp
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """The continuation text of each (context, gen_kwargs) request (or lm-eval Instance).

        gen_kwargs: until (stop strings; the eos text joins them), max_gen_toks (default 256;
        aliases max_new_tokens, max_tokens, max_completion_tokens), temperature (0: greedy),
        do_sample, top_k, top_p, min_p, repetition_penalty, seed. Requests with the same
        settings are batched together.
        """
        eos_text = None if self.eot_token_id is None else self.tokenizer.decode([self.eot_token_id])
        prompts, groups = [], {}
        for i, request in enumerate(requests):
            context, kwargs = _args(request, (str, dict), "generate_until", i)
            where = f"generate_until request {i}"
            settings = gen_settings(kwargs, eos_text, where)
            room = self.max_length - settings.max_gen_toks
            if room < 1:
                raise ValueError(f"{where}: max_gen_toks={settings.max_gen_toks} leaves no room for the context in "
                                 f"max_length={self.max_length}; use max_gen_toks < {self.max_length}")
            ids = encode(self.tokenizer, context, self.prefix_token_id)[-room:]
            prompts.append(ids or [self.prefix_token_id])
            groups.setdefault(settings, []).append(i)
        out = [""] * len(prompts)
        for settings, members in groups.items():
            members.sort(key=lambda i: -len(prompts[i]))
            for start in range(0, len(members), self.rows):
                chunk = members[start:start + self.rows]
                texts = self._generate([prompts[i] for i in chunk], settings, salt=start)
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out

    # ------------------------------------------------------------------------------ device work

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p, is_greedy) of each (context ids, continuation ids), in batches of `rows`."""
        rows = [(*scored_row(context, continuation, self.max_length), len(continuation))
                for context, continuation in pairs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        dispatched = []
        for start in range(0, len(order), self.rows):  # every batch dispatched before any is read
            chunk = order[start:start + self.rows]
            T = _bucket(len(rows[chunk[0]][0]), self.max_length)
            inputs, targets, mask = (np.zeros((self.rows, T), np.int32) for _ in range(3))
            for r, i in enumerate(chunk):
                row_inputs, row_targets, scored = rows[i]
                inputs[r, :len(row_inputs)] = row_inputs
                targets[r, :len(row_targets)] = row_targets
                mask[r, len(row_targets) - scored:len(row_targets)] = 1
            dispatched.append((chunk, score_rows(self.params, *map(self._global, (inputs, targets, mask)),
                                                 model=self.model, mesh=self.mesh, rules=self._rules)))
        out: list[Any] = [None] * len(rows)
        for chunk, (logps, greedy) in dispatched:
            logps, greedy = _host(logps), _host(greedy)
            for r, i in enumerate(chunk):
                out[i] = (float(logps[r]), bool(greedy[r]))
        return out

    def _generate(self, prompts: list[list[int]], settings: GenSettings, salt: int) -> list[str]:
        """The texts that continue `prompts` (at most `rows` of them) under `settings`."""
        N = settings.max_gen_toks
        lengths = np.ones(self.rows, np.int32)
        lengths[:len(prompts)] = [len(p) for p in prompts]
        P = _bucket(int(lengths.max()), self.max_length - N)
        ids = np.full((self.rows, P), PAD_ID, np.int32)
        ids[:, 0] = self.prefix_token_id  # the padding rows' one token
        for r, prompt in enumerate(prompts):
            ids[r, :len(prompt)] = prompt
        stop = () if self.eot_token_id is None else (int(self.eot_token_id),)
        static = {"model": self.model, "mesh": self.mesh, "rules": self._rules}
        # The prefill reads the sampling settings only for the repetition penalty: one compile
        # serves greedy and sampled requests alike.
        seen = SamplingConfig(repetition_penalty=settings.sampling.repetition_penalty)
        carry = prefill(self.params, self._global(ids), self._global(lengths), sampling=seen, cache_len=P + N,
                        **static)
        tokens = np.zeros((self.rows, 0), np.int32)
        texts = [""] * len(prompts)
        while tokens.shape[1] < N:
            steps = min(self.decode_chunk, N - tokens.shape[1])
            carry, new_BN = decode_chunk(self.params, carry, np.int32(settings.seed), np.int32(salt),
                                         np.int32(tokens.shape[1]), sampling=settings.sampling, stop_tokens=stop,
                                         steps=steps, **static)
            tokens = np.concatenate([tokens, _host(new_BN)], axis=1)
            done = _host(carry[2])
            texts = [self._text(row, stop) for row in tokens[:len(prompts)]]
            if all(d or stopped(t, settings.until) for d, t in zip(done, texts)):
                break
        return [cut_at_stops(text, settings.until) for text in texts]

    def _text(self, tokens: np.ndarray, stop: tuple[int, ...]) -> str:
        """The text of a row's new tokens before its first stop token, as lm-eval decodes it
        (skip_special_tokens): without bos or pad tokens, nor ids past the tokenizer's
        vocabulary (a padded model vocabulary), which have no text."""
        skipped = {self.tokenizer.bos_id, self.tokenizer.pad_id}
        kept = []
        for t in tokens.tolist():
            if t in stop:
                break
            if t < self.tokenizer.vocab_size and t not in skipped:
                kept.append(t)
        return self.tokenizer.decode(kept)

    def _global(self, host: np.ndarray) -> jax.Array:
        """A batch array every process holds whole, rows split over the batch axes."""
        return jax.make_array_from_callback(host.shape, self._batch, lambda index: host[index])


# ---------------------------------------------------------------------------------- jitted steps


@contextlib.contextmanager
def _tracing(mesh: Mesh, rules):
    """The models' logical constraints bound to `mesh` inside jit (`sharding.layout.Layout.tracing`)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def _score_rows(params, inputs_BT, targets_BT, mask_BT, *, model, mesh, rules):
    """(sum of the masked targets' log-probs [B], whether each masked target is the argmax [B]).

    targets[t] is the token after inputs[t], so the model never reads a row's last token
    (`train.logprobs.token_logprobs` scores ids[1:] of the ids it reads, one position more
    than max_length allows).
    """
    with _tracing(mesh, rules):
        logits_BTV = lm_logits(model.apply({"params": params}, inputs_BT, deterministic=True)).astype(jnp.float32)
        picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
        logps_BT = picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
        scored_BT = mask_BT.astype(bool)
        greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
        return jnp.sum(jnp.where(scored_BT, logps_BT, 0.0), axis=-1), jnp.all(greedy_BT | ~scored_BT, axis=-1)


score_rows = jax.jit(_score_rows, static_argnames=("model", "mesh", "rules"))


def _prefill(params, ids_BT, lengths_B, *, model, mesh, rules, sampling, cache_len):
    """The decode carry (cache, logits_BV, done_B, seen_BV, positions_B) after writing the
    right-padded prompts into a fresh cache of `cache_len` slots."""
    with _tracing(mesh, rules):
        cache = init_cache(model, ids_BT.shape[0], cache_len)
        logits_BV, cache = prefill_rows(model, params, cache, ids_BT, lengths_B)
        state = initial_state(logits_BV, cache, ids_BT, lengths_B, max_new_tokens=1, sampling=sampling,
                              vocab_size=model.config.vocab_size)
        return _carry(state)


def _carry(state):
    """What one decode chunk hands the next of `inference.generate`'s loop state (not the step
    or the tokens, whose shapes are the chunk's). The rows' done flags are laid out by rows as
    the loop leaves them (the prefill's fresh ones would be replicated: a second compile)."""
    _, cache, logits_BV, _, done_B, seen_BV, positions_B = state
    return cache, logits_BV, nn.with_logical_constraint(done_B, ("act_batch",)), seen_BV, positions_B


prefill = jax.jit(_prefill, static_argnames=("model", "mesh", "rules", "sampling", "cache_len"))


def _decode_chunk(params, carry, seed, salt, start, *, model, mesh, rules, sampling, stop_tokens, steps):
    """(carry, tokens [B, steps]): `steps` more tokens per row (PAD_ID once a row has stopped;
    fewer steps run if every row has), from the carry of a prefill or of the previous chunk."""
    with _tracing(mesh, rules):
        cache, logits_BV, done_B, seen_BV, positions_B = carry
        tokens_BN = jnp.full((done_B.shape[0], steps), PAD_ID, jnp.int32)
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), salt), start)
        state = decode_rows(model, sampling, stop_tokens, params, rng,
                            (jnp.int32(0), cache, logits_BV, tokens_BN, done_B, seen_BV, positions_B))
        return _carry(state), state[3]


decode_chunk = jax.jit(_decode_chunk, static_argnames=("model", "mesh", "rules", "sampling", "stop_tokens", "steps"),
                       donate_argnames=("carry",))


# ------------------------------------------------------------------------------------- placement


def place_params(model, params, mesh: Mesh | None, strategy: str | None) -> tuple[Any, Mesh, Strategy]:
    """(params, mesh, strategy): params laid out on a mesh already are returned as they are
    (with their mesh); others are laid out on `mesh` (None: `strategy`'s default mesh over
    every device) by `strategy` (None: "dp") from the model's logical axis names.

    Raises:
      ValueError: one line: an unknown strategy, a mesh it cannot use, params of other shapes.
    """
    laid_out = _mesh_of(params)
    if laid_out is not None:
        if mesh is not None and mesh != laid_out:
            raise ValueError(f"the params are laid out on mesh {dict(laid_out.shape)}, not on the mesh "
                             f"{dict(mesh.shape)} given; pass their own mesh (or mesh=None)")
        mesh = mesh or laid_out
        chosen = get_strategy(strategy) if strategy else _strategy_of(mesh)
        check_applies(chosen, mesh)
        return params, mesh, chosen
    chosen = get_strategy(strategy or "dp")
    mesh = mesh or mesh_lib.make_mesh(chosen.default_mesh)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    check_applies(chosen, mesh, boxed)
    shardings = param_shardings(chosen, mesh, boxed, zero=chosen.zero_stage >= 3)
    abstract = nn.unbox(boxed)
    if jax.tree.structure(params, is_leaf=quant.is_quantized) != jax.tree.structure(abstract):
        raise ValueError("the params do not match the model's parameter tree (other names or nesting); pass the "
                         "params of this model, unboxed (nn.unbox)")

    def place(path, x, like, sharding):
        if quant.is_quantized(x):  # a compressed model's kernel (`python -m compress`): its arrays replicated
            return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, jax.sharding.PartitionSpec())), x)
        if tuple(np.shape(x)) != like.shape:
            raise ValueError(f"param {jax.tree_util.keystr(path, simple=True, separator='/')} has shape "
                             f"{tuple(np.shape(x))}; the model expects {like.shape}")
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)  # one leaf at a time; each device then receives its slice
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return (jax.tree_util.tree_map_with_path(place, params, abstract, shardings, is_leaf=quant.is_quantized),
            mesh, chosen)


def _mesh_of(params) -> Mesh | None:
    """The mesh every leaf of `params` is laid out on (NamedSharding), or None."""
    meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(params)
              if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)}
    if len(meshes) != 1 or not all(isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)
                                   for leaf in jax.tree.leaves(params)):
        return None
    return meshes.pop()


def _strategy_of(mesh: Mesh) -> Strategy:
    """The batch strategy for params laid out on `mesh` already: dp, or fsdp if the mesh splits over fsdp."""
    used = {axis for axis, size in mesh.shape.items() if size > 1}
    for name in ("dp", "fsdp"):
        if used <= set(STRATEGIES[name].mesh_axes):
            return STRATEGIES[name]
    raise ValueError(f"the params are laid out on mesh {dict(mesh.shape)}; pass strategy= (the sharding strategy "
                     f"they were laid out by, one of {tuple(STRATEGIES)})")


# --------------------------------------------------------------------------------------- helpers


def _bucket(length: int, cap: int) -> int:
    """The padded row length: the power of two >= length (at least MIN_BUCKET), at most cap."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()))


def _host(x: jax.Array) -> np.ndarray:
    """The whole of a (row-sharded) result on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _args(request: Any, types: tuple[type, ...], method: str, index: int) -> tuple:
    """The argument tuple of a request (or of an lm-eval Instance's `args`), type-checked."""
    args = getattr(request, "args", request)
    if not isinstance(args, (tuple, list)) or len(args) != len(types) or not all(
            isinstance(a, t) for a, t in zip(args, types)):
        names = ", ".join(t.__name__ for t in types)
        raise ValueError(f"{method} request {index} must be a tuple ({names}); got {_short(args)}")
    return tuple(args)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_model(model, tokenizer) -> None:
    """One line if the model cannot be scored as a language model with this tokenizer."""
    from models.gpt import GPT

    if not isinstance(model, GPT) or model.config.head == "score":
        kind = type(model).__name__ + (" with a score head" if isinstance(model, GPT) else "")
        raise ValueError(f"ModelLM needs a decoder-only GPT with an LM head; got a {kind}")
    if tokenizer.bos_id is None and tokenizer.eos_id is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token; lm-eval conditions an empty context and "
                         "the first rolling window on one of them")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size="
                         f"{model.config.vocab_size}: they are not each other's")

