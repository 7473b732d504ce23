"""What may change between a run and its resumption, and what may not."""
from __future__ import annotations

import hashlib
import math
from numbers import Real
from pathlib import Path

import torch

from src.config import Config
from src.data.dataset import ClassIndex
from src.training.artifacts import METRICS_COLUMNS
from src.training.checkpoint import CheckpointError

# Keys that change how fast or where a run goes, not what it computes; anything else must match.
# trainer.max_epochs may grow (extending a finished run); amp changes numerics slightly but keeps
# the run meaningful, so it is allowed too.
RESUMABLE_CHANGES = {
    "name", "data.root", "data.pipeline", "data.cache_dir", "data.cache_on_device", "data.workers",
    "trainer.max_epochs", "trainer.device", "trainer.amp", "trainer.amp_dtype", "trainer.compile",
    "trainer.compile_mode", "trainer.progress", "trainer.output_dir", "trainer.deterministic",
    "trainer.checkpoint_interval_s",
}


def data_fingerprint(rows: list[tuple[str, str]], classes: ClassIndex) -> str:
    digest = hashlib.sha256()
    for rel, name in sorted(rows):
        digest.update(f"{rel}\t{name}\n".encode())
    digest.update("\n".join(classes.names).encode())
    return digest.hexdigest()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_compatible(checkpoint: dict, config: Config, classes: ClassIndex, fingerprint: str,
                            path: Path) -> None:
    """Raise CheckpointError listing every incompatible difference."""
    old, new = _flatten(checkpoint["config"]), _flatten(config.to_dict())
    differences = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
                   if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key)]
    if list(checkpoint["classes"]) != list(classes.names):
        differences.append("the individuals (class list) differ")
    elif checkpoint.get("data_fingerprint") != fingerprint:
        differences.append("the training split's images differ")
    if config.trainer.max_epochs < checkpoint["epoch"]:
        differences.append(f"trainer.max_epochs {config.trainer.max_epochs} is below the "
                           f"{checkpoint['epoch']} epochs already trained")
    if differences:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(differences))


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_training_state(checkpoint: dict, path: Path, steps_per_epoch: int) -> None:
    """Raise CheckpointError when the progress a checkpoint records cannot be this run's (a damaged
    or hand-edited file): training from it would run epochs that do not exist, or write a CSV it
    cannot hold, and fail only after an epoch of work."""
    epoch, step, history = checkpoint["epoch"], checkpoint.get("step", 0), checkpoint["history"]
    if epoch < 0:
        raise CheckpointError(f"cannot resume from {path}: malformed training state (epoch {epoch})")
    trained_with = checkpoint.get("steps_per_epoch", steps_per_epoch)  # absent from earlier versions' files
    if trained_with != steps_per_epoch:  # the schedule counts steps: it would jump ahead or back
        raise CheckpointError(f"cannot resume from {path}: it trained {trained_with!r} steps per epoch, the "
                              f"training split now gives {steps_per_epoch} (an image became readable or unreadable "
                              "since, or data.pipeline counts unreadable images differently)")
    problems = []
    if not _whole(step) or not 0 <= step < steps_per_epoch:
        problems.append(f"step {step!r} (an epoch has {steps_per_epoch})")
    elif step and not (isinstance(checkpoint.get("partial"), torch.Tensor) and checkpoint["partial"].shape == (4,)):
        problems.append("no sums for the partial epoch")
    rows_ok = isinstance(history, list) and all(
        isinstance(row, dict) and all(isinstance(row.get(column), Real) for column in METRICS_COLUMNS)
        for row in history)
    if not rows_ok or [row["epoch"] for row in history] != list(range(1, epoch + 1)):
        problems.append(f"the metrics history does not hold one row for each of the {epoch} epochs")
    best_epoch = checkpoint["best_epoch"]
    if not _whole(best_epoch) or not 0 <= best_epoch <= epoch:
        problems.append(f"best epoch {best_epoch!r}")
    best_val_top1 = checkpoint["best_val_top1"]
    if not isinstance(best_val_top1, Real) or not math.isfinite(best_val_top1):
        problems.append(f"best val top-1 {best_val_top1!r}")  # a NaN best would never be beaten
    if problems:
        raise CheckpointError(f"cannot resume from {path}: malformed training state ({'; '.join(problems)})")
