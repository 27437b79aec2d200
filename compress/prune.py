"""Pruning methods: magnitude (layer-wise, global), N:M, and structured pruning that shrinks.

Axis letters: L layers, D model width, N query heads, K key/value heads (groups of G = N / K
query heads), H head dim, F MLP hidden width, B batch, T length.

Unstructured and semi-structured (the shapes stay; weights become zeros, `compress.masks`):

    magnitude      score |w|; scope=layer: each prunable kernel (each layer's slice of a scanned
                   stack) loses round(s * size) weights; scope=global: one threshold over all
                   prunable kernels (Han et al. 2015)
    magnitude_nm   score |w|; n of every m consecutive inputs kept (2:4, Mishra et al. 2021),
                   along each kernel's contraction axis (`compress.masks` docstring)

Structured (the model gets smaller: the output config has fewer heads, a smaller d_ff or
fewer layers, and the params have the smaller shapes). Configs are uniform across layers, so
every layer loses the same number of units, each layer choosing its own by importance:

    prune_heads    key/value groups: a group is one key/value head with its G query heads
                   (query[:, group], key[:, k], value[:, k], out[group] and their biases). With
                   GQA whole groups go (K' = K - round(s * K), N' = G * K'), which also shrinks
                   the KV cache; with MHA (G = 1) a group is one head.
    prune_neurons  MLP hidden units f (wi*[:, f], wo[f, :], wi_bias[f]): F' = F - round(s * F)
    prune_layers   whole blocks: L' = L - round(s * L)

Importance (`importance=`):
    taylor  first-order Taylor on calibration batches (Molchanov et al. 2019): a unit's output
            enters the residual stream through its rows of the output projection W (out[n],
            wo[f]); scaling them by a gate a, dLoss/da at a = 1 is sum(W * dLoss/dW) over
            those rows, and the importance is that squared, averaged over batches
    norm    the squared L2 norm of all the unit's weights (data-free)
    block_influence (layers)  ShortGPT (Men et al. 2024): BI_l = 1 - E_{b,t} cos(h_in, h_out) of
            layer l on calibration batches; the layers that change the hidden state least go.

A removed unit is equivalent to a zeroed one: `structured_zeroing` returns the full-size
params with the removed units' output rows (and, for a layer, its output biases) zeroed, a
model whose logits equal the shrunk model's (tests/compress/test_prune.py). Removing a layer
is only equivalent to zeroing it in a pre-norm stack (x + f(norm(x))); post-norm blocks are
refused. Mixture-of-experts MLPs, MLA attention and multi-token prediction are refused by
the structured methods (one line); magnitude and N:M prune their kernels like any other.

Every method's `info` holds `sparsity` (the fraction of the prunable weights, `compress.masks`,
that are zero or removed), `params` (stored parameters after) and `params_before`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from compress import masks as masks_lib
from compress.methods import Compressed, Source, register
from models import gpt as gpt_lib

STRUCTURED_FAMILIES = ("gpt", "llama", "qwen")
SCOPES = ("layer", "global")
UNIT_IMPORTANCE = ("taylor", "norm")
LAYER_IMPORTANCE = ("block_influence",)


# ----------------------------------------------------------------------------- options


def _fraction(options: Mapping[str, str], key: str = "sparsity") -> float:
    try:
        value = float(options[key])
    except ValueError:
        raise ValueError(f"--option={key}={options[key]!r} is not a number; e.g. --option={key}=0.5") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"--option={key}={value} must lie in [0, 1)")
    return value


def _integer(options: Mapping[str, str], key: str) -> int:
    try:
        return int(options[key])
    except ValueError:
        raise ValueError(f"--option={key}={options[key]!r} is not an integer") from None


def _choice(options: Mapping[str, str], key: str, allowed: Sequence[str]) -> str:
    if options[key] not in allowed:
        raise ValueError(f"--option={key}={options[key]!r}; expected one of {tuple(allowed)}")
    return options[key]


def _num_params(params: Any) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))


def _prunable_count(params: Any) -> int:
    return sum(int(np.size(w)) for w in masks_lib.prunable(params).values())


# ---------------------------------------------------------------- magnitude and N:M


def _layer_slices(path: masks_lib.Path, w: jax.Array) -> int:
    """How many leading axes of a kernel are stacked layers/experts (selected one by one)."""
    lead, _, _ = masks_lib.kernel_layout(path, w.shape)
    return lead


def magnitude_masks(params: Any, sparsity: float, scope: str = "layer") -> dict[masks_lib.Path, jax.Array]:
    """{path: mask} keeping the largest |w| of the prunable kernels.

    Args:
      params: a model's params tree.
      sparsity: fraction of the prunable weights to remove.
      scope: "layer": each kernel (each layer's and expert's slice of a stacked one) alone;
        "global": one ranking over every prunable weight of the model.
    """
    kernels = masks_lib.prunable(params)
    if scope == "global":
        flat = jnp.concatenate([jnp.abs(w).reshape(-1) for w in kernels.values()])
        keep = masks_lib.unstructured_mask(flat, sparsity)
        out, start = {}, 0
        for path, w in kernels.items():
            out[path] = keep[start:start + w.size].reshape(w.shape)
            start += w.size
        return out
    out = {}
    for path, w in kernels.items():
        lead = _layer_slices(path, w)
        per_slice = jnp.abs(w).reshape(*w.shape[:lead], -1)  # one selection per layer/expert slice
        out[path] = masks_lib.unstructured_mask(per_slice, sparsity, axis=-1).reshape(w.shape)
    return out


def nm_masks(params: Any, n: int = 2, m: int = 4) -> dict[masks_lib.Path, jax.Array]:
    """{path: N:M mask of |w| along the contraction axis} over the prunable kernels."""
    kernels = masks_lib.prunable(params)
    for path, w in kernels.items():  # every kernel checked before any work
        inputs = masks_lib.matrix_shape(path, w.shape)[-2]
        if inputs % m:
            raise ValueError(f"{n}:{m} needs a dimension divisible by {m}; kernel {'/'.join(path)} {w.shape} has "
                             f"{inputs} inputs")
    return {path: masks_lib.kernel_nm_mask(path, jnp.abs(w), n, m) for path, w in kernels.items()}


def _recorded(config, method: str, options: Mapping[str, str]):
    """A copy of the run config whose `compress` section records the method and its options
    (`compress.io` adds the stored tensors' description)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.compress = ml_collections.ConfigDict({"method": method, "options": dict(options)})
    return config


def _masked_result(source: Source, masks: Mapping, info: dict, options: Mapping[str, str]) -> Compressed:
    params = masks_lib.apply_masks(source.params, masks)
    zeros, total = masks_lib.count_zeros(params)
    info = {**info, "sparsity": zeros / total, "zeros": zeros, "prunable": total,
            "params": _num_params(params), "params_before": _num_params(source.params),
            "nonzero_params": _num_params(params) - zeros}
    return Compressed(params=params, config=_recorded(source.config, info["method"], options), info=info)


@register("magnitude", kind="prune", options={"sparsity": "0.5", "scope": "layer"})
def magnitude(source: Source, calibration, options) -> Compressed:
    """Unstructured magnitude pruning: the smallest |w| of each kernel (scope=layer) or of the model (global)."""
    sparsity = _fraction(options)
    scope = _choice(options, "scope", SCOPES)
    return _masked_result(source, magnitude_masks(source.params, sparsity, scope),
                          {"method": "magnitude", "scope": scope, "target_sparsity": sparsity}, options)


@register("magnitude_nm", kind="prune", options={"n": "2", "m": "4"})
def magnitude_nm(source: Source, calibration, options) -> Compressed:
    """N:M semi-structured magnitude pruning (2:4): n of every m consecutive inputs of each kernel kept."""
    n, m = _integer(options, "n"), _integer(options, "m")
    if not 0 < n < m:
        raise ValueError(f"--option=n={n} --option=m={m}: N:M pruning needs 0 < n < m (e.g. n=2, m=4)")
    return _masked_result(source, nm_masks(source.params, n, m), {"method": "magnitude_nm", "n": n, "m": m}, options)


# ----------------------------------------------------------------------- structured


@dataclasses.dataclass(frozen=True)
class Shape:
    """The attention and MLP sizes of a uniform decoder (`config.model.block`)."""

    N: int
    K: int
    H: int
    F: int
    L: int

    @property
    def G(self) -> int:
        return self.N // self.K


def _shape(config) -> Shape:
    b = config.model.block
    N = b.num_heads
    K = b.num_kv_heads or N
    return Shape(N=N, K=K, H=b.head_dim or b.d_model // N, F=b.d_ff, L=config.model.num_layers)


def check_structured(source: Source, what: str) -> None:
    """One-line refusals of what the structured methods do not shrink."""
    m = source.config.model
    if m.family not in STRUCTURED_FAMILIES:
        raise ValueError(f"--method=prune_{what} shrinks dense decoders {STRUCTURED_FAMILIES}; model.family="
                         f"{m.family!r} is not one")
    if m.moe.num_experts:
        raise ValueError(f"--method=prune_{what} does not prune mixture-of-experts MLPs (model.moe.num_experts="
                         f"{m.moe.num_experts}); use magnitude or magnitude_nm")
    if m.mla.kv_lora_rank:
        raise ValueError(f"--method=prune_{what} does not prune MLA attention (model.mla.kv_lora_rank="
                         f"{m.mla.kv_lora_rank}); use magnitude or magnitude_nm")
    if m.mtp_depth:
        raise ValueError(f"--method=prune_{what} does not prune multi-token prediction modules (model.mtp_depth="
                         f"{m.mtp_depth})")
    if m.block.norm_position != "pre":
        raise ValueError(f"--method=prune_{what} needs a pre-norm stack (model.block.norm_position="
                         f"{m.block.norm_position!r})")


def _per_layer(source: Source) -> dict:
    """The params with one `layer_{i}` subtree per layer (unscanned)."""
    params = source.params.unfreeze() if hasattr(source.params, "unfreeze") else dict(source.params)
    if source.config.model.scan_layers:
        params = gpt_lib.unscan_params(params, source.model.config)
    return params


def _restacked(params: dict, config, num_layers: int) -> dict:
    if not config.model.scan_layers:
        return params
    return gpt_lib.stack_layers(params, [("layers", 0, num_layers)])


def _loss_grads(source: Source, batches: Sequence[Any]):
    """Per-batch gradients of the next-token loss of the per-layer params (a generator)."""
    params = _per_layer(source)
    model = _unscanned_model(source)

    @jax.jit
    def grads(params, ids_BT):
        def loss(params):
            logits_BTV = model.apply({"params": params}, ids_BT)
            return optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], ids_BT[:, 1:]).mean()
        return jax.grad(loss)(params)

    for ids_BT in batches:
        yield params, grads(params, jnp.asarray(ids_BT))


