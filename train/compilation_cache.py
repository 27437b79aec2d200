"""JAX's persistent compilation cache: compiled programs kept on disk, so a restarted run loads
its train, eval and init steps instead of compiling them again (`enable`, from the top of
`train.trainer.setup`).

    config.train.compilation_cache_dir = "auto"   $LMLAB_COMPILATION_CACHE_DIR if set, else
                                                  $XDG_CACHE_HOME/lmlab/jax_cache (~/.cache/lmlab/jax_cache)
                                       = PATH     that directory
                                       = "" | "none"   off (also as the environment variable's value)

Every program is cached, however short its compilation (`jax_persistent_cache_min_compile_time_secs`
= 0): a run's start-up is its big steps plus many small programs. An entry is keyed by a hash of
the program, its compile options, the devices and the jax / jaxlib versions, so a stale entry
is never used: a changed model or another machine simply misses.

Multi-host: every process reads the cache; JAX writes entries from process 0 only
(`jax._src.compiler._cache_write`), each entry one file written whole. A directory on a
filesystem all hosts share serves them all; a host-local one serves process 0's host (the
others compile as before). The cache is trusted code: never point it at a directory others
may write to.

`CompileCounter` counts the programs a process compiles and the ones it loaded from the cache
(jax.monitoring events); the trainer reports both at its first step.
"""

from __future__ import annotations

import os
from typing import Self

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

ENV = "LMLAB_COMPILATION_CACHE_DIR"
OFF = ("", "none")
# jax.monitoring events: one per compilation request (a cache hit included), one per cache hit.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
HIT_EVENT = "/jax/compilation_cache/cache_hits"

_enabled: str | None = None  # the directory `enable` set, if any


def resolve(value: str) -> str | None:
    """The cache directory a `train.compilation_cache_dir` value names (module docstring), or
    None when it is off."""
    if value == "auto":
        value = os.environ.get(ENV)
        if value is None:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            value = os.path.join(base, "lmlab", "jax_cache")
    if value.strip().lower() in OFF:
        return None
    return os.path.abspath(os.path.expanduser(value))


def check(value: str) -> None:
    """ValueError (one line naming the key) if the directory cannot be a cache: a file is there."""
    path = resolve(value)
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"config key `train.compilation_cache_dir`={value!r}: {path} is a file, not a directory; "
                         "give a directory, or \"none\" to turn the compilation cache off")


def enable(value: str) -> str | None:
    """Points JAX's persistent compilation cache at the directory `value` names (or turns off a
    cache this module turned on); call before anything compiles. Returns the directory or None."""
    global _enabled
    check(value)
    path = resolve(value)
    if path == _enabled:
        return path
    if path is None:
        if _enabled is not None and jax.config.jax_compilation_cache_dir == _enabled:
            jax.config.update("jax_compilation_cache_dir", None)
            jax_cache.reset_cache()
        _enabled = None
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # A cache JAX opened earlier in this process (another directory) would stay in use.
    jax_cache.reset_cache()
    _enabled = path
    return path


class CompileCounter:
    """Counts, from its creation until `close`, this process's compilation requests and how many
    the persistent cache answered; `compiled` is the programs XLA actually compiled."""

    def __init__(self):
        self.requests = 0
        self.cache_hits = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT:
            self.requests += 1

    def _on_event(self, event: str, **_) -> None:
        if event == HIT_EVENT:
            self.cache_hits += 1

    @property
    def compiled(self) -> int:
        return self.requests - self.cache_hits

    def counts(self) -> dict[str, int]:
        """{"programs_compiled", "compilation_cache_hits"} so far."""
        return {"programs_compiled": self.compiled, "compilation_cache_hits": self.cache_hits}

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
