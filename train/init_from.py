"""Starting weights for a new run: `config.init_from` = `hf:DIR` or `run:WORKDIR[@STEP]`.

    hf:DIR            a Hugging Face directory (config.json, safetensors, tokenizer.json)
    run:WORKDIR@STEP  a `python -m train` run's checkpoint (the latest committed one if no @STEP)

The checkpoint decides the model's shape: for hf: the model is `models.hf.model_of(DIR)` (under
the task head of a classification or qa run, `_head`) with the run's execution settings (RUN_KEYS: dtype, remat, scan, dropout, MoE execution, PEFT)
applied; for run: the saved config's model keys with the run's RUN_KEYS. A model key of
the run config set (away from configs/base.py's default) to a value the checkpoint
contradicts is one error naming every such key. The tokenizer comes from the checkpoint.

Loading (`initial_params`) goes leaf by leaf straight into the layout: for hf: the
safetensors files are opened lazily (`models.convert.sources.SafetensorsReader`), each
parameter is converted alone by its family's `Source` and placed with
`jax.make_array_from_callback`, so every device receives only its slice and the host holds
about one tensor at a time; for run: `train.checkpoint.restore_params` reads the params into
the layout's shardings. Parameters the checkpoint does not have keep their init if they
are PEFT parameters (`models.layers.peft.is_peft_path`) or a task head (HEAD_NAMES): a base
checkpoint loads into a LoRA model or a classifier.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import base
from models.layers.peft import is_peft_path

KINDS = ("hf", "run")
# Model keys the run decides, not the checkpoint: how the model computes, not its shapes.
RUN_KEYS = ("dtype", "param_dtype", "remat", "scan_layers", "block.dropout_rate", "block.attention_dropout_rate",
            "block.attention_impl", "block.kv_cache_quant",
            "moe.capacity_factor", "moe.dropless_impl", "moe.grouped_matmul", "moe.dispatch", "moe.aux_loss_weight",
            "moe.router_z_loss_weight", "moe.seq_aux_loss_weight", "moe.bias_update_rate", "mtp_loss_weight",
            "loss_chunk_size")
# Task heads a pretrained checkpoint lacks: they keep their init (a reward model's or value
# head's `score` on a causal LM's trunk included).
HEAD_NAMES = ("classifier", "qa_outputs", "score")


@dataclasses.dataclass(frozen=True)
class Spec:
    kind: str  # hf | run
    path: str
    step: int | None = None

    def __str__(self):
        return f"{self.kind}:{self.path}" + ("" if self.step is None else f"@{self.step}")


def parse(value: str) -> Spec:
    """The Spec of an `init_from` value; ValueError names the key and the accepted forms."""
    kind, sep, rest = value.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise ValueError(f"config key `init_from`={value!r}; expected hf:DIR (a Hugging Face directory) or "
                         "run:WORKDIR[@STEP] (a `python -m train` run)")
    if kind == "hf":
        return Spec("hf", os.path.abspath(rest))
    path, at, step = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if at and not step.isdigit():
        raise ValueError(f"config key `init_from`={value!r}: the step after @ must be a number")
    return Spec("run", os.path.abspath(path), int(step) if at else None)


def check(config: ml_collections.ConfigDict) -> Spec:
    """Checks that `init_from` names a readable checkpoint (files only: no weights read)."""
    spec = parse(config.init_from)
    if not os.path.isdir(spec.path):
        raise FileNotFoundError(f"config key `init_from`={config.init_from!r}: {spec.path} is not a directory")
    if config.tokenizer.path:
        raise ValueError(f"config keys `init_from`={config.init_from!r} and `tokenizer.path` are both set: the "
                         "tokenizer comes from the checkpoint; remove tokenizer.path")
    if spec.kind == "hf":
        from inference.load import is_hf_dir

        if not is_hf_dir(spec.path):
            raise FileNotFoundError(f"config key `init_from`: {spec.path} is not a Hugging Face model directory "
                                    "(config.json + model.safetensors or its index)")
    else:
        try:
            run_step(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config key `init_from`={config.init_from!r}: {e}") from None
    return spec


def run_step(spec: Spec) -> int:
    """The committed checkpoint step a run: spec names (its @STEP, else the latest)."""
    from inference.load import committed_steps, is_workdir

    if not is_workdir(spec.path):
        raise FileNotFoundError(f"{spec.path} is not a `python -m train` workdir (config.json + checkpoints/)")
    steps = committed_steps(spec.path)
    if not steps:
        raise FileNotFoundError(f"{spec.path} holds no committed checkpoint; train it until a checkpoint is saved")
    if spec.step is not None and spec.step not in steps:
        raise FileNotFoundError(f"{spec.path} has no checkpoint at step {spec.step}; it holds steps {steps}")
    return steps[-1] if spec.step is None else spec.step


def run_config(spec: Spec) -> ml_collections.ConfigDict:
    """The run config saved with the checkpoint a run: spec names."""
    from inference.load import _saved_config

    return _saved_config(spec.path, run_step(spec))


def tokenizer(config: ml_collections.ConfigDict):
    """The checkpoint's tokenizer: DIR's tokenizer.json, or the run's (its tokenizer.path or
    WORKDIR/tokenizer)."""
    from data.tokenizer import load_tokenizer

    spec = parse(config.init_from)
    try:
        return load_tokenizer(spec.path) if spec.kind == "hf" else run_tokenizer(spec)
    except (ValueError, OSError) as e:
        raise type(e)(f"config key `init_from`={config.init_from!r}: its tokenizer: {e}") from None


def run_tokenizer(spec: Spec):
    """The tokenizer of the run a run: spec names (`workdir_tokenizer`)."""
    return workdir_tokenizer(run_config(spec), spec.path)


def workdir_tokenizer(config: ml_collections.ConfigDict, workdir: str):
    """The tokenizer a run trained with: its tokenizer.path, else WORKDIR/tokenizer, else (a
    run that started from `init_from` and trained none) its checkpoint's."""
    from data.tokenizer import load_tokenizer

    path = config.tokenizer.path or os.path.join(workdir, "tokenizer")
    if not config.tokenizer.path and not os.path.exists(path) and config.get("init_from"):
        return tokenizer(config)
    return load_tokenizer(path)


