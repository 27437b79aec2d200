"""Tokenizers: a hand-written byte-level BPE, and Hugging Face / SentencePiece loaders."""

from data.tokenizer.base import Tokenizer, load_tokenizer
from data.tokenizer.bpe import ByteLevelBPE

__all__ = ["ByteLevelBPE", "Tokenizer", "load_tokenizer"]
