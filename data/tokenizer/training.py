"""Training a byte-level BPE on a bounded, seeded, streamed sample of a corpus.

    documents (random access) -> seeded order -> take up to `max_bytes` of text -> trainer

Two trainers learn the same GPT-2 byte-level BPE (the GPT-2 regex, 256 byte tokens, merges
by count with ties to the smallest pair):
  * `lmlab`: `ByteLevelBPE.train`, written by hand in Python (the default and the teaching
    code; its time grows with the number of distinct words in the sample);
  * `tokenizers`: Hugging Face's `BpeTrainer` in Rust, for large samples. Its merges are
    converted to our numbering (byte tokens 0-255, merged tokens in the order learned,
    special tokens last), so both trainers give the same ids wherever they learn the same
    merges, and it is saved as a `tokenizer.json` (with `tokenizer_config.json` for the
    roles), which `load_tokenizer` reads and the `tokenizers` library encodes fast.

Neither holds the sample as one list: `ByteLevelBPE.train` folds texts into word counts as
they stream in, and `tokenizers` reads an iterator.
"""

import json
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path

import grain
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from data.tokenizer.base import HF_FILENAME, Tokenizer, infer_special_roles, write_role_config
from data.tokenizer.bpe import ByteLevelBPE, str_to_token
from data.tokenizer.hf_json import HFJsonTokenizer, export_bpe

TRAINERS = ("lmlab", "tokenizers")


def sample_documents(documents: Sequence[str], max_bytes: int, seed: int) -> Iterator[str]:
    """Streams documents in a seeded random order until `max_bytes` of UTF-8 text.

    Args:
        documents: a random-access sequence of texts (e.g. a `data.sources.TextSource`).
        max_bytes: UTF-8 bytes to yield in all; the last document is cut to fit (at a
            character boundary). 0: every document.
        seed: the order's seed; the same seed gives the same sample.

    Yields:
        Texts, one document (or its cut head) at a time; only the current one is in memory.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes} must be >= 0 (0: the whole corpus)")
    # grain's index shuffle is a bijection computed per index: no permutation array.
    order = grain.MapDataset.range(len(documents)).shuffle(seed=seed)
    remaining = max_bytes
    for index in order:
        text = documents[int(index)]
        if max_bytes:
            encoded = text.encode("utf-8")
            if len(encoded) >= remaining:
                yield encoded[:remaining].decode("utf-8", errors="ignore")
                return
            remaining -= len(encoded)
        yield text


def train_library_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Collection[str]) -> ByteLevelBPE:
    """Trains with the `tokenizers` library's `BpeTrainer`, set up as GPT-2's byte-level BPE.

    Args:
        texts: the training texts, read once as they stream.
        vocab_size: vocabulary size, the 256 bytes and the special tokens included.
        special_tokens: strings with ids of their own (after the learned tokens).

    Returns:
        The learned merges as our `ByteLevelBPE` (same vocabulary, numbered our way).
    """
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it needs at least 256 byte tokens "
            f"+ {len(special_tokens)} special tokens = {256 + len(special_tokens)}"
        )
    library = tokenizers.Tokenizer(models.BPE())
    library.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    library.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    library.train_from_iterator(texts, trainer)
    vocab = library.get_vocab(with_added_tokens=False)
    # The library numbers specials first and the alphabet by first sight; renumber as ours:
    # bytes in byte order, then each merge's result in the order learned.
    token_bytes = [bytes([b]) for b in range(256)]
    ids = {token: i for i, token in enumerate(token_bytes)}
    merges = []
    for left, right in json.loads(library.to_str())["model"]["merges"]:
        a, b = ids[str_to_token(left)], ids[str_to_token(right)]
        merged = token_bytes[a] + token_bytes[b]
        if merged not in ids:
            ids[merged] = len(token_bytes)
            token_bytes.append(merged)
        merges.append((a, b))
    unknown = [t for t in vocab if t not in special_tokens and str_to_token(t) not in ids]
    if unknown:
        raise AssertionError(f"tokenizers learned tokens {unknown[:5]} that no merge produces")
    return ByteLevelBPE(token_bytes, merges, special_tokens)


def export_library_bpe(bpe: ByteLevelBPE, directory: str | os.PathLike) -> None:
    """Saves `bpe` as `directory/tokenizer.json` plus its roles in `tokenizer_config.json`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    export_bpe(bpe, directory / HF_FILENAME)
    write_role_config(directory, infer_special_roles(bpe.special_tokens))


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Collection[str],
    *,
    trainer: str,
    directory: str | os.PathLike,
) -> Tokenizer:
    """Trains a byte-level BPE with `trainer` and saves it in `directory`.

    Args:
        texts: the training texts (e.g. `sample_documents(...)`), read once.
        vocab_size: vocabulary size, the 256 bytes and the special tokens included.
        special_tokens: strings with ids of their own.
        trainer: 'lmlab' (saved as bpe.json) or 'tokenizers' (saved as tokenizer.json).
        directory: where to save it; `load_tokenizer(directory)` gives it back.

    Returns:
        The trained tokenizer, as `load_tokenizer(directory)` loads it.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"tokenizer trainer {trainer!r} is unknown; expected one of {TRAINERS}")
    if trainer == "lmlab":
        bpe = ByteLevelBPE.train(texts, vocab_size, special_tokens=special_tokens)
        bpe.save(directory)
        return bpe
    export_library_bpe(train_library_bpe(texts, vocab_size, special_tokens), directory)
    return HFJsonTokenizer(directory)
