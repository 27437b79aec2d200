"""MinHash signatures and LSH banding: near-duplicate candidates without comparing all pairs.

Shingles. A document's text is lowercased (`str.casefold`), every run of characters that are
not letters or digits becomes one space (punctuation-insensitive: "Hello, world!" and
"hello world" have the same words), and its shingles are the set of its k consecutive words
(`words`, `shingles`); a document with fewer than k words has one shingle, all its words.
The similarity of two documents is the Jaccard index of their shingle sets,

    J(A, B) = |A ∩ B| / |A ∪ B|          (`exact_jaccard`).

Signatures. Each shingle is hashed to 32 bits by BLAKE2b (deterministic across processes and
machines, unlike Python's salted `hash`), then permuted by `num_perm` universal hash functions
h_i(x) = (a_i x + b_i) mod p, p = 2^61 - 1 (a Mersenne prime), with a_i in [1, p) and b_i in
[0, p) drawn from a seeded generator. The signature holds, for each i, the minimum of h_i over
the document's shingles. For a random h, P[min h(A) = min h(B)] = J(A, B), so the fraction of
agreeing signature entries is an unbiased estimate of J with standard deviation
sqrt(J (1 - J) / num_perm) (`estimate_jaccard`). The products a_i x (up to 2^93) are computed
exactly in uint64 by splitting a_i into 32-bit halves (`_mul_mod`).

LSH. The first bands * rows entries are cut into `bands` bands of `rows` entries; each band
is hashed to a 64-bit bucket key (`band_keys`). Two documents are candidates when they share a
bucket in at least one band, which happens with probability

    P(candidate | J = s) = 1 - (1 - s^rows)^bands       (`candidate_probability`, the S-curve),

steepest near the threshold s* ≈ (1 / bands)^(1 / rows) (`threshold`). With the defaults
num_perm=128, bands=16, rows=8: s* ≈ 0.71, P(0.5) ≈ 0.06, P(0.7) ≈ 0.62, P(0.8) ≈ 0.95,
P(0.9) ≈ 1.0.
"""

import hashlib
import itertools
import re

import numpy as np

MERSENNE_PRIME = (1 << 61) - 1
EMPTY = np.uint64(MERSENNE_PRIME)  # the signature entry of a document with no shingles (above every h_i)
_NON_WORD = re.compile(r"[\W_]+")
_LOW32 = np.uint64(0xFFFFFFFF)
_CHUNK = 4096  # shingles permuted at once: bounds memory to num_perm * _CHUNK * 8 bytes


def words(text: str) -> list[str]:
    """The text's words after the light normalization: casefolded, punctuation-insensitive."""
    return _NON_WORD.sub(" ", text.casefold()).split()


def shingles(text: str, k: int) -> set[str]:
    """The set of k-word shingles (words joined by one space); one shingle if < k words; {} if none."""
    tokens = words(text)
    if not tokens:
        return set()
    if len(tokens) <= k:
        return {" ".join(tokens)}
    return {" ".join(tokens[i:i + k]) for i in range(len(tokens) - k + 1)}


def exact_jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; 0 when both are empty (no evidence of duplication)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def hash32(item: str) -> int:
    """A deterministic 32-bit hash of a string (BLAKE2b), the same in every process."""
    return int.from_bytes(hashlib.blake2b(item.encode("utf-8"), digest_size=4).digest(), "little")


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded coefficients (a, b) of the `num_perm` hash functions (a x + b) mod p."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MERSENNE_PRIME, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, MERSENNE_PRIME, size=num_perm, dtype=np.uint64)
    return a, b


def _mod_mersenne(t: np.ndarray) -> np.ndarray:
    """t mod p for uint64 t, by the Mersenne fold t = (t mod 2^61) + (t >> 61) (mod p)."""
    p = np.uint64(MERSENNE_PRIME)
    folded = (t & p) + (t >> np.uint64(61))  # < 2^61 + 8: at most one subtraction left
    return np.where(folded >= p, folded - p, folded)


