"""Documents -> fixed-length training rows: next-token pairs, packed several to a row.

A document's ids `[start] + encode(text) + [eos]` become the pairs
`inputs = ids[:-1]`, `targets = ids[1:]`, so every target is the next token of its own
document, and every token of the text, and the EOS, is a target exactly once. `start` is
the tokenizer's BOS, or its EOS where it has no BOS (GPT-2's convention).

`PackedRows` lays the pairs of consecutive documents end to end in rows of `seq_len`,
splitting a document that does not fit into the next row(s). A row holds
  * `inputs`, `targets`: the token pairs (0 on padding);
  * `segment_ids`: 1, 2, 3, ... for each document piece in the row, 0 on padding;
  * `positions`: 0, 1, 2, ... from the start of each piece. A document continued from the
    previous row counts again from 0: attention cannot see the previous row, and learned
    position tables stay within `seq_len`;
  * `loss_mask`: 1 where `targets` is a real next token, i.e. `segment_ids > 0`. No pair
    crosses a document boundary, by construction.
Only the last row of a finite stream has padding.

Axis letters: T sequence length.
"""

import bisect
from typing import Any

import grain
import numpy as np

ROW_FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def document_pairs(token_ids: list[int], *, start_id: int, eos_id: int) -> dict[str, np.ndarray]:
    """Returns `{'inputs', 'targets'}` of one document: its ids framed by start and EOS, shifted."""
    ids = np.asarray([start_id, *token_ids, eos_id], dtype=np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:]}


class PackedRows(grain.IterDataset):
    """Packs `document_pairs` elements into rows of `seq_len` (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be at least 1")
        self._seq_len = seq_len

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self._seq_len)

    def __str__(self) -> str:
        return f"PackedRows(seq_len={self._seq_len})"


class _PackedRowsIterator(grain.DatasetIterator):
    """The state is the parent's state before the document being cut, and the cut offset."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._document: dict[str, np.ndarray] | None = None  # the document being cut, if any
        self._document_state: dict[str, Any] = parent.get_state()  # parent state before it
        self._offset = 0  # tokens of `_document` already written to rows

    def __next__(self) -> dict[str, np.ndarray]:
        row_T = {name: np.zeros(self._seq_len, np.int32) for name in ROW_FEATURES}
        filled, segment = 0, 0
        while filled < self._seq_len:
            if self._document is None:
                self._document_state = self._parent.get_state()
                try:
                    self._document = next(self._parent)
                except StopIteration:
                    self._document = None
                    break
                self._offset = 0
            length = len(self._document["inputs"])
            take = min(self._seq_len - filled, length - self._offset)
            source, dest = slice(self._offset, self._offset + take), slice(filled, filled + take)
            segment += 1
            row_T["inputs"][dest] = self._document["inputs"][source]
            row_T["targets"][dest] = self._document["targets"][source]
            row_T["segment_ids"][dest] = segment
            row_T["positions"][dest] = np.arange(take)
            filled += take
            self._offset += take
            if self._offset == length:
                self._document = None
        if filled == 0:
            raise StopIteration
        row_T["loss_mask"] = (row_T["segment_ids"] > 0).astype(np.int32)
        return row_T

    def get_state(self) -> dict[str, Any]:
        if self._document is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._document_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._document, self._offset = None, 0
        if state["offset"]:
            # Re-read the document that was being cut and skip what earlier rows took.
            self._document_state = state["parent"]
            self._document = next(self._parent)
            self._offset = int(state["offset"])


# Whole sequences into bins of `capacity` tokens (supervised fine-tuning: a conversation is
# never cut across rows). A bin is a list of indices into `lengths`.
BIN_STRATEGIES = ("none", "greedy", "bfd")


def next_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Greedy fill in order: a sequence that does not fit the rest of the current bin starts
    the next one (the fill of `PackedRows`, without cutting a sequence across bins)."""
    bins: list[list[int]] = []
    space = 0
    for index, length in enumerate(lengths):
        if not bins or length > space:
            bins.append([])
            space = capacity
        bins[-1].append(index)
        space -= length
    return bins


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing, as TRL's `bfd` packing: longest first, each into the bin whose free
    space is the smallest that still holds it (among equal spaces, the bin that reached that
    space first), else a new bin. Bins come out in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int, int]] = []  # sorted (space, arrival stamp, bin), spaces in (0, capacity)
    for stamp, index in enumerate(order):
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1, -1))
        if slot < len(free):
            space, _, target = free.pop(slot)
        else:
            space, target = capacity, len(bins)
            bins.append([])
        bins[target].append(index)
        if space - length > 0:
            bisect.insort(free, (space - length, stamp, target))
    return bins


def pack_bins(lengths: list[int], capacity: int, strategy: str) -> list[list[int]]:
    """Bins of sequence indices by `strategy` ('none': one per bin, 'greedy', 'bfd').

    Raises:
      ValueError: an unknown strategy, or a sequence longer than `capacity`.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit in {capacity}; truncate it first")
    if strategy == "none":
        return [[index] for index in range(len(lengths))]
    if strategy == "greedy":
        return next_fit(lengths, capacity)
    if strategy == "bfd":
        return best_fit_decreasing(lengths, capacity)
    raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {BIN_STRATEGIES}")


def padding_fraction(lengths: list[int], capacity: int, strategy: str, window: int = 0) -> float:
    """The share of row slots left as padding when `lengths` are packed by `strategy`, in
    windows of `window` sequences (0: all at once), as `data.sft` packs them."""
    window = window or max(len(lengths), 1)
    rows = sum(len(pack_bins(lengths[start:start + window], capacity, strategy))
               for start in range(0, len(lengths), window))
    return 1.0 - sum(lengths) / (rows * capacity) if rows else 0.0
