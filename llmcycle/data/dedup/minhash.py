"""MinHash signatures of documents, vectorized with numpy.

The text goes through four stages, each one a pure function of its input, so the same text gets the
same signature on every machine, process and run (no Python `hash()`, whose seed changes per process):

1. `simple_words(text)`: the words that near-duplicate detection compares, after the normalization
   datatrove's `simplify_text` does for FineWeb: lowercase; for text that is not pure ASCII, NFKD and
   the combining marks (Unicode category Mn) removed, so "café" and "cafe", "ﬁ" and "fi" are the same
   word; every number (digits, optionally one decimal part: "3", "3.14", "1,000") becomes "0"; then
   the words are the maximal runs of letters and digits (`[^\\W_]+`), i.e. punctuation, symbols,
   underscores and all whitespace separate words and are dropped. `word_bytes` computes the same as
   UTF-8 bytes, mostly with `bytes.translate` (see its docstring for the one corner where it differs).
2. `word_hashes(words)`: each word hashed once to 64 bits with xxh3-64 (of its UTF-8 bytes).
3. `shingle_hashes(h, n)`: one 64-bit value per run of `n` consecutive words, combined with numpy
   over the whole document at once: `s = h[i]`, then `s = s * M + h[i + k]` for k = 1..n-1 (mod 2^64,
   M odd), then the MurmurHash3 64-bit finalizer so that shingles sharing words do not have linearly
   related values. A document with fewer than `n` words (but at least one) is one shingle made of all
   its words; a document with no words has no shingles and an empty signature.
4. `MinHasher.signature`: `num_perm` hash functions `h_k(x) = (a_k * x + b_k) mod (2^61 - 1)`, applied
   to all shingles at once as a (num_perm, shingles) matrix, and the minimum of each row. As in
   datatrove (FineWeb) and datasketch's "legacy" scheme, the product `a_k * x` is computed in uint64
   and wraps modulo 2^64 before the reduction modulo the Mersenne prime; `a_k` is odd, so
   `x -> a_k * x + b_k mod 2^64` is a bijection and the values stay 61-bit (no folding to 32 bits).
   `a_k` and `b_k` come from blake2b of the seed, not from a numpy generator, so they do not depend on
   the numpy version.

The probability that two documents agree on one signature value is their Jaccard similarity of
shingle sets; `tests/test_data_dedup.py` measures that the LSH built on top catches pairs at the rate
the theory says.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

import numpy as np
import xxhash

MERSENNE_61 = np.uint64((1 << 61) - 1)
_M_COMBINE = np.uint64(0x9E3779B97F4A7C15)  # odd: s -> s * M is a bijection mod 2^64
_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_U33 = np.uint64(33)

_NUMBER_RE = re.compile(r"\d+(?:[.,،٫⎖⎗⎘]\d+)?")
_WORD_RE = re.compile(r"[^\W_]+")
# The fast path works on UTF-8 bytes: ASCII numbers by a bytes regex, then a table that turns every
# ASCII byte other than a letter or a digit into a space (bytes >= 0x80, the parts of non-ASCII
# characters, are kept), so `split()` cuts the text at ASCII punctuation and whitespace.
_NUMBER_RE_B = re.compile(rb"[0-9]+(?:[.,][0-9]+)?")
_DIGITS_B = tuple(bytes([c]) for c in b"0123456789")
_WORD_BYTES = bytes(c if c >= 0x80 or chr(c).isalnum() else 32 for c in range(256))
_xxh3 = xxhash.xxh3_64_intdigest

# Shingles per block of the (num_perm, block) matrix: 2048 x 112 x 8 bytes = 1.8 MB, which keeps one
# block in cache and bounds memory for very long documents.
_BLOCK = 2048


@functools.cache
def _combining_marks() -> re.Pattern:
    """A regex matching runs of combining marks (category Mn) of this Python's Unicode database."""
    ranges: list[list[int]] = []
    for c in range(0x110000):
        if unicodedata.category(chr(c)) == "Mn":
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    cls = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return re.compile(f"[{cls}]+")


def _unicode_words(token: str, numbers: bool) -> list[bytes]:
    token = _combining_marks().sub("", token)
    if numbers:
        token = _NUMBER_RE.sub("0", token)
    return [w.encode("utf-8", "surrogatepass") for w in _WORD_RE.findall(token)]


