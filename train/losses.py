"""Losses for language-model training, distillation and preference tuning.

Pure JAX functions (no modules), safe under `jax.jit`. Every loss casts its inputs
to float32 first, so bf16 logits are reduced in f32 like the rest of the softmax path.

`chunked_cross_entropy` is `cross_entropy` through an LM head applied a few positions at a time
(the [B, T, V] logits never exist, in the forward or the backward pass).

Axis letters: B batch, T sequence length, D model width, C chunk length, V vocab.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

KL_DIRECTIONS = ("forward", "reverse")
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def _counted_and_weights(mask_BT, shape):
    """Returns (counted_BT bool, weights_BT f32); no mask counts every token."""
    if mask_BT is None:
        return jnp.ones(shape, bool), jnp.ones(shape, jnp.float32)
    weights_BT = jnp.asarray(mask_BT).astype(jnp.float32)
    return weights_BT != 0, weights_BT


def _safe_mean(total, count):
    """total / count, and 0 (with a finite gradient) when count is 0."""
    has_any = count > 0
    return jnp.where(has_any, total / jnp.where(has_any, count, 1.0), 0.0)


def _target_log_probs(log_probs_BTV, targets_BT, counted_BT):
    """log p(target) per token (of logits: the target's logit); masked targets may be out of
    range (e.g. -1 padding).

    A select against an iota compare, summed over V (exact: one term is non-zero), rather
    than `take_along_axis`: its gradient is a select that fuses into the softmax gradient,
    where a gather's is a scatter into a zero [B, T, V] (issue 15: -16% CPU time of the LM
    head and loss, forward and backward, at B8 T256 D512 V4096 on 2 CPU cores).
    """
    safe_targets_BT = jnp.where(counted_BT, targets_BT, 0)
    hit_BTV = jax.lax.broadcasted_iota(jnp.int32, log_probs_BTV.shape, log_probs_BTV.ndim - 1) == (
        safe_targets_BT[..., None])
    return jnp.sum(jnp.where(hit_BTV, log_probs_BTV, 0.0), axis=-1)


def _token_terms(logits_BTV, targets_BT, counted_BT, label_smoothing, z_loss):
    """Per-token float32 [B, T] cross-entropy (with label smoothing), z-loss and argmax
    correctness of logits [B, T, V]; masked targets may be out of range."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    # -log p(target) = log Z - logit(target): no [B, T, V] array of log-probabilities.
    nll_BT = log_z_BT - _target_log_probs(logits_BTV, targets_BT, counted_BT)
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        ce_BT = nll_BT
    else:
        # -sum_v [(1-eps) onehot_v + eps/V] log p_v, without building the one-hot.
        uniform_nll_BT = log_z_BT - jnp.mean(logits_BTV, axis=-1)
        ce_BT = (1.0 - label_smoothing) * nll_BT + label_smoothing * uniform_nll_BT
    z_BT = z_loss * jnp.square(log_z_BT)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    return ce_BT, z_BT, correct_BT


def _reduce_token_terms(ce_BT, z_BT, correct_BT, counted_BT, weights_BT) -> tuple[jax.Array, dict[str, Any]]:
    """(loss, aux) of `cross_entropy` from the per-token terms of `_token_terms`."""

    # `where`, not a bare multiply: junk (inf/NaN) at padded positions must not reach
    # the loss value.
    def masked(x_BT):
        return jnp.where(counted_BT, x_BT * weights_BT, 0.0)

    per_token_BT = masked(ce_BT + z_BT)
    num_tokens = jnp.sum(weights_BT)
    aux = {
        "per_token": per_token_BT,
        "cross_entropy": _safe_mean(jnp.sum(masked(ce_BT)), num_tokens),
        "z_loss": _safe_mean(jnp.sum(masked(z_BT)), num_tokens),
        "num_tokens": num_tokens,
        "accuracy": _safe_mean(jnp.sum(masked(correct_BT)), num_tokens),
    }
    return _safe_mean(jnp.sum(per_token_BT), num_tokens), aux


