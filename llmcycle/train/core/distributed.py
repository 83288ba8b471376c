"""torchrun integration: one process per device, gloo on CPU, NCCL on CUDA (with gloo beside it for
the small CPU tensors the trainers all-reduce: step counts, summed metrics, RNG states)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU when there is one, else the CPU. A bare `cuda` is this rank's GPU too: under
    torchrun every process would otherwise land on cuda:0."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # NCCL reduces CUDA tensors only, and the trainers also reduce CPU tensors (Session.step's token
        # counts and metric sums, the replica check, the masking RNG states): gloo takes those.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # Gloo's worker threads free a finished collective's tensors after it returns, and freeing a tensor
        # Python also knows takes the GIL; ProcessGroupGloo's destructor joins those threads while holding
        # it (pytorch/pytorch#56297), so destroying right after a collective can deadlock (it hung one
        # two-process test here). Waiting with the GIL released (the barrier, then a short sleep for the
        # barrier's own work) lets the threads finish first.
        dist.barrier()
        time.sleep(0.05)
        dist.destroy_process_group()
