"""The torch device that evaluation and inference run on, chosen by one rule for both."""
from __future__ import annotations

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
