"""What may change between a run and its resumption, and what may not."""
from __future__ import annotations

import hashlib
from pathlib import Path

from src.config import Config
from src.data.dataset import ClassIndex
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
