"""Deduplication for `llmcycle data`: exact, MinHash-LSH near-duplicates and boilerplate lines.

The registered steps are in `llmcycle.data.dedup.steps`; the algorithms are in `exact`, `minhash`,
`lsh`, `unionfind` and `boilerplate`. See docs/data-dedup.md.

This module holds what the document-level dedup steps share: global ids and the layout of their
decision. Documents are numbered across tasks in the fixed (task, index) order: the global id of
document `i` of task `t` is `task_offsets[t] + i`. A decision that drops documents holds (all int64):

- `task_offsets` (tasks + 1): global id of the first document of each task, then the total;
- `drop_offsets` (tasks + 1) and `drop_index`: the local indices dropped in task `t` are
  `drop_index[drop_offsets[t]:drop_offsets[t + 1]]`, sorted, so a lookup is one binary search;
- `kept_task`, `kept_index` (parallel to `drop_index`): the document each dropped one duplicates,
  i.e. the one its cluster keeps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def task_offsets(signatures: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    sizes = [len(offsets) - 1 for _, offsets in signatures]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def signature_blocks(signatures: list[tuple[np.ndarray, np.ndarray]], width: int, dtype=np.uint64,
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per task, (global ids, rows): the documents whose signature has `width` values and those values as
    a (documents, width) view. Documents with an empty signature are left out (nothing to compare)."""
    base = 0
    for task, (values, offsets) in enumerate(signatures):
        values = np.asarray(values, dtype=dtype)
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        wrong = np.flatnonzero((lengths != 0) & (lengths != width))
        if wrong.size:
            raise ValueError(f"task {task}, document {int(wrong[0])}: signature of {int(lengths[wrong[0]])} "
                             f"values, expected {width} (signatures made with other parameters?)")
        present = np.flatnonzero(lengths == width)
        rows = values[offsets[0]:offsets[-1]].reshape(-1, width) if len(offsets) > 1 else values[:0].reshape(0, width)
        yield base + present, rows
        base += len(offsets) - 1


def pack_drops(offsets: np.ndarray, dropped: np.ndarray, kept: np.ndarray) -> dict[str, np.ndarray]:
    """The decision arrays for dropping global ids `dropped`, each a duplicate of global id `kept[i]`."""
    dropped = np.asarray(dropped, dtype=np.int64)
    kept = np.asarray(kept, dtype=np.int64)
    order = np.argsort(dropped, kind="stable")
    dropped, kept = dropped[order], kept[order]
    drop_task = np.searchsorted(offsets, dropped, side="right") - 1
    kept_task = np.searchsorted(offsets, kept, side="right") - 1
    return {
        "task_offsets": offsets.astype(np.int64),
        "drop_offsets": np.searchsorted(dropped, offsets).astype(np.int64),
        "drop_index": dropped - offsets[drop_task] if dropped.size else dropped,
        "kept_task": kept_task.astype(np.int64),
        "kept_index": kept - offsets[kept_task] if kept.size else kept,
    }


def is_dropped(decision: dict[str, np.ndarray], task: int, index: int) -> bool:
    lo, hi = decision["drop_offsets"][task], decision["drop_offsets"][task + 1]
    if lo == hi:
        return False
    local = decision["drop_index"][lo:hi]
    i = np.searchsorted(local, index)
    return bool(i < len(local) and local[i] == index)
