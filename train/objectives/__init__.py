"""The objectives a run can train with, by name (`config.objective`): `get(config, model, tokenizer)`.

    objective = train.objectives.get(config, model, tokenizer)   # "" -> lm, or mlm for bert

`OBJECTIVES` maps a name to its factory `make(config, model, tokenizer) -> Objective` (see
`train.objectives.base`). A module of this package registers its objective with one line,
the decorator on its factory:

    @register("sft")
    def make(config, model, tokenizer): ...

and every module of the package is imported (registered) with it, so a new objective is a
new file and nothing else. An objective that reads its own data also registers
`check(config, workdir)` (its keys and data files, before any work; `train.validate`) and
`prepare(config, workdir, data_cfg) -> tokenizer` (the lead writes shared files first, then
every process builds the tokenizer; `train.trainer`):

    @register("dpo", check=check_config, prepare=prepare_data)
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

OBJECTIVES: dict[str, Callable] = {}
CHECKS: dict[str, Callable] = {}  # name -> check(config, workdir): the objective's own data and keys
PREPARES: dict[str, Callable] = {}  # name -> prepare(config, workdir, data_cfg) -> tokenizer


def register(name: str, *, check: Callable | None = None,
             prepare: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorator: registers `make(config, model, tokenizer) -> Objective` under `name`, with the
    objective's own config/data `check` and data `prepare` if it reads data of its own."""

    def add(make: Callable) -> Callable:
        if name in OBJECTIVES and OBJECTIVES[name] is not make:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = make
        if check is not None:
            CHECKS[name] = check
        if prepare is not None:
            PREPARES[name] = prepare
        return make

    return add


def name_of(config) -> str:
    """The run's objective: `config.objective`, or by default lm (decoders) / mlm (bert)."""
    return config.objective or ("mlm" if config.model.family == "bert" else "lm")


def check_name(config) -> str:
    """The objective's name; ValueError (one line naming the key) if it is not registered."""
    name = name_of(config)
    if name not in OBJECTIVES:
        raise ValueError(f"config key `objective`={config.objective!r}; expected one of {tuple(sorted(OBJECTIVES))} "
                         "(or empty: lm for the decoders, mlm for bert)")
    return name


def get(config, model, tokenizer):
    """The objective of `config` bound to `model` (and the tokenizer, for what it needs of it)."""
    return OBJECTIVES[check_name(config)](config, model, tokenizer)


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
