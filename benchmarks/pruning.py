"""Pruning on one trained model: validation loss against sparsity for every pruning method.

1. Trains a tiny LLaMA (configs/llama.py:tiny: 2 layers, width 64, 4 query / 2 key-value heads,
   SwiGLU d_ff 176) with the one trainer for --steps steps on the embedded pydoc corpus (or reads
   --workdir if it holds a run).
2. Applies each pruning method of `compress.prune` through `compress.methods.apply` (the
   calibration batches of `compress.calibration` for the data-driven ones), writes each result
   with `compress.io.save` (the `python -m compress` output) and measures:
     sparsity     info["sparsity"]: zeros (or removed weights) among the prunable kernels
     params       parameters stored, and bytes of the checkpoint directory on disk (magnitude at
                  sparsity 0 is the dense model written through the same door)
     val loss     mean next-token loss over the run's validation batches (eval.max_batches),
                  evaluated with the objective's own sums (`train.objectives.lm`)
3. Prints one JSON line per method and a table.

Run:
  python benchmarks/pruning.py --steps=60        # ~3 min on 2 cores
  python benchmarks/pruning.py --quick           # 4 steps, two methods (the pipeline only)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402

from compress import calibration, io, methods  # noqa: E402
from configs.loader import load_config  # noqa: E402
from train import build, objectives, trainer  # noqa: E402

RUNS = [("magnitude", {"sparsity": "0"})] + \
       [("magnitude", {"scope": "layer", "sparsity": s}) for s in ("0.25", "0.5", "0.75")] + \
       [("magnitude", {"scope": "global", "sparsity": s}) for s in ("0.25", "0.5", "0.75")] + \
       [("magnitude_nm", {"n": "2", "m": "4"})] + \
       [("prune_heads", {"sparsity": "0.5", "importance": i}) for i in ("taylor", "norm")] + \
       [("prune_neurons", {"sparsity": s, "importance": i}) for s in ("0.25", "0.5") for i in ("taylor", "norm")] + \
       [("prune_layers", {"sparsity": "0.5"})]
QUICK_RUNS = [("magnitude", {"sparsity": "0"}), ("magnitude", {"sparsity": "0.5"}),
              ("prune_neurons", {"sparsity": "0.25"})]


def validation_loss(config, params, tokenizer, workdir: str) -> float:
    """Mean next-token loss of `params` (a model of `config`) over the run's validation batches."""
    model = build.model(config, tokenizer.vocab_size)
    objective = objectives.get(config, model, tokenizer)
    batches = objective.eval_batches(config, build.data_config(config, workdir), tokenizer)
    sums = jax.jit(lambda p, b: objective.eval_sums(p, b, jax.random.key(0)))
    nll = tokens = 0.0
    for i, batch in enumerate(batches):
        if i >= config.eval.max_batches:
            break
        out = sums(params, batch)
        nll, tokens = nll + float(out["nll_sum"]), tokens + float(out["num_tokens"])
    return nll / tokens


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="", help="a run to prune (trained here first if it holds none)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--calibration_samples", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="pruning_")
    workdir = args.workdir or os.path.join(root, "run")
    steps = 4 if args.quick else args.steps
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        config = load_config("configs/llama.py:tiny", [
            f"steps={steps}", f"schedule.warmup_steps={min(5, steps - 1)}", f"checkpoint.save_interval_steps={steps}", "logging.progress_bar=false",
            "eval.num_samples=0", "eval.max_batches=8", f"data.data_dir={os.path.join(root, 'tfds')}"])
        trainer.run(config, workdir)
    config, step = io.source_config(workdir)
    source = io.load_source(workdir, config, step)
    batches = calibration.calibration_batches(config, source.tokenizer, samples=args.calibration_samples,
                                              seq_len=config.data.seq_len, seed=1, workdir=workdir)
    dense = {"method": "dense", "options": {}, "sparsity": 0.0, "params": sum(x.size for x in
                                                                                 jax.tree_util.tree_leaves(source.params)),
             "val_loss": validation_loss(config, source.params, source.tokenizer, workdir)}
    print(json.dumps(dense), flush=True)
    rows = [dense]
    for i, (name, options) in enumerate(QUICK_RUNS if args.quick else RUNS):
        result = methods.apply(name, source, calibration=batches, options=options)
        out = os.path.join(root, f"out_{i}")
        io.save(out, result, source, step)
        row = {"method": name, "options": options, "sparsity": result.info["sparsity"],
               "params": result.info["params"], "checkpoint_bytes": directory_bytes(os.path.join(out, "checkpoints")),
               "val_loss": validation_loss(result.config, result.params, source.tokenizer, workdir)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'method':<15}{'options':<38}{'sparsity':>9}{'params':>9}{'ckpt bytes':>12}{'val loss':>10}")
    for r in rows:
        options = ",".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"{r['method']:<15}{options:<38}{r['sparsity']:>9.3f}{r['params']:>9}"
              f"{r.get('checkpoint_bytes', 0):>12}{r['val_loss']:>10.4f}")
    return rows


if __name__ == "__main__":
    main()