def model(config: ml_collections.ConfigDict, vocab_size: int) -> nn.Module:
    """The model `train.build.model` builds when `init_from` is set (see the module docstring)."""
    from train import build

    spec = parse(config.init_from)
    if spec.kind == "run":
        saved = run_config(spec)
        merged = ml_collections.ConfigDict(config.to_dict())
        merged.model = saved.model
        for key in RUN_KEYS:
            _set(merged.model, key, _get(config.model, key))
        merged.init_from = saved.init_from  # a run that itself started from a checkpoint has its shapes
        _contradictions(config, build.model(saved, vocab_size), spec)
        return build.model(merged, vocab_size)
    from models import hf

    m = config.model
    dtype, param_dtype = build._dtype(m.dtype, "model.dtype"), build._dtype(m.param_dtype, "model.param_dtype")
    checkpoint = hf.model_of(spec.path, **_head(config, spec))
    _contradictions(config, checkpoint, spec)
    c = checkpoint.config
    block = dataclasses.replace(c.block, dtype=dtype, param_dtype=param_dtype, dropout_rate=m.block.dropout_rate,
                                attention_dropout_rate=m.block.attention_dropout_rate,
                                attention_impl=m.block.attention_impl, kv_cache_quant=m.block.kv_cache_quant,
                                peft=_peft(config))
    if block.moe is not None:
        e = m.moe
        block = dataclasses.replace(block, moe=dataclasses.replace(
            block.moe, capacity_factor=e.capacity_factor, dropless_impl=e.dropless_impl,
            grouped_matmul=e.grouped_matmul, dispatch=e.dispatch, aux_loss_weight=e.aux_loss_weight,
            router_z_loss_weight=e.router_z_loss_weight, seq_aux_loss_weight=e.seq_aux_loss_weight))
    c = dataclasses.replace(c, block=block, remat=m.remat, scan_layers=m.scan_layers)
    if hasattr(c, "pipeline_microbatches"):  # a decoder: pipelined under the pp strategies
        c = dataclasses.replace(c, pipeline_microbatches=config.sharding.pipeline_microbatches)
    if c.max_len < config.data.seq_len:
        raise ValueError(f"config key `data.seq_len`={config.data.seq_len} exceeds the context of "
                         f"{spec} (max_len {c.max_len})")
    return checkpoint.clone(config=c)


