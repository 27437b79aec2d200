"""Memory of the LM loss (plain vs chunked cross-entropy) and time to the first training step
(persistent compilation cache off, cold, warm), measured side by side in one run.

(a) Loss memory: the jitted loss-and-gradient (w.r.t. the hidden states and the head kernel) of
    `train.losses.cross_entropy` on the full [B, T, V] logits against
    `train.losses.chunked_cross_entropy` (C positions at a time), compiled only (never run):
    XLA's `memory_analysis()` of each program, its temporaries (what the loss adds beyond its
    inputs and outputs) and in total. Default: B x T = 8 x 1024, D = 1024, V = 32768 and
    151936 (LLaMA-2 / Qwen2 vocabularies), C = 128 and 32 positions (chunks of B x C = 1024
    and 256 tokens), float32.
(b) Start-up: `python -m train` (configs/gpt.py:PRESET, one step) in fresh processes, the
    tokenizer and data prepared once beforehand: with `train.compilation_cache_dir=none`
    (off), with an empty cache directory (cold: compiles and writes) and again (warm: loads).
    Reported from each run's summary: seconds from `train.trainer.run` to the first step's
    metrics, programs compiled and programs loaded from the cache by then, and the wall time of
    the whole process.

Run:
  python benchmarks/memory_startup.py                  # both, full sizes (compiles only: no large memory used)
  python benchmarks/memory_startup.py --preset=small   # start-up of GPT-2 small instead of the default preset
  python benchmarks/memory_startup.py --quick          # tiny shapes, the tiny preset, cold and warm only (the test)
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from configs.loader import load_config
from models.gpt import LMHead
from train import build, losses

MIB = 2**20
# Chunks count positions of every row: C = 128 and 32 at B = 8 are chunks of 1024 and 256 tokens.
FULL_SHAPES = {"batch": 8, "seq_len": 1024, "d_model": 1024, "vocabs": (32768, 151936), "chunks": (128, 32)}
QUICK_SHAPES = {"batch": 2, "seq_len": 256, "d_model": 16, "vocabs": (2048,), "chunks": (16,)}
STARTUP_OVERRIDES = ("steps=1", "schedule.warmup_steps=0", "eval.max_batches=1", "eval.num_samples=0",
                     "logging.progress_bar=false", "logging.peak_flops=1e11", "checkpoint.async_save=false")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / MIB:>9,.0f} MiB" if num_bytes >= MIB else f"{num_bytes / 1024:>9,.1f} KiB"


def loss_memory(batch: int, seq_len: int, d_model: int, vocab: int, chunk_size: int = 0) -> dict[str, int]:
    """Compiled memory (bytes) of the float32 loss-and-gradient of an untied LM head.

    Args:
      batch, seq_len, d_model, vocab: B, T, D, V.
      chunk_size: C > 0: `chunked_cross_entropy`; 0: `cross_entropy` on the whole logits.

    Returns:
      {"temp", "arguments", "outputs", "total"}: XLA's memory analysis of the program
      (total = arguments + outputs + temporaries, less the outputs aliased to arguments).
    """
    def loss(hidden_BTD, kernel_DV, targets_BT):
        head = LMHead(kernel_DV, tied=False)
        if chunk_size:
            return losses.chunked_cross_entropy(hidden_BTD, head, targets_BT, chunk_size=chunk_size)[0]
        return losses.cross_entropy(head(hidden_BTD), targets_BT)[0]

    args = (jax.ShapeDtypeStruct((batch, seq_len, d_model), jnp.float32),
            jax.ShapeDtypeStruct((d_model, vocab), jnp.float32),
            jax.ShapeDtypeStruct((batch, seq_len), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
            "outputs": m.output_size_in_bytes, "total": total}


def memory_table(shapes: dict) -> list[dict]:
    """`loss_memory` of the plain loss and every chunk size, per vocabulary; printed as it goes."""
    B, T, D = shapes["batch"], shapes["seq_len"], shapes["d_model"]
    rows = []
    print(f"(a) loss + gradient memory, compiled only: B x T = {B} x {T}, D = {D}, float32 "
          "(temp: beyond inputs and outputs)")
    for V in shapes["vocabs"]:
        plain = loss_memory(B, T, D, V)
        logits = B * T * V * 4
        print(f"  V = {V:>7,}: the logits alone {_size(logits)}")
        print(f"    plain                          temp {_size(plain['temp'])}   total {_size(plain['total'])}")
        for C in shapes["chunks"]:
            chunked = loss_memory(B, T, D, V, C)
            print(f"    chunked C={C:<4} ({B * C:>5} tokens) temp {_size(chunked['temp'])}   total {_size(chunked['total'])}   "
                  f"{plain['total'] / chunked['total']:.1f}x less in total")
            rows.append({"batch": B, "seq_len": T, "d_model": D, "vocab": V, "chunk_size": C, "logits_bytes": logits,
                         "plain": plain, "chunked": chunked})
    return rows


def _train_once(workdir: str, preset: str, cache: str, prepared: list[str]) -> dict:
    """One `python -m train` step in a fresh process; its summary's startup and its wall time."""
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    overrides = [*STARTUP_OVERRIDES, f"train.compilation_cache_dir={cache}", *prepared]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "train", f"--config=configs/gpt.py:{preset}", f"--workdir={workdir}",
                          *(f"--config.{o}" for o in overrides)], check=False, cwd=_ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"python -m train failed ({out.returncode}): {out.stderr[-2000:]}")
    with open(os.path.join(workdir, "summary.json")) as f:
        return {**json.load(f)["startup"], "process_seconds": wall}


