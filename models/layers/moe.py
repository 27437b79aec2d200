"""Mixture-of-experts feed-forward: a top-k router over E SwiGLU experts (Mixtral, Qwen3-MoE,
DeepSeek-V3).

Axis letters: B batch, T length, D model width, F expert hidden width, E experts,
K experts per token (top-k), C expert capacity, G tokens (G = B * T, flattened),
A (token, choice) assignments of a batch row sorted by expert (A = T * K),
M expert groups (n_group), J experts per group (E / M), U groups kept per token (topk_group).

    scores_GE = softmax(x W_router)  (or sigmoid)        routing in float32
    top-k of scores; weights renormalised over the k if `norm_topk_prob`, times
    `routed_scaling_factor`
    y_g = sum_k weight_gk * Expert_{e_gk}(x_g)   (+ shared experts applied to every token)

DeepSeek-V3 routing (`route`) adds two things to the choice of the k experts, never to
their weights, which stay the uncorrected scores:

* a per-expert `score_correction_bias` b_E added to the scores before the top-k (the
  auxiliary-loss-free balancing of DeepSeek-V3 sec. 2.1.2). It gets no gradient; between
  steps `update_correction_bias` moves it by +-rate towards balanced loads.
* group-limited routing (`n_group` > 1): the E experts form M groups of J; a group scores
  the sum of its two best (bias-corrected) scores, only the `topk_group` best groups stay
  eligible and the top-k experts are chosen inside them.

Two execution modes:

* dropless (`capacity_factor == 0`): every token reaches all its k experts.
  `dropless_impl="sparse"` (the default) computes only the routed experts, as MegaBlocks and
  MaxText do: within each batch row the T * K (token, choice) assignments are sorted by
  expert (A = T * K rows), the gate/up/down projections are grouped matmuls (one group of
  rows per expert, group sizes [B, E]; models/layers/grouped_matmul.py), and the rows are
  unsorted and summed with the routing weights. Sorting per row keeps the batch axis sharded
  (no cross-device sort). `grouped_matmul` picks the grouped matmul: "ragged_dot"
  (`jax.lax.ragged_dot_general`, which TPU and GPU run natively, but which JAX lowers on CPU
  to a masked dense dot over all E groups: E times the routed FLOPs, K times the dense
  path's), "tiled" (MegaBlocks-style: each expert's rows padded to 16-row tiles, a scan over
  the tiles; ~(A + 16 E) rows' FLOPs) or "auto" (the default: tiled on CPU, ragged_dot
  elsewhere). `dropless_impl="dense"` is the reference: one einsum over ALL E experts masked by
  the routing weights (E / K times the routed FLOPs). See benchmarks/moe.py.
* capacity (`capacity_factor > 0`): each expert takes at most
  C = ceil(capacity_factor * G * K / E) tokens. Slots are assigned choice-major (all tokens'
  first choices, in token order, then all second choices, ...) by a cumsum over the
  flattened assignments; assignments beyond C are dropped (their weight is lost, the
  residual carries the token). Dispatch/combine are one-hot [G, E, C] einsums (GShard).

The module returns `(y_BTD, stats)` and also sows `stats` into the `intermediates`
collection under the name `router_stats` (read them with `apply(..., mutable=["intermediates"])`;
`total_aux_loss` sums their weighted losses). Statistics:

    tokens_per_expert [E]  assignments routed to each expert before dropping (sums to G * K)
    kept_per_expert   [E]  assignments actually computed (== tokens_per_expert if dropless)
    dropped_fraction  []   dropped assignments / (G * K)
    aux_loss          []   E * sum_e f_e * P_e, f_e = tokens_per_expert / G, P_e = mean softmax
                           prob (Switch eq. 4-6 as in HF's load_balancing_loss_func; per layer)
    router_z_loss     []   mean_g logsumexp(router logits)^2 (ST-MoE)
    seq_aux_loss      []   DeepSeek-V3's sequence-wise balance loss (eq. 17-20), averaged over the
                           B rows: sum_e f_e P_e per row, f_e = E / (K T) * (row's assignments to
                           e), P_e = row mean of the scores normalised to sum to 1 over E
    weighted_loss     []   aux_loss_weight * aux_loss + router_z_loss_weight * router_z_loss
                           + seq_aux_loss_weight * seq_aux_loss

Under `nn.scan` the sown statistics carry a leading layers axis; `total_aux_loss` and
`update_correction_bias` accept either form.

Padding tokens are routed like any other token and count in the statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import quant
from models.layers import linear
from models.layers.expert_dispatch import routed_experts
from models.layers.feedforward import FeedForward
from models.layers.grouped_matmul import GROUPED_MATMULS, grouped_matmul

Dtype = Any
SCORE_FUNCS = ("softmax", "sigmoid")
DROPLESS_IMPLS = ("sparse", "dense")
DISPATCHES = ("auto", "all_to_all")
# xavier_uniform per expert: fans from the last two axes, the expert axis is a batch axis.
EXPERT_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1,
                                                      batch_axis=(0,))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routed (and optional shared) SwiGLU experts.

    Attributes:
      num_experts: E.
      num_experts_per_tok: K, experts per token.
      expert_d_ff: F, hidden width of each routed expert.
      score_func: "softmax" (Mixtral, Qwen3-MoE) or "sigmoid" (DeepSeek-V3 style) router scores.
      norm_topk_prob: renormalise the K selected scores to sum to 1 (Mixtral: always;
        Qwen3-MoE: config.norm_topk_prob).
      capacity_factor: 0 = dropless; > 0 = capacity C = ceil(factor * G * K / E) per expert.
      router_z_loss_weight: weight of the router z-loss in `weighted_loss`.
      aux_loss_weight: weight of the load-balancing loss in `weighted_loss` (HF: router_aux_loss_coef).
      num_shared_experts: experts applied to every token (0: none).
      shared_d_ff: hidden width of each shared expert (None: expert_d_ff).
      routed_scaling_factor: multiplies the routed experts' weights.
      n_group: M, expert groups for group-limited routing (1: none). E must be a multiple
        of M, with at least 2 experts per group when M > 1 (a group scores its top 2).
      topk_group: how many groups stay eligible per token (DeepSeek-V3: 4 of 8).
      score_correction_bias: a per-expert bias [E], param `score_correction_bias` (float32
        whatever param_dtype, zeros at init), added to the scores for the choice of experts
        only. It gets no gradient (stop_gradient), so Adam leaves it put; it moves only by
        `update_correction_bias`. Like transformers' `e_score_correction_bias` buffer it is
        not counted by `params()`.
      seq_aux_loss_weight: weight of the sequence-wise balance loss in `weighted_loss`
        (DeepSeek-V3's alpha, 1e-4 in the paper).
      dropless_impl: how dropless mode computes the experts: "sparse" (grouped matmuls over
        the routed assignments only) or "dense" (every expert on every token, masked; the
        reference). Same outputs up to float rounding; unused in capacity mode.
      grouped_matmul: the sparse path's grouped matmul (models/layers/grouped_matmul.py):
        "ragged_dot" (`jax.lax.ragged_dot_general`, native on TPU/GPU), "tiled" (a scan over
        block-padded tiles, one expert per tile) or "auto" (tiled on CPU, ragged_dot elsewhere).
      dispatch: how tokens reach experts that live on other devices under expert parallelism:
        "auto" (sharding constraints; the compiler picks the collectives) or "all_to_all"
        (an explicit `shard_map` with all-to-alls over the mesh axis of logical `expert`,
        models/layers/expert_dispatch.py; capacity or sparse dropless mode). Same outputs.
    """

    num_experts: int
    num_experts_per_tok: int
    expert_d_ff: int
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    capacity_factor: float = 0.0
    router_z_loss_weight: float = 0.0
    aux_loss_weight: float = 0.0
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    score_correction_bias: bool = False
    seq_aux_loss_weight: float = 0.0
    dropless_impl: str = "sparse"
    grouped_matmul: str = "auto"
    dispatch: str = "auto"

    def __post_init__(self):
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={self.score_func!r}; expected one of {SCORE_FUNCS}")
        if self.dropless_impl not in DROPLESS_IMPLS:
            raise ValueError(f"dropless_impl={self.dropless_impl!r}; expected one of {DROPLESS_IMPLS}")
        if self.grouped_matmul not in GROUPED_MATMULS:
            raise ValueError(f"grouped_matmul={self.grouped_matmul!r}; expected one of {GROUPED_MATMULS}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"dispatch={self.dispatch!r}; expected one of {DISPATCHES}")
        if self.dispatch == "all_to_all" and self.capacity_factor == 0 and self.dropless_impl == "dense":
            raise ValueError("dispatch='all_to_all' sends each token to its k experts only, but dropless_impl='dense' "
                             "runs every expert on every token; use dropless_impl='sparse' or dispatch='auto'")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                             f"{self.num_experts}]")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless)")
        E, M = self.num_experts, self.n_group
        if M < 1 or E % M or (M > 1 and E // M < 2):
            raise ValueError(f"n_group={M} must divide num_experts={E} into groups of at least 2 experts "
                             "(a group scores the sum of its top 2)")
        if not 1 <= self.topk_group <= M:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={M}]")
        if self.num_experts_per_tok > self.topk_group * (E // M):
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {self.topk_group} "
                             f"eligible groups' {self.topk_group * (E // M)} experts")

    @property
    def shared_width(self) -> int:
        """Total hidden width of the shared experts (they act as one wider SwiGLU MLP)."""
        return self.num_shared_experts * (self.shared_d_ff or self.expert_d_ff)

    def params(self, d_model: int) -> int:
        """Stored values: router, E routed experts, shared experts and the correction bias
        (what `init` creates and a checkpoint holds; transformers keeps the bias as a buffer,
        outside `model.parameters()`: see `buffer_params`)."""
        routed = d_model * self.num_experts + 3 * d_model * (self.num_experts * self.expert_d_ff + self.shared_width)
        return routed + self.buffer_params()

    def active_weights(self, d_model: int) -> int:
        """Weights each token multiplies through (router, K routed experts, shared experts)."""
        return d_model * self.num_experts + 3 * d_model * (self.num_experts_per_tok * self.expert_d_ff
                                                           + self.shared_width)

    def buffer_params(self) -> int:
        """Stored values not trained by gradient: the correction bias [E], if any."""
        return self.num_experts if self.score_correction_bias else 0

    def capacity(self, num_tokens: int) -> int:
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.num_experts_per_tok / self.num_experts))


