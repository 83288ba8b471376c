"""Calibration data for the quantization methods that look at activations (GPTQ, static int8, SmoothQuant):
token rows from a shard set, and per-channel activation statistics of a model's linear layers.

The default shard set is the training shards of the model's pre-training, found through its manifests:
the held-out shards stay unseen by calibration, so held-out bits per byte measures what quantization cost
without being flattered by it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from llmcycle.errors import LlmcycleError


def default_calibration(model_dir: Path) -> Path:
    """The training shards of the model's pre-training, from its manifest chain."""
    from llmcycle.eval.suite import lineage

    shards = lineage(model_dir).train_shards
    if shards is None:
        raise LlmcycleError(f"{model_dir}: its manifests lead to no pre-training shards; pass --calibration DIR "
                            "(a token shard set made with this model's tokenizer).")
    return shards


def calibration_batches(shards_dir: str, seq_len: int, num_sequences: int, batch_size: int = 8) -> list[torch.Tensor]:
    """`num_sequences` rows of `seq_len` tokens from a token shard set, in batches."""
    from llmcycle.data.loader import PackedLoader
    from llmcycle.data.shards import ShardSet

    loader = PackedLoader(ShardSet(shards_dir), seq_len, batch_size)
    rows = min(num_sequences, loader.rows_per_epoch)
    if rows < 1:
        raise LlmcycleError(f"{shards_dir}: no calibration row of {seq_len} tokens.")
    return [loader.next_batch()[:, :seq_len] for _ in range(math.ceil(rows / batch_size))]


@torch.no_grad()
def input_absmax(model: nn.Module, batches: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """max |x_j| over the calibration tokens, per input channel j, of each named linear layer ([in])."""
    stats: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(module, args):
            m = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return stats
