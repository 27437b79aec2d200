"""The distillation losses against float64 numpy re-implementations: the token KL (forward and
reverse, at a temperature) and the objective's mix with the cross-entropy over a padded,
partly masked batch; MiniLM's attention and value relation KLs between models of different
head counts over packed rows with padding; the relation of R = N heads is the model's own
attention (the sown q/k/v agree with the sown attention weights); a BERT batch is masked once,
for both models, and its KL counts the masked positions.

Tolerances: float32 rounding of what is computed, eps32 times the sum of the absolute values
of the terms (each log-softmax and product), times a count of roundings per term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.bert import BertConfig, BertForMaskedLM
from models.gpt import GPT, GPTConfig
from models.layers.blocks import BlockConfig
from train import distill_losses
from train.objectives import lm
from train.objectives.distill import DistillObjective, last_layer_qkv

EPS32 = float(np.finfo(np.float32).eps)


def _log_softmax64(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl64(student, teacher, temperature, direction):
    """Per-position KL and the size of its terms (for the tolerance), float64."""
    log_q = _log_softmax64(np.asarray(student, np.float64) / temperature)
    log_p = _log_softmax64(np.asarray(teacher, np.float64) / temperature)
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    p = np.exp(log_p)
    kl = (p * (log_p - log_q)).sum(-1)
    size = (p * (np.abs(log_p) + np.abs(log_q) + np.abs(student) / temperature + np.abs(teacher) / temperature)).sum(-1)
    return kl, size


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 3.5])
def test_token_kl_matches_numpy(direction, temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(0, 3, (2, 5, 37)).astype(np.float32)
    teacher = rng.normal(0, 3, (2, 5, 37)).astype(np.float32)
    got = np.asarray(distill_losses.token_kl(jnp.asarray(student), jnp.asarray(teacher), temperature=temperature,
                                             direction=direction))
    want, size = _kl64(student, teacher, temperature, direction)
    assert np.all(want > 0)
    np.testing.assert_array_less(np.abs(got - want), 8 * EPS32 * (size + 1) * np.log2(37))


def _tiny_gpt(vocab=41):
    block = BlockConfig(d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0)  # the loss trains: no dropout
    return GPT(GPTConfig(vocab_size=vocab, block=block, num_layers=1, max_len=16))


def _batch(rng, B=4, T=12, vocab=41):
    """A packed batch: two documents in row 0, padding at the ends of rows 1 and 3, and a
    loss mask that also drops a few real tokens."""
    ids = rng.integers(0, vocab, (B, T + 1))
    segments = np.ones((B, T), np.int32)
    segments[0, 7:] = 2
    segments[1, 9:] = 0
    segments[3, 4:] = 0
    positions = np.where(segments[0] == 2, np.arange(T) - 7, np.arange(T))[None].repeat(B, 0).astype(np.int32)
    positions[1:] = np.arange(T)
    loss_mask = (segments > 0).astype(np.int32)
    loss_mask[2, :3] = 0
    return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32), "segment_ids": segments,
            "positions": positions * (segments > 0), "loss_mask": loss_mask}


@pytest.mark.parametrize("direction,temperature,alpha", [("forward", 2.0, 0.7), ("reverse", 0.5, 0.3)])
def test_the_objectives_loss_is_the_mix_of_numpy_kl_and_cross_entropy(direction, temperature, alpha):
    """loss = alpha T^2 KL + (1 - alpha)(CE + z-loss), each summed over the counted tokens and
    divided by the whole batch's count; a micro-batch's share adds up to the whole."""
    rng = np.random.default_rng(1)
    model = _tiny_gpt()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = _batch(rng)
    teacher = rng.normal(0, 2, (*batch["inputs"].shape, 41)).astype(np.float32)
    batch = {k: jnp.asarray(v) for k, v in {**batch, "teacher_logits": teacher}.items()}
    z_loss = 1e-3
    objective = DistillObjective(lm.LMObjective(model, z_loss=z_loss), None, alpha=alpha, temperature=temperature,
                                 direction=direction)
    totals = {**objective.totals(batch), "micro_batches": 1}
    loss_fn = jax.jit(lambda b: objective.loss(params, b, jax.random.key(0), totals))
    loss, (stats, _) = loss_fn(batch)

    logits = np.asarray(jax.jit(model.apply)({"params": params}, batch["inputs"], positions=batch["positions"],
                                              segment_ids=batch["segment_ids"]), np.float64)
    mask = np.asarray(batch["loss_mask"]) > 0
    count = mask.sum()
    kl, size = _kl64(logits, teacher, temperature, direction)
    log_probs = _log_softmax64(logits)
    targets = np.asarray(batch["targets"])
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want_kl, want_ce = (kl * mask).sum() / count, (nll * mask).sum() / count
    want = alpha * temperature ** 2 * want_kl + (1 - alpha) * (want_ce + z_loss * ((lse ** 2) * mask).sum() / count)
    # Each token's terms (the KL's, the log-softmax of V logits, the z-loss) rounded a few times.
    scale = (alpha * temperature ** 2 * (size * mask).sum() + (np.abs(log_probs).sum(-1) * mask).sum()
             + z_loss * (lse ** 2 * mask).sum()) / count
    tol = 16 * EPS32 * scale * np.log2(41)
    assert abs(float(stats["kl"]) - want_kl) < tol
    assert abs(float(stats["ce"]) - want_ce) < tol
    assert abs(float(loss) - want) < tol

    halves = [jax.tree_util.tree_map(lambda x, i=i: x[2 * i:2 * i + 2], batch) for i in range(2)]
    shares = [loss_fn(h)[0] for h in halves]
    assert abs(float(sum(shares)) - float(loss)) < tol


def _relation64(a, b, visible, heads):
    """log softmax(a_r b_r^T / sqrt(H)) over the visible keys (elsewhere 0), float64 [B, R, T, S],
    and the largest absolute score of each row (what each entry's rounding scales with)."""
    B, T, D = a.shape
    H = D // heads
    a = np.asarray(a, np.float64).reshape(B, T, heads, H)
    b = np.asarray(b, np.float64).reshape(B, T, heads, H)
    scores = np.einsum("btrh,bsrh->brts", a, b) / np.sqrt(H)
    out = np.zeros_like(scores)
    for i, r, t in np.ndindex(B, heads, T):
        seen = visible[i, t]
        if seen.any():
            row = scores[i, r, t, seen]
            out[i, r, t, seen] = row - row.max() - np.log(np.exp(row - row.max()).sum())
    return out, np.abs(scores).max(-1)


def test_minilm_relation_kls_match_numpy_across_head_counts():
    """A teacher of width 48 and a student of width 32, both split into R = 4 relation heads."""
    rng = np.random.default_rng(2)
    B, T, R = 3, 10, 4
    segments = np.ones((B, T), np.int32)
    segments[0, 6:] = 2
    segments[2, 7:] = 0
    visible = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    teacher = {k: rng.normal(0, 1.5, (B, T, 48)).astype(np.float32) for k in ("query", "key", "value")}
    student = {k: rng.normal(0, 1.5, (B, T, 32)).astype(np.float32) for k in ("query", "key", "value")}
    got = distill_losses.minilm_kl({k: jnp.asarray(v) for k, v in student.items()},
                                   {k: jnp.asarray(v) for k, v in teacher.items()}, jnp.asarray(segments), R)
    real = segments > 0
    for name, (a, b) in (("attention_kl", ("query", "key")), ("value_kl", ("value", "value"))):
        log_p, size_p = _relation64(teacher[a], teacher[b], visible, R)
        log_q, size_q = _relation64(student[a], student[b], visible, R)
        p = np.exp(log_p) * visible[:, None]
        want = (p * (log_p - log_q)).sum(-1).mean(1) * real
        # Per row: the KL's terms, and each log-softmax entry's rounding (of order its largest score).
        size = (p * (np.abs(log_p) + np.abs(log_q))).sum(-1).mean(1) + (size_p + size_q).mean(1)
        assert np.all(want[real] > 0)
        np.testing.assert_array_less(np.abs(np.asarray(got[name]) - want), 16 * EPS32 * (size + 1) * np.log2(T))
        assert np.all(np.asarray(got[name])[~real] == 0)


def test_relations_of_the_student_heads_are_the_bert_attention_weights():
    """With R = N the attention relation of the sown q/k is the attention the layer computed
    (sown as `attention_weights`), masked to each packed document."""
    block = BlockConfig(d_model=32, num_heads=4, d_ff=64, norm_position="post", norm_eps=1e-12, mlp_activation="gelu",
                        use_bias=True)
    model = BertForMaskedLM(BertConfig(vocab_size=50, block=block, num_layers=2, max_len=16))
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 50, (2, 9)), jnp.int32)
    segments = jnp.asarray([[1] * 5 + [2] * 4, [1] * 6 + [0] * 3], jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), ids)["params"]
    _, variables = jax.jit(lambda p: model.apply({"params": p}, ids, segment_ids=segments,
                                                 mutable=["attention_qkv", "intermediates"]))(params)
    qkv = last_layer_qkv(variables["attention_qkv"])
    weights = variables["intermediates"]["bert"]["layer_1"]["self_attention"]["attention_weights"][0]
    mask = distill_losses.relation_mask(segments)
    relation = jnp.exp(distill_losses.relation_log_probs(qkv["query"], qkv["key"], mask, 4))
    real = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(relation)[real[:, None, :, None].repeat(4, 1).repeat(9, 3)],
                               np.asarray(weights)[real[:, None, :, None].repeat(4, 1).repeat(9, 3)],
                               atol=64 * EPS32)
    assert qkv["query"].shape == (2, 9, 32)