def _head(config: ml_collections.ConfigDict, spec: Spec) -> dict[str, Any]:
    """`models.hf.model_of`'s head keywords for the run's objective: a classification or qa run
    puts its task head on the checkpoint's encoder (a plain BertModel directory's included;
    the head keeps its fresh init, HEAD_NAMES); a decoder run takes the head of its objective
    (`train.build.decoder_head`: a reward run's score head, fresh on a causal LM); other
    objectives take the checkpoint's own."""
    from models import hf
    from train import build

    name = build.objective_name(config)
    arch = hf._architecture(hf._read_config(spec.path))
    if name not in build.TASK_OBJECTIVES:
        return {} if arch in hf.BERTS else _decoder_head(config, spec, arch)
    if arch not in hf.BERTS:
        raise ValueError(f"config key `objective`={name!r} trains a BERT task head, but `init_from`={str(spec)!r} "
                         f"holds a {arch}; start from a BERT checkpoint (BertModel, BertFor...)")
    if name == "qa":
        return {"head": "qa"}
    return {"head": "classification", "num_labels": build.num_labels(config)}


def _decoder_head(config: ml_collections.ConfigDict, spec: Spec, arch: str) -> dict[str, Any]:
    """The decoder head of the run's objective on the checkpoint `arch` (a reward model's score
    head on a causal LM is fresh); a reward model checkpoint serves a reward run only."""
    from models import hf
    from train import build

    head = build.decoder_head(config)
    if arch.endswith("ForSequenceClassification") and head != "score":
        raise ValueError(f"`init_from`={str(spec)!r} holds a {arch} (a reward model: no LM head); "
                         f"objective={build.objective_name(config)!r} needs a causal LM checkpoint, or use "
                         "objective=reward (or rl.reward_model for the RL rewards)")
    if head == "lm":
        return {}
    if arch not in hf.llama_convert.ARCHITECTURES:
        raise ValueError(f"config key `objective`={build.objective_name(config)!r} puts a score head on the "
                         f"checkpoint of `init_from`={str(spec)!r}, a {arch}; score heads load from and save to "
                         "LLaMA / Qwen checkpoints (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                         "their *ForSequenceClassification)")
    return {"head": head, "num_labels": 1}


def _peft(config):
    """The run's PEFT config (`train.build.peft`)."""
    from train import build

    return build.peft(config)


def _get(c, key: str):
    for part in key.split("."):
        c = c[part]
    return c


