"""A dense reward for the PPO learning tests (`rl.rewards=tests.train.ppo_rewards:ascii_fraction`):
a random byte-level policy starts near 0.5, so its rise is measurable in a few rollouts."""


def ascii_fraction(prompts, completions, **fields):
    """The share of each completion's characters that are printable ASCII (0 for an empty one)."""
    del prompts, fields
    return [sum(" " <= ch <= "~" for ch in c) / len(c) if c else 0.0 for c in completions]
