"""Distillation against training from scratch: one student, the same steps and tokens, two losses.

A larger teacher (`configs/llama.py:small`: 6 layers, width 256, 8 / 2 heads, 5.6M parameters) is
pretrained by the one trainer (`python -m train`'s loop, objective lm) on the embedded pydoc
corpus. Then the student (`configs/gpt.py:default`'s shape: 4 layers, width 128, 4 heads, the model
`python -m train` trains by default) is trained twice from the same seed, on the same batches
(the teacher's tokenizer, the same data order) for the same steps:

  scratch    objective=lm: the token cross-entropy
  distilled  objective=distill: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE at
             temperature T (`train.objectives.distill`, the teacher laid out on the student's mesh)

and the table puts side by side the validation cross-entropy (nats per token), perplexity and bits
per byte of the same held-out text for the teacher and both students, with parameters and training
time. The loss curves (training cross-entropy at every logged step; validation cross-entropy at
every evaluation) are printed and written to `--json` for the colab's distillation curve.

Run:
  python benchmarks/distillation.py --json=/tmp/distillation.json   # ~10 min on 2 cores
  python benchmarks/distillation.py --quick                          # tiny models, a few steps (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import tempfile
import time

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from configs.loader import load_config
from train import trainer

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.async_save=false",
         "eval.num_samples=0"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the benchmark trains (config files with presets, and overrides)."""

    teacher: str = "configs/llama.py:small"
    student: str = "configs/gpt.py:default"
    teacher_steps: int = 300
    steps: int = 300
    eval_every: int = 50
    eval_batches: int = 16  # validation batches of every evaluation (the same text each time)
    alpha: float = 0.5
    temperature: float = 1.0
    shape: tuple[str, ...] = ()  # overrides of every run (quick: small rows)
    teacher_shape: tuple[str, ...] = ()


FULL = Settings()
QUICK = Settings(teacher="configs/gpt.py:tiny", student="configs/gpt.py:tiny", teacher_steps=6, steps=4, eval_every=2,
                 eval_batches=1, shape=("data.seq_len=32", "model.max_len=32", "data.batch_size=8",
                                        "logging.peak_flops=1e11", "schedule.warmup_steps=1",
                                        "logging.log_every_steps=1"),
                 teacher_shape=("model.num_layers=3", "model.block.d_model=96", "model.block.num_heads=6",
                                "model.block.d_ff=192", "tokenizer.vocab_size=300"))


def _config(path: str, overrides) -> object:
    return load_config(os.path.join(_ROOT, path), [*QUIET, *overrides])


def _train(name: str, config, workdir: str) -> dict:
    """One trainer run: its summary, curves and wall time."""
    start = time.time()
    summary = trainer.run(config, workdir)
    seconds = time.time() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f.read().splitlines()]
    ce_key = "ce" if config.objective == "distill" else "loss"
    train = [[x["step"], x[ce_key]] for x in lines if ce_key in x]
    validation = [[x["step"], x[f"val_{ce_key}"]] for x in lines if f"val_{ce_key}" in x]
    val_ce = summary[f"val_{ce_key}"]
    validation.append([summary["final_step"], val_ce])
    row = {"val_ce": val_ce, "val_perplexity": math.exp(val_ce), "val_bits_per_byte": summary["val_bits_per_byte"],
           "num_params": summary["num_params"], "steps": summary["final_step"], "seconds": seconds,
           "tokens": summary["final_step"] * config.data.batch_size * config.data.seq_len,
           "curve": {"train_ce": train, "val_ce": validation}}
    if config.objective == "distill":
        row["val_kl"] = summary["val_kl"]
        row["distill_train_loss"] = [[x["step"], x["loss"]] for x in lines if "kl" in x]
    print(f"{name}: val CE {val_ce:.4f} nats/token (perplexity {row['val_perplexity']:.2f}, "
          f"{row['val_bits_per_byte']:.4f} bits/byte) after {row['steps']} steps, {seconds:.0f} s", flush=True)
    return row


def run(settings: Settings, workdir: str) -> dict:
    """Trains the teacher, then the student distilled and from scratch; returns the rows."""
    common = [*settings.shape, f"eval.every_steps={settings.eval_every}", f"eval.max_batches={settings.eval_batches}",
              f"checkpoint.save_interval_steps={max(settings.steps, settings.teacher_steps)}"]
    teacher_dir = os.path.join(workdir, "teacher")
    rows = {"teacher": _train("teacher", _config(settings.teacher, [
        *common, *settings.teacher_shape, f"steps={settings.teacher_steps}"]), teacher_dir)}
    student = [*common, f"steps={settings.steps}"]
    rows["distilled"] = _train("distilled", _config(settings.student, [
        *student, "objective=distill", f"distill.teacher={teacher_dir}", f"distill.alpha={settings.alpha}",
        f"distill.temperature={settings.temperature}"]), os.path.join(workdir, "distilled"))
    rows["scratch"] = _train("scratch", _config(settings.student, [
        *student, f"tokenizer.path={os.path.join(teacher_dir, 'tokenizer')}"]), os.path.join(workdir, "scratch"))
    return rows


def print_table(rows: dict, settings: Settings) -> None:
    print(f"\nstudent {settings.student} distilled from teacher {settings.teacher} (alpha {settings.alpha}, "
          f"T {settings.temperature}) vs from scratch, {settings.steps} steps each")
    print(f"{'model':<10} {'params':>10} {'steps':>6} {'tokens':>10} {'val CE':>8} {'ppl':>8} {'bits/B':>7} "
          f"{'time s':>7}")
    for name, r in rows.items():
        print(f"{name:<10} {r['num_params']:>10,} {r['steps']:>6} {r['tokens']:>10,} {r['val_ce']:>8.4f} "
              f"{r['val_perplexity']:>8.2f} {r['val_bits_per_byte']:>7.4f} {r['seconds']:>7.0f}")
    gain = rows["scratch"]["val_ce"] - rows["distilled"]["val_ce"]
    print(f"distilled - scratch: {-gain:+.4f} nats/token (perplexity x{math.exp(-gain):.3f})")
    print("\nvalidation CE curve (step: distilled / scratch)")
    scratch = dict(map(tuple, rows["scratch"]["curve"]["val_ce"]))
    for step, ce in rows["distilled"]["curve"]["val_ce"]:
        print(f"  {step:>5}: {ce:.4f} / {scratch.get(step, float('nan')):.4f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (the test)")
    parser.add_argument("--steps", type=int, default=0, help="student steps (0: the mode's)")
    parser.add_argument("--teacher_steps", type=int, default=0, help="teacher steps (0: the mode's)")
    parser.add_argument("--alpha", type=float, default=-1.0, help="distillation weight (-1: the mode's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="distillation temperature (0: the mode's)")
    parser.add_argument("--json", default="", help="write the rows and the curves to this JSON file")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    settings = dataclasses.replace(
        settings, steps=args.steps or settings.steps, teacher_steps=args.teacher_steps or settings.teacher_steps,
        alpha=settings.alpha if args.alpha < 0 else args.alpha, temperature=args.temperature or settings.temperature)
    if args.workdir:
        rows = run(settings, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            rows = run(settings, workdir)
    print_table(rows, settings)
    out = {"settings": dataclasses.asdict(settings), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
