"""Learning check: grpo and rloo, from a random tiny LLaMA on 8 devices (dp), raise the reward of a
rule the policy can learn in a few rollouts (emit token 7) from its chance level (~1/64) to most
of the completion."""

import itertools

import jax
import numpy as np
import pytest

from tests.train import rl_helpers as h
from train import rollout
from train.objectives import OBJECTIVES
from train.rewards import RewardSet

TARGET, PROMPTS, ROLLOUTS, MINIBATCHES = 7, 8, 12, 2


def _target_share(prompts, completions, **fields):
    """The share of a completion's tokens that are TARGET (the stand-in tokenizer spells ids)."""
    return [sum(t == str(TARGET) for t in c.split()) / max(len(c.split()), 1) for c in completions]


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_rollouts_learn_a_rewarded_token(name):
    config = h.tiny_config(objective=name, max_new_tokens=6, batch_size=PROMPTS)
    config.rl.update(num_generations=4, minibatches=MINIBATCHES, temperature=1.0, kl_coef=0.0)
    run = h.tiny_run(config, "dp", objective=lambda model: OBJECTIVES[name](config, model, None), lr=3e-2)
    live = {"state": run.init_fn(jax.random.key(0))}
    scorer = rollout.Scorer(run.tokenizer, RewardSet(("target",), (1.0,), (_target_share,)),
                            {i: {"prompt": ""} for i in range(PROMPTS)}, (h.EOS,))
    batches = run.objective.rollout_batches(run, itertools.repeat(h.prompt_rows(PROMPTS)), lambda: live["state"],
                                            scorer)
    rewards = []  # each rollout's mean reward (its minibatches' metrics)
    for _ in range(ROLLOUTS):
        per_step = []
        for _ in range(MINIBATCHES):
            batch, _ = next(batches)
            live["state"], metrics = run.step_fn(live["state"], batch, jax.random.key(1))
            per_step.append(float(metrics["reward"]))
        rewards.append(np.mean(per_step))
    assert rewards[0] < 0.1 and np.mean(rewards[-2:]) > 0.5, rewards
