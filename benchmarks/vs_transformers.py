"""lmlab against transformers on the same LLaMA, side by side in one process: training and decode.

One LLaMA (RoPE, RMSNorm, SwiGLU, GQA, untied head, float32) is created by transformers,
saved to a temporary directory and read back by `models.hf.load_pretrained`, so both
libraries start from the same weights. The batch (B = 8, T = 256, V = 4096 by default), the
optimizer (AdamW, the same hyperparameters) and the threads (torch.set_num_threads(n), n =
the CPUs this process may run on, the size of XLA's CPU thread pool) are the same. Timed:

  (a) lmlab bare:    a jitted value_and_grad + optax.adamw step, state donated
  (b) lmlab trainer: the trainer's own step (`train.program.build`, as train/trainer.py and
                     benchmarks/train_throughput.py build it: objective, metrics, donation)
  (c) transformers:  forward, cross-entropy, backward, torch.optim.AdamW.step, zero_grad

and, in the same rounds, the matmul peak of each library (a 2048 x 2048 float32 matmul in
jax and in torch). The programs run interleaved round by round, so machine load touches all
alike; each figure is the median over rounds. Reported per program: wall and process CPU
time per step (all threads), tokens/s, the ratio lmlab / transformers in tokens/s, and the
achieved FLOP/s (3 * flops_per_token(T) * tokens/s: 6 N per token plus attention) against
its own library's matmul peak. Before timing, both compute the loss of the same batch from
the same weights, and the difference is printed (the test bounds it).

Decode: greedy KV-cache generation at batch 1 and 8 from the same prompts (`inference.generate`
against transformers' `generate` with use_cache), tokens/s, the ratio and whether the greedy
tokens are equal.

Run:
  python benchmarks/vs_transformers.py                       # widths 256 (4 layers) and 512 (8 layers)
  python benchmarks/vs_transformers.py --widths=512 --rounds=5
  python benchmarks/vs_transformers.py --quick               # tiny sizes, 2 rounds (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.train_throughput import synthetic_batch
from inference.generate import generate
from models import hf
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding.strategies import get_strategy
from train import program as program_lib

# width -> layers (heads 8, kv heads 4, d_ff ~ 8/3 d rounded to 64, as LLaMA).
LAYERS = {64: 2, 128: 2, 256: 4, 512: 8, 768: 12, 1024: 16}
ADAMW = {"learning_rate": 3e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
PROMPT_LEN = 16


@dataclasses.dataclass(frozen=True)
class Shape:
    """The benchmark's sizes."""

    vocab: int = 4096
    batch: int = 8
    seq_len: int = 256
    new_tokens: int = 64  # decode
    decode_batches: tuple[int, ...] = (1, 8)
    steps: int = 2  # timed steps per program per round
    peak_n: int = 2048  # the matmul side of the peak


QUICK = Shape(vocab=512, batch=2, seq_len=32, new_tokens=8, decode_batches=(1, 2), steps=1, peak_n=256)


def hf_llama(width: int, shape: Shape, directory: str):
    """A random transformers LlamaForCausalLM of `width`, saved to `directory`; returns it (float32)."""
    import torch
    import transformers

    d_ff = 64 * round(8 * width / 3 / 64)
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=width, intermediate_size=d_ff, num_hidden_layers=LAYERS[width],
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max(shape.seq_len, 2 * PROMPT_LEN +
                                                                                  shape.new_tokens),
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory)
    return model


def torch_loss(model, inputs, targets):
    """Mean next-token cross-entropy of a transformers causal LM on [B, T] int64 tensors."""
    import torch.nn.functional as F

    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def lmlab_loss(model, params, inputs, targets):
    """Mean next-token cross-entropy of an lmlab decoder."""
    logits = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def bare_step_fn(model, tx):
    """(params, opt_state, inputs, targets) -> (params, opt_state, loss): value_and_grad + optax, donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(functools.partial(lmlab_loss, model))(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def trainer_program(model, params, tx, shape: Shape):
    """The trainer's sharded program on a one-device mesh, its state holding `params`."""
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])
    program = program_lib.build(model, tx, optax.constant_schedule(ADAMW["learning_rate"]),
                                strategy=get_strategy("dp"), mesh=mesh, seq_len=shape.seq_len)
    state = program.init(jax.random.key(0))
    layout = program.layout.state
    state = state.replace(params=jax.device_put(params, layout.params),
                          opt_state=jax.device_put(tx.init(params), layout.opt_state))
    return program, state


