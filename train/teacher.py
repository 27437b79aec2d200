"""The frozen teacher of `objective=distill`: its checkpoint, tokenizer, and its weights on the
student's mesh.

    spec = teacher.parse(config.distill.teacher)      # PATH[@STEP] of a workdir, or an HF directory
    model, tokenizer = teacher.checkpoint(spec)       # no weights read
    params = teacher.load_params(spec, model, run.layout)

A teacher is a `python -m train` workdir (`run:`; its latest committed checkpoint, or @STEP) or
a Hugging Face model directory (`hf:`); the prefixes may also be written out. Its parameters
are read as a reward model's are (`train.reward_model`): laid out by their logical names under
the student run's strategy (`sharding.layout.param_shardings`; ZeRO-3 / FSDP split them too)
and read leaf by leaf into those shardings (`train.init_from.load_params`), so the teacher may
have another shape than the student (layers, width, heads) and is never gathered on one device.
It is frozen: never in the optimizer state nor in the student's checkpoints, and rebuilt the
same way on resume.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp


def parse(value: str):
    """The `train.init_from.Spec` of `distill.teacher`: a workdir (run:) or an HF directory (hf:)
    by what the path holds; ValueError / FileNotFoundError (one line naming the key) otherwise."""
    from inference.load import is_hf_dir, is_workdir
    from train import init_from

    if not value:
        raise ValueError("config key `distill.teacher` is empty; give the teacher: a `python -m train` workdir "
                         "(PATH or PATH@STEP) or a Hugging Face model directory")
    if value.partition(":")[0] not in init_from.KINDS:
        path, at, step = value.rpartition("@") if "@" in value else (value, "", "")
        kind = "hf" if is_hf_dir(path) else "run" if is_workdir(path) else None
        if kind is None:
            raise FileNotFoundError(f"config key `distill.teacher`={value!r}: {os.path.abspath(path)} is neither a "
                                    "`python -m train` workdir (config.json + checkpoints/) nor a Hugging Face model "
                                    "directory (config.json + model.safetensors)")
        value = f"{kind}:{path}{at}{step}"
    try:
        spec = init_from.parse(value)
        if spec.kind == "run":
            init_from.run_step(spec)
        elif not is_hf_dir(spec.path):
            raise FileNotFoundError(f"{spec.path} is not a Hugging Face model directory")
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config key `distill.teacher`={value!r}: "
                      f"{str(e).removeprefix('config key `init_from`=')}") from None
    return spec


def checkpoint(spec) -> tuple[nn.Module, object]:
    """(model, tokenizer) of the teacher checkpoint `spec`, as it was trained (no weights read)."""
    from data.tokenizer import load_tokenizer
    from models import hf
    from train import build, init_from

    if spec.kind == "hf":
        return hf.model_of(spec.path), load_tokenizer(spec.path)
    config = init_from.run_config(spec)
    tokenizer = init_from.run_tokenizer(spec)
    return build.model(config, tokenizer.vocab_size), tokenizer


def abstract_params(model: nn.Module, strategy, mesh):
    """(the teacher's params as ShapeDtypeStructs with their shardings, the shardings) under
    `strategy` on `mesh`, as the student's are laid out (ZeRO-3 and FSDP split them)."""
    from sharding.layout import param_shardings

    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    shardings = param_shardings(strategy, mesh, boxed, zero=strategy.zero_stage >= 3)
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      nn.unbox(boxed), shardings)
    return abstract, shardings


def load_params(spec, model: nn.Module, layout):
    """(params, shardings): the teacher's weights read into the layout of the student run's
    `layout` (`sharding.layout.Layout`)."""
    from train import init_from

    abstract, shardings = abstract_params(model, layout.strategy, layout.mesh)
    return init_from.load_params(spec, abstract, model), shardings


def width(model: nn.Module) -> int:
    """The concatenated width of the query heads (N x H) of `model`'s layers."""
    block = model.config.block
    return block.num_heads * block.head_size
