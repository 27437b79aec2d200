"""Conversion checks: does a written or read Hugging Face directory compute what we compute?

    against_transformers(directory, model, params)   # transformers' model from the directory
    against_reloaded(directory, model, params)       # our own reload of what we wrote (export)

Both run the model on a fixed probe batch, compare logits (a reward model: the scores at every
position) and compare the tensors name by name (in Hugging Face naming), and raise `ConversionMismatch` naming the worst tensor and
the worst logit when they disagree. The tolerance is float32 rounding, grown with depth and
width: `TOLERANCE_EPS * eps32 * sqrt(D) * (L + 1)` relative to the largest reference logit,
far below what a wrong transpose, a swapped tensor or a missing bias gives (order one).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PROBE_SHAPE = (2, 12)  # rows x tokens of the probe batch
TOLERANCE_EPS = 64  # multiples of float32 epsilon per sqrt(width) per layer


class ConversionMismatch(ValueError):
    """A converted model does not compute what its source computes."""


def probe_ids(vocab_size: int, max_len: int) -> np.ndarray:
    """The fixed probe batch [B, T] of token ids (seeded; the same in every process)."""
    return np.random.default_rng(0).integers(0, vocab_size, (PROBE_SHAPE[0], min(PROBE_SHAPE[1], max_len)))


def tolerance(model: nn.Module) -> float:
    """The relative logit tolerance of `model` in float32 (see the module docstring)."""
    c = model.config
    return TOLERANCE_EPS * float(np.finfo(np.float32).eps) * math.sqrt(c.block.d_model) * (c.num_layers + 1)


def float32_model(model: nn.Module, params):
    """The same model and params computing and stored in float32 (dropout off at apply)."""
    block = dataclasses.replace(model.config.block, dtype=jnp.float32, param_dtype=jnp.float32)
    model = model.clone(config=dataclasses.replace(model.config, block=block))
    return model, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), nn.unbox(params))


def logits(model: nn.Module, params, ids: np.ndarray) -> np.ndarray:
    """The first output (logits; BertModel: last hidden state) of our model in float32."""
    model, params = float32_model(model, params)
    out = model.apply({"params": params}, jnp.asarray(ids))
    return np.asarray(out[0] if isinstance(out, (tuple, list)) else out, np.float64)


def worst_tensor(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> tuple[str, float]:
    """(name, max |difference| relative to the reference's max |value|) of the worst tensor;
    a name missing on one side or a shape mismatch counts as infinitely bad."""
    worst, name = -1.0, ""
    for key in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(key), theirs.get(key)
        if a is None or b is None or np.shape(a) != np.shape(b):
            return key, math.inf
        b64 = np.asarray(b, np.float64)
        diff = float(np.max(np.abs(np.asarray(a, np.float64) - b64), initial=0.0)) / max(
            float(np.max(np.abs(b64), initial=0.0)), 1e-30)
        if diff > worst:
            worst, name = diff, key
    return name, worst


def check_logits(ours: np.ndarray, reference: np.ndarray, tol: float, what: str, tensors: tuple[str, float]) -> float:
    """Raises ConversionMismatch if the logits differ by more than `tol` relative to the
    reference's largest magnitude; returns the relative difference."""
    if ours.shape != reference.shape:
        raise ConversionMismatch(f"{what}: output shape {ours.shape} != {reference.shape}")
    diff = np.abs(ours - reference)
    scale = max(float(np.abs(reference).max()), 1e-30)
    rel = float(diff.max()) / scale
    if not rel <= tol:
        where = np.unravel_index(int(np.argmax(diff)), diff.shape)
        name, tensor_diff = tensors
        raise ConversionMismatch(
            f"{what}: logits differ by {diff.max():.3g} (relative {rel:.2g} > tolerance {tol:.2g}) at "
            f"[batch, position, index]={list(map(int, where))}; worst tensor {name} (relative difference "
            f"{tensor_diff:.3g})")
    return rel


def against_reloaded(directory: str, model: nn.Module, params) -> dict[str, float]:
    """Reloads `directory` with `models.hf.load_pretrained` and compares it with (model, params).

    Returns:
      {"logits": relative logit difference, "tensor": worst relative tensor difference}.
    """
    from models import hf

    reloaded_model, reloaded = hf.load_pretrained(directory)
    _, ours = hf.to_hf(model, params)
    _, theirs = hf.to_hf(reloaded_model, reloaded)
    tensors = worst_tensor(theirs, ours)
    ids = probe_ids(model.config.vocab_size, model.config.max_len)
    rel = check_logits(logits(reloaded_model, reloaded, ids), logits(model, params, ids), tolerance(model),
                       f"the export in {directory} reloaded", tensors)
    return {"logits": rel, "tensor": tensors[1]}


def against_transformers(directory: str, model: nn.Module, params) -> dict[str, float] | None:
    """Builds transformers' model from `directory` and compares it with (model, params).

    Returns:
      As `against_reloaded`, or None when torch or transformers is not installed.
    """
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from models import hf

    hf_config, ours = hf.to_hf(model, params)
    cls = getattr(transformers, hf_config["architectures"][0])
    reference = cls.from_pretrained(directory, dtype=torch.float32).eval()
    state = {k: v.detach().float().numpy() for k, v in reference.state_dict().items()}
    theirs = {k: state.get(k, state.get(k.removeprefix("bert."))) for k in ours}
    theirs = {k: v for k, v in theirs.items() if v is not None}
    tensors = worst_tensor(ours, theirs)
    ids = probe_ids(model.config.vocab_size, model.config.max_len)
    with torch.no_grad():
        if cls.__name__.endswith("ForSequenceClassification") and hasattr(reference, "score"):
            # A reward model: transformers returns the score at each row's last non-padding
            # token; ours are at every position, so compare the head on every hidden state.
            out = (reference.score(reference.model(torch.from_numpy(ids)).last_hidden_state),)
        else:
            out = reference(torch.from_numpy(ids))
    expected = np.asarray(out[0].double().numpy())
    rel = check_logits(logits(model, params, ids), expected, tolerance(model),
                       f"{directory} against transformers' {cls.__name__}", tensors)
    return {"logits": rel, "tensor": tensors[1]}
