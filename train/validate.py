"""Checks a whole run config before any work: `check(config, workdir)`.

`train.trainer.setup` calls it first, so that a bad value fails in a second, before data
preparation, tokenizer training or compilation, and before `config.json` is written:

  * `model.block.attention_impl` is known and fits the model (no attention dropout or
    latent attention unless xla; cudnn: a GPU backend and a bf16/fp16 model.dtype);
  * `model.moe.dispatch=all_to_all` has a strategy that splits the experts over devices (ep);
  * context parallelism (a strategy with a `context` axis: cp, fsdp_cp) runs ring attention
    on a decoder's token batch that may be reordered (no multi-token prediction, no
    capacity-mode MoE), and ring attention runs under no other sequence split;
  * counts are positive (steps, batch, intervals, ...) and every enum value is known:
    the model, optimizer and schedule are built from the config (`train.build`);
  * the objective is known and fits the model family; the fine-tuning keys (`finetune.*`:
    method, regexes, ranks and sizes) hold values that work, and the freeze / train regexes
    match parameters (`train.trainable`);
  * `eval.tasks` names harness tasks that load (built-in, or task files with every field),
    and the model is a decoder with an LM head to score them (`train.task_eval`);
  * the mesh fits the device count, the strategy fits the model's parameter shapes
    (`jax.eval_shape` of the init: nothing is allocated) and the batch fits the batch
    axes and the processes;
  * the data source parses and its files exist, are readable, non-empty and of a known
    kind (a `tfds:` source: its prepared splits open; sft's chat sources:
    `train.objectives.sft.check_data`); a classification or qa run's examples all hold the
    fields its task reads (`data.tasks.check`);
  * objective=distill: its keys, the teacher checkpoint, the mode against both models, and one
    vocabulary and tokenizer for teacher and student (`train.objectives.distill.check_config`);
  * a configured tokenizer loads (a masked LM's has a mask token);
  * a resumed workdir: the saved run's parameters have the shapes this config gives them,
    or the error names the config keys that changed them.

The vocabulary of the shape checks is model.vocab_size, else the tokenizer's (the
configured one, or the one already trained in the workdir), else tokenizer.vocab_size
(the BPE still to be trained has at most that many tokens).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import ml_collections

from configs import loader
from data import builders, sources
from data.pipeline import process_rows
from data.tokenizer import Tokenizer, load_tokenizer
from models.layers.attention import ATTENTION_IMPLS
from sharding import mesh as mesh_lib
from sharding.strategies import CONTEXT, STAGE, STRATEGIES, check_pipeline_batch, get_strategy
from train import build, compilation_cache, init_from, objectives, task_eval
from train import program as program_lib
from train import trainable as trainable_lib

# (config key, smallest value): counts a run cannot work with below it.
MINIMUMS = (
    ("steps", 1), ("data.seq_len", 1), ("data.batch_size", 1), ("data.shuffle_window", 1), ("data.worker_count", 0),
    ("optimizer.grad_accum_steps", 1), ("checkpoint.save_interval_steps", 1), ("checkpoint.max_to_keep", 1),
    ("logging.log_every_steps", 1), ("logging.peak_flops", 0), ("eval.every_steps", 0), ("eval.max_batches", 0),
    ("eval.num_samples", 0), ("eval.sample_tokens", 0), ("eval.temperature", 0), ("eval.task_limit", 0),
    ("model.num_layers", 1), ("model.loss_chunk_size", 0), ("sharding.pipeline_microbatches", 1),
)
PIPELINE_SCHEDULES = ("gpipe",)
CHUNKED_LOSS_OBJECTIVES = ("lm", "sft")  # model.loss_chunk_size: the token cross-entropy of a decoder
LOCAL_SPLITS = ("train", "validation")  # what the embedded and files: sources hold
# (finetune key, smallest value, exclusive): the PEFT methods' sizes.
FINETUNE_MINIMUMS = (
    ("lora.rank", 1, False), ("lora.alpha", 0.0, True), ("lora.dropout", 0.0, False), ("qlora.block_size", 1, False),
    ("prefix.length", 1, False), ("prefix.mlp_hidden", 0, False), ("adapter.hidden", 1, False),
)
CHOICES = {"qlora.quant": ("nf4", "int8"), "adapter.kind": ("houlsby", "parallel")}


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ValueError (or FileNotFoundError) naming the first bad key and its fix.

    Args:
      config: the run config (configs/base.py's keys).
      workdir: the run's directory (it may not exist yet; nothing is written).
    """
    workdir = os.path.abspath(workdir)
    compilation_cache.check(config.train.compilation_cache_dir)
    _check_counts(config)
    _check_pipeline(config)
    _check_attention_impl(config)
    _check_moe_dispatch(config)
    _check_context_parallel(config)
    task_eval.check_tasks(config)  # an unknown task or a task file with missing fields
    check_finetune(config)
    _check_data(config, workdir)
    if config.init_from:
        init_from.check(config)
    config = build.resolved(config, workdir)  # a classifier's classes, from its data
    tokenizer = existing_tokenizer(config, workdir)
    abstract_params = abstract_params_of(config, tokenizer)
    _check_resume(config, workdir, abstract_params)


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _check_counts(config) -> None:
    for key, least in MINIMUMS:
        value = _get(config, key)
        if value < least:
            raise ValueError(f"config key `{key}`={value} must be >= {least}")
    process_rows(config.data.batch_size)  # the batch splits evenly over the processes
    chunk, name = config.model.loss_chunk_size, objectives.name_of(config)
    if chunk and (name not in CHUNKED_LOSS_OBJECTIVES or config.model.family == "bert"):
        raise ValueError(f"config key `model.loss_chunk_size`={chunk} chunks a decoder's next-token loss, but "
                         f"objective={name!r} with model.family={config.model.family!r}; use objective lm or sft "
                         "with a decoder family, or set model.loss_chunk_size=0")


