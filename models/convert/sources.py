"""Per-parameter conversion of a Hugging Face checkpoint, one tensor at a time.

A family's converter (models/convert/{llama,gpt2,moe,deepseek,bert}.py) says, for every
leaf of our params, which HF tensors it is made of and how (`Source`): usually one tensor
transposed and reshaped, sometimes a slice of a fused tensor (GPT-2's c_attn, the experts'
gate_up_proj, DeepSeek's kv_b_proj) or a stack of per-expert tensors. With the sources,

    params = materialize(sources, state_dict)                     # all at once (hf_to_params)
    leaf = sources[path].load(reader)                              # or one leaf at a time

so that `train.init_from` can read a checkpoint lazily (`SafetensorsReader` opens the files
with `safetensors.safe_open` and reads a tensor only when asked), convert one leaf and place
it on the devices before reading the next: host memory stays near the largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Source:
    """How one of our parameters is made from HF tensors.

    Attributes:
      reads: the HF tensor names it needs.
      convert: (arrays of `reads`, in order) -> our array (any float dtype; cast by the caller).
      shape: our parameter's shape (checked; None: a size the config does not fix).
    """

    reads: tuple[str, ...]
    convert: Callable[..., np.ndarray]
    shape: tuple[int, ...]

    def load(self, get: Callable[[str], Any], path: Path = ()) -> np.ndarray:
        """Our array, reading the tensors through `get(name)`; shape checked."""
        array = np.asarray(self.convert(*(to_numpy(get(name)) for name in self.reads)))
        if len(array.shape) != len(self.shape) or any(w is not None and w != s for w, s in zip(self.shape,
                                                                                                  array.shape)):
            raise ValueError(f"param {'/'.join(path)} from {', '.join(self.reads)} has shape {array.shape}; "
                             f"expected {tuple(self.shape)}")
        return array


def to_numpy(x) -> np.ndarray:
    """A torch tensor (bfloat16 widened to float32) or array-like as a numpy array."""
    if hasattr(x, "detach"):  # bfloat16 has no numpy dtype
        x = x.detach().cpu()
        x = x.float() if str(x.dtype) == "torch.bfloat16" else x
        return x.numpy()
    return np.asarray(x)


def materialize(sources: Mapping[Path, Source], state_dict: Mapping[str, Any], dtype=None) -> dict:
    """The nested params dict of all `sources`, read from an in-memory state dict."""
    params: dict = {}
    for path, source in sources.items():
        array = source.load(state_dict.__getitem__, path)
        set_path(params, path, array if dtype is None else np.asarray(array, dtype))
    return params


def set_path(tree: dict, path: Path, value) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def stacked(sources: Mapping[Path, Source], groups: Sequence[tuple[str, int, int]]) -> dict[Path, Source]:
    """The sources of the `scan_layers=True` layout (see `models.gpt.scan_params`): each group
    (name, start, stop) of `layer_{i}` leaves becomes one leaf `name/...` stacked on axis 0
    (the `layer_{i}` component may sit under a prefix, as BERT heads' `bert/`)."""

    def layer_at(path):
        return next((k for k, part in enumerate(path) if part.startswith("layer_")), None)

    out = {p: s for p, s in sources.items() if layer_at(p) is None}
    for name, start, stop in groups:
        for path, first in sources.items():
            k = layer_at(path)
            if k is None or path[k] != f"layer_{start}":
                continue
            parts = [sources[(*path[:k], f"layer_{i}", *path[k + 1:])] for i in range(start, stop)]
            offsets = np.cumsum([0] + [len(p.reads) for p in parts])

            def convert(*arrays, parts=parts, offsets=offsets):
                return np.stack([p.convert(*arrays[a:b]) for p, a, b in zip(parts, offsets[:-1], offsets[1:])])

            out[(*path[:k], name, *path[k + 1:])] = Source(tuple(n for p in parts for n in p.reads), convert,
                                                           (stop - start, *first.shape))
    return out


class SafetensorsReader:
    """The tensors of a model directory (`model.safetensors` or the shards of its index),
    opened lazily: `names()` and `shape(name)` read headers only, `get(name)` one tensor.

    Use as a context manager (closes the files)."""

    def __init__(self, directory: str, index: str = "model.safetensors.index.json"):
        from safetensors import safe_open

        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(directory, "model.safetensors")):
            shards = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{directory!r} has neither model.safetensors nor {index} "
                                    "(PyTorch .bin checkpoints: convert them with transformers' save_pretrained)")
        self._files, self._where = [], {}
        for shard in shards:
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"safetensors shard {path} is missing (listed in {index}); download it again")
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
                detail = " ".join(str(e).split())
                raise ValueError(f"safetensors shard {path} is truncated or corrupt ({detail}); download or save "
                                 "it again") from None
            self._files.append(handle)
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                self._where[name] = handle

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        return self._where[name].get_tensor(name)

    __getitem__ = get

    def close(self) -> None:
        for handle in self._files:
            if hasattr(handle, "__exit__"):
                handle.__exit__(None, None, None)
        self._files, self._where = [], {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_reads(sources: Mapping[Path, Source], available: set[str]) -> None:
    """Raises ValueError naming the HF tensors the sources need that the checkpoint lacks."""
    missing = sorted({n for s in sources.values() for n in s.reads} - available)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"the checkpoint lacks tensors {missing[:5]}{more} that its config.json implies")
