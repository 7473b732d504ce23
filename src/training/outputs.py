"""One run at a time per name and output folder: the run claims its files (`<name>_best.pt`,
`_last.pt`, `_metrics.csv`) for as long as it trains, and finds an output folder it cannot write in
before any work starts."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from src import atomic, locks
from src.config import ConfigError
from src.models.trained import CheckpointError
from src.training import distributed as dist_utils
from src.training.artifacts import RunPaths

if TYPE_CHECKING:  # train.py imports this module
    from src.training.train import Runtime


@contextmanager
def claim_outputs(paths: RunPaths, runtime: Runtime):
    """Hold `<output_dir>/.<name>.lock` for the run (rank 0, which alone writes): a second run of
    the same name into the same folder would interleave its checkpoints and CSV with this one's.
    The lock file goes when the run ends, and so do the folders it was created in if the run wrote
    nothing there (a run refused for its data or checkpoint leaves no trace)."""
    with ExitStack() as stack:
        held, locked, unwritable, folder = False, False, None, None
        if runtime.dist.is_main:
            new_folders = missing_folders(Path(paths.output_dir))
            try:
                locked = stack.enter_context(locks.exclusive(paths.lock, wait=False))  # False: no flock here
                if locked:  # runs before the lock is released: no other run can have locked the file
                    stack.callback(remove_claim, paths.lock, new_folders)
            except locks.LockHeld:
                held = True
            except OSError as exc:  # output_dir is under a file, or cannot be created or written
                unwritable = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror or type(exc).__name__
            # A folder where the run writes a file: found now, not when the first checkpoint is written.
            folder = next((path for path in (paths.best, paths.last, paths.metrics) if path.is_dir()), None)
        # Every rank stops, not rank 0 alone (the others would wait for it in the first collective).
        held, failed, blocked = dist_utils.max_over_ranks([held, unwritable is not None, folder is not None],
                                                          runtime.dist, runtime.device)
        if failed:
            raise ConfigError(f"trainer.output_dir: cannot write in {paths.output_dir} "
                              f"({unwritable or 'on rank 0'})")
        if blocked:
            where = f"{folder} is a folder" if folder else "rank 0 found a folder"
            raise ConfigError(f"trainer.output_dir: {where}, where the run writes a file; move it, or give the "
                              "run another name")
        if held:
            raise CheckpointError(f"another run is training '{paths.name}' into {paths.output_dir} (it holds "
                                  f"{paths.lock}); wait for it to end, or give this run another name or "
                                  "trainer.output_dir")
        if locked:  # no write of these files can be in progress
            for leftover in (left for path in (paths.best, paths.last, paths.metrics)
                             for left in atomic.remove_leftovers(path)):
                runtime.print(f"note: removed {leftover}, a partial write of a run that was killed")
        yield


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_claim(lock: Path, new_folders: list[Path]) -> None:
    """Remove the run's lock file, then the folders it was created in, as far as they are empty. A
    failure here must not replace the run's own outcome: a file left behind is harmless."""
    try:
        lock.unlink(missing_ok=True)
        for folder in new_folders:
            folder.rmdir()  # fails where the run wrote its files (or someone else did): kept
    except OSError:
        pass
