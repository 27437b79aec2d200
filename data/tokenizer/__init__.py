"""Tokenizers: a hand-written byte-level BPE, and Hugging Face / SentencePiece loaders."""

from data.tokenizer.base import Tokenizer
from data.tokenizer.bpe import ByteLevelBPE
from data.tokenizer.load import load_tokenizer

__all__ = ["ByteLevelBPE", "Tokenizer", "load_tokenizer"]
