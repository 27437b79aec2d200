"""Attention memory against sequence length: the plain ("xla") path against blockwise.

For causal self-attention at B = 1, N = 8 heads, H = 64, float32, the program measured is
forward + backward (the gradients of sum(out) with respect to q, k and v), jitted and
compiled for each T but never run: XLA's `compiled.memory_analysis()` gives the bytes of
its arguments, outputs and temporaries, and their sum is the program's peak footprint
(what a device must hold to run it). Nothing is allocated, so T = 32768 (a 32 GiB
attention matrix for xla) costs only a compile.

Printed: a table of that footprint for T = 1024, 2048, ... doubling to --max_len, with
the xla / blockwise ratio, and the longest T each path fits in each of --budgets_gib
(doubling from 1024, then bisection to a multiple of 128, all on compiled memory).
Unless --quick, also one timing: the best of 3 runs of the same step at T = --time_len
(2048) for both paths on this machine's default device.

The plain path holds the [B, N, T, T] logits and probabilities (O(T^2)); blockwise holds
q, k, v, the output, the row log-sum-exp and one tile per step (O(T)).

Run:
  python benchmarks/attention_memory.py
  python benchmarks/attention_memory.py --quick       # T = 512, 1024; no search, no timing
"""

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from models.layers.attention import attend

IMPLS = ("xla", "blockwise")
BATCH, HEADS, HEAD_DIM = 1, 8, 64
MIB = 2**20
GRANULE = 128  # the longest-T search stops at this resolution


def _step(impl: str):
    """Forward + backward of causal attention: the gradients of sum(out) wrt q, k, v."""

    def loss(q, k, v):
        return attend(q, k, v, impl=impl, causal=True).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _shape(seq_len: int, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((BATCH, seq_len, HEADS, HEAD_DIM), dtype)


@functools.cache
def peak_bytes(impl: str, seq_len: int) -> int:
    """Arguments + outputs + temporaries of the compiled step at T = seq_len (not run)."""
    x = _shape(seq_len)
    m = _step(impl).lower(x, x, x).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def longest_fit(impl: str, budget_bytes: int, start: int = 1024, limit: int = 2**22) -> int:
    """The longest T (a multiple of GRANULE) whose step fits the budget: doubling, then bisection."""
    if peak_bytes(impl, GRANULE) > budget_bytes:
        return 0
    lo, hi = GRANULE, start
    while peak_bytes(impl, hi) <= budget_bytes:  # lo fits, hi does not (or the limit)
        lo, hi = hi, 2 * hi
        if hi > limit:
            return lo
    while hi - lo > GRANULE:
        mid = (lo + hi) // 2 // GRANULE * GRANULE
        lo, hi = (mid, hi) if peak_bytes(impl, mid) <= budget_bytes else (lo, mid)
    return lo


def time_step(impl: str, seq_len: int, repeats: int = 3) -> float:
    """Best of `repeats` runs (seconds) of the step at T = seq_len, after a compile run."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, _shape(seq_len).shape, jnp.float32) for key in keys)
    step = _step(impl)
    jax.block_until_ready(step(q, k, v))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    """Prints the table (and the longest fits and timing unless quick); returns the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 512, 1024 only; no search or timing")
    parser.add_argument("--max_len", type=int, default=32768)
    parser.add_argument("--budgets_gib", default="1,16", help="comma-separated memory budgets for the longest T")
    parser.add_argument("--time_len", type=int, default=2048, help="T of the one timed step; 0: no timing")
    args = parser.parse_args(argv)
    lengths = [512, 1024] if args.quick else [2**e for e in range(10, args.max_len.bit_length())]
    result = {"lengths": lengths, "peak_bytes": {impl: [peak_bytes(impl, t) for t in lengths] for impl in IMPLS}}
    print(f"causal attention forward + backward, B={BATCH} N={HEADS} H={HEAD_DIM} float32, "
          f"backend {jax.default_backend()}: compiled memory (arguments + outputs + temporaries)")
    print(f"{'T':>7} {'xla MiB':>12} {'blockwise MiB':>14} {'xla/blockwise':>14}")
    for i, t in enumerate(lengths):
        xla, blockwise = (result["peak_bytes"][impl][i] for impl in IMPLS)
        print(f"{t:>7} {xla / MIB:>12.1f} {blockwise / MIB:>14.1f} {xla / blockwise:>14.1f}")
    if args.quick:
        return result
    result["longest_fit"] = {}
    for gib in (float(b) for b in args.budgets_gib.split(",")):
        fits = {impl: longest_fit(impl, int(gib * 2**30)) for impl in IMPLS}
        result["longest_fit"][gib] = fits
        print(f"longest T in {gib:g} GiB: " + ", ".join(f"{impl} {t:,}" for impl, t in fits.items()))
    if args.time_len:
        times = {impl: time_step(impl, args.time_len) for impl in IMPLS}
        result["seconds"] = times
        print(f"T={args.time_len} step on {jax.devices()[0].device_kind}: "
              + ", ".join(f"{impl} {s * 1e3:.1f} ms" for impl, s in times.items())
              + f" (blockwise / xla {times['blockwise'] / times['xla']:.2f}x)")
    return result


if __name__ == "__main__":
    main()
