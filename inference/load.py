"""A model, its params and its tokenizer from a checkpoint path, for `python -m inference`.

Two kinds of path:
  * a `python -m train` workdir: the orbax checkpoints `checkpoints/<step>/` with the run
    config saved beside each state (train/checkpoint.py; `config.json` only for a step
    without one) and the tokenizer, trained into `tokenizer/` or named by the config's
    `tokenizer.path`. Only the parameters are read (no optimizer state), checked against
    the step's manifest, onto this process's first device, whatever layout and device
    count the run trained with;
  * a Hugging Face model directory: `config.json` + `model.safetensors` (or sharded, with
    its index) read by `models.hf.load_pretrained`, and its `tokenizer.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from configs import loader
from data.tokenizer import Tokenizer, load_tokenizer
from models.gpt import GPT

WORKDIR_CHECKPOINTS = "checkpoints"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
DTYPES = ("float32", "bfloat16", "float16")  # --dtype: the params' and the computation's dtype


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


def load(path: str, *, step: int | None = None, dtype: str | None = None) -> Loaded:
    """Loads a `python -m train` workdir or a Hugging Face directory.

    Args:
      path: the directory.
      step: the workdir checkpoint to read (None: the latest committed one).
      dtype: the params' and the computation's dtype, one of DTYPES (None: as saved).

    Returns:
      A `Loaded` with a decoder-only `GPT`.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path!r} is not a directory; expected a `python -m train` "
                                "workdir or a Hugging Face model directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if is_workdir(path):
        return _load_workdir(path, step, dtype)
    if step is not None:
        raise ValueError(f"step={step} applies to a `python -m train` workdir; {path!r} is not one")
    if is_hf_dir(path):
        return _load_hf(path, dtype)
    found = sorted(os.listdir(path))[:10]
    raise ValueError(f"{path!r} is neither a `python -m train` workdir (config.json + {WORKDIR_CHECKPOINTS}/) nor a "
                     f"Hugging Face model directory (config.json + {' or '.join(HF_WEIGHTS)}); it holds {found}")


def committed_steps(workdir: str) -> list[int]:
    """The steps of a workdir whose checkpoint was committed, oldest first."""
    from train.checkpoint import COMMIT_MARKER

    root = os.path.join(workdir, WORKDIR_CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root)
                  if d.isdigit() and os.path.isfile(os.path.join(root, d, COMMIT_MARKER)))


def checkpoint_step(workdir: str, step: int | None) -> int:
    """`step` (None: the latest) checked against the workdir's committed checkpoints."""
    steps = committed_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir!r} holds no committed checkpoint under {WORKDIR_CHECKPOINTS}/; train "
                                "until a checkpoint is saved (checkpoint.save_interval_steps), or fix --workdir")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step}; it holds steps {steps}: fix --step")
    return step


def _load_workdir(workdir: str, step: int | None, dtype: str | None) -> Loaded:
    from train import build, init_from

    step = checkpoint_step(workdir, step)
    config = _saved_config(workdir, step)
    if dtype is not None:
        config.model.dtype = config.model.param_dtype = dtype
    tokenizer = init_from.workdir_tokenizer(config, workdir)
    from models import policy_value

    trained = build.model(config, tokenizer.vocab_size)
    # A PPO run generates with its policy alone (without the value head or the separate value model).
    model = policy_value.policy_model(trained) if policy_value.is_decoder(trained) else trained
    if not isinstance(model, GPT):
        raise TypeError(f"{workdir!r} trained model.family={config.model.family!r}, a masked LM: it does not "
                         "generate text; use a decoder family (gpt, llama, qwen, moe, deepseek)")
    _check_generates(model, repr(workdir))
    params = run_params(workdir, step, config, trained)
    if model is not trained:
        params = policy_value.policy_params(params)
    return Loaded(model, params, tokenizer, f"workdir {workdir}, step {step}")


def _check_generates(model: GPT, where: str) -> None:
    """A decoder under a score head alone (a reward model) scores text; it has no LM head."""
    if model.config.head == "score":
        raise TypeError(f"{where} holds a reward model (a score head, no LM head): it scores text, it does not "
                        "generate; score with train.reward_model.RewardModel")