def matmul_peaks(n: int):
    """(jax seconds fn, torch seconds fn, flops): one n x n float32 matmul each, compiled once."""
    import torch

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / np.sqrt(n)
    chain = jax.jit(lambda x, w: functools.reduce(lambda a, _: a @ w, range(4), x))
    xt, wt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(w))

    def jax_seconds():
        chain(x, w).block_until_ready()
        start = time.perf_counter()
        chain(x, w).block_until_ready()
        return (time.perf_counter() - start) / 4

    def torch_seconds():
        with torch.no_grad():
            a = xt @ wt
            start = time.perf_counter()
            for _ in range(4):
                a = a @ wt
            return (time.perf_counter() - start) / 4

    return jax_seconds, torch_seconds, 2 * n**3


def timed(fn, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call of `fn` over `steps` calls (fn blocks at the end)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def train_width(width: int, shape: Shape, rounds: int, threads: int) -> dict:
    """Times (a), (b), (c) and the two matmul peaks interleaved over `rounds`; returns medians and the losses."""
    import torch

    with tempfile.TemporaryDirectory() as directory:
        theirs = hf_llama(width, shape, directory)
        model, params = hf.load_pretrained(directory)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    batch = synthetic_batch(shape.batch, shape.seq_len, shape.vocab)
    inputs, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
    inputs_t, targets_t = torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long()

    # The same loss from the same weights, before any step.
    with torch.no_grad():
        loss_theirs = float(torch_loss(theirs.eval(), inputs_t, targets_t))
    loss_ours = float(jax.jit(functools.partial(lmlab_loss, model))(params, inputs, targets))

    tx = optax.adamw(**ADAMW)
    bare = bare_step_fn(model, tx)
    bare_state = [jax.tree_util.tree_map(jnp.copy, params), tx.init(params)]
    program, trainer_state = trainer_program(model, params, tx, shape)
    trainer_batch = rules_lib.device_put_batch(batch, program.layout.batch)
    trainer_holder = [trainer_state]
    rng = jax.random.key(1)
    theirs.train()
    opt = torch.optim.AdamW(theirs.parameters(), lr=ADAMW["learning_rate"], betas=(ADAMW["b1"], ADAMW["b2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

    def run_bare():
        bare_state[0], bare_state[1], loss = bare(bare_state[0], bare_state[1], inputs, targets)
        loss.block_until_ready()

    def run_trainer():
        trainer_holder[0], metrics = program.step(trainer_holder[0], trainer_batch, rng)
        metrics["loss"].block_until_ready()

    def run_torch():
        loss = torch_loss(theirs, inputs_t, targets_t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    jax_peak, torch_peak, peak_flops = matmul_peaks(shape.peak_n)
    for fn in (run_bare, run_trainer, run_torch, jax_peak, torch_peak):  # compile, warm caches and allocators
        fn()
    samples = {k: [] for k in ("bare", "trainer", "torch", "jax_peak", "torch_peak")}
    for _ in range(rounds):
        samples["jax_peak"].append(peak_flops / jax_peak())
        samples["torch_peak"].append(peak_flops / torch_peak())
        samples["bare"].append(timed(run_bare, shape.steps))
        samples["trainer"].append(timed(run_trainer, shape.steps))
        samples["torch"].append(timed(run_torch, shape.steps))

    tokens = shape.batch * shape.seq_len
    flops_per_step = 3 * model.config.flops_per_token(shape.seq_len) * tokens
    out = {"width": width, "layers": LAYERS[width], "params": model.config.num_params(),
           "loss_lmlab": loss_ours, "loss_transformers": loss_theirs,
           "jax_peak": statistics.median(samples["jax_peak"]), "torch_peak": statistics.median(samples["torch_peak"])}
    for name in ("bare", "trainer", "torch"):
        wall = statistics.median(s[0] for s in samples[name])
        cpu = statistics.median(s[1] for s in samples[name])
        out[name] = {"wall": wall, "cpu": cpu, "tokens_per_second": tokens / wall, "flops": flops_per_step / wall}
    return out


def decode_width(width: int, shape: Shape, threads: int) -> list[dict]:
    """Greedy KV-cache decode at each of `shape.decode_batches`: lmlab against transformers."""
    import torch

    with tempfile.TemporaryDirectory() as directory:
        theirs = hf_llama(width, shape, directory).eval()
        model, params = hf.load_pretrained(directory)
    rows = []
    for b in shape.decode_batches:
        prompts = np.random.default_rng(b).integers(1, shape.vocab, (b, PROMPT_LEN)).tolist()
        ids = torch.tensor(prompts)

        def ours(prompts=prompts):
            return generate(model, params, prompts, max_new_tokens=shape.new_tokens)

        def transformers_generate(ids=ids):
            with torch.no_grad():
                return theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       use_cache=True, max_new_tokens=shape.new_tokens,
                                       min_new_tokens=shape.new_tokens, eos_token_id=None, pad_token_id=0,
                                       top_k=None, top_p=None, temperature=None)

        tokens_ours, tokens_theirs = ours(), transformers_generate()  # warm-up (compiles)
        ours_s, _ = timed(ours, 1)
        theirs_s, _ = timed(transformers_generate, 1)
        same = tokens_theirs[:, PROMPT_LEN:].tolist() == tokens_ours
        rows.append({"batch": b, "lmlab": b * shape.new_tokens / ours_s,
                     "transformers": b * shape.new_tokens / theirs_s, "same_tokens": same})
    return rows


def print_training(r: dict, shape: Shape) -> None:
    print(f"\nwidth {r['width']}, {r['layers']} layers, {r['params'] / 1e6:.2f}M parameters; loss at init: "
          f"lmlab {r['loss_lmlab']:.6f}, transformers {r['loss_transformers']:.6f}, "
          f"|diff| {abs(r['loss_lmlab'] - r['loss_transformers']):.2e}")
    print(f"matmul peak ({shape.peak_n}^2 float32): jax {r['jax_peak'] / 1e9:.1f} GFLOP/s, "
          f"torch {r['torch_peak'] / 1e9:.1f} GFLOP/s")
    header = (f"{'program':22} {'wall ms':>9} {'cpu ms':>9} {'tokens/s':>10} {'vs torch':>8} {'GFLOP/s':>8} "
              f"{'of peak':>7}")
    print(header)
    print("-" * len(header))
    names = {"bare": "(a) lmlab bare", "trainer": "(b) lmlab trainer", "torch": "(c) transformers"}
    for key, label in names.items():
        p = r[key]
        peak = r["torch_peak"] if key == "torch" else r["jax_peak"]
        ratio = p["tokens_per_second"] / r["torch"]["tokens_per_second"]
        print(f"{label:22} {p['wall'] * 1e3:9.1f} {p['cpu'] * 1e3:9.1f} {p['tokens_per_second']:10.0f} "
              f"{ratio:7.2f}x {p['flops'] / 1e9:8.1f} {p['flops'] / peak:7.1%}", flush=True)


def print_decode(width: int, rows: list[dict], shape: Shape) -> None:
    print(f"\ndecode, width {width}: greedy, prompt {PROMPT_LEN}, {shape.new_tokens} new tokens, KV cache")
    header = f"{'batch':>5} {'lmlab tok/s':>12} {'transformers tok/s':>19} {'lmlab/torch':>11} {'same tokens':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['batch']:5d} {row['lmlab']:12.0f} {row['transformers']:19.0f} "
              f"{row['lmlab'] / row['transformers']:10.2f}x {row['same_tokens']!s:>11}", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="256,512", help=f"comma-separated d_model among {sorted(LAYERS)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians reported)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per program per round (default 2)")
    parser.add_argument("--no-decode", action="store_true", help="training only")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (width 64), 2 rounds: a check that it runs")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else Shape()
    if args.quick:
        args.widths, args.rounds = "64", 2
    if args.steps is not None:
        shape = dataclasses.replace(shape, steps=args.steps)
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    unknown = [w for w in widths if w not in LAYERS]
    if unknown or args.rounds < 1 or shape.steps < 1:
        parser.error(f"--widths must be among {sorted(LAYERS)} (got {unknown or widths}); --rounds={args.rounds} "
                     f"and --steps={shape.steps} must be >= 1")

    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; XLA's CPU thread pool and torch: {threads} threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, jax {jax.__version__}")
    print(f"LLaMA float32, B={shape.batch} T={shape.seq_len} V={shape.vocab}, AdamW {ADAMW}; {args.rounds} "
          f"interleaved rounds of {shape.steps} steps each, medians; ratios are tokens/s lmlab / transformers")
    results = {"training": [], "decode": {}}
    for width in widths:
        r = train_width(width, shape, args.rounds, threads)
        print_training(r, shape)
        results["training"].append(r)
    if not args.no_decode:
        for width in widths:
            rows = decode_width(width, shape, threads)
            print_decode(width, rows, shape)
            results["decode"][width] = rows
    return results


if __name__ == "__main__":
    main()
