"""Held-out loss, bits per byte, the unigram baseline, and sampled continuations."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F

from llmcycle.data.loader import PackedLoader
from llmcycle.data.shards import ShardSet
from llmcycle.model.generate import generate
from llmcycle.train.core.masking import IGNORE, mask_tokens


@torch.no_grad()
def heldout_metrics(
    model: torch.nn.Module,
    val: ShardSet,
    token_bytes: torch.Tensor,
    seq_len: int,
    batch_size: int,
    sequences: int,
    autocast: AbstractContextManager,
    objective: str = "causal",
    mask_id: int | None = None,
) -> dict[str, float]:
    """Loss over the same `sequences` held-out rows every time (a fresh loader with seed 0), whatever
    the batch size, so runs with different batch shapes are evaluated on identical text.

    Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the predicted tokens, so it
    compares across tokenizers; specials count zero bytes.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = PackedLoader(val, seq_len, batch_size, seed=0)
    remaining = max(1, min(sequences, loader.rows_per_epoch))
    gen = torch.Generator().manual_seed(0)
    token_bytes = token_bytes.to(device)
    loss_sum, count, nbytes = 0.0, 0, 0
    while remaining > 0:
        x = loader.next_batch()[:remaining]
        remaining -= x.shape[0]
        if objective == "masked":
            inputs, targets = mask_tokens(x[:, :-1], mask_id, token_bytes.numel(), 0.15, gen)
        else:
            inputs, targets = x[:, :-1], x[:, 1:]
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast:
            logits = model(inputs)
        loss_sum += F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        valid = targets != IGNORE
        count += int(valid.sum())
        nbytes += int(token_bytes[targets.clamp(min=0)][valid].sum())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if objective == "causal":
        out["val_bpb"] = loss_sum / math.log(2) / max(nbytes, 1)
    return out


def unigram_bpb(train: ShardSet, val: ShardSet, token_bytes: np.ndarray) -> float:
    """Bits per byte of the held-out tokens under the training set's unigram frequencies (add-one).

    The number a model must beat to have learned anything beyond token frequencies.
    """
    vocab = len(token_bytes)
    counts = np.ones(vocab, dtype=np.float64)
    for i in range(0, train.num_docs, 4096):
        ids = np.concatenate([train.doc(j) for j in range(i, min(i + 4096, train.num_docs))])
        counts += np.bincount(ids, minlength=vocab)[:vocab]
    logp = np.log2(counts / counts.sum())
    bits, nbytes = 0.0, 0
    for j in range(val.num_docs):
        ids = val.doc(j)[1:]  # the BOS that starts each document is not predicted
        bits -= float(logp[ids].sum())
        nbytes += int(token_bytes[ids].sum())
    return bits / max(nbytes, 1)


def sample_continuations(
    model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int = 0
) -> list[tuple[str, str]]:
    """Greedy-ish continuations of fixed prompts (temperature 0.8, top-k 40, fixed seed)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        new = generate(model, ids, max_new_tokens, temperature=0.8, top_k=40,
                       stop_ids=[tokenizer.eos_id] if tokenizer.eos_id is not None else [], generator=gen)
        out.append((prompt, tokenizer.decode(new, skip_special_tokens=True)))
    return out
