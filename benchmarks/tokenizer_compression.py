"""Our byte-level BPE against the `tokenizers` library's, side by side on the same text.

Both are trained on the first 90% of CPython's pydoc topics (~420 KB of English) at the
same vocabulary size, and measured on the held-out 10%: bytes per token (higher is better
compression), training time, and encoding time.

Run:
  python benchmarks/tokenizer_compression.py --vocab_size=4096
  python benchmarks/tokenizer_compression.py --quick   # vocab 320 on the first 60 KB (the test)
"""

import argparse
import pathlib
import pydoc_data.topics
import sys
import time

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from data.tokenizer.bpe import ByteLevelBPE, token_to_str

SPECIAL_TOKENS = ["<|endoftext|>"]


def pydoc_corpus(train_fraction: float, max_chars: int | None = None) -> tuple[str, str]:
    """Returns (train, held_out) slices of the pydoc topics text (its first `max_chars`, if given)."""
    text = "\n\n".join(pydoc_data.topics.topics.values())[:max_chars]
    split = int(train_fraction * len(text))
    return text[:split], text[split:]


def train_library_bpe(text: str, vocab_size: int) -> tokenizers.Tokenizer:
    """The `tokenizers` library's BPE, set up as GPT-2's byte-level BPE."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def run(vocab_size: int, train_fraction: float = 0.9, max_chars: int | None = None) -> dict[str, float]:
    """Trains both tokenizers, prints the comparison and returns its numbers."""
    train_text, held_out = pydoc_corpus(train_fraction, max_chars)
    held_out_bytes = len(held_out.encode("utf-8"))

    ours, ours_train_s = timed(ByteLevelBPE.train, [train_text], vocab_size, SPECIAL_TOKENS)
    ours_ids, ours_encode_s = timed(ours.encode, held_out)
    library, library_train_s = timed(train_library_bpe, train_text, vocab_size)
    library_ids, library_encode_s = timed(lambda t: library.encode(t).ids, held_out)
    if ours.decode(ours_ids) != held_out:
        raise AssertionError("our BPE did not round-trip the held-out text")

    numbers = {
        "ours_bytes_per_token": held_out_bytes / len(ours_ids),
        "library_bytes_per_token": held_out_bytes / len(library_ids),
        "ours_train_s": ours_train_s,
        "library_train_s": library_train_s,
        "ours_encode_s": ours_encode_s,
        "library_encode_s": library_encode_s,
    }
    print(
        f"vocab {vocab_size}: trained on {len(train_text.encode()):,} bytes, "
        f"held out {held_out_bytes:,} bytes; vocab sizes ours {ours.vocab_size}, library {library.get_vocab_size()}"
    )
    print(f"{'':24}{'ours':>12}{'tokenizers':>12}{'ours/lib':>10}")
    for label, key, fmt in (
        ("bytes/token (held out)", "bytes_per_token", ".4f"),
        ("train time (s)", "train_s", ".3f"),
        ("encode time (s)", "encode_s", ".4f"),
    ):
        a, b = numbers[f"ours_{key}"], numbers[f"library_{key}"]
        print(f"{label:24}{a:>12{fmt}}{b:>12{fmt}}{a / b:>10.3f}")
    # The two number their tokens differently (the library puts specials first), so compare strings.
    ours_tokens = [token_to_str(ours.token_bytes(i)) for i in ours_ids]
    library_tokens = [library.id_to_token(i) for i in library_ids]
    print(f"identical held-out tokens: {ours_tokens == library_tokens}")
    numbers["identical_tokens"] = ours_tokens == library_tokens
    return numbers


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=4096, help="vocabulary size of both tokenizers")
    parser.add_argument("--train_fraction", type=float, default=0.9, help="leading share of the text to train on")
    parser.add_argument("--quick", action="store_true", help="vocab 320 on the first 60 KB: a check that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        return run(320, args.train_fraction, max_chars=60_000)
    return run(args.vocab_size, args.train_fraction)


if __name__ == "__main__":
    main()
