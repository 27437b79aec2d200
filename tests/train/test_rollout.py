"""Rollouts (`train.rollout`) on 8 simulated devices: generation inside one jitted function laid
out by the run (fsdp-sharded params, batch-sharded rows) equals `inference.generate` token for
token, greedy and sampled with the same key; the row layout and masks; host rewards on each
process's own rows land on the right rows; strided minibatches; resume == uninterrupted keys."""

import functools

import jax
import numpy as np
import pytest

from inference.generate import generate
from tests.train import rl_helpers as h
from train import rollout
from train import trainable as trainable_lib
from train.rewards import RewardSet, accuracy_reward

G, N, PROMPTS = 2, 6, 8


def _answer_reward(prompts, completions, answer, **fields):
    """Completion tokens counted plus the example's answer: tells rows and examples apart."""
    return [len(c.split()) + a for c, a in zip(completions, answer)]


REWARDS = RewardSet(("count",), (1.0,), (_answer_reward,))


@functools.cache
def _setup(strategy, temperature=0.0, top_k=0):
    config = h.tiny_config(max_new_tokens=N)
    config.rl.update(num_generations=G, temperature=temperature, top_k=top_k)
    run = h.tiny_run(config, strategy)
    examples = {i: {"prompt": "", "answer": 100.0 * i} for i in range(PROMPTS)}
    scorer = rollout.Scorer(run.tokenizer, REWARDS, examples, (h.EOS,))
    settings = rollout.settings(config, run.tokenizer)
    assert settings.stop_tokens == (h.EOS,) and settings.num_generations == G
    return run, rollout.Roller(run, settings, scorer), run.init_fn(jax.random.key(0))


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 8)])
def test_rollout_equals_generate_token_for_token(temperature, top_k):
    run, roller, state = _setup("fsdp", temperature, top_k)
    rows = h.prompt_rows(PROMPTS)
    rng = jax.random.key(7)
    ids, mask, clen, plen, index = (np.asarray(x) for x in roller.generate(state.params, state.frozen, rows, rng))
    whole = jax.device_get(trainable_lib.combine(state.params, state.frozen))
    prompts = [list(r[:n]) for r, n in zip(rows["prompt_ids"], rows["prompt_len"]) for _ in range(G)]
    want = generate(run.model, whole, prompts, max_new_tokens=N, temperature=temperature, top_k=top_k or None,
                    stop_tokens=(h.EOS,), rng=rng)
    assert np.array_equal(index, np.repeat(np.arange(PROMPTS), G))
    T = run.config.data.seq_len
    for r, (p, w) in enumerate(zip(prompts, want)):
        n = len(p)
        assert plen[r] == n and clen[r] == len(w), r
        np.testing.assert_array_equal(ids[r, :n], p)
        np.testing.assert_array_equal(ids[r, n:n + len(w)], w)
        assert not ids[r, n + len(w):].any()
        np.testing.assert_array_equal(mask[r], (np.arange(T) >= n) & (np.arange(T) < n + len(w)))
    if temperature:  # sampling: the two completions of a prompt differ somewhere
        assert any(want[2 * i] != want[2 * i + 1] for i in range(PROMPTS))


def test_rollout_scores_each_row_and_logps_match_a_float64_forward():
    run, roller, state = _setup("fsdp")
    rows = h.prompt_rows(PROMPTS)
    exp = roller.rollout(state, rows, rollout.rollout_rng(0, 3))
    ids, mask, clen, index = (np.asarray(x) for x in (exp.ids, exp.completion_mask, exp.completion_len, exp.index))
    # Each row's reward: its completion's tokens without the stop token, plus its example's answer.
    stopped = np.array([ids[r, p + c - 1] == h.EOS for r, (p, c) in enumerate(zip(np.asarray(exp.prompt_len), clen))])
    np.testing.assert_array_equal(np.asarray(exp.rewards), clen - stopped + 100.0 * index)
    # The old log-probs are log_softmax of the full forward's logits, in float64.
    whole = jax.device_get(trainable_lib.combine(state.params, state.frozen))
    logits = np.asarray(run.model.apply({"params": whole}, ids), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    want = np.zeros(ids.shape)
    want[:, 1:] = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    got = np.asarray(exp.old_logps)
    # float32 log-softmax over V=64 logits of magnitude ~1: a few eps32 x sqrt(V).
    np.testing.assert_allclose(got, want, atol=50 * np.finfo(np.float32).eps * np.sqrt(h.VOCAB))
    assert mask.sum() == clen.sum() and exp.ref_logps is None


def test_minibatches_are_strided_and_cover_the_rollout_once_per_epoch():
    run, roller, _ = _setup("fsdp")
    R = 4 * run.config.data.batch_size
    batch = {"a": rollout.to_global(np.arange(R, dtype=np.int32), run.layout.batch, R),
             "b": rollout.to_global(np.arange(2 * R, dtype=np.float32).reshape(R, 2), run.layout.batch, R)}
    out = list(rollout.minibatches(batch, roller.select, epochs=2, count=4))
    assert [b for _, b in out] == [False] * 7 + [True]
    for i, (mb, _) in enumerate(out):
        np.testing.assert_array_equal(np.asarray(mb["a"]), np.arange(i % 4, R, 4))
        np.testing.assert_array_equal(np.asarray(mb["b"])[:, 1], 2 * np.arange(i % 4, R, 4) + 1)
        assert mb["a"].sharding == run.layout.batch


def test_rollout_keys_depend_only_on_seed_and_rollout_index():
    a, b = rollout.rollout_rng(0, 5), rollout.rollout_rng(0, 5)
    assert np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(rollout.rollout_rng(0, 6)))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(rollout.rollout_rng(1, 5)))


def test_evaluation_scores_greedy_completions_of_real_rows_only():
    run, _, state = _setup("fsdp")
    real = 12
    rows = h.prompt_rows(real + 4, seed=5)
    rows["index"][real:] = -1  # the last batch's filler rows (data.prompts): generated, never scored
    whole = jax.device_get(trainable_lib.combine(state.params, state.frozen))
    prompts = [list(r[:n]) for r, n in zip(rows["prompt_ids"][:real], rows["prompt_len"][:real])]
    greedy = generate(run.model, whole, prompts, max_new_tokens=N, stop_tokens=(h.EOS,))
    texts = [run.tokenizer.decode([t for t in c if t != h.EOS]) for c in greedy]
    # Every other held-out example's answer is its greedy completion: exact match 1/2.
    examples = [{"prompt": "", "answer": t if i % 2 == 0 else t + " 1", "task": ""} for i, t in enumerate(texts)]
    accuracy = RewardSet(("accuracy",), (1.0,), (accuracy_reward,))
    scorer = rollout.Scorer(run.tokenizer, RewardSet(("accuracy",), (2.0,), (accuracy_reward,)), examples, (h.EOS,))
    roller = rollout.Roller(run, rollout.settings(run.config, run.tokenizer, greedy=True), scorer)
    batches = [{k: v[i:i + 8] for k, v in rows.items()} for i in (0, 8)]
    sums, metrics = rollout.evaluate(run, state, batches, roller=roller, accuracy=accuracy)
    assert sums["count"] == real
    assert metrics["exact_match"] == 0.5 and metrics["mean_reward"] == 1.0 and metrics["loss"] == -1.0
    np.testing.assert_allclose(metrics["mean_length"], np.mean([len(c) for c in greedy]))
