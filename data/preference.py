"""Preference data: JSONL pairs (or KTO's unpaired rows) -> token rows with the prompt masked.

    lines -> encode (plain text or chat template, TRL's prompt/completion split) -> rows of
          seq_len (TRL's truncation) -> [shuffle, repeat] -> batch -> this process's rows

Source: `data.source=files:PATH.jsonl[,PATH...]` (globs allowed). Each line is one JSON
object; the key names are `PreferenceConfig`'s (`config.preference.*`):
  * paired (reward, dpo): `{"prompt", "chosen", "rejected"}` (+ the margin field when
    `margin_key` is set). Strings are plain text: `[bos] + prompt + response + [eos]` (bos:
    the tokenizer's BOS, else its EOS, as in pretraining); with a chat template
    (`template`, else the tokenizer's own) strings are one user turn and one assistant
    turn. Lists of messages `[{"role", "content"}, ...]` are rendered with the template
    (ChatML when neither is set): the prompt (messages, rendered with the generation
    prompt) then the response messages. Without a prompt field, the prompt is the messages
    `chosen` and `rejected` share at their start (TRL's `extract_prompt`).
  * unpaired (dpo with `dpo.loss=kto`): `{"prompt", "completion", "label"}`, label true/1
    (desirable) or false/0.

The response starts where the tokenized prompt and the tokenized prompt + response first
differ (the shorter over a pair's two responses), as TRL's DPO/KTO tokenization does
(`common_prefix_length`); its tokens are the scored ones (TRL's `completion_mask`), the
template's closing tokens included.

Truncation to `seq_len` tokens, as TRL's tokenization of preference rows used to cut them
(keep the response, cut the prompt from the left): the prompt keeps its last
`max_prompt_len` tokens (0: all); if the prompt and the row's longest response still do not
fit, the prompt keeps its last `seq_len - longest` tokens but at least one (the context of
the first response token), and responses are then cut at their end to fit.

Rows (int32 unless said), indexed like `train.logprobs` (`mask[t]` scores token t):
  * paired: `chosen_ids`, `rejected_ids` [B, T] (prompt + response, right-padded with 0),
    `chosen_mask`, `rejected_mask` [B, T] (1 on the response tokens), `chosen_len`,
    `rejected_len` [B] (tokens before padding), `index` [B] (row of the split; -1 on the
    padding rows of the last validation batch), `margin` [B] float32 (0 without a margin key).
  * unpaired: `ids`, `mask` [B, T], `len` [B], `label` [B] (1 desirable, 0 not), `index`, and
    the KL rows `kl_ids`, `kl_mask`, `kl_len`: the same prompt with another row's completion
    (TRL's mismatched pairs: in file order, within consecutive chunks of `batch_size` rows,
    row i takes the completion of row i - 1 and the first row that of the last).

`check_lines` checks every line's fields without a tokenizer (a run's config check, before
any work). The last `validation_fraction` of the lines (at least one when there are two or more) are
the validation split. Every line is read and tokenized when the data is opened (a bad line
fails before any training, naming the file, the line and the key), and kept in memory as
rows; each process keeps its own rows of every global batch (`data.pipeline.process_rows`).
The training iterator is grain's: `get_state()` / `set_state()` resume exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data import chat, jsonl, pipeline

SOURCE_FORMS = "'files:PATH.jsonl[,PATH...]' (preference JSONL, globs allowed)"
PAIRED_KEYS = ("chosen_ids", "rejected_ids", "chosen_mask", "rejected_mask", "chosen_len", "rejected_len", "index",
               "margin")
UNPAIRED_KEYS = ("ids", "mask", "len", "label", "index", "kl_ids", "kl_mask", "kl_len")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """How preference lines become rows (the data config says what to read and the row shape).

    Attributes:
      template: "" (the tokenizer's chat template; ChatML for messages when it has none), a
        built-in name ('chatml', 'llama3') or a Jinja string (`sft.chat_template`).
      prompt_key, chosen_key, rejected_key: the paired rows' fields.
      completion_key, label_key: the unpaired rows' fields (with prompt_key).
      margin_key: a paired row's numeric margin field; "": none (margin 0).
      max_prompt_len: prompt tokens kept (the last ones); 0: no cut beyond seq_len's.
      unpaired: rows are KTO's {prompt, completion, label}.
    """

    template: str = ""
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    completion_key: str = "completion"
    label_key: str = "label"
    margin_key: str = ""
    max_prompt_len: int = 0
    unpaired: bool = False

    def __post_init__(self):
        if self.max_prompt_len < 0:
            raise ValueError(f"config key `preference.max_prompt_len`={self.max_prompt_len}; expected >= 0 "
                             "(0: no cut)")

    def line_form(self) -> str:
        if self.unpaired:
            return f'{{"{self.prompt_key}": ..., "{self.completion_key}": ..., "{self.label_key}": true | false}}'
        return f'{{"{self.prompt_key}": ..., "{self.chosen_key}": ..., "{self.rejected_key}": ...}}'


def preference_config(config, *, unpaired: bool = False) -> PreferenceConfig:
    """The `preference.*` keys (and `sft.chat_template`) of a run config."""
    p = config.preference
    return PreferenceConfig(template=config.sft.chat_template, prompt_key=p.prompt_key, chosen_key=p.chosen_key,
                            rejected_key=p.rejected_key, completion_key=p.completion_key, label_key=p.label_key,
                            margin_key=p.margin_key, max_prompt_len=p.max_prompt_len, unpaired=unpaired)


def check_run(config, data: pipeline.DataConfig, *, objective: str, unpaired: bool = False) -> None:
    """What every run on preference data (objective=reward, dpo) checks before any work: the
    source's files and every line's fields (`check_lines`, no tokenizer), at least 2 lines, a
    validation share, a tokenizer to come from `init_from` or `tokenizer.path`, the prompt cut
    and the chat template.

    Raises:
      ValueError: one line naming the config key and the fix.
    """
    paths = check_source(data)
    if check_lines(paths, preference_config(config, unpaired=unpaired)) < 2:
        raise ValueError(f"config key `data.source`={config.data.source!r} holds fewer than 2 preference lines; a "
                         "train/validation split needs at least 2")
    if not 0.0 < config.data.validation_fraction < 1.0:
        raise ValueError(f"config key `data.validation_fraction`={config.data.validation_fraction} must lie in "
                         "(0, 1): the share of the preference lines held out for validation")
    if not config.init_from and not config.tokenizer.path:
        raise ValueError(f"objective={objective} tunes a pretrained (or SFT'd) model with its tokenizer: set config "
                         "key `init_from` (run:WORKDIR or hf:DIR), or `tokenizer.path` to start from a random init")
    if not 0 <= config.preference.max_prompt_len < config.data.seq_len:
        raise ValueError(f"config key `preference.max_prompt_len`={config.preference.max_prompt_len} must lie in "
                         f"[0, data.seq_len={config.data.seq_len}) (0: no cut)")
    chat.check_template_key(config.sft.chat_template)


def check_source(data: pipeline.DataConfig) -> tuple[str, ...]:
    """The JSONL files of the source; reads nothing (a run checks its config with it first).

    Raises:
      ValueError: a source of another form, or a file that does not exist.
    """
    return jsonl.file_paths(data.source, reads="preference data is", lines="preference lines", forms=SOURCE_FORMS)


# ------------------------------------------------------------------------------ encoding


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Leading tokens `a` and `b` share (TRL's `common_prefix_length`)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def split_prompt(tokenizer: Any, prompt: Any, responses: Sequence[Any], template: str) -> tuple[list, list[list]]:
    """TRL's tokenization of a prompt and its responses: (prompt ids, [response ids, ...]).

    `prompt` and `responses` are all strings (plain text, or one user and one assistant turn
    when a template is set) or all lists of messages. Each full sequence is tokenized whole;
    the responses start at the shortest common prefix of the tokenized prompt and each
    full sequence.
    """
    own = template or getattr(tokenizer, "chat_template", None) or ""
    if isinstance(prompt, str) and own:
        prompt = [{"role": "user", "content": prompt}]
        responses = [[{"role": "assistant", "content": r}] for r in responses]
    if isinstance(prompt, str):
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no eos token to end a response; give a chat template "
                             "(sft.chat_template)")
        start = [tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id]
        prompt_ids = start + tokenizer.encode(prompt)
        fulls = [start + tokenizer.encode(prompt + r) + [tokenizer.eos_id] for r in responses]
    else:
        prompt_ids, _ = chat.render(tokenizer, prompt, add_generation_prompt=True, template=own or "chatml")
        fulls = [chat.render(tokenizer, prompt + r, template=own or "chatml")[0] for r in responses]
    cut = min(common_prefix_length(prompt_ids, full) for full in fulls)
    return list(fulls[0][:cut]), [list(full[cut:]) for full in fulls]


def _field(record: dict, key: str, config_key: str) -> Any:
    if key not in record:
        raise ValueError(f'missing key "{key}" (config key `preference.{config_key}`); found {sorted(record)}')
    return record[key]


def _check_response(value: Any, key: str) -> None:
    if isinstance(value, str):
        if not value:
            raise ValueError(f'"{key}" is empty; a response needs text')
    elif _is_messages(value):
        if not any(m.get("content") for m in value):
            raise ValueError(f'"{key}" is empty (no message has content); a response needs text')
    else:
        raise ValueError(f'"{key}" must be a string or a list of {{"role", "content"}} messages, got '
                         f'{value!r:.60}')


def _shared_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """TRL's `extract_prompt`: the messages both conversations start with, and the rest of each."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def parse_paired(record: Any, options: PreferenceConfig) -> tuple[Any, Any, Any, float]:
    """One paired line's (prompt, chosen, rejected, margin), checked without a tokenizer.

    Raises:
      ValueError: naming the missing or bad key.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a line must be a JSON object {options.line_form()}; found {type(record).__name__}")  # noqa: TRY004
    chosen = _field(record, options.chosen_key, "chosen_key")
    rejected = _field(record, options.rejected_key, "rejected_key")
    _check_response(chosen, options.chosen_key)
    _check_response(rejected, options.rejected_key)
    if chosen == rejected:
        raise ValueError(f'"{options.chosen_key}" and "{options.rejected_key}" are identical; a preference pair '
                         "needs two different responses")
    if options.prompt_key in record:
        prompt = record[options.prompt_key]
    elif _is_messages(chosen) and _is_messages(rejected):
        prompt, chosen, rejected = _shared_prompt(chosen, rejected)
        if not prompt or not chosen or not rejected:
            raise ValueError(f'missing key "{options.prompt_key}" (config key `preference.prompt_key`), and '
                             f'"{options.chosen_key}" and "{options.rejected_key}" share no leading prompt messages')
    else:
        prompt = _field(record, options.prompt_key, "prompt_key")
    kinds = {isinstance(v, str) for v in (prompt, chosen, rejected)}
    if len(kinds) > 1 or (kinds == {False} and not all(_is_messages(v) for v in (prompt, chosen, rejected))):
        raise ValueError(f'"{options.prompt_key}", "{options.chosen_key}" and "{options.rejected_key}" must all be '
                         "strings or all lists of messages")
    margin = 0.0
    if options.margin_key:
        margin = _field(record, options.margin_key, "margin_key")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f'"{options.margin_key}" must be a number (config key `preference.margin_key`), '
                             f"got {margin!r:.40}")
    return prompt, chosen, rejected, float(margin)


def parse_unpaired(record: Any, options: PreferenceConfig) -> tuple[Any, Any, int]:
    """One unpaired (KTO) line's (prompt, completion, label), checked without a tokenizer.

    Raises:
      ValueError: naming the missing or bad key.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a line must be a JSON object {options.line_form()}; found {type(record).__name__}")  # noqa: TRY004
    prompt = _field(record, options.prompt_key, "prompt_key")
    completion = _field(record, options.completion_key, "completion_key")
    label = _field(record, options.label_key, "label_key")
    _check_response(completion, options.completion_key)
    if label not in (True, False, 0, 1):
        raise ValueError(f'"{options.label_key}" must be true/false or 1/0 (desirable or not), got {label!r:.40}')
    if isinstance(prompt, str) != isinstance(completion, str) or (
            not isinstance(prompt, str) and not _is_messages(prompt)):
        raise ValueError(f'"{options.prompt_key}" and "{options.completion_key}" must both be strings or both lists '
                         "of messages")
    return prompt, completion, int(label)


def encode_paired(tokenizer: Any, record: Any, options: PreferenceConfig) -> dict[str, Any]:
    """One paired line -> {prompt, chosen, rejected (ids), margin}; ValueError naming the key."""
    prompt, chosen, rejected, margin = parse_paired(record, options)
    prompt_ids, (chosen_ids, rejected_ids) = split_prompt(tokenizer, prompt, [chosen, rejected], options.template)
    for key, ids in ((options.chosen_key, chosen_ids), (options.rejected_key, rejected_ids)):
        if not ids:
            raise ValueError(f'"{key}" has no token after the prompt; a response needs text')
    if chosen_ids == rejected_ids:
        raise ValueError(f'"{options.chosen_key}" and "{options.rejected_key}" tokenize identically; a preference '
                         "pair needs two different responses")
    return {"prompt": prompt_ids, "chosen": chosen_ids, "rejected": rejected_ids, "margin": margin}


def encode_unpaired(tokenizer: Any, record: Any, options: PreferenceConfig) -> dict[str, Any]:
    """One unpaired (KTO) line -> {prompt, completion (ids), label}; ValueError naming the key."""
    prompt, completion, label = parse_unpaired(record, options)
    prompt_ids, (completion_ids,) = split_prompt(tokenizer, prompt, [completion], options.template)
    if not completion_ids:
        raise ValueError(f'"{options.completion_key}" has no token after the prompt; a completion needs text')
    return {"prompt": prompt_ids, "completion": completion_ids, "label": label}


def _lines(paths: Sequence[str], options: PreferenceConfig):
    """(path, line number, record) of every non-blank line (`data.jsonl.records`)."""
    return jsonl.records(paths, kind="preference line", forms=options.line_form())


def check_lines(paths: Sequence[str], options: PreferenceConfig) -> int:
    """Every line of `paths` parses and has its fields (no tokenizer: a run checks this before
    any work); returns the number of lines.

    Raises:
      ValueError: one line naming the file, the line number, the key and the fix.
    """
    parse = parse_unpaired if options.unpaired else parse_paired
    count = 0
    for path, number, record in _lines(paths, options):
        try:
            parse(record, options)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        count += 1
    return count


def read_examples(paths: Sequence[str], tokenizer: Any, options: PreferenceConfig) -> list[dict[str, Any]]:
    """The encoded lines of `paths`, in order.

    Raises:
      ValueError: one line naming the file, the line number, the key and the fix.
    """
    encode = encode_unpaired if options.unpaired else encode_paired
    examples = []
    for path, number, record in _lines(paths, options):
        try:
            examples.append(encode(tokenizer, record, options))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return examples


# ------------------------------------------------------------------------------ rows


def fit(prompt: list[int], responses: Sequence[list[int]], seq_len: int,
        max_prompt_len: int = 0) -> tuple[list[int], list[list[int]]]:
    """The prompt and responses cut to `seq_len` tokens (see the module docstring)."""
    if max_prompt_len:
        prompt = prompt[-max_prompt_len:]
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > seq_len:
        prompt = prompt[-max(seq_len - longest, min(len(prompt), 1)):] if prompt else prompt
        responses = [r[:seq_len - len(prompt)] for r in responses]
    return prompt, list(responses)


def _rows(prompt: list[int], responses: Sequence[list[int]], seq_len: int) -> list[tuple[np.ndarray, ...]]:
    """(ids [T], mask [T], len) of the prompt followed by each response."""
    out = []
    for response in responses:
        ids_T, mask_T = np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32)
        length = len(prompt) + len(response)
        ids_T[:length] = prompt + response
        mask_T[len(prompt):length] = 1
        out.append((ids_T, mask_T, length))
    return out