def _check_pipeline(config) -> None:
    """A pipeline strategy (a `stage` mesh axis): stacked identical decoder layers that split into
    the stages, and micro-batches that split the step's rows evenly over the batch axes."""
    sh = config.sharding
    if sh.pipeline_schedule == "1f1b":
        raise ValueError("config key `sharding.pipeline_schedule`='1f1b': the training step pipelines with gpipe; "
                         "1F1B (its loss inside the pipeline) runs as the library schedule "
                         "sharding.pipeline.one_f_one_b, not through train.step yet; use gpipe")
    if sh.pipeline_schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"config key `sharding.pipeline_schedule`={sh.pipeline_schedule!r}; expected one of "
                         f"{PIPELINE_SCHEDULES}")
    strategy = STRATEGIES.get(sh.strategy)
    if strategy is None or STAGE not in strategy.mesh_axes:
        return
    try:
        mesh = mesh_lib.parse_mesh(sh.mesh or strategy.default_mesh, jax.device_count())
    except ValueError:
        return  # the mesh's own error comes with the shape checks
    stages, m = mesh.get(STAGE, 1), config.model
    if m.family == "bert":
        raise ValueError(f"config key `sharding.strategy`={sh.strategy!r} pipelines a decoder's layers, but "
                         "model.family='bert'; use a decoder family or a strategy without a stage axis")
    if not m.scan_layers:
        raise ValueError(f"config key `sharding.strategy`={sh.strategy!r} splits the stacked layers into pipeline "
                         "stages: set model.scan_layers=True")
    if m.first_dense_layers:
        raise ValueError(f"config key `sharding.strategy`={sh.strategy!r} pipelines one stack of identical layers: "
                         f"set model.first_dense_layers=0 (got {m.first_dense_layers})")
    if m.num_layers % stages:
        raise ValueError(f"config key `model.num_layers`={m.num_layers} does not split into the {stages} pipeline "
                         f"stages of mesh axis `stage`; use a multiple of {stages} or another stage size")
    rows = config.data.batch_size // config.optimizer.grad_accum_steps
    try:
        check_pipeline_batch(strategy, mesh, rows, sh.pipeline_microbatches)
    except ValueError as e:
        raise ValueError(f"config key `sharding.pipeline_microbatches`: {e}") from None


def _check_attention_impl(config) -> None:
    """`model.block.attention_impl` is known, fits the rest of the model, and cudnn has a GPU."""
    b = config.model.block
    impl = b.attention_impl
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"config key `model.block.attention_impl`={impl!r}; expected one of {ATTENTION_IMPLS}")
    if impl == "xla":
        return
    if b.attention_dropout_rate > 0:
        raise ValueError(f"config key `model.block.attention_impl`={impl!r} has no weight matrix to drop out; set "
                         f"model.block.attention_dropout_rate=0 (got {b.attention_dropout_rate}) or use xla")
    if config.model.mla.kv_lora_rank:
        raise ValueError(f"config key `model.block.attention_impl`={impl!r} is for standard attention; latent "
                         "attention (model.mla.kv_lora_rank > 0) computes its own, use xla")
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"config key `model.block.attention_impl`='cudnn' needs a GPU, but the JAX backend is "
                             f"{jax.default_backend()!r}; use blockwise or xla")
        if config.model.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"config key `model.block.attention_impl`='cudnn' needs model.dtype bfloat16 or "
                             f"float16, got {config.model.dtype!r}; use blockwise for float32")


