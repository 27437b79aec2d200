"""A policy and a separate value model, trained together (PPO's `rl.value_head=separate`).

Axis letters: B batch, T sequence, V vocabulary.

    model = PolicyWithValueModel(policy=GPT(cfg), value_model=GPT(replace(cfg, head="score")))
    logits_BTV, values_BT1 = model.apply({"params": params}, ids_BT)

The params tree is the policy's own tree (`nn.share_scope`: its leaves at the top level,
exactly where a plain `GPT` keeps them) plus one branch `value_model` holding the value
model's trunk and `score` head:

    {"embed": ..., "layer_0": ..., "final_norm": ..., "value_model": {"embed": ..., "score": ...}}

so `policy_params(params)` (the tree without that branch) is what the policy alone applies
to, exports and generates with, and `GPT.apply` on the whole tree computes the policy (flax
ignores the extra branch). The value model has the policy's architecture (TRL's default: a
copy of the policy or reward model's trunk), its own weights and, under PEFT, its own
adapters. The call returns what `GPTConfig.head="lm_score"` returns, so the PPO objective
reads both heads alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from models.gpt import GPT, GPTConfig

VALUE_BRANCH = "value_model"


class PolicyWithValueModel(nn.Module):
    """(logits [B, T, V], values [B, T, 1]) of a policy and its own-trunk value model."""

    policy: GPT
    value_model: GPT

    def setup(self):
        nn.share_scope(self, self.policy)  # the policy's params at the top level

    @property
    def config(self) -> GPTConfig:
        """The policy's config (its vocabulary, context, size: what the trainer reads)."""
        return self.policy.config

    def __call__(self, ids_BT: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, deterministic: bool = True):
        kw = {"positions": positions, "segment_ids": segment_ids, "deterministic": deterministic}
        return self.policy(ids_BT, **kw), self.value_model(ids_BT, **kw)


def with_value_model(policy: GPT) -> PolicyWithValueModel:
    """`policy` (an LM-head GPT) and a value model of its architecture with a one-output `score`
    head; a `PolicyWithValueModel` already is one (returned as it is)."""
    if isinstance(policy, PolicyWithValueModel):
        return policy
    if policy.config.head != "lm":
        raise ValueError(f"the policy of a separate value model has the LM head, got head={policy.config.head!r}")
    value_config = dataclasses.replace(policy.config, head="score", num_scores=1, mtp_depth=0)
    return PolicyWithValueModel(policy=policy, value_model=GPT(value_config))


def policy_params(params: Any) -> Any:
    """The policy's own params: the tree without the value model's branch and the shared value
    head `score` (what the policy generates with and is exported as)."""
    return {k: v for k, v in params.items() if k not in (VALUE_BRANCH, "score")}


def policy_model(model: nn.Module) -> GPT:
    """The LM-head decoder that generates: the wrapped policy, or a `lm_score` GPT as `lm`."""
    if isinstance(model, PolicyWithValueModel):
        return model.policy
    if model.config.head == "lm_score":
        return model.clone(config=dataclasses.replace(model.config, head="lm"))
    return model
