"""Synthetic tool-calling SFT data: arithmetic questions answered with and without the calculator.

    train, held_out = questions(ToolCallsConfig(num_train=4000, num_eval=200))
    tool_conversation(train[0])    # user -> assistant calls calculator -> tool result -> answer
    direct_conversation(train[0])  # user -> assistant answers at once
    write_jsonl(path, train)       # {"messages": [...]} lines the sft objective reads

A question is `a op b` with op in + - *, a in [10, 10**max_digits), b in [2, 10**(max_digits-1)),
phrased by one of `PHRASES` ("What is 4821 * 37?"). Each training question appears in both modes:
with the calculator offered (`agents.calls.with_tools`, the system prompt listing the tool), the
assistant writes `<tool_call>{"name": "calculator", "arguments": {"expression": "4821 * 37"}}
</tool_call>`, reads the result and answers "The answer is 178377."; without tools it answers
directly. So one model trained on both can be measured both ways on the same held-out questions
(`benchmarks/agent.py`). The lines are already plain {role, content} messages (the tool turns
rendered by `agents.calls`), so `data.sft` reads them as any chat JSONL (`data.source=files:...`).

The held-out questions are the first `num_eval` distinct ones of a stream seeded by (seed, 1); the
training questions come from the stream seeded by (seed, 0) minus the held-out ones.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Sequence

from agents import calls
from agents.tools import calculator

OPERATORS = ("+", "-", "*")
PHRASES = ("What is {e}?", "Compute {e}.", "How much is {e}?", "Calculate {e}, please.", "{e} = ?")
_ANSWER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class ToolCallsConfig:
    """Attributes:
      num_train, num_eval: distinct training / held-out questions.
      max_digits: the first operand has 2..max_digits digits, the second 1..max_digits-1.
      seed: the streams' seed.
    """

    num_train: int = 4000
    num_eval: int = 200
    max_digits: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.num_train < 1 or self.num_eval < 1:
            raise ValueError(f"num_train={self.num_train} and num_eval={self.num_eval} must be >= 1")
        if self.max_digits < 2:
            raise ValueError(f"max_digits={self.max_digits}; expected >= 2")


@dataclasses.dataclass(frozen=True)
class Question:
    text: str  # what the user asks
    expression: str  # what the calculator is called with
    answer: int


def _draw(rng: random.Random, config: ToolCallsConfig) -> Question:
    a = rng.randrange(10, 10 ** config.max_digits)
    b = rng.randrange(2, 10 ** (config.max_digits - 1))
    op = rng.choice(OPERATORS)
    expression = f"{a} {op} {b}"
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Question(rng.choice(PHRASES).format(e=expression), expression, answer)


def _distinct(rng: random.Random, config: ToolCallsConfig, count: int, exclude: set[str]) -> list[Question]:
    out, seen = [], set(exclude)
    for _ in range(count * 100):
        q = _draw(rng, config)
        if q.expression not in seen:
            seen.add(q.expression)
            out.append(q)
            if len(out) == count:
                return out
    raise ValueError(f"could not draw {count} distinct questions with max_digits={config.max_digits}; raise it")


def questions(config: ToolCallsConfig) -> tuple[list[Question], list[Question]]:
    """(train, held_out): distinct questions, no expression in both."""
    held_out = _distinct(random.Random(f"{config.seed}-1"), config, config.num_eval, set())
    train = _distinct(random.Random(f"{config.seed}-0"), config, config.num_train, {q.expression for q in held_out})
    return train, held_out


def calculator_tools() -> list[dict]:
    """The OpenAI `tools` the tool conversations offer: the calculator alone."""
    return [calculator().openai()]


def answer_text(value: int | str) -> str:
    return f"The answer is {value}."


def tool_conversation(question: Question) -> list[dict]:
    """The OpenAI-format conversation in which the assistant uses the calculator."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": question.expression})}}
    return [{"role": "user", "content": question.text},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": str(question.answer)},
            {"role": "assistant", "content": answer_text(question.answer)}]


def direct_conversation(question: Question) -> list[dict]:
    """The conversation in which the assistant answers without tools."""
    return [{"role": "user", "content": question.text}, {"role": "assistant", "content": answer_text(question.answer)}]


def records(train: Sequence[Question], *, seed: int = 0) -> list[dict]:
    """SFT lines: each question with the calculator and directly, as plain messages, shuffled."""
    tools = calculator_tools()
    lines = [{"messages": calls.with_tools(tool_conversation(q), tools)} for q in train]
    lines += [{"messages": calls.with_tools(direct_conversation(q), None)} for q in train]
    random.Random(seed).shuffle(lines)
    return lines


def write_jsonl(path: str, train: Sequence[Question], *, seed: int = 0) -> str:
    """Writes `records(train)` to `path`, one JSON object a line; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in records(train, seed=seed))
    return path


def tools_prompt_text() -> str:
    """The system prompt of every tool conversation (`agents.calls.with_tools` with the calculator)."""
    return calls.with_tools([{"role": "user", "content": ""}], calculator_tools())[0]["content"]


def train_tokenizer(lines: Sequence[dict], directory: str, *, vocab_size: int = 512, sample: int = 400):
    """A byte-level BPE for this data, saved in `directory`.

    Trained on `sample` rendered conversations with their digits removed, so no merge holds a
    digit and every number is written one digit per token wherever it appears (question, call,
    result, answer): copying a number is a token-by-token copy. ChatML's markers are special
    tokens, and so is the whole tools system prompt (`tools_prompt_text`, ~215 BPE tokens): the
    text the model reads is unchanged, but each tool conversation costs ~90 tokens instead of
    ~300. A system prompt listing other tools is tokenized as ordinary text (this model has never
    seen one).

    Returns:
      The tokenizer (`data.tokenizer.load_tokenizer(directory)` loads it again).
    """
    from data.chat import BUILTIN_SPECIAL_TOKENS, render_text
    from data.tokenizer import training

    texts = [re.sub(r"[0-9]", "", render_text(None, line["messages"], template="chatml")[0]) for line in lines[:sample]]
    special = ("<|endoftext|>", *BUILTIN_SPECIAL_TOKENS["chatml"], tools_prompt_text())
    return training.train_tokenizer(texts, vocab_size, special, trainer="tokenizers", directory=directory)


def prepare(directory: str, config: ToolCallsConfig = ToolCallsConfig()) -> dict[str, str]:
    """Writes what the recipe trains and measures on under `directory`: train.jsonl (SFT lines),
    held_out.jsonl ({"question", "expression", "answer"} a line) and tokenizer/.

    Returns:
      {"train": path, "held_out": path, "tokenizer": directory}.
    """
    import os

    os.makedirs(directory, exist_ok=True)
    train, held_out = questions(config)
    paths = {"train": os.path.join(directory, "train.jsonl"), "held_out": os.path.join(directory, "held_out.jsonl"),
             "tokenizer": os.path.join(directory, "tokenizer")}
    write_jsonl(paths["train"], train, seed=config.seed)
    with open(paths["held_out"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dataclasses.asdict(q)) + "\n" for q in held_out)
    train_tokenizer(records(train[:200], seed=config.seed), paths["tokenizer"])
    return paths


def read_held_out(path: str) -> list[Question]:
    """The questions `prepare` wrote to held_out.jsonl."""
    with open(path, encoding="utf-8") as f:
        return [Question(**json.loads(line)) for line in f if line.strip()]


def parse_answer(text: str) -> int | None:
    """The last integer in an answer, or None."""
    found = _ANSWER.findall(text or "")
    return int(found[-1]) if found else None