def _check_moe_dispatch(config) -> None:
    """`model.moe.dispatch=all_to_all` sends tokens over the mesh axis that splits the experts: a
    strategy must split them (and the batch) over one."""
    moe, name = config.model.moe, config.sharding.strategy
    if not moe.num_experts or moe.dispatch != "all_to_all" or name not in STRATEGIES:
        return
    if "expert" not in dict(STRATEGIES[name].model_rules):
        users = [s.name for s in STRATEGIES.values() if "expert" in dict(s.model_rules)]
        raise ValueError(f"config key `model.moe.dispatch`='all_to_all' sends tokens to the devices holding their "
                         f"experts, but sharding.strategy={name!r} does not split the experts over devices; use "
                         f"sharding.strategy={' or '.join(users)} or model.moe.dispatch=auto")


CONTEXT_PARALLEL_OBJECTIVES = ("lm", "sft")  # packed token batches with positions: reorderable


def _check_context_parallel(config) -> None:
    """A `context` strategy gets ring attention and a batch whose tokens it may reorder (zig-zag,
    `sharding.context`); ring attention gets no sequence split but `context`'s."""
    strategy = get_strategy(config.sharding.strategy)
    impl = config.model.block.attention_impl
    if CONTEXT not in strategy.mesh_axes:
        if impl == "ring" and "act_seq" in dict(strategy.model_rules):
            raise ValueError(f"config key `model.block.attention_impl`='ring' passes key/value chunks around the "
                             f"`context` mesh axis, but strategy {strategy.name!r} splits the sequence over another "
                             "axis; use sharding.strategy=cp or fsdp_cp, or attention_impl=blockwise")
        return
    why = f"config key `sharding.strategy`={strategy.name!r} splits the sequence over the `{CONTEXT}` mesh axis"
    if impl != "ring":
        raise ValueError(f"{why}, which needs ring attention; set model.block.attention_impl=ring (got {impl!r})")
    name = objectives.name_of(config)
    if name not in CONTEXT_PARALLEL_OBJECTIVES or config.model.family == "bert":
        raise ValueError(f"{why} and reorders a decoder's token batch, but objective={name!r} with model.family="
                         f"{config.model.family!r}; use objective lm or sft with a decoder family")
    if config.model.mtp_depth:
        raise ValueError(f"{why} and reorders the tokens (zig-zag), but multi-token prediction reads the next tokens "
                         f"by index; set model.mtp_depth=0 (got {config.model.mtp_depth})")
    if config.model.moe.num_experts and config.model.moe.capacity_factor > 0:
        raise ValueError(f"{why} and reorders the tokens (zig-zag), but capacity-mode experts drop tokens by their "
                         f"order; set model.moe.capacity_factor=0 (dropless; got {config.model.moe.capacity_factor})")


def check_finetune(config) -> None:
    """The objective's name and the `finetune.*` values (the regexes are matched against the
    model's parameters later, by `train.trainable.split` inside `abstract_params_of`)."""
    objectives.check_name(config)
    f = config.finetune
    if f.method not in trainable_lib.METHODS:
        raise ValueError(f"config key `finetune.method`={f.method!r}; expected one of {trainable_lib.METHODS}")
    if f.freeze and f.method != "full":
        raise ValueError(f"config key `finetune.freeze` is set but finetune.method={f.method!r} already freezes all "
                         "but its own parameters; use finetune.train to train more, or method=full")
    if f.train and f.method == "full":
        raise ValueError("config key `finetune.train` is set but finetune.method='full' trains everything not "
                         "frozen; use finetune.freeze, or a PEFT method (lora, qlora, prefix, adapter)")
    if f.keep_sparsity and f.method != "full":
        raise ValueError(f"config key `finetune.keep_sparsity` holds the zeros of fully fine-tuned weights, but "
                         f"finetune.method={f.method!r} trains adapters over a frozen base; use method=full")
    if f.keep_sparsity and not config.init_from:
        raise ValueError("config key `finetune.keep_sparsity` keeps the zeros of the starting weights, but "
                         "init_from is empty (a random init has none); set init_from=run:DIR of a pruned model")
    if f.method == "full":
        return
    for key, least, exclusive in FINETUNE_MINIMUMS:
        group, name = key.split(".")
        value = f[group][name]
        if value < least or (exclusive and value == least):
            raise ValueError(f"config key `finetune.{key}`={value} must be {'>' if exclusive else '>='} {least}")
    if f.lora.dropout >= 1:
        raise ValueError(f"config key `finetune.lora.dropout`={f.lora.dropout} must be < 1 (a probability)")
    for key, allowed in CHOICES.items():
        group, name = key.split(".")
        if f[group][name] not in allowed:
            raise ValueError(f"config key `finetune.{key}`={f[group][name]!r}; expected one of {allowed}")


