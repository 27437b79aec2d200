"""XLA flags set before jax starts: lmlab's chosen CPU defaults and $LMLAB_XLA_FLAGS, added to $XLA_FLAGS.

    from train import xla_flags
    xla_flags.apply()      # first thing in an entry point, before the XLA backend starts
    import jax

The user's $XLA_FLAGS is kept as written and wins: a default whose flag name it already sets
is left out. $LMLAB_XLA_FLAGS (space-separated `--name[=value]`) comes last, so it overrides
both (XLA takes the last value of a repeated flag). Applying twice adds nothing twice.

`DEFAULT_CPU_FLAGS` is empty: none of the XLA CPU options tried for issue 15 made the
trainer's step faster on the 2-core Xeon measured (benchmarks/vs_transformers.py); see the
README's performance notes. A flag goes here only with a measurement that it wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_CPU_FLAGS: tuple[str, ...] = ()
ENV = "LMLAB_XLA_FLAGS"


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def parse(text: str, source: str) -> list[str]:
    """The `--name[=value]` flags of a space-separated string; ValueError naming `source` otherwise."""
    flags = text.split()
    bad = [f for f in flags if not f.startswith("--") or len(_name(f)) < 3]
    if bad:
        raise ValueError(f"${source} holds {bad[0]!r}, which is not an XLA flag; write --name or --name=value, "
                         "separated by spaces")
    return flags


def merged(xla_flags: str, extra: str, defaults: tuple[str, ...] = DEFAULT_CPU_FLAGS) -> str:
    """XLA_FLAGS with `defaults` (those whose names it does not set) and then `extra` added.

    Args:
      xla_flags: the user's $XLA_FLAGS, kept as written.
      extra: $LMLAB_XLA_FLAGS.
      defaults: lmlab's defaults.

    Returns:
      The new $XLA_FLAGS; flags already present verbatim are not added again.
    """
    user = xla_flags.split()
    names = {_name(f) for f in user}
    added = [f for f in defaults if _name(f) not in names] + parse(extra, ENV)
    out = list(user)
    for flag in added:
        if flag not in out:
            out.append(flag)
    return " ".join(out)


def apply(environ: MutableMapping[str, str] | None = None) -> str:
    """Sets $XLA_FLAGS in `environ` (default os.environ) to `merged(...)`; returns it.

    Call before the XLA backend starts (before jax runs anything): XLA reads the flags once.
    """
    environ = os.environ if environ is None else environ
    value = merged(environ.get("XLA_FLAGS", ""), environ.get(ENV, ""))
    if value or "XLA_FLAGS" in environ:
        environ["XLA_FLAGS"] = value
    return value
