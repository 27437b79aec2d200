"""train/losses.py against independent references: optax, numpy float64, hand math.

Axis letters: B batch, T length, V vocab.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import losses

B, T, V = 3, 7, 13


def _inputs(seed=0, scale=3.0, vocab=V):
    rng = np.random.default_rng(seed)
    logits_BTV = (scale * rng.standard_normal((B, T, vocab))).astype(np.float32)
    targets_BT = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    mask_BT = rng.random((B, T)) < 0.7
    mask_BT[0, 0] = True  # at least one counted token
    return logits_BTV, targets_BT, mask_BT


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_logsumexp(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def _masked_mean(x_BT, mask_BT):
    mask_BT = np.asarray(mask_BT, np.float64)
    return float((np.asarray(x_BT, np.float64) * mask_BT).sum() / mask_BT.sum())


# --- cross_entropy -------------------------------------------------------------------


def test_cross_entropy_matches_optax_integer_labels():
    logits_BTV, targets_BT, mask_BT = _inputs()
    loss, aux = losses.cross_entropy(logits_BTV, targets_BT, mask_BT=mask_BT)
    ref_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    np.testing.assert_allclose(loss, _masked_mean(ref_BT, mask_BT), rtol=1e-6)
    np.testing.assert_allclose(aux["per_token"], np.where(mask_BT, ref_BT, 0.0),
                               rtol=1e-6, atol=1e-6)
    assert aux["num_tokens"] == mask_BT.sum()
    correct_BT = np.argmax(logits_BTV, axis=-1) == targets_BT
    np.testing.assert_allclose(aux["accuracy"], _masked_mean(correct_BT, mask_BT), rtol=1e-6)
    assert aux["z_loss"] == 0.0


def test_cross_entropy_without_mask_is_plain_mean():
    logits_BTV, targets_BT, _ = _inputs(seed=1)
    loss, aux = losses.cross_entropy(logits_BTV, targets_BT)
    ref_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    np.testing.assert_allclose(loss, np.mean(np.asarray(ref_BT, np.float64)), rtol=1e-6)
    assert aux["num_tokens"] == B * T


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cross_entropy_label_smoothing_matches_optax(eps):
    logits_BTV, targets_BT, mask_BT = _inputs(seed=2)
    loss, aux = losses.cross_entropy(
        logits_BTV, targets_BT, mask_BT=mask_BT, label_smoothing=eps)
    smoothed_BTV = optax.smooth_labels(jax.nn.one_hot(targets_BT, V), eps)
    ref_BT = optax.softmax_cross_entropy(logits_BTV, smoothed_BTV)
    np.testing.assert_allclose(loss, _masked_mean(ref_BT, mask_BT), rtol=1e-6)
    np.testing.assert_allclose(aux["per_token"], np.where(mask_BT, ref_BT, 0.0),
                               rtol=1e-6, atol=1e-6)


def test_cross_entropy_z_loss_matches_float64_logsumexp():
    z_coef = 1e-2
    logits_BTV, targets_BT, mask_BT = _inputs(seed=3, scale=5.0)
    loss, aux = losses.cross_entropy(logits_BTV, targets_BT, mask_BT=mask_BT, z_loss=z_coef)
    z_ref_BT = z_coef * _np_logsumexp(logits_BTV) ** 2
    ce_ref_BT = _np_logsumexp(logits_BTV) - np.take_along_axis(
        logits_BTV.astype(np.float64), targets_BT[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(aux["z_loss"], _masked_mean(z_ref_BT, mask_BT), rtol=1e-6)
    np.testing.assert_allclose(loss, _masked_mean(ce_ref_BT + z_ref_BT, mask_BT), rtol=1e-6)
    np.testing.assert_allclose(aux["per_token"], np.where(mask_BT, ce_ref_BT + z_ref_BT, 0.0),
                               rtol=1e-5, atol=1e-6)


def test_cross_entropy_ignores_logits_and_targets_at_masked_positions():
    logits_BTV, targets_BT, mask_BT = _inputs(seed=4)
    loss, _ = losses.cross_entropy(logits_BTV, targets_BT, mask_BT=mask_BT, z_loss=1e-3)
    # Padded positions may hold garbage (here NaN) and out-of-range target ids.
    junk_BTV = np.where(mask_BT[..., None], logits_BTV, np.nan).astype(np.float32)
    junk_targets_BT = np.where(mask_BT, targets_BT, -1)
    loss_junk, aux = losses.cross_entropy(
        junk_BTV, junk_targets_BT, mask_BT=mask_BT, z_loss=1e-3)
    assert float(loss_junk) == float(loss)
    assert np.all(np.asarray(aux["per_token"])[~mask_BT] == 0.0)
    # Nor does the gradient reach masked positions.
    grad_BTV = jax.jit(jax.grad(
        lambda x: losses.cross_entropy(x, targets_BT, mask_BT=mask_BT)[0]))(logits_BTV)
    assert np.all(np.asarray(grad_BTV)[~mask_BT] == 0.0)
    assert np.any(np.asarray(grad_BTV)[mask_BT] != 0.0)


def test_padding_target_ids_out_of_range_make_no_nan():
    # torch-style ignore_index -100 at padded positions; jax would gather NaN there,
    # which `jax_debug_nans` reports even if the value is later masked out.
    logits_BTV, targets_BT, mask_BT = _inputs(seed=19)
    padded_BT = np.where(mask_BT, targets_BT, -100)
    with jax.debug_nans(True):
        loss, _ = losses.cross_entropy(logits_BTV, padded_BT, mask_BT=mask_BT)
        logps_B = losses.sequence_log_probs(logits_BTV, padded_BT, mask_BT)
    ref_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    np.testing.assert_allclose(loss, _masked_mean(ref_BT, mask_BT), rtol=1e-6)
    np.testing.assert_allclose(
        logps_B, _np_sequence_log_probs(logits_BTV, targets_BT, mask_BT, False), rtol=1e-5)


def test_cross_entropy_all_masked_is_zero_with_finite_gradient():
    logits_BTV, targets_BT, _ = _inputs(seed=5)
    mask_BT = np.zeros((B, T), bool)

    def loss_fn(x):
        return losses.cross_entropy(
            x, targets_BT, mask_BT=mask_BT, label_smoothing=0.1, z_loss=1e-3)[0]

    loss, grad_BTV = jax.value_and_grad(loss_fn)(logits_BTV)
    _, aux = losses.cross_entropy(logits_BTV, targets_BT, mask_BT=mask_BT)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(grad_BTV))
    assert float(aux["accuracy"]) == 0.0 and float(aux["num_tokens"]) == 0.0


def test_cross_entropy_bf16_logits_use_f32_math():
    logits_BTV, targets_BT, mask_BT = _inputs(seed=6, vocab=512)
    targets_BT = targets_BT % 512
    logits_bf16 = jnp.asarray(logits_BTV, jnp.bfloat16)
    loss_bf16, aux = losses.cross_entropy(
        logits_bf16, targets_BT, mask_BT=mask_BT, label_smoothing=0.1, z_loss=1e-3)
    loss_f32, _ = losses.cross_entropy(
        logits_bf16.astype(jnp.float32), targets_BT, mask_BT=mask_BT,
        label_smoothing=0.1, z_loss=1e-3)
    assert loss_bf16.dtype == jnp.float32 and aux["per_token"].dtype == jnp.float32
    # Same (bf16-rounded) inputs, so f32 math must agree to f32 rounding; bf16 math
    # would be off by ~1e-2 relative.
    np.testing.assert_allclose(loss_bf16, loss_f32, rtol=1e-6)
    # And the bf16 input rounding itself moves the loss only a little.
    loss_orig, _ = losses.cross_entropy(
        logits_BTV, targets_BT, mask_BT=mask_BT, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(loss_bf16, loss_orig, rtol=2e-2)


# --- kl_divergence -------------------------------------------------------------------


def _np_kl(p_logits, q_logits, temperature, mask, direction):
    log_p = _np_log_softmax(np.asarray(p_logits, np.float64) / temperature)
    log_q = _np_log_softmax(np.asarray(q_logits, np.float64) / temperature)
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    kl_BT = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return temperature**2 * _masked_mean(kl_BT, mask)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kl_divergence_matches_float64_numpy(direction, temperature):
    p_BTV, _, mask_BT = _inputs(seed=7)
    q_BTV, _, _ = _inputs(seed=8)
    got = losses.kl_divergence(
        p_BTV, q_BTV, temperature=temperature, mask=mask_BT, direction=direction)
    want = _np_kl(p_BTV, q_BTV, temperature, mask_BT, direction)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_kl_forward_and_reverse_differ_and_swap():
    p_BTV, _, mask_BT = _inputs(seed=9)
    q_BTV, _, _ = _inputs(seed=10)
    forward = losses.kl_divergence(p_BTV, q_BTV, mask=mask_BT, direction="forward")
    reverse = losses.kl_divergence(p_BTV, q_BTV, mask=mask_BT, direction="reverse")
    swapped = losses.kl_divergence(q_BTV, p_BTV, mask=mask_BT, direction="forward")
    assert abs(float(forward) - float(reverse)) > 1e-3  # KL is not symmetric
    np.testing.assert_allclose(reverse, swapped, rtol=1e-6)


def test_kl_of_a_distribution_with_itself_is_zero():
    p_BTV, _, _ = _inputs(seed=11)
    for direction in ("forward", "reverse"):
        kl = losses.kl_divergence(p_BTV, p_BTV, temperature=2.0, direction=direction)
        assert abs(float(kl)) < 1e-6
    # Softmax is shift-invariant, so a constant offset per position is still zero KL.
    shifted_BTV = p_BTV + np.arange(T, dtype=np.float32)[None, :, None]
    assert abs(float(losses.kl_divergence(p_BTV, shifted_BTV))) < 1e-5


def test_kl_is_nonnegative_on_random_logits():
    for seed in range(5):
        p_BTV, _, _ = _inputs(seed=100 + seed, scale=4.0)
        q_BTV, _, _ = _inputs(seed=200 + seed, scale=4.0)
        kl_BT = losses.kl_divergence_per_position(p_BTV, q_BTV, direction="reverse")
        assert np.all(np.asarray(kl_BT) >= -1e-6)
        assert float(losses.kl_divergence(p_BTV, q_BTV)) > 0.0


def test_kl_masked_positions_do_not_count_and_all_masked_is_zero():
    p_BTV, _, mask_BT = _inputs(seed=12)
    q_BTV, _, _ = _inputs(seed=13)
    kl = losses.kl_divergence(p_BTV, q_BTV, mask=mask_BT)
    junk_q_BTV = np.where(mask_BT[..., None], q_BTV, 50.0 * q_BTV).astype(np.float32)
    assert float(losses.kl_divergence(p_BTV, junk_q_BTV, mask=mask_BT)) == float(kl)
    assert float(losses.kl_divergence(p_BTV, q_BTV, mask=np.zeros((B, T), bool))) == 0.0


def test_kl_zero_probability_entries_are_finite():
    p_BTV, _, _ = _inputs(seed=14)
    q_BTV, _, _ = _inputs(seed=15)
    p_BTV[..., 0] = -np.inf  # a banned token in the teacher
    kl = losses.kl_divergence(p_BTV, q_BTV)
    want = _np_kl(p_BTV[..., 1:], q_BTV[..., 1:], 1.0, np.ones((B, T)), "forward")
    # Dropping a zero-mass teacher entry leaves the teacher distribution unchanged, but
    # renormalises the student; add back its log-normaliser change.
    log_q_full = _np_log_softmax(q_BTV)
    log_q_sub = _np_log_softmax(q_BTV[..., 1:])
    want += float(np.mean(log_q_sub[..., 0] - log_q_full[..., 1]))
    assert np.isfinite(float(kl))
    np.testing.assert_allclose(kl, want, rtol=1e-5)


def test_kl_bad_direction_names_valid_choices():
    p_BTV, _, _ = _inputs()
    with pytest.raises(ValueError, match="forward.*reverse"):
        losses.kl_divergence(p_BTV, p_BTV, direction="backward")


# --- sequence_log_probs --------------------------------------------------------------


def _np_sequence_log_probs(logits_BTV, targets_BT, mask_BT, average):
    log_p_BTV = _np_log_softmax(logits_BTV)
    token_BT = np.take_along_axis(log_p_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = np.ones_like(token_BT) if mask_BT is None else np.asarray(mask_BT, np.float64)
    total_B = (token_BT * mask_BT).sum(axis=-1)
    return total_B / mask_BT.sum(axis=-1) if average else total_B


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_sequence_log_probs_matches_float64_numpy(average, use_mask):
    logits_BTV, targets_BT, mask_BT = _inputs(seed=16)
    mask_BT = mask_BT if use_mask else None
    got_B = losses.sequence_log_probs(logits_BTV, targets_BT, mask_BT, average=average)
    want_B = _np_sequence_log_probs(logits_BTV, targets_BT, mask_BT, average)
    assert got_B.shape == (B,) and got_B.dtype == jnp.float32
    np.testing.assert_allclose(got_B, want_B, rtol=1e-5)


def test_sequence_log_probs_empty_sequence_is_zero_not_nan():
    logits_BTV, targets_BT, mask_BT = _inputs(seed=17)
    mask_BT[1] = False
    for average in (False, True):
        got_B = np.asarray(losses.sequence_log_probs(
            logits_BTV, targets_BT, mask_BT, average=average))
        assert got_B[1] == 0.0 and np.all(np.isfinite(got_B))
        assert np.all(got_B[[0, 2]] < 0.0)


# --- dpo_loss ------------------------------------------------------------------------

# Two preference pairs worked out by hand, beta = 0.1.
# Pair 0: pc=-1, pr=-2, rc=-1.5, rr=-1.5 -> h = (-1+1.5) - (-2+1.5) = 0.5 + 0.5 = 1.0
#         chosen reward 0.1*0.5 = 0.05, rejected 0.1*(-0.5) = -0.05 (pair ranked right)
# Pair 1: pc=-3, pr=-1, rc=-2, rr=-2 -> h = (-3+2) - (-1+2) = -1 - 1 = -2.0
#         chosen reward -0.1, rejected 0.1 (ranked wrong)
PC, PR, RC, RR = [-1.0, -3.0], [-2.0, -1.0], [-1.5, -2.0], [-1.5, -2.0]
BETA = 0.1


def _softplus(x):  # -log_sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_dpo_sigmoid_matches_hand_computation():
    loss, metrics = losses.dpo_loss(PC, PR, RC, RR, beta=BETA)
    # -log sigmoid(beta * h) = log(1 + exp(-beta * h)), beta*h = 0.1 and -0.2.
    want = (_softplus(-0.1) + _softplus(0.2)) / 2
    assert abs(want - (0.6443966600735709 + 0.7981388693815918) / 2) < 1e-12
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["chosen_rewards"], (0.05 - 0.1) / 2, atol=1e-7)
    np.testing.assert_allclose(metrics["rejected_rewards"], (-0.05 + 0.1) / 2, atol=1e-7)
    np.testing.assert_allclose(metrics["reward_margin"], (0.1 - 0.2) / 2, atol=1e-7)
    assert float(metrics["reward_accuracy"]) == 0.5


def test_dpo_label_smoothing_matches_hand_computation():
    ls = 0.2
    loss, _ = losses.dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=ls)
    pair0 = (1 - ls) * _softplus(-0.1) + ls * _softplus(0.1)
    pair1 = (1 - ls) * _softplus(0.2) + ls * _softplus(-0.2)
    np.testing.assert_allclose(loss, (pair0 + pair1) / 2, rtol=1e-6)


def test_dpo_ipo_matches_hand_computation():
    loss, metrics = losses.dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="ipo")
    # 1 / (2 * beta) = 5: (1 - 5)**2 = 16, (-2 - 5)**2 = 49.
    np.testing.assert_allclose(loss, (16.0 + 49.0) / 2, rtol=1e-6)
    assert float(metrics["reward_accuracy"]) == 0.5


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = (jnp.asarray(x) for x in (PC, PR, RC, RR))
    grads = jax.grad(lambda a, b: losses.dpo_loss(a, b, rc, rr, beta=BETA)[0],
                     argnums=(0, 1))(pc, pr)
    assert np.all(np.asarray(grads[0]) < 0)  # more chosen logp -> lower loss
    assert np.all(np.asarray(grads[1]) > 0)
    # Finite step, not just the sign of the derivative.
    before, _ = losses.dpo_loss(pc, pr, rc, rr, beta=BETA)
    after, _ = losses.dpo_loss(pc + 0.5, pr, rc, rr, beta=BETA)
    assert float(after) < float(before)


def test_dpo_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match="sigmoid.*ipo"):
        losses.dpo_loss(PC, PR, RC, RR, loss_type="hinge_typo")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)


# --- jit == no jit -------------------------------------------------------------------


class JitAgreementTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy(self):
        logits_BTV, targets_BT, mask_BT = _inputs(seed=18)
        fn = self.variant(functools.partial(
            losses.cross_entropy, label_smoothing=0.1, z_loss=1e-3))
        loss, aux = fn(logits_BTV, targets_BT, mask_BT=mask_BT)
        smoothed_BTV = optax.smooth_labels(jax.nn.one_hot(targets_BT, V), 0.1)
        ce_BT = np.asarray(optax.softmax_cross_entropy(logits_BTV, smoothed_BTV), np.float64)
        want = _masked_mean(ce_BT + 1e-3 * _np_logsumexp(logits_BTV) ** 2, mask_BT)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        self.assertEqual(aux["per_token"].shape, (B, T))

    @chex.variants(with_jit=True, without_jit=True)
    def test_dpo_loss(self):
        for loss_type, want in (("sigmoid", (_softplus(-0.1) + _softplus(0.2)) / 2),
                                ("ipo", 32.5)):
            fn = self.variant(functools.partial(
                losses.dpo_loss, beta=BETA, loss_type=loss_type))
            loss, metrics = fn(jnp.asarray(PC), jnp.asarray(PR), jnp.asarray(RC),
                               jnp.asarray(RR))
            np.testing.assert_allclose(loss, want, rtol=1e-6)
            np.testing.assert_allclose(metrics["reward_accuracy"], 0.5)


# --- multi-token prediction -------------------------------------------------------------


def _packed_rows():
    """Two rows: documents 1, 2 (a boundary at 3), then document 3; the last 2 slots padding."""
    segment_ids = np.asarray([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]], np.int32)
    loss_mask = (segment_ids > 0).astype(np.int32)
    rng = np.random.default_rng(3)
    targets = rng.integers(0, V, size=segment_ids.shape).astype(np.int32)
    targets[segment_ids == 0] = -1  # padding targets are out of range: never read
    return targets, loss_mask, segment_ids


def test_future_targets_stay_in_the_row_and_the_document():
    targets, loss_mask, segment_ids = _packed_rows()
    ahead, counted = losses.future_targets(jnp.asarray(targets), jnp.asarray(loss_mask), jnp.asarray(segment_ids), 2)
    np.testing.assert_array_equal(ahead[:, :5], targets[:, 2:])
    # Row 0: positions 0 and 3, 4 see their own document 2 ahead; 1, 2 would cross into
    # document 2, and 5, 6 run off the row. Row 1: 0-2 see 2-4; 3, 4 see padding.
    np.testing.assert_array_equal(counted, [[1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    _, same = losses.future_targets(jnp.asarray(targets), jnp.asarray(loss_mask), jnp.asarray(segment_ids), 0)
    np.testing.assert_array_equal(same, loss_mask)


def test_multi_token_prediction_loss_matches_float64_numpy():
    targets, loss_mask, segment_ids = _packed_rows()
    rng = np.random.default_rng(4)
    depth_logits = [(3.0 * rng.standard_normal((2, T, V))).astype(np.float32) for _ in range(2)]
    loss, aux = losses.multi_token_prediction_loss([jnp.asarray(x) for x in depth_logits], jnp.asarray(targets),
                                                   jnp.asarray(loss_mask), jnp.asarray(segment_ids))
    per_depth = []
    for k, logits in enumerate(depth_logits, start=1):
        log_p = _np_log_softmax(logits)
        terms = [-log_p[b, i, targets[b, i + k]] for b in range(2) for i in range(T - k)
                 if loss_mask[b, i + k] and segment_ids[b, i + k] == segment_ids[b, i]]
        per_depth.append(np.mean(terms))
    np.testing.assert_allclose(aux["per_depth"], per_depth, rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean(per_depth), rtol=1e-6)
    np.testing.assert_array_equal(aux["num_tokens"], [5 + 4, 3 + 3])  # per row, as counted above
    assert np.isfinite(np.asarray(jax.grad(lambda x: losses.multi_token_prediction_loss(
        [x, x], jnp.asarray(targets), jnp.asarray(loss_mask), jnp.asarray(segment_ids))[0])(
        jnp.asarray(depth_logits[0])))).all()


def test_multi_token_prediction_given_counts_sum_over_micro_batches():
    """Normalised by the whole batch's counts, the rows' losses add up to the batch's loss."""
    targets, loss_mask, segment_ids = _packed_rows()
    logits = [jnp.asarray(np.random.default_rng(5).standard_normal((2, T, V)), jnp.float32)]
    whole, aux = losses.multi_token_prediction_loss(logits, targets, loss_mask, segment_ids)
    parts = [losses.multi_token_prediction_loss([logits[0][r:r + 1]], targets[r:r + 1], loss_mask[r:r + 1],
                                                segment_ids[r:r + 1], num_tokens=aux["num_tokens"])[0]
             for r in range(2)]
    np.testing.assert_allclose(sum(parts), whole, rtol=1e-6)