def _check_data(config, workdir: str) -> None:
    if build.objective_name(config) in build.TASK_OBJECTIVES:
        _check_task_data(config, workdir)
        return
    own = objectives.CHECKS.get(objectives.name_of(config))
    if own is not None:  # an objective that reads data of its own (sft's chat JSONL, preferences, tasks)
        own(config, workdir)
        return
    check_text_data(config, workdir)


def check_text_data(config, workdir: str) -> None:
    """`data.source` for `data.pipeline`'s packed text (lm, mlm, distill): it parses, a tfds
    source's splits open, local files exist and are readable text."""
    d = config.data
    try:
        spec = sources.parse_source(d.source)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config key `data.source`: {e}") from None
    if spec.kind == "tfds":
        data_dir = d.data_dir or os.path.join(workdir, "tfds")
        for split in dict.fromkeys((d.train_split, d.eval_split)):
            sources.open_split(d.source, split, data_dir=data_dir, text_key=d.text_key)
        return
    if spec.kind == "prepared":  # its splits open, and a tokenizer.path is the one it was prepared with
        for split in dict.fromkeys((d.train_split, d.eval_split)):
            sources.open_split(d.source, split)
        if config.tokenizer.path and not config.init_from:
            build.tokenizer(config, workdir, build.data_config(config, workdir))
        return
    if not 0.0 < d.validation_fraction < 1.0:
        raise ValueError(f"config key `data.validation_fraction`={d.validation_fraction} must lie in (0, 1): the "
                         "share of the text held out for validation")
    for key in ("train_split", "eval_split"):
        if d[key] not in LOCAL_SPLITS:
            raise ValueError(f"config key `data.{key}`={d[key]!r}; the {spec.kind} source has the splits "
                             f"{LOCAL_SPLITS}")
    for path in spec.paths:
        _check_text_file(path)


def _check_task_data(config, workdir: str) -> None:
    """A classification or qa run: a WordPiece tokenizer to come (init_from's or tokenizer.path),
    and every example of both splits with the fields the task reads (`data.tasks.check`)."""
    from data import tasks

    if not (config.tokenizer.path or config.init_from):
        raise ValueError(f"config key `objective`={config.objective!r} reads text with the model's WordPiece "
                         "tokenizer: set init_from=hf:DIR (its tokenizer comes along) or tokenizer.path")
    try:
        tasks.check(build.task_config(config, workdir))
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config key `data.source`={config.data.source!r}: {e}") from None


def _check_text_file(path: str) -> None:
    if not path.endswith(builders.TEXT_SUFFIXES + builders.JSONL_SUFFIXES):
        raise ValueError(f"data file {path} has an unknown suffix; accepted: "
                         f"{', '.join(builders.TEXT_SUFFIXES + builders.JSONL_SUFFIXES)} "
                         "(fix config key `data.source`)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist; fix the path in config key `data.source`")
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as e:
        raise ValueError(f"data file {path} cannot be read ({e.strerror}); fix its permissions or the path in "
                         "config key `data.source`") from None
    if not first:
        raise ValueError(f"data file {path} is empty; remove it from config key `data.source` or give it text")


