"""A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library, behind our interface.

A BERT `vocab.txt` (WordPiece, with `do_lower_case` etc. from a `tokenizer_config.json` beside it)
loads into the same class, built as transformers' `BertTokenizerFast` builds it.

Also `export_bpe`, which writes our byte-level BPE as a tokenizer.json that `tokenizers`
(and so `transformers`) can load.
"""

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from data.tokenizer.base import (
    HF_CONFIG_FILENAME,
    HF_FILENAME,
    Tokenizer,
    check_ids_in_range,
    infer_special_roles,
    read_chat_template,
    read_role_config,
    read_special_tokens_map,
    write_role_config,
)
from data.tokenizer.bpe import ByteLevelBPE


class HFJsonTokenizer(Tokenizer):
    """Wraps `tokenizers.Tokenizer`. bos/eos/pad/mask come from a `tokenizer_config.json` beside
    the file if there is one, else from well-known special-token names; the chat template and
    the named special tokens a template sees come from the directory as transformers reads them
    (`chat_template.jinja`, else tokenizer_config.json's `chat_template`)."""

    def __init__(self, path: str | os.PathLike):
        """Loads a tokenizer.json (or a BERT vocab.txt).

        Args:
          path: a tokenizer.json or vocab.txt file, or a directory holding one.
        """
        path = Path(path)
        if path.is_dir():
            path = path / HF_FILENAME if (path / HF_FILENAME).is_file() else path / VOCAB_FILENAME
        try:
            if path.name == VOCAB_FILENAME:
                self._tokenizer = wordpiece_from_vocab(path)
            else:
                self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception.
            raise ValueError(f"could not load {path} as a Hugging Face tokenizer.json or vocab.txt: {e}") from e
        # A tokenizer.json may fix padding and truncation (MiniLM's pad every text to 128 tokens):
        # those are batching choices of the caller, not part of encoding. Kept for `save`.
        self._padding, self._truncation = self._tokenizer.padding, self._tokenizer.truncation
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._specials = _special_token_names(path.parent)
        specials = [t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special]
        roles = read_role_config(path.parent) or infer_special_roles(specials)
        self._roles = roles
        self._chat_template = read_chat_template(path.parent)
        self._special_tokens_map = read_special_tokens_map(path.parent)
        self._role_ids = {}
        for role, token in roles.items():
            token_id = None if token is None else self._tokenizer.token_to_id(token)
            if token is not None and token_id is None:
                raise ValueError(f"{path}: {role} token {token!r} is not in the vocabulary")
            self._role_ids[role] = token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._role_ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._role_ids["eos"]

    @property
    def pad_id(self) -> int | None:
        return self._role_ids["pad"]

    @property
    def mask_id(self) -> int | None:
        return self._role_ids.get("mask")

    @property
    def cls_id(self) -> int | None:
        """Id of the classification token that starts BERT inputs ([CLS]), or None."""
        return self._tokenizer.token_to_id(self._specials["cls"])

    @property
    def sep_id(self) -> int | None:
        """Id of the separator that ends each BERT segment ([SEP]), or None."""
        return self._tokenizer.token_to_id(self._specials["sep"])

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special_tokens_map)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # What transformers' apply_chat_template does: the backend's encode, added tokens split
        # out, no post-processor tokens, and the encoding's own offsets for the assistant mask.
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(offset) for offset in encoding.offsets]

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no template bos/eos, to match the interface.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_specials(self, text: str) -> list[int]:
        # The tokenizer.json's post-processor (TemplateProcessing), as transformers applies it.
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = check_ids_in_range(ids, self.vocab_size)
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        saved = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
        if self._padding:
            saved.enable_padding(**{k: v for k, v in self._padding.items() if k != "length"},
                                 **({"length": self._padding["length"]} if self._padding.get("length") else {}))
        if self._truncation:
            saved.enable_truncation(**self._truncation)
        saved.save(str(directory / HF_FILENAME))
        extra = {k: v for k, v in self._special_tokens_map.items() if k.removesuffix("_token") not in self._roles}
        write_role_config(directory, self._roles, self._chat_template, extra)


VOCAB_FILENAME = "vocab.txt"


def _tokenizer_config(directory: Path) -> dict:
    path = directory / HF_CONFIG_FILENAME
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special_token_names(directory: Path) -> dict[str, str]:
    config = _tokenizer_config(directory)
    names = {"cls": config.get("cls_token") or "[CLS]", "sep": config.get("sep_token") or "[SEP]"}
    return {k: v.get("content") if isinstance(v, dict) else v for k, v in names.items()}


def wordpiece_from_vocab(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """A BERT WordPiece tokenizer from `vocab.txt`, as transformers' BertTokenizerFast builds it:
    BertNormalizer (lowercase = `do_lower_case`, default True, from tokenizer_config.json beside
    the file), BertPreTokenizer, WordPiece with `##` continuations."""
    path = Path(path)
    config = _tokenizer_config(path.parent)
    with open(path, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    unk = config.get("unk_token") or "[UNK]"
    if unk not in vocab:
        raise ValueError(f"has no unknown token {unk!r} (a BERT vocab.txt lists it, usually on line 101)")
    tokenizer = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    specials = [config.get(k) or d for k, d in (("pad_token", "[PAD]"), ("unk_token", "[UNK]"),
                                               ("cls_token", "[CLS]"), ("sep_token", "[SEP]"),
                                               ("mask_token", "[MASK]"))]
    tokenizer.add_special_tokens([t for t in specials if t in vocab])
    return tokenizer


def export_bpe(bpe: ByteLevelBPE, path: str | os.PathLike) -> None:
    """Writes `bpe` as a Hugging Face tokenizer.json (GPT-2 layout) at `path`.

    `tokenizers` then encodes any text to the same ids as `bpe.encode(text, allowed_special="all")`.
    """
    model = models.BPE(vocab=bpe.vocab(), merges=bpe.merges())
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = sorted(bpe.special_tokens, key=bpe.special_tokens.get)
    tokenizer.add_special_tokens(specials)
    for token, token_id in bpe.special_tokens.items():
        if tokenizer.token_to_id(token) != token_id:
            raise AssertionError(f"special token {token!r} got id {tokenizer.token_to_id(token)}, not {token_id}")
    tokenizer.save(str(path))
