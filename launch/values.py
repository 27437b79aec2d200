"""The kinds of value a launch template takes, each checked before anything is rendered.

A template names its values (`launch.catalog`); `--set key=value` gives them as text. Each kind
turns that text into what the template needs, or raises `LaunchError` with one line naming the
value, what was wrong and what would be right:

    positive_int   node, process and GPU counts: 1, 2, ...   (count: 0 allowed)
    port           1-65535
    dns_label      Kubernetes object names (RFC 1035 labels, as Service names must be: a-z first, at most 63)
    image          container image references (registry/name:tag or @sha256:...)
    slurm_time     SLURM --time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)
    abs_path       absolute paths on the cluster's (shared) storage
    word           one shell word without spaces (a command, a config FILE.py:PRESET, a size)
    flags          space-separated --name[=value] flags, split like a shell (quotes group)

Strings reach a shell script through `shlex.quote` and a YAML manifest as JSON strings, so a
value cannot break out of its place whatever characters it holds.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import Any

Check = Callable[[str, str], Any]  # (value name, text) -> value


class LaunchError(ValueError):
    """A template or a value is wrong; the message names it and what would be right."""


def positive_int(name: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < 1:
        raise LaunchError(f"{name}={text!r} must be a positive integer (1, 2, ...)")
    return int(text)


def count(name: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()):
        raise LaunchError(f"{name}={text!r} must be a non-negative integer (0, 1, ...)")
    return int(text)


def port(name: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or not 0 < int(text) < 65536:
        raise LaunchError(f"{name}={text!r} must be a TCP port, 1-65535")
    return int(text)


def dns_label(name: str, text: str) -> str:
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", text) or len(text) > 63:
        raise LaunchError(f"{name}={text!r} must be a Kubernetes name: lower-case letters, digits and '-', "
                          "starting with a letter and ending with a letter or digit, at most 63 characters "
                          "(e.g. lmlab-train)")
    return text


# A Docker reference: [registry[:port]/]path[:tag][@digest] (distribution/reference's grammar, simplified).
_IMAGE = re.compile(r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")


def image(name: str, text: str) -> str:
    if not _IMAGE.fullmatch(text):
        raise LaunchError(f"{name}={text!r} is not a container image reference; write REGISTRY/NAME:TAG, e.g. "
                          "ghcr.io/me/lmlab:0.1.0 or flink:1.20")
    return text


_SLURM_TIME = re.compile(r"[0-9]+(:[0-5]?[0-9]){0,2}|[0-9]+-[0-9]{1,2}(:[0-5]?[0-9]){0,2}")


def slurm_time(name: str, text: str) -> str:
    if not _SLURM_TIME.fullmatch(text):
        raise LaunchError(f"{name}={text!r} is not a SLURM time limit; write MINUTES, HH:MM:SS or DAYS-HH:MM:SS "
                          "(e.g. 24:00:00 or 2-00:00:00)")
    return text


def abs_path(name: str, text: str) -> str:
    if not text.startswith("/") or "\n" in text:
        raise LaunchError(f"{name}={text!r} must be an absolute path (on storage every node shares), e.g. "
                          "/shared/runs/llama")
    return text.rstrip("/") or "/"


def word(name: str, text: str) -> str:
    if not text or re.search(r"\s", text):
        raise LaunchError(f"{name}={text!r} must be one word, non-empty and without spaces")
    return text


def optional(check: Check) -> Check:
    """The check, or "" for a value left empty (the template then leaves its line out)."""

    def checked(name: str, text: str):
        return check(name, text) if text else ""

    return checked


def flags(name: str, text: str) -> list[str]:
    """Space-separated `--name[=value]` flags, split as a shell would (quotes group words)."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise LaunchError(f"{name}={text!r} cannot be split into flags: {e}") from e
    bad = [w for w in words if not re.match(r"--[A-Za-z_][\w.-]*(=|$)", w)]
    if bad:
        raise LaunchError(f"{name} holds {bad[0]!r}, which is not a --name or --name=value flag; separate flags "
                          "with spaces and quote a value that holds spaces")
    return words


def config_flags(name: str, text: str) -> list[str]:
    """`flags` that are `--config.KEY=VALUE` overrides of `python -m train`."""
    words = flags(name, text)
    bad = [w for w in words if not w.startswith("--config.")]
    if bad:
        raise LaunchError(f"{name} holds {bad[0]!r}; it takes config overrides --config.KEY=VALUE (the other flags "
                          "of python -m train are values of their own)")
    return words
