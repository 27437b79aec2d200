"""The frozen reference's log-probs of preference rows: precomputed once per split, or on the fly.

    ref = ReferenceLogps(run, unpaired=False, precompute=True)
    batch = ref.attach(rows, "train", state_fn)   # this process's rows -> a device batch with
                                                  # ref_chosen_logps, ref_rejected_logps [B]

The reference is `train.reference.build(run)` (the starting weights, or `config.reference`),
laid out like the policy; its whole parameters are `Reference.whole(state.frozen)` inside a
function jitted with the run's layout (the reference stays sharded as the policy is).

  * precompute: the first time a split is needed, every process runs the reference over all
    the split's rows in order (`data.preference.ordered_dataset`); the [B] results and the
    rows' `index` are gathered to every process (`distributed.to_host`), so each holds the
    whole table by index and attaches its own rows' values on the host before placing the
    batch. Once both splits' tables exist the reference is dropped.
  * on the fly: each placed batch goes through the jitted function with the reference's
    parameters and the state's frozen ones (under LoRA the base is shared, never copied).

Both give the same values (the same jitted function on the same rows), so a run's loss and
updates do not depend on the switch. `check_architecture` is the config check of
`config.reference`: a checkpoint whose parameters do not have the policy's shapes is one
error before any work.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from data import preference
from sharding import rules as rules_lib
from train import distributed
from train import logprobs as logprobs_lib
from train import reference as reference_lib

# (output key, ids key, mask key) of the rows a reference scores.
PAIRED = (("ref_chosen_logps", "chosen_ids", "chosen_mask"), ("ref_rejected_logps", "rejected_ids", "rejected_mask"))
UNPAIRED = (("ref_logps", "ids", "mask"), ("ref_kl_logps", "kl_ids", "kl_mask"))
SPLITS = ("train", "validation")


def output_keys(unpaired: bool) -> tuple[str, ...]:
    """The [B] float32 keys the reference adds to a batch."""
    return tuple(name for name, _, _ in (UNPAIRED if unpaired else PAIRED))


def sequence_logps(model, params, batch: dict[str, jax.Array], unpaired: bool) -> dict[str, jax.Array]:
    """The summed log-probs of each scored sequence of `batch` under `model` with whole `params`."""
    out = {}
    for name, ids, mask in UNPAIRED if unpaired else PAIRED:
        token_logps_BT, _ = logprobs_lib.of_model(model, params, batch[ids])
        out[name] = logprobs_lib.sequence_logprobs(token_logps_BT, batch[mask])
    return out


def jitted_logps(run, unpaired: bool):
    """`f(ref_params, frozen, batch) -> {key: [B]}`, jitted with the run's layout: the
    reference's trainable-shaped params and the frozen ones combined inside."""
    layout = run.layout

    def logps(params, frozen, batch):
        with layout.tracing():
            whole = reference_lib.Reference(params).whole(frozen)
            return sequence_logps(run.model, whole, batch, unpaired)

    return jax.jit(logps, in_shardings=(layout.state.params, layout.state.frozen, layout.batch),
                   out_shardings=layout.batch)


class ReferenceLogps:
    """The reference log-probs of one run's batches (see the module docstring)."""

    def __init__(self, run, options: preference.PreferenceConfig, *, precompute: bool):
        self.run, self.options, self.precompute = run, options, precompute
        self.unpaired = options.unpaired
        self.fn = jitted_logps(run, self.unpaired)
        self.reference: reference_lib.Reference | None = reference_lib.build(run)
        self.tables: dict[str, dict[str, np.ndarray]] = {}

    def _frozen(self, state) -> Any:
        return state.frozen if self.reference.frozen is None else self.reference.frozen

    def table(self, split: str, state) -> dict[str, np.ndarray]:
        """The split's reference log-probs by row index (computed on first use, every process)."""
        if split not in self.tables:
            rows = preference.splits(self.run.data, self.options, self.run.tokenizer)[SPLITS.index(split)]
            count = len(rows["index"])
            table = {name: np.zeros(count, np.float32) for name in output_keys(self.unpaired)}
            for local in preference.ordered_dataset(rows, self.run.data.batch_size):
                batch = rules_lib.device_put_batch(local, self.run.batch_sharding)
                out = self.fn(self.reference.params, self._frozen(state), batch)
                index = distributed.to_host(batch["index"])
                keep = index >= 0
                for name, values in distributed.to_host(out).items():
                    table[name][index[keep]] = values[keep]
            self.tables[split] = table
            if all(s in self.tables for s in SPLITS):
                self.reference = None  # every value is in the tables: free the reference's weights
        return self.tables[split]

    def attach(self, rows: dict[str, np.ndarray], split: str, state_fn) -> dict[str, jax.Array]:
        """This process's `rows` of a global batch, placed on the mesh with the reference's
        log-probs (`state_fn()`: the current state, whose frozen parameters a LoRA reference shares)."""
        sharding = self.run.batch_sharding
        if self.precompute:
            table, index = self.table(split, state_fn()), rows["index"]
            extra = {name: np.where(index >= 0, values[np.maximum(index, 0)], 0.0).astype(np.float32)
                     for name, values in table.items()}
            return rules_lib.device_put_batch({**rows, **extra}, sharding)
        batch = rules_lib.device_put_batch(rows, sharding)
        return {**batch, **self.fn(self.reference.params, self._frozen(state_fn()), batch)}


# ------------------------------------------------------------------------------ config check


def _abstract_params(model) -> dict[str, tuple]:
    import flax.linen as nn
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def reference_run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` starting from `config.reference` instead: the checkpoint decides the model's
    shapes (the model keys at their defaults, the run's execution keys kept)."""
    from configs import base
    from train import init_from

    other = config.copy_and_resolve_references()
    other.init_from, other.tokenizer.path = config.reference, ""
    model = base.get_config().model
    for key in init_from.RUN_KEYS:
        init_from._set(model, key, init_from._get(config.model, key))
    other.model = model
    return other


def check_architecture(config: ml_collections.ConfigDict, workdir: str) -> None:
    """`config.reference` names a checkpoint with the policy's parameter shapes.

    Raises:
      ValueError, FileNotFoundError: one line naming `reference` (and the first differing
        parameter's shapes).
    """
    from train import build, init_from, validate

    if not config.reference:
        return
    other = reference_run_config(config)
    try:
        init_from.check(other)
        reference_model = build.model(other, init_from.tokenizer(other).vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config key `reference`={config.reference!r}: "
                      f"{str(e).replace('config key `init_from`', 'the checkpoint')}") from None
    tokenizer = validate.existing_tokenizer(config, os.path.abspath(workdir))
    policy = _abstract_params(build.model(config, tokenizer.vocab_size if tokenizer else config.tokenizer.vocab_size))
    theirs = _abstract_params(reference_model)
    for path in sorted(policy.keys() | theirs.keys()):
        if policy.get(path) != theirs.get(path):
            raise ValueError(
                f"config key `reference`={config.reference!r} has another architecture than the policy: parameter "
                f"{path} is {theirs.get(path, 'absent')} there and {policy.get(path, 'absent')} in the policy; give a "
                "checkpoint of the policy's architecture, or leave `reference` empty (the starting weights)")
