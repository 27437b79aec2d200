"""Tests for train/checkpoint.py: round trips, sharding, retention, and recovery.

Runs on the 8 simulated CPU devices that tests/conftest.py requests.
"""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.path import atomicity

from train import checkpoint as checkpoint_lib
from train import manifest as manifest_lib
from train.checkpoint import (
    MANIFEST,
    CheckpointMismatchError,
    CheckpointReadError,
    CheckpointUnreadableError,
    Checkpointer,
)

DATA = {"epoch": 1, "position": 12345, "shards": ["a-0001", "a-0002"], "rng": [0, 7]}
CONFIG = {
    "model": {"name": "tiny", "d_model": 16, "dtype": "bfloat16"},
    "optimizer": {"lr": 3e-4, "betas": [0.9, 0.95], "schedule": None},
    "seed": 0,
    "quick": True,
}


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should request 8 CPU devices"
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _normal(seed, shape, dtype=jnp.float32):
    # numpy, not jax.random: eager jax.random costs seconds of compiles on 8 devices.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _small_state(seed):
    return {"w": _normal(seed, (8, 4)), "step": jnp.int32(seed)}


def _train_state(seed=0):
    """Nested params in f32/bf16/int32 plus an adamw state with non-zero moments."""
    params = {
        "dense": {"kernel": _normal(seed, (16, 8)), "bias": _normal(seed + 1, (8,), jnp.bfloat16)},
        "token_ids": jnp.arange(12, dtype=jnp.int32).reshape(3, 4),
    }
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    grads["token_ids"] = jnp.zeros_like(params["token_ids"])
    _, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(7)}


def _step_dirs(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_nested_dtypes_and_adamw_state(tmp_path, async_save):
    state = _train_state()
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        assert ckpt.save(0, state, data_state=DATA, config=CONFIG)
        ckpt.wait_until_finished()
        step, restored, _, _ = ckpt.restore(_abstract(state))
    assert step == 0
    _assert_trees_equal(restored, state)
    assert isinstance(restored["opt_state"], type(state["opt_state"]))  # namedtuples come back
    assert restored["params"]["dense"]["bias"].dtype == jnp.bfloat16


def test_round_trip_sharded_over_8_devices(tmp_path, mesh):
    rows = NamedSharding(mesh, P("data"))
    cols = NamedSharding(mesh, P(None, "data"))
    replicated = NamedSharding(mesh, P())
    state = {
        "a": jax.device_put(jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8), rows),
        "b": jax.device_put(jnp.arange(4 * 16).reshape(4, 16).astype(jnp.bfloat16), cols),
        "c": jax.device_put(jnp.arange(5, dtype=jnp.int32), replicated),
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(100, state, data_state=DATA, config=CONFIG)
        _, restored, _, _ = ckpt.restore(_abstract(state))
    _assert_trees_equal(restored, state)
    for key in state:
        assert restored[key].sharding == state[key].sharding, key
    assert restored["a"].addressable_shards[0].data.shape == (8, 8)
    assert restored["b"].addressable_shards[0].data.shape == (4, 2)


def test_restore_into_a_different_sharding(tmp_path, mesh):
    saved = {
        "a": jax.device_put(jnp.arange(32 * 16, dtype=jnp.float32).reshape(32, 16), NamedSharding(mesh, P("data")))
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, saved, data_state=DATA, config=CONFIG)
        for spec in (P(None, "data"), P()):
            target = NamedSharding(mesh, spec)
            abstract = {"a": jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=target)}
            _, restored, _, _ = ckpt.restore(abstract)
            assert restored["a"].sharding == target
            np.testing.assert_array_equal(np.asarray(restored["a"]), np.asarray(saved["a"]))


