"""Rewards of the RL objectives (ppo, grpo, rloo): DeepSeek-R1's rule rewards, a reward
model, and reward functions of your own.

    config.rl.rewards = "accuracy,format"          # comma list, each a name below or module:function
    config.rl.reward_weights = "1.0,0.2"           # one weight per reward ("": 1 each)

    rewards = build(config)                        # once, on every process
    total_N, parts = rewards(prompts, completions, fields)

A reward function follows TRL's convention:

    def my_reward(prompts: list, completions: list[str], **fields) -> list[float | None]

`prompts` are the examples' prompts (strings, or chat messages for conversational prompt
lines), `completions` the generated texts (cut at the stop token, special tokens removed),
and `fields` every other field of the examples as lists in the same order (`answer`,
`task`, `solution`, any key of a prompt JSONL line; `data.prompts`). It returns one number
per completion; None means the reward does not apply to that completion (TRL's convention:
it adds 0 to the weighted sum and is left out of the reward's mean). A rollout's reward is
the weighted sum over the rewards. The function is named by its import path,
`package.module:function`, and must be importable on every process (on PYTHONPATH).

Built in (`BUILTIN`):
  * `format`: 1.0 when the completion is `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`,
    open-r1's regex `FORMAT_PATTERN` (re.DOTALL | re.MULTILINE), else 0.0.
  * `accuracy`: 1.0 when the answer extracted from the completion (`extract_answer`: the
    text inside the last <answer>...</answer>, else the whole completion, stripped) passes
    the verifier of the example's `task` against its `answer` (`data.verifiable.verifier`:
    the task's exact check; numbers, else text, for other tasks), else 0.0; None for an
    example without an answer.
  * `model`: the score of the reward model `rl.reward_model` (run:WORKDIR[@STEP] of an
    objective=reward run | hf:DIR of a *ForSequenceClassification) on the prompt and completion,
    rendered as its preference data was (`reward_model_reward`); `build(config, run=run)` loads
    it onto the run's mesh by its strategy (`train.reward_model.RewardModel`; without `run`:
    data parallel over every device).

Errors are one line naming the function: a path that cannot be imported (checked before any
work, `check`), and a result of the wrong length, not a list, or with values that are not
finite numbers or None (`RewardError`, when the function is first called).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from data import verifiable

# open-r1's format reward (src/open_r1/rewards.py), matched with re.DOTALL | re.MULTILINE.
FORMAT_PATTERN = r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"
_FORMAT_RE = re.compile(FORMAT_PATTERN, re.DOTALL | re.MULTILINE)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
RewardFn = Callable[..., Sequence[float | None]]


class RewardError(ValueError):
    """A reward function that cannot be imported or returned something unusable (one line)."""


def extract_answer(completion: str) -> str:
    """The answer a completion gives: the text of its last <answer>...</answer>, else the whole
    completion, stripped of surrounding whitespace."""
    found = _ANSWER_RE.findall(completion)
    return (found[-1] if found else completion).strip()


def format_reward(prompts: Sequence, completions: Sequence[str], **fields) -> list[float]:
    """1.0 for each completion in the R1 layout (`FORMAT_PATTERN`), else 0.0."""
    del prompts, fields
    return [1.0 if _FORMAT_RE.match(c) else 0.0 for c in completions]


def accuracy_reward(prompts: Sequence, completions: Sequence[str], answer: Sequence[str | None] | None = None,
                    task: Sequence[str] | None = None, **fields) -> list[float | None]:
    """1.0 for each completion whose extracted answer the example's verifier accepts, else 0.0;
    None where the example has no answer."""
    del prompts, fields
    answers = answer if answer is not None else [None] * len(completions)
    tasks = task if task is not None else [""] * len(completions)
    return [None if want is None else float(verifiable.verify(name or "", extract_answer(c), str(want)))
            for c, want, name in zip(completions, answers, tasks, strict=True)]


BUILTIN: dict[str, RewardFn | None] = {"accuracy": accuracy_reward, "format": format_reward,
                                       "model": None}  # model: the objective's reward-model scorer


def load_function(path: str) -> RewardFn:
    """The function `package.module:function` names.

    Raises:
      RewardError: one line naming the path and why it cannot be imported.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward {path!r} in rl.rewards is neither built in ({', '.join(BUILTIN)}) nor an import "
                          "path package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward function {path!r} (rl.rewards) cannot be imported: {e}; put its module on "
                          "PYTHONPATH") from None
    except Exception as e:  # noqa: BLE001 - the module's own import fails: name it, one line
        raise RewardError(f"reward function {path!r} (rl.rewards): importing {module_name} raised "
                          f"{type(e).__name__}: {e}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise RewardError(f"reward function {path!r} (rl.rewards) cannot be imported: {module_name} has no "
                              f"attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(f"reward function {path!r} (rl.rewards) is not callable (type {type(fn).__name__})")
    return fn


def parse(rewards: str, weights: str) -> list[tuple[str, float]]:
    """(name, weight) of each reward of `rl.rewards` and `rl.reward_weights`.

    Raises:
      RewardError: an empty list, or weights that are not one finite number per reward.
    """
    names = [n.strip() for n in rewards.split(",") if n.strip()]
    if not names:
        raise RewardError("config key `rl.rewards` is empty; give a comma list of accuracy, format, model or "
                          "package.module:function")
    if not weights.strip():
        return [(n, 1.0) for n in names]
    parts = [w.strip() for w in weights.split(",")]
    try:
        values = [float(w) for w in parts]
    except ValueError:
        raise RewardError(f"config key `rl.reward_weights`={weights!r} must be comma-separated numbers") from None
    if len(values) != len(names) or not all(math.isfinite(v) for v in values):
        raise RewardError(f"config key `rl.reward_weights`={weights!r} gives {len(values)} weights for the "
                          f"{len(names)} rewards of rl.rewards={rewards!r}; give one finite number per reward")
    return list(zip(names, values, strict=True))


def check(config) -> None:
    """The `rl.rewards` keys before any work: names, weights, importable functions, and a
    reward model for `model`.

    Raises:
      RewardError: one line naming the key or the function.
    """
    for name, _ in parse(config.rl.rewards, config.rl.reward_weights):
        if name == "model" and not config.rl.reward_model:
            raise RewardError("rl.rewards names `model` but config key `rl.reward_model` is empty; set it to "
                              "run:WORKDIR or hf:DIR of a reward model")
        if name not in BUILTIN:
            load_function(name)


def _checked(name: str, values: Any, count: int) -> np.ndarray:
    """A reward function's result as float64 [count] (None -> NaN), or RewardError naming it."""
    if isinstance(values, np.ndarray):
        values = values.tolist() if values.ndim == 1 else values
    if not isinstance(values, (list, tuple)):
        shape = getattr(values, "shape", None)
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}"
                          f"{'' if shape is None else f' of shape {tuple(shape)}'}; it must return a list of "
                          f"{count} floats, one per completion")
    if len(values) != count:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {count} completions; it must "
                          "return one float per completion")
    out = np.empty(count, np.float64)
    for i, value in enumerate(values):
        if value is None:
            out[i] = np.nan
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            out[i] = float(value)
        else:
            raise RewardError(f"reward function {name!r} returned {value!r:.40} (a {type(value).__name__}) for "
                              f"completion {i}; each value must be a finite number or None")
    return out


