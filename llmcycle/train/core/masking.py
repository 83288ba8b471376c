"""Masked-LM corruption (BERT): choose positions, replace 80% with [MASK], 10% random, 10% kept."""

from __future__ import annotations

import torch

IGNORE = -100


def mask_tokens(
    ids: torch.Tensor, mask_id: int, vocab_size: int, prob: float, generator: torch.Generator,
    special_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (corrupted inputs, targets) where targets are IGNORE except at chosen positions."""
    chosen = torch.rand(ids.shape, generator=generator) < prob
    if special_ids is not None:
        chosen &= ~torch.isin(ids, special_ids)
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs, targets
