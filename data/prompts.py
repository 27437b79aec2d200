"""Prompt data of the RL objectives (ppo, grpo, rloo): prompts to generate from, with what
their rewards read.

    config.data.source = task:NAME              (data.verifiable's tasks: addition, sorting, ...)
                       | files:PATH.jsonl[,...]  (prompt lines, globs allowed)

A JSONL line is one object with a `prompt`: a string, or chat messages
(`[{"role", "content"}, ...]`, TRL's conversational prompts; `messages` is taken as the
same); its other fields (`answer`, `task`, anything) go to the reward functions. An
`answer` (string or number) is what the accuracy reward verifies against; `task` names the
verifier (`data.verifiable.verifier`; the default compares numbers, else text). A task
source's examples are `{"prompt", "answer", "solution" (the reference completion), "task"}`.

The prompt's tokens: with a chat template (`sft.chat_template`, else the tokenizer's own)
the prompt as a user turn (or the messages) rendered with the assistant's generation
prompt (`data.chat.render`); without one, `[bos] + prompt` (bos: the tokenizer's BOS, else
its EOS), as `data.sft` renders plain prompt-completion lines, so an SFT'd model sees the
same prefix. Messages without any template are rendered with ChatML, as `data.sft` does.

Splits: a task's by its seed (`verifiable.*`); a file source's last `data.validation_fraction`
of the lines (at least one) are held out, as `data.sft` splits.

Rows (`train_dataset`, `eval_dataset`): this process's rows of each global batch of
`data.batch_size` prompts,
    prompt_ids  [b, P] int32, right-padded with 0 (P = data.seq_len - rl.max_new_tokens:
                the prompt and its completion fill a row of data.seq_len)
    prompt_len  [b] int32
    index       [b] int32, the example's row of its split's host table `examples`
and the host tables `splits(...)[k].examples[index]` (dicts of the prompt text and fields).
Training prompts are shuffled each epoch by `data.shuffle_seed` and repeated forever; the
iterator's `get_state()` / `set_state()` resume exactly (grain's). Evaluation gives every
held-out prompt once, in order; the last batch is filled with copies of the split's first
prompt whose `index` is -1 (generate them, never score them).

Bad data fails before any work with one line naming the file and line: a source of another
form, a missing or empty file, a line that is not JSON, has no prompt, or (with the
`accuracy` reward) no answer; a prompt longer than P when it is tokenized (`prepare`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from data import chat, pipeline, sources, verifiable

TASK_PREFIX = "task:"
SOURCE_FORMS = (f"'task:NAME' (a verifiable task: {', '.join(verifiable.TASKS)}) or 'files:PATH.jsonl[,PATH...]' "
                "(prompt lines, globs allowed)")
LINE_FORMS = '{"prompt": "...", "answer": "...", ...} or {"prompt": [{"role": ..., "content": ...}, ...], ...}'


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How prompts are read and laid out (besides the data config).

    Attributes:
      max_prompt_len: P, the width of `prompt_ids` (data.seq_len - rl.max_new_tokens).
      template: sft.chat_template ("" the tokenizer's own; plain text without one).
      tasks: the verifiable tasks' keys (`verifiable.*`).
      require_answer: every line needs an `answer` (the accuracy reward verifies it).
    """

    max_prompt_len: int
    template: str = ""
    tasks: verifiable.TaskConfig = dataclasses.field(default_factory=verifiable.TaskConfig)
    require_answer: bool = False


class PromptSplit(NamedTuple):
    """One split: the host table of examples and each prompt's token ids."""

    examples: tuple[dict, ...]
    ids: tuple[tuple[int, ...], ...]


def task_config(config) -> verifiable.TaskConfig:
    """The `verifiable.*` keys of a run config."""
    v = config.verifiable
    return verifiable.TaskConfig(num_train=v.num_train, num_eval=v.num_eval, seed=v.seed, digits=v.digits,
                                 list_len=v.list_len, max_value=v.max_value, math_difficulty=v.math_difficulty,
                                 format=v.format)


def prompt_config(config) -> PromptConfig:
    """The prompt options of a run config (raises ValueError naming a bad key)."""
    budget = config.data.seq_len - config.rl.max_new_tokens
    if config.rl.max_new_tokens < 1 or budget < 1:
        raise ValueError(f"config keys `rl.max_new_tokens`={config.rl.max_new_tokens} and `data.seq_len`="
                         f"{config.data.seq_len}: a row holds the prompt and its completion, so max_new_tokens must "
                         "be >= 1 and leave room for the prompt (raise data.seq_len)")
    rewards = [name.strip() for name in config.rl.rewards.split(",")]
    return PromptConfig(max_prompt_len=budget, template=config.sft.chat_template, tasks=task_config(config),
                        require_answer="accuracy" in rewards)


