"""The pretraining loop: `run(config, workdir)`.

    state <- latest readable checkpoint in WORKDIR, or a fresh init
    loop: next batch -> jitted train_step (donated state) -> metrics of the previous
          step read while this one runs -> checkpoint every save_interval_steps
    end:  full validation (loss, bits per byte, xz baseline), samples, summary.json

The same command on the same workdir resumes: parameters, optimizer state, step and the
data iterator's position all come from the checkpoint, so a resumed run ends with the
same parameters as an uninterrupted one. SIGTERM saves a checkpoint, then stops
(`Preempted`); a NaN or inf loss or gradient norm stops before anything is saved.
"""

from __future__ import annotations

import functools
import json
import logging
import lzma
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import pipeline
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from train import build
from train import step as step_lib
from train.checkpoint import Checkpointer
from train.metrics import MetricsWriter, Throughput, measure_matmul_peak
from train.samples import sample_continuations


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint of the current step was saved."""


class NonFiniteLoss(FloatingPointError):
    """The loss or gradient norm became NaN or inf; nothing was saved for that step."""


def _abstract_with_shardings(abstract, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_train_state(model, tx, mesh, rules, seq_len: int, seed: int):
    """(jitted init placing the state by its logical shardings, abstract state with shardings)."""
    sample = jnp.zeros((1, seq_len), jnp.int32)
    init = functools.partial(step_lib.init_state, sample_ids_BT=sample, model=model, tx=tx)
    boxed = jax.eval_shape(init, jax.random.key(seed))
    shardings = rules_lib.logical_shardings(boxed, mesh, rules)
    abstract = nn.unbox(boxed)
    jitted = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)
    return jitted, _abstract_with_shardings(abstract, shardings)


def evaluate(eval_fn, params, batches, batch_sharding, max_batches: int = 0) -> dict[str, float]:
    """Summed NLL and token count over the validation batches (all of them if max_batches == 0)."""
    nll, tokens = 0.0, 0.0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        out = eval_fn(params, rules_lib.device_put_batch(batch, batch_sharding))
        nll += float(out["nll_sum"])
        tokens += float(out["num_tokens"])
    return {"nll_sum": nll, "num_tokens": tokens, "loss": nll / max(tokens, 1.0)}


def xz_bits_per_byte(documents: list[str], num_bytes: int) -> float:
    """The validation text compressed by lzma (xz) at preset 9, in bits per byte of text."""
    blob = "\n".join(documents).encode("utf-8")
    return 8.0 * len(lzma.compress(blob, preset=9)) / num_bytes


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
        logging.warning("resuming with a config that differs from the saved one in: %s", ", ".join(changed))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrains (or resumes) the model of `config` in `workdir`; returns the summary dict."""
    os.makedirs(workdir, exist_ok=True)
    is_lead = jax.process_index() == 0
    config_dict = config.to_dict()
    if is_lead:
        _warn_config_changes(os.path.join(workdir, "config.json"), config_dict)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2)

    data_cfg = build.data_config(config, workdir)
    tokenizer = build.tokenizer(config, workdir, data_cfg)
    model = build.model(config, tokenizer.vocab_size)
    tx, schedule = build.optimizer(config)
    if config.data.batch_size % config.optimizer.grad_accum_steps:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                         f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}")

    mesh = mesh_lib.make_mesh(config.sharding.mesh)
    rules = rules_lib.rules_for(config.sharding.strategy)
    rules_lib.check_batch_divisible(config.data.batch_size // config.optimizer.grad_accum_steps, mesh, rules)
    batch_sharding = rules_lib.batch_sharding(mesh, rules)
    init_fn, abstract_state = init_train_state(model, tx, mesh, rules, config.data.seq_len, config.seed)
    state_sharding = jax.tree_util.tree_map(lambda a: a.sharding, abstract_state)
    replicated = rules_lib.replicated(mesh)

    with nn.logical_axis_rules(rules):
        step_fn = jax.jit(
            functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                              grad_accum_steps=config.optimizer.grad_accum_steps,
                              z_loss=config.optimizer.z_loss, label_smoothing=config.optimizer.label_smoothing),
            in_shardings=(state_sharding, batch_sharding, replicated),
            out_shardings=(state_sharding, replicated),
            donate_argnums=(0,),
        )
        eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model),
                          in_shardings=(state_sharding.params, batch_sharding), out_shardings=replicated)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
                                save_interval_steps=config.checkpoint.save_interval_steps,
                                async_save=config.checkpoint.async_save)
    train_iter = pipeline.train_iterator(data_cfg, tokenizer)
    restored = checkpointer.restore(abstract_state)
    if restored is None:
        state = init_fn(jax.random.key(config.seed))
        if is_lead:
            print(f"new run in {workdir}", flush=True)
    else:
        _, state, data_state, _ = restored
        train_iter.set_state(data_state)
        if is_lead:
            print(f"resumed from step {int(state.step)} in {workdir}", flush=True)

    gpt_config = model.config
    train_flops_per_token = 3 * gpt_config.flops_per_token(config.data.seq_len)
    peak = config.logging.peak_flops or measure_matmul_peak()
    throughput = Throughput(train_flops_per_token, peak)
    start_step = int(state.step)
    writer = MetricsWriter(workdir, config.steps, use_tensorboard=config.logging.tensorboard and is_lead,
                           progress=config.logging.progress_bar and is_lead) if is_lead else None
    if is_lead:
        print(f"model: {gpt_config.num_params() / 1e6:.2f}M parameters, {train_flops_per_token / 1e6:.1f} MFLOP per "
              f"trained token; vocab {tokenizer.vocab_size}; {jax.device_count()} devices; steps {start_step}->"
              f"{config.steps}; peak {peak / 1e9:.1f} GFLOP/s", flush=True)

    stop = {"signal": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    rng = jax.random.key(config.seed + 1)
    eval_batches = pipeline.eval_batches(data_cfg, tokenizer)
    pending = None  # (step, device metrics) of the step whose metrics are not read yet
    last_time = time.time()
    last_metrics: dict[str, float] = {}

    tokens_per_step = config.data.batch_size * config.data.seq_len  # padding included: it is computed

    def read(pending_step, device_metrics):
        nonlocal last_time, last_metrics
        metrics = {k: float(v) for k, v in device_metrics.items()}
        _check_finite(pending_step, metrics)
        now = time.time()
        if pending_step > start_step + 1:  # the first step's time is mostly compilation
            throughput.add(tokens_per_step, now - last_time)
        last_time = now
        last_metrics = metrics
        if writer and (pending_step % config.logging.log_every_steps == 0 or pending_step == config.steps):
            rates = throughput.report()
            writer.write(pending_step, {**metrics, "perplexity": math.exp(min(metrics["loss"], 30.0)), **rates})

    try:
        for step in range(start_step, config.steps):
            batch = rules_lib.device_put_batch(next(train_iter), batch_sharding)
            state, metrics = step_fn(state, batch, rng)
            if pending is not None:
                read(*pending)  # the previous step's metrics, read while this step runs
            pending = (step + 1, metrics)
            done = step + 1
            must_save = done % config.checkpoint.save_interval_steps == 0 or stop["signal"] or done == config.steps
            if must_save:
                read(*pending)
                pending = None
                checkpointer.save(done, state, data_state=train_iter.get_state(), config=config_dict, force=True)
            if config.eval.every_steps and done % config.eval.every_steps == 0 and done != config.steps:
                ev = evaluate(eval_fn, state.params, eval_batches, batch_sharding, config.eval.max_batches)
                if writer:
                    writer.write(done, {"val_loss": ev["loss"]})
            if stop["signal"]:
                checkpointer.wait_until_finished()
                raise Preempted(f"SIGTERM: saved a checkpoint at step {done} in {workdir}; "
                                "run the same command to resume")
        if pending is not None:
            read(*pending)
        checkpointer.wait_until_finished()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if writer:
            writer.close()
        checkpointer.close()

    return _finish(config, workdir, model, state, tokenizer, eval_fn, eval_batches, batch_sharding, data_cfg,
                   throughput, last_metrics, is_lead)


def _finish(config, workdir, model, state, tokenizer, eval_fn, eval_batches, batch_sharding, data_cfg,
            throughput, last_metrics, is_lead) -> dict[str, Any]:
    """Full validation, bits per byte against xz, samples and summary.json."""
    ev = evaluate(eval_fn, state.params, eval_batches, batch_sharding)
    raw = pipeline.validation_text(data_cfg)
    summary = {
        "final_step": int(state.step),
        "train_loss": last_metrics.get("loss"),
        "val_loss": ev["loss"],
        "val_tokens": int(ev["num_tokens"]),
        "val_bytes": raw.num_bytes,
        "val_bits_per_byte": ev["nll_sum"] / math.log(2) / raw.num_bytes,
        "xz_bits_per_byte": xz_bits_per_byte(raw.documents, raw.num_bytes),
        "tokens_per_second": throughput.totals()["tokens_per_second"],
        "flops_per_second": throughput.totals()["flops_per_second"],
        "mfu": throughput.totals()["mfu"],
        "num_params": model.config.num_params(),
    }
    samples = sample_continuations(model, jax.device_get(state.params), tokenizer, config.eval.prompt,
                                   num_samples=config.eval.num_samples, num_tokens=config.eval.sample_tokens,
                                   temperature=config.eval.temperature, max_len=model.config.max_len,
                                   seed=config.seed)
    summary["samples"] = samples
    if is_lead:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"step {summary['final_step']}: val loss {summary['val_loss']:.3f}, "
              f"{summary['val_bits_per_byte']:.3f} bits/byte (xz -9: {summary['xz_bits_per_byte']:.3f}); "
              f"{summary['tokens_per_second']:.0f} tokens/s, MFU {summary['mfu']:.1%}")
        for text in samples:
            print("---\n" + text)
    return summary
