"""The accelerator benchmark: training MFU of a 1B and an 8B LLaMA, attention side by side, decode speed.

One command on one GPU (or TPU) prints three tables and a JSON line per measurement:

1. Training MFU. Llama-3.2-1B's shape (Llama-3-8B's preset with 16 layers of width 2048 and
   SwiGLU 8192, tied embeddings: 1,235,814,400 parameters) and Llama-3-8B
   (`configs/llama.py:llama3_8b`, 8,030,261,248), in bfloat16 compute under the `fsdp`
   strategy (one device: a mesh of one), layers scanned, the attention implementation
   cuDNN's on a GPU (else XLA's), the loss chunked through the head (`model.loss_chunk_size`).
   The 1B runs without remat; the 8B keeps its preset's full remat and stores its parameters
   (and so its Adam moments) in bfloat16: in float32 they alone take 8.03e9 x 16 bytes =
   128 GB. The batch is the largest whose compiled step (XLA's memory analysis of the
   trainer's own program) needs at most `--memory_fraction` of the memory JAX's allocator may
   use (95% of the device's here, unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise). The
   step is built and timed as `benchmarks/train_throughput.py` does (`build_program`,
   `time_steps`), and
       MFU = 3 * flops_per_token(T) * tokens/s / peak
   against the device's datasheet dense peak (`train.metrics.datasheet_peak_flops`) and
   against a bfloat16 matmul measured in the same run (`train.metrics.measure_matmul_peak`).
2. Attention: each implementation (xla, blockwise, pallas, cudnn) on the 8B's heads
   (32 query, 8 key/value, head dim 128), causal, forward + backward, by sequence length
   1k..32k: time, compiled memory, and its largest difference from xla's output and
   gradients where xla fits. An implementation that cannot run (not on this device, not in
   this checkout, more memory than the budget) is skipped with the reason.
3. Decode: new tokens/s of `inference.generate` (KV cache, greedy) on the 1B at batch 1
   and 64 (prefill included).

Run:
  python -m benchmarks.gpu                       # or python benchmarks/gpu.py
  python -m benchmarks.gpu --sections=mfu --models=8b --seq_len=8192
  python -m benchmarks.gpu --quick               # tiny sizes on a CPU in float32 (the test): the same
                                                 # code paths, plus the real 1B/8B programs lowered
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

# JAX's GPU allocator takes 75% of the memory by default; the batch search budgets against what
# it may use (memory_stats' bytes_limit), so let it have nearly all (a value set by the user wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks import train_throughput
from configs.loader import load_config
from inference.generate import generate
from models.layers import attention as attention_lib
from sharding import rules as rules_lib
from train import build, validate
from train.metrics import datasheet_peak_flops, measure_matmul_peak

LLAMA = str(_ROOT / "configs" / "llama.py")
# name -> (preset, overrides, parameters as published). The 1B is Llama-3.2-1B's shape.
MODELS = {
    "1b": ("llama3_8b", ["model.num_layers=16", "model.block.d_model=2048", "model.block.d_ff=8192",
                         "model.tie_embeddings=true", "model.remat=none"], 1_235_814_400),
    "8b": ("llama3_8b", ["model.param_dtype=bfloat16"], 8_030_261_248),
}
# Every size: bfloat16 compute, one compiled layer under nn.scan.
COMMON = ["model.dtype=bfloat16", "model.scan_layers=true"]
# --quick: the tiny preset in float32 stands in for both (bfloat16 matmuls on a CPU are emulated).
QUICK_MODELS = {"1b": ("tiny", []), "8b": ("tiny", ["model.remat=full"])}
QUICK_COMMON = ["model.dtype=float32", "model.scan_layers=true"]
ATTENTION_IMPLS = attention_lib.ATTENTION_IMPLS
GIB = 2**30


def emit(section: str, **fields) -> dict:
    """Prints one JSON line (for collecting numbers) and returns its fields."""
    print(json.dumps({"section": section, **fields}, default=float), flush=True)
    return fields


def device_memory_bytes(device) -> int | None:
    """The memory XLA may allocate on `device` (None where the backend does not say: CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def compiled_bytes(compiled) -> int:
    """Device memory a compiled program needs: arguments + outputs + temporaries - donated
    (aliased) buffers + code, from XLA's memory analysis."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes + m.generated_code_size_in_bytes)


def model_config(name: str, seq_len: int, *, quick: bool, attention: str, extra: list[str] = (),
                 remat: str | None = None):
    """The run config of model `name` at `seq_len` (checked by `train.validate`: a bad
    combination is a one-line error), and notes on what was changed to make it run."""
    preset, overrides, _ = (QUICK_MODELS[name] + (None,)) if quick else MODELS[name]
    # The loss through the head 1024 positions at a time: never the [B, T, V] logits (V = 128256).
    config = load_config(LLAMA + ":" + preset, [*(QUICK_COMMON if quick else COMMON), *overrides,
                                                f"data.seq_len={seq_len}", f"model.max_len={seq_len}",
                                                f"model.block.attention_impl={attention}",
                                                f"model.loss_chunk_size={min(seq_len, 1024)}", *extra,
                                                *([f"model.remat={remat}"] if remat else [])])
    with tempfile.TemporaryDirectory() as workdir:  # nothing is written there
        try:
            validate.check(config, workdir)
        except ValueError as e:
            raise SystemExit(f"error: {name}: {e}") from None
    notes = []
    if name == "8b" and not quick:
        notes.append("8B: parameters and Adam moments in bfloat16 (in float32 they alone take 128 GB), full remat")
    return config, notes


def choose_batch(program, seq_len: int, budget: int, *, multiple: int, max_batch: int, rng):
    """The largest batch (a multiple of `multiple`, at most `max_batch`) whose compiled step
    needs at most `budget` bytes.

    XLA's memory grows about linearly with the batch: two compiles (at `multiple` and twice
    it) give the line, the predicted batch is compiled to check, and while it does not fit
    the line is refit through it and the batch lowered (by `multiple` at least).

    Returns:
      (batch, its compiled step, [(batch, bytes) of every compile]) or (None, None, tried)
      when even `multiple` rows do not fit.
    """
    tried = []

    def compile_at(b):
        compiled = program.step.lower(program.abstract_state, program.abstract_batch(b, seq_len), rng).compile()
        tried.append((b, compiled_bytes(compiled)))
        return compiled, tried[-1][1]

    small, small_bytes = compile_at(multiple)
    if small_bytes > budget:
        return None, None, tried
    if 2 * multiple > max_batch:
        return multiple, small, tried
    double, double_bytes = compile_at(2 * multiple)
    if double_bytes > budget:
        return multiple, small, tried
    per_row = (double_bytes - small_bytes) / multiple
    fixed = small_bytes - per_row * multiple
    batch = max_batch if per_row <= 0 else int((budget - fixed) / per_row) // multiple * multiple
    batch = min(max(batch, 2 * multiple), max_batch)
    best, best_compiled = 2 * multiple, double
    while batch > best:
        compiled, nbytes = compile_at(batch)
        if nbytes <= budget:
            best, best_compiled = batch, compiled
            break
        # Refit the line through the smallest batch and this one, which is nearer the budget.
        per_row = (nbytes - small_bytes) / (batch - multiple)
        predicted = int((budget - small_bytes) / per_row) // multiple * multiple + multiple
        batch = max(best, min(batch - multiple, predicted))
    return best, best_compiled, tried


def train_mfu(name: str, args, peaks: dict, budget: int) -> dict:
    """Section 1 for one model: memory-chosen batch, timed trainer steps, MFU against both peaks."""
    devices = jax.devices()[:args.devices]
    rng = jax.random.key(1)
    attention, fallback = args.attention, []
    while True:
        config, notes = model_config(name, args.seq_len, quick=args.quick, attention=attention, remat=args.remat)
        model, program = train_throughput.build_program(config, strategy="fsdp", mesh_spec=f"fsdp={len(devices)}",
                                                        devices=devices)
        try:
            batch, compiled, tried = choose_batch(program, args.seq_len, budget, multiple=len(devices),
                                                  max_batch=args.max_batch, rng=rng)
            break
        except (ValueError, NotImplementedError, RuntimeError) as e:
            if attention == "xla":
                raise
            # cuDNN's fused attention needs a recent enough cuDNN and supported shapes.
            fallback = [f"attention {attention} failed to compile ({str(e).splitlines()[0][:160]}); xla used"]
            print(f"  {name}: {fallback[0]}")
            attention = "xla"
    cfg = model.config
    settings = {"strategy": "fsdp", "devices": len(devices), "dtype": config.model.dtype,
                "param_dtype": config.model.param_dtype, "remat": config.model.remat,
                "scan_layers": config.model.scan_layers, "attention": attention, "notes": notes + fallback}
    if batch is None:
        print(f"{name}: skipped: {tried[0][1] / GIB:.1f} GiB compiled at batch {tried[0][0]} exceeds the budget "
              f"{budget / GIB:.1f} GiB")
        return emit("mfu", model=name, skipped="does not fit", tried=tried, budget_bytes=budget, **settings)
    state = program.init(jax.random.key(0))
    data = rules_lib.device_put_batch(train_throughput.synthetic_batch(batch, args.seq_len, cfg.vocab_size),
                                      program.layout.batch)
    _, step_seconds, state, _ = train_throughput.time_steps(compiled, state, data, rng, args.steps, args.warmup)
    del state, data, compiled
    gc.collect()
    tokens_per_second = batch * args.seq_len / step_seconds
    flops = 3 * cfg.flops_per_token(args.seq_len) * tokens_per_second
    result = {"model": name, "params": cfg.num_params(), "layers": cfg.num_layers, "d_model": cfg.block.d_model,
              "batch": batch, "seq_len": args.seq_len, "compiled_bytes": dict(tried)[batch], "budget_bytes": budget,
              "tried": tried, "step_seconds": step_seconds, "tokens_per_second": tokens_per_second,
              "model_flops_per_second": flops, **settings}
    for source, peak in peaks.items():
        result[f"mfu_{source}"] = None if peak is None else flops / (peak * len(devices))
    return emit("mfu", **result)


def lowered_real_models(args) -> list[dict]:
    """--quick: the real 1B and 8B programs traced and lowered (not compiled) on this host: their
    parameter counts from `jax.eval_shape`, and the fsdp step with their dtypes, remat and scan."""
    rows = []
    for name, (_, _, published) in MODELS.items():
        config, notes = model_config(name, 4096, quick=False, attention="xla")
        model, program = train_throughput.build_program(config, strategy="fsdp", mesh_spec="fsdp=1")
        params = sum(x.size for x in jax.tree.leaves(program.abstract_state.params))
        lowered = program.step.lower(program.abstract_state, program.abstract_batch(1, 4096), jax.random.key(0))
        rows.append(emit("lowered", model=name, params=params, published_params=published,
                         config_params=model.config.num_params(), remat=config.model.remat,
                         param_dtype=config.model.param_dtype, lowered=lowered is not None, notes=notes))
        print(f"  {name}: {params:,} parameters (published {published:,}), fsdp step lowered with "
              f"remat={config.model.remat}, params {config.model.param_dtype}")
    return rows


def attention_fn(impl: str, dtype):
    """(the attention function of `impl`, None), or (None, why it cannot run here)."""
    if impl == "cudnn":
        try:
            attention_lib.check_cudnn(dtype)
        except ValueError as e:
            return None, str(e)
    if impl == "ring":
        return None, "context parallelism: one device here; benchmarks/context_parallel.py measures it"
    if impl == "pallas":
        try:
            import models.layers.pallas_attention  # noqa: F401
        except ImportError as e:
            return None, f"models/layers/pallas_attention.py cannot be imported in this checkout ({e})"
    return functools.partial(attention_lib.attend, impl=impl), None


def attention_inputs(batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype):
    """Random q [B, T, N, H], k and v [B, T, K, H] in `dtype`, and a float32 cotangent like q."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(seq_len), 4)
    return (jax.random.normal(kq, (batch, seq_len, heads, head_dim), dtype),
            jax.random.normal(kk, (batch, seq_len, kv_heads, head_dim), dtype),
            jax.random.normal(kv, (batch, seq_len, kv_heads, head_dim), dtype),
            jax.random.normal(kc, (batch, seq_len, heads, head_dim), jnp.float32))