def _record(record: Any, require_answer: bool) -> dict:
    """A JSONL record as an example (prompt + fields); ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a line must be a JSON object, {LINE_FORMS}; found {type(record).__name__}")  # noqa: TRY004
    example = dict(record)
    if "prompt" not in example and isinstance(example.get("messages"), list):
        example["prompt"] = example.pop("messages")
    prompt = example.get("prompt")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in prompt):
            raise ValueError('"prompt" must be a string or a non-empty list of {"role", "content"} messages')
    elif not isinstance(prompt, str) or not prompt:
        raise ValueError(f"the line has no prompt (keys {sorted(example)}); each line must be {LINE_FORMS}")
    answer = example.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        example["answer"] = str(answer)
    elif answer is not None and not isinstance(answer, str):
        raise ValueError(f'"answer" must be a string or a number, found {type(answer).__name__}')
    if require_answer and not example.get("answer"):
        raise ValueError('the line has no "answer", which the accuracy reward (rl.rewards) verifies; add one or '
                         "drop accuracy from rl.rewards")
    example.setdefault("task", "")
    return example


def read_located(paths: Sequence[str], require_answer: bool = False) -> list[tuple[dict, str]]:
    """Every line of `paths` as (example, "file:line"), in order.

    Raises:
      ValueError: one line naming the file, the line number, the problem and the fix.
    """
    located = []
    for path in paths:
        before = len(located)
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    located.append((_record(json.loads(line), require_answer), f"{path}:{number}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}); each line must "
                                     f"be one JSON object, {LINE_FORMS}") from None
                except ValueError as e:
                    raise ValueError(f"{path}:{number}: {e}") from None
        if len(located) == before:
            raise ValueError(f"{path}: holds no prompt; each line must be {LINE_FORMS}")
    return located


def _file_paths(source: str) -> tuple[str, ...]:
    if not source.startswith("files:"):
        raise ValueError(f"config key `data.source`={source!r}: the RL objectives read {SOURCE_FORMS}")
    try:
        paths = sources.parse_source(source).paths
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"config key `data.source`: {e}") from None
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"data file {path} does not exist; set data.source to files:PATH.jsonl of prompt lines "
                             "or task:NAME")
    return paths


def check_source(config, workdir: str) -> None:
    """The RL objectives' data keys before any work (`train.validate`): the source's form, a
    task's keys or every line of the files, the prompt budget, a tokenizer to come.

    Raises:
      ValueError: one line naming the config key, or the file and line, and the fix.
    """
    del workdir
    options = prompt_config(config)
    if not config.init_from and not config.tokenizer.path:
        raise ValueError(f"objective={config.objective} trains a pretrained policy and uses its tokenizer: set "
                         "config key `init_from` (run:WORKDIR or hf:DIR), or `tokenizer.path`")
    source = config.data.source
    if source.startswith(TASK_PREFIX):
        verifiable.check_name(source[len(TASK_PREFIX):])
        return
    if not 0.0 < config.data.validation_fraction < 1.0:
        raise ValueError(f"config key `data.validation_fraction`={config.data.validation_fraction} must lie in "
                         "(0, 1): the share of the prompts held out for evaluation")
    if len(read_located(_file_paths(source), options.require_answer)) < 2:
        raise ValueError(f"config key `data.source`={source!r} holds one prompt; training and held-out prompts "
                         "need at least two")


def prepare(config, workdir: str, data_cfg: pipeline.DataConfig):
    """The run's tokenizer (`init_from`'s or `tokenizer.path`), with every prompt tokenized and
    checked against the prompt budget before any compilation. Nothing is written, so every
    process does it alike."""
    from train import build

    tokenizer = build.tokenizer(config, workdir, data_cfg)
    splits(data_cfg, prompt_config(config), tokenizer)
    return tokenizer


def encode_prompt(tokenizer: Any, prompt: str | list, template: str = "") -> list[int]:
    """A prompt's token ids (see the module docstring: chat template, else [bos] + text)."""
    own = template or getattr(tokenizer, "chat_template", None) or ""
    if isinstance(prompt, list) or own:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids, _ = chat.render(tokenizer, messages, add_generation_prompt=True, template=own or "chatml")
        return list(ids)
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token to start a plain prompt; give a chat "
                         "template (sft.chat_template)")
    return [start, *tokenizer.encode(prompt)]


def _task_examples(name: str, tasks: verifiable.TaskConfig) -> tuple[list[dict], list[dict]]:
    train, held_out = verifiable.generate(name, tasks)

    def table(problems):
        return [{"prompt": p.prompt, "answer": p.answer, "solution": p.completion, "task": p.task} for p in problems]

    return table(train), table(held_out)


