"""Held-out measurements shared by the post-training commands: token loss and generated exact match."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmcycle.model.generate import generate
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.posttrain.batching import pad_batch
from llmcycle.train.posttrain.examples import SFTExample


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, examples: Sequence[SFTExample], pad_id: int, batch_size: int,
                 device: torch.device, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Mean loss per trained token over `examples` (one padded example per row), and token accuracy."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        batch = pad_batch([(e.ids, e.trained) for e in examples[i: i + batch_size]], pad_id).to(device)
        with autocast():
            logits, targets, _ = batch.forward_trained(model)
        loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        n += len(targets)
    model.train(was_training)
    return {"eval_loss": loss_sum / max(n, 1), "eval_mean_token_accuracy": correct / max(n, 1), "eval_tokens": n}


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                references: Sequence[str], max_new_tokens: int) -> dict[str, float | list]:
    """Greedy answers to `prompts`, compared with `references` after whitespace normalisation."""
    stop = list(tokenizer.end_of_turn_ids) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    hits, samples = 0, []
    for ids, ref in zip(prompts, references):
        out = generate(model, list(ids), max_new_tokens, temperature=0.0, stop_ids=stop)
        answer = tokenizer.decode([t for t in out if t not in stop], skip_special_tokens=True)
        ok = normalize_answer(answer) == normalize_answer(ref)
        hits += ok
        if len(samples) < 5:
            samples.append({"answer": answer, "reference": ref, "correct": ok})
    return {"exact_match": hits / max(len(prompts), 1), "exact_match_n": len(prompts), "samples": samples}
