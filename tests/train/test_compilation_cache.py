"""`train.compilation_cache`: which directory a config value names, the programs a process loads
from the cache instead of compiling, and a restarted trainer (a fresh process) that compiles
nothing its first run compiled."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.loader import load_config
from train import compilation_cache, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_resolve_auto_none_and_paths(monkeypatch, tmp_path):
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
    assert compilation_cache.resolve("auto") == str(tmp_path / "env")
    monkeypatch.setenv(compilation_cache.ENV, "none")
    assert compilation_cache.resolve("auto") is None
    monkeypatch.delenv(compilation_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.resolve("auto") == str(tmp_path / "xdg" / "lmlab" / "jax_cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation_cache.resolve("auto") == str(tmp_path / "home" / ".cache" / "lmlab" / "jax_cache")
    for off in ("", "none", "None", " NONE "):
        assert compilation_cache.resolve(off) is None
    assert compilation_cache.resolve("~/c") == str(tmp_path / "home" / "c")
    monkeypatch.chdir(tmp_path)
    assert compilation_cache.resolve("rel/dir") == str(tmp_path / "rel" / "dir")


def test_the_suite_runs_with_the_cache_off():
    assert compilation_cache.resolve("auto") is None  # tests/conftest.py


def test_a_file_is_refused_before_any_work(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [f"train.compilation_cache_dir={path}"])
    with pytest.raises(ValueError, match=r"`train.compilation_cache_dir`=.* is a file, not a directory"):
        validate.check(config, str(tmp_path / "workdir"))


def test_enabled_cache_is_written_and_answers_a_recompile(tmp_path):
    """In one process: with the cache on, a new program is written to the directory; after
    jax.clear_caches (what a new process starts with) the same program is a cache hit, not a
    compilation; `enable("none")` turns it off again."""
    cache = tmp_path / "cache"
    try:
        assert compilation_cache.enable(str(cache)) == str(cache)

        def program(x):
            return jnp.cumsum(jnp.sin(x) * 3.25, axis=0)  # a program no other test compiles

        x = np.ones((7, 5), np.float32)  # a host array: no other program to compile
        with compilation_cache.CompileCounter() as cold:
            jax.jit(program)(x).block_until_ready()
        assert cold.compiled == 1 and cold.cache_hits == 0
        entries = os.listdir(cache)
        assert any(e.startswith("jit_program") for e in entries), entries
        jax.clear_caches()
        with compilation_cache.CompileCounter() as warm:
            jax.jit(program)(x).block_until_ready()
        assert warm.compiled == 0 and warm.cache_hits == 1
    finally:
        assert compilation_cache.enable("none") is None
    assert jax.config.jax_compilation_cache_dir is None


def _train(workdir, cache, *extra):
    """`python -m train` for one step of configs/gpt.py:tiny in a fresh process; its summary."""
    overrides = ["steps=1", "schedule.warmup_steps=0", f"train.compilation_cache_dir={cache}",
                 "eval.max_batches=1", "eval.num_samples=0", "logging.progress_bar=false",
                 "logging.peak_flops=1e11", "checkpoint.async_save=false", *extra]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "train", "--config=configs/gpt.py:tiny", f"--workdir={workdir}",
                          *(f"--config.{o}" for o in overrides)], check=False, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f), out.stdout


def test_a_restarted_trainer_loads_its_programs_from_the_cache(tmp_path):
    """Two fresh processes train the same one-step run (the second reuses the first's tokenizer and
    data): the first writes its programs to the cache directory, the second compiles none of them
    by its first step and loads as many from the cache as the first compiled."""
    cache = tmp_path / "cache"
    first, _ = _train(tmp_path / "run1", cache, "tokenizer.vocab_size=300")
    entries = os.listdir(cache)
    assert first["startup"]["compilation_cache_hits"] == 0 and first["startup"]["programs_compiled"] >= 2
    assert len([e for e in entries if e.endswith("-cache")]) >= first["startup"]["programs_compiled"]
    second, stdout = _train(tmp_path / "run2", cache, f"tokenizer.path={tmp_path / 'run1' / 'tokenizer'}",
                            f"data.data_dir={tmp_path / 'run1' / 'tfds'}")
    assert second["startup"]["programs_compiled"] == 0, second["startup"]
    assert second["startup"]["compilation_cache_hits"] == first["startup"]["programs_compiled"]
    assert f"loaded from the compilation cache ({cache})" in stdout
    assert second["val_loss"] == pytest.approx(first["val_loss"], abs=0.0)  # the same programs, the same numbers