def compile_attention(fn, q, k, v, cotangent):
    """Compiled causal forward + backward of `fn`: (q, k, v) -> (sum(out * cotangent), (dq, dk, dv))."""

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, causal=True).astype(jnp.float32) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()


def attention_side_by_side(args, budget: int | None) -> list[dict]:
    """Section 2: forward + backward of each implementation by T; time, memory, difference from xla."""
    B, N, K, H = (1, 4, 2, 16) if args.quick else (1, 32, 8, 128)
    dtype = jnp.float32 if args.quick else jnp.bfloat16
    rows = []
    for T in args.attention_lengths:
        q, k, v, cotangent = attention_inputs(B, T, N, K, H, dtype)
        reference = None
        for impl in ATTENTION_IMPLS:
            fn, reason = attention_fn(impl, dtype)
            row = {"impl": impl, "seq_len": T, "batch": B, "heads": N, "kv_heads": K, "head_dim": H,
                   "dtype": jnp.dtype(dtype).name}
            if fn is None:
                rows.append(emit("attention", **row, skipped=reason))
                continue
            try:
                compiled = compile_attention(fn, q, k, v, cotangent)
            except (ValueError, NotImplementedError, RuntimeError) as e:  # not these shapes, not on this device
                rows.append(emit("attention", **row, skipped=f"does not compile: {str(e).splitlines()[0][:200]}"))
                continue
            nbytes = compiled_bytes(compiled)
            if budget is not None and nbytes > budget:
                rows.append(emit("attention", **row, compiled_bytes=nbytes,
                                 skipped=f"needs {nbytes / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB"))
                continue
            out = jax.block_until_ready(compiled(q, k, v))
            seconds = []
            for _ in range(args.attention_repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v))
                seconds.append(time.perf_counter() - start)
            row.update(compiled_bytes=nbytes, seconds=statistics.median(seconds))
            # Forward with the cotangent's weights, then each input's gradient.
            values = [out[0]] + list(out[1])
            if impl == "xla":
                reference = values
            elif reference is not None:
                row["max_abs_diff"] = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                                       for a, b in zip(values, reference)]
                row["max_abs_ref"] = [float(jnp.max(jnp.abs(b.astype(jnp.float32)))) for b in reference]
            rows.append(emit("attention", **row))
            del compiled, out, values
        del reference
        gc.collect()
    return rows


