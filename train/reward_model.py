"""A trained reward model scoring text for the RL rewards (`rl.reward_model`, the `model` reward).

    rm = RewardModel.load("run:/tmp/rm", layout=run.layout, tokenizer=run.tokenizer)   # or "hf:DIR"
    scores_B = rm.score(ids_BT, len_B)               # this process's rows -> [B] float32 (numpy)
    rewards = rm.score_texts(prompts, completions)   # list[float], rendered as the reward data

The checkpoint is a reward run's (`objective=reward`, `run:WORKDIR[@STEP]`) or a transformers
*ForSequenceClassification directory with one label (`hf:DIR`). Its parameters are read
straight into the policy run's mesh, each laid out by its logical names under the run's
strategy (`sharding.layout.param_shardings`; ZeRO-3 / FSDP split them), leaf by leaf
(`train.init_from.load_params`): nothing is gathered to one device. Scoring is one jitted
forward pass (`train.objectives.reward.sequence_scores`: the score at each row's token
len - 1) over the global batch the processes' rows make together, so every process calls
`score` together with the same number of rows (multi-host: as the rollout's rows are).
Rows are padded (rows to the batch axes, length to a multiple of LENGTH_BUCKET) so a few
shapes compile.

`score_texts` renders each (prompt, completion) as `data.preference` renders a preference
row (`split_prompt`: plain text `[bos] + prompt + completion + [eos]`, or one user and one
assistant turn under the reward run's chat template) and cuts it to the model's context as the
data does (`fit`). The reward model must read the policy's ids: `load` checks that its
tokenizer equals the policy's (vocabulary, special ids, every token's text) and refuses in one
line otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data import preference
from train.objectives.reward import sequence_scores

LENGTH_BUCKET = 32  # rows are padded to a multiple of this many tokens (fewer compiled shapes)
PROBE_TEXT = "The quick brown fox: 12 + 30 = 42!\n\tÜber <tag> naïve 日本語 🙂"


@dataclasses.dataclass
class RewardModel:
    """A reward model laid out on a mesh (see the module docstring); build it with `load`.

    Attributes:
      model: the decoder under its score head (`GPTConfig.head="score"`).
      params: its parameters, laid out by their logical names on the mesh.
      tokenizer: its tokenizer (equal to the policy's when `load` was given one).
      source: the checkpoint, as given (`run:...` or `hf:...`).
      options: how texts become rows (`data.preference.PreferenceConfig`: template, prompt cut).
    """

    model: nn.Module
    params: Any
    tokenizer: Any
    source: str
    options: preference.PreferenceConfig
    _mesh: Any = None
    _rules: Any = None
    _batch: Any = None
    _fn: Any = None

    @classmethod
    def load(cls, spec: str, *, layout=None, tokenizer=None) -> RewardModel:
        """The reward model of `spec` on the mesh of `layout`.

        Args:
          spec: "run:WORKDIR[@STEP]" (an objective=reward run) or "hf:DIR" (a
            *ForSequenceClassification directory, num_labels 1).
          layout: the policy run's `sharding.layout.Layout` (its strategy, mesh, logical rules and
            batch sharding); None: data parallel over every device.
          tokenizer: the policy's tokenizer; the reward model's must equal it. None: unchecked.

        Raises:
          ValueError: one line: a spec of another form, a checkpoint that is not a reward model,
            or a tokenizer that differs from the policy's.
        """
        from train import init_from

        parsed = _parse(spec)
        model, own_tokenizer, options = _checkpoint(parsed, spec)
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, own_tokenizer, spec)
        strategy, mesh, rules, batch = _placement(layout)
        from sharding.layout import param_shardings

        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
        shardings = param_shardings(strategy, mesh, boxed, zero=strategy.zero_stage >= 3)
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          nn.unbox(boxed), shardings)
        params = init_from.load_params(parsed, abstract, model)
        out = cls(model, params, own_tokenizer, spec, options, mesh, rules, batch)
        out._fn = jax.jit(out._scores, in_shardings=(shardings, batch, batch), out_shardings=batch)
        return out

    def _scores(self, params, ids_BT, len_B):
        with _tracing(self._mesh, self._rules):
            return sequence_scores(self.model, params, ids_BT, len_B)

    def score(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """[B] float32 scores of this process's right-padded rows (every process calls it with
        the same number of rows).

        Args:
          ids: [B, T] token ids; what follows a row's length is ignored.
          lengths: [B] tokens of each row, 1 to the model's context.
        """
        ids, lengths = np.asarray(ids, np.int32), np.asarray(lengths, np.int32)
        rows = ids.shape[0]
        if ids.ndim != 2 or lengths.shape != (rows,):
            raise ValueError(f"reward model {self.source}: ids must be [B, T] and lengths [B]; got {ids.shape} and "
                             f"{lengths.shape}")
        if rows == 0:
            return np.zeros(0, np.float32)
        max_len = self.model.config.max_len
        longest = int(lengths.max())
        if lengths.min() < 1 or longest > ids.shape[1] or longest > max_len:
            raise ValueError(f"reward model {self.source}: row lengths must lie in [1, min(T={ids.shape[1]}, "
                             f"context {max_len})]; got {lengths.min()}..{longest}")
        T = min(max_len, -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET)
        B = -(-rows // self._local_multiple()) * self._local_multiple()
        width = min(T, ids.shape[1])
        padded = np.zeros((B, T), np.int32)
        padded[:rows, :width] = ids[:, :width] * (np.arange(width)[None, :] < lengths[:, None])
        padded_len = np.ones(B, np.int32)
        padded_len[:rows] = lengths
        out = self._fn(self.params, *(jax.make_array_from_process_local_data(self._batch, x)
                                      for x in (padded, padded_len)))
        return _local_rows(out)[:rows].astype(np.float32)

    def _local_multiple(self) -> int:
        """Rows each process pads to: the batch axes' shards over the processes."""
        spec = self._batch.spec[0] if len(self._batch.spec) else None
        axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
        shards = math.prod(self._mesh.shape[a] for a in axes)
        return max(1, shards // jax.process_count())

    def score_texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """Scores of (prompt, completion) pairs, rendered as the reward data renders a response.

        Args:
          prompts: strings (or lists of chat messages), one per completion.
          completions: strings (or lists of assistant messages).

        Returns:
          One float per pair.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"reward model {self.source}: {len(prompts)} prompts but {len(completions)} completions")
        rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
        length = max((len(r) for r in rows), default=1)
        ids = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        return [float(x) for x in self.score(ids, np.asarray([len(r) for r in rows], np.int32))]

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """The token row of one (prompt, completion): `data.preference`'s rendering and cut (an
        empty completion, a stop at once, is the prompt and the end of the response alone)."""
        if not isinstance(prompt, str) and isinstance(completion, str):  # chat messages, a generated reply
            completion = [{"role": "assistant", "content": completion}]
        prompt_ids, (response,) = preference.split_prompt(self.tokenizer, prompt, [completion],
                                                          self.options.template)
        prompt_ids, (response,) = preference.fit(prompt_ids, [response], self.model.config.max_len,
                                                 self.options.max_prompt_len)
        return prompt_ids + response


def _parse(spec: str):
    from train import init_from

    kind, sep, rest = spec.partition(":")
    if not sep or kind not in init_from.KINDS or not rest:
        raise ValueError(f"reward model {spec!r}: expected run:WORKDIR[@STEP] (an objective=reward run) or hf:DIR "
                         "(a *ForSequenceClassification directory)")
    try:
        parsed = init_from.parse(spec)
        init_from.run_step(parsed) if parsed.kind == "run" else None
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"reward model {spec!r}: {str(e).removeprefix('config key `init_from`=')}") from None
    return parsed


def _checkpoint(parsed, spec: str):
    """(model, tokenizer, rendering options) of a reward checkpoint; one line if it is none."""
    from data.tokenizer import load_tokenizer
    from inference.load import is_hf_dir
    from models import hf
    from train import build, init_from

    def check(model):
        head = getattr(getattr(model, "config", None), "head", None)
        if head != "score" or model.config.num_scores != 1:
            raise ValueError(f"reward model {spec!r} is not a reward model (a decoder with one score, from "
                             "objective=reward or a *ForSequenceClassification with num_labels 1); it is a "
                             f"{type(model).__name__}" + (f" with head={head!r}" if head else ""))
        return model

    if parsed.kind == "hf":
        if not is_hf_dir(parsed.path):
            raise ValueError(f"reward model {spec!r}: {parsed.path} is not a Hugging Face model directory")
        model = check(hf.model_of(parsed.path))
        return model, load_tokenizer(parsed.path), preference.PreferenceConfig()
    config = init_from.run_config(parsed)
    tokenizer = init_from.run_tokenizer(parsed)
    return check(build.model(config, tokenizer.vocab_size)), tokenizer, preference.preference_config(config)


def tokenizer_difference(ours, theirs, whose: str = "the policy's") -> str:
    """How `theirs` maps text to other ids than `ours` ("" if it does not): the vocabulary size,
    special ids, text of every id and ids of a probe text; `whose` names `ours` in the reason."""
    if ours.vocab_size != theirs.vocab_size:
        return f"vocabulary {theirs.vocab_size} vs {whose} {ours.vocab_size}"
    for role in ("bos", "eos", "pad"):
        if getattr(ours, f"{role}_id") != getattr(theirs, f"{role}_id"):
            return f"{role} id {getattr(theirs, f'{role}_id')} vs {whose} {getattr(ours, f'{role}_id')}"
    if ours.encode(PROBE_TEXT) != theirs.encode(PROBE_TEXT):
        return "it splits a probe text into other ids"
    bad = next((i for i in range(ours.vocab_size) if ours.decode([i]) != theirs.decode([i])), None)
    return "" if bad is None else f"id {bad} is {theirs.decode([bad])!r}, {whose} {ours.decode([bad])!r}"


def check_same_tokenizer(policy, reward, spec: str) -> None:
    """Raises ValueError (one line) unless the two tokenizers map text to the same ids
    (`tokenizer_difference`)."""
    reason = tokenizer_difference(policy, reward)
    if reason:
        raise ValueError(f"reward model {spec!r}: its tokenizer differs from the policy's ({reason}); train the reward "
                         "model from the policy's checkpoint (init_from) so that both read the same ids")


def _placement(layout):
    """(strategy, mesh, logical rules, batch sharding) of `layout`, or dp over every device."""
    if layout is not None:
        return layout.strategy, layout.mesh, layout.rules, layout.batch
    from sharding import mesh as mesh_lib
    from sharding.strategies import get_strategy

    strategy = get_strategy("dp")
    mesh = mesh_lib.make_mesh(strategy.default_mesh)
    rules = strategy.activation_rules(mesh)
    batch = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch",), rules))
    return strategy, mesh, rules, batch


@contextlib.contextmanager
def _tracing(mesh, rules):
    """The models' logical constraints bound to `mesh` inside jit (`sharding.layout.Layout.tracing`)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array, in order (replicas read once)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, np.asarray(shard.data))
    return np.concatenate([shards[k] for k in sorted(shards)])