def existing_tokenizer(config, workdir: str) -> Tokenizer | None:
    """The configured tokenizer, or the one trained into `workdir` earlier, or None (a BPE is
    still to be trained: its vocabulary size is checked instead)."""
    if config.tokenizer.path:
        try:
            return load_tokenizer(config.tokenizer.path)
        except (ValueError, OSError) as e:
            raise type(e)(f"config key `tokenizer.path`: {e}") from None
    if config.init_from:
        return init_from.tokenizer(config)
    saved = os.path.join(workdir, "tokenizer")
    if os.path.isdir(saved):
        return load_tokenizer(saved)
    specials = 2 if config.model.family == "bert" else 1
    if config.tokenizer.vocab_size < 256 + specials:
        raise ValueError(f"config key `tokenizer.vocab_size`={config.tokenizer.vocab_size} is too small for a "
                         f"byte-level BPE: it needs 256 byte tokens + {specials} special; set at least "
                         f"{256 + specials}")
    return None


def abstract_params_of(config, tokenizer: Tokenizer | None) -> Any:
    """The state's parameters (`params`: those that train, `frozen`: the others) as
    ShapeDtypeStructs under the config's strategy and mesh (the checks of `sharding.step.build`
    and of `finetune.*`'s regexes included); raises ValueError naming the bad key."""
    vocab = tokenizer.vocab_size if tokenizer is not None else config.tokenizer.vocab_size
    with _naming("model"):
        model = build.model(config, vocab)
    task_eval.check_model(config, model)  # eval.tasks score text: a decoder with an LM head
    # Without a tokenizer (a BPE still to train) the objective is built for its shapes only.
    objective = objectives.get(config, model, tokenizer)
    with _naming("optimizer` or `schedule"):
        tx, schedule = build.optimizer(config)
    strategy = get_strategy(config.sharding.strategy)
    spec = config.sharding.mesh or strategy.default_mesh
    try:
        mesh = mesh_lib.make_mesh(spec)
    except ValueError as e:
        raise ValueError(f"config key `sharding.mesh`: {e}; give axis sizes whose product is "
                         f"{jax.device_count()}, the device count (one size may be -1: the rest)") from None
    program = program_lib.build_for_run(config, model, tx, schedule, strategy=strategy, mesh=mesh,
                                        objective=objective)
    return {"params": program.abstract_state.params, "frozen": program.abstract_state.frozen}


@contextlib.contextmanager
def _naming(section: str):
    """Prefixes a ValueError that does not name its config key with the config section."""
    try:
        yield
    except ValueError as e:
        if "config key" in str(e) or str(e).startswith(section.split("`")[0]):
            raise
        raise ValueError(f"config `{section}`: {e}") from None


def _check_resume(config, workdir: str, abstract_params) -> None:
    """A workdir with checkpoints resumes only a run whose parameters have the same shapes."""
    saved = saved_config(workdir)
    if saved is None:
        return
    try:
        saved_params = abstract_params_of(saved, existing_tokenizer(saved, workdir))
    except Exception:  # noqa: BLE001 - a saved config we cannot rebuild: the restore checks leaf by leaf
        return
    before, after = _shapes(saved_params), _shapes(abstract_params)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if not changed:
        return
    keys = [f"{k} ({a!r} -> {b!r})" for k, a, b in _differing_keys(saved.to_dict(), config.to_dict())
            if k.split(".")[0] in ("model", "tokenizer", "optimizer")]
    leaf = changed[0]
    raise ValueError(
        f"{workdir} holds checkpoints of a model with other parameter shapes (e.g. {leaf}: {before.get(leaf)} -> "
        f"{after.get(leaf)}); changed config keys: {', '.join(keys) or 'none found'}. Resume with the saved "
        "values (WORKDIR/config.json) or start a new run with another --workdir")


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config saved with the newest committed checkpoint of `workdir` (None: no checkpoint)."""
    from train.checkpoint import COMMIT_MARKER

    root = os.path.join(workdir, "checkpoints")
    steps = sorted((int(d) for d in os.listdir(root) if d.isdigit() and
                    os.path.isfile(os.path.join(root, d, COMMIT_MARKER))), reverse=True) if os.path.isdir(root) else []
    for step in steps:
        try:
            with open(os.path.join(root, str(step), "config", "metadata")) as f:
                return loader.with_defaults(json.load(f))
        except (OSError, ValueError):
            continue  # an unreadable step: the restore moves it aside
    return None


def _shapes(state_params) -> dict[str, tuple]:
    """Shape and dtype by path of `abstract_params_of`'s trees (frozen ones marked `frozen`)."""
    out = {}
    for prefix, tree in (("", state_params["params"]), ("frozen", state_params["frozen"])):
        out.update({prefix + jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype))
                    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]})
    return out


def _differing_keys(before: dict, after: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
