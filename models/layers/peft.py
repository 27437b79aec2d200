"""Parameter-efficient fine-tuning inside the layers: LoRA (rsLoRA, DoRA), prefix tuning and
bottleneck adapters. One `PeftConfig` rides on `BlockConfig.peft`; None (the default) leaves
every layer exactly as it was.

Naming: every parameter a method adds has a path component that `is_peft_path` recognizes
(`<kernel>_lora_a`, `<kernel>_lora_b`, `<kernel>_lora_magnitude`, `prefix_*`, `adapter_*`), so
the trainer can tell what trains from what is frozen, and a base checkpoint (which has none
of them) loads into a model that has them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ADAPTER_KINDS = ("houlsby", "parallel")
ADAPTER_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")  # models.layers.feedforward.ACTIVATIONS
PEFT_NAME = re.compile(r"(_lora_(a|b|magnitude)$)|(^prefix_)|(^adapter_)")


def is_peft_path(path: str) -> bool:
    """Whether a '/'-joined parameter path names a parameter a PEFT method added."""
    return any(PEFT_NAME.search(part) for part in path.split("/"))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank updates W + (alpha / r) B A (Hu et al. 2021) on the kernels whose parameter path
    ('/'-joined, e.g. `layer_0/self_attention/query`) matches `targets` (re.search).

    Attributes:
      targets: regex over parameter paths.
      rank: r.
      alpha: the scale's numerator.
      dropout: dropout on the low-rank branch's input (training only).
      rslora: scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r.
      dora: weight-decomposed LoRA (Liu et al. 2024): a learned magnitude per output feature.
    """

    targets: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning (Li & Liang 2021): `length` learned key/value positions in every
    self-attention layer; `mlp_hidden` > 0 reparameterizes them through an MLP while training."""

    length: int
    mlp_hidden: int = 0

    def __post_init__(self):
        if self.length <= 0:
            raise ValueError(f"finetune.prefix.length={self.length}: a prefix needs at least one position; use >= 1")
        if self.mlp_hidden < 0:
            raise ValueError(f"finetune.prefix.mlp_hidden={self.mlp_hidden} must be >= 0 (0: no MLP "
                             "reparameterization)")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapters, `hidden` wide, scale * up(act(down(h))) with `up` zero at init:
    "houlsby" (serial, on the output of the attention and the MLP sub-layers, Houlsby et al.
    2019) or "parallel" (beside the MLP sub-layer, from its normed input, He et al. 2022,
    who scale it by 4). See `models.layers.adapters`."""

    hidden: int
    kind: str = "houlsby"
    activation: str = "relu"
    scale: float = 1.0

    def __post_init__(self):
        if self.hidden <= 0:
            raise ValueError(f"finetune.adapter.hidden={self.hidden} must be >= 1 (the bottleneck width)")
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"finetune.adapter.kind={self.kind!r} is unknown; expected one of {ADAPTER_KINDS}")
        if self.activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"finetune.adapter.activation={self.activation!r} is unknown; expected one of "
                             f"{ADAPTER_ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    lora: LoraConfig | None = None
    prefix: PrefixConfig | None = None
    adapter: AdapterConfig | None = None


# ---------------------------------------------------------------------------------------------
# LoRA / rsLoRA / DoRA on a kernel (activation-level, as peft computes it, so dropout works).
#
# A kernel W has n_in input axes and the rest output axes: y = x . W contracts x's last n_in
# axes with W's first n_in (an embedding table [V, D] is a kernel with the one-hot ids as input).
# Its factors: A [*in, r] (the kernel's input names + None), B [r, *out] (None + the output
# names) and, with DoRA, a magnitude [*out] (the output names), so every strategy lays them out.
# ---------------------------------------------------------------------------------------------

# What a LoRA target regex may name, for the error when it names nothing.
LORA_SITES = ("self_attention/{query,key,value,out}", "cross_attention/{query,key,value,out}",
              "mlp/{wi,wi_gate,wi_up,wo}", "embed/embedding", "word_embeddings/embedding", "lm_head")


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One kernel's LoRA parameters (values), as `lora_factors` made them."""

    a: Any
    b: Any
    magnitude: Any
    scale: float
    n_in: int
    dropout: float


def kernel_path(module, name: str) -> str:
    """The '/'-joined parameter path of `module`'s param `name` (what `LoraConfig.targets` matches)."""
    return "/".join((*module.path, name))


