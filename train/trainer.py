"""The training loop, one for every objective: `run(config, workdir)`.

    state <- latest readable checkpoint in WORKDIR, or a fresh init (then the starting
             weights of config.init_from, `train.init_from`)
    loop: next batch -> jitted train_step (donated state) -> metrics of the previous
          step read while this one runs -> checkpoint every save_interval_steps
    end:  validation with the objective's metrics, what the objective reports beyond them,
          summary.json

The objective (`config.objective`, `train.objectives`) gives the loss, the data and the
evaluation. The next-token objective (lm, the decoders' default) reports the loss in bits per
byte of exactly the validation text eval.max_batches batches hold, beside the xz baseline on
the same text, and samples; BERT's masked LM (mlm) its masked-token loss and accuracy (the
same masks at every evaluation), without bits per byte, xz baseline or sampled text. A
decoder's run also scores the harness tasks of `eval.tasks` on the live parameters at the
start, every eval.every_steps and at the end, logged as `eval/<task>/<metric>`
(`train.task_eval`).

The state, the batches and the jitted steps are laid out by the sharding strategy
`config.sharding.strategy` on the mesh `config.sharding.mesh` (`sharding.step.build`: dp,
ZeRO-1/2/3, FSDP, Megatron TP/SP, EP and their composites).

JAX's persistent compilation cache (`train.compilation_cache`, config key
`train.compilation_cache_dir`) is on from the top of `setup`: a restarted run loads its compiled
programs; the summary's `startup` says how long the first step took and what it compiled.

The same command on the same workdir resumes: parameters, optimizer state, step and the
data iterator's position all come from the checkpoint (restored shard by shard into the
strategy's layout), so a resumed run ends with the same parameters as an uninterrupted one. SIGTERM saves a checkpoint, then stops
(`Preempted`); a NaN or inf loss or gradient norm stops before anything is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import lzma
import math
import os
import signal
import time
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from data import pipeline
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding.strategies import get_strategy
from train import build, compilation_cache, distributed, init_from, objectives, task_eval, validate
from train import program as program_lib
from train import step as step_lib
from train import trainable as trainable_lib
from train.checkpoint import Checkpointer
from train.metrics import MetricsWriter, Throughput, peak_flops_per_device
from train.samples import prompt_ids


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint of the current step was saved."""


class NonFiniteLoss(FloatingPointError):
    """The loss or gradient norm became NaN or inf; nothing was saved for that step."""


def evaluation_sums(eval_fn, state, batches, batch_sharding, max_batches: int = 0) -> dict[str, float]:
    """The objective's sums over the validation batches (all of them if max_batches == 0), added
    as floats as they stream. Batch i gets the rng `key(i)` (a masked LM's masks)."""
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        out = eval_fn(state.params, state.frozen, rules_lib.device_put_batch(batch, batch_sharding),
                      jax.random.key(i))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def evaluate(r: "Run", state, batches) -> tuple[dict[str, float], dict[str, float]]:
    """(sums, metrics) of the run's objective on the validation `batches` (eval.max_batches of
    them), or its own `evaluate_run` (`train.objectives.base`)."""
    own = getattr(r.objective, "evaluate_run", None)
    if own is not None:
        return own(r, state, batches)
    sums = evaluation_sums(r.eval_fn, state, batches, r.batch_sharding, r.config.eval.max_batches)
    return sums, r.objective.eval_metrics(sums)


def xz_bits_per_byte(documents: Iterable[str], num_bytes: int) -> float:
    """The validation text (documents joined by newlines) compressed by lzma (xz) at preset 9,
    in bits per byte of text; fed document by document (the same bytes as compressing the
    joined text at once)."""
    compressor, size = lzma.LZMACompressor(preset=9), 0
    for i, document in enumerate(documents):
        size += len(compressor.compress((document if i == 0 else "\n" + document).encode("utf-8")))
    return 8.0 * (size + len(compressor.flush())) / num_bytes


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
    if bad:
        raise NonFiniteLoss(
            f"step {step}: {', '.join(bad)} is not finite (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}, "
            f"learning_rate={metrics['learning_rate']:.3g}); stopped without saving this step. The last good "
            "checkpoint is kept: lower optimizer.lr, raise schedule.warmup_steps or set optimizer.grad_clip_norm."
        )