def split_rows(examples: Sequence[dict], seq_len: int, max_prompt_len: int, *, unpaired: bool,
               kl_chunk: int = 1) -> dict[str, np.ndarray]:
    """A split's examples as rows (the module docstring's keys), [N, ...] each; unpaired rows
    take their KL completions within consecutive chunks of `kl_chunk` rows."""
    names = UNPAIRED_KEYS if unpaired else PAIRED_KEYS
    columns: dict[str, list] = {name: [] for name in names}
    for index, example in enumerate(examples):
        if unpaired:
            chunk = index - index % kl_chunk
            size = min(kl_chunk, len(examples) - chunk)
            other = examples[chunk + (index - chunk - 1) % size]["completion"]
            prompt, (completion,) = fit(example["prompt"], [example["completion"]], seq_len, max_prompt_len)
            (row,) = _rows(prompt, [completion], seq_len)
            prompt, (other,) = fit(example["prompt"], [other], seq_len, max_prompt_len)
            (kl_row,) = _rows(prompt, [other], seq_len)
            values = (*row, example["label"], index, *kl_row)
        else:
            prompt, pair = fit(example["prompt"], [example["chosen"], example["rejected"]], seq_len, max_prompt_len)
            (chosen_ids, chosen_mask, chosen_len), (rejected_ids, rejected_mask, rejected_len) = _rows(
                prompt, pair, seq_len)
            values = (chosen_ids, rejected_ids, chosen_mask, rejected_mask, chosen_len, rejected_len, index,
                      example["margin"])
        for name, value in zip(names, values):
            columns[name].append(value)
    return {name: np.asarray(column, np.float32 if name == "margin" else np.int32).reshape(
        (len(examples), seq_len) if name.endswith(("ids", "mask")) else (len(examples),))
        for name, column in columns.items()}


