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
import re

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