def word_bytes(text: str, numbers: bool = True) -> list[bytes]:
    """`simple_words` as UTF-8 bytes (what gets hashed), computed fast.

    The text is cut at ASCII punctuation and whitespace with `bytes.translate`; only the pieces that
    still hold non-ASCII characters go through the Unicode regexes. The result is that of the plain
    definition (`lower`, NFKD, marks removed, numbers, `[^\\W_]+`) except for numbers that mix
    non-ASCII digits (Arabic-Indic, Devanagari...) with ASCII ones around a separator, "٣.5", which
    count as two numbers instead of one.
    """
    text = text.lower()
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)  # full-width digits and letters become ASCII here
    b = text.encode("utf-8", "surrogatepass")
    if numbers and any(d in b for d in _DIGITS_B):
        b = _NUMBER_RE_B.sub(b"0", b)
    pieces = b.translate(_WORD_BYTES).split()
    if b.isascii():
        return pieces
    out: list[bytes] = []
    for piece in pieces:
        if piece.isascii():
            out.append(piece)
        else:
            out.extend(_unicode_words(piece.decode("utf-8", "surrogatepass"), numbers))
    return out


def simple_words(text: str, numbers: bool = True) -> list[str]:
    """The words of `text` after normalization (see the module docstring); `numbers=False` keeps digits."""
    return [w.decode("utf-8", "surrogatepass") for w in word_bytes(text, numbers)]


def word_hashes(words: list[str] | list[bytes]) -> np.ndarray:
    """xxh3-64 of each word's UTF-8 bytes (str or bytes: the same value), as uint64."""
    if words and isinstance(words[0], str):  # xxhash >= 4 hashes bytes only
        words = [w.encode("utf-8", "surrogatepass") for w in words]
    return np.fromiter(map(_xxh3, words), dtype=np.uint64, count=len(words))


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place: a bijection that spreads every input bit."""
    x ^= x >> _U33
    x *= _FMIX_1
    x ^= x >> _U33
    x *= _FMIX_2
    x ^= x >> _U33
    return x


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per run of `n` consecutive word hashes (empty if there are fewer than `n` words)."""
    m = len(h) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    s = h[:m].copy()
    for k in range(1, n):
        s *= _M_COMBINE
        s += h[k:k + m]
    return fmix64(s)


def shingle_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """`ngram_hashes`, except that 1 to n-1 words make one shingle of all of them."""
    if 0 < len(h) < n:
        return ngram_hashes(h, len(h))
    return ngram_hashes(h, n)


def permutation_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`a` (odd, in [1, 2^61 - 1)) and `b` (in [0, 2^61 - 1)) of each hash function, from blake2b(seed)."""
    p = (1 << 61) - 1
    a = np.empty(num_perm, dtype=np.uint64)
    b = np.empty(num_perm, dtype=np.uint64)
    for k in range(num_perm):
        d = hashlib.blake2b(f"llmcycle-minhash:{seed}:{k}".encode(), digest_size=16).digest()
        a[k] = (int.from_bytes(d[:8], "little") % (p - 1)) | 1
        b[k] = int.from_bytes(d[8:], "little") % p
    return a, b


class MinHasher:
    """MinHash signatures of `num_perm` values: `MinHasher(112, seed=1).signature(text)`."""

    def __init__(self, num_perm: int = 112, ngram: int = 5, seed: int = 1):
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        a, b = permutation_params(num_perm, seed)
        self._a = a[:, None]
        self._b = b[:, None]

    def shingles(self, text: str) -> np.ndarray:
        return shingle_hashes(word_hashes(word_bytes(text)), self.ngram)

    def signature_of_shingles(self, x: np.ndarray) -> np.ndarray:
        """The minimum of `(a_k * x + b_k) mod (2^61 - 1)` over the shingles, for each k (empty if no shingles)."""
        if len(x) == 0:
            return np.empty(0, dtype=np.uint64)
        out = None
        for start in range(0, len(x), _BLOCK):
            phv = self._a * x[None, start:start + _BLOCK]  # (num_perm, block), wraps mod 2^64
            phv += self._b
            phv %= MERSENNE_61
            mins = phv.min(axis=1)
            out = mins if out is None else np.minimum(out, mins, out=out)
        return out

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_shingles(self.shingles(text))


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of equal signature values: an unbiased estimate of the shingle-set Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))