def _set(c, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        c = c[part]
    c[last] = value


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def checkpoint_keys(model_: nn.Module) -> dict[str, Any]:
    """The model keys (configs/base.py's `model.*`, dotted) that describe `model_`'s shapes."""
    c = model_.config
    b = c.block
    rope = getattr(b, "rope", None)
    keys = {"vocab_size": c.vocab_size, "num_layers": c.num_layers, "max_len": c.max_len,
            "positional": getattr(c, "positional", "learned"), "tie_embeddings": getattr(c, "tie_embeddings", True),
            "block.d_model": b.d_model, "block.num_heads": b.num_heads, "block.num_kv_heads": b.kv_heads,
            "block.head_dim": b.head_size, "block.d_ff": b.d_ff, "block.mlp_activation": b.mlp_activation,
            "block.norm": b.norm, "block.norm_position": b.norm_position, "block.norm_eps": b.norm_eps,
            "block.use_bias": b.use_bias, "block.qkv_bias": str(b.has_qkv_bias).lower(),
            "block.out_bias": str(b.has_out_bias).lower(), "block.mlp_bias": str(b.has_mlp_bias).lower(),
            "block.qk_norm": b.qk_norm, "block.sliding_window": b.sliding_window or 0,
            "rope_theta": rope and rope.theta, "rope_scaling": rope and rope.scaling,
            "rope_factor": rope and rope.factor, "rope_original_max_len": rope and rope.original_max_len,
            "first_dense_layers": getattr(c, "first_dense_layers", 0), "mtp_depth": getattr(c, "mtp_depth", 0)}
    if hasattr(c, "type_vocab_size"):
        keys["type_vocab_size"] = c.type_vocab_size
    moe, mla = getattr(b, "moe", None), getattr(b, "mla", None)
    keys["moe.num_experts"] = moe.num_experts if moe else 0
    if moe:
        keys.update({"moe.num_experts_per_tok": moe.num_experts_per_tok, "moe.expert_d_ff": moe.expert_d_ff,
                     "moe.score_func": moe.score_func, "moe.norm_topk_prob": moe.norm_topk_prob,
                     "moe.num_shared_experts": moe.num_shared_experts, "moe.shared_d_ff": moe.shared_width,
                     "moe.routed_scaling_factor": moe.routed_scaling_factor, "moe.n_group": moe.n_group,
                     "moe.topk_group": moe.topk_group, "moe.score_correction_bias": moe.score_correction_bias})
    keys["mla.kv_lora_rank"] = mla.kv_lora_rank if mla else 0
    if mla:
        keys.update({"mla.q_lora_rank": mla.q_lora_rank or 0, "mla.qk_nope_head_dim": mla.qk_nope_head_dim,
                     "mla.qk_rope_head_dim": mla.qk_rope_head_dim, "mla.v_head_dim": mla.v_head_dim})
    return keys


def _contradictions(config: ml_collections.ConfigDict, checkpoint: nn.Module, spec: Spec) -> None:
    """One ValueError naming every model key the run set to a value the checkpoint contradicts."""
    defaults = _flat(base.get_config().model.to_dict())
    given = _flat(config.model.to_dict())
    have = checkpoint_keys(checkpoint)
    family = "bert" if not hasattr(checkpoint.config, "mtp_depth") else None
    bad = []
    if (config.model.family == "bert") != (family == "bert") and config.model.family != defaults["family"]:
        bad.append(f"model.family={config.model.family} but {spec} is {'a BERT' if family else 'a decoder'}")
    for key, value in given.items():
        if key in RUN_KEYS or key == "family" or value == defaults.get(key):
            continue
        theirs = have.get(key, defaults.get(key))
        if value != theirs:
            bad.append(f"model.{key}={value} but {spec} has {theirs}")
    if bad:
        raise ValueError(f"config keys contradict the checkpoint of `init_from`: {'; '.join(bad)}; remove these "
                         "overrides (the checkpoint sets the model's shape) or start from another checkpoint")


def initial_params(config: ml_collections.ConfigDict, abstract_params, model_: nn.Module, *, current=None):
    """The checkpoint's parameters, placed in the shardings of `abstract_params`.

    Args:
      config: the run config (its `init_from`).
      abstract_params: the params' tree of `jax.ShapeDtypeStruct`s (or arrays) with shardings.
      model_: the model `train.build.model` built for this config.
      current: the params as initialized (same tree); the leaves the checkpoint lacks
        (PEFT parameters, task heads) are taken from it. None: every leaf must be found.

    Returns:
      The params tree, each leaf a `jax.Array` with its abstract leaf's sharding and dtype.
    """
    return load_params(parse(config.init_from), abstract_params, model_, current=current)


def load_params(spec: Spec, abstract_params, model_: nn.Module, *, current=None):
    """`initial_params` of a checkpoint named by its Spec (an `hf:` or `run:` checkpoint read
    straight into the shardings of `abstract_params`: e.g. a reward model scoring the policy's
    rollouts, `train.reward_model`)."""
    flat = {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    kept = {p for p in flat if is_peft_path("/".join(p)) or any(part in HEAD_NAMES for part in p)}
    if spec.kind == "hf":
        loaded = _load_hf(spec, flat, model_, kept)
    else:
        loaded = _load_run(spec, flat, kept)
    for path in flat:  # PPO's separate value model (models.policy_value) starts from the checkpoint's trunk
        if path[0] == "value_model" and path not in loaded and path[1:] in loaded:
            loaded[path] = jax.jit(lambda x: x, out_shardings=flat[path].sharding)(loaded[path[1:]])
    missing = sorted("/".join(p) for p in flat if p not in loaded and (current is None or p not in kept))
    if missing:
        raise ValueError(f"`init_from`={str(spec)!r} has no weights for {missing[:5]}"
                         f"{' and more' if len(missing) > 5 else ''}; the model has parameters the checkpoint lacks")
    current_flat = {} if current is None else {_path(p): x for p, x in
                                               jax.tree_util.tree_flatten_with_path(current)[0]}
    leaves = [loaded[p] if p in loaded else current_flat[p] for p in flat]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_params), leaves)


def _path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def _load_hf(spec: Spec, flat: dict, model_: nn.Module, kept: set) -> dict:
    """Leaf by leaf: read the tensors of one Source, convert, place, drop the host copy."""
    from models import hf
    from models.convert.sources import SafetensorsReader, check_reads

    out = {}
    with SafetensorsReader(spec.path) as reader:
        sources = hf.param_sources(spec.path, model_, reader.names())
        sources = {p: s for p, s in sources.items() if p in flat}  # e.g. a pooler the model has not
        check_reads({p: s for p, s in sources.items() if p not in kept or all(n in reader for n in s.reads)},
                    reader.names())
        for path, source in sources.items():
            if path in kept and not all(n in reader for n in source.reads):
                continue
            out[path] = place(source.load(reader.get, path), flat[path])
    return out