def _encode_split(examples: list[dict], tokenizer: Any, options: PromptConfig, where) -> PromptSplit:
    ids = []
    for i, example in enumerate(examples):
        try:
            row = encode_prompt(tokenizer, example["prompt"], options.template)
        except ValueError as e:
            raise ValueError(f"{where(i)}: {e}") from None
        if len(row) > options.max_prompt_len:
            raise ValueError(f"{where(i)}: the prompt has {len(row)} tokens, more than the {options.max_prompt_len} "
                             "a row leaves it (data.seq_len - rl.max_new_tokens); raise data.seq_len or shorten "
                             "the prompt")
        ids.append(tuple(row))
    return PromptSplit(tuple(examples), tuple(ids))


@functools.lru_cache(maxsize=4)
def _splits(source: str, stamps: tuple, tokenizer: Any, options: PromptConfig,
            validation_fraction: float) -> tuple[PromptSplit, PromptSplit]:
    del stamps  # part of the cache key only: an edited file is read again
    if source.startswith(TASK_PREFIX):
        name = source[len(TASK_PREFIX):]
        train, held_out = _task_examples(name, options.tasks)
        return (_encode_split(train, tokenizer, options, lambda i: f"task:{name} training problem {i}"),
                _encode_split(held_out, tokenizer, options, lambda i: f"task:{name} held-out problem {i}"))
    located = read_located(_file_paths(source), options.require_answer)
    examples, where = [e for e, _ in located], [w for _, w in located]
    cut = len(examples) - max(round(len(examples) * validation_fraction), 1)
    return (_encode_split(examples[:cut], tokenizer, options, lambda i: where[i]),
            _encode_split(examples[cut:], tokenizer, options, lambda i: where[cut + i]))


def splits(data: pipeline.DataConfig, options: PromptConfig, tokenizer: Any) -> tuple[PromptSplit, PromptSplit]:
    """(train, held-out) prompt splits of the data config's source, tokenized (cached).

    Raises:
      ValueError: one line naming the file and line (or task problem) and the fix.
    """
    stamps = ()
    if not data.source.startswith(TASK_PREFIX):
        stamps = tuple(os.stat(p).st_mtime_ns for p in _file_paths(data.source))
    return _splits(data.source, stamps, tokenizer, options, data.validation_fraction)


def _row(index: int, split: PromptSplit, width: int, label: int | None = None) -> dict[str, np.ndarray]:
    ids = split.ids[index]
    prompt_ids = np.zeros(width, np.int32)
    prompt_ids[:len(ids)] = ids
    return {"prompt_ids": prompt_ids, "prompt_len": np.int32(len(ids)),
            "index": np.int32(index if label is None else label)}


def train_dataset(data: pipeline.DataConfig, options: PromptConfig, tokenizer: Any, *,
                  process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
    """This process's rows of each global batch of training prompts (module docstring).

    Args:
      data: source, batch_size, seed, shuffle, num_epochs (None: forever), validation_fraction.
      options: the prompt width P, template, tasks.
      tokenizer: the policy's tokenizer.
      process_index, process_count: jax's by default (parameters so tests simulate hosts).

    Returns:
      A `grain.IterDataset` whose iterator has `get_state()` / `set_state()`.
    """
    rows = pipeline.process_rows(data.batch_size, process_index, process_count)
    train, _ = splits(data, options, tokenizer)
    if not train.ids:
        raise ValueError(f"data.source={data.source!r} leaves no training prompt")
    indices = grain.MapDataset.range(len(train.ids))
    if data.shuffle:
        indices = indices.shuffle(seed=data.seed)
    prompts = indices.repeat(data.num_epochs).map(functools.partial(_row, split=train, width=options.max_prompt_len))
    batches = prompts.to_iter_dataset().batch(data.batch_size, drop_remainder=True)
    return batches.map(functools.partial(pipeline._take_rows, rows=rows))


def train_iterator(data: pipeline.DataConfig, options: PromptConfig, tokenizer: Any, **process) -> grain.DatasetIterator:
    """`iter(train_dataset(...))`: the checkpointable iterator of training prompt rows."""
    return iter(train_dataset(data, options, tokenizer, **process))


def eval_dataset(data: pipeline.DataConfig, options: PromptConfig, tokenizer: Any, *,
                 process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
    """This process's rows of the held-out prompts, each once in order; the last global batch
    filled with the first prompt under index -1. Each `iter()` starts again. Arguments are
    those of `train_dataset`."""
    rows = pipeline.process_rows(data.batch_size, process_index, process_count)
    _, held_out = splits(data, options, tokenizer)
    count = len(held_out.ids)
    total = -(-count // data.batch_size) * data.batch_size

    def row(i):
        return _row(i if i < count else 0, held_out, options.max_prompt_len, None if i < count else -1)

    batches = grain.MapDataset.range(total).map(row).to_iter_dataset().batch(data.batch_size, drop_remainder=True)
    return batches.map(functools.partial(pipeline._take_rows, rows=rows))


def eval_batches(data: pipeline.DataConfig, options: PromptConfig, tokenizer: Any, **process) -> list[dict]:
    """`list(eval_dataset(...))`, for tests and notebooks."""
    return list(eval_dataset(data, options, tokenizer, **process))