def lora_factors(module, name: str, kernel, *, n_in: int, names: tuple, lora: LoraConfig | None,
                 lookup: bool = False) -> LoraFactors | None:
    """Creates (or reads) the LoRA parameters of `module`'s kernel `name` if `lora` targets it.

    Args:
      module: the flax module that owns the kernel (inside its setup or compact method).
      name: the kernel's param name; the factors are `<name>_lora_a`, `<name>_lora_b` and,
        with DoRA, `<name>_lora_magnitude`.
      kernel: the kernel's value [*in, *out] (for shapes and the DoRA magnitude's init).
      n_in: how many leading kernel axes are inputs.
      names: the kernel's logical axis names.
      lora: the model's LoraConfig (None: no LoRA anywhere).
      lookup: an embedding table: A is zero-initialized and B normal, as peft's Embedding
        (the product is zero either way, so step 0 equals the base model).

    Returns:
      The factors, or None when the kernel is not a target.
    """
    if lora is None:
        return None
    path = kernel_path(module, name)
    if not re.search(lora.targets, path):
        return None
    shape = tuple(kernel.shape)
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    if lora.rank > min(fan_in, fan_out):
        raise ValueError(f"finetune.lora.rank={lora.rank} exceeds kernel {path}'s smaller dimension "
                         f"(input {fan_in}, output {fan_out}); use a rank <= {min(fan_in, fan_out)} or exclude it "
                         f"from finetune.lora.targets")
    dtype = kernel.dtype  # the kernel's storage dtype (param_dtype)
    in_names, out_names = tuple(names[:n_in]), tuple(names[n_in:])
    if lookup:
        init_a, init_b = nn.initializers.zeros, nn.initializers.normal(1.0)
    else:
        # kaiming_uniform(a=sqrt(5)) of torch's [r, in] weight, as peft: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        init_a = lambda key, s, d: jax.random.uniform(key, s, d, -bound, bound)
        init_b = nn.initializers.zeros
    a = module.param(f"{name}_lora_a", nn.with_logical_partitioning(init_a, in_names + (None,)),
                     shape[:n_in] + (lora.rank,), dtype)
    b = module.param(f"{name}_lora_b", nn.with_logical_partitioning(init_b, (None,) + out_names),
                     (lora.rank,) + shape[n_in:], dtype)
    magnitude = None
    if lora.dora:
        def init_magnitude(key, s, d):  # peft: the column norm of W + scale * BA at creation
            del key
            return column_norm(kernel, a, b, lora.scale, n_in).reshape(s).astype(d)

        magnitude = module.param(f"{name}_lora_magnitude", nn.with_logical_partitioning(init_magnitude, out_names),
                                 shape[n_in:], dtype)
    return LoraFactors(a, b, magnitude, lora.scale, n_in, lora.dropout)


def lora_delta(a, b, n_in: int):
    """B A as a kernel-shaped array [*in, *out] (float32)."""
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return jnp.tensordot(a32, b32, axes=1) if n_in else b32


def column_norm(kernel, a, b, scale: float, n_in: int):
    """||W + scale B A|| over the input axes, one per output feature [*out] (float32): DoRA's norm."""
    w = jnp.asarray(kernel, jnp.float32) + scale * lora_delta(a, b, n_in)
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(n_in))))


def _contract(x, w, n_in: int, lookup: bool):
    if lookup:
        return jnp.take(w, x, axis=0)
    return jnp.tensordot(x, w, axes=n_in)


def lora_output(module, factors: LoraFactors | None, kernel, x, y, *, lookup: bool = False,
                deterministic: bool = True):
    """The kernel's output with its LoRA (DoRA) update, as peft computes it.

    Args:
      module: the owning module (for the dropout rng).
      factors: from `lora_factors`; None returns `y` unchanged.
      kernel: the base kernel [*in, *out].
      x: the input (ids for an embedding lookup).
      y: the base output x . W, bias not yet added (DoRA rescales it, not the bias).
      lookup: `x` are ids into the table `kernel`.
      deterministic: no dropout on the low-rank branch's input.

    Returns:
      y + scale (dropout(x) A) B; with DoRA (m / n - 1) dropout(x) W + (m / n) scale (dropout(x) A) B
      added instead, n = ||W + scale B A|| per output feature, detached from the gradient.
    """
    if factors is None:
        return y
    f, dtype = factors, y.dtype
    a, b = f.a.astype(dtype), f.b.astype(dtype)
    xd = x
    dropped = f.dropout > 0.0 and not deterministic and not lookup
    if dropped:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - f.dropout, x.shape)
        xd = jnp.where(keep, x / (1.0 - f.dropout), 0.0).astype(x.dtype)
    low_rank = _contract(_contract(xd, a, f.n_in, lookup), b, 1, False) * f.scale
    if f.magnitude is None:
        return y + low_rank.astype(dtype)
    norm = jax.lax.stop_gradient(column_norm(kernel, jax.lax.stop_gradient(f.a), jax.lax.stop_gradient(f.b),
                                             f.scale, f.n_in))
    ratio = (f.magnitude.astype(jnp.float32) / norm).astype(dtype)
    base = _contract(xd, kernel.astype(dtype), f.n_in, lookup) if dropped else y
    return y + (ratio - 1) * base + ratio * low_rank.astype(dtype)