def startup_table(preset: str, root: str, *, with_off: bool = True) -> dict[str, dict]:
    """Time to the first step of `preset` with the cache off, cold and warm (module docstring)."""
    config = load_config(os.path.join(_ROOT, "configs", "gpt.py") + f":{preset}", [f"data.data_dir={root}/tfds"])
    build.tokenizer(config, root, build.data_config(config, root))  # the tokenizer and data, once, for every run
    prepared = [f"tokenizer.path={root}/tokenizer", f"data.data_dir={root}/tfds"]
    cache = os.path.join(root, "jax_cache")
    runs = {}
    if with_off:
        runs["off"] = _train_once(os.path.join(root, "off"), preset, "none", prepared)
    runs["cold"] = _train_once(os.path.join(root, "cold"), preset, cache, prepared)
    runs["warm"] = _train_once(os.path.join(root, "warm"), preset, cache, prepared)
    print(f"(b) start-up of `python -m train --config=configs/gpt.py:{preset}` (one step, fresh processes)")
    for name, r in runs.items():
        print(f"  {name:<5} first step after {r['seconds_to_first_step']:6.1f} s (process {r['process_seconds']:6.1f} s):"
              f" {r['programs_compiled']} programs compiled, {r['compilation_cache_hits']} loaded from the cache")
    warm = runs["warm"]
    for name in [n for n in ("off", "cold") if n in runs]:
        r = runs[name]
        print(f"  {name} / warm: first step {r['seconds_to_first_step'] / warm['seconds_to_first_step']:.2f}x, "
              f"process {r['process_seconds'] / warm['process_seconds']:.2f}x")
    return runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default", help="configs/gpt.py preset of the start-up runs")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--skip_startup", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, the tiny preset, cold and warm start-up only (the test)")
    args = parser.parse_args(argv)
    results = {}
    if not args.skip_memory:
        results["memory"] = memory_table(QUICK_SHAPES if args.quick else FULL_SHAPES)
    if not args.skip_startup:
        with tempfile.TemporaryDirectory() as root:
            results["startup"] = startup_table("tiny" if args.quick else args.preset, root, with_off=not args.quick)
    return results


if __name__ == "__main__":
    main()
