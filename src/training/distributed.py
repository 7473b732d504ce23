"""torchrun support: process group set-up, rank-aware printing and metric reduction.

Without torchrun (no RANK / WORLD_SIZE in the environment) every helper here is a no-op, so the
single-process path runs the same code. Under torchrun the process group is set up even for one
process, so `torchrun --nproc_per_node 1` exercises the real NCCL / gloo path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # launched by torchrun: a process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", "0")), enabled=True)
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    # A short timeout turns a peer that died mid-collective into an error instead of a long hang;
    # torchrun also tears the group down as soon as one worker exits non-zero.
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return info


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (used to stop all ranks together)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): what the checkpoint holds."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