def lora_project(module, name: str, kernel, x, y, *, n_in: int, names: tuple, lora: LoraConfig | None,
                 deterministic: bool = True):
    """`lora_factors` then `lora_output` for a kernel used once in a compact method."""
    factors = lora_factors(module, name, kernel, n_in=n_in, names=names, lora=lora)
    return lora_output(module, factors, kernel, x, y, deterministic=deterministic)


def refuse_lora(module, names: tuple[str, ...], lora: LoraConfig | None, what: str) -> None:
    """A one-line error if `lora` targets one of `module`'s kernels `names` that have no LoRA."""
    if lora is None:
        return
    for name in names:
        path = kernel_path(module, name)
        if re.search(lora.targets, path):
            raise ValueError(f"finetune.lora.targets={lora.targets!r} matches {path}, {what}, which has no LoRA; "
                             f"narrow the regex to attention or dense MLP kernels, e.g. "
                             f"'self_attention/(query|key|value|out)'")


def check_lora_matched(lora: LoraConfig | None, params) -> None:
    """A one-line error if `lora` is set but no kernel of `params` got LoRA factors."""
    if lora is None:
        return
    found = any(str(getattr(k, "key", k)).endswith("_lora_a") for path, _ in
                jax.tree_util.tree_leaves_with_path(params) for k in path)
    if not found:
        raise ValueError(f"finetune.lora.targets={lora.targets!r} matches no kernel; it is re.search-ed over "
                         f"parameter paths such as layer_0/self_attention/query (LoRA sites: "
                         f"{', '.join(LORA_SITES)}), e.g. 'self_attention/(query|value)'")


def _lora_kernels(params, prefix=()):
    """(path tuple of the containing dict, kernel name) of every kernel with LoRA factors."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            yield from _lora_kernels(value, prefix + (key,))
        elif key.endswith("_lora_a"):
            yield prefix, key.removesuffix("_lora_a")


def _per_layer(fn, lead: int):
    """`fn` mapped over `lead` leading (stacked-layers) axes of every argument."""
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn


def _fold(lora: LoraConfig, node: Mapping, name: str):
    """(merged kernel, DoRA norm or None) of kernel `name` in the params dict `node`."""
    w, a, b = node[name], node[f"{name}_lora_a"], node[f"{name}_lora_b"]
    lead = a.ndim + b.ndim - 2 - w.ndim  # stacked layers (scan_layers)
    n_in = a.ndim - 1 - lead
    m = node.get(f"{name}_lora_magnitude")

    def fold(w, a, b, *m):
        updated = jnp.asarray(w, jnp.float32) + lora.scale * lora_delta(a, b, n_in)
        if not m:
            return updated.astype(w.dtype), jnp.zeros(())
        norm = jnp.sqrt(jnp.sum(jnp.square(updated), axis=tuple(range(n_in))))
        return (updated * (m[0].astype(jnp.float32) / norm)).astype(w.dtype), norm

    merged, norm = _per_layer(fold, lead)(w, a, b, *(() if m is None else (m,)))
    return merged, (None if m is None else norm)


def _without_lora(model):
    """`model` with its config's `block.peft.lora` removed (peft None when nothing else is left)."""
    config = model.config
    peft = dataclasses.replace(config.block.peft, lora=None)
    peft = None if peft == PeftConfig() else peft
    return model.clone(config=dataclasses.replace(config, block=dataclasses.replace(config.block, peft=peft)))