def test_a_bert_batch_is_masked_once_and_the_kl_counts_the_masked_positions():
    """BERT logit distillation: `teacher_batch` corrupts the batch (`train.mlm.mask_batch` with
    the given rng) and scores the corrupted ids with the teacher; the student's KL is then over
    exactly the masked positions (its loss_mask), equal to the numpy KL there."""
    from train import mlm as mlm_lib
    from train.objectives import mlm
    from train.objectives.distill import teacher_batch

    block = BlockConfig(d_model=32, num_heads=4, d_ff=64, norm_position="post", dropout_rate=0.0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=41, block=block, num_layers=2, max_len=16))
    student = BertForMaskedLM(BertConfig(vocab_size=41, block=block, num_layers=1, max_len=16))
    rng = np.random.default_rng(4)
    batch = {k: jnp.asarray(v) for k, v in _batch(rng).items()}
    t_params = jax.jit(teacher.init)(jax.random.key(0), batch["inputs"])["params"]
    s_params = jax.jit(student.init)(jax.random.key(1), batch["inputs"])["params"]
    config = mlm_lib.MLMConfig(mask_id=40, vocab_size=41, prob=0.3)
    out = jax.jit(lambda p, b: teacher_batch(teacher, p, b, jax.random.key(5), mode="logits", mlm=config))(
        t_params, batch)
    masked = mlm_lib.mask_batch(jax.random.key(5), batch, config)
    for key in masked:
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(masked[key]))
    want_logits = jax.jit(lambda p: teacher.apply({"params": p}, masked["inputs"], positions=masked["positions"],
                                                  segment_ids=masked["segment_ids"]))(t_params)
    np.testing.assert_array_equal(np.asarray(out["teacher_logits"]), np.asarray(want_logits))
    objective = DistillObjective(mlm.MLMObjective(student, mlm=config), None, temperature=2.0)
    totals = {**objective.totals(out), "micro_batches": 1}
    _, (stats, _) = jax.jit(lambda b: objective.loss(s_params, b, jax.random.key(0), totals))(out)
    s_logits = np.asarray(jax.jit(lambda p: student.apply({"params": p}, out["inputs"], positions=out["positions"],
                                                          segment_ids=out["segment_ids"]))(s_params))
    kl, size = _kl64(s_logits, np.asarray(want_logits), 2.0, "forward")
    chosen = np.asarray(out["loss_mask"]) > 0
    assert 0 < chosen.sum() < (np.asarray(batch["segment_ids"]) > 0).sum()
    want = kl[chosen].sum() / chosen.sum()
    assert abs(float(stats["kl"]) - want) < 16 * EPS32 * np.log2(41) * (size[chosen].sum() / chosen.sum() + 1)