def cross_entropy(
    logits_BTV: jax.Array,
    targets_BT: jax.Array,
    *,
    mask_BT: jax.Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, Any]]:
    """Token cross-entropy with padding mask, label smoothing and z-loss.

    Args:
        logits_BTV: [B, T, V] unnormalised logits, any float dtype.
        targets_BT: [B, T] integer target ids.
        mask_BT: optional [B, T] bool or 0/1; True/1 marks a counted token. Other
            non-zero values act as per-token weights.
        label_smoothing: eps; the target distribution is (1 - eps) * onehot + eps / V,
            as in `optax.smooth_labels`.
        z_loss: coefficient of the PaLM auxiliary term z_loss * logsumexp(logits)**2
            per token, which keeps the softmax normaliser near 1.

    Returns:
        (loss, aux): `loss` is the mean per-token loss (cross-entropy + z-loss) over
        counted tokens, 0 when no token is counted. `aux` holds `per_token` ([B, T],
        zero where masked), `cross_entropy` and `z_loss` (means of each term over
        counted tokens), `num_tokens`, and `accuracy` (argmax accuracy over counted
        tokens).
    """
    counted_BT, weights_BT = _counted_and_weights(mask_BT, targets_BT.shape)
    terms = _token_terms(logits_BTV, targets_BT, counted_BT, label_smoothing, z_loss)
    return _reduce_token_terms(*terms, counted_BT, weights_BT)


def chunked_cross_entropy(
    hidden_BTD: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    targets_BT: jax.Array,
    *,
    chunk_size: int,
    mask_BT: jax.Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, Any]]:
    """`cross_entropy(head(hidden_BTD), ...)` without the [B, T, V] logits.

    The sequence is cut into chunks of C = `chunk_size` positions; a `lax.scan` applies the
    head to one chunk at a time ([B, C, V] logits) and keeps only the per-token terms. The
    chunk body is under `jax.checkpoint`, so the backward pass recomputes each chunk's logits
    instead of storing them: the loss and its gradient hold O(B C V) memory, not O(B T V).
    A last, partial chunk (T not a multiple of C) is padded with uncounted positions.

    Args:
        hidden_BTD: [B, T, D] final (normed) hidden states.
        head: hidden [B, C, D] -> logits [B, C, V] (any float dtype), e.g. the model's
            `models.gpt.LMHead`; the weights it closes over get their gradient too.
        targets_BT, mask_BT, label_smoothing, z_loss: as `cross_entropy`.
        chunk_size: C >= 1 (more than T: one chunk of T).

    Returns:
        (loss, aux) exactly as `cross_entropy` (`per_token` [B, T] included).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    B, T = targets_BT.shape
    counted_BT, weights_BT = _counted_and_weights(mask_BT, (B, T))
    C = min(chunk_size, T)
    num_chunks = -(-T // C)
    pad = num_chunks * C - T

    def chunks(x_BT, fill):  # [B, T, ...] -> [num_chunks, B, C, ...]
        if pad:
            x_BT = jnp.pad(x_BT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT.ndim - 2), constant_values=fill)
        return jnp.swapaxes(x_BT.reshape((B, num_chunks, C) + x_BT.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_terms(h_BCD, targets_BC, counted_BC):
        return _token_terms(head(h_BCD), targets_BC, counted_BC, label_smoothing, z_loss)

    def body(carry, xs):
        return carry, chunk_terms(*xs)

    xs = (chunks(hidden_BTD, 0), chunks(targets_BT, 0), chunks(counted_BT, False))
    _, terms_NBC = jax.lax.scan(body, None, xs)
    terms = [jnp.swapaxes(x_NBC, 0, 1).reshape(B, num_chunks * C)[:, :T] for x_NBC in terms_NBC]
    return _reduce_token_terms(*terms, counted_BT, weights_BT)


def future_targets(
    targets_BT: jax.Array, mask_BT: jax.Array, segment_ids_BT: jax.Array, shift: int
) -> tuple[jax.Array, jax.Array]:
    """The next-token target `shift` places further ahead of each position, and whether it counts.

    Multi-token prediction scores position i's depth-k prediction against targets[i + k];
    it counts where i + k < T, mask[i + k] is non-zero, and segment_ids[i + k] equals
    segment_ids[i] (the same packed document).

    Args:
        targets_BT: [B, T] next-token targets.
        mask_BT: [B, T] loss mask (non-zero: a real target).
        segment_ids_BT: [B, T] document ids of packed rows.
        shift: k >= 0.

    Returns:
        (targets_BT, counted_BT): the shifted targets (0 past the end) and a bool mask.
    """
    pad = ((0, 0), (0, min(shift, targets_BT.shape[1])))
    ahead_targets_BT = jnp.pad(targets_BT[:, shift:], pad)
    ahead_mask_BT = jnp.pad(jnp.asarray(mask_BT)[:, shift:], pad)
    ahead_segments_BT = jnp.pad(segment_ids_BT[:, shift:], pad)
    return ahead_targets_BT, (ahead_mask_BT != 0) & (ahead_segments_BT == segment_ids_BT)


def multi_token_prediction_counts(mask_BT: jax.Array, segment_ids_BT: jax.Array, depth: int) -> jax.Array:
    """[depth] float32: the counted positions of each depth k = 1..depth (see `future_targets`)."""
    return jnp.stack([jnp.sum(future_targets(mask_BT, mask_BT, segment_ids_BT, k)[1]).astype(jnp.float32)
                      for k in range(1, depth + 1)])


def multi_token_prediction_loss(
    mtp_logits: list[jax.Array] | tuple[jax.Array, ...],
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    num_tokens: jax.Array | None = None,
    token_loss: Callable[..., tuple[jax.Array, dict[str, Any]]] = cross_entropy,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over depths of the multi-token-prediction cross-entropy (DeepSeek-V3 eq. 24-25).

    Args:
        mtp_logits: D arrays [B, T, V]; depth k (1-based) at position i predicts
            targets[i + k], the token k + 1 places after input i. (With a `token_loss` that
            applies the head itself: the depths' normed hidden states [B, T, D].)
        targets_BT, mask_BT, segment_ids_BT: the batch's next-token targets, loss mask and
            document ids (see `future_targets`).
        num_tokens: [D] normaliser of each depth (default: its counted positions here).
            Gradient accumulation passes the whole batch's counts, so that the
            micro-batches' losses sum to the whole batch's.
        token_loss: (x, targets_BT, mask_BT=...) -> (loss, aux with `per_token`):
            `cross_entropy` on logits, or `chunked_cross_entropy` bound to the head.

    Returns:
        (loss, aux): loss = mean_k sum(CE_k over counted positions) / num_tokens[k];
        aux holds `per_depth` [D] (those terms) and `num_tokens` [D].
    """
    depth = len(mtp_logits)
    if num_tokens is None:
        num_tokens = multi_token_prediction_counts(mask_BT, segment_ids_BT, depth)
    per_depth = []
    for k, logits_BTV in enumerate(mtp_logits, start=1):
        ahead_BT, counted_BT = future_targets(targets_BT, mask_BT, segment_ids_BT, k)
        _, aux = token_loss(logits_BTV, ahead_BT, mask_BT=counted_BT)
        per_depth.append(_safe_mean(jnp.sum(aux["per_token"]), num_tokens[k - 1]))
    per_depth = jnp.stack(per_depth)
    return jnp.mean(per_depth), {"per_depth": per_depth, "num_tokens": num_tokens}


