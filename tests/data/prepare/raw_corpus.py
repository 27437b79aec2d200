"""A raw corpus with known defects, for the pipeline and end-to-end tests of data.prepare.

Base documents are paragraphs of CPython's embedded documentation (`pydoc_data.topics`) that
the per-document stages keep when run locally (`stage.run_local`, no Beam) and whose word
5-shingle sets pairwise have an exact Jaccard below 0.1 (so MinHash LSH, whose candidate
probability is 1 - (1 - J^rows)^bands, calls them duplicates with probability < 2e-7 per pair
at the default 16 bands of 8 rows). Planted on top of them, with the truth kept:

  * exact duplicates: a base document again, in another file (the exact stage drops them);
  * near duplicates: a base document (of 100 words or more) with its middle word replaced, which
    changes 5 of its n - 4 shingles: Jaccard >= 91/101 = 0.90, candidate probability
    > 1 - (1 - 0.9^8)^16 = 1 - 2e-4;
  * PII: e-mail addresses, IPv4 addresses and phone numbers appended to some documents;
  * junk: documents the quality filter must drop (symbol soup, too few words);
  * a non-UTF-8 file and a corrupt gzip file (dead letter), a gzip JSONL and a zstd text file.
"""

import gzip
import json
import os
from typing import NamedTuple

import zstandard

from data.prepare import minhash
from data.prepare.langid import LanguageId
from data.prepare.normalize import Normalize
from data.prepare.quality import QualityFilter

EMAILS = ("ada.lovelace@example.com", "grace@navy.example.org")
IPS = ("192.168.10.77", "10.0.0.254")
PHONES = ("+1 415 555 0132", "(212) 555-0199")
JUNK = ("$$$ ### %%% @@@ !!! ^^^ &&& *** $$$ ### %%% @@@ !!! ^^^ &&& ***",
        "click here",
        "••• ••• ••• ••• ••• ••• ••• ••• ••• ••• ••• ••• ••• ••• ••• •••")


class Planted(NamedTuple):
    """What was written and what the pipeline should find."""

    base: list[str]  # distinct documents that pass the per-document stages
    exact_duplicates: int
    near_duplicates: int
    pii_documents: int
    junk: int
    bad_files: list[str]  # paths that must be in the dead letter
    documents_read: int  # documents the reader yields (good files only)


def _passes(text: str) -> bool:
    stages = (Normalize(Normalize.Options()), LanguageId(LanguageId.Options()), QualityFilter(QualityFilter.Options()))
    for stage in stages:
        outcome = stage(text)
        if outcome.text is None:
            return False
        text = outcome.text
    return True


def base_documents(count: int, min_words: int = 100, max_words: int = 400) -> list[str]:
    """`count` documentation paragraphs that the stages keep and that are pairwise far apart."""
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

    chosen, chosen_shingles = [], []
    for _, text in sorted(topics.items()):
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if not min_words <= len(paragraph.split()) <= max_words or not _passes(paragraph):
                continue
            shingles = minhash.shingles(paragraph, 5)
            if all(len(shingles & other) / len(shingles | other) < 0.1 for other in chosen_shingles):
                chosen.append(paragraph)
                chosen_shingles.append(shingles)
            if len(chosen) == count:
                return chosen
    raise AssertionError(f"only {len(chosen)} usable paragraphs")


def near_duplicate(text: str) -> str:
    """`text` with its middle word replaced."""
    words = text.split()
    words[len(words) // 2] = "changed"
    return " ".join(words)


def with_pii(text: str, index: int) -> str:
    return (f"{text} Write to {EMAILS[index % 2]} or call {PHONES[index % 2]}; the server is at "
            f"{IPS[index % 2]}.")


def write_corpus(directory: str, num_base: int = 18) -> Planted:
    """Writes the raw corpus into `directory` and returns what was planted."""
    os.makedirs(directory, exist_ok=True)
    base = base_documents(num_base)
    third = num_base // 3
    pii = [with_pii(t, i) for i, t in enumerate(base[:4])]
    # Plain JSONL: the first third (4 with PII); gzip JSONL: the second third; zstd .txt paragraphs: the rest.
    with open(os.path.join(directory, "a.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text, "source": "docs"}) + "\n" for text in pii + base[4:third])
    with gzip.open(os.path.join(directory, "b.jsonl.gz"), "wt", encoding="utf-8") as f:
        for text in base[third:2 * third]:
            f.write(json.dumps({"text": text}) + "\n")
    with open(os.path.join(directory, "c.txt.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("\n\n".join(base[2 * third:]).encode("utf-8")))
    exact = [base[4], base[third + 1], base[2 * third + 1]]
    near = [near_duplicate(base[5]), near_duplicate(base[third + 2])]
    with open(os.path.join(directory, "d.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(exact + near + list(JUNK)) + "\n")
    bad = os.path.join(directory, "latin1.txt")
    with open(bad, "wb") as f:
        f.write("Caf\u00e9 cr\u00e8me, a document in Latin-1.\n".encode("latin-1"))
    corrupt = os.path.join(directory, "broken.jsonl.gz")
    with open(corrupt, "wb") as f:
        f.write(gzip.compress(b"")[:10] + b"this is not a deflate stream" * 4)  # a gzip header, then junk
    return Planted(base=base, exact_duplicates=len(exact), near_duplicates=len(near), pii_documents=len(pii),
                   junk=len(JUNK), bad_files=[bad, corrupt],
                   documents_read=num_base + len(exact) + len(near) + len(JUNK))
