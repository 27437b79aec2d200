"""Byte-level BPE written by hand, the GPT-2 way.

Text is split into words by the GPT-2 regex, each word is UTF-8 encoded, and its bytes
(256 base tokens) are merged pair by pair in the order the merges were learned. Every
string round-trips exactly, because every byte has a token.

On disk, tokens are written in GPT-2's printable byte alphabet (a space is 'Ġ'), so the
saved vocab and merges load unchanged into Hugging Face `tokenizers` (see
`hf_json.export_bpe`).
"""

import functools
import heapq
import itertools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from pathlib import Path

import regex

from data.tokenizer.base import BPE_FILENAME, Tokenizer, check_ids_in_range, infer_special_roles

# GPT-2's pre-tokenization: contractions, letter runs, number runs and punctuation runs
# (each with one optional leading space), and whitespace runs that leave their last space
# to the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_WORD_RE = regex.compile(GPT2_PATTERN)
_FORMAT = "lmlab-bpe"
_CACHE_LIMIT = 1 << 16


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves,
    the others to characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def token_to_str(token: bytes) -> str:
    """Bytes of a token -> its printable GPT-2 string."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str) -> bytes:
    """Inverse of `token_to_str`."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    try:
        return bytes(inverse[c] for c in text)
    except KeyError as e:
        raise ValueError(f"token {text!r} holds {e.args[0]!r}, which is not a GPT-2 byte character") from e


