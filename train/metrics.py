"""Training metrics: a JSONL + TensorBoard + progress-bar writer, throughput and MFU.

Model FLOPs utilisation is achieved FLOP/s over peak FLOP/s, where achieved FLOP/s is
tokens/s times the FLOPs of one *training* step per token: forward and backward,
about 6 * num_params plus attention (`flops_per_token()` of a model config, nanoGPT's
`estimate_mfu`). The peak is a datasheet number, or `measure_matmul_peak` for the
best this device reaches on a plain matmul.
"""

import json
import os
import statistics
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import tensorboardX
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Writes each logged step to `WORKDIR/metrics.jsonl`, TensorBoard and a tqdm bar.

    The JSONL file is opened in append mode, so a resumed run extends it, and every line
    is flushed so a crash loses nothing already written. The bar shows `loss` and
    `tokens_per_second` when the metrics contain them.
    """

    def __init__(self, workdir: str, total_steps: int, *, use_tensorboard: bool = True, progress: bool = True):
        """Opens the writers.

        Args:
          workdir: run directory; created if missing.
          total_steps: last step of the run, the end of the progress bar.
          use_tensorboard: also write TensorBoard event files under `WORKDIR/tensorboard`.
          progress: show a tqdm progress bar with ETA.
        """
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.total_steps = total_steps
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
        self._tensorboard = None
        if use_tensorboard:
            self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
        self._progress = progress
        self._bar = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs `metrics` at `step`; values may be Python, NumPy or JAX scalars."""
        step = int(step)
        scalars = {name: float(value) for name, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()
        if self._progress:
            self._update_bar(step, scalars)

    def _update_bar(self, step: int, scalars: dict[str, float]) -> None:
        if self._bar is None:
            # Starting at the first logged step keeps the ETA right for a resumed run.
            self._bar = tqdm.tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True)
        else:
            self._bar.update(step - self._bar.n)
        shown = {}
        if "loss" in scalars:
            shown["loss"] = f"{scalars['loss']:.4f}"
        if "tokens_per_second" in scalars:
            shown["tok/s"] = f"{scalars['tokens_per_second']:.4g}"
        self._bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        """Flushes and closes every writer; safe to call twice."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, *, repeats: int = 5, matmuls_per_call: int = 10) -> float:
    """Achieved FLOP/s of an n x n matmul on the default device.

    One jitted call runs `matmuls_per_call` chained matmuls, so that dispatch overhead
    (tens of microseconds, as long as a 2048^3 bf16 matmul on a modern GPU) does not
    hide the arithmetic. The first call (compilation) is excluded; the result is
    2 n^3 * matmuls_per_call over the median time of `repeats` calls. Uses JAX's
    default matmul precision for `dtype`.

    Args:
      n: matrix side.
      dtype: operand dtype, e.g. jnp.bfloat16 for the tensor-core peak.
      repeats: timed calls; the median is used.
      matmuls_per_call: chained matmuls inside one call.

    Returns:
      FLOP/s, a positive float.
    """
    if n < 1 or repeats < 1 or matmuls_per_call < 1:
        raise ValueError(f"n={n}, repeats={repeats}, matmuls_per_call={matmuls_per_call} must all be >= 1.")
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (n, n), dtype)
    # Scaled by 1/sqrt(n) so that repeated products keep their magnitude.
    w = (jax.random.normal(key_w, (n, n), jnp.float32) / n**0.5).astype(dtype)

    @jax.jit
    def chained_matmuls(x, w):
        return jax.lax.fori_loop(0, matmuls_per_call, lambda _, y: y @ w, x)

    chained_matmuls(x, w).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        chained_matmuls(x, w).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2.0 * n**3 * matmuls_per_call / statistics.median(seconds)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: tokens_per_second * flops_per_token / peak_flops.

    Args:
      tokens_per_second: training throughput.
      flops_per_token: FLOPs of one training step per token, backward included
        (~6 * num_params + attention).
      peak_flops: FLOP/s the hardware can reach (all devices together).

    Returns:
      A fraction, 1.0 being the peak.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0.")
    return tokens_per_second * flops_per_token / peak_flops


class Throughput:
    """Accumulates (tokens, seconds) per step and reports rates since the last report.

    Rates are total tokens over total seconds in the window, not a mean of per-step
    rates, so a slow step weighs by its length.
    """

    def __init__(self, flops_per_token: float, peak_flops: float | None = None):
        """Starts an empty window.

        Args:
          flops_per_token: FLOPs of one training step per token, backward included
            (~6 * num_params + attention).
          peak_flops: if given, `report` also returns `mfu`.
        """
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._tokens = 0
        self._seconds = 0.0
        self._total_tokens = 0
        self._total_seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        """Records one step (or several) that processed `tokens` in `seconds` of wall time."""
        if seconds < 0 or tokens < 0:
            raise ValueError(f"tokens={tokens} and seconds={seconds} must be >= 0.")
        self._tokens += tokens
        self._seconds += seconds
        self._total_tokens += tokens
        self._total_seconds += seconds

    def report(self) -> dict[str, float]:
        """Returns tokens_per_second, flops_per_second (and mfu) and starts a new window.

        Returns an empty dict when no time has been recorded since the last report.
        """
        if self._seconds <= 0:
            return {}
        tokens_per_second = self._tokens / self._seconds
        result = {
            "tokens_per_second": tokens_per_second,
            "flops_per_second": tokens_per_second * self.flops_per_token,
        }
        if self.peak_flops is not None:
            result["mfu"] = mfu(tokens_per_second, self.flops_per_token, self.peak_flops)
        self._tokens, self._seconds = 0, 0.0
        return result

    def totals(self) -> dict[str, float]:
        """Rates over everything added since construction (windows are not reset by this)."""
        if self._total_seconds <= 0:
            return {"tokens_per_second": 0.0, "flops_per_second": 0.0, "mfu": 0.0}
        tokens_per_second = self._total_tokens / self._total_seconds
        return {
            "tokens_per_second": tokens_per_second,
            "flops_per_second": tokens_per_second * self.flops_per_token,
            "mfu": mfu(tokens_per_second, self.flops_per_token, self.peak_flops) if self.peak_flops else 0.0,
        }
