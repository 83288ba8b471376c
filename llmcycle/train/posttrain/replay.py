"""Pre-training text replayed during SFT, so fine-tuning does not erase the language model it starts from.

SFT trains on a few thousand short answers; on its own it moves a small model far from the text it was
pre-trained on (on the embedded default, held-out bits per byte went from 1.56 after pre-training to 2.30
after three SFT epochs and 2.92 after ten). Mixing rows of the model's own pre-training data into the SFT
batches, trained on every token as in pre-training, keeps that knowledge: nanochat's mid-training and the
"replay" of continual learning do the same.

`data.pretrain_mix` is the share of trained tokens that are pre-training text: 0.5 adds as many trained
tokens of it as the SFT examples have (chat answers are short, so this is a modest share of the compute).
Each epoch reads new rows (a fixed set, seen again every epoch, was memorised: on the default, ten epochs
with one fixed set ended at 2.47 bits per byte). The rows come from `data.pretrain_shards`, or else from the
shards the model was pre-trained on, found through its manifest chain; a model with neither is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llmcycle.errors import LlmcycleError


def pretrain_shards_of(model_dir: str | Path, shards: str | None) -> Path:
    """The token shard directory to replay: `shards` when given, else the model's pre-training shards."""
    if shards:
        return Path(shards)
    from llmcycle.eval.suite import lineage

    found = lineage(model_dir).train_shards
    if found is None:
        raise LlmcycleError(f"data.pretrain_mix: {model_dir}'s manifests lead to no pre-training shards; set "
                            "data.pretrain_shards to a token shard set made with this model's tokenizer.")
    return found


def rows_per_epoch(mix: float, sft_trained_tokens: int, length: int) -> int:
    """Replay rows of `length` tokens per epoch for them to be `mix` of all trained tokens."""
    if not 0 <= mix < 1:
        raise LlmcycleError(f"data.pretrain_mix must be in [0, 1), got {mix}.")
    if mix == 0 or sft_trained_tokens == 0:
        return 0
    return max(1, math.ceil(mix / (1 - mix) * sft_trained_tokens / (length - 1)))


class ReplayRows:
    """Row k of an endless, deterministic stream of `length`-token rows of a shard set (pre-training's own
    packing, epoch after epoch, seeded), so a resumed run reads exactly the rows it would have read."""

    def __init__(self, shards_dir: Path, length: int, seed: int, vocab_size: int,
                 tokenizer_hash: str | None = None) -> None:
        from llmcycle.data.loader import PackedLoader
        from llmcycle.data.shards import ShardSet

        shards = ShardSet(shards_dir)
        if tokenizer_hash and shards.tokenizer_hash and shards.tokenizer_hash != tokenizer_hash:
            raise LlmcycleError(f"data.pretrain_shards {shards_dir} were tokenized with another tokenizer than the "
                                "model's; replay shards made with the model's own tokenizer.")
        if shards.vocab_size > vocab_size:
            raise LlmcycleError(f"data.pretrain_shards {shards_dir}: token ids up to {shards.vocab_size - 1} do "
                                f"not fit the model's vocabulary of {vocab_size}.")
        self.loader = PackedLoader(shards, length - 1, 1, seed=seed)  # rows of seq_len + 1 = length tokens
        self.length = length
        self.content_hash = shards.content_hash()

    def row(self, k: int) -> list[int]:
        epoch = 0
        while k >= (n := self.loader.plan(epoch).num_rows):
            k, epoch = k - n, epoch + 1
        return self.loader.rows(epoch, np.array([k]))[0].tolist()

    def example(self, k: int) -> tuple[list[int], list[bool]]:
        """(ids, trained) of row k: every token but the first is a target, as in pre-training."""
        return self.row(k), [False] + [True] * (self.length - 1)