def _node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def merge(model, params, *, return_norms: bool = False):
    """Folds LoRA (DoRA) into the base kernels: W' = W + s B A (DoRA: m / ||W + s B A||_c (W + s B A)).

    Args:
      model: a model whose `config.block.peft.lora` is set (GPT, BERT models).
      params: its params (the LoRA leaves included; stacked layers allowed).
      return_norms: also return DoRA's column norms {kernel path: norm}, which `unmerge` needs
        (a DoRA merge forgets them).

    Returns:
      (base_model, base_params[, norms]): the model without LoRA and params with the same
      outputs up to float rounding and no LoRA leaves.
    """
    lora = model.config.block.peft.lora if model.config.block.peft is not None else None
    if lora is None:
        return (model, params, {}) if return_norms else (model, params)
    params = nn.unbox(params)
    # GPT's tied head and BERT's masked-LM decoder read the table through `Embed.attend`.
    tied = getattr(model.config, "tie_embeddings", False) or type(model).__name__ == "BertForMaskedLM"
    if tied and any(name == "embedding" and path[-1:] in (("embed",), ("word_embeddings",))
                    for path, name in _lora_kernels(params)):
        raise ValueError("LoRA on a tied embedding table cannot be merged: the merged table would change the "
                         "output projection too; untie the embeddings or leave embed/embedding out of "
                         "finetune.lora.targets")
    out = jax.tree_util.tree_map(lambda x: x, params)  # a copy to edit
    norms = {}
    for path, name in list(_lora_kernels(params)):
        node = _node(out, path)
        node[name], norm = _fold(lora, node, name)
        if norm is not None:
            norms["/".join((*path, name))] = norm
        for suffix in ("_lora_a", "_lora_b", "_lora_magnitude"):
            node.pop(name + suffix, None)
    base_model = _without_lora(model)
    return (base_model, out, norms) if return_norms else (base_model, out)


def unmerge(model, base_params, adapter_params, norms=None):
    """The inverse of `merge`: W = W' - s B A (DoRA: W' ||.||_c / m - s B A with merge's norms).

    Args:
      model: the LoRA model (its LoraConfig gives the scale).
      base_params: merged params, as `merge` returned them.
      adapter_params: a params tree holding the LoRA leaves (e.g. the unmerged params).
      norms: DoRA's column norms from `merge(..., return_norms=True)`.

    Returns:
      The LoRA model's params: base kernels recovered, the LoRA leaves of `adapter_params` added.
    """
    lora = model.config.block.lora
    adapter_params = nn.unbox(adapter_params)
    out = jax.tree_util.tree_map(lambda x: x, nn.unbox(base_params))
    for path, name in list(_lora_kernels(adapter_params)):
        source, node = _node(adapter_params, path), _node(out, path)
        a, b = source[f"{name}_lora_a"], source[f"{name}_lora_b"]
        w = node[name]
        lead = a.ndim + b.ndim - 2 - w.ndim
        n_in = a.ndim - 1 - lead
        m = source.get(f"{name}_lora_magnitude")
        key = "/".join((*path, name))
        if m is not None and (norms is None or key not in norms):
            raise ValueError(f"DoRA kernel {key} cannot be unmerged without its column norm; pass the norms of "
                             "merge(..., return_norms=True)")

        def unfold(w, a, b, *mn, n_in=n_in):
            w32 = jnp.asarray(w, jnp.float32)
            if mn:
                w32 = w32 * (mn[1] / mn[0].astype(jnp.float32))
            return (w32 - lora.scale * lora_delta(a, b, n_in)).astype(w.dtype)

        extra = () if m is None else (m, norms[key])
        node[name] = _per_layer(unfold, lead)(w, a, b, *extra)
        for suffix in ("_lora_a", "_lora_b", "_lora_magnitude"):
            if name + suffix in source:
                node[name + suffix] = source[name + suffix]
    return out


def prefix_params(cfg: PrefixConfig, d_model: int, kv_heads: int, head_dim: int) -> int:
    """Parameters prefix tuning adds to one self-attention layer (while training: with the MLP
    reparameterization, its embedding, MLP and biases; `fold_prefix` leaves 2 P K H)."""
    P, K, H, M = cfg.length, kv_heads, head_dim, cfg.mlp_hidden
    if not M:
        return 2 * P * K * H
    return P * d_model + d_model * M + M + M * 2 * K * H + 2 * K * H


def adapter_params(cfg: AdapterConfig, d_model: int, sublayers: int = 2) -> int:
    """Parameters bottleneck adapters add to one layer of `sublayers` sub-layers (2 for an
    encoder or decoder-only layer): houlsby one adapter per sub-layer, parallel one (the MLP's)."""
    count = sublayers if cfg.kind == "houlsby" else 1
    return count * (2 * d_model * cfg.hidden + cfg.hidden + d_model)
