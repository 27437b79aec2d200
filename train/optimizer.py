"""AdamW with global-norm clipping and a weight-decay mask.

Which parameters are decayed (`weight_decay_mask`), judged per leaf from its key path
and its shape:

  * never decayed: any leaf with ndim < 2, and any leaf named `scale` or `bias` or
    ending in `_scale` or `_bias` (`query_bias`, `wi_bias`) whatever its shape: a bias
    over (heads, head_dim) is 2-D, and with `scan_layers` every norm scale and bias
    gains a leading layers axis;
  * embedding tables, decayed only when `decay_embeddings`: 2-D leaves that are named
    `embedding` (the name `nn.Embed` gives its table), or that sit under a module whose
    name contains `embed` (case-insensitive) and are not named `kernel` (so a Dense
    called `unembed` or `embed_proj` is a projection and is decayed);
  * everything else is decayed.

The gradient norm for logging is `optax.global_norm(grads)`.

Sparse fine-tuning (`keep_zeros=True`, config key `finetune.keep_sparsity`): a run started
from a pruned checkpoint (`compress.prune`, `init_from`) keeps its zeros. `hold_zeros()` sets
the gradient of every prunable kernel weight (`compress.masks.prunable`: the blocks' attention
and MLP kernels) that is exactly zero in the current params to zero, before clipping, so the
clipping norm and AdamW's moments see only the live weights; a zero weight then receives
the update -lr * (0 / (0 + eps) + weight_decay * 0) = 0 and stays zero, and a second
`hold_zeros()` after AdamW zeroes whatever else would reach it. The mask is the params' own
zero pattern, so it needs no state: it survives checkpoints and resumes, and on the first
step it is the pruned checkpoint's pattern. (A live weight that an update set to exactly
0.0 would be held at zero from then on; in float32 that needs the update to equal the weight
to the last bit.)
"""

from typing import Any

import jax
import optax
from flax.core import meta

NO_DECAY_NAMES = ("scale", "bias")
NO_DECAY_SUFFIXES = ("_scale", "_bias")
EMBEDDING_NAME = "embedding"


def make_optimizer(
    *,
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    grad_clip_norm: float | None = 1.0,
    decay_embeddings: bool = False,
    keep_zeros: bool = False,
) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW with decoupled, masked weight decay.

    The update is -lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param), the decay
    term only on leaves where `weight_decay_mask` is True.

    Args:
      learning_rate: a float or a schedule step -> lr (see `train.schedules`).
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      eps: added to sqrt(v_hat) in the denominator.
      weight_decay: decoupled decay coefficient (multiplied by the learning rate).
      grad_clip_norm: clip gradients to this global norm; 0 or None turns clipping off.
      decay_embeddings: whether embedding tables are decayed.
      keep_zeros: hold the zero weights of the prunable kernels at zero (`hold_zeros()`).

    Returns:
      An optax GradientTransformation over plain or `nn.Partitioned`-boxed param trees.
    """
    if grad_clip_norm is not None and grad_clip_norm < 0:
        raise ValueError(f"grad_clip_norm={grad_clip_norm} must be >= 0 (0 or None is off).")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0.")
    adamw = optax.adamw(
        learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=lambda params: weight_decay_mask(params, decay_embeddings),
    )
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    chain.append(adamw)
    if keep_zeros:
        chain = [hold_zeros(), *chain, hold_zeros()]
    return chain[0] if len(chain) == 1 else optax.chain(*chain)


def hold_zeros() -> optax.GradientTransformation:
    """Zeroes the updates of the prunable kernels' weights that are zero in `params` (module
    docstring: sparse fine-tuning). Stateless; `update` needs `params`."""
    from compress.masks import kernel_layout  # the pruners' own definition of a prunable kernel

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("hold_zeros needs the params (the zero pattern) in update(updates, state, params)")

        def held(path, u, p):
            p = p.unbox() if isinstance(p, meta.AxisMetadata) else p
            if kernel_layout(tuple(_key_name(k) for k in path), p.shape) is None:
                return u
            if isinstance(u, meta.AxisMetadata):
                return u.replace_boxed(jax.numpy.where(p == 0, jax.numpy.zeros((), u.dtype), u.unbox()))
            return jax.numpy.where(p == 0, jax.numpy.zeros((), u.dtype), u)

        return jax.tree_util.tree_map_with_path(held, updates, params,
                                                is_leaf=lambda x: isinstance(x, meta.AxisMetadata)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """True where weight decay applies, by the rule in the module docstring.

    Args:
      params: a nested dict of arrays (or of shape structs), possibly with
        `nn.Partitioned` / `nn.LogicallyPartitioned` boxed leaves.
      decay_embeddings: whether embedding tables are decayed.

    Returns:
      A tree of Python bools with the structure of `flax.linen.unbox(params)`; for a
      boxed tree it is a prefix of `params`, which optax masks accept.
    """

    def decays(path, leaf):
        value = leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf
        names = [_key_name(key) for key in path]
        leaf_name = names[-1] if names else ""
        if value.ndim < 2 or leaf_name in NO_DECAY_NAMES or leaf_name.endswith(NO_DECAY_SUFFIXES):
            return False
        if decay_embeddings:
            return True
        return not _is_embedding_table(names, value.ndim)

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def _is_embedding_table(names: list[str], ndim: int) -> bool:
    if ndim != 2:
        return False
    leaf_name, module_names = names[-1], names[:-1]
    if leaf_name == EMBEDDING_NAME:
        return True
    return leaf_name != "kernel" and any("embed" in name.lower() for name in module_names)


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
