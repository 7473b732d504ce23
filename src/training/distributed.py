"""torchrun support: process group set-up, and the collectives the training loop needs (metric sums,
agreement between ranks, rank 0's BatchNorm statistics).

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

from src.config import ConfigError
from src.errors import clipped, clipped_repr, first_line

# How long set-up waits for every process to join, and a collective for a peer, before failing: a
# peer that died mid-collective, or one that never started, becomes an error instead of a long hang
# (torchrun also tears the group down as soon as one worker exits non-zero).
TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # launched by torchrun: a process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def whole_number_from_environment(name: str, default: str) -> int:
    """The environment variable `name` (`default` where unset) as torchrun sets it: a whole number."""
    text = os.environ.get(name, default)
    try:
        return int(text)
    except ValueError:  # set by something other than torchrun
        raise ConfigError(f"{name} is {clipped_repr(text)}, not a whole number: launch with torchrun, or unset "
                          "RANK and WORLD_SIZE to train in one process") from None


def init_distributed(device_type: str) -> DistInfo:
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(*(whole_number_from_environment(name, "0") for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")),
                    enabled=True)
    if not 0 <= info.rank < info.world_size or info.local_rank < 0:  # a process that would wait for the timeout
        raise ConfigError(f"RANK {info.rank}, WORLD_SIZE {info.world_size} and LOCAL_RANK {info.local_rank}: "
                          "RANK must be 0 to WORLD_SIZE - 1 and LOCAL_RANK at least 0; launch with torchrun")
    if device_type == "cuda":
        gpus = torch.cuda.device_count()
        if info.local_rank >= gpus:  # torch.cuda.set_device would raise `invalid device ordinal`
            raise ConfigError(f"torchrun: this process has LOCAL_RANK {info.local_rank} but sees {gpus} CUDA GPU(s): "
                              f"start at most one process per GPU (--nproc_per_node {gpus} or fewer)")
        torch.cuda.set_device(info.local_rank)
    if dist.is_initialized():
        # A second `run()` in the same torchrun worker (e.g. `run(config)` then
        # `run(config, resume="auto")`), or a script that set up the group itself: use that group.
        # The barrier holds every rank until rank 0 has returned from the previous run, i.e. has
        # written its last checkpoint: otherwise the other ranks may resume from an older one.
        barrier()
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, enabled=True)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        # RANK / WORLD_SIZE left in the environment by something other than torchrun.
        raise ConfigError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun, or unset "
                          "RANK and WORLD_SIZE to train in one process")
    backend = "nccl" if device_type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as exc:  # torch's DistError kinds, or a MASTER_PORT that is no number
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise ConfigError(f"torchrun: rank {info.rank} of {info.world_size} could not set up the {backend} process "
                          f"group at {clipped(address)} ({clipped(first_line(exc), 200)}): check MASTER_ADDR and "
                          "MASTER_PORT (a port free on rank 0's machine) and that all WORLD_SIZE processes "
                          "started") from None
    return info


def barrier() -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """The element-wise maximum of every rank's `values`, on every rank (a host sync: use sparingly)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (used to stop all ranks together)."""
    return bool(max_over_ranks([float(flag)], info, device)[0])


def same_on_all_ranks(values: list[float], info: DistInfo, device: torch.device) -> bool:
    """Whether every rank holds the same `values` (the answer is the same on every rank)."""
    both = max_over_ranks([*values, *(-v for v in values)], info, device)
    return both[:len(values)] == [-v for v in both[len(values):]]


def from_rank_0(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Rank 0's `values`, on every rank (float64: a Python float or an epoch number comes back exactly)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): what the checkpoint holds."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

