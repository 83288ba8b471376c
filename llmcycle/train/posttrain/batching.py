"""Batches of variable-length sequences: padded rows, or packed rows with no attention across examples.

Every example arrives as token ids plus a `trained` flag per token. It becomes inputs ids[:-1] and targets
ids[1:] (IGNORE where the target is not trained) *before* batching, so a target never crosses into the next
example of a pack. Packed rows restart positions at 0 for each example and use a block-diagonal causal mask,
so an example's loss is the same alone, padded, or in any pack (tests/test_batching.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmcycle.train.core.masking import IGNORE


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T], IGNORE where no loss
    segments: torch.Tensor  # [B, T], index of the example each token belongs to (-1: padding)
    lengths: torch.Tensor  # [num_examples], tokens of each example in the batch (inputs, after shifting)
    positions: torch.Tensor | None = None  # [B, T] when packed
    attn_mask: torch.Tensor | None = None  # [B, 1, T, T] when packed

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def to(self, device: torch.device) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.targets), move(self.segments), move(self.lengths),
                     move(self.positions), move(self.attn_mask))

    def forward(self, model: torch.nn.Module) -> torch.Tensor:
        return model(self.input_ids, positions=self.positions, attention_mask=self.attn_mask)

    def forward_trained(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [N, V] at the N positions that have a target, those targets [N] and their examples [N]."""
        mask = self.targets != IGNORE
        logits = model(self.input_ids, positions=self.positions, attention_mask=self.attn_mask, logits_mask=mask)
        return logits, self.targets[mask], self.segments[mask]


def shift(ids: Sequence[int], trained: Sequence[bool]) -> tuple[list[int], list[int]]:
    """(inputs, targets): predict ids[i+1] from ids[:i+1]; untrained targets become IGNORE."""
    targets = [t if m else IGNORE for t, m in zip(ids[1:], trained[1:])]
    return list(ids[:-1]), targets


def pad_batch(sequences: Sequence[tuple[Sequence[int], Sequence[bool]]], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest. Causal attention never looks right, so pads
    need no mask: real tokens cannot see them and their own targets are IGNORE."""
    pairs = [shift(ids, trained) for ids, trained in sequences]
    width = max(len(x) for x, _ in pairs)
    B = len(pairs)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), IGNORE, dtype=torch.long)
    segments = torch.full((B, width), -1, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        input_ids[row, : len(x)] = torch.tensor(x)
        targets[row, : len(y)] = torch.tensor(y)
        segments[row, : len(x)] = row
    lengths = torch.tensor([len(x) for x, _ in pairs])
    return Batch(input_ids, targets, segments, lengths)


def plan_packs(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices (in the given order) into rows of at most max_length tokens: next-fit, so the
    data order is kept and the plan is a pure function of the order (exact resume)."""
    rows: list[list[int]] = []
    used = max_length + 1
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length {max_length}")
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def packed_batch(rows: Sequence[Sequence[tuple[Sequence[int], Sequence[bool]]]], pad_id: int) -> Batch:
    """Several examples per row; positions restart per example; attention stays within an example."""
    shifted = [[shift(ids, trained) for ids, trained in row] for row in rows]
    width = max(sum(len(x) for x, _ in row) for row in shifted)
    B = len(shifted)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), IGNORE, dtype=torch.long)
    segments = torch.full((B, width), -1, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    lengths = []
    example = 0
    for r, row in enumerate(shifted):
        col = 0
        for x, y in row:
            n = len(x)
            input_ids[r, col: col + n] = torch.tensor(x)
            targets[r, col: col + n] = torch.tensor(y)
            segments[r, col: col + n] = example
            positions[r, col: col + n] = torch.arange(n)
            lengths.append(n)
            col += n
            example += 1
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # Padding rows attend to themselves only, so no softmax row is empty (an all-False row gives NaN).
    pad_self = (segments[:, :, None] < 0) & torch.eye(width, dtype=torch.bool)
    attn_mask = ((same & causal & (segments[:, :, None] >= 0)) | pad_self).unsqueeze(1)
    return Batch(input_ids, targets, segments, torch.tensor(lengths), positions, attn_mask)


def per_example_sum(values: torch.Tensor, segments: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Sum token values [B, T] into their examples -> [num_examples]; padding (-1) is dropped."""
    flat_seg = segments.flatten()
    keep = flat_seg >= 0
    out = torch.zeros(num_examples, dtype=values.dtype, device=values.device)
    return out.index_add(0, flat_seg[keep], values.flatten()[keep])
