"""The torch device that evaluation and inference run on, named by one rule for both (`cpu`, `cuda`,
`cuda:N`; evaluation defaults to a GPU when there is one, the inference commands to the CPU), and the
arithmetic they run with on it."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def pick_device(name: str | torch.device | None, error: type[Exception]) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`; None for cuda when available, else cpu.

    Anything else, or a GPU that is not there, raises `error` (the caller's one-line error type),
    here rather than at the first tensor moved to the device, deep inside a run.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise error(f"device must be 'cpu' or 'cuda' ('cuda:N' for one GPU of several), not {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"--device {name} requested but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


@contextmanager
def reproducible_arithmetic() -> Iterator[None]:
    """No cuDNN autotuning and no TF32 (both change the arithmetic from run to run or from fp32),
    which costs little for a single pass over the data. Evaluation chooses its thresholds with it
    and inference compares scores with them under it: TF32 (training turns it on for the process)
    keeps 10 bits of mantissa, and can move a score far more than the 2e-7 that evaluation leaves
    between a threshold and any score (`metrics.SCORE_NOISE`). The process's own settings are
    restored afterwards: `evaluate()` called between training runs (a sweep, a notebook) must not
    leave deterministic cuDNN and fp32 matmuls switched on for them."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved
