"""A serving engine with continuous batching: requests join free slots while others decode.

Axis letters: B slots (rows of the decode batch), T prompt length (padded to a bucket),
S positions a slot can hold, M blocks per slot (paged), V vocabulary.

    engine = Engine(model, params, num_slots=4)
    a = engine.submit(Request([5, 17, 3], max_new_tokens=20))
    b = engine.submit(Request([9, 2], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1))
    while engine.busy:
        for request_id, token, done in engine.step():   # tokens as they are made
            ...
    engine.results[a]

One `step()`:
  1. admit: each free slot takes the next waiting request, whose prompt is prefilled into
     that slot's cache rows alone (`_prefill_slot`: a [1, T] forward, T the prompt length
     rounded up to a power of two, so a few programs cover every prompt);
  2. decode: one jitted step over all B slots (`_decode_slots`) samples a token per slot
     from its logits, with the slot's own settings and random key, and feeds it at the
     slot's own position. Idle slots run too (the shapes are static) and their token is
     ignored. Positions, settings and keys are data, so this step compiles once;
  3. leave: a request that produced a stop token or its max_new_tokens frees its slot,
     which the next step can hand to a waiting request.

Each slot decodes exactly as `generate` would decode its request alone: same positions,
same filters, and the draw of the i-th token uses `fold_in(key(seed), i)`; so greedy
outputs (and, float for float, sampled ones) do not depend on what else is being served.

The cache is contiguous ([B, S] per layer, `inference.kv_cache`) or paged (a block pool,
`inference.paged`): with `block_size` set, slots take blocks from a shared pool as they
grow and give them back when they leave, so the pool can be sized for the tokens in
flight rather than for B * S.

Every step also returns, per slot, the log-probability of the token it chose and the
MAX_TOP_LOGPROBS most likely tokens with theirs, under the model's own distribution (the
log-softmax of the raw logits, before temperature and filters, as vLLM reports them);
`step_logprobs` holds them for the requests that asked (`Request.logprobs`). `cancel`
drops a waiting request or frees a running one's slot at once (a client that went away).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference import paged as paged_lib
from inference.generate import PAD_ID, check_prompts, seen_tokens
from inference.kv_cache import cache_nbytes, init_cache, kv_cache_bytes
from inference.kv_quant import with_kv_cache_quant
from inference.sampling import RowSampling, SamplingConfig, sample_rows
from models.gpt import GPT

MIN_PREFILL_BUCKET = 8
MAX_TOP_LOGPROBS = 20  # the most alternatives a request may ask logprobs for (OpenAI allows 20)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request. Settings as in `inference.generate`.

    Attributes:
      prompt: token ids.
      max_new_tokens: the most tokens generated.
      temperature, top_k, top_p, min_p, repetition_penalty: the sampling settings
        (`sampling.SamplingConfig`); temperature 0 is greedy.
      stop_tokens: ids that end the request (included in its output).
      seed: the request's sampling seed.
      logprobs: None, or k in [0, MAX_TOP_LOGPROBS]: record each chosen token's log-probability
        and the k most likely tokens' (`Engine.step_logprobs`, `Engine.logprobs`).
    """

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_tokens: Sequence[int] = ()
    seed: int = 0
    logprobs: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be in [0, {MAX_TOP_LOGPROBS}] or None")
        self.sampling  # noqa: B018 - raises now on bad settings, not at admission

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)


@dataclasses.dataclass
class _Running:
    """A request in a slot: its id, what it has produced, where its next token goes."""

    request_id: int
    request: Request
    joined_step: int
    tokens: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class SlotUse:
    """Which request a slot served, from the step it joined to the step it left."""

    request_id: int
    slot: int
    joined_step: int
    left_step: int


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache", "logits_BV", "seen_BV"))
def _prefill_slot(model: GPT, params, cache, logits_BV, seen_BV, ids_1T, length, slot, block_table_1M):
    """Writes one prompt into slot `slot` (contiguous: its cache row; paged: the blocks of
    `block_table_1M`) and stores its last token's logits and its seen tokens in that row."""
    positions_1T = jnp.arange(ids_1T.shape[1])[None]
    if block_table_1M is None:
        axis = paged_lib.batch_axis(model)
        row = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis), cache)
        logits_1TV, new = model.apply({"params": params, "cache": row}, ids_1T, positions=positions_1T,
                                      mutable=["cache"])
        cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis), cache, new["cache"])
    else:
        logits_1TV, new = model.apply({"params": params, "cache": paged_lib.with_block_table(cache, block_table_1M)},
                                      ids_1T, positions=positions_1T, mutable=["cache"])
        cache = paged_lib.without_block_table(new["cache"])
    logits_BV = logits_BV.at[slot].set(logits_1TV[0, length - 1])
    seen_BV = seen_BV.at[slot].set(seen_tokens(ids_1T, length[None], seen_BV.shape[1])[0])
    return cache, logits_BV, seen_BV


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache", "logits_BV", "seen_BV"))
def _decode_slots(model: GPT, params, cache, logits_BV, seen_BV, rows: RowSampling, key_data_B, steps_B,
                  positions_B, active_B, block_table_BM):
    """One token for every slot: sample from each slot's logits, feed it at the slot's position.

    Returns (tokens [B] (PAD_ID for idle slots), cache, next logits [B, V], seen [B, V],
    (chosen token's logprob [B], top logprobs [B, K], their ids [B, K])), K = min(MAX_TOP_LOGPROBS, V).
    """
    keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(key_data_B), steps_B)
    token_B = jnp.where(active_B, sample_rows(logits_BV, rows, keys_B, seen_BV), PAD_ID)
    logprobs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    chosen_B = jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]
    top_BK, top_ids_BK = jax.lax.top_k(logprobs_BV, min(MAX_TOP_LOGPROBS, logprobs_BV.shape[-1]))
    seen_BV = seen_BV.at[jnp.arange(token_B.shape[0]), token_B].set(True)
    if block_table_BM is not None:
        cache = paged_lib.with_block_table(cache, block_table_BM)
    logits_B1V, new = model.apply({"params": params, "cache": cache}, token_B[:, None],
                                  positions=positions_B[:, None], mutable=["cache"])
    cache = new["cache"] if block_table_BM is None else paged_lib.without_block_table(new["cache"])
    return token_B, cache, logits_B1V[:, 0], seen_BV, (chosen_B, top_BK, top_ids_BK)


