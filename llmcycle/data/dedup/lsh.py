"""Locality-sensitive hashing over MinHash signatures: bands -> bucket keys -> candidate pairs -> clusters.

A signature of `bands * rows` values is cut into `bands` bands of `rows` consecutive values. Two
documents are candidates when all `rows` values of at least one band are equal; for a pair whose
shingle sets have Jaccard similarity s that happens with probability `1 - (1 - s^rows)^bands`
(14 x 8, FineWeb's setting: 0.05 at s = 0.5, 0.57 at s = 0.7, 0.92 at s = 0.8, 1.00 at s = 0.9).

Per band, every document gets a 128-bit bucket key (two independent 64-bit hashes of its `rows`
values; with 128 bits, unequal rows share a key with probability about n^2 / 2^129 per band). The keys
are sorted with numpy (`lexsort`, stable), so each bucket is a run of equal keys in global-id order,
and every member of a run is paired with the run's first member: a star, which joins the bucket in
the union-find with one pair per member instead of all pairs. Per band this holds 16 bytes of keys
and 8 bytes of sort order per document, and no Python object per document.

Clusters are the connected components of all bands' pairs (`UnionFind`); each keeps its smallest
global id, i.e. its first document in (task, index) order, and the others are dropped.
"""

from __future__ import annotations

import numpy as np

from llmcycle.data.dedup import pack_drops, signature_blocks, task_offsets
from llmcycle.data.dedup.minhash import fmix64
from llmcycle.data.dedup.unionfind import UnionFind

_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xD6E8FEB86659FD93)
_SALT2 = np.uint64(0x5851F42D4C957F2D)


def band_keys(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 keys per row of a (documents, rows) uint64 array; equal rows give equal keys."""
    k1 = rows[:, 0].copy()
    k2 = rows[:, 0] ^ _SALT2
    for c in range(1, rows.shape[1]):
        k1 *= _K1
        k1 += rows[:, c]
        k2 *= _K2
        k2 ^= rows[:, c]
    return fmix64(k1), fmix64(k2)


def bucket_pairs(gids: np.ndarray, k1: np.ndarray, k2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first member of the bucket, other member) over the buckets of equal (k1, k2) keys.

    `gids` must be increasing; then the first member of each bucket is its smallest global id.
    """
    order = np.lexsort((k2, k1))  # stable, so equal keys keep their increasing-gid order
    s1, s2 = k1[order], k2[order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (s1[1:] == s1[:-1]) & (s2[1:] == s2[:-1])
    del s1, s2
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))
    return gids[order[first[same]]], gids[order[same]]


def near_duplicates(signatures: list[tuple[np.ndarray, np.ndarray]], bands: int, rows: int,
                    ) -> tuple[dict[str, np.ndarray], int]:
    """Decision (layout in `llmcycle.data.dedup`) dropping all but the first document of every cluster,
    and the number of clusters with more than one document."""
    offsets = task_offsets(signatures)
    blocks = list(signature_blocks(signatures, bands * rows))
    gids = np.concatenate([g for g, _ in blocks]) if blocks else np.empty(0, dtype=np.int64)
    uf = UnionFind(int(offsets[-1]))
    for band in range(bands):
        cols = slice(band * rows, (band + 1) * rows)
        keys = [band_keys(r[:, cols]) for _, r in blocks]
        k1 = np.concatenate([k[0] for k in keys]) if keys else np.empty(0, dtype=np.uint64)
        k2 = np.concatenate([k[1] for k in keys]) if keys else np.empty(0, dtype=np.uint64)
        del keys
        u, v = bucket_pairs(gids, k1, k2)
        del k1, k2
        uf.union_pairs(u, v)
    roots = uf.roots()
    ids = np.arange(len(roots))
    dup = roots != ids
    clusters = int(np.unique(roots[dup]).size)
    return pack_drops(offsets, ids[dup], roots[dup]), clusters
