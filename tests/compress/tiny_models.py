"""Tiny models and token batches for the calibrated compression tests (compress/calibration.py
and the methods built on it): random-init params of a `configs/*:tiny` preset, no training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compress.methods import Source
from configs.loader import load_config
from train import build


def tiny_source(spec: str = "configs/llama.py:tiny", overrides=(), seed: int = 0, vocab: int = 512) -> Source:
    """A Source of a tiny preset with random-init params (its tokenizer is not built: None)."""
    config = load_config(spec, list(overrides))
    model = build.model(config, vocab)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    return Source(model, params, config, None)


def token_batches(vocab: int = 512, rows: int = 16, seq_len: int = 32, seed: int = 0, batch: int = 8):
    """int32 [B, T] batches of Zipf-distributed token ids (a few frequent tokens, as in text)."""
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, size=(rows, seq_len)) - 1, vocab - 1).astype(np.int32)
    return [ids[i:i + batch] for i in range(0, rows, batch)]
