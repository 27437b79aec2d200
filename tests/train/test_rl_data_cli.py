"""`python -m train` with RL prompt data or rewards that cannot work: one line `error: ...`
naming the file and line, or the reward function, before any work (the rl objectives' check:
`data.prompts.check_source`, `train.rewards.check`)."""

import json

from tests.cli_output import assert_one_line_error, run_module


def _train(tmp_path, *overrides):
    return run_module("train", "--config=configs/align.py:grpo", f"--workdir={tmp_path / 'run'}",
                      "--config.init_from=run:/nowhere", *(f"--config.{o}" for o in overrides))


def test_prompt_line_without_a_prompt(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"question": "2+2="}) + "\n")
    result = _train(tmp_path, f"data.source=files:{path}")
    assert_one_line_error(result, f"{path}:2: the line has no prompt")
    assert not (tmp_path / "run").exists()


def test_reward_function_that_cannot_be_imported(tmp_path):
    result = _train(tmp_path, "rl.rewards=accuracy,no_such_module_xyz:score", "rl.reward_weights=1,0.5")
    assert_one_line_error(result, "reward function 'no_such_module_xyz:score' (rl.rewards) cannot be imported")
