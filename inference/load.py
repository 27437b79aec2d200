"""A model, its params and its tokenizer from a checkpoint path, for `python -m inference`.

Two kinds of path:
  * a `python -m train` workdir: `config.json` (the resolved run config), the orbax
    checkpoints `checkpoints/<step>/state` (train/checkpoint.py) and the tokenizer, trained
    into `tokenizer/` or named by the config's `tokenizer.path`;
  * a Hugging Face model directory: `config.json` + `model.safetensors` (or sharded, with
    its index) read by `models.hf.load_pretrained`, and its `tokenizer.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from data.tokenizer import Tokenizer, load_tokenizer
from models.gpt import GPT

WORKDIR_CHECKPOINTS = "checkpoints"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclasses.dataclass
class Loaded:
    """What a path held: the model, its params, its tokenizer, and a line saying where from."""

    model: GPT
    params: Any
    tokenizer: Tokenizer
    source: str


def is_workdir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, WORKDIR_CHECKPOINTS))


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in HF_WEIGHTS)


def load(path: str, *, step: int | None = None) -> Loaded:
    """Loads a `python -m train` workdir or a Hugging Face directory.

    Args:
      path: the directory.
      step: the workdir checkpoint to read (None: the latest committed one).

    Returns:
      A `Loaded` with a decoder-only `GPT`.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path!r} is not a directory; expected a `python -m train` "
                                "workdir or a Hugging Face model directory")
    if is_workdir(path):
        return _load_workdir(path, step)
    if step is not None:
        raise ValueError(f"step={step} applies to a `python -m train` workdir; {path!r} is not one")
    if is_hf_dir(path):
        return _load_hf(path)
    found = sorted(os.listdir(path))[:10]
    raise ValueError(f"{path!r} is neither a `python -m train` workdir (config.json + {WORKDIR_CHECKPOINTS}/) nor a "
                     f"Hugging Face model directory (config.json + {' or '.join(HF_WEIGHTS)}); it holds {found}")


def committed_steps(workdir: str) -> list[int]:
    """The steps of a workdir whose checkpoint was committed, oldest first."""
    from train.checkpoint import COMMIT_MARKER

    root = os.path.join(workdir, WORKDIR_CHECKPOINTS)
    return sorted(int(d) for d in os.listdir(root)
                  if d.isdigit() and os.path.isfile(os.path.join(root, d, COMMIT_MARKER)))


def _load_workdir(workdir: str, step: int | None) -> Loaded:
    import orbax.checkpoint as ocp

    from train import build

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    tokenizer_path = config.tokenizer.path or os.path.join(workdir, "tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    model = build.model(config, tokenizer.vocab_size)
    if not isinstance(model, GPT):
        raise TypeError(f"{workdir!r} trained model.family={config.model.family!r}, a masked LM: it does not "
                         "generate text; use a decoder family (gpt, llama, qwen, moe, deepseek)")
    steps = committed_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir!r} holds no committed checkpoint under {WORKDIR_CHECKPOINTS}/")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step}; it holds steps {steps}")
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, WORKDIR_CHECKPOINTS, str(step), "state"))
    return Loaded(model, state["params"], tokenizer, f"workdir {workdir}, step {step}")


def _load_hf(directory: str) -> Loaded:
    from models import hf

    model, params = hf.load_pretrained(directory)
    if not isinstance(model, GPT):
        raise TypeError(f"{directory!r} holds a {type(model).__name__}, not a causal LM: it does not generate text")
    try:
        tokenizer = load_tokenizer(directory)
    except ValueError as e:
        raise ValueError(f"{directory!r} has the model but no tokenizer (expected tokenizer.json): {e}") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {directory!r} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={model.config.vocab_size}")
    return Loaded(model, params, tokenizer, f"Hugging Face directory {directory}")
