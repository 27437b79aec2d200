"""GRPO with LoRA under fsdp on 8 simulated devices (rollouts from the sharded policy, the
objective's `batches`, the run's sharded step) gives the updates of the unsharded computation
on one device that differentiates the WHOLE parameter tree (no trainable/frozen split) and
keeps only the adapters' gradients: the same sampled completions token for token, the same
adapters after every step within float32 error, the base untouched."""

import functools

import jax
import numpy as np
import optax

from inference.generate import generate
from models.layers.peft import is_peft_path
from tests.train import rl_helpers as h
from train import rollout
from train import trainable as trainable_lib
from train.objectives import grpo
from train.rewards import RewardSet

G, N, PROMPTS, MINIBATCHES, ROLLOUTS, LR = 2, 6, 8, 2, 2, 1e-2
EPS32 = float(np.finfo(np.float32).eps)


def _config():
    config = h.tiny_config(method="lora", objective="grpo", max_new_tokens=N, batch_size=PROMPTS)
    config.rl.update(num_generations=G, minibatches=MINIBATCHES, temperature=1.0, kl_coef=0.04, loss_type="dapo",
                     clip_eps_high=0.28)
    return config


def _scorer(tokenizer):
    examples = {i: {"prompt": str(i)} for i in range(PROMPTS * ROLLOUTS)}
    return rollout.Scorer(tokenizer, RewardSet(("digits",), (1.0,), (h.digit_reward,)), examples, (h.EOS,))


def _prompt_rows(r):
    rows = h.prompt_rows(PROMPTS, seed=r)
    rows["index"] = rows["index"] + PROMPTS * r
    return rows


def _sharded():
    """The fsdp run's minibatches and its adapters after each step (and the start state on the host)."""
    config = _config()
    run = h.tiny_run(config, "fsdp", objective=lambda model: grpo.make_grpo(config, model, None), lr=LR)
    state = run.init_fn(jax.random.key(config.seed))
    start = jax.device_get(state)
    live = {"state": state}
    batches = run.objective.rollout_batches(run, iter([_prompt_rows(r) for r in range(ROLLOUTS)]),
                                            lambda: live["state"], _scorer(run.tokenizer))
    seen, adapters = [], []
    for _ in range(ROLLOUTS * MINIBATCHES):
        batch, _ = next(batches)
        seen.append(jax.device_get(batch))
        live["state"], _ = run.step_fn(live["state"], batch, jax.random.key(1))
        adapters.append(jax.device_get(live["state"].params))
    return run, start, seen, adapters, jax.device_get(live["state"].frozen)


def _rows(prompts, completions, width):
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, :len(p)], ids[r, len(p):len(p) + len(c)], mask[r, len(p):len(p) + len(c)] = p, c, 1
    return ids, mask


def _unsharded(run, start):
    """The same rollouts and updates on one device, differentiating the whole parameter tree."""
    config, model, objective = run.config, run.model, run.objective
    whole = trainable_lib.combine(start.params, start.frozen)
    reference = whole
    adapters = {p: x for p, x in _flat(whole).items() if is_peft_path(p)}
    tx = h.optimizer(LR)
    opt_state = tx.init(adapters)
    logps = jax.jit(functools.partial(rollout.policy_logps, model))
    scorer = _scorer(run.tokenizer)
    seen, after = [], []
    for r in range(ROLLOUTS):
        rows = _prompt_rows(r)
        prompts = [list(p[:n]) for p, n in zip(rows["prompt_ids"], rows["prompt_len"]) for _ in range(G)]
        completions = generate(model, whole, prompts, max_new_tokens=N, temperature=1.0, stop_tokens=(h.EOS,),
                               rng=rollout.rollout_rng(config.seed, r))
        ids, mask = _rows(prompts, completions, config.data.seq_len)
        plen = np.array([len(p) for p in prompts], np.int32)
        clen = np.array([len(c) for c in completions], np.int32)
        index = np.repeat(rows["index"], G)
        exp = rollout.Experience(ids, mask, plen, clen, index, scorer(ids, plen, clen, index),
                                 logps(whole, ids), logps(reference, ids))
        batch = grpo.experience_batch(exp, num_generations=G, minibatches=MINIBATCHES, scale=True,
                                      leave_one_out=False)
        for m in range(MINIBATCHES):
            mb = jax.tree.map(lambda x, m=m: x[m::MINIBATCHES], batch)
            seen.append(mb)
            totals = {**objective.totals(mb), "micro_batches": 1}
            # The gradient of every parameter, then only the adapters'.
            grads = jax.grad(lambda p, mb=mb, totals=totals: objective.loss(p, mb, None, totals)[0])(whole)
            grads = {p: g for p, g in _flat(grads).items() if is_peft_path(p)}
            updates, opt_state = tx.update(grads, opt_state, adapters)
            adapters = optax.apply_updates(adapters, updates)
            whole = _unflat({**_flat(whole), **adapters})
            after.append(adapters)
    return seen, after


def _flat(tree):
    return {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _unflat(flat):
    out = {}
    for path, x in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = x
    return out


@functools.cache
def _both():
    run, start, seen, adapters, frozen = _sharded()
    return start, seen, adapters, frozen, *_unsharded(run, start)


def test_sharded_lora_rollouts_sample_the_same_completions():
    _, seen, _, _, want_seen, _ = _both()
    for got, want in zip(seen, want_seen):
        np.testing.assert_array_equal(got["ids"], np.asarray(want["ids"]))
        np.testing.assert_array_equal(got["completion_mask"], np.asarray(want["completion_mask"]))
        np.testing.assert_allclose(got["advantages"], np.asarray(want["advantages"]), rtol=1e-5, atol=1e-5)
    assert np.ptp(np.concatenate([s["rewards"] for s in seen])) > 0  # the rewards have spread: real updates


def test_sharded_lora_updates_equal_the_full_parameter_gradient_restricted_to_the_adapters():
    start, _, adapters, frozen, _, want = _both()
    # The base never moves (bit for bit) and only the adapters train.
    assert all(is_peft_path(p) for p in trainable_lib.paths(start.params))
    for x, y in zip(jax.tree.leaves(start.frozen), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(x, y)
    # Both sides sum the same terms in different orders (8 devices vs 1): each gradient carries an
    # absolute rounding of a few eps32 x sqrt(terms) x its largest entries, and an Adam step moves
    # by at most lr x that / (its eps 1e-5) because of it; with lr 1e-2 and gradients of ~1e-2 this
    # bounds the adapters' relative difference by ~1e-4 over the 4 steps (measured: 1.1e-5).
    tolerance = 1e-4
    for step, (got, expected) in enumerate(zip(adapters, want)):
        got = _flat(got)
        assert set(got) == set(expected)
        moved = 0
        for path, value in expected.items():
            value = np.asarray(value, np.float64)
            scale = max(np.linalg.norm(value), 1e-12)
            assert np.linalg.norm(got[path] - value) / scale < tolerance, (step, path)
            moved += not np.array_equal(value, _flat(start.params)[path])
        assert moved >= len(expected) // 2, step  # the updates are not zero
