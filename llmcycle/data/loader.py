"""Packed, BOS-aligned, exactly resumable pre-training batches from a token shard set.

A row is seq_len + 1 tokens; the training loop uses x[:, :-1] as inputs and x[:, 1:] as targets.

Packing (one plan per epoch, a pure function of seed, epoch and the shard set):
  * Documents are first cut into units of at most one row. A document longer than a row gives a
    first piece of seq_len + 1 tokens and continuation pieces of seq_len tokens, each prefixed
    with a copy of the document's own first token (its BOS), so long documents are kept and yet
    every row still starts with BOS. Without a bos_id in the sidecar there is nothing to
    prefix: pieces are plain slices of seq_len + 1 tokens.
  * Units are put in a seeded random order and packed best-fit: a buffer of up to BUFFER_UNITS
    upcoming units is kept sorted by length, and each row is filled by repeatedly taking the
    longest unit that fits the remaining space. Only when none fits is the shortest buffered
    unit cropped to fill the row exactly; the rest of that unit is dropped for this epoch.
    Every row therefore starts at the start of a unit, i.e. with BOS.
  * The epoch's last row, once all units are placed, is completed with a cropped repeat of the
    epoch's first units, so every document (or piece) appears in every epoch at least cropped;
    this repeats fewer than seq_len + 1 tokens per epoch. `wasted_fraction` is the share of the
    corpus's tokens cut off by cropping, i.e. not seen in this epoch.
  * The rows are then shuffled (same seeded generator). Because cropping differs between
    epochs, `rows_per_epoch` may differ slightly from one epoch to the next.

Global order: step s consumes global rows [s*G, (s+1)*G) with G = batch_size * world_size, and
rank r takes rows s*G + r*batch_size ... + batch_size. One process with batch 8 thus sees the same
rows as two with batch 4. Rows run on into the next epoch's plan, so a batch may straddle epochs.

Resume: the state is (epoch, cursor in global rows within that epoch) plus seed, seq_len, global
batch and the shard set's content hash; a restored loader yields exactly the batches the original
would have, also under a different world_size with the same global batch.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass

import numpy as np
import torch

from llmcycle.data.shards import ShardSet
from llmcycle.errors import LlmcycleError

BUFFER_UNITS = 1024  # best-fit lookahead: larger packs tighter, smaller keeps the seeded order more local
STATE_FORMAT = "llmcycle-packed-loader"


@dataclass
class PackingPlan:
    """Rows of one epoch as segments of the global token stream; row i (in packed order) is the
    concatenation of segments row_ptr[i]:row_ptr[i+1]. `order` is the shuffled row order."""

    row_ptr: np.ndarray  # int64 [num_rows + 1]
    seg_start: np.ndarray  # int64 global token position of each segment
    seg_len: np.ndarray  # int64 length of each segment
    order: np.ndarray  # int64 [num_rows], a permutation
    wasted_tokens: int  # tokens cut off by cropping (dropped for this epoch)

    @property
    def num_rows(self) -> int:
        return len(self.order)


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), dtype=np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    return np.repeat(starts - _excl_cumsum(lengths), lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def pack_epoch(doc_offsets: np.ndarray, seq_len: int, seed: int, epoch: int, bos_prefix: bool,
               buffer_units: int = BUFFER_UNITS) -> PackingPlan:
    """Compute the packing plan of one epoch (see the module docstring); deterministic in its arguments."""
    R = seq_len + 1
    starts = np.asarray(doc_offsets[:-1], dtype=np.int64)
    lengths = np.diff(np.asarray(doc_offsets, dtype=np.int64))
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    if lengths.sum() < R:
        raise ValueError(f"{lengths.sum()} tokens cannot fill one row of {R}")

    # Cut documents into units of at most R tokens (continuation pieces carry a 1-token prefix).
    step = R - 1 if bos_prefix else R
    n_pieces = 1 + np.maximum(lengths - R + step - 1, 0) // step
    doc = np.repeat(np.arange(len(lengths)), n_pieces)
    k = np.arange(len(doc)) - np.repeat(_excl_cumsum(n_pieces), n_pieces)
    first = k == 0
    body_off = np.where(first, 0, R + (k - 1) * step)
    body_cap = np.where(first, R, step)
    body_len = np.minimum(body_cap, lengths[doc] - body_off)
    prefix = ~first & bos_prefix
    unit_doc_start = starts[doc]
    unit_start = unit_doc_start + body_off
    unit_len = body_len + prefix

    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(doc))
    ulen = unit_len[perm].tolist()
    ustart = unit_start[perm].tolist()
    upre = prefix[perm].tolist()
    udoc = unit_doc_start[perm].tolist()

    # Best-fit packing; a Python loop per unit (not per token), ~10 us each.
    n = len(ulen)
    buf: list[tuple[int, int]] = []  # (length, unit) sorted
    nxt = 0
    row_ptr = [0]
    seg_start: list[int] = []
    seg_len: list[int] = []
    wasted = 0

    def emit(j: int, take: int) -> None:  # the first `take` tokens of unit j
        if upre[j]:
            seg_start.append(udoc[j])
            seg_len.append(1)
            take -= 1
        if take > 0:
            seg_start.append(ustart[j])
            seg_len.append(take)

    while nxt < n or buf:
        rem = R
        while rem > 0:
            while nxt < n and len(buf) < buffer_units:
                insort(buf, (ulen[nxt], nxt))
                nxt += 1
            if not buf:  # last row of the epoch: complete it with a cropped repeat of the first units
                for j in range(n):
                    emit(j, min(ulen[j], rem))
                    rem -= min(ulen[j], rem)
                    if rem == 0:
                        break
                break
            i = bisect_right(buf, (rem, n)) - 1
            # The longest unit that fits (the earliest of equal ones), else crop the shortest.
            i = bisect_left(buf, (buf[i][0], -1)) if i >= 0 else 0
            length, j = buf.pop(i)
            take = min(length, rem)
            emit(j, take)
            wasted += length - take
            rem -= take
        row_ptr.append(len(seg_start))

    order = rng.permutation(len(row_ptr) - 1).astype(np.int64)
    return PackingPlan(np.asarray(row_ptr, dtype=np.int64), np.asarray(seg_start, dtype=np.int64),
                       np.asarray(seg_len, dtype=np.int64), order, wasted)


class PackedLoader:
    """Endless stream of [batch_size, seq_len + 1] LongTensor batches for one rank."""

    def __init__(self, shards: ShardSet, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = shards
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.global_batch = self.batch_size * self.world_size
        self.row_len = self.seq_len + 1
        if shards.num_tokens < self.row_len:
            raise LlmcycleError(f"the token shard set in {shards.directory} has {shards.num_tokens} tokens, fewer than "
                                f"one sequence of seq_len+1 = {self.row_len} tokens.")
        self._offsets = shards.doc_offsets()
        self._bos_prefix = shards.bos_id is not None
        self._shard_hash = shards.content_hash()
        self._plans: dict[int, PackingPlan] = {}
        self.epoch = 0
        self.cursor = 0  # global row index within the current epoch's plan

    def plan(self, epoch: int) -> PackingPlan:
        """The packing plan of an epoch (cached; the same on every rank)."""
        if epoch not in self._plans:
            self._plans[epoch] = pack_epoch(self._offsets, self.seq_len, self.seed, epoch, self._bos_prefix)
        return self._plans[epoch]

    @property
    def rows_per_epoch(self) -> int:
        return self.plan(self.epoch).num_rows

    @property
    def tokens_per_epoch(self) -> int:
        return self.rows_per_epoch * self.row_len

    @property
    def wasted_fraction(self) -> float:
        """Share of the corpus's tokens cut off by cropping (and so unseen) in the current epoch."""
        return self.plan(self.epoch).wasted_tokens / self.shards.num_tokens

    def _gather(self, plan: PackingPlan, rows: np.ndarray) -> np.ndarray:
        packed = plan.order[rows]
        segs = _ranges(plan.row_ptr[packed], plan.row_ptr[packed + 1] - plan.row_ptr[packed])
        positions = _ranges(plan.seg_start[segs], plan.seg_len[segs])
        return self.shards.take(positions).reshape(len(rows), self.row_len)

    def rows(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` of an epoch's plan, [len(indices), seq_len + 1], without moving the cursor."""
        return self._gather(self.plan(epoch), np.asarray(indices, dtype=np.int64))

    def next_batch(self) -> torch.Tensor:
        parts = []
        epoch, pos, need = self.epoch, self.cursor + self.rank * self.batch_size, self.batch_size
        while need:
            plan = self.plan(epoch)
            if pos >= plan.num_rows:
                pos -= plan.num_rows
                epoch += 1
                continue
            take = min(need, plan.num_rows - pos)
            parts.append(self._gather(plan, np.arange(pos, pos + take)))
            pos += take
            need -= take
        self.cursor += self.global_batch
        while self.cursor >= self.plan(self.epoch).num_rows:
            self.cursor -= self.plan(self.epoch).num_rows
            self.epoch += 1
        for e in [e for e in self._plans if e < self.epoch]:
            del self._plans[e]  # plans are rebuilt deterministically if ever needed again
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "version": 1, "epoch": self.epoch, "cursor": self.cursor,
                "seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "shard_hash": self._shard_hash}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise LlmcycleError("the saved data-loader state is not an llmcycle packed-loader state.")
        mine = self.state_dict()
        for key, what in (("shard_hash", "token shards (content hash)"), ("seq_len", "seq_len"),
                          ("seed", "data seed"), ("global_batch", "global batch (batch_size * world_size)")):
            if state.get(key) != mine[key]:
                raise LlmcycleError(f"the saved data-loader state was made with {what} {state.get(key)!r}, but this "
                                    f"run has {mine[key]!r}, so it cannot resume exactly.")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.plan(epoch).num_rows:
            raise LlmcycleError(f"the saved data-loader state has cursor {cursor} outside epoch {epoch}.")
        self.epoch, self.cursor = epoch, cursor