def decode_speed(args) -> list[dict]:
    """Section 3: new tokens/s of `inference.generate` on the 1B (its decode layout: layers unscanned)."""
    new_tokens, prompt_len = (8, 8) if args.quick else (128, 128)
    config, _ = model_config("1b", prompt_len + new_tokens, quick=args.quick, attention="xla",
                             extra=["model.scan_layers=false", "model.remat=none",
                                    f"model.param_dtype={'float32' if args.quick else 'bfloat16'}"])
    model = build.model(config, config.tokenizer.vocab_size)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(lambda key: nn.unbox(model.init(key, ids))["params"])(jax.random.key(0))
    rows = []
    for batch in args.decode_batches:
        prompts = np.random.default_rng(batch).integers(1, model.config.vocab_size, (batch, prompt_len)).tolist()

        def run(prompts=prompts):
            return generate(model, params, prompts, max_new_tokens=new_tokens)

        out = run()  # compiles
        seconds = []
        for _ in range(args.decode_repeats):
            start = time.perf_counter()
            out = run()
            seconds.append(time.perf_counter() - start)
        best = min(seconds)
        rows.append(emit("decode", model="1b", batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                         generated=sum(len(row) for row in out), seconds=best,
                         tokens_per_second=batch * new_tokens / best, dtype=config.model.dtype))
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes in float32 on any device (the test)")
    parser.add_argument("--sections", default="mfu,attention,decode", help="some of mfu, attention, decode")
    parser.add_argument("--models", default=None,
                        help=f"some of {', '.join(MODELS)} (default all; --quick: 1b)")
    parser.add_argument("--seq_len", type=int, default=None, help="training sequence length (default 4096)")
    parser.add_argument("--devices", type=int, default=1, help="devices of the fsdp mesh")
    parser.add_argument("--max_batch", type=int, default=None, help="largest batch tried (default 256)")
    parser.add_argument("--memory_fraction", type=float, default=0.92,
                        help="share of the device's memory the compiled step may use")
    parser.add_argument("--memory_gb", type=float, default=None,
                        help="device memory in GiB where the backend does not report it (CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps first")
    parser.add_argument("--remat", default=None, help="model.remat of every trained model (default: the 1B "
                        "none, the 8B full)")
    parser.add_argument("--attention", default=None, help="attention implementation of the trained models "
                        "(default cudnn on a GPU, else xla)")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    args.models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if not sections <= {"mfu", "attention", "decode"} or not set(args.models or ()) <= set(MODELS):
        parser.error(f"--sections={args.sections} / --models={','.join(args.models or ())}: expected some of "
                     f"mfu,attention,decode / {','.join(MODELS)}")
    if not 0 < args.memory_fraction <= 1 or args.devices < 1 or args.devices > jax.device_count():
        parser.error(f"--memory_fraction={args.memory_fraction} must be in (0, 1] and --devices="
                     f"{args.devices} in [1, {jax.device_count()}]")
    args.sections = sections
    platform = jax.devices()[0].platform
    if args.attention is None:
        args.attention = "cudnn" if platform == "gpu" and not args.quick else "xla"  # cudnn: bf16 only
    if args.attention not in ATTENTION_IMPLS:
        parser.error(f"--attention={args.attention}; expected one of {ATTENTION_IMPLS}")
    if args.quick:
        # Few compiles (each takes seconds on a CPU): one timed model (the real 8B's remat and
        # bfloat16 parameters are lowered, not run), batch 1 or 2, one attention length.
        args.models = args.models or ["1b"]
        args.seq_len = args.seq_len or 64
        args.max_batch = args.max_batch or 2
        args.steps = args.steps or 2
        args.warmup = 1
        args.memory_gb = args.memory_gb or 0.25
        args.attention_lengths, args.attention_repeats = (256,), 1
        args.decode_batches, args.decode_repeats = (1, 4), 1
    else:
        args.models = args.models or list(MODELS)
        args.seq_len = args.seq_len or 4096
        args.max_batch = args.max_batch or 256
        args.steps = args.steps or 5
        args.attention_lengths, args.attention_repeats = tuple(1024 * 2**i for i in range(6)), 5
        args.decode_batches, args.decode_repeats = (1, 64), 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = jax.devices()[0]
    memory = device_memory_bytes(device)
    if memory is None:
        if args.memory_gb is None:
            raise SystemExit(f"error: {device.platform} does not report its memory; give --memory_gb")
        memory = int(args.memory_gb * GIB)
    if args.memory_gb is not None:
        memory = int(args.memory_gb * GIB)
    budget = int(args.memory_fraction * memory)
    dtype = "float32" if args.quick else "bfloat16"
    n = 512 if args.quick else 8192
    measured = (measure_matmul_peak(n, dtype, repeats=3, matmuls_per_call=4) if args.quick
                else measure_matmul_peak(n, dtype, repeats=5, matmuls_per_call=10))
    peaks = {"datasheet": datasheet_peak_flops(device.device_kind, dtype), "measured": measured}
    print(f"device: {device.platform} {device.device_kind}; memory {memory / GIB:.1f} GiB, budget "
          f"{args.memory_fraction:.0%} = {budget / GIB:.1f} GiB")
    sheet = "none in train/metrics.py's table" if peaks["datasheet"] is None else f"{peaks['datasheet'] / 1e12:.0f}"
    print(f"peak {dtype}: datasheet {sheet} TFLOP/s; measured now ({n}^2 matmuls) {measured / 1e12:.3f} TFLOP/s")
    emit("device", platform=device.platform, kind=device.device_kind, memory_bytes=memory, budget_bytes=budget,
         dtype=dtype, peak_datasheet=peaks["datasheet"], peak_measured=measured)
    results = {"peaks": peaks, "budget_bytes": budget, "mfu": [], "attention": [], "decode": [], "lowered": []}

    if "mfu" in args.sections:
        print(f"\n== training MFU (fsdp over {args.devices} device(s), T={args.seq_len}, attention "
              f"{args.attention}, batch chosen by compiled memory)")
        if args.quick:
            print("the real programs, lowered on this host:")
            results["lowered"] = lowered_real_models(args)
        header = (f"{'model':5} {'params':>9} {'remat':>6} {'params in':>9} {'batch':>5} {'memory':>10} "
                  f"{'step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU sheet':>9} {'MFU meas.':>9}")
        print(header)
        for name in args.models:
            r = train_mfu(name, args, peaks, budget)
            results["mfu"].append(r)
            if "skipped" in r:
                continue
            sheet = "-" if r["mfu_datasheet"] is None else f"{r['mfu_datasheet']:.1%}"
            print(f"{name:5} {r['params'] / 1e6:8.1f}M {r['remat']:>6} {r['param_dtype']:>9} {r['batch']:5d} "
                  f"{r['compiled_bytes'] / GIB:6.2f} GiB {r['step_seconds'] * 1e3:7.1f}ms "
                  f"{r['tokens_per_second']:10.0f} {r['model_flops_per_second'] / 1e12:8.3f} {sheet:>9} "
                  f"{r['mfu_measured']:9.1%}" + "".join(f"\n      note: {note}" for note in r["notes"]))
    if "attention" in args.sections:
        print(f"\n== attention, causal, forward + backward ({'float32' if args.quick else 'bfloat16'})")
        results["attention"] = attention_side_by_side(args, None if args.quick else budget)
        for r in results["attention"]:
            what = (f"skipped: {r['skipped']}" if "skipped" in r else
                    f"{r['seconds'] * 1e3:9.2f} ms {r['compiled_bytes'] / 2**20:10.1f} MiB" +
                    (f"  max |diff| from xla {max(r['max_abs_diff']):.2e}" if "max_abs_diff" in r else ""))
            print(f"T={r['seq_len']:6d} {r['impl']:10} {what}")
        for impl in ATTENTION_IMPLS:
            fits = [r["seq_len"] for r in results["attention"] if r["impl"] == impl and "skipped" not in r]
            print(f"longest T run by {impl}: {max(fits) if fits else 'none'}")
    if "decode" in args.sections:
        print("\n== decode with the KV cache (greedy, prefill included)")
        results["decode"] = decode_speed(args)
        for r in results["decode"]:
            print(f"batch {r['batch']:3d}: {r['tokens_per_second']:10.1f} new tokens/s "
                  f"({r['new_tokens']} after a {r['prompt_len']}-token prompt)")
    return results


if __name__ == "__main__":
    main()
