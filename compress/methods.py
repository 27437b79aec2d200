"""The compression methods by name: one registry that `python -m compress`, the benchmark and
the colab all read.

A method turns a trained model into a compressed one:

    @register("rtn", kind="quantize", options={"format": "int4", "group": "128"})
    def rtn(source: Source, calibration, options) -> Compressed: ...

`source` is the model as loaded (its module, float params, run config, tokenizer); `calibration`
is None for methods that need no data, else a list of int32 token batches [B, T] drawn from the
run's training data (`needs_calibration=True`); `options` holds every declared option, each
given as a string on the command line and parsed by the method (defaults filled in, unknown
keys refused by `parse_options` before any work).

The result holds the new params (QuantizedTensor leaves where quantized, masked or smaller
arrays where pruned), the run config of the new model (a copy; structural pruning changes its
sizes, and `config.compress` records the method and its options so that a loader can rebuild
the stored tree) and `info`, the method's own measurements (bits per weight, sparsity,
reconstruction errors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

KINDS = ("quantize", "prune")


@dataclasses.dataclass
class Source:
    """A trained model as loaded: `model` (a `models.gpt.GPT` or `models.bert` module), its float
    `params` (unboxed), the run `config` it was built from, and its `tokenizer`."""

    model: Any
    params: Any
    config: ml_collections.ConfigDict
    tokenizer: Any = None


@dataclasses.dataclass
class Compressed:
    """A method's output: the new `params`, the new run `config` and the method's `info`."""

    params: Any
    config: ml_collections.ConfigDict
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[Source, Sequence[Any] | None, Mapping[str, str]], Compressed]
    kind: str
    options: Mapping[str, str]  # name -> default, as a string
    needs_calibration: bool = False
    families: tuple[str, ...] = ("gpt", "llama", "qwen", "moe", "deepseek", "bert")
    doc: str = ""


METHODS: dict[str, Method] = {}


def register(name: str, *, kind: str, options: Mapping[str, str] | None = None, needs_calibration: bool = False,
             families: Sequence[str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: registers `fn(source, calibration, options) -> Compressed` under `name`."""
    if kind not in KINDS:
        raise ValueError(f"method {name!r}: kind {kind!r} is not one of {KINDS}")

    def add(fn: Callable) -> Callable:
        if name in METHODS and METHODS[name].fn is not fn:
            raise ValueError(f"compression method {name!r} is registered twice")
        kwargs = {} if families is None else {"families": tuple(families)}
        METHODS[name] = Method(name=name, fn=fn, kind=kind, options=dict(options or {}),
                               needs_calibration=needs_calibration, doc=(fn.__doc__ or "").strip().split("\n")[0],
                               **kwargs)
        return fn

    return add


def get(name: str) -> Method:
    """The method registered as `name`; ValueError (one line) listing the others otherwise."""
    _import_all()
    if name not in METHODS:
        raise ValueError(f"--method={name!r} is not a compression method; expected one of {tuple(sorted(METHODS))}")
    return METHODS[name]


def parse_options(method: Method, given: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """The method's options: its defaults overridden by `given` ({key: value} or ["key=value", ...]).

    Raises ValueError (one line) for a malformed item or a key the method does not declare."""
    items: dict[str, str] = {}
    if isinstance(given, Mapping):
        items = {str(k): str(v) for k, v in given.items()}
    else:
        for item in given or ():
            key, sep, value = str(item).partition("=")
            if not sep or not key:
                raise ValueError(f"--option={item!r} is not key=value; e.g. --option=bits=4")
            items[key.strip()] = value.strip()
    unknown = sorted(set(items) - set(method.options))
    if unknown:
        raise ValueError(f"--method={method.name} has no option {unknown[0]!r}; its options are "
                         f"{dict(method.options) or 'none'}")
    return {**method.options, **items}


def family_of(config: ml_collections.ConfigDict) -> str:
    return str(config.model.get("family", "gpt")) if "model" in config else "gpt"


def check(name: str, config: ml_collections.ConfigDict, options: Mapping[str, str] | Sequence[str] | None,
          *, calibration: bool) -> tuple[Method, dict[str, str]]:
    """(the method, its parsed options) if method `name` applies to a model of run `config` with
    or without calibration data; ValueError (one line) otherwise. Cheap: no params are read."""
    method = get(name)
    parsed = parse_options(method, options)
    family = family_of(config)
    if family not in method.families:
        raise ValueError(f"--method={name} does not apply to model family {family!r}; it applies to "
                         f"{method.families}")
    if method.needs_calibration and not calibration:
        raise ValueError(f"--method={name} needs calibration data; pass --calibration_samples=N (N > 0)")
    return method, parsed


def apply(name: str, source: Source, *, calibration: Sequence[Any] | None = None,
          options: Mapping[str, str] | Sequence[str] | None = None) -> Compressed:
    """Runs method `name` on `source` (options checked, calibration required where needed)."""
    method, parsed = check(name, source.config, options, calibration=bool(calibration))
    return method.fn(source, calibration if method.needs_calibration else None, parsed)


def _import_all() -> None:
    """Imports every module of the package (each registers its methods)."""
    import importlib
    import pkgutil

    import compress
    for module in pkgutil.iter_modules(compress.__path__):
        if module.name not in ("methods", "__main__"):
            importlib.import_module(f"compress.{module.name}")
