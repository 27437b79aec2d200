"""data.tool_calls: held-out questions never appear in training, answers are right, the SFT lines are
what `data.sft` reads with the loss on exactly the assistant's turns (tool call and answer), and the
tokenizer writes every number one digit per token."""

import json
import re

import pytest

from agents.calls import parse_tool_calls
from agents.tools import evaluate_arithmetic
from data import sft, tool_calls
from data.chat import render
from data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = tool_calls.ToolCallsConfig(num_train=60, num_eval=20, seed=3)
    return config, tool_calls.prepare(str(tmp_path_factory.mktemp("tool_calls")), config)


def test_questions_are_distinct_held_out_and_correct(prepared):
    config, paths = prepared
    train, held_out = tool_calls.questions(config)
    assert len(train) == 60 and len(held_out) == 20
    assert not {q.expression for q in train} & {q.expression for q in held_out}
    assert len({q.expression for q in train}) == 60
    for q in train + held_out:
        assert evaluate_arithmetic(q.expression) == q.answer and q.expression in q.text
    assert tool_calls.read_held_out(paths["held_out"]) == held_out
    assert tool_calls.questions(config) == (train, held_out)  # a function of the config alone


def test_sft_lines_train_exactly_the_assistant_turns(prepared):
    config, paths = prepared
    train, _ = tool_calls.questions(config)
    tokenizer = load_tokenizer(paths["tokenizer"])
    with open(paths["train"]) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 2 * len(train)
    with_tool = [line for line in lines if line["messages"][0]["role"] == "system"]
    assert len(with_tool) == len(train)
    for line in lines[:20]:
        ids, mask = sft.encode_record(tokenizer, line, "chatml")
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        expected = "".join(m["content"] + "<|im_end|>" for m in line["messages"] if m["role"] == "assistant")
        assert trained == expected
        assistant = [m["content"] for m in line["messages"] if m["role"] == "assistant"]
        answer = tool_calls.parse_answer(assistant[-1])
        if len(assistant) == 2:  # the call parses back into the calculator with the question's expression
            _, calls = parse_tool_calls(assistant[0])
            expression = json.loads(calls[0]["function"]["arguments"])["expression"]
            assert calls[0]["function"]["name"] == "calculator" and evaluate_arithmetic(expression) == answer
            assert f"<tool_response>\n{answer}\n</tool_response>" in line["messages"][-2]["content"]
    # Every digit is a token of its own, wherever a number appears; the tools prompt is one token.
    ids, _ = render(tokenizer, with_tool[0]["messages"], template="chatml")
    pieces = [tokenizer.decode([t]) for t in ids]
    assert pieces.count(tool_calls.tools_prompt_text()) == 1
    assert all(len(p) == 1 for p in pieces if re.search(r"[0-9]", p) and p != tool_calls.tools_prompt_text())
    assert sum(len(p) == 1 and p.isdigit() for p in pieces) >= 4 * 3  # question, call, result, answer


def test_parse_answer():
    assert tool_calls.parse_answer("The answer is -1234.") == -1234
    assert tool_calls.parse_answer("3 + 4 gives 7") == 7
    assert tool_calls.parse_answer("no idea") is None and tool_calls.parse_answer(None) is None
    with pytest.raises(ValueError, match="num_train"):
        tool_calls.ToolCallsConfig(num_train=0)
