"""Training metrics: a JSONL + TensorBoard + progress-bar writer, throughput and MFU.

Model FLOPs utilisation is achieved FLOP/s over the peak FLOP/s of all the devices that
run the step: MFU = tokens/s * training FLOPs per token / (peak per device * devices).
The training FLOPs per token are forward and backward, about 6 * num_params plus attention
(`flops_per_token()` of a model config, nanoGPT's `estimate_mfu`). The peak per device is
`logging.peak_flops`, else the datasheet's dense peak for the device kind in the compute
dtype (`datasheet_peak_flops`), else a matmul in that dtype measured on all the local
devices at once (`measure_matmul_peak`).
"""

import functools
import json
import os
import re
import statistics
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


# Dense peak FLOP/s of one device by `jax.Device.device_kind` (a full match of the pattern,
# first match wins) and compute dtype. NVIDIA's datasheets quote tensor-core figures with 2:4
# structured sparsity; the dense peak, which a transformer's matmuls can reach, is half.
# "float32" is what a float32 matmul runs at under JAX's default precision: TF32 tensor
# cores on NVIDIA Ampere and later, one bfloat16 pass on TPU (docs.jax.dev, "Matmul precision").
_DATASHEET_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    # H100 PCIe datasheet: BF16/FP16 1,513 and TF32 756 TFLOPS with sparsity.
    (r"NVIDIA H100.*PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    # H100 NVL and H200 NVL datasheets: BF16/FP16 1,671 and TF32 835 TFLOPS with sparsity.
    (r"NVIDIA H[12]00 NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 417e12}),
    # H100 SXM ("NVIDIA H100 80GB HBM3") and H200 SXM datasheets: BF16/FP16 1,979 and TF32 989
    # TFLOPS with sparsity (the H100 whitepaper's dense figures: 989.4 and 494.7).
    (r"NVIDIA H[12]00.*", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    # A100 datasheet (SXM4 and PCIe, 40 and 80 GB): BF16/FP16 312, TF32 156 TFLOPS dense.
    (r"NVIDIA A100.*", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    # L40S datasheet: BF16 362.05 | 733 and TF32 183 | 366 TFLOPS (dense | sparse).
    (r"NVIDIA L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    # L40 datasheet: BF16/FP16 181.05 | 362.1 and TF32 90.5 | 181 TFLOPS.
    (r"NVIDIA L40", {"bfloat16": 181e12, "float16": 181e12, "float32": 90.5e12}),
    # L4 datasheet: BF16/FP16 242 and TF32 120 TFLOPS with sparsity.
    (r"NVIDIA L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    # A10 datasheet: BF16/FP16 125 | 250 and TF32 62.5 | 125 TFLOPS (not AWS's A10G).
    (r"NVIDIA A10", {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),
    # Cloud TPU system-architecture pages, bf16 per chip: v4 275, v5e 197, v5p 459, v6e 918.
    (r"TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    (r"TPU v5 lite|TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    (r"TPU v5p?", {"bfloat16": 459e12, "float32": 459e12}),
    (r"TPU v6 lite|TPU v6e", {"bfloat16": 918e12, "float32": 918e12}),
)


def datasheet_peak_flops(device_kind: str, dtype) -> float | None:
    """The dense peak FLOP/s of one device of `device_kind` on `dtype` matmuls, from its
    datasheet; None for a device or dtype the table lacks.

    Args:
      device_kind: a `jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3" or "TPU v5 lite".
      dtype: the compute dtype (the matmuls' operand type), e.g. "bfloat16" or jnp.float32.

    Returns:
      FLOP/s, or None.
    """
    name = jnp.dtype(dtype).name
    if name == "float32" and jax.config.jax_default_matmul_precision is not None:
        return None  # the float32 figures hold at the default precision only
    for pattern, peaks in _DATASHEET_PEAKS:
        if re.fullmatch(pattern, device_kind):
            return peaks.get(name)
    return None


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, *, repeats: int = 5, matmuls_per_call: int = 10,
                        devices: Sequence[jax.Device] | None = None) -> float:
    """Achieved FLOP/s of one device on an n x n matmul, all `devices` computing at once.

    One jitted call runs `matmuls_per_call` chained matmuls on every device (rows of one
    array split over the devices, the other replicated: no communication), so that dispatch
    overhead (tens of microseconds, as long as a 2048^3 bf16 matmul on a modern GPU) does not
    hide the arithmetic. The devices run together, as in a training step: devices that share
    hardware (simulated CPU devices share the host's cores) each get their share of it. The
    first call (compilation) is excluded; the result is 2 n^3 * matmuls_per_call over the
    median time of `repeats` calls. Uses JAX's default matmul precision for `dtype`.

    Args:
      n: matrix side.
      dtype: operand dtype, e.g. jnp.bfloat16 for the tensor-core peak.
      repeats: timed calls; the median is used.
      matmuls_per_call: chained matmuls inside one call.
      devices: addressable devices to measure together (default: the first local device).

    Returns:
      FLOP/s of one device, a positive float.
    """
    if n < 1 or repeats < 1 or matmuls_per_call < 1:
        raise ValueError(f"n={n}, repeats={repeats}, matmuls_per_call={matmuls_per_call} must all be >= 1.")
    devices = list(devices) if devices else jax.local_devices()[:1]
    mesh = Mesh(np.asarray(devices), ("devices",))
    rows, whole = NamedSharding(mesh, PartitionSpec("devices")), NamedSharding(mesh, PartitionSpec())

    @functools.partial(jax.jit, out_shardings=(rows, whole))
    def operands():
        key_x, key_w = jax.random.split(jax.random.key(0))
        x = jax.random.normal(key_x, (len(devices) * n, n), dtype)
        # Scaled by 1/sqrt(n) so that repeated products keep their magnitude.
        w = (jax.random.normal(key_w, (n, n), jnp.float32) / n**0.5).astype(dtype)
        return x, w

    @functools.partial(jax.jit, in_shardings=(rows, whole), out_shardings=rows)
    def chained_matmuls(x, w):
        return jax.lax.fori_loop(0, matmuls_per_call, lambda _, y: y @ w, x)

    x, w = operands()
    chained_matmuls(x, w).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        chained_matmuls(x, w).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2.0 * n**3 * matmuls_per_call / statistics.median(seconds)


def peak_flops_per_device(configured: float, compute_dtype, devices: Sequence[jax.Device]) -> tuple[float, str]:
    """The peak FLOP/s of one device for MFU, and where it came from.

    Args:
      configured: `logging.peak_flops`, FLOP/s of one device; used when > 0.
      compute_dtype: the model's compute dtype (its matmuls' operand type).
      devices: the devices the step runs on; their kind picks the datasheet peak, else
        this process's ones are measured together (`measure_matmul_peak`).

    Returns:
      (FLOP/s, the source in a few words).
    """
    if configured > 0:
        return float(configured), "logging.peak_flops"
    name = jnp.dtype(compute_dtype).name
    kind = devices[0].device_kind
    peak = datasheet_peak_flops(kind, name)
    if peak is not None:
        return peak, f"datasheet, {kind}, {name}"
    local = [d for d in devices if d.process_index == jax.process_index()]
    if local[0].platform == "cpu":
        # Simulated devices share the host's cores: keep the total work one 2048^2 matmul's
        # (a second or two) however many there are.
        n, per_call = max(128, int(2048 / len(local) ** (1 / 3)) // 128 * 128), 2
    else:
        n, per_call = 4096, 10  # long enough for an accelerator to reach its peak
    peak = measure_matmul_peak(n, name, repeats=3, matmuls_per_call=per_call, devices=local)
    return peak, f"measured, {n}^2 {name} matmul on {len(local)} {kind} device(s) at once"


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float, num_devices: int) -> float:
    """Model FLOPs utilisation: tokens_per_second * flops_per_token / (peak_flops_per_device * num_devices).

    Args:
      tokens_per_second: training throughput of the whole step (all devices).
      flops_per_token: FLOPs of one training step per token, backward included
        (~6 * num_params + attention).
      peak_flops_per_device: FLOP/s one device can reach.
      num_devices: the devices that run the step.

    Returns:
      A fraction, 1.0 being the peak.
    """
    if peak_flops_per_device <= 0 or num_devices < 1:
        raise ValueError(f"peak_flops_per_device={peak_flops_per_device} must be > 0 and "
                         f"num_devices={num_devices} >= 1.")
    return tokens_per_second * flops_per_token / (peak_flops_per_device * num_devices)


class Throughput:
    """Accumulates (tokens, seconds) per step and reports rates since the last report.

    Rates are total tokens over total seconds in the window, not a mean of per-step
    rates, so a slow step weighs by its length.
    """

    def __init__(self, flops_per_token: float, *, peak_flops_per_device: float | None = None,
                 num_devices: int | None = None):
        """Starts an empty window.

        Args:
          flops_per_token: FLOPs of one training step per token, backward included
            (~6 * num_params + attention).
          peak_flops_per_device: if given, `report` also returns `mfu`, `peak_flops_per_device`
            and `num_devices`.
          num_devices: the devices that run the step; required with a peak.
        """
        if peak_flops_per_device is not None and num_devices is None:
            raise ValueError("a peak per device needs num_devices, the devices that run the step")
        self.flops_per_token = flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.num_devices = num_devices
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

    def _rates(self, tokens: int, seconds: float) -> dict[str, float]:
        tokens_per_second = tokens / seconds if seconds > 0 else 0.0
        result = {"tokens_per_second": tokens_per_second,
                  "flops_per_second": tokens_per_second * self.flops_per_token}
        if self.peak_flops_per_device is not None:
            result.update(mfu=mfu(tokens_per_second, self.flops_per_token, self.peak_flops_per_device,
                                  self.num_devices),
                          peak_flops_per_device=self.peak_flops_per_device, num_devices=self.num_devices)
        return result

    def report(self) -> dict[str, float]:
        """Returns tokens_per_second, flops_per_second (and mfu, peak_flops_per_device,
        num_devices) and starts a new window.

        Returns an empty dict when no time has been recorded since the last report.
        """
        if self._seconds <= 0:
            return {}
        result = self._rates(self._tokens, self._seconds)
        self._tokens, self._seconds = 0, 0.0
        return result

    def totals(self) -> dict[str, float]:
        """Rates over everything added since construction (windows are not reset by this);
        zeros when no time was recorded."""
        result = self._rates(self._total_tokens, self._total_seconds)
        result.setdefault("mfu", 0.0)
        return result
