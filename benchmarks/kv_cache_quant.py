"""int8 and fp8 KV caches against the float cache: bytes, logit error, greedy agreement, decode speed.

1. Bytes, by formula (`inference.kv_cache.kv_cache_bytes`, which tests/inference/test_kv_quant.py
   checks equals the allocated buffers): one row of the context length of configs/gpt.py:default
   and of configs/llama.py:llama3_8b (8192 positions), int8/fp8 (codes + a float32 scale per
   position and kv head) against float32 and bf16 caches.
2. Quality and speed on a trained model: configs/gpt.py:default trained by the trainer for
   --steps steps (or --checkpoint, a `python -m train` workdir), `inference.kv_quant.kv_quant_report`
   over prompts cut from the held-out text: max and mean |logit - float logit| teacher-forced on
   the float cache's greedy continuation, top-1 agreement there, greedy-token agreement over
   --new_tokens tokens, and decode tokens/s (the best of --repeats decode loops, each format
   timed in the same run).

Run:
  python benchmarks/kv_cache_quant.py                          # trains 60 steps into a temp dir
  python benchmarks/kv_cache_quant.py --checkpoint=/tmp/run    # a trained workdir
"""

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import jax.numpy as jnp

from configs.loader import load_config
from inference.kv_cache import kv_cache_bytes
from inference.kv_quant import kv_quant_report
from inference.load import load
from train import build


def with_cache(config, dtype, quant: str):
    """`config` with its cache in `dtype` (quant "") or quantized."""
    block = dataclasses.replace(config.block, dtype=jnp.dtype(dtype), kv_cache_quant=quant)
    return dataclasses.replace(config, block=block)


def bytes_rows() -> list[tuple]:
    """(preset, length, cache, bytes, ratio to float32, ratio to bf16) for one row of each preset at its
    context length."""
    rows = []
    for spec, vocab in (("configs/gpt.py:default", 2048), ("configs/llama.py:llama3_8b", 128256)):
        config = build.model(load_config(str(_ROOT / spec)), vocab).config
        length = config.max_len
        f32, bf16 = (kv_cache_bytes(with_cache(config, d, ""), 1, length) for d in ("float32", "bfloat16"))
        for name, quant, dtype in (("float32", "", "float32"), ("bfloat16", "", "bfloat16"),
                                   ("int8", "int8", "bfloat16"), ("fp8", "fp8", "bfloat16")):
            n = kv_cache_bytes(with_cache(config, dtype, quant), 1, length)
            rows.append((spec.split("/")[-1], length, name, n, n / f32, n / bf16))
    return rows


def trained_workdir(steps: int, root: str) -> str:
    from train import trainer

    config = load_config(str(_ROOT / "configs/gpt.py:default"),
                         [f"steps={steps}", "schedule.warmup_steps=10", "logging.progress_bar=false",
                          "eval.every_steps=0", "eval.max_batches=2", "eval.num_samples=0",
                          f"checkpoint.save_interval_steps={steps}", "checkpoint.async_save=false",
                          "logging.peak_flops=1e11", "tokenizer.train_bytes=2000000"])
    trainer.run(config, root)
    return root


def prompts_from(tokenizer, workdir: str, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens from the embedded corpus' held-out split (as the run built it)."""
    from data import sources

    held_out = sources.open_split("embedded", "validation", data_dir=os.path.join(workdir, "tfds"))
    ids = (tokenizer.encode(held_out[i]) for i in range(len(held_out)))
    return [p[:length] for p in ids if len(p) >= length][:count]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a trained `python -m train` workdir")
    parser.add_argument("--steps", type=int, default=60, help="training steps when no --checkpoint is given")
    parser.add_argument("--workdir", default=None, help="where to train (default: a temporary directory)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print("KV-cache bytes, one row at the preset's context length:")
    print(f"{'preset':>16} {'length':>6} {'cache':>8} {'bytes':>14} {'/ float32':>9} {'/ bf16':>7}")
    for preset, length, f, n, r32, r16 in bytes_rows():
        print(f"{preset:>16} {length:>6} {f:>8} {n:>14,} {r32:>9.4f} {r16:>7.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.checkpoint or trained_workdir(args.steps, args.workdir or tmp)
        loaded = load(workdir)
        prompts = prompts_from(loaded.tokenizer, workdir, args.prompts, args.prompt_len)
        rows = kv_quant_report(loaded.model, loaded.params, prompts, max_new_tokens=args.new_tokens,
                               timing_repeats=args.repeats)
    print(f"\n{loaded.source} ({len(prompts)} prompts of {args.prompt_len} tokens, {args.new_tokens} greedy "
          f"tokens each, model.dtype {jnp.dtype(loaded.model.config.block.dtype).name}):")
    keys = ("cache_bytes", "bytes_vs_float32", "max_logit_error", "mean_logit_error", "top1_agreement",
            "greedy_agreement", "greedy_prefix", "decode_tokens_per_s", "speed_vs_float")
    print(f"{'cache':>6} " + " ".join(f"{k:>19}" for k in keys))
    for r in rows:
        print(f"{r['kv_cache']:>6} " + " ".join(f"{r[k]:>19.4g}" for k in keys))


if __name__ == "__main__":
    main()