def route(logits_GE: jax.Array, config: MoEConfig,
          correction_bias_E: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-k routing in float32, group-limited and bias-corrected as `config` says.

    Args:
      logits_GE: router logits [G, E].
      config: the MoEConfig.
      correction_bias_E: [E] added to the scores for the choice of experts only (None: 0).

    Returns:
      (weights_GK, experts_GK): the weights applied to each chosen expert (from the
      uncorrected scores) and their indices.
    """
    logits_GE = logits_GE.astype(jnp.float32)
    scores_GE = jax.nn.softmax(logits_GE, -1) if config.score_func == "softmax" else jax.nn.sigmoid(logits_GE)
    choice_GE = scores_GE if correction_bias_E is None else scores_GE + correction_bias_E.astype(jnp.float32)
    if config.n_group > 1:
        G, E = choice_GE.shape
        M = config.n_group
        top2_GM2, _ = jax.lax.top_k(choice_GE.reshape(G, M, E // M), 2)
        _, groups_GU = jax.lax.top_k(jnp.sum(top2_GM2, -1), config.topk_group)
        eligible_GM = jnp.any(jax.nn.one_hot(groups_GU, M, dtype=jnp.bool_), 1)
        eligible_GE = jnp.repeat(eligible_GM, E // M, axis=-1)
        choice_GE = jnp.where(eligible_GE, choice_GE, -jnp.inf)
    _, experts_GK = jax.lax.top_k(choice_GE, config.num_experts_per_tok)
    weights_GK = jnp.take_along_axis(scores_GE, experts_GK, -1)
    if config.norm_topk_prob:
        # + 1e-20 as transformers' DeepSeek-V3 (sigmoid scores may all be ~0); a no-op otherwise.
        weights_GK = weights_GK / (jnp.sum(weights_GK, -1, keepdims=True) + 1e-20)
    return weights_GK * config.routed_scaling_factor, experts_GK


def _dispatch(experts_GK: jax.Array, weights_GK: jax.Array, E: int, C: int):
    """Capacity dispatch: one-hot dispatch [G, E, C], combine weights [G, E, C], kept mask [G, K]."""
    G, K = experts_GK.shape
    mask_KGE = jax.nn.one_hot(experts_GK.T, E, dtype=jnp.int32)  # choice-major priority
    position_KGE = jnp.cumsum(mask_KGE.reshape(K * G, E), axis=0).reshape(K, G, E) - 1
    position_KG = jnp.sum(position_KGE * mask_KGE, -1)
    kept_KG = position_KG < C
    slot_KGC = jax.nn.one_hot(jnp.where(kept_KG, position_KG, C), C, dtype=jnp.float32)  # dropped -> zero row
    dispatch_GEC = jnp.einsum("KGE,KGC->GEC", mask_KGE.astype(jnp.float32), slot_KGC)
    combine_GEC = jnp.einsum("KGE,KGC,KG->GEC", mask_KGE.astype(jnp.float32), slot_KGC, weights_GK.T)
    return dispatch_GEC, combine_GEC, kept_KG.T


def sorted_experts(x_BTD: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array, gate_EDF: jax.Array,
                   up_EDF: jax.Array, down_EFD: jax.Array, impl: str = "auto") -> jax.Array:
    """Dropless SwiGLU experts on the routed assignments only (grouped matmuls).

    Args:
      x_BTD: the tokens.
      experts_BTK: each token's K chosen experts.
      weights_BTK: their routing weights (in the compute dtype).
      gate_EDF, up_EDF, down_EFD: the expert weights.
      impl: the grouped matmul (`grouped_matmul.GROUPED_MATMULS`).

    Returns:
      y_BTD = sum_k weight_BTk * Expert_{e_BTk}(x_BT).
    """
    B, T, D = x_BTD.shape
    K = experts_BTK.shape[-1]
    E = gate_EDF.shape[0]
    experts_BA = experts_BTK.reshape(B, T * K)  # token-major: assignment a is token a // K
    # Per row, so a batch sharded over devices sorts locally; stable only for determinism
    # (each row's result does not depend on its place in its group).
    order_BA = jnp.argsort(experts_BA, axis=-1, stable=True)
    sizes_BE = jnp.sum(jax.nn.one_hot(experts_BA, E, dtype=jnp.int32), 1)
    x_BAD = jnp.take_along_axis(x_BTD, (order_BA // K)[..., None], axis=1)

    def grouped(lhs, rhs):
        return grouped_matmul(lhs, rhs, sizes_BE, impl)

    h_BAF = jax.nn.silu(grouped(x_BAD, gate_EDF)) * grouped(x_BAD, up_EDF)
    y_BAD = jnp.take_along_axis(grouped(h_BAF, down_EFD), jnp.argsort(order_BA, axis=-1)[..., None], axis=1)
    return jnp.einsum("BTKD,BTK->BTD", y_BAD.reshape(B, T, K, D), weights_BTK)


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts; returns (y [B, T, D], routing statistics)."""

    config: MoEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = EXPERT_KERNEL_INIT

    def _expert_param(self, name, shape, axes):
        # A quantized expert stack is dequantized here, inside the jitted step (`models.quant`).
        return quant.materialize(linear.kernel_param(self, name, self.kernel_init, shape, self.param_dtype, axes),
                                 self.dtype)

    @nn.compact
    def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, dict]:
        cfg = self.config
        B, T, D = x_BTD.shape
        E, F = cfg.num_experts, cfg.expert_d_ff
        x_GD = x_BTD.reshape(B * T, D).astype(self.dtype)
        router_DE = self.param("router", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                      ("embed", "expert")), (D, E), self.param_dtype)
        logits_GE = jnp.einsum("GD,DE->GE", x_GD.astype(jnp.float32), router_DE.astype(jnp.float32))
        bias_E = None
        if cfg.score_correction_bias:  # float32 storage: updates of ~1e-3 would vanish in bfloat16
            bias_E = jax.lax.stop_gradient(self.param(
                "score_correction_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert",)), (E,),
                jnp.float32))
        weights_GK, experts_GK = route(logits_GE, cfg, bias_E)

        gate_EDF = self._expert_param("wi_gate", (E, D, F), ("expert", "embed", "mlp"))
        up_EDF = self._expert_param("wi_up", (E, D, F), ("expert", "embed", "mlp"))
        down_EFD = self._expert_param("wo", (E, F, D), ("expert", "mlp", "embed"))
        if cfg.dispatch == "all_to_all":
            y_BTD, kept_BTK = routed_experts(
                x_GD.reshape(B, T, D), experts_GK.reshape(B, T, -1), weights_GK.reshape(B, T, -1).astype(self.dtype),
                gate_EDF, up_EDF, down_EFD, capacity=cfg.capacity(B * T) if cfg.capacity_factor else 0,
                impl=cfg.grouped_matmul)
            y_GD, kept_GK = y_BTD.reshape(B * T, D), kept_BTK.reshape(B * T, -1)
        elif cfg.capacity_factor == 0 and cfg.dropless_impl == "sparse":
            y_GD = sorted_experts(x_GD.reshape(B, T, D), experts_GK.reshape(B, T, -1),
                                  weights_GK.reshape(B, T, -1).astype(self.dtype), gate_EDF, up_EDF,
                                  down_EFD, cfg.grouped_matmul).reshape(B * T, D)
            kept_GK = jnp.ones(experts_GK.shape, bool)
        elif cfg.capacity_factor == 0:
            combine_GE = jnp.sum(jax.nn.one_hot(experts_GK, E, dtype=jnp.float32) * weights_GK[..., None], 1)
            h_GEF = jax.nn.silu(jnp.einsum("GD,EDF->GEF", x_GD, gate_EDF)) * jnp.einsum("GD,EDF->GEF", x_GD, up_EDF)
            y_GED = jnp.einsum("GEF,EFD->GED", h_GEF, down_EFD)
            y_GD = jnp.einsum("GED,GE->GD", y_GED, combine_GE.astype(self.dtype))
            kept_GK = jnp.ones(experts_GK.shape, bool)
        else:
            dispatch_GEC, combine_GEC, kept_GK = _dispatch(experts_GK, weights_GK, E, cfg.capacity(B * T))
            x_ECD = jnp.einsum("GEC,GD->ECD", dispatch_GEC.astype(self.dtype), x_GD)
            x_ECD = nn.with_logical_constraint(x_ECD, ("expert", None, "act_embed"))
            h_ECF = jax.nn.silu(jnp.einsum("ECD,EDF->ECF", x_ECD, gate_EDF)) * jnp.einsum("ECD,EDF->ECF", x_ECD,
                                                                                          up_EDF)
            y_ECD = jnp.einsum("ECF,EFD->ECD", h_ECF, down_EFD)
            y_GD = jnp.einsum("GEC,ECD->GD", combine_GEC.astype(self.dtype), y_ECD)
        if cfg.num_shared_experts:
            shared = FeedForward(cfg.shared_width, activation="swiglu", use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="shared")
            y_GD = y_GD + shared(x_GD[None], deterministic=deterministic)[0]

        stats = routing_stats(logits_GE, experts_GK, kept_GK, cfg, batch_size=B)
        self.sow("intermediates", "router_stats", stats)
        return y_GD.reshape(B, T, D), stats


