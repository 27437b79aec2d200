"""Verifiable tasks: generated problems whose answers a program checks exactly.

    train, held_out = generate("addition", TaskConfig(digits=2))
    train[0]  # Problem(prompt='31+86=', answer='117', completion='117', task='addition')
    verify("addition", "117", train[0].answer)  # True

Tasks (`TASKS`; `data.source=task:NAME`):
  * `addition`, `multiplication`: two operands drawn uniformly from [0, 10**digits):
    `12+34=` -> `46`, `12*34=` -> `408`. Verified as integers (`046` == `46`).
  * `sorting`: `list_len` numbers drawn uniformly from [0, max_value): `sort 5 3 9=` ->
    `3 5 9`. Verified as the list of integers (commas or spaces between them).
  * `math/arithmetic__MODULE`: DeepMind's `mathematics_dataset` arithmetic modules
    (`MATH_MODULES`: add_or_sub, add_sub_multiple, add_or_sub_in_base, mul, div,
    mul_div_multiple, mixed, nearest_integer_root, simplify_surd), generated locally at
    `math_difficulty` easy | medium | hard (the package's train-easy/-medium/-hard entropy
    thirds) or all (its whole train range), with its length limits (question <= 160,
    answer <= 30 characters). Verified as numbers when both sides parse as a decimal or a
    fraction (`-5/18`, `0.5` == `1/2`), else as text with the spaces removed (surds,
    numbers in other bases).

Splits: the held-out problems are the first `num_eval` distinct ones of a stream seeded by
(task, `seed`, 1); the training problems the first `num_train` distinct ones of a stream seeded
by (task, `seed`, 0) that are not held out, so the splits never share a prompt and each is a
function of the config alone (every process generates the same ones). A task with fewer
distinct problems than asked for fails with one line naming the keys.

Formats (`format`): `answer` (the completion is the answer alone), or `tags` (DeepSeek-R1's:
the prompt asks for the reasoning in <think> tags and the answer in <answer> tags, and the
completion is `<think>\\n{working}\\n</think>\\n<answer>\\n{answer}\\n</answer>`, the layout
of open-r1's format reward, `train.rewards.format_reward`).

`mathematics_dataset` 1.0.1 imports `sympy.solvers.diophantine.base_solution_linear`, which
sympy >= 1.7 moved to `sympy.solvers.diophantine.diophantine`; `_import_math_modules`
aliases it back before the import (the function is the same; nothing else of sympy is touched).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import importlib
import random
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

MATH_PREFIX = "math/arithmetic__"
MATH_MODULES = ("add_or_sub", "add_sub_multiple", "add_or_sub_in_base", "mul", "div", "mul_div_multiple", "mixed",
                "nearest_integer_root", "simplify_surd")
MATH_DIFFICULTIES = {"easy": (0, 3), "medium": (1, 3), "hard": (2, 3), "all": (0, 1)}  # (level, levels)
MATH_MAX_QUESTION, MATH_MAX_ANSWER = 160, 30  # mathematics_dataset.generate_settings
FORMATS = ("answer", "tags")
TAGS_INSTRUCTION = ("\nThink in <think> </think> tags, then give the final answer in <answer> </answer> tags.")
_MAX_DRAWS = 50  # draws per problem wanted before a task counts as too small for the split sizes


class Problem(NamedTuple):
    """One problem: the prompt text, the answer the verifier compares with, a reference
    completion (for SFT data) and the task's name."""

    prompt: str
    answer: str
    completion: str
    task: str


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What a task generates (the `verifiable.*` keys).

    Attributes:
      num_train, num_eval: problems in the training and held-out splits.
      seed: the seed of both splits (see the module docstring).
      digits: addition and multiplication operands lie in [0, 10**digits).
      list_len, max_value: sorting's list length and the bound of its numbers.
      math_difficulty: easy | medium | hard | all (mathematics_dataset's train entropy range).
      format: answer | tags (see the module docstring).
    """

    num_train: int = 2000
    num_eval: int = 200
    seed: int = 0
    digits: int = 2
    list_len: int = 5
    max_value: int = 100
    math_difficulty: str = "easy"
    format: str = "answer"

    def __post_init__(self):
        for key, least in (("num_train", 1), ("num_eval", 1), ("digits", 1), ("list_len", 1), ("max_value", 1)):
            if getattr(self, key) < least:
                raise ValueError(f"config key `verifiable.{key}`={getattr(self, key)} must be >= {least}")
        if self.math_difficulty not in MATH_DIFFICULTIES:
            raise ValueError(f"config key `verifiable.math_difficulty`={self.math_difficulty!r}; expected one of "
                             f"{tuple(MATH_DIFFICULTIES)}")
        if self.format not in FORMATS:
            raise ValueError(f"config key `verifiable.format`={self.format!r}; expected one of {FORMATS}")


# ---- verifiers: (response, answer) -> bool ----

_INT = re.compile(r"[+-]?\d+")


def _parse_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if _INT.fullmatch(text) else None


def verify_integer(response: str, answer: str) -> bool:
    """The response is an integer literal equal to the answer."""
    value = _parse_int(response)
    return value is not None and value == _parse_int(answer)


def verify_integer_list(response: str, answer: str) -> bool:
    """The response is the answer's list of integers (separated by commas and/or spaces)."""

    def parse(text):
        items = [x for x in re.split(r"[\s,]+", text.strip()) if x]
        values = [_parse_int(x) for x in items]
        return None if not items or None in values else values

    got = parse(response)
    return got is not None and got == parse(answer)


def _number(text: str) -> fractions.Fraction | None:
    try:
        return fractions.Fraction(text.strip())  # "-5/18", "0.5", "3"
    except (ValueError, ZeroDivisionError):
        return None


def verify_expression(response: str, answer: str) -> bool:
    """Equal numbers when both parse as decimals or fractions, else equal text without spaces."""
    got, want = _number(response), _number(answer)
    if got is not None and want is not None:
        return got == want
    return bool(response.strip()) and re.sub(r"\s+", "", response) == re.sub(r"\s+", "", answer)


# ---- generators: rng -> (prompt, answer, working) ----

def _operands(rng: random.Random, digits: int) -> tuple[int, int]:
    return rng.randrange(10 ** digits), rng.randrange(10 ** digits)


def _addition(rng: random.Random, config: TaskConfig) -> tuple[str, str, str]:
    a, b = _operands(rng, config.digits)
    return f"{a}+{b}=", str(a + b), f"{a} + {b} = {a + b}"


def _multiplication(rng: random.Random, config: TaskConfig) -> tuple[str, str, str]:
    a, b = _operands(rng, config.digits)
    return f"{a}*{b}=", str(a * b), f"{a} * {b} = {a * b}"


def _sorting(rng: random.Random, config: TaskConfig) -> tuple[str, str, str]:
    values = [rng.randrange(config.max_value) for _ in range(config.list_len)]
    ordered = " ".join(map(str, sorted(values)))
    return f"sort {' '.join(map(str, values))}=", ordered, f"ascending: {ordered}"


def _import_math_modules():
    """mathematics_dataset's arithmetic modules, with the sympy alias it needs (module docstring)."""
    package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(package, "base_solution_linear"):
        package.base_solution_linear = importlib.import_module(
            "sympy.solvers.diophantine.diophantine").base_solution_linear
    return importlib.import_module("mathematics_dataset.modules.arithmetic")


def _math_sampler(module: str, difficulty: str) -> Callable[[], tuple[str, str]]:
    """A sampler of (question, answer) of one arithmetic module (drawing from the global
    `random` and `np.random` states, as the package does)."""
    level, levels = MATH_DIFFICULTIES[difficulty]

    def entropy(range_):  # mathematics_dataset.generate._make_entropy_fn
        low, high = range_
        return low + level / levels * (high - low), low + (level + 1) / levels * (high - low)

    make = _import_math_modules().train(entropy)[module]

    def sample():
        while True:  # mathematics_dataset.generate.sample_from_module's length limits
            problem = make()
            question, answer = str(problem.question), str(problem.answer)
            if len(question) <= MATH_MAX_QUESTION and len(answer) <= MATH_MAX_ANSWER:
                return question, answer

    return sample


class _Task(NamedTuple):
    generate: Callable[[random.Random, TaskConfig], tuple[str, str, str]] | None
    verify: Callable[[str, str], bool]
    size: Callable[[TaskConfig], float]  # how many distinct problems there are (inf: unbounded)


TASKS = {
    "addition": _Task(_addition, verify_integer, lambda c: 100.0 ** c.digits),
    "multiplication": _Task(_multiplication, verify_integer, lambda c: 100.0 ** c.digits),
    "sorting": _Task(_sorting, verify_integer_list, lambda c: float(c.max_value) ** c.list_len),
    **{MATH_PREFIX + m: _Task(None, verify_expression, lambda c: float("inf")) for m in MATH_MODULES},
}


def check_name(name: str) -> None:
    """Raises ValueError (one line) if `name` is not a task."""
    if name not in TASKS:
        raise ValueError(f"unknown verifiable task {name!r}; expected one of {', '.join(TASKS)}")


def verifier(name: str) -> Callable[[str, str], bool]:
    """The task's exact verifier `(response, answer) -> bool`; an unknown or empty name gets
    `verify_expression` (numbers, else text without spaces)."""
    return TASKS[name].verify if name in TASKS else verify_expression


def verify(name: str, response: str, answer: str) -> bool:
    """Whether `response` (the extracted answer text) is correct for the problem's `answer`."""
    return verifier(name)(response, answer)


def _stream(name: str, config: TaskConfig, split: int) -> Callable[[], tuple[str, str, str]]:
    """Draws (prompt, answer, working) of the split's seeded stream."""
    rng = random.Random(f"{name}/{config.seed}/{split}")  # string seeds hash deterministically (sha512)
    task = TASKS[name]
    if task.generate is not None:
        return lambda: task.generate(rng, config)
    sample = _math_sampler(name[len(MATH_PREFIX):], config.math_difficulty)
    state = {"py": random.Random(rng.getrandbits(64)).getstate(),
             "np": np.random.RandomState(rng.getrandbits(32)).get_state()}

    def draw():
        # The package draws from the global generators: swap this stream's states in and out.
        saved_py, saved_np = random.getstate(), np.random.get_state()
        random.setstate(state["py"])
        np.random.set_state(state["np"])
        try:
            question, answer = sample()
        finally:
            state["py"], state["np"] = random.getstate(), np.random.get_state()
            random.setstate(saved_py)
            np.random.set_state(saved_np)
        return question, answer, f"{question} {answer}"

    return draw


def _distinct(draw: Callable, count: int, exclude: set[str], what: str) -> list[tuple[str, str, str]]:
    out, seen = [], set(exclude)
    for _ in range(_MAX_DRAWS * count):
        problem = draw()
        if problem[0] not in seen:
            seen.add(problem[0])
            out.append(problem)
            if len(out) == count:
                return out
    raise ValueError(f"{what}: found only {len(out)} distinct problems in {_MAX_DRAWS * count} draws; lower "
                     "verifiable.num_train / verifiable.num_eval or make the task larger (verifiable.digits, "
                     "list_len, max_value)")


def _problem(name: str, config: TaskConfig, prompt: str, answer: str, working: str) -> Problem:
    if config.format == "answer":
        return Problem(prompt, answer, answer, name)
    return Problem(prompt + TAGS_INSTRUCTION, answer,
                   f"<think>\n{working}\n</think>\n<answer>\n{answer}\n</answer>", name)


@functools.lru_cache(maxsize=8)
def generate(name: str, config: TaskConfig) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    """(train, held-out) problems of task `name` (see the module docstring).

    Raises:
      ValueError: an unknown task, or one with fewer distinct problems than the splits need.
    """
    check_name(name)
    wanted = config.num_train + config.num_eval
    if TASKS[name].size(config) < wanted:
        raise ValueError(f"task:{name} has {TASKS[name].size(config):.0f} distinct problems but "
                         f"verifiable.num_train + verifiable.num_eval = {wanted}; lower them or make the task "
                         "larger (verifiable.digits, list_len, max_value)")
    held_out = _distinct(_stream(name, config, 1), config.num_eval, set(), f"task:{name} held-out split")
    train = _distinct(_stream(name, config, 0), config.num_train, {p[0] for p in held_out},
                      f"task:{name} training split")
    return (tuple(_problem(name, config, *p) for p in train), tuple(_problem(name, config, *p) for p in held_out))
