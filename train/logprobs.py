"""Log-probabilities of given tokens under a decoder: what DPO, PPO and GRPO compare.

Axis letters: B batch, T sequence, V vocabulary.

    logits [B, T, V] = model(ids)          position t predicts token t + 1
    token_logps[b, t] = log_softmax(logits[b, t - 1])[ids[b, t]]   (t >= 1; t = 0: 0)
    sequence_logps[b] = sum_t mask[b, t] * token_logps[b, t]

`mask` marks the tokens that are scored (a completion's tokens, not its prompt or padding),
indexed like `ids`: the mask of token t, whose log-prob comes from the logits at t - 1.
Everything is float32 whatever the compute dtype (the logits are float32 already).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV: jax.Array, ids_BT: jax.Array) -> jax.Array:
    """[B, T] log p(ids[t] | ids[< t]) from the logits of the same rows; 0 at t = 0 (no context)."""
    logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
    targets_BT = ids_BT[:, 1:]
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logps_BT = picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    return jnp.pad(logps_BT, ((0, 0), (1, 0)))


def token_entropy(logits_BTV: jax.Array) -> jax.Array:
    """[B, T] entropy (nats) of the distribution that predicts token t (from the logits at t - 1); 0 at t = 0."""
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    return jnp.pad(entropy_BT, ((0, 0), (1, 0)))


def sequence_logprobs(token_logps_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """[B] the summed log-probs of each row's masked tokens."""
    return jnp.sum(token_logps_BT * mask_BT.astype(jnp.float32), axis=-1)


def of_model(model, params, ids_BT: jax.Array, *, positions_BT: jax.Array | None = None,
             segment_ids_BT: jax.Array | None = None, deterministic: bool = True,
             rngs: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """(token log-probs [B, T], logits [B, T, V]) of `ids` under the decoder `model` with `params`."""
    logits_BTV = model.apply({"params": params}, ids_BT, positions=positions_BT, segment_ids=segment_ids_BT,
                             deterministic=deterministic, rngs=rngs or {})
    return token_logprobs(logits_BTV, ids_BT), logits_BTV
