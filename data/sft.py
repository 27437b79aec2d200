"""Supervised fine-tuning data: chat JSONL -> token ids with an assistant mask -> packed rows.

    lines -> encode (chat template, data.chat) -> next-token pairs -> [shuffle, repeat]
          -> bins of whole conversations (none | greedy | bfd) -> rows -> batch -> this process's rows

Sources (`SOURCE_FORMS`): `files:PATH.jsonl[,PATH...]` (globs allowed), or `pydoc_chat`
(`data.pydoc_chat`, written to `data_dir/pydoc_chat.jsonl` on first use). Each line is one
JSON object:
  * `{"messages": [{"role", "content"}, ...]}` (system / user / assistant, multi-turn):
    rendered with the chat template (`data.chat.render`): `SFTConfig.template`, else the
    tokenizer's own, else the built-in ChatML. The loss covers exactly the tokens the
    template marks as the assistant's (`{% generation %}`), which the built-in templates end
    with the end-of-turn token.
  * `{"prompt": str, "completion": str}`: with a chat template (`SFTConfig.template` or the
    tokenizer's), a user turn and an assistant turn, as above. Without one, plain text:
    `[bos] + prompt + completion + [eos]` (bos: the tokenizer's BOS, else its EOS, as in
    pretraining), the loss on the completion and the EOS.
  * `{"prompt": [messages], "completion": [messages]}` (TRL's conversational
    prompt-completion): the messages of both, the loss on the assistant tokens that follow
    the prompt rendered with its generation prompt.

A conversation of more than `seq_len + 1` tokens keeps its first `seq_len + 1` (its first
`seq_len` next-token pairs; TRL's `keep_start`); one left with no assistant token is
dropped, as TRL drops fully masked examples. The last `validation_fraction` of the lines
(at least one when there are two or more) are the validation split.

A row holds whole conversations (never one cut across rows), laid out as `data.packing`'s
rows: `inputs`, `targets` (the next tokens), `segment_ids` (1, 2, ... per conversation, 0 on
padding), `positions` (from 0 in each conversation) and `loss_mask` (1 exactly on targets
that are assistant tokens), int32 [rows, seq_len]. Conversations are binned in windows of
`pack_window` (as TRL packs per `datasets.map` batch): `none` one per row, `greedy` in order
(the next conversation that does not fit starts a new row), `bfd` best-fit decreasing (TRL's
`bfd`). Every conversation is tokenized when the data is opened (bad lines fail before any
training, naming the file and line), and kept in memory; each process does this itself and
keeps its own rows of every global batch (`data.pipeline.process_rows`). The iterators are
grain's: `get_state()` / `set_state()` resume exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data import chat, jsonl, packing, pipeline, pydoc_chat

SOURCE_FORMS = "'files:PATH.jsonl[,PATH...]' (chat JSONL, globs allowed) or 'pydoc_chat' (lmlab's chat data)"
LINE_FORMS = '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}'


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """How conversations become rows (the data config says what to read and the row shape).

    Attributes:
      template: "" (the tokenizer's chat template; ChatML for `messages` when it has none),
        a built-in name ('chatml', 'llama3') or a Jinja string.
      packing: 'none' | 'greedy' | 'bfd' (`data.packing.BIN_STRATEGIES`).
      pack_window: conversations binned together.
    """

    template: str = ""
    packing: str = "greedy"
    pack_window: int = 1000

    def __post_init__(self):
        if self.packing not in packing.BIN_STRATEGIES:
            raise ValueError(f"config key `sft.packing`={self.packing!r}; expected one of {packing.BIN_STRATEGIES}")
        if self.pack_window < 1:
            raise ValueError(f"config key `sft.pack_window`={self.pack_window}; expected >= 1")


def pydoc_chat_path(data: pipeline.DataConfig) -> str:
    """Where the `pydoc_chat` source is written: data_dir/pydoc_chat.jsonl."""
    return os.path.join(data.data_dir or ".", "pydoc_chat.jsonl")


def check_source(data: pipeline.DataConfig) -> tuple[str, ...]:
    """The JSONL files the source names (`pydoc_chat`'s, written or not); reads and writes
    nothing, so a run checks its config with it before any work.

    Raises:
      ValueError: a source of another form, or a file that does not exist.
    """
    if data.source == "pydoc_chat":
        return (pydoc_chat_path(data),)
    return jsonl.file_paths(data.source, reads="fine-tuning reads", lines="chat lines", forms=SOURCE_FORMS)


def source_paths(data: pipeline.DataConfig) -> tuple[str, ...]:
    """The JSONL files of the data config's source (writing `pydoc_chat`'s if needed)."""
    paths = check_source(data)
    if data.source == "pydoc_chat" and not os.path.isfile(paths[0]):
        pydoc_chat.write_jsonl(paths[0])
    return paths


def _pairs(ids: list[int], mask: list[int], seq_len: int) -> dict[str, np.ndarray] | None:
    """Next-token pairs of a conversation's first seq_len + 1 tokens; None if no loss is left."""
    ids_S, mask_S = np.asarray(ids[:seq_len + 1], np.int32), np.asarray(mask[:seq_len + 1], np.int32)
    if not mask_S[1:].any():
        return None
    return {"inputs": ids_S[:-1], "targets": ids_S[1:], "loss_mask": mask_S[1:]}


def _plain(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos token to end a completion; give a chat template (sft.chat_template)")
    start = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
    prompt_ids, completion_ids = tokenizer.encode(prompt), tokenizer.encode(completion)
    ids = [start, *prompt_ids, *completion_ids, tokenizer.eos_id]
    return ids, [0] * (1 + len(prompt_ids)) + [1] * (len(completion_ids) + 1)


def _with_prompt(tokenizer: Any, prompt: list, completion: list, template: str) -> tuple[list[int], list[int]]:
    # TRL's conversational prompt-completion: the completion starts where the prompt (with
    # its generation prompt) and the whole conversation first differ.
    prompt_ids, _ = chat.render(tokenizer, prompt, add_generation_prompt=True, template=template)
    ids, mask = chat.render(tokenizer, prompt + completion, template=template)
    common = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    return ids, [bit if i >= common else 0 for i, bit in enumerate(mask)]


def chat_template(tokenizer: Any, template: str = "") -> str:
    """The template conversations are rendered with: `template`, else the tokenizer's, else ChatML."""
    return template or getattr(tokenizer, "chat_template", None) or "chatml"


def end_of_turn(tokenizer: Any, template: str = "") -> str:
    """The text the chat template writes after an assistant's content inside its `{% generation %}`
    block (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`): where a generated reply ends."""
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "A"}]
    text, spans = chat.render_text(tokenizer, probe, template=chat_template(tokenizer, template))
    if not spans or text[spans[-1][0]:spans[-1][0] + 1] != "A":
        return ""
    return text[spans[-1][0] + 1:spans[-1][1]]


