"""Union-find over integer ids 0..n-1 in one numpy array, where every set's root is its smallest id.

Roots only ever point to smaller ids (a union links the larger root under the smaller one), so after
any sequence of unions, in any order, `roots()[i]` is the smallest id connected to `i`. That makes
"keep one document per cluster" deterministic: the kept one is the cluster's first document.

`union_pairs(a, b)` merges many pairs at once with vectorized rounds (look up the roots of both ends,
link each larger root under the smallest root it is paired with, repeat for the pairs not yet joined);
every round removes at least one root, and in practice a handful of rounds joins millions of pairs.
Memory: 8 bytes per id.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = int(parent[x])
        return int(x)

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = (rx, ry) if rx < ry else (ry, rx)
            self.parent[hi] = lo

    def _find_many(self, x: np.ndarray) -> np.ndarray:
        parent = self.parent
        r = parent[x]
        while True:
            rr = parent[r]
            if np.array_equal(rr, r):
                break
            r = rr
        parent[x] = r  # compress the paths of the ids looked up
        return r

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union `a[i]` with `b[i]` for every i."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if a.shape != b.shape:
            raise ValueError(f"union_pairs needs two arrays of the same shape, got {a.shape} and {b.shape}")
        while a.size:
            ra, rb = self._find_many(a), self._find_many(b)
            apart = ra != rb
            if not apart.any():
                break
            lo = np.minimum(ra[apart], rb[apart])
            hi = np.maximum(ra[apart], rb[apart])
            # Each root in `hi` goes under the smallest root it is paired with; the other pairs of that
            # root are joined in a later round, through its new root.
            np.minimum.at(self.parent, hi, lo)
            a, b = lo, hi

    def roots(self) -> np.ndarray:
        """The root (smallest id of its set) of every id; also compresses every path."""
        p = self.parent
        while True:
            pp = p[p]
            if np.array_equal(pp, p):
                break
            p = pp
        self.parent = p
        return p.copy()
