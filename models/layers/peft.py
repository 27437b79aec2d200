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


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapters: "houlsby" (serial, after the attention and the MLP sub-layers,
    Houlsby et al. 2019) or "parallel" (beside them, He et al. 2022), `hidden` wide."""

    hidden: int
    kind: str = "houlsby"
    activation: str = "relu"


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    lora: LoraConfig | None = None
    prefix: PrefixConfig | None = None
    adapter: AdapterConfig | None = None
