"""Decoding speed: KV cache against recomputing the prefix, and against transformers' generate.

1. Cache or not. `inference.generate` (prefill once, then one token per step against the
   cache) against a loop that recomputes the whole sequence for every new token (a jitted
   loop over a buffer of the final length, as train/samples.py does: static shapes). Per
   token, the cached step costs the weights once plus attention over the positions so far;
   the recomputing step costs the weights once per position. So the total time of N new
   tokens grows about linearly with the cache and quadratically without: doubling N
   doubles the first and (once N dominates the prompt) quadruples the second.
2. Against transformers. The same weights (a LLaMA-style model of ~5M parameters, random,
   written by `models.hf.save_pretrained` and read by transformers' `from_pretrained`),
   greedy, exactly N new tokens per row, on the CPU with the same number of threads for
   both: torch.set_num_threads(n), n = the CPUs this process may run on, which is the size
   of XLA's CPU thread pool. The tokens are compared too.

Times are the best of `--repeats` runs after a warm-up run of the same shapes (which
compiles the JAX programs); generate's time includes the prefill and the host round trips.

Run:
  python benchmarks/decode.py
  python benchmarks/decode.py --quick          # or LMLAB_QUICK=1: fewer, shorter lengths
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from inference import generate
from models import hf
from models.gpt import GPT, llama_config
from models.random_params import random_params

PROMPT_LEN = 16


def bench_model(quick: bool) -> GPT:
    """LLaMA-style: RoPE, RMSNorm, SwiGLU, GQA; ~5M parameters (quick: ~0.6M)."""
    if quick:
        cfg = llama_config(vocab_size=1024, d_model=96, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=256,
                           max_len=128)
    else:
        cfg = llama_config(vocab_size=4096, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, d_ff=704,
                           max_len=512)
    return GPT(cfg)


def recompute_fn(model: GPT, prompt_len: int, num_tokens: int):
    """Greedy decoding without a cache: step t runs the model over the whole [B, P + N] buffer."""

    @jax.jit
    def run(params, tokens_BL):
        def step(t, tokens_BL):
            logits_BV = model.apply({"params": params}, tokens_BL)[:, t - 1]
            return tokens_BL.at[:, t].set(jnp.argmax(logits_BV, axis=-1).astype(tokens_BL.dtype))

        return jax.lax.fori_loop(prompt_len, prompt_len + num_tokens, step, tokens_BL)

    return run


def best_time(fn, repeats: int) -> tuple[float, object]:
    """(best seconds of `repeats` calls after one warm-up call, the last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def cache_vs_recompute(model, params, prompts, lengths, repeats):
    """Rows of (N, cached seconds, recompute seconds) for greedy decoding of N new tokens."""
    rows = []
    P = len(prompts[0])
    for n in lengths:
        cached_s, cached = best_time(lambda n=n: generate(model, params, prompts, max_new_tokens=n), repeats)
        buffer = np.zeros((len(prompts), P + n), np.int32)
        buffer[:, :P] = prompts
        run = recompute_fn(model, P, n)
        recompute_s, full = best_time(lambda run=run, buffer=buffer: np.asarray(run(params, buffer)), repeats)
        if full[:, P:].tolist() != cached:
            raise AssertionError(f"N={n}: cached and recomputed greedy tokens differ")
        rows.append((n, cached_s, recompute_s))
    return rows


def against_transformers(model, params, prompts, num_tokens, repeats, threads):
    """(ours seconds, transformers seconds, same tokens) for greedy decoding of `num_tokens`."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(model, params, directory)
        theirs_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    def theirs():
        with torch.no_grad():
            return theirs_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=num_tokens, min_new_tokens=num_tokens, eos_token_id=None,
                                         pad_token_id=0, top_k=None, top_p=None, temperature=None)

    ours_s, ours = best_time(lambda: generate(model, params, prompts, max_new_tokens=num_tokens), repeats)
    theirs_s, out = best_time(theirs, repeats)
    return ours_s, theirs_s, out[:, len(prompts[0]):].tolist() == ours


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short lengths and a small model (also LMLAB_QUICK=1)")
    parser.add_argument("--lengths", default=None, help="comma-separated new-token counts (default 32,64,128,256)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best is kept)")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("LMLAB_QUICK") == "1"
    lengths = [int(x) for x in (args.lengths or ("8,16,32" if quick else "32,64,128,256")).split(",")]
    repeats = 1 if quick else args.repeats
    model = bench_model(quick)
    cfg = model.config
    if PROMPT_LEN + max(lengths) > cfg.max_len:
        parser.error(f"prompt {PROMPT_LEN} + longest length {max(lengths)} exceeds max_len={cfg.max_len}")
    params = random_params(model)
    prompts = np.random.default_rng(1).integers(1, cfg.vocab_size, (args.batch, PROMPT_LEN)).tolist()
    threads = len(os.sched_getaffinity(0))
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; XLA's CPU thread pool and torch: {threads} threads")
    print(f"model: LLaMA-style, {cfg.num_layers} layers x {cfg.block.d_model}, {cfg.block.num_heads} heads "
          f"({cfg.block.kv_heads} kv), vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:.2f}M parameters, float32")
    print(f"greedy, batch {args.batch}, prompt {PROMPT_LEN} tokens; best of {repeats} after a warm-up\n")

    print("1. KV cache against recomputing the prefix for every token")
    header = (f"{'new N':>6} {'cache s':>9} {'tokens/s':>9} {'x prev':>7} {'recompute s':>12} {'tokens/s':>9} "
              f"{'x prev':>7} {'cache speed-up':>14}")
    print(header)
    print("-" * len(header))
    rows = cache_vs_recompute(model, params, prompts, lengths, repeats)
    previous = None
    for n, cached_s, recompute_s in rows:
        growth = ("", "") if previous is None else (f"{cached_s / previous[1]:6.2f}x", f"{recompute_s / previous[2]:6.2f}x")
        print(f"{n:6d} {cached_s:9.4f} {args.batch * n / cached_s:9.0f} {growth[0]:>7} {recompute_s:12.4f} "
              f"{args.batch * n / recompute_s:9.0f} {growth[1]:>7} {recompute_s / cached_s:13.1f}x", flush=True)
        previous = (n, cached_s, recompute_s)
    print("(x prev: time against the previous N, which is half as long: ~2x is linear, ~4x quadratic)\n")

    n = lengths[len(lengths) // 2]
    print(f"2. against transformers' generate (torch {threads} threads), {n} new tokens")
    ours_s, theirs_s, same = against_transformers(model, params, prompts, n, repeats, threads)
    print(f"lmlab generate:        {ours_s:.4f} s  {args.batch * n / ours_s:8.0f} tokens/s")
    print(f"transformers generate: {theirs_s:.4f} s  {args.batch * n / theirs_s:8.0f} tokens/s")
    print(f"ratio (transformers time / lmlab time): {theirs_s / ours_s:.2f}x; same tokens: {same}")
    return {"cache_vs_recompute": rows, "transformers": (n, ours_s, theirs_s, same)}


if __name__ == "__main__":
    main()
