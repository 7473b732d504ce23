"""Reading the checkpoints that training writes: validated and safe to load, and turned back into
a model in eval mode. Evaluation and inference start here; training reads its resume checkpoint with
`load_checkpoint` too (the writing side is `src/training/checkpoint.py`).

Loading goes through `src.safe_load` (tensors and plain containers only, so a crafted file is refused
instead of running code).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from src.config import Config, ConfigError, config_from_dict
from src.data.dataset import ClassIndex, DatasetError
from src.errors import clipped, clipped_repr, state_dict_problem
from src.models.factory import IdentificationModel, create_model
from src.safe_load import CheckpointError, file_sha256, safe_torch_load, unusual_layout

FORMAT_VERSION = 1
# The keys every checkpoint of this project has, and their types: anything else is another
# program's file or a damaged one.
REQUIRED = {"format_version": int, "model_state": dict, "epoch": int, "config": dict, "classes": (list, tuple)}


def load_checkpoint(path: str | Path, map_location="cpu", *, mmap: bool = False) -> dict:
    """A training checkpoint of this project, validated. Raises CheckpointError. `mmap`: its tensors
    are memory-mapped (`safe_torch_load`), for a caller that does not need the optimizer state, which
    is then never read (two thirds of a checkpoint: about 200 MB for resnet50 with AdamW)."""
    state = safe_torch_load(path, map_location, mmap=mmap)
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED):
        raise CheckpointError(f"{path}: not a checkpoint of this project (missing "
                              f"{[k for k in REQUIRED if not isinstance(state, dict) or k not in state]})")
    wrong = [key for key, kind in REQUIRED.items()
             if not isinstance(state[key], kind) or isinstance(state[key], bool)]
    if wrong:
        raise CheckpointError(f"{path}: not a checkpoint of this project (malformed "
                              + ", ".join(f"{key}: {type(state[key]).__name__}" for key in wrong) + ")")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state['format_version']} is newer than this "
                              f"code understands ({FORMAT_VERSION}); update the project")
    # Names to dense tensors of real numbers (BatchNorm counts its batches in int64): a key of another
    # type was an AttributeError traceback in torch, int8 or complex weights were cast without a word,
    # and sparse, nested or data-less (meta) tensors, which weights_only allows, were tracebacks below.
    odd = next(((key, value) for key, value in state["model_state"].items()
                if not isinstance(key, str) or not isinstance(value, torch.Tensor) or unusual_layout(value)
                or not (value.is_floating_point() or value.dtype == torch.int64)), None)
    if odd is not None:
        key, value = odd
        what = type(value).__name__ if not isinstance(value, torch.Tensor) else \
            f"{unusual_layout(value) or value.dtype} tensor"
        problem = (f"the key {clipped_repr(key)} is a {type(key).__name__}, not a string"
                   if not isinstance(key, str) else f"{clipped_repr(key)} is a {what}")
        raise CheckpointError(f"{path}: not a checkpoint of this project (model_state: {problem}; weights are "
                              "floating-point tensors under string names)")
    broken = next((key for key, value in state["model_state"].items()
                   if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
    if broken is not None:  # training stops before saving such weights: a damaged or diverged file
        raise CheckpointError(f"{path}: the weights hold NaN or infinite values (first: {clipped(broken)}); "
                              "not a usable checkpoint")
    return state


@dataclass
class TrainedModel:
    """A checkpoint ready to use: its model in eval mode on the device, and what it was trained on
    (evaluation and inference)."""

    sha256: str
    checkpoint: dict
    config: Config
    classes: ClassIndex
    model: IdentificationModel
    device: torch.device


def load_trained(path: Path, device: torch.device) -> TrainedModel:
    """The checkpoint's model with its weights. The backbone is built without pretrained weights
    (they would be downloaded only to be overwritten by the checkpoint's)."""
    path = Path(path)
    before = _identity(path)
    checkpoint = load_checkpoint(path, mmap=True)
    try:
        config = config_from_dict(checkpoint["config"])
        classes = ClassIndex.from_list(checkpoint["classes"])
    except (ConfigError, DatasetError) as exc:
        raise CheckpointError(f"{path}: the config or class list stored in the checkpoint is invalid ({exc})") from None
    # The random initialisation is overwritten by the checkpoint's weights; fork_rng keeps it from
    # advancing the caller's global torch RNG (loading a model must not change a seeded script's draws).
    with torch.random.fork_rng(devices=[]):
        model = create_model(config.model.model_copy(update={"pretrained": False}), len(classes))
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes "
                              f"({state_dict_problem(exc)})") from None
    sha256 = file_sha256(path)
    # The checksum is read after the weights: training replacing the file in between (a new best epoch
    # of a running run) would tie these weights to the other file's checksum, and so evaluation's
    # thresholds to weights they were not chosen for.
    if _identity(path) != before:
        raise CheckpointError(f"{path}: replaced while it was being read (a training run saving it?); run again")
    return TrainedModel(sha256, checkpoint, config, classes, model.to(device).eval(), device)


def _identity(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is replaced (a new inode) or rewritten in place (size, modification time)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns
