"""Structured pruning that shrinks the model: attention heads, MLP neurons, whole layers.

Axis letters: L layers, D model width, N query heads, K key/value heads (groups of G = N / K
query heads), H head dim, F MLP hidden width, B batch, T length.

The model gets smaller: the output config has fewer heads, a smaller d_ff or fewer layers,
and the params have the smaller shapes (`compress.prune` holds the methods that only zero
weights, and the option helpers these share). Configs are uniform across layers, so
every layer loses the same number of units, each layer choosing its own by importance:

    prune_heads    unit=kv_group (default): whole key/value groups, a group being one key/value
                   head with its G query heads (query[:, group], key[:, k], value[:, k], out[group]
                   and their biases): K' = K - round(s * K), N' = G * K', which also shrinks the
                   KV cache; with MHA (G = 1) a group is one head. unit=query (GQA only): the same
                   number of query heads in every group, G' = G - round(s * G), N' = K * G'; the
                   key/value heads and the KV cache stay.
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
is only equivalent to zeroing it in a pre-norm stack (x + f(norm(x))): prune_layers takes
the pre-norm decoders (gpt, llama, qwen); heads and neurons sit inside a sublayer, so they
are also pruned from BERT (post-norm; importance=norm, since Taylor here differentiates the
next-token loss). Mixture-of-experts MLPs, MLA attention and multi-token prediction are refused by
the structured methods (one line); magnitude and N:M prune their kernels like any other.

Every method's `info` holds `sparsity` (the fraction of the prunable weights, `compress.masks`,
removed), `params` (stored parameters after), `params_before` and the kept units (`kept`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compress.methods import Compressed, Source, register
from compress.prune import choice_option, fraction_option, num_params, prunable_count, recorded_config
from models import gpt as gpt_lib

DECODER_FAMILIES = ("gpt", "llama", "qwen")
UNIT_FAMILIES = (*DECODER_FAMILIES, "bert")  # heads and neurons; layers: pre-norm decoders only
UNIT_IMPORTANCE = ("taylor", "norm")
HEAD_UNITS = ("kv_group", "query")
LAYER_IMPORTANCE = ("block_influence",)


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


def shape_of(config) -> Shape:
    b = config.model.block
    N = b.num_heads
    K = b.num_kv_heads or N
    return Shape(N=N, K=K, H=b.head_dim or b.d_model // N, F=b.d_ff, L=config.model.num_layers)


def check_structured(source: Source, what: str) -> None:
    """One-line refusals of what the structured methods do not shrink."""
    m = source.config.model
    families = DECODER_FAMILIES if what == "layers" else UNIT_FAMILIES
    if m.family not in families:
        raise ValueError(f"--method=prune_{what} shrinks the families {families}; model.family={m.family!r} is "
                         "not one")
    if m.moe.num_experts:
        raise ValueError(f"--method=prune_{what} does not prune mixture-of-experts MLPs (model.moe.num_experts="
                         f"{m.moe.num_experts}); use magnitude or magnitude_nm")
    if m.mla.kv_lora_rank:
        raise ValueError(f"--method=prune_{what} does not prune MLA attention (model.mla.kv_lora_rank="
                         f"{m.mla.kv_lora_rank}); use magnitude or magnitude_nm")
    if m.mtp_depth:
        raise ValueError(f"--method=prune_{what} does not prune multi-token prediction modules (model.mtp_depth="
                         f"{m.mtp_depth})")
    if what == "layers" and m.block.norm_position != "pre":
        raise ValueError(f"--method=prune_{what} needs a pre-norm stack (model.block.norm_position="
                         f"{m.block.norm_position!r})")


def per_layer_params(source: Source) -> dict:
    """The params subtree with one `layer_{i}` entry per layer: a decoder's whole params
    (unscanned), a BERT's `bert` subtree."""
    params = source.params.unfreeze() if hasattr(source.params, "unfreeze") else dict(source.params)
    if source.config.model.family == "bert":
        return dict(params["bert"])
    if source.config.model.scan_layers:
        params = gpt_lib.unscan_params(params, source.model.config)
    return params


def assembled(source: Source, layers: dict, num_layers: int, *, scan: bool | None = None) -> dict:
    """The whole params tree around a `per_layer_params` subtree of `num_layers` layers,
    stacked again if the model scans its layers (`scan`: None follows the source's config)."""
    if source.config.model.family == "bert":
        return {**source.params, "bert": layers}
    if not (source.config.model.scan_layers if scan is None else scan):
        return layers
    return gpt_lib.stack_layers(layers, [("layers", 0, num_layers)])


def _loss_grads(source: Source, batches: Sequence[Any]):
    """Per-batch gradients of the next-token loss of the per-layer params (a generator)."""
    params = per_layer_params(source)
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
    """[L, N] importance of each query head of each layer, from its own weights (`query`,
    `out` and its bias: norm) or its rows of `out` (taylor). A key/value group's importance
    adds its G heads' and, for norm, its key and value weights (`group_importance`)."""
    s = shape_of(source.config)
    if importance == "norm":
        params = per_layer_params(source)
        out = np.zeros((s.L, s.N))
        for i in range(s.L):
            a = params[f"layer_{i}"]["self_attention"]
            for name in ("query", "query_bias"):  # [D, N, H] / [N, H]
                if name in a:
                    sq = np.square(np.asarray(a[name], np.float64))
                    out[i] += np.moveaxis(sq, -2, 0).reshape(s.N, -1).sum(-1)
            out[i] += np.square(np.asarray(a["out"], np.float64)).reshape(s.N, -1).sum(-1)
        return out
    return _out_taylor(source, batches, s.N)


def _out_taylor(source: Source, batches: Sequence[Any], units: int) -> np.ndarray:
    """[L, units] first-order Taylor importance of `units` equal slices of each layer's attention
    `out` rows (heads, or key/value groups of G heads): (sum of W * dLoss/dW over the slice)^2,
    averaged over the batches."""
    s = shape_of(source.config)
    total = np.zeros((s.L, units))
    for params, grads in _loss_grads(source, batches):
        for i in range(s.L):
            w, g = params[f"layer_{i}"]["self_attention"]["out"], grads[f"layer_{i}"]["self_attention"]["out"]
            total[i] += np.square(np.asarray((w * g).reshape(units, -1).sum(-1), np.float64))
    return total / len(batches)


def group_importance(source: Source, batches: Sequence[Any] | None, importance: str) -> np.ndarray:
    """[L, K] importance of each key/value group: taylor, (dLoss/da)^2 of one gate a on all G
    heads' `out` rows (the sum of the heads' dLoss/da before squaring); norm, the heads' squared
    norms plus the group's key and value weights."""
    s = shape_of(source.config)
    if importance == "norm":
        out = head_importance(source, batches, importance).reshape(s.L, s.K, s.G).sum(-1)
        params = per_layer_params(source)
        for i in range(s.L):
            a = params[f"layer_{i}"]["self_attention"]
            for name in ("key", "value", "key_bias", "value_bias"):  # [D, K, H] / [K, H]
                if name in a:
                    out[i] += np.moveaxis(np.square(np.asarray(a[name], np.float64)), -2, 0).reshape(s.K, -1).sum(-1)
        return out
    return _out_taylor(source, batches, s.K)


def neuron_importance(source: Source, batches: Sequence[Any] | None, importance: str) -> np.ndarray:
    """[L, F] importance of each MLP hidden unit of each layer (module docstring)."""
    s = shape_of(source.config)
    if importance == "norm":
        params = per_layer_params(source)
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
    model, params = _unscanned_model(source), per_layer_params(source)
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


def shrink_heads(params: dict, s: Shape, heads_LN: np.ndarray, groups_LK: np.ndarray) -> dict:
    """Per-layer params keeping, in each layer, the query heads `heads_LN[i]` and the key/value
    heads `groups_LK[i]` (every kept query head's group among them, in order)."""
    out = dict(params)
    for i, (heads, groups) in enumerate(zip(heads_LN, groups_LK)):
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
    query heads' rows of `out` (`heads`: [L, N'] kept query heads), the removed neurons' rows
    of `wo`, and every output row and output bias of a removed layer. Its logits equal those of the shrunk model."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(s.L):
        layer = {k: dict(v) for k, v in out[f"layer_{i}"].items()}
        a, mlp = layer["self_attention"], layer["mlp"]
        if heads is not None:
            keep = np.zeros(s.N, bool)
            keep[heads[i]] = True
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
    before, after = prunable_count(source.params), prunable_count(params)
    info = {**info, "sparsity": 1 - after / before, "prunable_before": before, "prunable": after,
            "params": num_params(params), "params_before": num_params(source.params)}
    return Compressed(params=params, config=recorded_config(config, info["method"], options), info=info)


def _importance_option(options, calibration, method: str, family: str) -> str:
    importance = choice_option(options, "importance", UNIT_IMPORTANCE)
    if importance == "taylor" and family == "bert":
        raise ValueError(f"--method={method} with importance=taylor differentiates the next-token loss; "
                         "model.family='bert' (a masked LM) needs --option=importance=norm")
    if importance == "taylor" and not calibration:
        raise ValueError(f"--method={method} with importance=taylor needs calibration batches; pass "
                         "--calibration_samples > 0 or --option=importance=norm")
    return importance


@register("prune_heads", kind="prune", options={"sparsity": "0.5", "importance": "taylor", "unit": "kv_group"},
          needs_calibration=True, families=UNIT_FAMILIES)
def prune_heads(source: Source, calibration, options) -> Compressed:
    """Structured: removes the least important attention heads of every layer (fewer heads in the config)."""
    check_structured(source, "heads")
    s, sparsity = shape_of(source.config), fraction_option(options)
    importance = _importance_option(options, calibration, "prune_heads", source.config.model.family)
    unit = choice_option(options, "unit", HEAD_UNITS)
    if unit == "query" and s.G == 1:
        raise ValueError(f"--option=unit=query prunes query heads within key/value groups, but every one of the "
                         f"{s.N} heads has its own key/value head; use unit=kv_group")
    per_group = s.G - round(sparsity * s.G) if unit == "query" else s.G
    groups = s.K - round(sparsity * s.K) if unit == "kv_group" else s.K
    if per_group < 1 or groups < 1:
        what = f"{s.G} query heads of a key/value group" if unit == "query" else f"{s.K} key/value groups"
        raise ValueError(f"--option=sparsity={sparsity} would remove every one of the {what} of a layer; use a "
                         "smaller sparsity" + (" or unit=kv_group" if unit == "query" else ""))
    if unit == "kv_group":
        kept_groups = _keep(group_importance(source, calibration, importance), groups)
        kept_heads = (kept_groups[:, :, None] * s.G + np.arange(s.G)).reshape(s.L, -1)
    else:  # the same number of query heads in every group, each group choosing its own
        scores = head_importance(source, calibration, importance).reshape(s.L * s.K, s.G)
        kept_heads = (_keep(scores, per_group).reshape(s.L, s.K, per_group) +
                      (np.arange(s.K) * s.G)[None, :, None]).reshape(s.L, -1)
        kept_groups = np.tile(np.arange(s.K), (s.L, 1))
    params = assembled(source, shrink_heads(per_layer_params(source), s, kept_heads, kept_groups), s.L)
    config = copy.deepcopy(source.config)
    config.model.block.num_heads = groups * per_group
    config.model.block.num_kv_heads = groups if source.config.model.block.num_kv_heads else 0
    config.model.block.head_dim = s.H  # no longer d_model // num_heads
    return _structured_result(source, params, config, {"method": "prune_heads", "importance": importance,
                                                       "unit": unit, "kv_groups": [s.K, groups],
                                                       "heads": [s.N, groups * per_group],
                                                       "kept": kept_heads.tolist()}, options)


@register("prune_neurons", kind="prune", options={"sparsity": "0.5", "importance": "taylor"},
          needs_calibration=True, families=UNIT_FAMILIES)
def prune_neurons(source: Source, calibration, options) -> Compressed:
    """Structured: removes the least important MLP hidden units of every layer (a smaller d_ff in the config)."""
    check_structured(source, "neurons")
    s, sparsity = shape_of(source.config), fraction_option(options)
    importance = _importance_option(options, calibration, "prune_neurons", source.config.model.family)
    keep = s.F - round(sparsity * s.F)
    if keep < 1:
        raise ValueError(f"--option=sparsity={sparsity} would remove all {s.F} MLP units of a layer")
    kept = _keep(neuron_importance(source, calibration, importance), keep)
    params = assembled(source, shrink_neurons(per_layer_params(source), kept), s.L)
    config = copy.deepcopy(source.config)
    config.model.block.d_ff = keep
    return _structured_result(source, params, config, {"method": "prune_neurons", "importance": importance,
                                                       "d_ff": [s.F, keep], "kept": kept.tolist()}, options)


@register("prune_layers", kind="prune", options={"sparsity": "0.25", "importance": "block_influence"},
          needs_calibration=True, families=DECODER_FAMILIES)
def prune_layers(source: Source, calibration, options) -> Compressed:
    """Structured: removes the layers of lowest ShortGPT block influence (fewer layers in the config)."""
    check_structured(source, "layers")
    s, sparsity = shape_of(source.config), fraction_option(options)
    choice_option(options, "importance", LAYER_IMPORTANCE)
    keep = s.L - round(sparsity * s.L)
    if keep < 1:
        raise ValueError(f"--option=sparsity={sparsity} would remove all {s.L} layers")
    influence = block_influence(source, calibration)
    kept = sorted(_keep(influence[None], keep)[0].tolist())
    params = assembled(source, shrink_layers(per_layer_params(source), kept, s.L), keep)
    config = copy.deepcopy(source.config)
    config.model.num_layers = keep
    return _structured_result(source, params, config, {"method": "prune_layers", "block_influence":
                                                       influence.tolist(), "layers": [s.L, keep], "kept": kept},
                              options)

