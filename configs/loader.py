"""Load a config file with a preset, apply `key=value` overrides, and lock it.

    config = load_config("configs/gpt.py:tiny", ["optimizer.lr=3e-4", "steps=50"])

A key that does not exist, or a value that does not parse as the key's type, raises
`ConfigError` naming the key and the closest valid keys, before anything runs.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
from collections.abc import Iterable

import ml_collections


class ConfigError(ValueError):
    """A bad config file, preset, key or value."""


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat_keys(value, path + "."))
        else:
            out[path] = value
    return out


def _parse(key: str, text: str, current: object) -> object:
    kind = type(current)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return lowered in ("true", "1")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
    except ValueError:
        raise ConfigError(f"config key `{key}` expects {kind.__name__}, got {text!r}") from None
    raise ConfigError(f"config key `{key}` holds a {kind.__name__}, which cannot be set from the command line")


def _suggestions(key: str, keys) -> list[str]:
    """Closest valid keys: siblings with a similar name first, else similar full paths."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    if siblings:
        close = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)
        if close:
            return [siblings[c] for c in close]
    return difflib.get_close_matches(key, keys, n=3, cutoff=0.6)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Sets each `dotted.key=value` in place; values are parsed as the key's current type."""
    keys = _flat_keys(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (for example optimizer.lr=3e-4)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("config."):
            key = key[len("config."):]
        if key not in keys:
            close = _suggestions(key, keys)
            hint = f"; did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ConfigError(f"config key `{key}` does not exist{hint}")
        value = _parse(key, text, keys[key])
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        with node.unlocked():
            node[leaf] = value
        keys[key] = value
    return config


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Reads `FILE.py[:PRESET]` (calls its `get_config(PRESET)`), applies overrides, locks.

    Args:
      spec: a config file path, optionally followed by `:preset`. A `configs/NAME.py` path
        that does not exist from the current directory is read from the installed
        `configs` package (so `python -m train` works from any directory).
      overrides: `dotted.key=value` strings (a leading `config.` is allowed).

    Returns:
      The locked ConfigDict: adding a key later raises too.
    """
    path, _, preset = spec.partition(":")
    if not os.path.isfile(path):
        # `configs/NAME.py` from outside the checkout: the shipped presets, next to this file.
        shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.path.relpath(path, "configs"))
        if os.path.isabs(path) or path.startswith("..") or not path.startswith("configs") or \
                not os.path.isfile(shipped):
            raise ConfigError(f"config file {path!r} does not exist (expected FILE.py[:PRESET], e.g. "
                              "configs/gpt.py:tiny)")
        path = shipped
    module_spec = importlib.util.spec_from_file_location(f"_lmlab_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config() function")
    try:
        config = module.get_config(preset) if preset else module.get_config()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    config = apply_overrides(config, overrides)
    config.lock()
    return config


def split_override_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.KEY=VALUE` arguments from the others (absl sees the others)."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return rest, overrides


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A run config saved by an older lmlab, with the keys added since filled from `configs/base.py`.

    Keys present in `saved` keep their saved values (what trained the run); only keys it lacks (a
    section or switch newer than the checkpoint, such as `train.compilation_cache_dir` or
    `model.loss_chunk_size`) take the defaults, which reproduce the behaviour before they existed.
    """
    from configs import base

    def fill(into: dict, defaults: dict) -> dict:
        for key, value in defaults.items():
            if key not in into:
                into[key] = value
            elif isinstance(value, dict) and isinstance(into[key], dict):
                fill(into[key], value)
        return into

    return ml_collections.ConfigDict(fill(copy.deepcopy(dict(saved)), base.get_config().to_dict()))
