"""Checkpoints of a run: training state, data-iterator state and resolved config.

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager` (orbax 0.12.8) with three
items per step, `DIR/<step>/{state,data,config}`, and makes resuming robust: a
latest step that is partial or corrupt is moved aside and the previous one is used.

    with Checkpointer(workdir / "ckpt", save_interval_steps=1000) as ckpt:
        restored = ckpt.restore(abstract_state)     # None on a fresh run
        ...
        ckpt.save(step, state, data_state=it.get_state(), config=config.to_dict())

What orbax does underneath, read from its source and pinned by
tests/train/test_checkpoint.py:
- Commit. A save writes into `DIR/<step>.orbax-checkpoint-tmp/` (each item in
  `<item>.orbax-checkpoint-tmp/` inside it). When every item is written, orbax
  writes `commit_success.txt` into each item and into the step directory, then
  renames the directory to `DIR/<step>`. On a local disk the rename is the commit:
  orbax lists every directory named `<digits>` as a step, and never one carrying
  the tmp suffix. On GCS, where the step directory has its final name from the
  start, `commit_success.txt` is the commit. `restore` also requires the marker in
  the step and in every item directory before it trusts a step.
- Interrupted saves. A leftover `<step>.orbax-checkpoint-tmp` is not a step (so
  resuming skips it). Orbax deletes it only when that same step is saved again.
- Garbage collection (`max_to_keep`). At `save`, orbax picks the steps to drop
  (the newest `max_to_keep` are kept, counting the new one) and removes them from
  `all_steps()` at once. It deletes them from disk only in its finalize thread,
  after the new step's rename has returned. If the background write fails,
  nothing is deleted. So the last committed checkpoint stays on disk until a
  newer one is committed.
- Donation. By default orbax copies every array to host before `save` returns
  (transfer priority SYNCHRONOUS), so the caller may donate `state` right after.
- No checksums. Missing or truncated files surface as read errors, but flipped
  bytes inside an array chunk restore as wrong numbers without any error.

So lmlab adds its own: once a step is committed (`save` without async_save, or the
next `save`, `wait_until_finished` or `close` after an async one), the primary process
writes `DIR/<step>/lmlab_manifest.json`, the SHA-256 of every file of the step, and
the others wait at a barrier. `restore` checks the sums before it reads a step: a file
that differs or is missing makes the step corrupt (moved aside, the previous step
used). A read that fails with an OSError is retried (`READ_ATTEMPTS`) and then raised
as `CheckpointReadError`: a flaky disk never gets a good step renamed. A step without
a manifest (written by older code, or committed just before a crash) is read unverified.
"""

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from train import distributed
from train.manifest import MANIFEST, READ_ATTEMPTS, CheckpointReadError, retrying, verify_manifest, write_manifest

__all__ = ["MANIFEST", "READ_ATTEMPTS", "CheckpointReadError", "CheckpointMismatchError", "CheckpointUnreadableError",
           "Checkpointer", "restore_params"]

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config")
COMMIT_MARKER = "commit_success.txt"  # orbax: atomicity_types.COMMIT_SUCCESS_FILE
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax: atomicity_types.TMP_DIR_SUFFIX
CORRUPT_PREFIX = "corrupt.step_"  # no step name: orbax only lists names `<digits>`


class CheckpointMismatchError(ValueError):
    """The saved state's tree, shapes or dtypes differ from `abstract_state`."""


class CheckpointUnreadableError(RuntimeError):
    """No checkpoint that was asked for (or none at all) could be read."""


