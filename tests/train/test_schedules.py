"""Schedules against closed forms written in plain Python (math, floats)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.schedules import make_schedule

PEAK, TOTAL, WARMUP, MIN_RATIO, DECAY_FRACTION = 3e-4, 1000, 100, 0.1, 0.2
MIN_LR = MIN_RATIO * PEAK
STEPS = [0, 1, 50, 99, 100, 101, 250, 550, 799, 800, 801, 900, 999, 1000, 1001, 5000]


def reference_lr(name, step, shape="linear"):
    """The schedule's definition, one branch per phase, in float64 Python."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    if name == "constant":
        return PEAK
    if name == "rsqrt":
        return PEAK / math.sqrt(step / WARMUP)
    if name == "cosine":
        if step >= TOTAL:
            return MIN_LR
        progress = (step - WARMUP) / (TOTAL - WARMUP)
        return MIN_LR + (PEAK - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2
    decay_start = TOTAL * (1 - DECAY_FRACTION)  # wsd
    if step <= decay_start:
        return PEAK
    progress = min((step - decay_start) / (TOTAL - decay_start), 1.0)
    factor = {
        "linear": 1 - progress,
        "cosine": (1 + math.cos(math.pi * progress)) / 2,
        "sqrt": 1 - math.sqrt(progress),
    }[shape]
    return MIN_LR + (PEAK - MIN_LR) * factor


def build(name, shape="linear", **overrides):
    kwargs = dict(
        peak_lr=PEAK,
        total_steps=TOTAL,
        warmup_steps=WARMUP,
        min_lr_ratio=MIN_RATIO,
        decay_fraction=DECAY_FRACTION,
        decay_shape=shape,
    )
    kwargs.update(overrides)
    return make_schedule(name, **kwargs)


CASES = [
    ("cosine", "linear"),
    ("constant", "linear"),
    ("rsqrt", "linear"),
    ("wsd", "linear"),
    ("wsd", "cosine"),
    ("wsd", "sqrt"),
]


@pytest.mark.parametrize("name,shape", CASES)
def test_matches_closed_form_at_chosen_steps(name, shape):
    schedule = jax.jit(build(name, shape))
    got = [float(schedule(jnp.int32(step))) for step in STEPS]
    want = [reference_lr(name, step, shape) for step in STEPS]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_hand_computed_anchor_values():
    cosine, rsqrt = build("cosine"), build("rsqrt")
    # Warmup is linear from 0: a quarter of the way gives a quarter of the peak.
    assert float(cosine(25)) == pytest.approx(PEAK / 4, rel=1e-6)
    # Halfway through the cosine the rate is midway between peak and floor.
    assert float(cosine(550)) == pytest.approx((PEAK + MIN_LR) / 2, rel=1e-6)
    # rsqrt halves when the step quadruples past warmup.
    assert float(rsqrt(400)) == pytest.approx(PEAK / 2, rel=1e-6)
    # wsd sqrt decay a quarter of the way in: 1 - sqrt(1/4) = 1/2 of the way down.
    assert float(build("wsd", "sqrt")(850)) == pytest.approx((PEAK + MIN_LR) / 2, rel=1e-6)
    assert float(build("wsd", "linear")(900)) == pytest.approx((PEAK + MIN_LR) / 2, rel=1e-6)


@pytest.mark.parametrize("name,shape", CASES)
def test_monotonic_pieces(name, shape):
    schedule = jax.jit(build(name, shape))
    lrs = np.asarray(jax.vmap(schedule)(jnp.arange(0, 2 * TOTAL)), np.float64)
    assert np.all(np.diff(lrs[: WARMUP + 1]) > 0), "warmup must rise"
    assert np.all(np.diff(lrs[WARMUP:]) <= 1e-12), "after warmup the rate must not rise"
    assert lrs[WARMUP] == pytest.approx(PEAK, rel=1e-6)
    if name == "wsd":
        np.testing.assert_allclose(lrs[WARMUP:801], PEAK, rtol=1e-6)  # the stable phase
    if name in ("cosine", "wsd"):
        np.testing.assert_allclose(lrs[TOTAL:], MIN_LR, rtol=1e-5)  # flat after the end


@pytest.mark.parametrize(
    "name,shape,boundary",
    [
        ("cosine", "linear", WARMUP),
        ("cosine", "linear", TOTAL),
        ("rsqrt", "linear", WARMUP),
        ("constant", "linear", WARMUP),
        ("wsd", "linear", WARMUP),
        ("wsd", "linear", 800),
        ("wsd", "linear", TOTAL),
        ("wsd", "cosine", 800),
        ("wsd", "cosine", TOTAL),
        ("wsd", "sqrt", 800),
        ("wsd", "sqrt", TOTAL),
    ],
)
def test_continuous_at_boundaries(name, shape, boundary):
    schedule = build(name, shape)
    left, at, right = (float(schedule(jnp.float32(boundary + d))) for d in (-1e-2, 0.0, 1e-2))
    # Warmup slope is PEAK / 100 per step, so 1e-2 steps moves at most 1e-4 * PEAK;
    # sqrt decay moves by sqrt(1e-2 / 200) ~ 7e-3 of the range just after its start.
    tol = 1e-2 * PEAK
    assert abs(left - at) < tol and abs(right - at) < tol


def test_cosine_with_warmup_equal_to_total():
    schedule = build("cosine", warmup_steps=TOTAL)
    assert float(schedule(TOTAL - 1)) == pytest.approx(PEAK * (TOTAL - 1) / TOTAL, rel=1e-6)
    assert float(schedule(TOTAL)) == pytest.approx(MIN_LR, rel=1e-6)
    assert float(schedule(TOTAL + 5)) == pytest.approx(MIN_LR, rel=1e-6)


def test_no_warmup_starts_at_peak():
    for name in ("cosine", "constant", "wsd"):
        assert float(build(name, warmup_steps=0)(0)) == pytest.approx(PEAK, rel=1e-6)


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("linear", {}, "schedule name 'linear' is unknown; valid names are"),
        ("wsd", {"shape": "exp"}, "decay_shape 'exp' is unknown; valid shapes are"),
        ("cosine", {"warmup_steps": TOTAL + 1}, "warmup_steps=1001 must be in"),
        ("cosine", {"warmup_steps": -1}, "warmup_steps=-1 must be in"),
        ("cosine", {"peak_lr": -1.0}, "peak_lr=-1.0"),
        ("cosine", {"total_steps": 0, "warmup_steps": 0}, "total_steps=0"),
        ("cosine", {"min_lr_ratio": 1.5}, "min_lr_ratio=1.5"),
        ("wsd", {"decay_fraction": 0.0}, "decay_fraction=0.0"),
        ("wsd", {"decay_fraction": 0.95}, "warmup_steps=100 overlaps the wsd decay"),
        ("rsqrt", {"warmup_steps": 0}, "warmup_steps=0 must be >= 1 for 'rsqrt'"),
    ],
)
def test_errors_name_the_argument(name, overrides, message):
    overrides = dict(overrides)
    shape = overrides.pop("shape", "linear")
    with pytest.raises(ValueError, match=re.escape(message)):
        build(name, shape, **overrides)
