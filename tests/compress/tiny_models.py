"""Tiny models and token batches for the calibrated compression tests (compress/calibration.py
and the methods built on it): random params of a `configs/*:tiny` preset, no training."""

from __future__ import annotations

import numpy as np

from compress.methods import Source
from configs.loader import load_config
from models.gpt import scan_params
from models.random_params import random_params
from train import build


def tiny_source(spec: str = "configs/llama.py:tiny", overrides=(), seed: int = 0, vocab: int = 512) -> Source:
    """A Source of a tiny preset with random params (`models.random_params`, drawn for the
    per-layer layout and stacked when the preset scans its layers); no tokenizer."""
    config = load_config(spec, list(overrides))
    model = build.model(config, vocab)
    if config.model.scan_layers:
        loop = build.model(load_config(spec, [*overrides, "model.scan_layers=false"]), vocab)
        params = scan_params(random_params(loop, seed), model.config)
    else:
        params = random_params(model, seed)
    return Source(model, params, config, None)


def token_batches(vocab: int = 512, rows: int = 16, seq_len: int = 32, seed: int = 0, batch: int = 8):
    """int32 [B, T] batches of Zipf-distributed token ids (a few frequent tokens, as in text)."""
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, size=(rows, seq_len)) - 1, vocab - 1).astype(np.int32)
    return [ids[i:i + batch] for i in range(0, rows, batch)]
