"""Advisory file locks (POSIX `flock`): one process at a time over a shared output.

The kernel releases a lock when its process ends, even by `kill -9`, so a lock file left behind is
harmless and never needs cleaning up. Windows has no `flock`: there the locks do nothing and say so.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from src import atomic

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class LockHeld(RuntimeError):
    """Another process holds the lock (raised only when not waiting for it)."""


@contextmanager
def exclusive(path: str | Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if missing) for the block; yields whether the lock
    is real. `wait=False`: raise LockHeld at once when another process holds it."""
    if fcntl is None:
        yield False
        return
    path = Path(path)
    atomic.make_folder(path.parent)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(f"{path} is held by another process") from None
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