def routing_stats(logits_GE: jax.Array, experts_GK: jax.Array, kept_GK: jax.Array, config: MoEConfig, *,
                  batch_size: int = 1) -> dict:
    """The statistics listed in the module docstring, all float32.

    `batch_size` B splits the G tokens into B rows of G / B for `seq_aux_loss`.
    """
    G, E = logits_GE.shape
    K = experts_GK.shape[1]
    logits_GE = logits_GE.astype(jnp.float32)
    assigned_GKE = jax.nn.one_hot(experts_GK, E, dtype=jnp.float32)
    assigned_GE = jnp.sum(assigned_GKE, 1)
    tokens_per_expert = jnp.sum(assigned_GE, 0)
    kept_per_expert = jnp.sum(assigned_GKE * kept_GK[..., None], (0, 1))
    probs_E = jnp.mean(jax.nn.softmax(logits_GE, -1), 0)
    aux = E * jnp.sum(tokens_per_expert / G * probs_E)
    z = jnp.mean(jax.nn.logsumexp(logits_GE, -1) ** 2)

    B = batch_size
    T = G // B
    scores_GE = jax.nn.softmax(logits_GE, -1) if config.score_func == "softmax" else jax.nn.sigmoid(logits_GE)
    normalised_BTE = (scores_GE / jnp.sum(scores_GE, -1, keepdims=True)).reshape(B, T, E)
    f_BE = E / (K * T) * jnp.sum(assigned_GE.reshape(B, T, E), 1)
    seq_aux = jnp.mean(jnp.sum(f_BE * jnp.mean(normalised_BTE, 1), -1))
    return {
        "tokens_per_expert": tokens_per_expert,
        "kept_per_expert": kept_per_expert,
        "dropped_fraction": 1.0 - jnp.sum(kept_per_expert) / (G * K),
        "aux_loss": aux,
        "router_z_loss": z,
        "seq_aux_loss": seq_aux,
        "weighted_loss": (config.aux_loss_weight * aux + config.router_z_loss_weight * z
                          + config.seq_aux_loss_weight * seq_aux),
    }