def kl_divergence_per_position(
    p_logits: jax.Array,
    q_logits: jax.Array,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
) -> jax.Array:
    """KL between two softmax distributions at every position, summed over vocab.

    P = softmax(p_logits / T) is the teacher / reference, Q = softmax(q_logits / T)
    the student / policy. "forward" is KL(P || Q) (mass-covering, classic
    distillation); "reverse" is KL(Q || P) (mode-seeking).

    Args:
        p_logits: [B, T, V] (any leading axes) teacher / reference logits.
        q_logits: same shape, student / policy logits.
        temperature: softmax temperature T > 0.
        direction: "forward" or "reverse".

    Returns:
        [B, T] float32 KL per position, NOT scaled by T**2.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"KL direction {direction!r} is not one of {KL_DIRECTIONS}.")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    log_p_BTV = jax.nn.log_softmax(p_logits.astype(jnp.float32) / temperature, axis=-1)
    log_q_BTV = jax.nn.log_softmax(q_logits.astype(jnp.float32) / temperature, axis=-1)
    if direction == "reverse":
        log_p_BTV, log_q_BTV = log_q_BTV, log_p_BTV
    p_BTV = jnp.exp(log_p_BTV)
    # 0 * log(0 / q) = 0: vocab entries with no mass (e.g. -inf logits) add nothing.
    terms_BTV = jnp.where(p_BTV > 0, p_BTV * (log_p_BTV - log_q_BTV), 0.0)
    return jnp.sum(terms_BTV, axis=-1)


def kl_divergence(
    p_logits: jax.Array,
    q_logits: jax.Array,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    direction: str = "forward",
) -> jax.Array:
    """Mean KL over counted positions, scaled by T**2 for distillation.

    The T**2 factor (Hinton et al. 2015) keeps the gradient magnitude of the softened
    loss roughly independent of T, so it can be mixed with a hard-label loss without
    retuning its weight. At T = 1 it is the plain KL.

    Args:
        p_logits: [B, T, V] teacher / reference logits (P = softmax(p_logits / T)).
        q_logits: same shape, student / policy logits (Q = softmax(q_logits / T)).
        temperature: softmax temperature T > 0.
        mask: optional [B, T] bool or 0/1; True/1 marks a counted position.
        direction: "forward" for KL(P || Q), "reverse" for KL(Q || P).

    Returns:
        Scalar float32: T**2 * mean over counted positions of the per-position KL;
        0 when no position is counted.
    """
    kl_BT = kl_divergence_per_position(
        p_logits, q_logits, temperature=temperature, direction=direction)
    counted_BT, weights_BT = _counted_and_weights(mask, kl_BT.shape)
    total = jnp.sum(jnp.where(counted_BT, kl_BT * weights_BT, 0.0))
    return temperature**2 * _safe_mean(total, jnp.sum(weights_BT))


def sequence_log_probs(
    logits_BTV: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array | None = None,
    *,
    average: bool = False,
) -> jax.Array:
    """Log-probability of each target sequence, as used by DPO and reward scoring.

    Logits at position t are scored against targets at position t: no shift is done
    here. For a causal LM, callers pass logits[:, :-1] and tokens[:, 1:].

    Args:
        logits_BTV: [B, T, V] logits, any float dtype.
        targets_BT: [B, T] integer target ids.
        mask_BT: optional [B, T] bool or 0/1; True/1 marks a counted token (e.g. the
            response, not the prompt or padding).
        average: if True, the mean over counted tokens instead of the sum (0 for a
            sequence with no counted token).

    Returns:
        [B] float32 sum (or mean) of log p(target) per sequence.
    """
    log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    counted_BT, weights_BT = _counted_and_weights(mask_BT, targets_BT.shape)
    token_logps_BT = _target_log_probs(log_probs_BTV, targets_BT, counted_BT)
    total_B = jnp.sum(jnp.where(counted_BT, token_logps_BT * weights_BT, 0.0), axis=-1)
    if average:
        return _safe_mean(total_B, jnp.sum(weights_BT, axis=-1))
    return total_B


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Direct Preference Optimization loss (Rafailov et al. 2023) and its IPO variant.

    With h = (pc - rc) - (pr - rr), the policy's log-ratio margin over the reference:
      "sigmoid": -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h);
          ls > 0 is conservative DPO (preference labels assumed flipped with prob. ls).
      "ipo": (h - 1 / (2 * beta))**2 (Azar et al. 2023). The paper scores sequences
          by length-averaged log-probs: `sequence_log_probs(..., average=True)`.

    Args:
        policy_chosen_logps: [B] log p_policy(chosen | prompt), "pc".
        policy_rejected_logps: [B] log p_policy(rejected | prompt), "pr".
        reference_chosen_logps: [B] log p_reference(chosen | prompt), "rc".
        reference_rejected_logps: [B] log p_reference(rejected | prompt), "rr".
        beta: inverse temperature of the implicit reward (strength of the KL anchor).
        loss_type: "sigmoid" or "ipo".
        label_smoothing: ls in [0, 0.5); "sigmoid" only.

    Returns:
        (loss, metrics): the mean loss over the batch, and the batch means of
        `chosen_rewards` = beta * (pc - rc), `rejected_rewards` = beta * (pr - rr),
        `reward_margin` (chosen - rejected) and `reward_accuracy` (fraction with
        chosen_rewards > rejected_rewards).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"DPO loss_type {loss_type!r} is not one of {DPO_LOSS_TYPES}.")
    if loss_type == "ipo" and isinstance(label_smoothing, (int, float)) and label_smoothing:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no meaning for loss_type='ipo'; "
            "use 0.0, or loss_type='sigmoid' for conservative DPO.")
    pc_B, pr_B, rc_B, rr_B = (jnp.asarray(x, jnp.float32) for x in (
        policy_chosen_logps, policy_rejected_logps,
        reference_chosen_logps, reference_rejected_logps))

    chosen_logratio_B = pc_B - rc_B
    rejected_logratio_B = pr_B - rr_B
    h_B = chosen_logratio_B - rejected_logratio_B
    if loss_type == "sigmoid":
        losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                    - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
    else:
        losses_B = jnp.square(h_B - 1.0 / (2.0 * beta))

    # Rewards are diagnostics only: no gradient should flow through the metrics.
    chosen_rewards_B = jax.lax.stop_gradient(beta * chosen_logratio_B)
    rejected_rewards_B = jax.lax.stop_gradient(beta * rejected_logratio_B)
    metrics = {
        "chosen_rewards": jnp.mean(chosen_rewards_B),
        "rejected_rewards": jnp.mean(rejected_rewards_B),
        "reward_margin": jnp.mean(chosen_rewards_B - rejected_rewards_B),
        "reward_accuracy": jnp.mean(
            (chosen_rewards_B > rejected_rewards_B).astype(jnp.float32)),
    }
    return jnp.mean(losses_B), metrics
