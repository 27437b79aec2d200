"""A SentencePiece `.model`, loaded with the `sentencepiece` package, behind our interface.

Whether decode(encode(text)) == text depends on how the model was trained: the default
NFKC normalization and whitespace folding change text; `normalization_rule_name="identity"`,
`remove_extra_whitespaces=False` and `byte_fallback=True` keep it.
"""

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece

from data.tokenizer.base import SPM_FILENAME, Tokenizer, check_ids_in_range


class SentencePieceTokenizer(Tokenizer):
    """Wraps `sentencepiece.SentencePieceProcessor`; bos/eos/pad are the model's own."""

    def __init__(self, path: str | os.PathLike):
        """Loads a SentencePiece model.

        Args:
          path: a SentencePiece .model file, or a directory holding tokenizer.model
            (or exactly one other .model file).
        """
        path = Path(path)
        if path.is_dir():
            found = [path / SPM_FILENAME] if (path / SPM_FILENAME).is_file() else sorted(path.glob("*.model"))
            if len(found) != 1:
                raise ValueError(
                    f"directory {path} holds {len(found)} .model files ({[p.name for p in found]}); "
                    f"expected {SPM_FILENAME} or a single .model file"
                )
            path = found[0]
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"could not load {path} as a SentencePiece .model: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @staticmethod
    def _id_or_none(token_id: int) -> int | None:
        return None if token_id < 0 else token_id  # SentencePiece says -1 for "none".

    @property
    def bos_id(self) -> int | None:
        return self._id_or_none(self._processor.bos_id())

    @property
    def eos_id(self) -> int | None:
        return self._id_or_none(self._processor.eos_id())

    @property
    def pad_id(self) -> int | None:
        return self._id_or_none(self._processor.pad_id())

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._processor.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode(check_ids_in_range(ids, self.vocab_size))

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPM_FILENAME).write_bytes(self._processor.serialized_model_proto())
