"""Exact deduplication: documents whose normalized texts are equal.

`normalize_exact(text)`: Unicode NFKC (full-width letters, ligatures and other compatibility forms
become their plain equivalents), lowercase (`str.lower`), every run of whitespace (spaces, tabs,
newlines, Unicode spaces) replaced by one space, leading and trailing whitespace removed. Punctuation,
digits and accents are kept: "Hello, world" and "hello world" are different texts.

The signature is the 128-bit xxh3 of the UTF-8 of the normalized text, as two uint64 (high, low);
at 128 bits two different texts share a hash with probability about n^2 / 2^129, nil for any corpus.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import xxhash

from llmcycle.data.dedup import pack_drops, signature_blocks, task_offsets


def normalize_exact(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_signature(text: str) -> np.ndarray:
    h = xxhash.xxh3_128_intdigest(normalize_exact(text).encode("utf-8", "surrogatepass"))
    return np.array([h >> 64, h & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)


def find_exact_duplicates(signatures: list[tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, np.ndarray], int]:
    """Decision dropping every document whose hash an earlier (task, index) already had; and the number
    of distinct texts that had duplicates."""
    offsets = task_offsets(signatures)
    blocks = list(signature_blocks(signatures, 2))
    gids = np.concatenate([g for g, _ in blocks]) if blocks else np.empty(0, dtype=np.int64)
    hashes = np.concatenate([r for _, r in blocks]) if blocks else np.empty((0, 2), dtype=np.uint64)
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))  # stable: equal hashes stay in global-id order
    sh = hashes[order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (sh[1:] == sh[:-1]).all(axis=1)
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))  # start of each run
    dropped = gids[order[same]]
    kept = gids[order[first[same]]]
    groups = int(np.count_nonzero(same[1:] & ~same[:-1])) if len(same) > 1 else 0
    return pack_drops(offsets, dropped, kept), groups
