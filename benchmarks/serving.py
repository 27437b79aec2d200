"""Serving load test: concurrent clients against one at a time, on the same OpenAI server.

A random LLaMA-style model (a byte-level BPE's vocabulary) is served by
`inference.serve.app.create_app` on a loopback port (`running_server`). A fixed set of
requests (prompts of mixed lengths as token ids, `max_tokens` new tokens each, greedy,
streamed with logprobs=0 so every token arrives as its own chunk) is sent twice:
  1. sequentially: one request at a time, as a single client would;
  2. concurrently: `--concurrency` C clients at once, sharing the engine's decode steps
     (continuous batching over C slots).
Each phase stops launching requests after `--max_seconds` (a bounded run). Printed per phase:
requests/s, generated tokens/s, end-to-end latency and time to first token (TTFT) at
p50/p90/p99; then the ratios concurrent / sequential, measured side by side in one run.
A warm-up pass first compiles the engine's programs, so no phase pays for compilation.

Run:
  python benchmarks/serving.py                          # 64 requests, C = 16
  python benchmarks/serving.py --quick                  # or LMLAB_QUICK=1: a small model, 8 requests, C = 4
"""

import argparse
import asyncio
import os
import pathlib
import sys
import time

import numpy as np

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from data.tokenizer import ByteLevelBPE  # noqa: E402
from inference.load import Loaded  # noqa: E402
from inference.serve.app import create_app  # noqa: E402
from inference.serve.testing import running_server  # noqa: E402
from models.gpt import GPT, llama_config  # noqa: E402
from models.random_params import random_params  # noqa: E402

TEXT = "The server shares decode steps between the requests it holds; a new request takes a free slot. " * 20


def bench_loaded(quick: bool) -> Loaded:
    """A random LLaMA-style model (~3M parameters; quick: ~0.2M) and the BPE of its vocabulary."""
    bpe = ByteLevelBPE.train(TEXT, 512)
    if quick:
        cfg = llama_config(vocab_size=bpe.vocab_size, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           d_ff=128, max_len=128)
    else:
        cfg = llama_config(vocab_size=bpe.vocab_size, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4,
                           d_ff=704, max_len=256)
    model = GPT(cfg)
    return Loaded(model, random_params(model), bpe, "random")


def jobs(num: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`num` prompts of 8 to 48 token ids (not the eos)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab - 1, size=int(rng.integers(8, 49))).tolist() for _ in range(num)]


async def one(client, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, tokens) of one streamed greedy completion."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             logprobs=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.tokens:
            first = first or time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - start, first or 0.0, tokens


async def phase(url: str, prompts, max_tokens: int, concurrency: int, max_seconds: float) -> dict:
    """Sends `prompts` with `concurrency` in flight, launching none after `max_seconds`."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    results, pending = [], list(prompts)
    start = time.perf_counter()

    async def worker():
        while pending and time.perf_counter() - start < max_seconds:
            results.append(await one(client, pending.pop(0), max_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    latency, ttft, tokens = (np.array(x) for x in zip(*results))
    return {"requests": len(results), "seconds": elapsed, "requests_per_s": len(results) / elapsed,
            "tokens_per_s": tokens.sum() / elapsed, "tokens": int(tokens.sum()),
            **{f"latency_p{q}": float(np.percentile(latency, q)) for q in (50, 90, 99)},
            **{f"ttft_p{q}": float(np.percentile(ttft, q)) for q in (50, 90, 99)}}


def _row(name: str, r: dict) -> str:
    return (f"{name:<12} {r['requests']:>4} req in {r['seconds']:7.2f} s  {r['requests_per_s']:7.2f} req/s  "
            f"{r['tokens_per_s']:8.1f} tok/s  latency p50/p90/p99 {r['latency_p50']:.3f}/{r['latency_p90']:.3f}/"
            f"{r['latency_p99']:.3f} s  TTFT p50/p90/p99 {r['ttft_p50']:.3f}/{r['ttft_p90']:.3f}/{r['ttft_p99']:.3f} s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("LMLAB_QUICK") == "1")
    parser.add_argument("--requests", type=int, default=None, help="requests per phase (64; quick: 8)")
    parser.add_argument("--concurrency", type=int, default=None, help="C, clients at once (16; quick: 4)")
    parser.add_argument("--max_tokens", type=int, default=None, help="new tokens per request (64; quick: 8)")
    parser.add_argument("--max_seconds", type=float, default=120.0, help="no request is launched after this")
    args = parser.parse_args(argv)
    num = args.requests or (8 if args.quick else 64)
    concurrency = args.concurrency or (4 if args.quick else 16)
    max_tokens = args.max_tokens or (8 if args.quick else 64)
    if min(num, concurrency, max_tokens) < 1 or args.max_seconds <= 0:
        parser.error("--requests, --concurrency, --max_tokens and --max_seconds must be positive")
    loaded = bench_loaded(args.quick)
    prompts = jobs(num, loaded.model.config.vocab_size)
    app = create_app(loaded, model_name="bench", num_slots=concurrency, max_queue=num)
    with running_server(app) as url:
        asyncio.run(phase(url, prompts[:concurrency], max_tokens, concurrency, args.max_seconds))  # compile
        sequential = asyncio.run(phase(url, prompts, max_tokens, 1, args.max_seconds))
        concurrent = asyncio.run(phase(url, prompts, max_tokens, concurrency, args.max_seconds))
    print(f"serving load test: {num} requests of {max_tokens} new tokens, prompts 8-48 tokens, "
          f"{loaded.model.config.num_params() / 1e6:.2f}M-parameter model, {concurrency} slots, loopback")
    print(_row("sequential", sequential))
    print(_row(f"concurrent={concurrency}", concurrent))
    ratios = {"throughput": concurrent["tokens_per_s"] / sequential["tokens_per_s"],
              "requests_per_s": concurrent["requests_per_s"] / sequential["requests_per_s"],
              "latency_p50": concurrent["latency_p50"] / sequential["latency_p50"],
              "ttft_p50": concurrent["ttft_p50"] / sequential["ttft_p50"]}
    print(f"ratios (concurrent / sequential): tokens/s x{ratios['throughput']:.2f}, requests/s "
          f"x{ratios['requests_per_s']:.2f}, latency p50 x{ratios['latency_p50']:.2f}, TTFT p50 "
          f"x{ratios['ttft_p50']:.2f}")
    return {"sequential": sequential, "concurrent": concurrent, "ratios": ratios}


if __name__ == "__main__":
    main()