def _mul_mod(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(a x) mod p, exact, for a < p (shape [P, 1]) and 32-bit x (shape [1, N]) in uint64.

    a = a_hi 2^32 + a_lo: a_lo x < 2^64 fits; y = a_hi x < 2^61 and y 2^32 mod p is
    (y >> 29) + (y mod 2^29) 2^32 because 2^61 ≡ 1 (mod p).
    """
    low = _mod_mersenne((a & _LOW32) * x)
    y = (a >> np.uint64(32)) * x
    high = (y >> np.uint64(29)) + ((y & np.uint64((1 << 29) - 1)) << np.uint64(32))  # < 2^61 + 2^32
    return _mod_mersenne(low + high)


def signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature (uint64, shape [num_perm]) of a document's 32-bit shingle hashes.

    Args:
      hashes: the shingle hashes, any length (empty gives a signature of `EMPTY`).
      a, b: the permutations' coefficients (`permutations`).
    """
    result = np.full(a.shape, EMPTY, dtype=np.uint64)
    hashes = np.asarray(hashes, dtype=np.uint64)
    for start in range(0, hashes.size, _CHUNK):
        x = hashes[None, start:start + _CHUNK]
        permuted = _mod_mersenne(_mul_mod(a[:, None], x) + b[:, None])
        np.minimum(result, permuted.min(axis=1), out=result)
    return result


class MinHasher:
    """Shingles and signs texts with fixed k, num_perm and seed (picklable: Beam ships it)."""

    def __init__(self, shingle: int, num_perm: int, seed: int):
        self.shingle, self.num_perm, self.seed = shingle, num_perm, seed
        self.a, self.b = permutations(num_perm, seed)

    def __call__(self, text: str) -> np.ndarray | None:
        """The text's signature, or None when it has no words."""
        items = shingles(text, self.shingle)
        if not items:
            return None
        return signature(np.fromiter((hash32(s) for s in items), np.uint64, len(items)), self.a, self.b)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of equal entries: unbiased for J, standard deviation sqrt(J (1 - J) / len)."""
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signatures of different lengths {sig_a.shape} and {sig_b.shape}; "
                         "sign both with the same num_perm")
    return float(np.mean(sig_a == sig_b))


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[tuple[int, int]]:
    """The (band index, 64-bit bucket key) of each band: documents sharing one are candidates."""
    if bands * rows > sig.size:
        raise ValueError(f"bands * rows = {bands * rows} exceeds the signature's {sig.size} entries; "
                         "lower bands or rows, or raise num_perm")
    raw = sig.astype("<u8").tobytes()
    width = rows * 8
    return [(band, int.from_bytes(hashlib.blake2b(raw[band * width:(band + 1) * width], digest_size=8).digest(),
                                  "little"))
            for band in range(bands)]


def candidate_pairs(signatures: dict[str, np.ndarray | None], bands: int, rows: int,
                    verify: float = 0.0) -> set[tuple[str, str]]:
    """LSH on one machine: the pairs (smaller id, larger id) sharing a bucket in some band.

    The definition `near_dedup.NearDedup` computes in Beam, for measurements and tests.
    Documents without a signature (no words) take no part; with `verify` > 0 only pairs whose
    estimated Jaccard is at least `verify` are returned.
    """
    buckets = {}
    for doc_id, sig in signatures.items():
        if sig is not None:
            for key in band_keys(sig, bands, rows):
                buckets.setdefault(key, []).append(doc_id)
    pairs = {(a, b) for members in buckets.values() for a, b in itertools.combinations(sorted(members), 2)}
    if verify > 0:
        pairs = {(a, b) for a, b in pairs if estimate_jaccard(signatures[a], signatures[b]) >= verify}
    return pairs


def candidate_probability(s, bands: int, rows: int):
    """P(two documents of Jaccard s share a bucket) = 1 - (1 - s^rows)^bands (works on arrays)."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def threshold(bands: int, rows: int) -> float:
    """The S-curve's approximate threshold (1 / bands)^(1 / rows)."""
    return (1.0 / bands) ** (1.0 / rows)
