"""What trains and what stays frozen: `split(params, config)` and `combine(trainable, frozen)`.

    trainable, frozen = split(params, config, objective_head=r"^classifier/")
    params = combine(trainable, frozen)          # what the model is applied to

`finetune.method` decides (configs/base.py):
  * full: everything trains except the parameters whose '/'-joined path matches
    `finetune.freeze` (re.search; "" freezes nothing);
  * lora, qlora, prefix, adapter: only the parameters the method added
    (`models.layers.peft.is_peft_path`), those matching `finetune.train`, and the objective's
    task head (`objective_head`, e.g. a classifier) train; the rest is the frozen base.
    qlora stores the frozen base quantized (`store_frozen`, `models.quant`).

The two trees are disjoint nested dicts; the frozen one is data the loss reads, never in the
optimizer state. `combine` dequantizes any frozen leaf that has a `.dequantize()` method.
A regex that matches no parameter, or a split that leaves nothing to train, is a ValueError
naming the config key and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from models.layers.peft import is_peft_path

METHODS = ("full", "lora", "qlora", "prefix", "adapter")
PEFT_METHODS = METHODS[1:]


def paths(params: Mapping, prefix: str = "") -> list[str]:
    """The '/'-joined paths of the leaves of a nested dict of parameters."""
    out = []
    for key, value in params.items():
        path = f"{prefix}{key}"
        out.extend(paths(value, path + "/") if isinstance(value, Mapping) else [path])
    return out


def partition(params: Mapping, trains: Callable[[str], bool], prefix: str = "") -> tuple[dict, dict]:
    """(the leaves whose path `trains`, the others) as two nested dicts without empty branches."""
    trainable, frozen = {}, {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            t, f = partition(value, trains, path + "/")
            if t:
                trainable[key] = t
            if f:
                frozen[key] = f
        elif trains(path):
            trainable[key] = value
        else:
            frozen[key] = value
    return trainable, frozen


def _dequantized(leaf):
    return leaf.dequantize() if hasattr(leaf, "dequantize") else leaf


def combine(trainable: Mapping, frozen: Mapping) -> dict:
    """The whole params tree: `trainable` and `frozen` merged (frozen leaves dequantized).

    With nothing frozen it is `trainable`'s leaves in the same tree, so the model computes
    exactly what it computes on an unsplit tree.
    """
    if not frozen:
        return trainable
    out = dict(trainable)
    for key, value in frozen.items():
        if isinstance(value, Mapping):
            out[key] = combine(out.get(key, {}), value)
        elif key in out:
            raise ValueError(f"parameter {key!r} is both trainable and frozen")
        else:
            out[key] = _dequantized(value)
    return out


def _search(pattern: str, key: str) -> Callable[[str], bool]:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"config key `{key}`={pattern!r} is not a regular expression ({e}); fix it") from None
    return lambda path: compiled.search(path) is not None


def _must_match(pattern: str, key: str, all_paths: list[str]) -> Callable[[str], bool]:
    """The regex of config key `key` as a predicate; ValueError if it matches no parameter."""
    matches = _search(pattern, key)
    if not any(matches(p) for p in all_paths):
        example = ", ".join(all_paths[:3])
        raise ValueError(f"config key `{key}`={pattern!r} matches no parameter; parameter paths are '/'-joined, "
                         f"e.g. {example}: fix the regex or leave it empty")
    return matches


def split(params: Mapping, config, objective_head: str = "") -> tuple[dict, dict]:
    """(trainable, frozen) parameters of a run (see the module docstring).

    Args:
      params: the model's params (nested dicts; leaves boxed, abstract or arrays alike).
      config: the run config (its `finetune` keys).
      objective_head: regex of the objective's task-head paths that train under every PEFT
        method ("": none).

    Returns:
      Two disjoint nested dicts whose `combine` is `params`.
    """
    f = config.finetune
    if f.method not in METHODS:
        raise ValueError(f"config key `finetune.method`={f.method!r}; expected one of {METHODS}")
    all_paths = paths(params)
    if f.method == "full":
        if not f.freeze:
            return dict(params), {}
        frozen = _must_match(f.freeze, "finetune.freeze", all_paths)
        trainable, fixed = partition(params, lambda p: not frozen(p))
        if not trainable:
            raise ValueError(f"config key `finetune.freeze`={f.freeze!r} freezes every parameter: nothing would "
                             "train; narrow the regex")
        return trainable, fixed
    extra = _must_match(f.train, "finetune.train", all_paths) if f.train else (lambda p: False)
    head = _search(objective_head, "objective head") if objective_head else (lambda p: False)
    trainable, frozen = partition(params, lambda p: is_peft_path(p) or extra(p) or head(p))
    if not trainable:
        raise ValueError(f"finetune.method={f.method!r} found no parameter to train: the model has no "
                         f"{f.method} parameters (models.layers.peft) and config key `finetune.train` selects none; "
                         "check the method's keys (e.g. finetune.lora.targets) or set finetune.train")
    return trainable, frozen


def store_frozen(frozen: Any, config, shards: Mapping[str, int] | None = None) -> Any:
    """The frozen parameters as stored: quantized for qlora, as they are otherwise.

    qlora quantizes every `models.quant.quantizable` leaf (`quantize_tree`) and boxes the
    QuantizedTensors' fields with their kernel's logical names (`logically_partitioned`), so the
    layout splits the codes as it splits the kernel; traced inside the jitted init, no kernel
    exists whole in float on one device beyond the init itself.

    Args:
      frozen: the frozen params, boxed with logical names (nn.Partitioned leaves) or plain.
      config: the run config (`finetune.method`, `finetune.qlora.*`).
      shards: logical name -> ways the strategy splits it (`sharding.strategies.model_shards`);
        a quantized field whose last axis that many shards cannot split keeps it whole.

    Returns:
      `frozen`, or its quantized tree (boxed where `frozen` was).
    """
    if config.finetune.method != "qlora" or not frozen:
        return frozen
    from models import quant

    q = config.finetune.qlora
    values = jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, frozen,
                                    is_leaf=lambda x: isinstance(x, nn.Partitioned))
    quantized = quant.quantize_tree(values, kind=q.quant, block_size=q.block_size, double_quant=q.double_quant)
    boxed = any(isinstance(x, nn.Partitioned) for x in
                jax.tree_util.tree_leaves(frozen, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    return quant.logically_partitioned(frozen, quantized, shards) if boxed else quantized


def num_params(tree: Any) -> int:
    """Parameters (elements) in a tree of arrays or shapes."""
    return sum(int(getattr(x, "size", 0)) for x in jax.tree_util.tree_leaves(tree))
