"""What a training run used, in the same keys whatever trains (every parameter, or LoRA adapters): the
parameters it trained, seconds per optimizer step, and peak memory. A trainer adds `Usage.metrics` to the
metrics it returns, so they reach its manifest and its stage record, and a LoRA run compares with a full
fine-tune key for key (the `optimize` stage of `llmcycle run`)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn

from llmcycle import memory


def parameter_counts(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(trained, total) parameters: tied weights once, and a 4-bit base's packed weights (buffers) as the
    frozen parameters they stand for, as `optimize.lora.trainable_summary` counts them."""
    from llmcycle.optimize.nf4 import Linear4bit

    seen: set[int] = set()
    trained = total = 0
    for module in modules:
        total += sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, Linear4bit))
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trained += p.numel() if p.requires_grad else 0
    return trained, total


class Usage:
    """Counts from the start of a training session: optimizer-step time and memory (this process's)."""

    def __init__(self, device: torch.device, state: dict | None = None) -> None:
        """`state`: a checkpoint's `state_dict()`, so a resumed run's step time counts the steps before it."""
        self.cuda = device.type == "cuda"
        self.start_rss_mb = memory.rss_mb()
        self.step_seconds = float((state or {}).get("step_seconds", 0.0))
        self.steps = int((state or {}).get("steps", 0))
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def state_dict(self) -> dict[str, float | int]:
        return {"step_seconds": self.step_seconds, "steps": self.steps}

    def step_started(self) -> float:
        return time.perf_counter()

    def step_done(self, started: float) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # the update's kernels are queued, not done, when step() returns
        self.step_seconds += time.perf_counter() - started
        self.steps += 1

    def metrics(self, modules: Iterable[nn.Module]) -> dict[str, float | int]:
        """trainable_parameters, parameters, trainable_share; mean_step_seconds (the optimizer steps this
        process ran: forward, backward and update, batches built before); train_peak_rss_mb (the resident
        set's high-water mark, llmcycle/memory.py: since the stage started under `llmcycle run`, else since
        the process did) and train_start_rss_mb; train_peak_cuda_mb on CUDA (the allocator's peak)."""
        trained, total = parameter_counts(modules)
        out: dict[str, float | int] = {"trainable_parameters": trained, "parameters": total,
                                       "trainable_share": trained / max(total, 1)}
        if self.steps:
            out["mean_step_seconds"] = self.step_seconds / self.steps
        out["train_peak_rss_mb"] = memory.peak_rss_mb()
        if self.start_rss_mb is not None:
            out["train_start_rss_mb"] = self.start_rss_mb
        if self.cuda:
            out["train_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out