def router_stats_tree(intermediates) -> dict:
    """The `router_stats` entries of an intermediates tree at their module paths, the rest pruned."""
    out = {}
    for key, value in intermediates.items():
        if key == "router_stats":
            out[key] = value
        elif isinstance(value, Mapping):
            found = router_stats_tree(value)
            if found:
                out[key] = found
    return out


def _router_stats(intermediates) -> dict[tuple[str, ...], dict]:
    """Module path -> the sown `router_stats` of every MoE layer in an intermediates tree."""
    found = {}

    def visit(node, path):
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "router_stats":
                    if len(value) != 1:  # sow appends: one entry per call of the layer
                        raise ValueError(f"{'/'.join(path)} sowed router_stats {len(value)} times; "
                                         "expected one apply per intermediates tree")
                    found[path] = value[0]
                else:
                    visit(value, (*path, key))

    visit(intermediates, ())
    return found


def total_aux_loss(intermediates) -> jax.Array:
    """Sum of `weighted_loss` over every MoE layer's sown `router_stats` (0.0 if none),
    stacked layers (scan) included."""
    total = jnp.float32(0.0)

    def visit(node):
        nonlocal total
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "router_stats":
                    for stats in value:  # sow stores a tuple
                        total = total + jnp.sum(stats["weighted_loss"])
                else:
                    visit(value)

    visit(intermediates)
    return total