def encode_record(tokenizer: Any, record: Any, template: str = "") -> tuple[list[int], list[int]]:
    """One JSONL record -> (ids, loss mask over the ids); see the module docstring.

    Raises:
      ValueError: a record of neither form, a conversation without an assistant turn, a
        template that fails or marks no assistant token.
    """
    own = template or getattr(tokenizer, "chat_template", None) or ""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        roles = [m.get("role") for m in messages] if isinstance(messages, list) and all(
            isinstance(m, dict) for m in messages) else None
        if roles is None:
            raise ValueError(f'"messages" must be a list of {{"role", "content"}} objects, got {messages!r:.60}')
        if "assistant" not in roles:
            raise ValueError(f"the conversation has no assistant turn (roles {roles}); add "
                             '{"role": "assistant", "content": ...}, the text the loss trains on')
        ids, mask = chat.render(tokenizer, messages, template=own or "chatml")
    elif isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            ids, mask = _with_prompt(tokenizer, prompt, completion, own or "chatml")
        elif isinstance(prompt, str) and isinstance(completion, str):
            if not own:
                return _plain(tokenizer, prompt, completion)
            ids, mask = chat.render(tokenizer, [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": completion}], template=own)
        else:
            raise ValueError('"prompt" and "completion" must both be strings or both lists of messages')
    else:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"a line must be {LINE_FORMS}; found {keys}")
    if not any(mask):
        raise ValueError("the chat template marks no assistant token (it has no {% generation %} tags); set "
                         "sft.chat_template=chatml (or llama3), or use a template with {% generation %}...{% "
                         "endgeneration %} around each assistant turn")
    return ids, mask


def read_conversations(paths: Sequence[str], tokenizer: Any, template: str = "") -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of every line of `paths`, in order.

    Raises:
      ValueError: one line naming the file, the line number, the problem and the fix.
    """
    encoded = []
    for path, number, record in jsonl.records(paths, kind="conversation", forms=LINE_FORMS):
        try:
            encoded.append(encode_record(tokenizer, record, template))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return encoded


@functools.lru_cache(maxsize=4)
def _splits(paths: tuple[str, ...], stamps: tuple, tokenizer: Any, template: str, seq_len: int,
            validation_fraction: float) -> tuple[list[dict], list[dict]]:
    del stamps  # part of the cache key only: an edited file is read again
    encoded = read_conversations(paths, tokenizer, template)
    held_out = round(len(encoded) * validation_fraction)
    held_out = max(held_out, 1) if validation_fraction > 0 and len(encoded) >= 2 else held_out
    train, validation = encoded[:len(encoded) - held_out], encoded[len(encoded) - held_out:]

    def pairs(split):
        return [p for p in (_pairs(ids, mask, seq_len) for ids, mask in split) if p is not None]

    return pairs(train), pairs(validation)


def examples(data: pipeline.DataConfig, sft: SFTConfig, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    """(train, validation) conversations as next-token pairs {inputs, targets, loss_mask}."""
    paths = source_paths(data)
    stamps = tuple(os.stat(p).st_mtime_ns for p in paths)
    return _splits(paths, stamps, tokenizer, sft.template, data.seq_len, data.validation_fraction)


def conversation_row(conversations: Sequence[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Lays whole conversations' pairs end to end in one row of `seq_len` (zero padding)."""
    row_T = {name: np.zeros(seq_len, np.int32) for name in packing.ROW_FEATURES}
    filled = 0
    for segment, conversation in enumerate(conversations, start=1):
        span = slice(filled, filled + len(conversation["inputs"]))
        for name in ("inputs", "targets", "loss_mask"):
            row_T[name][span] = conversation[name]
        row_T["segment_ids"][span] = segment
        row_T["positions"][span] = np.arange(span.stop - span.start)
        filled = span.stop
    return row_T


class PackedConversations(grain.IterDataset):
    """Bins whole conversations into rows, `window` conversations at a time (module docstring)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, strategy: str, window: int):
        super().__init__(parent)
        self._seq_len, self._strategy, self._window = seq_len, strategy, window

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedConversationsIterator(self._parent.__iter__(), self._seq_len, self._strategy, self._window)

    def __str__(self) -> str:
        return f"PackedConversations(seq_len={self._seq_len}, strategy={self._strategy}, window={self._window})"


class _PackedConversationsIterator(grain.DatasetIterator):
    """The state is the parent's state before the current window and the rows it has given."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, strategy: str, window: int):
        super().__init__(parent)
        self._seq_len, self._strategy, self._window = seq_len, strategy, window
        self._window_state = parent.get_state()
        self._rows: list[list[dict]] = []
        self._given = 0

    def _fill(self) -> None:
        self._window_state, conversations = self._parent.get_state(), []
        for _ in range(self._window):
            try:
                conversations.append(next(self._parent))
            except StopIteration:
                break
        bins = packing.pack_bins([len(c["inputs"]) for c in conversations], self._seq_len, self._strategy)
        self._rows, self._given = [[conversations[i] for i in b] for b in bins], 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._given == len(self._rows):
            self._fill()
            if not self._rows:
                raise StopIteration
        self._given += 1
        return conversation_row(self._rows[self._given - 1], self._seq_len)

    def get_state(self) -> dict[str, Any]:
        if self._given == len(self._rows):  # the next row starts a new window
            return {"parent": self._parent.get_state(), "given": 0}
        return {"parent": self._window_state, "given": self._given}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._rows, self._given = [], 0
        if state["given"]:
            self._fill()  # the same window packs into the same rows
            self._given = int(state["given"])


def train_dataset(data: pipeline.DataConfig, sft: SFTConfig, tokenizer: Any, *, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """This process's training batches: conversations shuffled each epoch, packed, rows
    shuffled in windows, batched (the last partial batch of a finite run dropped), sliced.

    Args:
      data: what to read and the row shape (source, seq_len, batch_size, seed, shuffle,
        shuffle_window, validation_fraction, num_epochs, data_dir).
      sft: templates and packing.
      tokenizer: a `data.tokenizer.Tokenizer`.
      process_index, process_count: jax's by default (parameters so tests simulate hosts).

    Returns:
      A `grain.IterDataset` whose iterator has `get_state()` / `set_state()`.
    """
    rows = pipeline.process_rows(data.batch_size, process_index, process_count)
    train, _ = examples(data, sft, tokenizer)
    if not train:
        raise ValueError(f"data.source={data.source!r} leaves no training conversation with assistant tokens "
                         f"within seq_len={data.seq_len}")
    conversations = grain.MapDataset.source(train)
    if data.shuffle:
        conversations = conversations.shuffle(seed=data.seed)
    conversations = conversations.repeat(data.num_epochs).to_iter_dataset()
    packed = PackedConversations(conversations, data.seq_len, sft.packing, sft.pack_window)
    if data.shuffle and data.shuffle_window > 1:
        packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=data.shuffle_window, seed=data.seed)
    batches = packed.batch(data.batch_size, drop_remainder=True)
    return batches.map(functools.partial(pipeline._take_rows, rows=rows))


def train_iterator(data: pipeline.DataConfig, sft: SFTConfig, tokenizer: Any, **process) -> grain.DatasetIterator:
    """`iter(train_dataset(...))`: the checkpointable iterator of training batches."""
    return iter(train_dataset(data, sft, tokenizer, **process))


def eval_dataset(data: pipeline.DataConfig, sft: SFTConfig, tokenizer: Any, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """This process's validation batches: every validation conversation once, in file order,
    packed like training; the last global batch padded with rows whose loss_mask is 0. Each
    `iter()` starts again from the beginning. Arguments are those of `train_dataset`."""
    rows = pipeline.process_rows(data.batch_size, process_index, process_count)
    _, validation = examples(data, sft, tokenizer)
    packed = PackedConversations(grain.MapDataset.source(validation).to_iter_dataset(), data.seq_len, sft.packing,
                                 sft.pack_window)
    batches = packed.batch(data.batch_size, drop_remainder=False)
    batches = batches.map(functools.partial(pipeline._pad_rows, batch_size=data.batch_size))
    return batches.map(functools.partial(pipeline._take_rows, rows=rows))


def eval_batches(data: pipeline.DataConfig, sft: SFTConfig, tokenizer: Any, **process) -> list[dict[str, np.ndarray]]:
    """`list(eval_dataset(...))`, for tests and notebooks."""
    return list(eval_dataset(data, sft, tokenizer, **process))


def padding_fractions(data: pipeline.DataConfig, sft: SFTConfig, tokenizer: Any) -> dict[str, float]:
    """The padding share of the training rows under each packing strategy, on the same
    conversations in file order, binned in windows of `sft.pack_window`."""
    train, _ = examples(data, sft, tokenizer)
    lengths = [len(c["inputs"]) for c in train]
    return {strategy: packing.padding_fraction(lengths, data.seq_len, strategy, sft.pack_window)
            for strategy in packing.BIN_STRATEGIES}