def _unscanned_model(source: Source) -> gpt_lib.GPT:
    return gpt_lib.GPT(dataclasses.replace(source.model.config, scan_layers=False))


def head_importance(source: Source, batches: Sequence[Any] | None, importance: str) -> np.ndarray:
    """[L, K] importance of each key/value group of each layer (module docstring)."""
    s = _shape(source.config)
    if importance == "norm":
        params = _per_layer(source)
        out = np.zeros((s.L, s.K))
        for i in range(s.L):
            a = params[f"layer_{i}"]["self_attention"]
            for name, value in a.items():
                if name in ("query", "query_bias"):  # [D, N, H] / [N, H] -> per group
                    sq = jnp.square(value).reshape(*value.shape[:-2], s.K, s.G, s.H)
                    out[i] += np.asarray(sq.sum(axis=tuple(a for a in range(sq.ndim) if a != sq.ndim - 3)))
                elif name in ("key", "value", "key_bias", "value_bias"):  # [D, K, H] / [K, H]
                    out[i] += np.asarray(jnp.square(value).sum(axis=tuple(a for a in range(value.ndim)
                                                                           if a != value.ndim - 2)))
                elif name == "out":  # [N, H, D]
                    out[i] += np.asarray(jnp.square(value).reshape(s.K, -1).sum(-1))
        return out
    total = np.zeros((s.L, s.K))
    for params, grads in _loss_grads(source, batches):
        for i in range(s.L):
            w, g = params[f"layer_{i}"]["self_attention"]["out"], grads[f"layer_{i}"]["self_attention"]["out"]
            total[i] += np.square(np.asarray((w * g).reshape(s.K, -1).sum(-1), np.float64))
    return total / len(batches)


def neuron_importance(source: Source, batches: Sequence[Any] | None, importance: str) -> np.ndarray:
    """[L, F] importance of each MLP hidden unit of each layer (module docstring)."""
    s = _shape(source.config)
    if importance == "norm":
        params = _per_layer(source)
        out = np.zeros((s.L, s.F))
        for i in range(s.L):
            for name, value in params[f"layer_{i}"]["mlp"].items():
                if name == "wo":  # [F, D]
                    out[i] += np.asarray(jnp.square(value).sum(-1))
                elif name in ("wi", "wi_gate", "wi_up"):  # [D, F]
                    out[i] += np.asarray(jnp.square(value).sum(0))
                elif name in ("wi_bias",):
                    out[i] += np.asarray(jnp.square(value))
        return out
    total = np.zeros((s.L, s.F))
    for params, grads in _loss_grads(source, batches):
        for i in range(s.L):
            w, g = params[f"layer_{i}"]["mlp"]["wo"], grads[f"layer_{i}"]["mlp"]["wo"]
            total[i] += np.square(np.asarray((w * g).sum(-1), np.float64))
    return total / len(batches)


def block_influence(source: Source, batches: Sequence[Any]) -> np.ndarray:
    """[L] ShortGPT block influence 1 - mean cos(h_in, h_out) of each layer over the batches' tokens."""
    model, params = _unscanned_model(source), _per_layer(source)
    L = source.config.model.num_layers

    def is_stream(module, method_name):
        return method_name == "__call__" and (module.name in ("embed", "positions") or
                                              str(module.name).startswith("layer_"))

    @jax.jit
    def cosines(params, ids_BT):
        _, state = model.apply({"params": params}, ids_BT, capture_intermediates=is_stream)
        inter = state["intermediates"]
        h = inter["embed"]["__call__"][0]
        if "positions" in inter:
            h = h + inter["positions"]["__call__"][0]
        out = []
        for i in range(L):
            h_out = inter[f"layer_{i}"]["__call__"][0]
            a, b = h.astype(jnp.float32), h_out.astype(jnp.float32)
            cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)
            out.append(jnp.mean(cos))
            h = h_out
        return jnp.stack(out)

    total = sum(np.asarray(cosines(params, jnp.asarray(ids)), np.float64) for ids in batches)
    return 1.0 - total / len(batches)


def _keep(scores_LU: np.ndarray, keep: int) -> np.ndarray:
    """[L, keep] indices of each row's `keep` largest scores, in increasing order (ties: lower index)."""
    order = np.argsort(-np.asarray(scores_LU), axis=1, kind="stable")[:, :keep]
    return np.sort(order, axis=1)


def shrink_heads(params: dict, s: Shape, keep_groups_LK: np.ndarray) -> dict:
    """Per-layer params keeping the given key/value groups (with their query heads) of each layer."""
    out = dict(params)
    for i, groups in enumerate(keep_groups_LK):
        heads = (groups[:, None] * s.G + np.arange(s.G)).reshape(-1)  # query heads of the kept groups
        a = dict(params[f"layer_{i}"]["self_attention"])
        for name in list(a):
            if name in ("query", "query_bias"):
                a[name] = jnp.take(a[name], heads, axis=a[name].ndim - 2)
            elif name in ("key", "value", "key_bias", "value_bias"):
                a[name] = jnp.take(a[name], groups, axis=a[name].ndim - 2)
            elif name == "out":
                a[name] = jnp.take(a[name], heads, axis=0)
        out[f"layer_{i}"] = {**params[f"layer_{i}"], "self_attention": a}
    return out


def shrink_neurons(params: dict, keep_LF: np.ndarray) -> dict:
    """Per-layer params keeping the given MLP hidden units of each layer."""
    out = dict(params)
    for i, units in enumerate(keep_LF):
        mlp = dict(params[f"layer_{i}"]["mlp"])
        for name in list(mlp):
            if name in ("wi", "wi_gate", "wi_up", "wi_bias"):
                mlp[name] = jnp.take(mlp[name], units, axis=-1)
            elif name == "wo":
                mlp[name] = jnp.take(mlp[name], units, axis=0)
        out[f"layer_{i}"] = {**params[f"layer_{i}"], "mlp": mlp}
    return out


def shrink_layers(params: dict, keep_layers: Sequence[int], num_layers: int) -> dict:
    """Per-layer params keeping the given layers, renumbered 0..L'-1 in order."""
    out = {k: v for k, v in params.items() if not (k.startswith("layer_") and k[6:].isdigit())}
    for new, old in enumerate(sorted(keep_layers)):
        out[f"layer_{new}"] = params[f"layer_{old}"]
    return out


