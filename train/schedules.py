"""Learning-rate schedules: step -> learning rate, jittable, usable as optax schedules.

Every schedule starts with a linear warmup from 0 at step 0 to `peak_lr` at
`warmup_steps` (no warmup when `warmup_steps == 0`), then:

  cosine    cosine decay from peak to `min_lr_ratio * peak` at `total_steps`, flat after.
  wsd       warmup-stable-decay: peak until the last `decay_fraction` of the run, then
            decay to `min_lr_ratio * peak` at `total_steps` (shape `linear`, `cosine`
            or `sqrt`, i.e. 1 - sqrt(progress)), flat after.
  constant  peak for ever.
  rsqrt     peak * sqrt(warmup_steps / step), continuous with the warmup; needs warmup.

The WSD decay starts at step `total_steps * (1 - decay_fraction)`, a real number, so
the decay is exactly the last `decay_fraction` of the run with no rounding.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

SCHEDULES = ("cosine", "wsd", "constant", "rsqrt")
DECAY_SHAPES = ("linear", "cosine", "sqrt")

Schedule = Callable[[jax.Array | int], jax.Array]


def make_schedule(
    name: str,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
) -> Schedule:
    """Builds a learning-rate schedule.

    Args:
      name: one of `SCHEDULES`.
      peak_lr: learning rate reached at the end of warmup.
      total_steps: length of the run; `cosine` and `wsd` reach their floor here.
      warmup_steps: steps of linear warmup from 0, at most `total_steps`.
      min_lr_ratio: floor of `cosine` and `wsd` as a fraction of `peak_lr`, in [0, 1].
      decay_fraction: for `wsd`, the final fraction of `total_steps` spent decaying,
        in (0, 1]; the stable phase must not be shorter than zero.
      decay_shape: for `wsd`, one of `DECAY_SHAPES`.

    Returns:
      A function step -> float32 learning rate, safe under `jax.jit`.

    Raises:
      ValueError: on an unknown name or shape, or inconsistent step counts.
    """
    _check_arguments(name, peak_lr, total_steps, warmup_steps, min_lr_ratio, decay_fraction, decay_shape)
    min_lr = min_lr_ratio * peak_lr

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup_lr = peak_lr * step / max(warmup_steps, 1)
        if name == "cosine":
            progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
            after_lr = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            after_lr = jnp.where(step >= total_steps, min_lr, after_lr)
        elif name == "wsd":
            decay_start = total_steps * (1.0 - decay_fraction)
            progress = jnp.clip((step - decay_start) / (total_steps - decay_start), 0.0, 1.0)
            after_lr = min_lr + (peak_lr - min_lr) * _decay_factor(decay_shape, progress)
        elif name == "constant":
            after_lr = jnp.full_like(step, peak_lr)
        else:  # rsqrt; warmup_steps >= 1 was checked.
            after_lr = peak_lr * jnp.sqrt(warmup_steps / jnp.maximum(step, 1.0))
        return jnp.where(step < warmup_steps, warmup_lr, after_lr).astype(jnp.float32)

    return schedule


def _decay_factor(shape: str, progress: jax.Array) -> jax.Array:
    """1 at progress 0, 0 at progress 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return 1.0 - jnp.sqrt(progress)


def _check_arguments(name, peak_lr, total_steps, warmup_steps, min_lr_ratio, decay_fraction, decay_shape):
    if name not in SCHEDULES:
        raise ValueError(f"schedule name {name!r} is unknown; valid names are {SCHEDULES}.")
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"decay_shape {decay_shape!r} is unknown; valid shapes are {DECAY_SHAPES}.")
    if not (math.isfinite(peak_lr) and peak_lr >= 0):
        raise ValueError(f"peak_lr={peak_lr} must be a finite number >= 0.")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}].")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1].")
    if name == "wsd":
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction={decay_fraction} must be in (0, 1] for 'wsd'.")
        decay_start = total_steps * (1.0 - decay_fraction)
        if warmup_steps > decay_start:
            raise ValueError(
                f"warmup_steps={warmup_steps} overlaps the wsd decay, which starts at step "
                f"{decay_start:g} = total_steps * (1 - decay_fraction); lower warmup_steps to "
                f"at most {math.floor(decay_start)} or lower decay_fraction."
            )
    if name == "rsqrt" and warmup_steps < 1:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 1 for 'rsqrt': it sets the time scale "
            "of the peak * sqrt(warmup_steps / step) decay."
        )
