"""The losses of knowledge distillation, pure and per position (`objective=distill`).

Axis letters: B batch, T query length, S key length, V vocabulary, R relation heads,
H the width of one relation head.

Logit distillation (Hinton et al. 2015). With p = softmax(z_teacher / T) and
q = softmax(z_student / T) at temperature T, per position

    forward  KL(p || q) = sum_v p_v (log p_v - log q_v)     (mass-covering, the classic choice)
    reverse  KL(q || p) = sum_v q_v (log q_v - log p_v)     (mode-seeking, as MiniLLM uses)

and the distillation term is T^2 * KL: the gradients of the softened KL shrink as 1 / T^2,
so the scaling keeps its weight against the hard-label cross-entropy whatever T.

MiniLM-style relation transfer (Wang et al. 2020, with the relation heads of MiniLMv2,
Wang et al. 2021). The last layer's queries, keys and values of all heads are concatenated
([B, T, N * H_head]) and split again into R relation heads of width H (so a teacher and a
student with different head counts compare head by head). A relation is a distribution over
the keys of each query position:

    attention  A_r = softmax(Q_r K_r^T / sqrt(H))      (the self-attention distributions)
    value      V_r = softmax(V_r V_r^T / sqrt(H))      (the value relation)

restricted, as the model's attention is, to keys of the query's own packed document that are
not padding; the loss of each is the KL(teacher || student) of every (relation head, real query
position) row, summed over the rows' positions and averaged over the R heads.

Each function returns per-position values (zero where the mask is zero); the objective sums
them and divides by the whole batch's counts (`train.objectives.base`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DIRECTIONS = ("forward", "reverse")
MASKED = -1e30  # the score of a key a query may not see: exp underflows to exactly 0


def token_kl(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array, *, temperature: float,
             direction: str = "forward") -> jax.Array:
    """The KL between the softened distributions at each position, in float32.

    Args:
      student_logits_BTV, teacher_logits_BTV: logits over the same vocabulary.
      temperature: T > 0, dividing both logits.
      direction: forward KL(teacher || student) or reverse KL(student || teacher).

    Returns:
      kl_BT (not scaled by T^2).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {DIRECTIONS}")
    log_q = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def relation_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, T, S] True where query t may see key s: the same packed document, not padding."""
    return (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]) & (segment_ids_BT[:, None, :] > 0)


def relation_log_probs(a_BTD: jax.Array, b_BTD: jax.Array, mask_BTS: jax.Array, num_heads: int) -> jax.Array:
    """log softmax over keys of a_r b_r^T / sqrt(H) for R = `num_heads` relation heads, float32.

    Args:
      a_BTD, b_BTD: the concatenated heads ([B, T, D], D divisible by R) of the two sides of
        the relation (queries and keys, or values and values).
      mask_BTS: which keys each query may see (`relation_mask`).
      num_heads: R.

    Returns:
      [B, R, T, S] log-probabilities (rows with no visible key are uniform, never NaN).
    """
    B, T, D = a_BTD.shape
    if D % num_heads:
        raise ValueError(f"a width of {D} does not split into {num_heads} relation heads")
    H = D // num_heads
    a_BTRH = a_BTD.astype(jnp.float32).reshape(B, T, num_heads, H)
    b_BSRH = b_BTD.astype(jnp.float32).reshape(B, b_BTD.shape[1], num_heads, H)
    scores_BRTS = jnp.einsum("BTRH,BSRH->BRTS", a_BTRH, b_BSRH) / jnp.sqrt(jnp.float32(H))
    scores_BRTS = jnp.where(mask_BTS[:, None], scores_BRTS, MASKED)
    return jax.nn.log_softmax(scores_BRTS, axis=-1)


def relation_kl(student: tuple[jax.Array, jax.Array], teacher: tuple[jax.Array, jax.Array],
                segment_ids_BT: jax.Array, num_heads: int) -> jax.Array:
    """KL(teacher || student) of one relation, averaged over the R heads, per query position.

    Args:
      student, teacher: the relation's (a_BTD, b_BTD) of each model (widths may differ).
      segment_ids_BT: packed document ids, 0 on padding.
      num_heads: R.

    Returns:
      kl_BT, zero at padding positions.
    """
    mask_BTS = relation_mask(segment_ids_BT)
    log_q = relation_log_probs(*student, mask_BTS, num_heads)
    log_p = relation_log_probs(*teacher, mask_BTS, num_heads)
    kl_BRT = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.mean(kl_BRT, axis=1) * (segment_ids_BT > 0)


def minilm_kl(student_qkv: dict[str, jax.Array], teacher_qkv: dict[str, jax.Array], segment_ids_BT: jax.Array,
              num_heads: int) -> dict[str, jax.Array]:
    """The attention (q-k) and value (v-v) relation KLs of the last layer, per position.

    Args:
      student_qkv, teacher_qkv: {"query", "key", "value"}: [B, T, D] concatenated heads.
      segment_ids_BT: packed document ids, 0 on padding.
      num_heads: R relation heads.

    Returns:
      {"attention_kl": [B, T], "value_kl": [B, T]}.
    """
    s, t = student_qkv, teacher_qkv
    return {"attention_kl": relation_kl((s["query"], s["key"]), (t["query"], t["key"]), segment_ids_BT, num_heads),
            "value_kl": relation_kl((s["value"], s["value"]), (t["value"], t["value"]), segment_ids_BT, num_heads)}
