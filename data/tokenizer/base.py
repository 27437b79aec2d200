"""The tokenizer interface shared by every tokenizer in lmlab (`data.tokenizer.load` picks
the implementation for a path)."""

import abc
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

BPE_FILENAME = "bpe.json"
HF_FILENAME = "tokenizer.json"
SPM_FILENAME = "tokenizer.model"
# Written next to a saved tokenizer.json / tokenizer.model to keep the bos/eos/pad roles,
# the way Hugging Face keeps them outside tokenizer.json.
HF_CONFIG_FILENAME = "tokenizer_config.json"


class Tokenizer(abc.ABC):
    """Text <-> token ids. Implementations must make `decode(encode(text)) == text`
    where their format allows it (byte-level BPE does for every string)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included: ids lie in [0, vocab_size)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text`; no bos/eos is added."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Returns `[encode(t) for t in texts]`; implementations may do it faster."""
        return [self.encode(text) for text in texts]

    def encode_with_specials(self, text: str) -> list[int]:
        """`encode(text)` inside the special tokens the tokenizer's own template adds (a LLaMA
        tokenizer.json's leading bos), as transformers' `encode(text)` with its default
        add_special_tokens=True gives them (what lm-eval's `hf` backend scores); here none."""
        return self.encode(text)

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None if the vocabulary has none."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or None if the vocabulary has none."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int | None:
        """Id of the padding token, or None if the vocabulary has none."""

    @property
    def mask_id(self) -> int | None:
        """Id of the mask token of masked-LM training ([MASK], <mask>), or None if there is none."""
        return None

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own Jinja chat template (a Hugging Face directory's), or None."""
        return None

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens ({'bos_token': ..., 'eos_token': ...}), the variables a chat
        template sees, as transformers' `special_tokens_map`."""
        return {}

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Encodes text in which special and added tokens are tokens, not text (a rendered chat
        template), the way transformers encodes it; with each token's character span.

        Returns:
          (ids, offsets): the ids, no bos/eos added, and (start, end) character offsets of
          each token in `text`.
        """
        raise ValueError(f"{type(self).__name__} cannot encode rendered chat templates; use a byte-level BPE "
                         "(lmlab's) or a Hugging Face tokenizer.json")

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Writes the tokenizer into `directory` (created if needed) so that
        `load_tokenizer(directory)` gives it back."""


def check_ids_in_range(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Returns `ids` as a list of Python ints; raises ValueError on an id outside the vocabulary."""
    ids = [int(i) for i in ids]
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ValueError(f"token id {bad} is out of range: ids must lie in [0, {vocab_size})")
    return ids


# Special-token names that usually carry a role, for formats that do not record roles.
# GPT-2's <|endoftext|> serves as both bos and eos.
_ROLE_CANDIDATES = {
    "bos": ("<|endoftext|>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]"),
    "eos": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
    "mask": ("[MASK]", "<mask>"),
}


def infer_special_roles(special_tokens: Iterable[str]) -> dict[str, str | None]:
    """Guesses {'bos', 'eos', 'pad', 'mask'} -> token from well-known special-token names."""
    present = set(special_tokens)
    return {role: next((name for name in names if name in present), None) for role, names in _ROLE_CANDIDATES.items()}


# Named special tokens of transformers' `special_tokens_map` (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# transformers >= 4.43 keeps the chat template in its own file, read before tokenizer_config.json's.
CHAT_TEMPLATE_FILENAME = "chat_template.jinja"


def _read_tokenizer_config(directory: Path) -> dict | None:
    config_path = directory / HF_CONFIG_FILENAME
    if not config_path.is_file():
        return None
    with open(config_path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token) -> str | None:
    # Hugging Face may store an AddedToken as {"content": ..., ...}.
    return token.get("content") if isinstance(token, dict) else token


def read_role_config(directory: Path) -> dict[str, str | None] | None:
    """Reads bos/eos/pad/mask tokens from `directory/tokenizer_config.json`, or None if absent."""
    config = _read_tokenizer_config(directory)
    if config is None:
        return None
    return {role: _token_content(config.get(f"{role}_token")) for role in ("bos", "eos", "pad", "mask")}


def read_special_tokens_map(directory: Path) -> dict[str, str]:
    """The named special tokens of `directory/tokenizer_config.json` ({} if absent), as
    transformers' `special_tokens_map` gives them to a chat template."""
    config = _read_tokenizer_config(directory) or {}
    named = {f"{name}_token": _token_content(config.get(f"{name}_token")) for name in SPECIAL_TOKEN_NAMES}
    return {key: str(token) for key, token in named.items() if token is not None}


def read_chat_template(directory: Path) -> str | None:
    """The chat template of a Hugging Face directory: chat_template.jinja, else the
    tokenizer_config.json `chat_template` (a string, or a list of named templates whose
    'default' is used), else None."""
    if (directory / CHAT_TEMPLATE_FILENAME).is_file():
        return (directory / CHAT_TEMPLATE_FILENAME).read_text(encoding="utf-8")
    template = (_read_tokenizer_config(directory) or {}).get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def write_role_config(directory: Path, roles: dict[str, str | None], chat_template: str | None = None,
                      extra: dict[str, str] | None = None) -> None:
    """Writes bos/eos/pad/mask tokens (and the chat template and `extra` named special tokens
    such as unk_token, if given) to `directory/tokenizer_config.json`."""
    config = {f"{role}_token": token for role, token in roles.items()}
    config.update(extra or {})
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(directory / HF_CONFIG_FILENAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