def structured_zeroing(params: dict, s: Shape, *, heads=None, neurons=None, layers=None) -> dict:
    """Full-size per-layer params in which the removed units' outputs are zero: the removed
    groups' rows of `out`, the removed neurons' rows of `wo`, and every output row and output
    bias of a removed layer. Its logits equal those of the shrunk model."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(s.L):
        layer = {k: dict(v) for k, v in out[f"layer_{i}"].items()}
        a, mlp = layer["self_attention"], layer["mlp"]
        if heads is not None:
            keep = np.zeros(s.N, bool)
            keep[(heads[i][:, None] * s.G + np.arange(s.G)).reshape(-1)] = True
            a["out"] = a["out"] * jnp.asarray(keep, a["out"].dtype)[:, None, None]
        if neurons is not None:
            keep = np.zeros(s.F, bool)
            keep[neurons[i]] = True
            mlp["wo"] = mlp["wo"] * jnp.asarray(keep, mlp["wo"].dtype)[:, None]
        if layers is not None and i not in layers:
            for sub, names in ((a, ("out", "out_bias")), (mlp, ("wo", "wo_bias"))):
                for name in names:
                    if name in sub:
                        sub[name] = jnp.zeros_like(sub[name])
        out[f"layer_{i}"] = layer
    return out


def _structured_result(source: Source, params: dict, config, info: dict, options: Mapping[str, str]) -> Compressed:
    before, after = _prunable_count(source.params), _prunable_count(params)
    info = {**info, "sparsity": 1 - after / before, "prunable_before": before, "prunable": after,
            "params": _num_params(params), "params_before": _num_params(source.params)}
    return Compressed(params=params, config=_recorded(config, info["method"], options), info=info)


def _importance_option(options, calibration, method: str) -> str:
    importance = _choice(options, "importance", UNIT_IMPORTANCE)
    if importance == "taylor" and not calibration:
        raise ValueError(f"--method={method} with importance=taylor needs calibration batches; pass "
                         "--calibration_samples > 0 or --option=importance=norm")
    return importance


@register("prune_heads", kind="prune", options={"sparsity": "0.5", "importance": "taylor"},
          needs_calibration=True, families=STRUCTURED_FAMILIES)
def prune_heads(source: Source, calibration, options) -> Compressed:
    """Structured: removes the least important key/value head groups of every layer (fewer heads in the config)."""
    check_structured(source, "heads")
    s, sparsity = _shape(source.config), _fraction(options)
    importance = _importance_option(options, calibration, "prune_heads")
    keep = s.K - round(sparsity * s.K)
    if keep < 1:
        raise ValueError(f"--option=sparsity={sparsity} would remove every one of the {s.K} key/value groups of a "
                         "layer; use a smaller sparsity")
    kept = _keep(head_importance(source, calibration, importance), keep)
    params = _restacked(shrink_heads(_per_layer(source), s, kept), source.config, s.L)
    config = copy.deepcopy(source.config)
    config.model.block.num_heads = keep * s.G
    config.model.block.num_kv_heads = keep if source.config.model.block.num_kv_heads else 0
    config.model.block.head_dim = s.H  # no longer d_model // num_heads
    return _structured_result(source, params, config, {"method": "prune_heads", "importance": importance,
                                                       "kv_groups": [s.K, keep], "heads": [s.N, keep * s.G],
                                                       "kept": kept.tolist()}, options)


@register("prune_neurons", kind="prune", options={"sparsity": "0.5", "importance": "taylor"},
          needs_calibration=True, families=STRUCTURED_FAMILIES)
def prune_neurons(source: Source, calibration, options) -> Compressed:
    """Structured: removes the least important MLP hidden units of every layer (a smaller d_ff in the config)."""
    check_structured(source, "neurons")
    s, sparsity = _shape(source.config), _fraction(options)
    importance = _importance_option(options, calibration, "prune_neurons")
    keep = s.F - round(sparsity * s.F)
    if keep < 1:
        raise ValueError(f"--option=sparsity={sparsity} would remove all {s.F} MLP units of a layer")
    kept = _keep(neuron_importance(source, calibration, importance), keep)
    params = _restacked(shrink_neurons(_per_layer(source), kept), source.config, s.L)
    config = copy.deepcopy(source.config)
    config.model.block.d_ff = keep
    return _structured_result(source, params, config, {"method": "prune_neurons", "importance": importance,
                                                       "d_ff": [s.F, keep], "kept": kept.tolist()}, options)


@register("prune_layers", kind="prune", options={"sparsity": "0.25", "importance": "block_influence"},
          needs_calibration=True, families=STRUCTURED_FAMILIES)
def prune_layers(source: Source, calibration, options) -> Compressed:
    """Structured: removes the layers of lowest ShortGPT block influence (fewer layers in the config)."""
    check_structured(source, "layers")
    s, sparsity = _shape(source.config), _fraction(options)
    _choice(options, "importance", LAYER_IMPORTANCE)
    keep = s.L - round(sparsity * s.L)
    if keep < 1:
        raise ValueError(f"--option=sparsity={sparsity} would remove all {s.L} layers")
    influence = block_influence(source, calibration)
    kept = sorted(_keep(influence[None], keep)[0].tolist())
    params = _restacked(shrink_layers(_per_layer(source), kept, s.L), source.config, keep)
    config = copy.deepcopy(source.config)
    config.model.num_layers = keep
    return _structured_result(source, params, config, {"method": "prune_layers", "block_influence":
                                                       influence.tolist(), "layers": [s.L, keep], "kept": kept},
                              options)

