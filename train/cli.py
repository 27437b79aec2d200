"""What every lmlab command does alike: one-line errors, library logs behind `--verbose`.

    if __name__ == "__main__":
        cli.run(main)                      # in place of absl's app.run(main)

A failure prints one line `error: ...` on stderr and exits 1, with no traceback; `--verbose`
(or the environment variable LMLAB_DEBUG=1) shows the traceback and the libraries' INFO logs
(orbax, absl, jax, tfds). Without it the libraries say only what is an ERROR, and lmlab's own
warnings print as `warning: ...` lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

DEBUG_ENV = "LMLAB_DEBUG"
# Our packages: their log records and Python warnings are for the user.
OWN_PACKAGES = ("train", "inference", "sharding", "data", "configs", "models", "evals", "benchmarks", "rag", "agents",
                "compress", "safety", "annotate", "launch")
# Libraries whose INFO and WARNING lines are diagnostics for developers, not answers for the user.
LIBRARY_LOGGERS = ("absl", "jax", "jaxlib", "orbax", "tensorflow_datasets", "etils", "grain", "tensorstore",
                   "matplotlib", "PIL", "urllib3", "filelock", "fsspec")
# Exceptions that carry a message written for the user: printed as they are.
USER_ERRORS = (ValueError, TypeError, LookupError, OSError, app.UsageError, FloatingPointError)


def wants_debug(argv: Sequence[str]) -> bool:
    """Whether `--verbose` is among `argv` or LMLAB_DEBUG is set (to anything but "" or "0")."""
    verbose = False
    for arg in argv[1:]:
        if arg in ("--verbose", "--verbose=true", "--verbose=1", "--verbose=True"):
            verbose = True
        elif arg in ("--noverbose", "--verbose=false", "--verbose=0", "--verbose=False"):
            verbose = False
    return verbose or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The error as one line `error: ...`: its message with whitespace runs collapsed; an
    unexpected kind of error (a bug, not bad input) names its type and how to see more."""
    text = re.sub(r"\s+", " ", str(error)).strip()
    if text.startswith("error: "):
        text = text[len("error: "):]
    ours = type(error).__module__.split(".")[0] in OWN_PACKAGES  # e.g. CheckpointUnreadableError
    if (ours or isinstance(error, USER_ERRORS)) and text:
        return f"error: {text}"
    return (f"error: {type(error).__name__}: {text or 'no message'} (unexpected; rerun with --verbose or "
            f"{DEBUG_ENV}=1 for the traceback)")


def quiet_libraries(verbose: bool) -> None:
    """Library logs at INFO (verbose) or ERROR only; lmlab's warnings as plain `warning: ...` lines."""
    if verbose:
        absl_logging.set_verbosity(absl_logging.INFO)
        return
    absl_logging.set_verbosity(absl_logging.WARNING)  # root: WARNING
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    for name in OWN_PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.handlers = [handler]
        logger.propagate = False
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=rf"({'|'.join(OWN_PACKAGES)})(\.|$)")


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None, *,
        prepare: Callable[[], object] | None = None) -> None:
    """Runs `main(argv)` under absl's flag parsing, with one-line errors (see the module doc).

    Args:
      main: the command, called with the arguments absl leaves unparsed.
      argv: the command line (default sys.argv).
      prepare: called first, before flags are parsed (e.g. to set XLA_FLAGS before jax
        starts); its errors are one line too.
    """
    argv = list(sys.argv if argv is None else argv)
    verbose = wants_debug(argv)
    if prepare is not None:
        _guard(prepare, verbose)
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, f"Show tracebacks and the libraries' INFO logs (also: {DEBUG_ENV}=1).")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    if not verbose:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    def guarded(args):
        quiet_libraries(verbose)  # after flag parsing: absl resets the levels while it parses
        return _guard(lambda: main(args), verbose)

    app.run(guarded, argv=argv, flags_parser=lambda a: _parse_flags(a, verbose))


def _guard(fn: Callable[[], object], verbose: bool):
    """fn(), any exception but an exit as one line `error: ...` (re-raised when verbose)."""
    try:
        return fn()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one line unless debugging
        if verbose:
            raise
        sys.exit(one_line(e))


def _parse_flags(argv: list[str], verbose: bool) -> list[str]:
    """absl's parsing, a bad flag as one line (absl prints two and a usage hint)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if verbose:
            raise
        text = re.sub(r"\s+", " ", str(e)).strip()
        sys.exit(f"error: {text}; see --helpshort for the flags")
