"""Rollouts of online RL (grpo, rloo, ppo): generate from the current, still-sharded policy,
score on each process's own rows, and hand the experience to the one sharded step.

Axis letters: R rollout rows (prompts x G), P prompt width, N new tokens, T = P + N row width.

    roller = Roller(run, settings(run.config, run.tokenizer), scorer)
    exp = roller.rollout(state, rows, rollout_rng(seed, i), reference)   # an `Experience`
    ... the objective turns it into its batch (advantages), then
    for batch, boundary in minibatches(batch, epochs, minibatches): step on batch

* Generation is `inference.generate`'s prefill and decode loop (`prefill_rows`,
  `decode_rows`) inside ONE jitted function laid out by `run.layout`: the params and frozen
  params come in their training shardings (FSDP shards, a LoRA base) and are combined inside
  (`train.trainable.combine`), the prompts and outputs are batch-sharded; nothing is gathered
  to one device. G completions per prompt: each prompt row repeated G times on the host, so
  the rows of one prompt are adjacent (`group` r // G) and live on the process that drew the
  prompt. Sampling: `rl.temperature`, `rl.top_p`, `rl.top_k`; a row stops at a stop token
  (eos, the chat template's end of turn) or after `rl.max_new_tokens`.
* Row layout: the prompt then its completion, contiguous (positions 0..len-1), right-padded
  with 0 to T = data.seq_len; `completion_mask` [R, T] is 1 on the completion's tokens (the
  stop token included), indexed like `ids` (`train.logprobs`: the token at t is predicted by
  the logits at t - 1).
* Rewards are computed on the host for THIS process's rows only (read through the array's
  addressable shards, `process_rows`), by a `Scorer` (decoded text -> `train.rewards`'
  functions, TRL's convention), and assembled back into a global batch-sharded array
  (`jax.make_array_from_process_local_data`).
* `old_logps` (the sampling policy's token log-probs) and `ref_logps` (the frozen
  reference's, `train.reference`) come from jitted sharded forward passes over the rows, with
  the logits divided by the sampling temperature as TRL does.
* The rollout's random key is `rollout_rng(config.seed, rollout index)`, the index being
  step // (epochs x minibatches): a run resumed at a rollout boundary draws what an
  uninterrupted one draws.
* `minibatches` yields rl.epochs x rl.minibatches (batch, boundary) pairs; minibatch m takes
  the rows r with r % M == m (strided, so each device keeps its own rows: no transfer).
* `evaluate` is the shared RL evaluation: greedy decoding of the held-out prompts, exact
  match (the verifier's accuracy reward), mean reward, mean completion length.

What ppo, grpo and rloo use:
    Settings, settings(config, tokenizer)    G, N, sampling, stop tokens of `rl.*`
    Roller(run, settings, scorer)            .generate / .rollout / .token_logps / .scores /
                                             .sums / .select, jitted once per run
    Experience                               one rollout's global arrays
    Scorer(tokenizer, rewards, examples)     host rewards of this process's rows
    rl_batches(...), minibatches(...)        the `batches` hook's loop
    evaluate(...), eval_metrics(sums)        the shared evaluation
    policy_logps, process_rows, to_global, rollout_rng, stop_tokens, assemble_rows
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from inference.generate import completion_lengths, decode_rows, initial_state, lm_logits, prefill_rows
from inference.kv_cache import init_cache
from inference.sampling import SamplingConfig
from train import logprobs as logprobs_lib
from train import trainable as trainable_lib

ROLLOUT_SALT = 0x5EED_2011  # keeps the rollout stream apart from the step's dropout stream


@dataclasses.dataclass(frozen=True)
class Settings:
    """How rollouts are generated (static: part of the jitted generator's identity).

    Attributes:
      num_generations: G, completions per prompt.
      max_new_tokens: N.
      sampling: temperature / top-k / top-p (temperature 0: greedy).
      stop_tokens: ids that end a completion (kept in it).
    """

    num_generations: int
    max_new_tokens: int
    sampling: SamplingConfig
    stop_tokens: tuple[int, ...]

    @property
    def logit_scale(self) -> float:
        """What the logits are multiplied by for log-probs: 1 / temperature (TRL), 1 if greedy."""
        return 1.0 if self.sampling.greedy else 1.0 / self.sampling.temperature


def stop_tokens(tokenizer, template: str = "") -> tuple[int, ...]:
    """The eos id and, when the chat template's end of turn is one token, that token."""
    out = [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]
    try:
        from data import sft as sft_data

        end = sft_data.end_of_turn(tokenizer, template)
    except Exception:  # noqa: BLE001 - a tokenizer without a usable template: eos only
        end = ""
    ids = tokenizer.encode(end) if end else []
    if len(ids) == 1 and ids[0] not in out:
        out.append(int(ids[0]))
    return tuple(out)


def settings(config, tokenizer, *, num_generations: int | None = None, greedy: bool = False) -> Settings:
    """The `rl.*` rollout settings of a run config (`greedy`: the evaluation's, one completion)."""
    rl = config.rl
    if greedy:
        sampling, g = SamplingConfig(0.0), 1
    else:
        sampling = SamplingConfig(rl.temperature, rl.top_k or None, rl.top_p if rl.top_p < 1.0 else None)
        g = rl.num_generations if num_generations is None else num_generations
    return Settings(g, rl.max_new_tokens, sampling, stop_tokens(tokenizer, config.sft.chat_template))


def rollout_rng(seed: int, rollout_index: int) -> jax.Array:
    """The key of rollout `rollout_index` of a run seeded `seed` (resume == uninterrupted)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ROLLOUT_SALT), rollout_index)


@flax.struct.dataclass
class Experience:
    """One rollout: global arrays, rows batch-sharded by the run's layout (see the module docstring).

    Attributes:
      ids: [R, T] int32, prompt then completion, right-padded with 0.
      completion_mask: [R, T] int32, 1 on the completion tokens (stop token included).
      prompt_len, completion_len: [R] int32.
      index: [R] int32, the example each row's prompt came from (`examples[index]`).
      rewards: [R] float32, the weighted sum of the rewards.
      old_logps: [R, T] float32 token log-probs of the sampling policy (at every position; the
        losses read the completion's), or None when not computed (one update per rollout: the
        ratio is 1).
      ref_logps: [R, T] float32 token log-probs of the reference, or None (no reference).
    """

    ids: jax.Array
    completion_mask: jax.Array
    prompt_len: jax.Array
    completion_len: jax.Array
    index: jax.Array
    rewards: jax.Array
    old_logps: Any = None
    ref_logps: Any = None


# ------------------------------------------------------------------------------------------ device side


def _generate(params, frozen, prompt_RP, prompt_len_R, rng, *, model, settings: Settings, layout):
    """(ids [R, T], completion_mask [R, T], completion_len [R]) of one generation (traced)."""
    with layout.tracing():
        whole = trainable_lib.combine(params, frozen)
        R, P = prompt_RP.shape
        N = settings.max_new_tokens
        cache = init_cache(model, R, P + N)
        logits_RV, cache = prefill_rows(model, whole, cache, prompt_RP, prompt_len_R)
        state = initial_state(logits_RV, cache, prompt_RP, prompt_len_R, max_new_tokens=N,
                                  sampling=settings.sampling, vocab_size=model.config.vocab_size)
        tokens_RN = decode_rows(model, settings.sampling, settings.stop_tokens, whole, rng, state)[3]
        completion_len_R = completion_lengths(tokens_RN, settings.stop_tokens)
        return assemble_rows(prompt_RP, prompt_len_R, tokens_RN, completion_len_R)


def assemble_rows(prompt_RP, prompt_len_R, tokens_RN, completion_len_R):
    """(ids [R, P + N], completion_mask [R, P + N], completion_len [R]): each completion written
    right after its prompt, everything past it 0."""
    R, P = prompt_RP.shape
    N = tokens_RN.shape[1]
    T = P + N
    t_T = jnp.arange(T)
    prompt_RT = jnp.where(t_T[:P] < prompt_len_R[:, None], prompt_RP, 0)
    ids_RT = jnp.pad(prompt_RT, ((0, 0), (0, N)))
    kept_RN = jnp.where(jnp.arange(N) < completion_len_R[:, None], tokens_RN, 0)
    ids_RT = ids_RT.at[jnp.arange(R)[:, None], prompt_len_R[:, None] + jnp.arange(N)].set(kept_RN)
    mask_RT = (t_T >= prompt_len_R[:, None]) & (t_T < (prompt_len_R + completion_len_R)[:, None])
    return ids_RT, mask_RT.astype(jnp.int32), completion_len_R


def policy_logps(model, params, ids_RT, logit_scale: float = 1.0) -> jax.Array:
    """[R, T] float32 token log-probs of `ids` under the whole `params`, the logits multiplied by
    `logit_scale` (1 / the sampling temperature: the sampled distribution's log-probs, as TRL)."""
    out = model.apply({"params": params}, ids_RT, deterministic=True)
    return logprobs_lib.token_logprobs(lm_logits(out).astype(jnp.float32) * logit_scale, ids_RT)


def _token_logps(params, frozen, ids_RT, *, model, logit_scale: float, layout):
    with layout.tracing():
        return policy_logps(model, trainable_lib.combine(params, frozen), ids_RT, logit_scale)


def _select(tree, m, *, count: int):
    """Minibatch m of `count`: the rows r with r % count == m (each device keeps its own rows)."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(
        x.reshape(x.shape[0] // count, count, *x.shape[1:]), m, axis=1, keepdims=False), tree)


# ------------------------------------------------------------------------------------------ host side


def process_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array, in order (never other processes' rows)."""
    n = array.shape[0]
    blocks = {}
    for shard in array.addressable_shards:
        rows = shard.index[0] if shard.index else slice(None)
        start, stop, _ = rows.indices(n)
        blocks.setdefault((start, stop), shard)
    spans = sorted(blocks)
    for (_, stop), (start, _) in itertools.pairwise(spans):
        if start != stop:
            raise ValueError(f"this process's rows are not contiguous ({spans}); lay the batch out over processes "
                             "in blocks")
    return np.concatenate([np.asarray(blocks[s].data) for s in spans])


def to_global(local: np.ndarray, sharding, global_rows: int) -> jax.Array:
    """A global row-sharded array from this process's rows (`process_rows`' inverse)."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), (global_rows, *local.shape[1:]))


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Host-side rewards of decoded completions (`train.rewards`, TRL's convention).

    Attributes:
      tokenizer: decodes the completions (stop tokens left out).
      rewards: a `train.rewards.RewardSet`: (prompts, completions, fields) -> (total [b], parts).
      examples: index -> the example's dict (`prompt` and the fields the rewards read,
        `data.prompts`' host table); rows of index -1 (an evaluation's filler) are not scored.
      stop_tokens: ids cut from the decoded completion.
    """

    tokenizer: Any
    rewards: Callable
    examples: Any
    stop_tokens: tuple[int, ...] = ()

    def completions(self, ids_bT: np.ndarray, prompt_len_b: np.ndarray, completion_len_b: np.ndarray) -> list[str]:
        """The completion texts of rows laid out as `assemble_rows` writes them."""
        return [self.tokenizer.decode([t for t in row[p:p + c].tolist() if t not in self.stop_tokens])
                for row, p, c in zip(ids_bT, prompt_len_b, completion_len_b)]

    def __call__(self, ids_bT, prompt_len_b, completion_len_b, index_b, rewards=None) -> np.ndarray:
        """[b] float32 total rewards of this process's rows (`rewards`: another RewardSet, e.g. the
        evaluation's accuracy); 0 for filler rows (index < 0).

        Every row is scored, fillers as copies of example 0 (what `data.prompts` fills with),
        so that every process calls the reward functions with as many rows: a reward model's
        scorer is a global forward pass every process takes part in.
        """
        index_b = np.asarray(index_b)
        texts = self.completions(ids_bT, prompt_len_b, completion_len_b)
        rows = [self.examples[max(int(i), 0)] for i in index_b]
        fields = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k != "prompt"}
        total, _ = (self.rewards if rewards is None else rewards)([r["prompt"] for r in rows], texts, fields)
        return np.where(index_b >= 0, np.asarray(total, np.float32), np.float32(0.0))


class Roller:
    """The jitted generator and log-prob passes of one run, laid out by `run.layout`."""

    def __init__(self, run, settings: Settings, scorer: Scorer | None = None):
        self.run, self.settings, self.scorer = run, settings, scorer
        layout, model = run.layout, run.model
        self.row_width = run.config.data.seq_len
        self.prompt_width = self.row_width - settings.max_new_tokens
        params, frozen = layout.state.params, layout.state.frozen
        self._generate = jax.jit(
            functools.partial(_generate, model=model, settings=settings, layout=layout),
            in_shardings=(params, frozen, layout.batch, layout.batch, layout.replicated),
            out_shardings=layout.batch)
        self._logps = jax.jit(functools.partial(_token_logps, model=model, logit_scale=settings.logit_scale,
                                                layout=layout),
                              in_shardings=(params, frozen, layout.batch), out_shardings=layout.batch)
        self._sums = jax.jit(lambda *xs: [jnp.sum(x.astype(jnp.float32)) for x in xs],
                             out_shardings=layout.replicated)
        self._selectors: dict[int, Callable] = {}

    def prompts(self, rows: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This process's prompt rows repeated G times (rows of a prompt adjacent), [b*G, P] wide.

        Raises:
          ValueError: a prompt longer than P = data.seq_len - rl.max_new_tokens.
        """
        ids, lengths, index = (np.asarray(rows[k]) for k in ("prompt_ids", "prompt_len", "index"))
        P = self.prompt_width
        if lengths.size and lengths.max() > P:
            raise ValueError(f"a prompt of {int(lengths.max())} tokens does not fit the {P} prompt tokens of a "
                             f"row (data.seq_len={self.row_width} - rl.max_new_tokens="
                             f"{self.settings.max_new_tokens}); raise data.seq_len")
        padded = np.zeros((ids.shape[0], P), np.int32)
        width = min(P, ids.shape[1])
        padded[:, :width] = ids[:, :width]
        G = self.settings.num_generations
        return (np.repeat(padded, G, axis=0), np.repeat(lengths.astype(np.int32), G),
                np.repeat(index.astype(np.int32), G))

    def generate(self, params, frozen, rows: dict, rng) -> tuple[jax.Array, ...]:
        """(ids, completion_mask, completion_len, prompt_len, index): global arrays of the
        completions of this process's prompt `rows` and every other process's."""
        prompt_RP, plen_R, index_R = self.prompts(rows)
        rows_global = plen_R.shape[0] * jax.process_count()
        sharding = self.run.layout.batch
        prompt_RP, plen_R, index_R = (to_global(x, sharding, rows_global) for x in (prompt_RP, plen_R, index_R))
        ids, mask, clen = self._generate(params, frozen, prompt_RP, plen_R, rng)
        return ids, mask, clen, plen_R, index_R

    def token_logps(self, params, frozen, ids) -> jax.Array:
        """[R, T] token log-probs of the rows under combine(params, frozen), sharded like them."""
        return self._logps(params, frozen, ids)

    def scores(self, ids, plen, clen, index, rewards=None) -> jax.Array:
        """Global [R] rewards, each process scoring its own rows on the host (`Scorer`)."""
        local = self.scorer(process_rows(ids), process_rows(plen), process_rows(clen), process_rows(index),
                            rewards)
        return to_global(local, self.run.layout.batch, ids.shape[0])

    def sums(self, *arrays) -> list[jax.Array]:
        """Replicated float32 sums of global arrays (every process reads the same totals)."""
        return self._sums(*arrays)

    def select(self, tree, m: int, count: int):
        """Minibatch m of `count` of a dict of row-sharded arrays (`_select`), sharded like them."""
        if count not in self._selectors:
            layout = self.run.layout
            self._selectors[count] = jax.jit(functools.partial(_select, count=count),
                                             in_shardings=(layout.batch, layout.replicated),
                                             out_shardings=layout.batch)
        return self._selectors[count](tree, jnp.int32(m))

    def rollout(self, state, rows: dict, rng, reference=None, *, old_logps: bool = True) -> Experience:
        """One rollout of the policy `state` (read now, not kept) on this process's prompt rows.

        Args:
          state: the loop's TrainState (params and frozen in the run's layout).
          rows: this process's prompt rows {prompt_ids, prompt_len, index}.
          rng: the rollout's key (`rollout_rng`).
          reference: a `train.reference.Reference`, or None (no reference log-probs).
          old_logps: compute the sampling policy's log-probs (False: one update per rollout,
            where the loss uses the current ones, stopped).
        """
        ids, mask, clen, plen, index = self.generate(state.params, state.frozen, rows, rng)
        rewards = self.scores(ids, plen, clen, index)
        old = self.token_logps(state.params, state.frozen, ids) if old_logps else None
        ref = None
        if reference is not None:
            ref_frozen = state.frozen if reference.frozen is None else reference.frozen
            ref = self.token_logps(reference.params, ref_frozen, ids)
        return Experience(ids, mask, plen, clen, index, rewards, old, ref)


def minibatches(batch: dict, select: Callable, *, epochs: int, count: int) -> Iterator[tuple[dict, bool]]:
    """(minibatch, boundary) pairs: `epochs` passes over `count` strided minibatches of `batch`
    (a dict of row-sharded global arrays; `select` is `Roller.select`); boundary on the very last."""
    for e in range(epochs):
        for m in range(count):
            yield (batch if count == 1 else select(batch, m, count)), (e == epochs - 1 and m == count - 1)


def rl_batches(run, train_iter, state_fn, *, roller: Roller, make_batch: Callable[[Experience], dict],
               epochs: int, count: int, reference=None) -> Iterator[tuple[dict, bool]]:
    """The objective's `batches` hook for RL (`train.objectives.base`): per rollout, the prompt
    rows of `next(train_iter)`, a rollout of the current policy keyed by the rollout index
    (step // (epochs x count)), `make_batch(experience)` (advantages, the step's keys), then
    its minibatches; boundary on the last one of each rollout."""
    per_rollout = epochs * count
    while True:
        rows = next(train_iter)
        state = state_fn()
        index = int(state.step) // per_rollout
        experience = roller.rollout(state, rows, rollout_rng(run.config.seed, index), reference,
                                    old_logps=per_rollout > 1)
        del state  # donated by the next step
        yield from minibatches(make_batch(experience), roller.select, epochs=epochs, count=count)


def evaluate(run, state, eval_batches, *, roller: Roller, accuracy, max_batches: int = 0) \
        -> tuple[dict[str, float], dict[str, float]]:
    """The shared RL evaluation: greedy completions of the held-out prompt batches (this
    process's rows of each; rows of index -1 fill the last batch and are not counted), scored
    on the host.

    Args:
      run: the trainer's Run (its layout).
      state: the TrainState evaluated.
      eval_batches: the held-out prompt rows (`data.prompts.eval_dataset`).
      roller: a greedy, one-completion `Roller` with the run's `Scorer`.
      accuracy: a RewardSet of the verifier's accuracy reward alone (1 exact match, else 0).
      max_batches: batches evaluated (0: all).

    Returns:
      (sums {reward_sum, correct_sum, length_sum, count}, `eval_metrics(sums)`).
    """
    keys = ("reward_sum", "correct_sum", "length_sum", "count")
    totals = dict.fromkeys(keys, 0.0)
    for i, rows in enumerate(eval_batches):
        if max_batches and i >= max_batches:
            break
        ids, _, clen, plen, index = roller.generate(state.params, state.frozen, rows, jax.random.key(0))
        reward = roller.scores(ids, plen, clen, index)
        correct = roller.scores(ids, plen, clen, index, accuracy)
        counted = (index >= 0).astype(jnp.float32)
        sums = roller.sums(reward, correct, clen * counted, counted)
        for key, value in zip(keys, sums):
            totals[key] += float(value)
    return totals, eval_metrics(totals)


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """{loss, exact_match, mean_reward, mean_length} of the evaluation's sums; `loss` is minus
    the mean reward (the trainer's summary needs a loss; lower is better, as elsewhere)."""
    count = max(sums["count"], 1.0)
    metrics = {"exact_match": sums["correct_sum"] / count, "mean_reward": sums["reward_sum"] / count,
               "mean_length": sums["length_sum"] / count}
    return {"loss": -metrics["mean_reward"], **metrics}
