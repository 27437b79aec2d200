"""train.rewards: open-r1's format regex, accuracy through the verifiers, weighted sums with
TRL's None, user functions by import path and their one-line errors."""

import re
import sys
import textwrap

import numpy as np
import pytest

from configs import base
from train import rewards

R1 = "<think>\n12 + 34 = 46\n</think>\n<answer>\n46\n</answer>"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(prompts, completions, **fields):
            return [float(len(c)) for c in completions]
        def echo_difficulty(prompts, completions, difficulty, **fields):
            return [None if d is None else float(d) for d in difficulty]
        def short(prompts, completions, **fields):
            return [1.0]
        def strings(prompts, completions, **fields):
            return ["1"] * len(completions)
        def array2d(prompts, completions, **fields):
            import numpy as np
            return np.zeros((len(completions), 2))
        def infinite(prompts, completions, **fields):
            return [float("inf")] * len(completions)
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def _config(names, weights=""):
    c = base.get_config()
    c.rl.rewards, c.rl.reward_weights = names, weights
    return c


def test_format_reward_is_open_r1s_regex():
    assert rewards.FORMAT_PATTERN == r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"
    good = [R1, "<think>\n\n</think>\n<answer>\nx\n</answer>", "<think>\nline 1\nline 2\n</think>\n<answer>\n7\n</answer>"]
    bad = ["<think>12</think><answer>46</answer>", "46", "<answer>\n46\n</answer>", " " + R1,
           "<think>\nx\n</think>\n<answer>\n46</answer>"]
    assert rewards.format_reward(None, good + bad) == [1.0] * len(good) + [0.0] * len(bad)
    # the same as re.match with the flags open-r1 uses
    for text in good + bad:
        assert bool(re.match(rewards.FORMAT_PATTERN, text, re.DOTALL | re.MULTILINE)) == (text in good)


def test_extract_answer():
    assert rewards.extract_answer(R1) == "46"
    assert rewards.extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert rewards.extract_answer("  46\n") == "46"
    assert rewards.extract_answer("<answer>unclosed 5") == "<answer>unclosed 5"


def test_accuracy_reward_uses_the_tasks_verifier():
    completions = ["46", R1, "47", "<answer>\n3 5 9\n</answer>", "3, 5, 9", "0.5", "1/3"]
    answers = ["46", "46", "46", "3 5 9", "3 5 9", "1/2", None]
    tasks = ["addition", "addition", "addition", "sorting", "sorting", "math/arithmetic__div", ""]
    got = rewards.accuracy_reward(None, completions, answer=answers, task=tasks)
    assert got == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, None]


def test_weighted_sum_and_parts(user_module):
    c = _config(f"accuracy,format,{user_module}:length,{user_module}:echo_difficulty", "1,0.5,0.01,2")
    reward_set = rewards.build(c)
    completions = [R1, "46", "x"]
    fields = {"answer": ["46", "46", "46"], "task": ["addition"] * 3, "difficulty": [1, None, 3]}
    total, parts = reward_set(["p"] * 3, completions, fields)
    lengths = np.array([len(x) for x in completions], np.float64)
    expected = np.array([1, 1, 0]) + 0.5 * np.array([1, 0, 0]) + 0.01 * lengths + 2 * np.array([1, 0, 3])
    assert total.dtype == np.float32
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert np.isnan(parts[f"{user_module}:echo_difficulty"][1]) and parts["format"].tolist() == [1, 0, 0]


def test_weights_default_to_one():
    total, _ = rewards.build(_config("accuracy,format"))(["p"], [R1], {"answer": ["46"], "task": ["addition"]})
    assert total.tolist() == [2.0]


@pytest.mark.parametrize(("function", "fragment"), [
    ("short", "returned 1 values for 2 completions"),
    ("strings", "returned '1' (a str) for completion 0"),
    ("array2d", "returned ndarray of shape (2, 2)"),
    ("infinite", "returned inf (a float) for completion 0"),
])
def test_bad_results_name_the_function(user_module, function, fragment):
    reward_set = rewards.build(_config(f"{user_module}:{function}"))
    with pytest.raises(rewards.RewardError) as e:
        reward_set(["p", "q"], ["a", "b"], {})
    assert f"'{user_module}:{function}'" in str(e.value) and fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("names", "weights", "fragment"), [
    ("no_such_module_xyz:fn", "", "'no_such_module_xyz:fn' (rl.rewards) cannot be imported: No module named"),
    ("{m}:missing", "", "'{m}:missing' (rl.rewards) cannot be imported: {m} has no attribute 'missing'"),
    ("{m}:NOT_A_FUNCTION", "", "is not callable (type int)"),
    ("acuracy", "", "reward 'acuracy' in rl.rewards is neither built in"),
    ("accuracy,format", "1", "gives 1 weights for the 2 rewards"),
    ("accuracy", "one", "must be comma-separated numbers"),
    ("", "", "`rl.rewards` is empty"),
    ("model", "", "`rl.reward_model` is empty"),
])
def test_bad_reward_config_fails_in_one_line(user_module, names, weights, fragment):
    with pytest.raises(rewards.RewardError) as e:
        rewards.check(_config(names.format(m=user_module), weights))
    assert fragment.format(m=user_module) in str(e.value) and "\n" not in str(e.value)


def test_model_reward_is_the_scorer_the_objective_gives():
    c = _config("model,accuracy", "0.5,1")
    c.rl.reward_model = "run:/rm"
    with pytest.raises(ValueError, match="/rm"):  # no such reward model: one line naming it
        rewards.build(c)
    scorer = lambda prompts, completions, **fields: [float(len(p)) for p in prompts]
    total, _ = rewards.build(c, model_reward=scorer)(["ab", "abcd"], ["1", "2"], {"answer": ["1", "3"]})
    assert total.tolist() == [2.0, 2.0]


def test_reward_model_reward_scores_the_rows_the_reward_data_renders():
    from types import SimpleNamespace

    from data import preference
    from data.tokenizer import ByteLevelBPE

    tok = ByteLevelBPE([bytes([b]) for b in range(256)], [], ("<|endoftext|>",))
    seen = []

    def score(ids, lengths):  # a stand-in scorer: records the rows it is given
        seen.extend(row[:n].tolist() for row, n in zip(ids, lengths, strict=True))
        return np.asarray(lengths, np.float32)

    rm = SimpleNamespace(tokenizer=tok, options=preference.PreferenceConfig(), model=SimpleNamespace(
        config=SimpleNamespace(max_len=32)), score=score)
    got = rewards.reward_model_reward(rm)(["12+34=", "1+1="], ["46", ""], answer=["46", "2"])
    eos = tok.eos_id
    assert seen == [[eos, *b"12+34=46", eos], [eos, *b"1+1=", eos]]  # [bos] prompt completion [eos]
    assert got == [10.0, 6.0]
