"""The frozen reference model of dpo, ppo and grpo, laid out like the policy.

    config.reference = ""        the policy's starting weights: the run's init (seed), then
                                 init_from's checkpoint, as a new run starts
                     | hf:DIR | run:WORKDIR[@STEP]   another checkpoint of the same architecture

The reference is kept as the policy's state keeps its weights: `params` in the layout of the
trainable parameters (`run.layout.state.params`) and `frozen` in that of the frozen ones. A
reference that is the starting weights shares the policy's frozen parameters (a LoRA base is
never copied: `frozen` is None and the state's own are used), so under LoRA the reference
costs the adapters' initial values only. It is rebuilt the same way on resume (the run's init
is seeded), so it is not in the checkpoint.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

from train import init_from
from train import trainable as trainable_lib


@flax.struct.dataclass
class Reference:
    """The reference's weights, split like the policy's state.

    Attributes:
      params: the reference values of the trainable parameters (laid out like them).
      frozen: the reference's frozen parameters; None: the policy's own (`state.frozen`).
    """

    params: Any
    frozen: Any = None

    def whole(self, policy_frozen: Any) -> Any:
        """The reference's whole parameters (`train.trainable.combine`), given the policy's frozen ones."""
        return trainable_lib.combine(self.params, policy_frozen if self.frozen is None else self.frozen)


def build(run) -> Reference:
    """The reference of `run` (a `train.trainer.Run`): its seeded init, then `config.reference`'s
    checkpoint if set, else `init_from`'s, as the trainer starts a new run."""
    config = run.config
    state = run.init_fn(jax.random.key(config.seed))
    if config.reference:
        other = config.copy_and_resolve_references()
        other.init_from = config.reference
        state = init_from.initial_state(other, state, run)
        return Reference(state.params, state.frozen if jax.tree_util.tree_leaves(state.frozen) else None)
    if config.init_from:
        state = init_from.initial_state(config, state, run)
    return Reference(state.params, None)
