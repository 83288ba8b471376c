"""Boilerplate lines: lines that appear verbatim in many different documents (menus, cookie notices,
share buttons, copyright footers, license headers) and carry nothing of the document itself.

A line is what `text.split("\\n")` gives. Its key is the line with every run of whitespace replaced
by one space and the ends stripped; case, punctuation and digits count ("Page 1 of 3" and "Page 2 of
3" are different lines). Lines whose key is shorter than `min_line_chars` characters are never
boilerplate and never counted: blank lines, "}", "Thanks!", short headings like "References".

A document's signature is the sorted set of xxh3-64 hashes of its line keys (a line repeated within one
document counts once), so a line's count in `decide` is the number of distinct documents holding it.
Removal keeps every other line exactly as it was, including its line ending and the blank lines.
"""

from __future__ import annotations

import numpy as np
import xxhash

_xxh3_bytes = xxhash.xxh3_64_intdigest


def _xxh3(key: str) -> int:
    return _xxh3_bytes(key.encode("utf-8", "surrogatepass"))  # xxhash >= 4 hashes bytes only


def line_key(line: str) -> str:
    return " ".join(line.split())


def line_hashes(text: str, min_line_chars: int) -> np.ndarray:
    """Sorted unique hashes of the lines of `text` whose key has at least `min_line_chars` characters."""
    keys = {k for k in map(line_key, text.split("\n")) if len(k) >= min_line_chars}
    return np.unique(np.fromiter(map(_xxh3, keys), dtype=np.uint64, count=len(keys)))


def common_lines(signatures: list[tuple[np.ndarray, np.ndarray]], min_docs: int) -> np.ndarray:
    """Sorted hashes of the lines found in at least `min_docs` distinct documents."""
    values = [np.asarray(v, dtype=np.uint64) for v, _ in signatures]
    allh = np.concatenate(values) if values else np.empty(0, dtype=np.uint64)
    if not allh.size:
        return allh
    uniq, counts = np.unique(allh, return_counts=True)
    return uniq[counts >= min_docs]


def remove_lines(text: str, boilerplate: np.ndarray, min_line_chars: int) -> tuple[str, int]:
    """`text` without the lines whose hash is in the sorted `boilerplate`, and how many were removed."""
    if not boilerplate.size:
        return text, 0
    lines = text.split("\n")
    keys = [line_key(line) for line in lines]
    hs = np.fromiter((_xxh3(k) if len(k) >= min_line_chars else 0 for k in keys), dtype=np.uint64, count=len(keys))
    pos = np.minimum(np.searchsorted(boilerplate, hs), len(boilerplate) - 1)
    hit = (boilerplate[pos] == hs) & np.fromiter((len(k) >= min_line_chars for k in keys), dtype=bool,
                                                 count=len(keys))
    removed = int(hit.sum())
    if not removed:
        return text, 0
    return "\n".join(line for line, h in zip(lines, hit.tolist()) if not h), removed