@dataclasses.dataclass(frozen=True)
class RewardSet:
    """The run's rewards: callable on a batch of completions (see the module docstring).

    Attributes:
      names: each reward's name as in rl.rewards.
      weights: each reward's weight.
      functions: each reward's function.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    functions: tuple[RewardFn, ...]

    def __call__(self, prompts: Sequence, completions: Sequence[str],
                 fields: dict[str, Sequence] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Scores completions.

        Args:
          prompts: each completion's prompt (repeated for the G completions of one prompt).
          completions: the generated texts.
          fields: the examples' other fields, each a list aligned with `completions`.

        Returns:
          (total [N] float32: the weighted sum, a None counting 0; {name: [N] float64, NaN where
          a function returned None}).

        Raises:
          RewardError: one line naming a function whose result is unusable.
        """
        fields = dict(fields or {})
        for key in ("prompts", "completions"):
            fields.pop(key, None)
        parts = {}
        for name, fn in zip(self.names, self.functions, strict=True):
            parts[name] = _checked(name, fn(prompts=list(prompts), completions=list(completions), **fields),
                                   len(completions))
        total = np.zeros(len(completions), np.float64)
        for name, weight in zip(self.names, self.weights, strict=True):
            total += weight * np.nan_to_num(parts[name], nan=0.0)
        return total.astype(np.float32), parts