def test_save_interval_and_max_to_keep(tmp_path):
    state = _small_state(0)
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=10) as ckpt:
        # Starts at 1: orbax's default policy would also save the first step of a
        # fresh run; ours saves only on the interval.
        saved = [s for s in range(1, 46) if ckpt.save(s, state, data_state=DATA, config=CONFIG)]
        ckpt.wait_until_finished()
        assert saved == [10, 20, 30, 40]
        assert ckpt.all_steps() == [30, 40]
        assert _step_dirs(tmp_path) == ["30", "40"]
        assert ckpt.save(43, state, data_state=DATA, config=CONFIG, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [40, 43] and ckpt.latest_step() == 43
    assert _step_dirs(tmp_path) == ["40", "43"]


def test_old_checkpoint_deleted_only_after_newer_commit(tmp_path, monkeypatch):
    """Pins orbax's async GC order: step 1 survives until step 2 is committed,
    and survives for good when step 2's commit fails."""
    state = _small_state(1)
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    seen_at_commit = {}

    async def finalize(self):
        final = self.get_final()
        if str(final.parent) == str(tmp_path):  # the step directory, not an item inside it
            seen_at_commit[final.name] = _step_dirs(tmp_path)
            if final.name == "3":
                raise OSError("disk full (simulated)")
        await real_finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    with Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as ckpt:
        ckpt.save(1, state, data_state=DATA, config=CONFIG)
        ckpt.wait_until_finished()
        ckpt.save(2, state, data_state=DATA, config=CONFIG)
        ckpt.wait_until_finished()
        assert seen_at_commit["2"] == ["1", "2.orbax-checkpoint-tmp"]
        assert _step_dirs(tmp_path) == ["2"]
        ckpt.save(3, state, data_state=DATA, config=CONFIG)
        with pytest.raises(OSError, match="disk full"):
            ckpt.wait_until_finished()
        assert "2" in _step_dirs(tmp_path)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", real_finalize)
    with Checkpointer(tmp_path) as ckpt:
        step, restored, _, _ = ckpt.restore(_abstract(state))
    assert step == 2
    _assert_trees_equal(restored, state)


def test_data_state_and_config_round_trip(tmp_path):
    state = _small_state(0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, state, data_state=DATA, config=CONFIG)
        with pytest.raises(TypeError, match="data_state is not JSON-serialisable"):
            ckpt.save(100, state, data_state={"rng": np.zeros(2)}, config=CONFIG)
    with Checkpointer(tmp_path) as ckpt:  # a fresh process reads what was written
        step, _, data_state, config = ckpt.restore(_abstract(state))
    assert step == 0
    assert data_state == DATA
    assert config == CONFIG


def _truncate(path):
    assert path.is_file(), path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _remove(path):
    assert path.is_file(), path
    path.unlink()


def _unfinished_item(step_dir):
    (step_dir / "commit_success.txt").unlink()
    (step_dir / "state").rename(step_dir / "state.orbax-checkpoint-tmp")


CORRUPTIONS = {
    "truncated_array_manifest": lambda d: _truncate(d / "state" / "manifest.ocdbt"),
    "deleted_tree_metadata": lambda d: _remove(d / "state" / "_METADATA"),
    "garbled_data_state": lambda d: (d / "data" / "metadata").write_text('{"epoch": 1, "pos'),
    "missing_commit_marker": lambda d: _remove(d / "commit_success.txt"),
    "unfinished_item": _unfinished_item,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_and_is_moved_aside(tmp_path, caplog, corruption):
    old, new = _small_state(10), _small_state(20)
    with Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
        ckpt.save(10, old, data_state={"position": 10}, config=CONFIG)
        ckpt.save(20, new, data_state={"position": 20}, config=CONFIG)
    CORRUPTIONS[corruption](tmp_path / "20")

    with (
        caplog.at_level(logging.WARNING, logger="train.checkpoint"),
        Checkpointer(tmp_path, save_interval_steps=10) as ckpt,
    ):
        step, restored, data_state, _ = ckpt.restore(_abstract(old))
        assert (step, data_state) == (10, {"position": 10})
        _assert_trees_equal(restored, old)
        assert f"checkpoint at step 20 in {tmp_path} is unreadable (" in caplog.text
        assert "; using step 10" in caplog.text
        moved = [p for p in tmp_path.iterdir() if p.name.startswith("corrupt.step_20.")]
        assert len(moved) == 1 and not (tmp_path / "20").exists()
        assert (moved[0] / "config" / "metadata").is_file()  # moved whole, not deleted
        assert ckpt.all_steps() == [10]

        assert ckpt.save(20, new, data_state={"position": 20}, config=CONFIG)
        step, restored, data_state, _ = ckpt.restore(_abstract(old))
    assert (step, data_state) == (20, {"position": 20})
    _assert_trees_equal(restored, new)


def test_no_readable_checkpoint_raises_listing_attempts(tmp_path):
    state = _small_state(0)
    with Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
        ckpt.save(10, state, data_state=DATA, config=CONFIG)
        ckpt.save(20, state, data_state=DATA, config=CONFIG)
    _remove(tmp_path / "10" / "commit_success.txt")
    _truncate(tmp_path / "20" / "state" / "manifest.ocdbt")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointUnreadableError) as info:
            ckpt.restore(_abstract(state))
    message = str(info.value)
    assert "step 20: " in message and "step 10: no commit marker commit_success.txt" in message
    assert _step_dirs(tmp_path) == ["10", "20"]  # nothing moved when nothing restores


def test_interrupted_save_leftover_is_ignored(tmp_path, caplog):
    old, new = _small_state(10), _small_state(30)
    with Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
        ckpt.save(10, old, data_state={"position": 10}, config=CONFIG)
    # What a save killed half-way leaves behind: a tmp step directory whose items
    # are still tmp directories and that has no commit marker.
    leftover = tmp_path / "30.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "10", leftover)
    (leftover / "commit_success.txt").unlink()
    (leftover / "state").rename(leftover / "state.orbax-checkpoint-tmp")

    with (
        caplog.at_level(logging.WARNING, logger="train.checkpoint"),
        Checkpointer(tmp_path, save_interval_steps=10) as ckpt,
    ):
        assert ckpt.latest_step() == 10
        step, restored, _, _ = ckpt.restore(_abstract(old))
        assert step == 10
        _assert_trees_equal(restored, old)
        assert "unreadable" not in caplog.text
        assert "30.orbax-checkpoint-tmp" in caplog.text
        assert _step_dirs(tmp_path) == ["10", "30.orbax-checkpoint-tmp"]

        assert ckpt.save(30, new, data_state={"position": 30}, config=CONFIG)
        step, restored, data_state, _ = ckpt.restore(_abstract(old))
    assert (step, data_state) == (30, {"position": 30})
    _assert_trees_equal(restored, new)
    assert _step_dirs(tmp_path) == ["10", "30"]


def test_no_checkpoint_returns_none(tmp_path):
    with Checkpointer(tmp_path / "fresh") as ckpt:
        assert ckpt.restore(_abstract(_small_state(0))) is None
        assert ckpt.latest_step() is None and ckpt.all_steps() == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            "shape",
            r"state leaf \['params'\]\['w'\] has shape \(8, 4\) float32 in the checkpoint "
            r"at step 0 .* expects shape \(16, 4\) float32",
        ),
        ("dtype", r"\['params'\]\['w'\] has shape \(8, 4\) float32 .* expects shape \(8, 4\) bfloat16"),
        ("extra_leaf", r"state leaf \['params'\]\['extra'\] \(shape \(3,\) int32\) is in abstract_state"),
    ],
)
def test_mismatched_abstract_state_names_the_leaf(tmp_path, change, expected):
    state = {"params": {"b": jnp.zeros(4), "w": jnp.ones((8, 4))}}
    abstract = _abstract(state)
    sharding = abstract["params"]["w"].sharding
    if change == "shape":
        abstract["params"]["w"] = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding)
    elif change == "dtype":
        abstract["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=sharding)
    else:
        abstract["params"]["extra"] = jax.ShapeDtypeStruct((3,), jnp.int32, sharding=sharding)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, state, data_state=DATA, config=CONFIG)
        with pytest.raises(CheckpointMismatchError, match=expected):
            ckpt.restore(abstract)
        assert ckpt.all_steps() == [0]  # a caller's mistake does not move a checkpoint
    assert _step_dirs(tmp_path) == ["0"]


