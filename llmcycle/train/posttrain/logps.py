"""Log-probabilities of given tokens under the model: the quantity every post-training loss is built on."""

from __future__ import annotations

import torch

from llmcycle.train.core.masking import IGNORE


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) per position: logits [B, T, V], targets [B, T] (IGNORE allowed) -> [B, T] in fp32,
    0 where the target is IGNORE. Gathers the target logit and subtracts logsumexp, which needs one
    [B, T] reduction rather than a full [B, T, V] log_softmax tensor kept for backward."""
    logits = logits.float()
    safe = targets.clamp(min=0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return out.masked_fill(targets == IGNORE, 0.0)