@functools.lru_cache(maxsize=4)
def _splits(paths: tuple[str, ...], stamps: tuple, tokenizer: Any, options: PreferenceConfig, seq_len: int,
            validation_fraction: float, batch_size: int) -> tuple[dict, dict]:
    del stamps  # part of the cache key only: an edited file is read again
    examples = read_examples(paths, tokenizer, options)
    held_out = round(len(examples) * validation_fraction)
    held_out = max(held_out, 1) if validation_fraction > 0 and len(examples) >= 2 else held_out
    train, validation = examples[:len(examples) - held_out], examples[len(examples) - held_out:]
    return tuple(split_rows(split, seq_len, options.max_prompt_len, unpaired=options.unpaired, kl_chunk=batch_size)
                 for split in (train, validation))


def splits(data: pipeline.DataConfig, options: PreferenceConfig, tokenizer: Any) -> tuple[dict, dict]:
    """(train, validation) rows of the source, [N, ...] arrays by key (cached per file version)."""
    paths = check_source(data)
    stamps = tuple(os.stat(p).st_mtime_ns for p in paths)
    return _splits(paths, stamps, tokenizer, options, data.seq_len, data.validation_fraction, data.batch_size)


def take(rows: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """The rows at `indices` (-1: an all-zero padding row with index -1)."""
    indices = np.asarray(indices)
    safe = np.maximum(indices, 0)
    out = {}
    for name, column in rows.items():
        picked = column[safe] if len(column) else np.zeros((len(indices), *column.shape[1:]), column.dtype)
        keep = (indices >= 0).reshape((-1,) + (1,) * (picked.ndim - 1))
        out[name] = np.where(keep, picked, 0).astype(column.dtype)
    out["index"] = indices.astype(np.int32)
    return out


def train_dataset(data: pipeline.DataConfig, options: PreferenceConfig, tokenizer: Any, *,
                  process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
    """This process's training batches: rows shuffled each epoch (data.shuffle), batched (the
    last partial batch of a finite run dropped), sliced to the process.

    Returns:
      A `grain.IterDataset` whose iterator has `get_state()` / `set_state()`.
    """
    rows = pipeline.process_rows(data.batch_size, process_index, process_count)
    train, _ = splits(data, options, tokenizer)
    if not len(train["index"]):
        raise ValueError(f"data.source={data.source!r} leaves no training row after the validation split; add "
                         "lines or lower data.validation_fraction")
    indices = grain.MapDataset.range(len(train["index"]))
    if data.shuffle:
        indices = indices.shuffle(seed=data.seed)
    batches = indices.repeat(data.num_epochs).to_iter_dataset().batch(data.batch_size, drop_remainder=True)
    batches = batches.map(functools.partial(take, train))
    return batches.map(functools.partial(pipeline._take_rows, rows=rows))


def train_iterator(data: pipeline.DataConfig, options: PreferenceConfig, tokenizer: Any,
                   **process) -> grain.DatasetIterator:
    """`iter(train_dataset(...))`: the checkpointable iterator of training batches."""
    return iter(train_dataset(data, options, tokenizer, **process))


def ordered_dataset(rows: dict[str, np.ndarray], batch_size: int, *, process_index: int | None = None,
                    process_count: int | None = None) -> grain.IterDataset:
    """This process's rows of every row of `rows` once, in order, in global batches of
    `batch_size`, the last padded with index -1 rows (re-iterable)."""
    mine = pipeline.process_rows(batch_size, process_index, process_count)
    count = len(rows["index"])
    padded = -(-count // batch_size) * batch_size
    order = np.where(np.arange(padded) < count, np.arange(padded), -1).reshape(-1, batch_size)
    batches = grain.MapDataset.source(list(order)).map(functools.partial(take, rows))
    return batches.map(functools.partial(pipeline._take_rows, rows=mine)).to_iter_dataset()


def eval_dataset(data: pipeline.DataConfig, options: PreferenceConfig, tokenizer: Any, **process) -> grain.IterDataset:
    """This process's validation batches (`ordered_dataset` of the validation split)."""
    _, validation = splits(data, options, tokenizer)
    return ordered_dataset(validation, data.batch_size, **process)
