"""Offline data order: reshuffled epochs over a fixed list of items, with a state for exact resume."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.train.config import PostTrainSection


class EpochLoader:
    """Indices of `n` items in a fresh permutation each epoch; a step takes `per_step` per process.

    The stream runs on across epoch boundaries, so every step is full. The state is (epoch, cursor):
    resuming reproduces the same order.
    """

    def __init__(self, n: int, per_step: int, seed: int, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise LlmcycleError("no training examples")
        self.n, self.per_step, self.seed, self.rank, self.world = n, per_step, seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_step(self) -> list[int]:
        """This process's share of the next global step (per_step indices)."""
        take = self.per_step * self.world
        out: list[int] = []
        while len(out) < take:
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            k = min(take - len(out), self.n - self.cursor)
            out.extend(self._perm[self.cursor: self.cursor + k])
            self.cursor += k
        return out[self.rank * self.per_step: (self.rank + 1) * self.per_step]

    def steps_per_epoch(self) -> float:
        return self.n / (self.per_step * self.world)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise LlmcycleError(f"checkpoint was trained on {state['n']} items, this data has {self.n}.")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)


def total_steps(opt: PostTrainSection, loader: EpochLoader) -> int:
    if opt.max_steps > 0:
        return opt.max_steps
    return max(1, math.ceil(opt.epochs * loader.steps_per_epoch()))


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i: i + size] for i in range(0, len(items), size)]
