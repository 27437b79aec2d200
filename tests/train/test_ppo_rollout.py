"""PPO's rollout updates on 8 simulated devices: one rollout's rl.epochs x rl.minibatches
optimizer steps under fsdp (params and rows split over 8 devices) equal the same steps on
one device, for the shared value head (full fine-tuning) and the separate value model (LoRA:
only the adapters and the value head train); the boundary falls on the rollout's last
minibatch; the experience the loss reads is well formed."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.policy_value import policy_model
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from tests.train import rl_helpers as h
from train import build, rollout
from train import program as program_lib
from train import reference as reference_lib
from train import trainable as trainable_lib
from train.objectives import ppo
from train.optimizer import make_optimizer
from train.rewards import RewardSet

PROMPTS, N, LR = 16, 6, 1e-2


def _tiny_run(config, devices: int):
    """`rl_helpers.tiny_run` under fsdp on the first `devices` devices (1: unsharded)."""
    model = build.model(config, h.VOCAB)
    tx = make_optimizer(learning_rate=LR, eps=1e-5)
    mesh = mesh_lib.make_mesh(f"fsdp={devices}", jax.devices()[:devices])
    program = program_lib.build_for_run(config, model, tx, lambda step: LR, strategy=get_strategy("fsdp"), mesh=mesh)
    return types.SimpleNamespace(config=config, model=model, layout=program.layout, init_fn=program.init,
                                 step_fn=program.step, tokenizer=h.Tokenizer(), is_lead=True)


def _even_share(prompts, completions, **fields):
    """The share of even token ids in the completion: a dense reward for a random policy."""
    return [np.mean([int(t) % 2 == 0 for t in c.split()]) if c.split() else 0.0 for c in completions]


def _one_rollout(devices, value_head, method):
    """(first minibatch's ids, boundaries, metrics of each step, final trainable params on the host)."""
    config = h.tiny_config(seq_len=16, batch_size=PROMPTS, method=method, objective="ppo", max_new_tokens=N)
    config.rl.update(value_head=value_head, epochs=2, minibatches=2, kl_coef=0.05, kl_target=0.5, kl_horizon=100,
                     num_generations=1, temperature=1.0)
    run = _tiny_run(config, devices)
    objective = ppo.make(config, run.model, None)
    examples = {i: {"prompt": ""} for i in range(PROMPTS)}
    scorer = rollout.Scorer(run.tokenizer, RewardSet(("even",), (1.0,), (_even_share,)), examples, (h.EOS,))
    roller = rollout.Roller(ppo._with_model(run, policy_model(run.model)),
                            rollout.settings(config, run.tokenizer, num_generations=1), scorer)
    live = {"state": run.init_fn(jax.random.key(0))}
    initial = jax.device_get(live["state"].params)
    prompts = ppo.KLStateIterator(iter([h.prompt_rows(PROMPTS, width=16 - N)]), config.rl.kl_coef)
    batches = objective.rollout_batches(run, prompts, lambda: live["state"], roller=roller,
                                        reference=reference_lib.build(run))
    first_ids, boundaries, metrics = None, [], []
    for _ in range(4):
        batch, boundary = next(batches)
        first_ids = np.asarray(batch["ids"]) if first_ids is None else first_ids
        boundaries.append(boundary)
        live["state"], m = run.step_fn(live["state"], batch, jax.random.key(1))
        metrics.append({k: float(v) for k, v in m.items()})
    return first_ids, boundaries, metrics, initial, jax.device_get(live["state"].params), prompts.kl_coef


@pytest.mark.parametrize("value_head,method", [("shared", "full"), ("separate", "lora")])
def test_fsdp_rollout_updates_equal_one_device(value_head, method):
    ids_1, bounds_1, metrics_1, initial, params_1, kl_1 = _one_rollout(1, value_head, method)
    ids_8, bounds_8, metrics_8, _, params_8, kl_8 = _one_rollout(8, value_head, method)
    assert bounds_1 == bounds_8 == [False, False, False, True]
    np.testing.assert_array_equal(ids_1, ids_8)  # the same completions were sampled
    paths = trainable_lib.paths(params_1)
    if method == "lora":  # only the adapters and the value head train
        assert all("lora" in p or p.endswith("score") for p in paths), paths
        assert "value_model/score" in paths
    else:
        assert "score" in paths
    for key in ("loss", "policy_loss", "value_loss", "entropy", "kl", "reward", "explained_variance"):
        for a, b in zip(metrics_1, metrics_8):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    # The adaptive coefficient moved (the same way on both layouts).
    assert kl_1 != 0.05 and kl_1 == pytest.approx(kl_8, rel=1e-5)
    # Four Adam steps move each parameter by at most 4 x lr; the layouts agree far closer than that.
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(initial)))
    apart = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)))
    print(f"moved {moved:.3g}, fsdp vs one device {apart:.3g}")
    assert moved > 0.1 * LR and apart <= 1e-3 * 4 * LR
    # Rollout-level figures: rows of one rollout share them, and the completions are PPO's rows.
    assert metrics_1[0]["explained_variance"] == metrics_1[1]["explained_variance"]
    assert 0 < metrics_1[0]["completion_length"] <= N


def test_experience_of_a_rollout_is_well_formed():
    config = h.tiny_config(seq_len=16, batch_size=8, objective="ppo", max_new_tokens=N)
    config.rl.update(num_generations=1, temperature=1.0, whiten_rewards=True)
    run = h.tiny_run(config, "dp")
    objective = ppo.make(config, run.model, None)
    examples = {i: {"prompt": ""} for i in range(8)}
    scorer = rollout.Scorer(run.tokenizer, RewardSet(("even",), (1.0,), (_even_share,)), examples, (h.EOS,))
    roller = rollout.Roller(ppo._with_model(run, policy_model(run.model)),
                            rollout.settings(config, run.tokenizer, num_generations=1), scorer)
    state = run.init_fn(jax.random.key(0))
    exp = roller.rollout(state, h.prompt_rows(8, width=16 - N), rollout.rollout_rng(0, 0),
                         reference_lib.build(run), old_logps=True)
    batch, kl_mean = objective.experience_fn(run.layout)(state.params, state.frozen, exp.ids, exp.completion_mask,
                                                         exp.ref_logps, exp.rewards, jnp.float32(0.05))
    mask = np.asarray(batch["completion_mask"])
    # The sampling policy's log-probs: the roller's own pass agrees with the experience's.
    np.testing.assert_allclose(np.asarray(batch["old_logps"]), np.asarray(exp.old_logps) * mask, atol=1e-5)
    # The reference is the policy at init: KL 0 before any update.
    assert abs(float(kl_mean)) < 1e-5
    adv = np.asarray(batch["advantages"])[mask > 0]
    assert abs(adv.mean()) < 1e-5 and abs(adv.std(ddof=1) - 1) < 1e-3
    for key in ("advantages", "returns", "old_values", "old_logps"):
        assert not np.asarray(batch[key])[mask == 0].any(), key
    np.testing.assert_array_equal(np.asarray(batch["reward"]), np.asarray(exp.rewards))
