"""Masked-language-model corruption of a batch (BERT, Devlin et al. 2018), inside the jitted step.

Axis letters: B batch, T length.

Of the real (non-padding) tokens, each is chosen with probability `prob` (15%); a chosen
token becomes the mask token with probability `mask_fraction` (80%), a uniformly random
token with `random_fraction` (10%), and stays itself otherwise (10%). The model sees the
corrupted row and is scored on the chosen positions only, predicting the original id.
The choice is a pure function of the rng, so a step's rng (`fold_in(rng, step)`) gives
every epoch fresh masks, and a fixed rng gives an evaluation the same masks every time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    """What `mask_batch` needs (static: bound into the jitted step).

    Attributes:
      mask_id: the tokenizer's mask token ([MASK] or <mask>).
      vocab_size: random replacements are drawn from [0, vocab_size) (the tokenizer's ids).
      prob: share of the real tokens chosen for prediction.
      mask_fraction: share of the chosen that become `mask_id`.
      random_fraction: share of the chosen that become a random token (the rest stay).
    """

    mask_id: int
    vocab_size: int
    prob: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self):
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id} must lie in [0, vocab_size={self.vocab_size})")
        if not 0 < self.prob <= 1:
            raise ValueError(f"prob={self.prob} must lie in (0, 1]")
        if min(self.mask_fraction, self.random_fraction) < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ValueError(f"mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} must "
                             "be >= 0 and sum to at most 1")


def mask_tokens(rng: jax.Array, ids_BT: jax.Array, loss_mask_BT: jax.Array, *, mask_id: int, vocab_size: int,
                prob: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """Corrupts `ids_BT` for masked-LM training.

    Args:
      rng: a PRNG key.
      ids_BT: [B, T] integer token ids.
      loss_mask_BT: [B, T]; non-zero marks a real token (zero: padding, never chosen).
      mask_id, vocab_size, prob, mask_fraction, random_fraction: see `MLMConfig`.

    Returns:
      (inputs_BT, chosen_BT): the corrupted ids (dtype of `ids_BT`) and a bool mask of the
      positions to predict.
    """
    choose_rng, kind_rng, token_rng = jax.random.split(rng, 3)
    shape = ids_BT.shape
    chosen_BT = (jax.random.uniform(choose_rng, shape) < prob) & (loss_mask_BT > 0)
    kind_BT = jax.random.uniform(kind_rng, shape)
    to_mask_BT = chosen_BT & (kind_BT < mask_fraction)
    to_random_BT = chosen_BT & (kind_BT >= mask_fraction) & (kind_BT < mask_fraction + random_fraction)
    random_BT = jax.random.randint(token_rng, shape, 0, vocab_size, dtype=ids_BT.dtype)
    inputs_BT = jnp.where(to_mask_BT, jnp.asarray(mask_id, ids_BT.dtype), jnp.where(to_random_BT, random_BT, ids_BT))
    return inputs_BT, chosen_BT


def mask_batch(rng: jax.Array, batch: dict[str, jax.Array], config: MLMConfig) -> dict[str, jax.Array]:
    """A packed next-token batch made a masked-LM batch.

    The row `inputs` is corrupted by `mask_tokens`; `targets` become the original ids and
    `loss_mask` the chosen positions. `segment_ids` and `positions` are kept, so attention
    stays within each packed document.
    """
    real_BT = batch["segment_ids"] > 0
    inputs_BT, chosen_BT = mask_tokens(rng, batch["inputs"], real_BT, mask_id=config.mask_id,
                                       vocab_size=config.vocab_size, prob=config.prob,
                                       mask_fraction=config.mask_fraction, random_fraction=config.random_fraction)
    return {**batch, "inputs": inputs_BT, "targets": batch["inputs"], "loss_mask": chosen_BT.astype(jnp.int32)}