def test_abstract_state_needs_fitting_shardings(tmp_path, mesh):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"leaf \['w'\] has no sharding"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)})
        bad = jax.ShapeDtypeStruct((6, 4), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        with pytest.raises(ValueError, match=r"leaf \['w'\]: sharding does not fit shape \(6, 4\)"):
            ckpt.restore({"w": bad})
    assert not os.listdir(tmp_path)


def _array_chunks(step_dir):
    """The files that hold array bytes (orbax's OCDBT data files), largest first."""
    chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert chunks, sorted(str(p) for p in (step_dir / "state").rglob("*"))
    return sorted(chunks, key=lambda p: -p.stat().st_size)


@pytest.mark.parametrize("async_save", [False, True])
def test_every_committed_step_gets_a_manifest_of_its_files(tmp_path, async_save):
    with Checkpointer(tmp_path, save_interval_steps=10, async_save=async_save) as ckpt:
        ckpt.save(10, _small_state(10), data_state=DATA, config=CONFIG)
        ckpt.save(20, _small_state(20), data_state=DATA, config=CONFIG)
    for step in ("10", "20"):
        listed = json.loads((tmp_path / step / MANIFEST).read_text())["files"]
        on_disk = sorted(str(p.relative_to(tmp_path / step)) for p in (tmp_path / step).rglob("*")
                         if p.is_file() and p.name != MANIFEST)
        assert sorted(listed) == on_disk and len(listed) > 5
        assert checkpoint_lib.verify_manifest(tmp_path / step) is None


def _large_state(seed):
    """Big enough that orbax stores the array out of line, compressed, with no checksum."""
    return {"w": _normal(seed, (256, 256)), "step": jnp.int32(seed)}


def test_a_flipped_byte_in_an_array_chunk_falls_back_to_the_previous_step(tmp_path, caplog):
    old, new = _large_state(10), _large_state(20)
    with Checkpointer(tmp_path / "run", save_interval_steps=10) as ckpt:
        ckpt.save(10, old, data_state={"position": 10}, config=CONFIG)
        ckpt.save(20, new, data_state={"position": 20}, config=CONFIG)
    chunk = _array_chunks(tmp_path / "run" / "20")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))

    # What orbax alone does with it: restores step 20 with wrong numbers and no error.
    shutil.copytree(tmp_path / "run", tmp_path / "unchecked")
    (tmp_path / "unchecked" / "20" / MANIFEST).unlink()
    with Checkpointer(tmp_path / "unchecked") as ckpt:
        step, silently_wrong, _, _ = ckpt.restore(_abstract(old))
    assert step == 20 and not np.array_equal(np.asarray(silently_wrong["w"]), np.asarray(new["w"]))

    with (
        caplog.at_level(logging.WARNING, logger="train.checkpoint"),
        Checkpointer(tmp_path / "run", save_interval_steps=10) as ckpt,
    ):
        step, restored, data_state, _ = ckpt.restore(_abstract(old))
    assert (step, data_state) == (10, {"position": 10})
    _assert_trees_equal(restored, old)
    assert f"does not match its SHA-256 in {MANIFEST}" in caplog.text
    moved = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("corrupt.step_20.")]
    assert len(moved) == 1 and not (tmp_path / "run" / "20").exists()


@pytest.mark.parametrize("failures", [1, checkpoint_lib.READ_ATTEMPTS])
def test_a_transient_read_error_is_retried_and_never_moves_a_good_step(tmp_path, monkeypatch, failures):
    old, new = _small_state(10), _small_state(20)
    with Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
        ckpt.save(10, old, data_state={"position": 10}, config=CONFIG)
        ckpt.save(20, new, data_state={"position": 20}, config=CONFIG)
    real_sha256, calls = manifest_lib.sha256_file, {"n": 0}

    def flaky_sha256(path):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise OSError(5, "Input/output error", path)
        return real_sha256(path)

    monkeypatch.setattr(manifest_lib, "sha256_file", flaky_sha256)
    monkeypatch.setattr(manifest_lib, "RETRY_DELAY_S", 0.0)
    with Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
        if failures < checkpoint_lib.READ_ATTEMPTS:
            step, restored, _, _ = ckpt.restore(_abstract(old))
            assert step == 20
            _assert_trees_equal(restored, new)
        else:
            with pytest.raises(CheckpointReadError, match="failed 3 times .* not corruption"):
                ckpt.restore(_abstract(old))
    assert _step_dirs(tmp_path) == ["10", "20"]  # nothing renamed either way
