"""evals/lm_requests.py: lm-eval's request conventions, checked against lm-eval's own functions
(rolling windows, generation kwargs, stop strings) on the same inputs."""

import random

import pytest
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from evals.lm_requests import DEFAULT_MAX_GEN_TOKS, cut_at_stops, gen_settings, rolling_windows, scored_row, stopped


@pytest.mark.parametrize("max_length", [1, 2, 5, 16])
def test_rolling_windows_equal_lm_evals(max_length):
    rng = random.Random(max_length)
    for length in [0, 1, max_length - 1, max_length, max_length + 1, 2 * max_length, 3 * max_length + 2, 37]:
        ids = [rng.randrange(3, 100) for _ in range(length)]
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 1, max_length, 1)]
        ours = rolling_windows(ids, 1, max_length)
        assert ours == [(list(a), list(b)) for a, b in theirs], (max_length, length)
        # Every token predicted once, in order; each row fits max_length inputs.
        assert [t for _, b in ours for t in b] == ids
        assert all(len(a) + len(b) - 1 <= max_length for a, b in ours)


def test_scored_row_truncates_from_the_left():
    inputs, targets = scored_row([1, 2, 3, 4, 5], [6, 7], max_length=4)
    assert inputs == [3, 4, 5, 6] and targets == [4, 5, 6, 7]
    inputs, targets = scored_row([1], [2, 3], max_length=8)
    assert inputs == [1, 2] and targets == [2, 3]


@pytest.mark.parametrize("kwargs", [
    {},
    {"until": "\n"},
    {"until": ["Q:", "\n\n"], "max_gen_toks": 7},
    {"max_new_tokens": 9, "temperature": 0.0},
    {"max_tokens": 3, "max_completion_tokens": 5},
    {"do_sample": False, "temperature": 0.7},
    {"temperature": 0.5},
    {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "until": ["<|endoftext|>"]},
])
def test_gen_settings_normalize_as_lm_eval(kwargs):
    theirs = normalize_gen_kwargs(kwargs, DEFAULT_MAX_GEN_TOKS)
    until = handle_stop_sequences(theirs.get("until"), eos="<|endoftext|>")
    ours = gen_settings(kwargs, "<|endoftext|>", "request 0")
    assert list(ours.until) == until
    assert ours.max_gen_toks == theirs["max_gen_toks"]
    assert ours.sampling.temperature == theirs.get("temperature", 0.0)  # absent: HFLM generates at 0.0
    assert ours.sampling.greedy == (not theirs["do_sample"])


@pytest.mark.parametrize("text", ["a\n\nQ: b", "Q:", "", "no stop here", "x<|endoftext|>y\nz", "ab\nQ:\n"])
def test_cut_at_stops_equals_lm_evals(text):
    until = ["\n", "Q:", "", "<|endoftext|>"]
    assert cut_at_stops(text, until) == postprocess_generated_text(text, until, None)
    # Once a row has a stop string, what it generates next is cut away; before, nothing is.
    if stopped(text, until):
        assert cut_at_stops(text + " more\nQ: text", until) == cut_at_stops(text, until)
    else:
        assert cut_at_stops(text, until) == text


@pytest.mark.parametrize("kwargs, message", [
    ("greedy", "must be a dict"),
    ({"untill": ["\n"]}, "unknown generation kwarg 'untill'"),
    ({"until": [1]}, "until must be a string or a list of strings"),
    ({"max_gen_toks": 0}, "max_gen_toks must be a positive integer"),
    ({"temperature": -1}, "temperature must be a number >= 0"),
    ({"do_sample": True}, "do_sample=True needs a temperature > 0"),
    ({"temperature": 1.0, "top_p": 2.0}, "top_p=2.0 must be in"),
])
def test_bad_generation_kwargs_are_named_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match="request 3: ") as e:
        gen_settings(kwargs, None, "request 3")
    assert message in str(e.value) and "\n" not in str(e.value)