def _warn_config_changes(path: str, config: dict) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    before, after = flat(old), flat(config)
    changed = sorted(k for k in after if before.get(k) != after[k])
    if changed:
        logging.getLogger(__name__).warning("resuming with a config that differs from the saved one in: %s", ", ".join(changed))


@dataclasses.dataclass
class Run:
    """The pieces of one run, built from its config by `setup`."""

    config: ml_collections.ConfigDict
    workdir: str
    is_lead: bool
    data: pipeline.DataConfig
    tokenizer: Any
    model: nn.Module
    mesh: Any
    rules: Any
    batch_sharding: Any
    abstract_state: Any
    init_fn: Any
    step_fn: Any
    eval_fn: Any
    objective: Any  # train.objectives: the loss, data and evaluation
    layout: Any = None  # sharding.layout.Layout: the state's and batches' shardings, the tracing context


def setup(config: ml_collections.ConfigDict, workdir: str, *, write_config: bool = True) -> Run:
    """Builds tokenizer, model, objective, optimizer, mesh and the jitted init, train and eval
    steps, laid out by the sharding strategy `config.sharding.strategy` on the mesh
    `config.sharding.mesh` (empty: the strategy's default mesh; see `sharding.strategies`).
    `write_config=False` (an evaluation of a finished run) leaves WORKDIR/config.json alone."""
    workdir = os.path.abspath(workdir)
    # Before anything compiles: the restart of a run loads its programs from the cache.
    compilation_cache.enable(config.train.compilation_cache_dir)
    validate.check(config, workdir)  # every key, before data, tokenizer or config.json are touched
    config = build.resolved(config, workdir)  # e.g. a classifier's classes, from its data
    os.makedirs(workdir, exist_ok=True)
    is_lead = jax.process_index() == 0
    if is_lead and write_config:
        _warn_config_changes(os.path.join(workdir, "config.json"), config.to_dict())
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    data_cfg = build.data_config(config, workdir)
    tokenizer = distributed.lead_first("data", lambda: _prepare_data(config, workdir, data_cfg))
    model = build.model(config, tokenizer.vocab_size)
    objective = objectives.get(config, model, tokenizer)
    if objective.name == "lm":  # the run ends with samples: fail now, not after training, if there is nothing to start from
        prompt_ids(tokenizer, config.eval.prompt)
    tx, schedule = build.optimizer(config)
    strategy = get_strategy(config.sharding.strategy)
    mesh = mesh_lib.make_mesh(config.sharding.mesh or strategy.default_mesh)
    program = program_lib.build_for_run(config, model, tx, schedule, strategy=strategy, mesh=mesh,
                                        objective=objective)
    layout = program.layout

    def evaluate_batch(params, frozen, batch, rng):
        with layout.tracing():
            return step_lib.eval_step(params, frozen, batch, rng, objective=objective)

    eval_fn = jax.jit(evaluate_batch, in_shardings=(layout.state.params, layout.state.frozen, layout.batch,
                                                    layout.replicated), out_shardings=layout.replicated)
    return Run(config, workdir, is_lead, data_cfg, tokenizer, model, mesh, layout.rules, layout.batch,
               program.abstract_state, program.init, program.step, eval_fn, objective, layout)