def _merge_pair(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replaces every non-overlapping (a, b) in `word`, left to right, by `new_id`."""
    merged, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def learn_merges(word_counts: dict[bytes, int], num_tokens: int) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Learns BPE merges from word frequencies until the vocabulary holds `num_tokens` tokens.

    Pair counts are kept up to date incrementally: a merge only revisits the words that
    hold the merged pair, and only pairs whose count changed go back on the heap.

    Args:
      word_counts: pre-tokenized word (UTF-8 bytes) -> number of occurrences.
      num_tokens: target size of the vocabulary, the 256 byte tokens included.

    Returns:
      (token_bytes, merges): the bytes of each token id (ids 0-255 are the bytes themselves),
      and the merged id pairs in the order learned. A merge whose result equals an existing
      token (the same string split another way) reuses its id, as Hugging Face's trainer does.
    """
    words = [list(word) for word in word_counts]
    freqs = list(word_counts.values())
    token_bytes = [bytes([b]) for b in range(256)]
    token_ids = {t: i for i, t in enumerate(token_bytes)}
    merges: list[tuple[int, int]] = []
    merged_pairs: set[tuple[int, int]] = set()

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    words_with_pair: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += freq
            words_with_pair[pair].add(index)
    # Max-heap by count; stale entries are skipped when popped. Ties go to the smallest
    # pair, ordering byte tokens by their printable character and merged tokens by age,
    # as Hugging Face's trainer does, so that both learn the same merges.
    printable = bytes_to_unicode()
    tie_rank = {b: rank for rank, b in enumerate(sorted(range(256), key=printable.get))}

    def heap_entry(pair, count):
        return (-count, tie_rank.get(pair[0], pair[0]), tie_rank.get(pair[1], pair[1]), pair)

    heap = [heap_entry(pair, count) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(token_bytes) < num_tokens and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue
        a, b = pair
        new_bytes = token_bytes[a] + token_bytes[b]
        new_id = token_ids.get(new_bytes)
        if new_id is None:
            new_id = len(token_bytes)
            token_bytes.append(new_bytes)
            token_ids[new_bytes] = new_id
        if pair not in merged_pairs:
            merges.append(pair)
            merged_pairs.add(pair)

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for index in words_with_pair.pop(pair):
            word, freq = words[index], freqs[index]
            merged = _merge_pair(word, a, b, new_id)
            if len(merged) == len(word):  # The set is not pruned, so the pair may be gone.
                continue
            for old in itertools.pairwise(word):
                delta[old] -= freq
            for new in itertools.pairwise(merged):
                delta[new] += freq
                words_with_pair[new].add(index)
            words[index] = merged
        for changed, change in delta.items():
            if change:
                pair_counts[changed] += change
                heapq.heappush(heap, heap_entry(changed, pair_counts[changed]))
        del pair_counts[pair]
    return token_bytes, merges


class ByteLevelBPE(Tokenizer):
    """GPT-2-style byte-level BPE. Build it with `train` or `load`."""

    def __init__(
        self,
        token_bytes: list[bytes],
        merges: list[tuple[int, int]],
        special_tokens: Collection[str] = (),
        roles: dict[str, str | None] | None = None,
    ):
        """Builds a tokenizer from its vocabulary and merges (see `train` and `load`).

        Args:
          token_bytes: bytes of each ordinary token, indexed by id; must hold all 256 bytes.
          merges: (left id, right id) pairs in priority order; each must produce a token.
          special_tokens: strings given the ids after the ordinary tokens, in order.
          roles: {'bos', 'eos', 'pad', 'mask'} -> special token or None; inferred from the names
            (GPT-2's <|endoftext|> is bos and eos) if not given.
        """
        self._token_bytes = list(token_bytes)
        ids_of_bytes = {t: i for i, t in enumerate(self._token_bytes)}
        if len(ids_of_bytes) != len(self._token_bytes):
            raise ValueError("token_bytes holds the same token twice")
        missing = [b for b in range(256) if bytes([b]) not in ids_of_bytes]
        if missing:
            raise ValueError(f"token_bytes lacks byte tokens {missing[:8]}; a byte-level BPE needs all 256")
        self._byte_ids = [ids_of_bytes[bytes([b])] for b in range(256)]
        self._merges = [(int(a), int(b)) for a, b in merges]
        self._merge_ranks = {}
        for rank, (a, b) in enumerate(self._merges):
            merged = ids_of_bytes.get(self._token_bytes[a] + self._token_bytes[b])
            if merged is None:
                raise ValueError(f"merge #{rank} ({a}, {b}) produces no token of the vocabulary")
            self._merge_ranks.setdefault((a, b), (rank, merged))

        first_special = len(self._token_bytes)
        self._special_ids = {s: first_special + i for i, s in enumerate(special_tokens)}
        if len(self._special_ids) != len(special_tokens):
            raise ValueError(f"special_tokens {list(special_tokens)} holds the same token twice")
        self._id_bytes = self._token_bytes + [s.encode("utf-8") for s in self._special_ids]
        self._roles = infer_special_roles(self._special_ids) if roles is None else dict(roles)
        for role, token in self._roles.items():
            if token is not None and token not in self._special_ids:
                raise ValueError(f"{role} token {token!r} is not among the special tokens {list(self._special_ids)}")
        self._special_re = (
            regex.compile("|".join(regex.escape(s) for s in sorted(self._special_ids, key=len, reverse=True)))
            if self._special_ids
            else None
        )
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        vocab_size: int,
        special_tokens: Collection[str] = ("<|endoftext|>",),
    ) -> "ByteLevelBPE":
        """Learns a byte-level BPE from `texts`.

        Args:
          texts: a string or an iterable of strings (e.g. documents).
          vocab_size: size of the vocabulary, the 256 byte tokens and the special tokens
            included. It may come out smaller if the text runs out of pairs to merge.
          special_tokens: strings that get ids of their own, after the learned tokens.

        Returns:
          The trained tokenizer.
        """
        num_tokens = vocab_size - len(special_tokens)
        if num_tokens < 256:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it needs at least 256 byte tokens "
                f"+ {len(special_tokens)} special tokens = {256 + len(special_tokens)}"
            )
        if isinstance(texts, str):
            texts = [texts]
        # Special tokens in the training text are boundaries, not text to learn merges from.
        special_re = regex.compile("|".join(map(regex.escape, special_tokens))) if special_tokens else None
        word_counts = Counter()
        for text in texts:
            for piece in special_re.split(text) if special_re else (text,):
                word_counts.update(_WORD_RE.findall(piece))
        token_bytes, merges = learn_merges({w.encode("utf-8"): c for w, c in word_counts.items()}, num_tokens)
        return cls(token_bytes, merges, special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token -> id."""
        return dict(self._special_ids)

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def mask_id(self) -> int | None:
        return self._role_id("mask")  # None for a file saved before the mask role existed

    def _role_id(self, role: str) -> int | None:
        token = self._roles.get(role)
        return None if token is None else self._special_ids[token]

    def _encode_word(self, word: str) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids = [self._byte_ids[b] for b in word.encode("utf-8")]
        ranks = self._merge_ranks
        no_merge = (len(self._merges), -1)
        # Apply the lowest-rank merge present, everywhere in the word, until none applies.
        while len(ids) > 1:
            rank, merged = min(ranks.get(pair, no_merge) for pair in itertools.pairwise(ids))
            if merged < 0:
                break
            a, b = self._merges[rank]
            ids = _merge_pair(ids, a, b, merged)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = result = tuple(ids)
        return result

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for word in _WORD_RE.findall(text):
            ids.extend(self._encode_word(word))
        return ids

    def encode(self, text: str, allowed_special: str | Collection[str] = ()) -> list[int]:
        """Returns the token ids of `text`.

        Args:
          text: any string.
          allowed_special: special tokens to recognize in `text`, or "all". Others are
            encoded as ordinary text, so untrusted text cannot inject e.g. an eos.

        Returns:
          The ids; no bos/eos is added.
        """
        if allowed_special == "all":
            allowed = set(self._special_ids)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self._special_ids)
            if unknown:
                raise ValueError(f"allowed_special {sorted(unknown)} are not special tokens {list(self._special_ids)}")
        if not allowed:
            return self._encode_ordinary(text)
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            if match.group() not in allowed:
                continue
            ids.extend(self._encode_ordinary(text[start : match.start()]))
            ids.append(self._special_ids[match.group()])
            start = match.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {f"{role}_token": token for role, token in self._roles.items() if token is not None}

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # Every special token is a token here, as `tokenizers` splits out its added tokens.
        ids, offsets, start = [], [], 0
        pieces = list(self._special_re.finditer(text)) if self._special_re else []
        for match in [*pieces, None]:
            end = len(text) if match is None else match.start()
            for word in _WORD_RE.finditer(text, start, end):
                self._word_offsets(word.group(), word.start(), ids, offsets)
            if match is not None:
                ids.append(self._special_ids[match.group()])
                offsets.append((match.start(), match.end()))
                start = match.end()
        return ids, offsets

    def _word_offsets(self, word: str, first: int, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        """Appends a word's ids and character spans (a token that holds part of a character's
        bytes spans that whole character, as `tokenizers` reports it)."""
        char_of_byte = [i for i, char in enumerate(word) for _ in char.encode("utf-8")]
        byte = 0
        for token_id in self._encode_word(word):
            length = len(self._id_bytes[token_id])
            offsets.append((first + char_of_byte[byte], first + char_of_byte[byte + length - 1] + 1))
            ids.append(token_id)
            byte += length

    def decode(self, ids: Iterable[int]) -> str:
        ids = check_ids_in_range(ids, self.vocab_size)
        return b"".join([self._id_bytes[i] for i in ids]).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token."""
        return self._id_bytes[check_ids_in_range([token_id], self.vocab_size)[0]]

    def vocab(self) -> dict[str, int]:
        """Ordinary tokens in GPT-2's printable byte alphabet -> id (special tokens excluded)."""
        return {token_to_str(t): i for i, t in enumerate(self._token_bytes)}

    def merges(self) -> list[tuple[str, str]]:
        """Merges as pairs of printable GPT-2 strings, in priority order."""
        return [(token_to_str(self._token_bytes[a]), token_to_str(self._token_bytes[b])) for a, b in self._merges]

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        content = {
            "format": _FORMAT,
            "version": 1,
            "pattern": GPT2_PATTERN,
            "vocab": self.vocab(),
            "merges": [list(pair) for pair in self.merges()],
            "special_tokens": self._special_ids,
            "roles": self._roles,
        }
        with open(directory / BPE_FILENAME, "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ByteLevelBPE":
        """Loads a tokenizer written by `save`, from its directory or its bpe.json."""
        path = Path(path)
        if path.is_dir():
            path = path / BPE_FILENAME
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        if content.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an lmlab byte-level BPE file (format {content.get('format')!r})")
        if content.get("pattern") != GPT2_PATTERN:
            raise ValueError(
                f"{path} uses pre-tokenization pattern {content.get('pattern')!r}; only GPT-2's is supported"
            )
        vocab = content["vocab"]
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(f"{path}: vocab ids are not 0..{len(vocab) - 1} without gaps")
        token_bytes = [b""] * len(vocab)
        for token, token_id in vocab.items():
            token_bytes[token_id] = str_to_token(token)
        try:
            merges = [(vocab[a], vocab[b]) for a, b in content["merges"]]
        except KeyError as e:
            raise ValueError(f"{path}: merge uses {e.args[0]!r}, which is not in the vocab") from e
        specials = sorted(content["special_tokens"], key=content["special_tokens"].get)
        expected = {s: len(vocab) + i for i, s in enumerate(specials)}
        if content["special_tokens"] != expected:
            raise ValueError(f"{path}: special token ids {content['special_tokens']} must follow the vocab, in order")
        return cls(token_bytes, merges, specials, content["roles"])