def place(host: np.ndarray, abstract) -> jax.Array:
    """`host` as a jax.Array of `abstract`'s dtype and sharding: each device receives only its
    slice (`jax.make_array_from_callback`)."""
    dtype = np.dtype(abstract.dtype)
    if tuple(host.shape) != tuple(abstract.shape):
        raise ValueError(f"a checkpoint tensor has shape {host.shape}; the model wants {tuple(abstract.shape)}")
    host = host.astype(dtype, copy=False)
    return jax.make_array_from_callback(tuple(abstract.shape), abstract.sharding, lambda index: host[index])


def _load_run(spec: Spec, flat: dict, kept: set) -> dict:
    """The whole params a run computes with (`inference.load.run_params`: trained + frozen, a
    QLoRA base dequantized), restored into the new layout where the new model has the same
    leaf. A LoRA the new model does not continue (its LoRA leaves absent) is merged into the
    base kernels first (`models.layers.peft.merge`); leaves the run has and the new model also
    has, PEFT ones included, are loaded, the rest of `kept` keeps its init."""
    from inference.load import run_params
    from models.layers.peft import merge
    from train import build

    saved = run_config(spec)
    source = build.model(saved, run_tokenizer(spec).vocab_size)
    # What the new model lacks (e.g. a LoRA to merge) is read whole onto every device of the
    # new layout's mesh, so that it meets the kernels it is merged into.
    mesh = next((x.sharding.mesh for x in flat.values() if isinstance(x.sharding, jax.sharding.NamedSharding)), None)
    device = (jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if mesh is None else
              jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    shapes = jax.eval_shape(lambda: nn.unbox(source.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))

    def target(key_path, x):
        want = flat.get(_path(key_path))
        fits = want is not None and tuple(want.shape) == tuple(x.shape)
        return jax.ShapeDtypeStruct(x.shape, want.dtype if fits else x.dtype, sharding=want.sharding if fits else device)

    params = run_params(spec.path, run_step(spec), saved, source, jax.tree_util.tree_map_with_path(target, shapes))
    restored = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if any(is_peft_path("/".join(p)) and p not in flat for p in restored):
        _, params = merge(source, params)
        restored = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for path, x in restored.items():
        want = flat.get(path)
        if want is None or tuple(want.shape) != tuple(x.shape):
            continue
        out[path] = x if x.sharding == want.sharding else place(np.asarray(x), want)
    return out


def initial_state(config: ml_collections.ConfigDict, state, run) -> Any:
    """`state` (a new run's init, laid out) with its params (and `frozen`, if the state has
    it) replaced by the checkpoint's; PEFT and task-head leaves the checkpoint lacks keep
    their init. The trainer calls it after a new run's init, never on resume."""
    from models import quant

    frozen = getattr(state, "frozen", None) or {}
    quantized = any(quant.is_quantized(x) for x in jax.tree_util.tree_leaves(frozen, is_leaf=quant.is_quantized))
    # A QLoRA base is loaded as the float kernels it quantizes, each laid out like its codes.
    wanted = jax.tree_util.tree_map(_float_kernel, frozen, is_leaf=quant.is_quantized) if quantized else frozen
    params = _merged(state.replace(frozen=wanted))
    loaded = initial_params(config, params, run.model, current=params)
    if not frozen:
        return state.replace(params=loaded)
    new_frozen = _subtree(loaded, frozen)
    if quantized:
        from train import trainable

        shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
        new_frozen = jax.jit(lambda f: trainable.store_frozen(f, config), out_shardings=shardings)(new_frozen)
    return state.replace(params=_subtree(loaded, state.params), frozen=new_frozen)


def _float_kernel(x):
    """A quantized kernel's float ShapeDtypeStruct with its codes' sharding (each split
    dimension kept where it divides the kernel's, else whole); other leaves as they are."""
    from models import quant

    if not quant.is_quantized(x):
        return x
    sharding = x.codes.sharding
    spec = list(sharding.spec) + [None] * (len(x.shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        ways = 1 if axes is None else math.prod(sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple)
                                                                                 else (axes,)))
        if x.shape[i] % ways:
            spec[i] = None
    return jax.ShapeDtypeStruct(x.shape, np.dtype(x.dtype),
                                sharding=jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)))


def _merged(state):
    """params and frozen (disjoint nested dicts) as one tree."""
    frozen = getattr(state, "frozen", None)
    if not frozen:
        return state.params

    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
        return out

    return merge(state.params, frozen)


def _subtree(full, like):
    """The leaves of `full` at the paths of `like`."""
    if not isinstance(like, dict):
        return full
    return {k: _subtree(full[k], v) for k, v in like.items()}
