"""Train the encoder-decoder Transformer on a synthetic task: reverse a digit string.

    python -m train.seq2seq --config=configs/transformer.py:tiny

The task is small enough to learn in a minute on a CPU and hard enough to need
attention: output token t must find input token (n - 1 - t), which moves with the
length n of each example. Held-out strings (a fixed hash class) never appear in
training, so exact match on them measures generalisation, not memorisation.

Token ids: 0 pad, 1 bos, 2 eos, 3 + d for digit d.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from configs import transformer as transformer_configs
from models.transformer import Transformer
from train import losses
from train.schedules import make_schedule

PAD, BOS, EOS, DIGIT0 = 0, 1, 2, 3


def _held_out(digits_BL: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
    """One string in ten, by a polynomial hash of its digits, is reserved for evaluation."""
    L = digits_BL.shape[1]
    valid = np.arange(L)[None, :] < lengths_B[:, None]
    h = (np.where(valid, digits_BL + 1, 0) * (31 ** np.arange(L) % 1_000_003)).sum(1) % 1_000_003
    return (h * 7 + lengths_B) % 10 == 0


def make_examples(rng: np.random.Generator, n: int, min_digits: int, max_digits: int, *, held_out: bool):
    """Returns (src [n, L+1], tgt_in [n, L+1], tgt_out [n, L+1]) with L = max_digits.

    src is the digits then EOS; tgt_out the reversed digits then EOS; tgt_in is tgt_out
    shifted right behind BOS (teacher forcing). `held_out` picks from the reserved class.
    """
    digits, lengths = [], []
    while sum(len(d) for d in digits) < n:
        d = rng.integers(0, 10, size=(2 * n, max_digits))
        ln = rng.integers(min_digits, max_digits + 1, size=2 * n)
        keep = _held_out(d, ln) == held_out
        digits.append(d[keep])
        lengths.append(ln[keep])
    digits_BL = np.concatenate(digits)[:n]
    lengths_B = np.concatenate(lengths)[:n]
    L = max_digits + 1
    src = np.full((n, L), PAD, np.int32)
    tgt_out = np.full((n, L), PAD, np.int32)
    for i, (d, ln) in enumerate(zip(digits_BL, lengths_B)):
        src[i, :ln] = d[:ln] + DIGIT0
        src[i, ln] = EOS
        tgt_out[i, :ln] = d[:ln][::-1] + DIGIT0
        tgt_out[i, ln] = EOS
    tgt_in = np.concatenate([np.full((n, 1), BOS, np.int32), tgt_out[:, :-1]], axis=1)
    return src, tgt_in, tgt_out


def loss_fn(params, model: Transformer, batch, dropout_rng, label_smoothing: float):
    src, tgt_in, tgt_out = batch
    logits = model.apply({"params": params}, src, tgt_in, deterministic=False, rngs={"dropout": dropout_rng})
    loss, aux = losses.cross_entropy(logits, tgt_out, mask_BT=tgt_out != PAD, label_smoothing=label_smoothing)
    return loss, aux


@functools.partial(jax.jit, static_argnames=("model", "label_smoothing"), donate_argnames=("state",))
def train_step(state: train_state.TrainState, batch, rng, *, model: Transformer, label_smoothing: float):
    """One AdamW step; returns the new state and the loss."""
    dropout_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, model, batch, dropout_rng, label_smoothing)
    return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": aux["accuracy"]}


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def greedy_decode(params, src_BS: jax.Array, *, model: Transformer, max_len: int) -> jax.Array:
    """Encodes once, then emits the argmax token step by step (recomputing the decoder).

    Returns [B, max_len] token ids; positions after EOS are PAD.
    """
    B = src_BS.shape[0]
    encoded = model.apply({"params": params}, src_BS, method=Transformer.encode)
    tgt = jnp.full((B, max_len + 1), PAD, jnp.int32).at[:, 0].set(BOS)

    def step(t, carry):
        tgt, done = carry
        logits = model.apply({"params": params}, tgt[:, :-1], encoded, src_BS, method=Transformer.decode)
        token = jnp.where(done, PAD, jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32))
        return tgt.at[:, t + 1].set(token), done | (token == EOS)

    tgt, _ = jax.lax.fori_loop(0, max_len, step, (tgt, jnp.zeros((B,), bool)))
    return tgt[:, 1:]


def exact_match(params, model: Transformer, src, tgt_out) -> float:
    """Share of examples whose whole decoded output (up to and including EOS) is right."""
    pred = np.asarray(greedy_decode(params, jnp.asarray(src), model=model, max_len=tgt_out.shape[1]))
    return float(np.mean(np.all(pred == tgt_out, axis=1)))


def run(config: ml_collections.ConfigDict, *, verbose: bool = True) -> dict[str, Any]:
    """Trains `config.model` on the reversal task; returns final loss and held-out exact match."""
    cfg = transformer_configs.model_config(config)
    t = config.train
    if cfg.vocab_size < DIGIT0 + 10:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is too small for the digit task (needs >= 13)")
    if cfg.max_len < t.max_digits + 1:
        raise ValueError(f"model.max_len={cfg.max_len} must be >= train.max_digits + 1 = {t.max_digits + 1}")
    model = Transformer(cfg)
    rng = np.random.default_rng(t.seed)
    eval_src, _, eval_out = make_examples(rng, t.eval_examples, t.min_digits, t.max_digits, held_out=True)

    key = jax.random.key(t.seed)
    sample = make_examples(rng, 2, t.min_digits, t.max_digits, held_out=False)
    # One jitted init: un-jitted, every random draw compiles on its own (seconds on a CPU).
    params = nn.unbox(jax.jit(model.init)(key, jnp.asarray(sample[0]), jnp.asarray(sample[1]))["params"])
    schedule = make_schedule("cosine", peak_lr=t.learning_rate, total_steps=t.steps, warmup_steps=t.warmup_steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    start, metrics = time.time(), {}
    for step in range(t.steps):
        batch = tuple(jnp.asarray(x) for x in make_examples(rng, t.batch_size, t.min_digits, t.max_digits,
                                                            held_out=False))
        state, metrics = train_step(state, batch, key, model=model, label_smoothing=t.label_smoothing)
        if verbose and (step + 1) % t.log_every == 0:
            print(f"step {step + 1:5d}  loss {float(metrics['loss']):.4f}  "
                  f"token accuracy {float(metrics['accuracy']):.3f}  ({time.time() - start:.1f}s)")
    em = exact_match(state.params, model, eval_src, eval_out)
    result = {"final_loss": float(metrics["loss"]), "held_out_exact_match": em, "steps": t.steps,
              "seconds": time.time() - start, "num_params": cfg.num_params()}
    if verbose:
        print(f"held-out exact match: {em:.3f} on {t.eval_examples} unseen strings")
    return {**result, "params": state.params, "model": model}


def main(argv):
    del argv
    result = run(_CONFIG.value)
    print({k: v for k, v in result.items() if k not in ("params", "model")})


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", "configs/transformer.py:tiny", "Run config: a configs/*.py file and a preset, FILE:PRESET.")
    app.run(main)