def update_correction_bias(params, intermediates, rate: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: one step on every `score_correction_bias`.

        b_e += rate * sign(mean_e'(load_e') - load_e),   load = sown tokens_per_expert

    so an overloaded expert's bias drops by `rate` and an underloaded one's rises by `rate`
    (an exactly average one keeps its bias). Call it once per training step, after the
    optimizer update, with the intermediates of that step's forward pass
    (`apply(..., mutable=["intermediates"])`); the loads then count the step's whole batch.

    Args:
      params: the model params (plain or FrozenDict nesting, boxed or not). A bias is
        matched to the `router_stats` sown by the module at the same path: per layer
        (`layer_{i}/mlp`, bias [E], loads [E]) or stacked by `nn.scan` (bias [..., E] and
        loads [..., E] with the same leading axes).
      intermediates: the `intermediates` collection of that forward pass.
      rate: the bias update speed (DeepSeek-V3: 0.001, then 0 for the last 500B tokens).

    Returns:
      params with every correction bias updated (in float32); everything else is the same
      objects.

    Raises:
      ValueError: naming a bias whose module sowed no router_stats.
    """
    stats = _router_stats(intermediates)
    missing = []

    def visit(node, path):
        if not isinstance(node, Mapping):
            return node
        updates = {}
        for key, value in node.items():
            if key == "score_correction_bias":
                if path not in stats:
                    missing.append("/".join((*path, key)))
                    continue
                updates[key] = _bias_step(value, stats[path]["tokens_per_expert"], rate)
            elif isinstance(value, Mapping):
                new = visit(value, (*path, key))
                if new is not value:
                    updates[key] = new
        if not updates:
            return node
        return node.copy(updates) if hasattr(node, "copy") and not isinstance(node, dict) else {**node, **updates}

    new_params = visit(params, ())
    if missing:
        raise ValueError(f"no router_stats were sown for {missing}; pass the intermediates of the same model's "
                         f"apply(..., mutable=['intermediates']) (found stats for "
                         f"{['/'.join(p) for p in stats]})")
    return new_params


def _bias_step(bias, tokens_per_expert: jax.Array, rate: float):
    """One sign step of a (possibly boxed) bias [..., E] from loads [..., E]."""
    value = bias.unbox() if isinstance(bias, nn.meta.AxisMetadata) else bias
    load = jnp.asarray(tokens_per_expert, jnp.float32)
    if load.shape != value.shape:
        raise ValueError(f"tokens_per_expert has shape {load.shape} but the correction bias {value.shape}")
    step = rate * jnp.sign(jnp.mean(load, -1, keepdims=True) - load)
    new = jnp.asarray(value, jnp.float32) + step
    return bias.replace_boxed(new) if isinstance(bias, nn.meta.AxisMetadata) else new