class _Unreadable(Exception):
    """Internal: one step cannot be read; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class _LeafInfo:
    label: str  # the leaf's path as `jax.tree_util.keystr` writes it
    shape: tuple
    dtype: Any


class Checkpointer:
    """Saves and restores (state, data_state, config) per step under `directory`.

    Args:
        directory: root directory. Step N lives in `directory/N`.
        max_to_keep: number of newest checkpoints kept (None keeps all).
        save_interval_steps: `save` writes only at multiples of this (unless
            forced, or when a preemption notice has been received).
        async_save: when True, `save` returns once the arrays are on host. The
            files are written and committed in a background thread.
    """

    def __init__(
        self, directory, *, max_to_keep: int | None = 3, save_interval_steps: int = 100, async_save: bool = True
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(
                f"max_to_keep={max_to_keep} must be >= 1 or None (keep all); "
                "0 would delete each checkpoint right after writing it."
            )
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1.")
        # orbax's tensorstore writer needs an absolute path; a relative one fails mid-save.
        self.directory = epath.Path(os.path.abspath(directory))
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # No InitialSavePolicy (orbax's default adds it): step 1 of a fresh run
            # is not saved unless it falls on the interval.
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_interval_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers=dict(
                state=ocp.StandardCheckpointHandler(),
                data=ocp.JsonCheckpointHandler(),
                config=ocp.JsonCheckpointHandler(),
            ),
        )
        self._closed = False
        self._async = async_save
        self._unsealed: list[int] = []  # steps this process saved that have no manifest yet
        self._barriers = 0  # barrier names must be unique

    # ----------------------------------------------------------------- saving

    def save(self, step: int, state, *, data_state: Mapping, config: Mapping, force: bool = False) -> bool:
        """Saves a checkpoint at `step` if the save interval allows it.

        Args:
            step: training step. An existing step is never overwritten (orbax
                raises `StepAlreadyExistsError`).
            state: pytree of jax arrays, possibly sharded.
            data_state: the data iterator's state, a JSON-serialisable dict.
            config: the resolved run config, a JSON-serialisable dict (a
                ConfigDict is converted with `.to_dict()`).
            force: save even when `step` is off the save interval (or not after
                the latest step, which orbax otherwise skips).

        Returns:
            Whether a save was started. With `async_save` it is committed later.
            Call `wait_until_finished` to wait for it.
        """
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_checked_json(data_state, "data_state")),
            config=ocp.args.JsonSave(_checked_json(config, "config")),
        )
        started = self._manager.save(step, args=args, force=force)  # waits for the previous save first
        if started:
            self._seal()  # the previous steps are committed now
            self._unsealed.append(step)
            if not self._async:
                self._seal()
        return started

    # -------------------------------------------------------------- restoring

    def restore(self, abstract_state, step: int | None = None):
        """Restores a checkpoint into the shapes, dtypes and shardings of `abstract_state`.

        Args:
            abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set
                (e.g. `jax.eval_shape(init)` plus shardings).
            step: the step to read. None means the latest readable one. An
                unreadable latest step is moved to `DIR/corrupt.step_N.<time>`,
                with a warning, once an older step has been read. Nothing is
                moved when no step can be read.

        Returns:
            `(step, state, data_state, config)`, or None when `directory` holds
            no checkpoint.

        Raises:
            CheckpointMismatchError: the saved tree, shapes or dtypes differ from
                `abstract_state`. The message names the first differing leaf.
            CheckpointUnreadableError: no step could be read. The message lists
                each step tried and why it failed.
            FileNotFoundError: an explicit `step` does not exist.
            CheckpointReadError: a file could not be read after READ_ATTEMPTS
                tries (an I/O error); nothing was moved.
        """
        self.wait_until_finished()  # a save in flight is not yet a readable step
        expected = _abstract_leaves(abstract_state)
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        self._warn_about_unfinished_saves()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint at step {step} in {self.directory}; it holds steps {sorted(steps)}."
                )
            try:
                return (step, *self._restore_step_everywhere(step, abstract_state, expected))
            except _Unreadable as e:
                raise CheckpointUnreadableError(
                    f"checkpoint at step {step} in {self.directory} is unreadable ({e})."
                ) from None
        if not steps:
            return None
        unreadable = []
        for candidate in steps:
            try:
                restored = self._restore_step_everywhere(candidate, abstract_state, expected)
            except _Unreadable as e:
                unreadable.append((candidate, str(e)))
                continue
            for bad_step, reason in unreadable:
                moved_to = self._move_aside(bad_step)
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s); using step %d. "
                    "The bad checkpoint was moved to %s; nothing was deleted.",
                    bad_step,
                    self.directory,
                    reason,
                    candidate,
                    moved_to,
                )
            if unreadable:
                self._manager.reload()
            return (candidate, *restored)
        tried = "; ".join(f"step {s}: {reason}" for s, reason in unreadable)
        raise CheckpointUnreadableError(
            f"no readable checkpoint in {self.directory}. Tried {tried}. Nothing was moved or deleted."
        )

    def _restore_step_everywhere(self, step, abstract_state, expected):
        """`_restore_step`, agreed by all processes: each reads only its own shards, so a bad
        file can fail one process alone; then every process treats `step` as unreadable."""
        restored, reason, read_error = None, None, None
        try:
            restored = self._restore_step(step, abstract_state, expected)
        except _Unreadable as e:
            reason = e
        except CheckpointReadError as e:  # I/O trouble: agreed too, so no process waits alone
            read_error = e
        if distributed.any_process(read_error is not None, "checkpoint_read_error", step):
            raise read_error or CheckpointReadError(f"checkpoint step {step}: a read failed on another process "
                                                    "(see its log); nothing was moved")
        if distributed.any_process(reason is not None, "checkpoint_restore", step):
            raise reason or _Unreadable("unreadable on another process (see its log)")
        return restored

    def _restore_step(self, step, abstract_state, expected):
        """Returns (state, data_state, config) of `step` or raises _Unreadable."""
        step_dir = self.directory / str(step)
        missing = _missing_parts(step_dir)
        if missing:
            raise _Unreadable(missing)
        try:
            tree_metadata = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - any failure here means bad files
            raise _Unreadable(f"state metadata: {_short(e)}") from e
        if tree_metadata is None or getattr(tree_metadata, "tree", None) is None:
            raise _Unreadable("state has no tree metadata (state/_METADATA is missing)")
        _check_matches(expected, tree_metadata.tree, step, self.directory)
        self._verify_everywhere(step_dir)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        try:
            restored = retrying(lambda: self._manager.restore(step, args=args), f"checkpoint step {step_dir}")
        except CheckpointReadError:
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore/json raise many kinds
            raise _Unreadable(_short(e)) from e
        return restored["state"], restored["data"], restored["config"]

    def _verify_everywhere(self, step_dir: epath.Path) -> None:
        """Checks the step's manifest on the primary process (one read of the files, not one
        per process) and makes every process agree: raises _Unreadable or CheckpointReadError."""
        status, reason = 0, ""
        if jax.process_index() == 0:
            try:
                reason = verify_manifest(step_dir) or ""
                status = 1 if reason else 0
            except CheckpointReadError as e:
                status, reason = 2, str(e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            status = int(multihost_utils.broadcast_one_to_all(np.int32(status)))
            reason = reason or "the primary process found it corrupt or unreadable"
        if status == 1:
            raise _Unreadable(reason)
        if status == 2:
            raise CheckpointReadError(reason)

    def _move_aside(self, step: int) -> epath.Path:
        """Renames `DIR/step` to `DIR/corrupt.step_<step>.<time>` (primary host only)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.directory / f"{CORRUPT_PREFIX}{step}.{stamp}"
        suffix = 1
        while target.exists():
            target = self.directory / f"{CORRUPT_PREFIX}{step}.{stamp}-{suffix}"
            suffix += 1
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"lmlab_checkpoint_move_aside_{step}")
        return target

    def _warn_about_unfinished_saves(self):
        leftovers = sorted(p.name for p in self.directory.iterdir() if TMP_SUFFIX in p.name)
        if leftovers:
            log.warning(
                "ignoring unfinished save(s) in %s: %s (left by an interrupted save; "
                "saving that step again replaces it).",
                self.directory,
                ", ".join(leftovers),
            )

    # ------------------------------------------------------------ bookkeeping

    def latest_step(self) -> int | None:
        """The newest step, including a save still in flight."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps kept, oldest first, including a save still in flight."""
        return list(self._manager.all_steps())

    def wait_until_finished(self):
        """Blocks until a background save is committed (re-raises its error), then writes
        the manifest of every step this process saved."""
        self._manager.wait_until_finished()
        self._seal()

    def _seal(self) -> None:
        """Writes the manifest of each committed step saved here (primary process; the
        others wait, so that no process reads a step before its manifest exists)."""
        if not self._unsealed:
            return
        if jax.process_index() == 0:
            for step in self._unsealed:
                step_dir = self.directory / str(step)
                if (step_dir / COMMIT_MARKER).exists() and not (step_dir / MANIFEST).exists():
                    try:
                        write_manifest(step_dir)
                    except FileNotFoundError:  # max_to_keep removed the step meanwhile
                        pass
        self._unsealed = []
        if jax.process_count() > 1:
            self._barriers += 1
            ocp.multihost.sync_global_processes(f"lmlab_checkpoint_manifest_{self._barriers}")

    def close(self):
        """Waits for pending saves and releases orbax's threads."""
        if not self._closed:
            self._closed = True
            try:
                self.wait_until_finished()
            finally:
                self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def restore_params(directory, step: int, abstract_params, key: str = "params"):
    """Only the parameters of checkpoint `step` (no optimizer state), checked against the
    step's manifest, into the shapes, dtypes and shardings of `abstract_params`: a state
    saved on 8 devices restores onto 1, float32 params restore as bfloat16 if asked.

    Args:
      directory: the checkpoints' root (`Checkpointer`'s directory).
      step: a committed step.
      abstract_params: pytree of `jax.ShapeDtypeStruct` with `.sharding` set.
      key: the state's entry to read: `params` (the trainable ones), or `frozen` (those a
        fine-tuning run kept frozen, `train.trainable`).

    Returns:
      The params pytree.

    Raises:
      CheckpointUnreadableError: the step is incomplete or corrupt (the message says what).
      CheckpointMismatchError: the saved params' tree or shapes differ from `abstract_params`.
      CheckpointReadError: an I/O error that persisted over READ_ATTEMPTS tries.
    """
    step_dir = epath.Path(os.path.abspath(os.fspath(directory))) / str(step)
    reason = _missing_parts(step_dir) or verify_manifest(step_dir)
    if reason:
        raise CheckpointUnreadableError(f"checkpoint at step {step} in {step_dir.parent} is unreadable ({reason}); "
                                        "pick an older step")
    checkpointer = ocp.PyTreeCheckpointer()
    state_dir = step_dir / "state"
    try:
        saved = checkpointer.metadata(state_dir)  # StepMetadata -> TreeMetadata -> tree
        saved = getattr(getattr(saved, "item_metadata", saved), "tree", saved)
    except Exception as e:  # noqa: BLE001 - any failure here means bad files
        raise CheckpointUnreadableError(f"checkpoint at step {step}: state metadata: {_short(e)}") from e
    if not isinstance(saved, Mapping) or key not in saved:
        raise CheckpointMismatchError(f"the checkpoint at step {step} in {step_dir.parent} holds no `{key}`")
    expected = {k: dataclasses.replace(v, dtype=None) for k, v in _abstract_leaves(abstract_params).items()}
    saved_params = {k: dataclasses.replace(v, dtype=None) for k, v in _saved_leaves(saved[key]).items()}
    _check_leaves(expected, saved_params, step, step_dir.parent, key)
    target = {key: abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    try:
        restored = retrying(lambda: checkpointer.restore(state_dir, args=args), f"checkpoint step {step_dir}")
    except CheckpointReadError:
        raise
    except Exception as e:  # noqa: BLE001 - tensorstore raises many kinds
        raise CheckpointUnreadableError(f"checkpoint at step {step} in {step_dir.parent} is unreadable "
                                        f"({_short(e)}); pick an older step") from e
    return restored[key]


def _checked_json(value, name):
    """Returns `value` as a dict, or raises TypeError naming what is not JSON."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a JSON-serialisable dict, got {type(value).__name__}.")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} is not JSON-serialisable: {e}") from None
    return dict(value)


def _missing_parts(step_dir: epath.Path) -> str | None:
    """Says what makes `step_dir` an incomplete save, or None if it looks whole."""
    if not (step_dir / COMMIT_MARKER).exists():
        return f"no commit marker {COMMIT_MARKER}"
    for item in ITEMS:
        item_dir = step_dir / item
        if not item_dir.is_dir():
            unfinished = sorted(p.name for p in step_dir.iterdir() if p.name.startswith(item + TMP_SUFFIX))
            found = f"; found unfinished {unfinished[0]}" if unfinished else ""
            return f"{item}/ is missing{found}"
        if not (item_dir / COMMIT_MARKER).exists():
            return f"no commit marker {item}/{COMMIT_MARKER}"
    return None


def _short(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(error).__name__}: {text}"


def _normalised_key(path) -> tuple:
    """A path whose entries compare equal across dicts, namedtuples and sequences.

    Orbax stores namedtuple fields and dataclass attributes as dict keys, so
    `GetAttrKey('mu')` in the live tree is `DictKey('mu')` in the metadata.
    """
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return tuple(parts)


def _abstract_leaves(abstract_state) -> dict:
    """Validates `abstract_state` and returns {normalised path: _LeafInfo}, in tree order."""
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        label = jax.tree_util.keystr(path)
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(
                f"abstract_state leaf {label} is a {type(leaf).__name__}; "
                "expected jax.ShapeDtypeStruct(shape, dtype, sharding=...)."
            )
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"abstract_state leaf {label} has no sharding; build it as "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=...)."
            )
        try:
            sharding.shard_shape(tuple(leaf.shape))
        except Exception as e:  # noqa: BLE001 - jax raises IndivisibleError and others
            raise ValueError(
                f"abstract_state leaf {label}: sharding does not fit shape {tuple(leaf.shape)}: {_short(e)}"
            ) from None
        leaves[_normalised_key(path)] = _LeafInfo(label, tuple(leaf.shape), np.dtype(leaf.dtype))
    return leaves


def _check_matches(expected: dict, metadata_tree, step, directory):
    """Raises CheckpointMismatchError at the first leaf that differs."""
    _check_leaves(expected, _saved_leaves(metadata_tree), step, directory, "state")


def _saved_leaves(metadata_tree) -> dict:
    """{normalised path: _LeafInfo} of an orbax metadata tree."""
    saved = {}
    for path, meta in jax.tree_util.tree_flatten_with_path(metadata_tree)[0]:
        shape = getattr(meta, "shape", None)
        dtype = getattr(meta, "dtype", None)
        saved[_normalised_key(path)] = _LeafInfo(
            jax.tree_util.keystr(path),
            None if shape is None else tuple(shape),
            None if dtype is None else np.dtype(dtype),
        )
    return saved


def _check_leaves(expected: dict, saved: dict, step, directory, what: str):
    where = f"the checkpoint at step {step} in {directory}"

    def text(info):
        return f"{info.shape} {info.dtype}" if info.dtype is not None else f"{info.shape}"

    for key, want in expected.items():
        have = saved.get(key)
        if have is None:
            raise CheckpointMismatchError(
                f"{what} leaf {want.label} (shape {text(want)}) is in abstract_{what} but not in {where}."
            )
        if (have.shape, have.dtype) != (want.shape, want.dtype):
            raise CheckpointMismatchError(
                f"{what} leaf {want.label} has shape {text(have)} in {where}, "
                f"but abstract_{what} expects shape {text(want)}."
            )
    for key, have in saved.items():
        if key not in expected:
            raise CheckpointMismatchError(
                f"{what} leaf {have.label} (shape {text(have)}) is in {where} but not in abstract_{what}."
            )