class Engine:
    """Continuous batching over `num_slots` slots, with a contiguous or a paged KV cache.

    Args:
      model, params: a decoder-only `GPT` and its params.
      num_slots: B, requests decoded together.
      max_len: S, the most positions (prompt + new tokens) of one request; default the
        model's context length.
      block_size: Z; set it for a paged cache (S must be a multiple of it).
      num_blocks: P, the pool's blocks (block 0 is reserved); default enough for every
        slot at full length, B * S / Z + 1, i.e. no saving: size it for your traffic.
      kv_cache: the cache's storage, "float" (the compute dtype), "int8" or "fp8"
        (`inference.kv_quant`: codes plus per-head scales, contiguous or paged); None: the
        model's own `kv_cache_quant`.
    """

    def __init__(self, model: GPT, params, *, num_slots: int = 4, max_len: int | None = None,
                 block_size: int | None = None, num_blocks: int | None = None, kv_cache: str | None = None):
        model = with_kv_cache_quant(model, kv_cache)
        cfg = model.config
        self.model, self.params, self.num_slots = model, params, num_slots
        self.max_len = max_len or cfg.max_len
        if not 1 <= self.max_len <= cfg.max_len:
            raise ValueError(f"max_len={self.max_len} must be in [1, the model's max_len={cfg.max_len}]")
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.paged = block_size is not None
        B, V = num_slots, cfg.vocab_size
        if self.paged:
            if self.max_len % block_size:
                raise ValueError(f"max_len={self.max_len} must be a multiple of block_size={block_size}")
            self.blocks_per_slot = self.max_len // block_size
            num_blocks = num_blocks or B * self.blocks_per_slot + 1
            self.block_size = block_size
            self.cache = paged_lib.init_paged_cache(model, num_blocks, block_size)
            self.allocator = paged_lib.BlockAllocator(num_blocks)
            self.block_table = np.full((B, self.blocks_per_slot), paged_lib.NULL_BLOCK, np.int32)
        elif num_blocks is not None:
            raise ValueError("num_blocks is set but block_size is not: pass block_size for a paged cache")
        else:
            self.cache = init_cache(model, B, self.max_len)
        self.logits_BV = jnp.zeros((B, V), jnp.float32)
        self.seen_BV = jnp.zeros((B, V), bool)
        self.rows = RowSampling.of([SamplingConfig()] * B, V)
        self.key_data = np.zeros((B, *jax.random.key_data(jax.random.key(0)).shape), np.uint32)
        self.positions = np.zeros(B, np.int32)
        self.slots: list[_Running | None] = [None] * B
        self.waiting: collections.deque[tuple[int, Request]] = collections.deque()
        self.results: dict[int, list[int]] = {}
        # request id -> [(chosen logprob, [(token, logprob)] * k)] per token, for requests with logprobs
        self.logprobs: dict[int, list[tuple[float, list[tuple[int, float]]]]] = {}
        self.step_logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}  # the last step's
        self.history: list[SlotUse] = []
        self.steps = 0
        self._next_id = 0

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request) -> int:
        """Queues a request; returns its id (the key of `results`)."""
        check_prompts([request.prompt], self.model.config.vocab_size)
        need = len(request.prompt) + request.max_new_tokens
        if need > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt)}) + max_new_tokens ({request.max_new_tokens}) = {need} "
                             f"exceeds the engine's max_len={self.max_len} positions per slot")
        if self.paged and paged_lib.blocks_for(need, self.block_size) > self.allocator.usable:
            raise ValueError(f"the request needs {paged_lib.blocks_for(need, self.block_size)} blocks, more than the "
                             f"pool's {self.allocator.usable}; raise num_blocks")
        request_id, self._next_id = self._next_id, self._next_id + 1
        self.waiting.append((request_id, request))
        return request_id

    @property
    def busy(self) -> bool:
        """Requests are waiting or running."""
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def run(self) -> dict[int, list[int]]:
        """Steps until every submitted request is done; returns `results`."""
        while self.busy:
            self.step()
        return self.results

    # ------------------------------------------------------------------ one step

    def step(self) -> list[tuple[int, int, bool]]:
        """Admits waiting requests into free slots, then decodes one token in every slot.

        Returns:
          (request id, token, finished) for each running request.
        """
        self._admit()
        active = np.array([s is not None for s in self.slots])
        if not active.any():
            return []
        if self.paged:
            for slot in np.flatnonzero(active).tolist():  # the block the fed token is written into
                self._ensure_block(slot, int(self.positions[slot]))
        steps = np.array([len(s.tokens) if s else 0 for s in self.slots], np.int32)
        tokens, self.cache, self.logits_BV, self.seen_BV, logprobs = _decode_slots(
            self.model, self.params, self.cache, self.logits_BV, self.seen_BV, self.rows, self.key_data, steps,
            self.positions, active, self.block_table if self.paged else None)
        tokens = np.asarray(tokens)
        self.steps += 1
        events = []
        self.step_logprobs = {}
        wants = [s is not None and s.request.logprobs is not None for s in self.slots]
        chosen, top, top_ids = (np.asarray(x) for x in logprobs) if any(wants) else (None, None, None)
        for slot in np.flatnonzero(active).tolist():
            running, token = self.slots[slot], int(tokens[slot])
            running.tokens.append(token)
            if wants[slot]:
                k = running.request.logprobs
                entry = (float(chosen[slot]), [(int(i), float(v)) for i, v in zip(top_ids[slot, :k], top[slot, :k])])
                self.step_logprobs[running.request_id] = entry
                self.logprobs.setdefault(running.request_id, []).append(entry)
            self.positions[slot] += 1
            r = running.request
            done = token in r.stop_tokens or len(running.tokens) == r.max_new_tokens
            events.append((running.request_id, token, done))
            if done:
                self._leave(slot)
        return events

    def cancel(self, request_id: int) -> bool:
        """Drops a waiting request, or stops a running one and frees its slot (its blocks too).

        The tokens it made so far stay in `results`. Returns whether the request was waiting or
        running (False: unknown or already finished).
        """
        for i, (waiting_id, _) in enumerate(self.waiting):
            if waiting_id == request_id:
                del self.waiting[i]
                self.results[request_id] = []
                return True
        for slot, running in enumerate(self.slots):
            if running is not None and running.request_id == request_id:
                self._leave(slot)
                return True
        return False

    @property
    def num_running(self) -> int:
        """Requests in slots."""
        return sum(s is not None for s in self.slots)

    def _admit(self) -> None:
        for slot in range(self.num_slots):
            if self.slots[slot] is not None or not self.waiting:
                continue
            request_id, request = self.waiting[0]
            length = len(request.prompt)
            if self.paged and not self.allocator.reserve(
                    request_id, paged_lib.blocks_for(length + request.max_new_tokens, self.block_size)):
                return  # first come, first served: wait for blocks to come back
            self.waiting.popleft()
            self._prefill(slot, request_id, request)

    def _prefill(self, slot: int, request_id: int, request: Request) -> None:
        length = len(request.prompt)
        bucket = min(self.max_len, max(MIN_PREFILL_BUCKET, 1 << (length - 1).bit_length()))
        ids = np.full((1, bucket), PAD_ID, np.int32)
        ids[0, :length] = request.prompt
        table = None
        if self.paged:
            for position in range(0, length, self.block_size):
                self._ensure_block(slot, position, request_id)
            table = self.block_table[slot:slot + 1]
        self.cache, self.logits_BV, self.seen_BV = _prefill_slot(
            self.model, self.params, self.cache, self.logits_BV, self.seen_BV, ids, np.int32(length),
            np.int32(slot), table)
        settings = RowSampling.of([request.sampling], self.model.config.vocab_size)
        for column, value in zip(self.rows, settings):
            column[slot] = value[0]
        self.key_data[slot] = np.asarray(jax.random.key_data(jax.random.key(request.seed)))
        self.positions[slot] = length
        self.slots[slot] = _Running(request_id, request, self.steps)

    def _ensure_block(self, slot: int, position: int, owner: int | None = None) -> None:
        """Gives the slot a block for `position` if it has none yet (blocks fill in order)."""
        index = position // self.block_size
        if self.block_table[slot, index] == paged_lib.NULL_BLOCK:
            owner = self.slots[slot].request_id if owner is None else owner
            self.block_table[slot, index] = self.allocator.allocate(owner)

    def _leave(self, slot: int) -> None:
        running = self.slots[slot]
        self.results[running.request_id] = running.tokens
        self.history.append(SlotUse(running.request_id, slot, running.joined_step, self.steps))
        self.slots[slot] = None
        self.positions[slot] = 0
        if self.paged:
            self.allocator.release(running.request_id)
            self.block_table[slot] = paged_lib.NULL_BLOCK

    # ------------------------------------------------------------------ memory

    def cache_bytes(self) -> int:
        """Bytes allocated for the KV cache (the pool when paged)."""
        return cache_nbytes(self.cache)

    def contiguous_cache_bytes(self) -> int:
        """What a contiguous cache of B slots x S positions takes (the formula)."""
        return kv_cache_bytes(self.model.config, self.num_slots, self.max_len)

    def block_bytes(self) -> int:
        """Bytes of one block across all layers (paged)."""
        return self.cache_bytes() // self.allocator.num_blocks