def reward_model_reward(reward_model) -> RewardFn:
    """The `model` reward of a loaded `train.reward_model.RewardModel`: its score of each
    (prompt, completion), rendered as `RewardModel.encode` renders it (`data.preference`); an
    empty completion (a stop token at once) is scored as the prompt followed by the eos alone.
    Every process must call it with as many completions (the scorer's forward pass is global)."""
    from data import preference

    def model(prompts: Sequence, completions: Sequence[str], **fields) -> list[float]:
        del fields
        rows = []
        for prompt, completion in zip(prompts, completions, strict=True):
            prompt_ids, (response,) = preference.split_prompt(reward_model.tokenizer, prompt, [completion],
                                                              reward_model.options.template)
            prompt_ids, (response,) = preference.fit(prompt_ids, [response], reward_model.model.config.max_len,
                                                     reward_model.options.max_prompt_len)
            rows.append(prompt_ids + response)
        ids = np.zeros((len(rows), max(map(len, rows), default=1)), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        return [float(x) for x in reward_model.score(ids, np.asarray([len(r) for r in rows], np.int32))]

    return model


def _load_reward_model(config, run):
    """`rl.reward_model` on the run's mesh, checked against its tokenizer; without the run, data
    parallel over every device, checked against the policy's tokenizer (init_from's or
    tokenizer.path)."""
    from train.reward_model import RewardModel

    if run is not None:
        return RewardModel.load(config.rl.reward_model, layout=run.layout, tokenizer=run.tokenizer)
    from train import build as build_lib

    tokenizer = build_lib.tokenizer(config, "", None) if (config.init_from or config.tokenizer.path) else None
    return RewardModel.load(config.rl.reward_model, tokenizer=tokenizer)


def build(config, model_reward: RewardFn | None = None, *, run=None) -> RewardSet:
    """The run's `RewardSet` from `rl.rewards` and `rl.reward_weights`.

    Args:
      config: the run config.
      model_reward: the `model` reward, `fn(prompts, completions, **fields) -> list[float]`;
        None: `rl.reward_model` loaded (`train.reward_model.RewardModel`, checked to read the
        policy's tokenizer) when rl.rewards names `model`.
      run: the `train.trainer.Run`: the reward model is laid out on its mesh by its strategy;
        None: data parallel over every device.

    Raises:
      RewardError: a bad name, weight or import path (one line).
      ValueError: a reward model that cannot be loaded or reads another tokenizer (one line).
    """
    check(config)
    names, weights, functions = [], [], []
    for name, weight in parse(config.rl.rewards, config.rl.reward_weights):
        fn = BUILTIN.get(name) if name in BUILTIN else load_function(name)
        if name == "model":
            if model_reward is None:
                model_reward = reward_model_reward(_load_reward_model(config, run))
            fn = model_reward
        names.append(name)
        weights.append(weight)
        functions.append(fn)
    return RewardSet(tuple(names), tuple(weights), tuple(functions))