def _prepare_data(config: ml_collections.ConfigDict, workdir: str, data_cfg: pipeline.DataConfig):
    """The tokenizer. The lead process builds the splits and trains the tokenizer first, then
    the others (`distributed.lead_first`) read what it wrote into the shared workdir (sft:
    chat JSONL, `train.objectives.sft.prepare_data`)."""
    own = objectives.PREPARES.get(objectives.name_of(config))
    if own is not None:  # an objective that reads data of its own (sft: chat JSONL)
        return own(config, workdir, data_cfg)
    if distributed.is_lead():
        if build.objective_name(config) not in build.TASK_OBJECTIVES:  # those read data.tasks' examples
            for split in dict.fromkeys((data_cfg.train_split, data_cfg.eval_split)):
                pipeline.open_split(data_cfg, split)
    elif not (config.tokenizer.path or config.init_from):  # else a trained BPE in the shared workdir
        distributed.shared_workdir_check(os.path.join(workdir, "tokenizer"))
    return build.tokenizer(config, workdir, data_cfg)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the model of `config` in `workdir`; returns the summary dict (its
    `startup`: seconds from here to the first step's metrics, the programs compiled by then and
    those loaded from the compilation cache instead, `train.compilation_cache`)."""
    with compilation_cache.CompileCounter() as compiles:
        return _run(config, workdir, Startup(time.time(), compiles))


@dataclasses.dataclass
class Startup:
    """When the run began and its compilation counter; `report` is filled in at the first step."""

    started: float
    compiles: compilation_cache.CompileCounter
    report: dict[str, Any] | None = None

    def first_step(self, now: float) -> None:
        self.report = {"seconds_to_first_step": now - self.started, **self.compiles.counts()}


def _run(config: ml_collections.ConfigDict, workdir: str, startup: Startup) -> dict[str, Any]:
    r = setup(config, workdir)
    config, workdir = r.config, r.workdir  # the config as resolved (`build.resolved`)
    # The jitted steps trace under their layout's mesh and logical rules themselves
    # (`sharding.step`); the checkpoint restores into the layout's shardings.
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                max_to_keep=config.checkpoint.max_to_keep,
                                save_interval_steps=config.checkpoint.save_interval_steps,
                                async_save=config.checkpoint.async_save)
    train_iter = r.objective.train_iterator(config, r.data, r.tokenizer)
    restored = checkpointer.restore(r.abstract_state)
    if restored is None:
        state = r.init_fn(jax.random.key(config.seed))
        if config.init_from:  # a new run only: a resumed one has its own weights
            state = init_from.initial_state(config, state, r)
        message = f"new run in {workdir}" + (f" from {config.init_from}" if config.init_from else "")
    else:
        _, state, data_state, _ = restored
        train_iter.set_state(data_state)
        message = f"resumed from step {int(state.step)} in {workdir}"
    if r.is_lead:
        print(message, flush=True)
    eval_batches = r.objective.eval_batches(config, r.data, r.tokenizer)
    tasks = task_eval.TaskEvaluator(r)  # eval.tasks, scored by the harness beside val_loss
    before = _eval_before(r, state, eval_batches, fresh=restored is None)
    try:
        state, throughput, last_metrics = _train_loop(r, state, train_iter, checkpointer, eval_batches, tasks,
                                                      startup)
    finally:
        checkpointer.close()
    sums, metrics = evaluate(r, state, eval_batches)
    return _finish(r, state, sums, metrics, throughput, last_metrics, eval_batches, before, tasks(state),
                   startup.report)


def _eval_before(r: Run, state, eval_batches, *, fresh: bool) -> dict[str, float] | None:
    """An objective with its own evaluation (`evaluate_run`: RL's exact match, reward, length)
    is evaluated before a new run's first step; WORKDIR/eval_before.json keeps it for a
    resumed run's summary. None for the other objectives."""
    if getattr(r.objective, "evaluate_run", None) is None:
        return None
    path = os.path.join(r.workdir, "eval_before.json")
    if not fresh and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    _, metrics = evaluate(r, state, eval_batches)
    if r.is_lead:
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2)
        print("before training: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    return metrics


def _device_batches(r: Run, train_iter, state_fn):
    """(device batch, boundary) pairs the loop steps on: the objective's own `batches` (a
    reference's log-probs, rollouts of the current policy; `train.objectives.base`), or the
    iterator's rows placed on the mesh, each its own boundary."""
    own = getattr(r.objective, "batches", None)
    if own is not None:
        yield from own(r, train_iter, state_fn)
        return
    for rows in train_iter:
        yield rules_lib.device_put_batch(rows, r.batch_sharding), True


class _MetricsReader:
    """Reads a step's device metrics (one step late), guards against NaN, logs and times."""

    def __init__(self, r: Run, start_step: int, startup: Startup | None = None):
        config = r.config
        self.config, self.start_step = config, start_step
        num_params, flops_per_token = build.model_size(r.model, config.data.seq_len)
        train_flops_per_token = 3 * flops_per_token
        # MFU divides by the peak of every device the step runs on (`train.metrics`): a datasheet
        # figure for the device kind and compute dtype, else a short measurement (a few seconds;
        # set logging.peak_flops, per device, to skip it).
        devices = list(r.mesh.devices.flat)
        peak, peak_source = peak_flops_per_device(config.logging.peak_flops, config.model.dtype, devices)
        self.throughput = Throughput(train_flops_per_token, peak_flops_per_device=peak, num_devices=len(devices))
        # Padding included: it is computed. An objective whose step computes other rows (chosen and
        # rejected, G completions per prompt) says how many tokens (`tokens_per_step`).
        own = getattr(r.objective, "tokens_per_step", None)
        self.tokens_per_step = (own(config.data.batch_size, config.data.seq_len) if own is not None else
                                config.data.batch_size * config.data.seq_len)
        # exp(loss) means something only for a token cross-entropy (lm, mlm, sft).
        self.perplexity = bool(getattr(r.objective, "token_nll", False))
        self.writer = MetricsWriter(r.workdir, config.steps, use_tensorboard=config.logging.tensorboard,
                                    progress=config.logging.progress_bar) if r.is_lead else None
        self.last_time, self.last_metrics = time.time(), {}
        self.startup = startup
        if r.is_lead:
            print(f"model: {num_params / 1e6:.2f}M parameters, {train_flops_per_token / 1e6:.1f} "
                  f"MFLOP per trained token; vocab {r.tokenizer.vocab_size}; {len(devices)} devices; steps "
                  f"{start_step}->{config.steps}; peak {peak / 1e12:.4g} TFLOP/s per device ({peak_source})",
                  flush=True)

    def __call__(self, step: int, device_metrics: dict) -> None:
        metrics = {k: float(v) for k, v in device_metrics.items()}
        _check_finite(step, metrics)
        now = time.time()
        if step > self.start_step + 1:  # the first step's time is mostly compilation
            self.throughput.add(self.tokens_per_step, now - self.last_time)
        elif self.startup is not None and self.startup.report is None:
            self.startup.first_step(now)
            if self.writer:
                report, cache = self.startup.report, jax.config.jax_compilation_cache_dir
                print(f"first step after {report['seconds_to_first_step']:.1f} s: {report['programs_compiled']} "
                      f"programs compiled, {report['compilation_cache_hits']} loaded from the compilation cache"
                      f"{f' ({cache})' if cache else ' (off)'}", flush=True)
        self.last_time, self.last_metrics = now, metrics
        if self.writer and (step % self.config.logging.log_every_steps == 0 or step == self.config.steps):
            rates = self.throughput.report()
            if self.perplexity:
                metrics = {**metrics, "perplexity": math.exp(min(metrics["loss"], 30.0))}
            self.writer.write(step, {**metrics, **rates})

    def close(self):
        if self.writer:
            self.writer.close()


def _train_loop(r: Run, state, train_iter, checkpointer: Checkpointer, eval_batches,
                tasks: task_eval.TaskEvaluator, startup: Startup | None = None):
    """Steps from the state's step to config.steps; returns (state, throughput, last metrics);
    `startup` gets its report at the first step.
    The `tasks`' scores are logged at the start, and with the validation metrics every
    eval.every_steps."""
    config = r.config
    rng = jax.random.key(config.seed + 1)
    reader = _MetricsReader(r, int(state.step), startup)
    if tasks.tasks:  # the scores the run starts from; a task the model cannot score fails now, not after training
        start = tasks(state)
        if reader.writer:
            reader.writer.write(int(state.step), start)
    stop = {"signal": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    pending = None  # (step, device metrics) not read yet
    live = {"state": state}  # what the objective's own batches read (rollouts of the current policy)
    batches = _device_batches(r, train_iter, lambda: live["state"])
    stopping, save_due = False, False
    try:
        for step in range(int(state.step), config.steps):
            batch, boundary = next(batches)
            state, metrics = r.step_fn(state, batch, rng)
            live["state"] = state
            if pending is not None:
                reader(*pending)  # the previous step's metrics, read while this step runs
            pending, done = (step + 1, metrics), step + 1
            # Every process stops after the same step, whichever process got the SIGTERM; a
            # checkpoint or a stop waits for a boundary (the end of a rollout's updates), where
            # the data iterator's state is the whole truth of the position.
            stopping = stopping or distributed.any_process(stop["signal"], "sigterm", done)
            save_due = save_due or done % config.checkpoint.save_interval_steps == 0
            if (boundary and (save_due or stopping)) or done == config.steps:
                save_due = False
                reader(*pending)  # never save a step whose loss is not finite
                pending = None
                checkpointer.save(done, state, data_state=train_iter.get_state(), config=config.to_dict(),
                                  force=True)
                reader.last_time = time.time()  # tokens/s counts training, not saving
            if config.eval.every_steps and done % config.eval.every_steps == 0 and done != config.steps:
                _, ev = evaluate(r, state, eval_batches)
                logged = {**validation_metrics(ev), **tasks(state)}  # every process runs both
                if reader.writer:
                    reader.writer.write(done, logged)
                reader.last_time = time.time()
            if stopping and (boundary or done == config.steps):
                checkpointer.wait_until_finished()
                raise Preempted(f"SIGTERM: saved a checkpoint at step {done} in {r.workdir}; "
                                "run the same command to resume")
        if pending is not None:
            reader(*pending)
        checkpointer.wait_until_finished()
    finally:
        # None: the previous handler was not Python's (e.g. JAX's preemption notifier).
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)
        reader.close()
    return state, reader.throughput, reader.last_metrics


def validation_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation metrics as logged and summarized: `val_<name>`."""
    return {f"val_{k}": v for k, v in metrics.items()}


def _finish(r: Run, state, sums: dict[str, float], metrics: dict[str, float], throughput: Throughput,
            last_metrics, eval_data, before: dict[str, float] | None = None,
            task_metrics: dict[str, float] | None = None, startup: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: the run's numbers, the validation metrics, the harness tasks' (`eval/<task>/
    <metric>`, `train.task_eval`) and what the objective reports beyond them (`report`: the lm's
    bits per byte against xz on the same text, and samples); with `before` (an objective's own
    evaluation before the first step) `eval_before` and `eval_after`."""
    config, workdir, model = r.config, r.workdir, r.model
    totals = throughput.totals()
    summary = {
        "final_step": int(state.step),
        "train_loss": last_metrics.get("loss"),
        **validation_metrics(metrics),
        **(task_metrics or {}),
    }
    report = getattr(r.objective, "report", None)
    if report is not None:
        # Whole params, even when they span processes (every process takes part).
        extra, quality = report(r, lambda: distributed.to_host(trainable_lib.combine(state.params, state.frozen)),
                                sums, metrics, eval_data)
    else:
        extra, quality = {}, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "loss")
    samples = extra.pop("samples", None)
    if "val_tokens" in extra:
        summary["val_tokens"] = extra.pop("val_tokens")
    summary.update({
        "tokens_per_second": totals["tokens_per_second"],
        "flops_per_second": totals["flops_per_second"],
        "mfu": totals["mfu"],
        "peak_flops_per_device": totals.get("peak_flops_per_device"),
        "num_devices": totals.get("num_devices"),
        "num_params": build.model_size(model, config.data.seq_len)[0],
        **extra,
    })
    if startup is not None:
        summary["startup"] = startup
    if before is not None:
        summary["eval_before"], summary["eval_after"] = before, metrics
    if samples is not None:
        summary["samples"] = samples
    if r.is_lead:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"step {summary['final_step']}: val loss {summary['val_loss']:.3f}, {quality}; "
              f"{summary['tokens_per_second']:.0f} tokens/s, MFU {summary['mfu']:.1%}")
        for text in summary.get("samples", []):
            print("---\n" + text)
    return summary
