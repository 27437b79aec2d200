"""`load_tokenizer`: the implementation for a path, detected from its format.

Three formats load behind the one `Tokenizer` interface:
  * a directory written by `ByteLevelBPE.save` (it holds `bpe.json`),
  * a Hugging Face `tokenizer.json` (the file, or a directory holding it), or a BERT
    `vocab.txt` (WordPiece; the file, or a directory holding it and no tokenizer.json),
  * a SentencePiece `.model` (the file, or a directory holding `tokenizer.model`).

The dispatch lives here, not in `base`, so that the implementations import the interface
and this module imports them, with no cycle.
"""

import json
import os
from pathlib import Path

from data.tokenizer.base import BPE_FILENAME, HF_FILENAME, SPM_FILENAME, Tokenizer

ACCEPTED_FORMATS = (
    f"a directory saved by ByteLevelBPE.save (holding {BPE_FILENAME}), "
    f"a Hugging Face {HF_FILENAME} file or a directory holding one, a BERT vocab.txt (or its directory), "
    f"or a SentencePiece .model file or a directory holding {SPM_FILENAME}; "
    "a 'bpe:', 'hf:' or 'spm:' prefix forces the format"
)
_FORMAT_PREFIXES = ("bpe", "hf", "spm")


def _split_spec(path_or_spec: str | os.PathLike) -> tuple[str | None, Path]:
    spec = os.fspath(path_or_spec)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _FORMAT_PREFIXES:
        return prefix, Path(rest)
    return None, Path(spec)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        for filename, kind in ((BPE_FILENAME, "bpe"), (HF_FILENAME, "hf"), (SPM_FILENAME, "spm")):
            if (path / filename).is_file():
                return kind
        if (path / "vocab.txt").is_file():
            return "hf"
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return "spm"
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ValueError(f"directory {path} holds no tokenizer (found {found}); expected {ACCEPTED_FORMATS}")
    if path.suffix == ".model":
        return "spm"
    if path.name == "vocab.txt":
        return "hf"
    if path.suffix == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                content = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"tokenizer file {path} is not readable JSON ({e}); expected {ACCEPTED_FORMATS}") from e
        if isinstance(content, dict) and content.get("format") == "lmlab-bpe":
            return "bpe"
        if isinstance(content, dict) and "model" in content:
            return "hf"
        raise ValueError(
            f"JSON file {path} is neither an lmlab bpe.json nor a Hugging Face tokenizer.json "
            f"(no 'format' or 'model' key); expected {ACCEPTED_FORMATS}"
        )
    raise ValueError(f"tokenizer file {path} has an unknown format; expected {ACCEPTED_FORMATS}")


def load_tokenizer(path_or_spec: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer, detecting its format from the path.

    Args:
      path_or_spec: a path (see the module docstring for the accepted formats), optionally
        prefixed with 'bpe:', 'hf:' or 'spm:' to force the format.

    Returns:
      A `Tokenizer`.
    """
    kind, path = _split_spec(path_or_spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist; expected {ACCEPTED_FORMATS}")
    kind = kind or _detect_format(path)
    # Imported here: each format pulls in its own library, needed only when used.
    if kind == "bpe":
        from data.tokenizer.bpe import ByteLevelBPE

        return ByteLevelBPE.load(path)
    if kind == "hf":
        from data.tokenizer.hf_json import HFJsonTokenizer

        return HFJsonTokenizer(path)
    from data.tokenizer.spm import SentencePieceTokenizer

    return SentencePieceTokenizer(path)