def run_params(workdir: str, step: int, config: ml_collections.ConfigDict, model, abstract=None):
    """The whole params of checkpoint `step` of a run: what trained (`params`) and, for a
    fine-tuning run, what stayed frozen (`frozen`, `train.trainable`), combined; a QLoRA base
    is read as stored (quantized) and dequantized; a `python -m compress` output's quantized
    kernels are read as stored and stay quantized (QuantizedTensor leaves: the layers
    dequantize them inside the jitted step).

    Args:
      workdir: the run's workdir.
      step: a committed step.
      config: the run config that trained it (its `finetune` keys say what is where).
      model: the model `train.build.model` makes of `config`.
      abstract: the params' ShapeDtypeStructs with the shardings to restore into; None: on this
        process's first device (`_abstract_params`). A quantized base is read onto this
        process's first device (it is small) and dequantized into its leaves' shardings.

    Returns:
      The params tree of `model`, unboxed.
    """
    import jax

    from train import objectives, trainable
    from train.checkpoint import restore_params

    directory = os.path.join(workdir, WORKDIR_CHECKPOINTS)
    abstract = _abstract_params(model) if abstract is None else abstract
    described = quantized_tensors(config)
    if described:  # a `python -m compress` output: restored quantized, as stored (compress/io.py)
        from models import quant

        return restore_params(directory, step, quant.abstract_stored(abstract, described))
    if config.get("finetune", {}).get("method", "full") == "full" and not config.finetune.get("freeze"):
        return restore_params(directory, step, abstract)
    head = getattr(objectives.get(config, model, None), "trainable_head", "")
    trained, frozen = trainable.split(abstract, config, objective_head=head)
    params = restore_params(directory, step, trained)
    if config.finetune.method != "qlora":
        return trainable.combine(params, restore_params(directory, step, frozen, key="frozen"))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = jax.eval_shape(lambda f: trainable.store_frozen(f, config), frozen)
    stored = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), stored)
    values = trainable.combine({}, restore_params(directory, step, stored, key="frozen"))  # dequantized

    def placed(x, like):
        if x.sharding == like.sharding:
            return x
        host = np.asarray(x)  # one tensor at a time, then each device receives its slice
        return jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index])

    return trainable.combine(params, jax.tree_util.tree_map(placed, values, frozen))


def quantized_tensors(config: ml_collections.ConfigDict) -> dict:
    """{path: format record} of a compressed run's quantized kernels (`models.quant.describe`),
    from its config's `compress.tensors`; {} for a float model."""
    section = config.get("compress")
    tensors = section.get("tensors") if section else None
    return tensors.to_dict() if hasattr(tensors, "to_dict") else dict(tensors or {})


def _saved_config(workdir: str, step: int) -> ml_collections.ConfigDict:
    """The run config saved with checkpoint `step` (what trained it), else the workdir's config.json."""
    for path in (os.path.join(workdir, WORKDIR_CHECKPOINTS, str(step), "config", "metadata"),
                 os.path.join(workdir, "config.json")):
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return loader.with_defaults(json.load(f))
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); the run config of step {step} is unreadable") \
                    from None
    raise FileNotFoundError(f"{workdir!r} has no run config for step {step} (checkpoints/{step}/config or "
                            "config.json)")


def _abstract_params(model: GPT):
    """The model's params as ShapeDtypeStructs on this process's first device."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def _load_hf(directory: str, dtype: str | None) -> Loaded:
    from models import hf

    overrides = {"dtype": _jnp_dtype(dtype), "param_dtype": _jnp_dtype(dtype)} if dtype else {}
    model, params = hf.load_pretrained(directory, **overrides)
    if not isinstance(model, GPT):
        raise TypeError(f"{directory!r} holds a {type(model).__name__}, not a causal LM: it does not generate text")
    _check_generates(model, repr(directory))
    if dtype:
        import jax

        params = jax.tree_util.tree_map(lambda x: x.astype(overrides["param_dtype"]), params)
    try:
        tokenizer = load_tokenizer(directory)
    except ValueError as e:
        raise ValueError(f"{directory!r} has the model but no tokenizer (expected tokenizer.json): {e}") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {directory!r} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={model.config.vocab_size}")
    return Loaded(model, params, tokenizer, f"Hugging Face directory {directory}")


def _jnp_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
