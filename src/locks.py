"""Advisory file locks (POSIX `flock`): one process at a time over a shared output.

The kernel releases a lock when its process ends, even by `kill -9`, so a lock file left behind is
harmless and never needs cleaning up. Windows has no `flock`: there the locks do nothing and say so.
"""
from __future__ import annotations

import os
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
    while True:
        atomic.make_folder(path.parent)
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            if _names(handle, path):
                break
        except BlockingIOError:
            handle.close()
            raise LockHeld(f"{path} is held by another process") from None
        except BaseException:  # Ctrl-C while waiting, say
            handle.close()
            raise
        # The file was deleted or replaced between our open and our lock (a clean-up of the output
        # folder, say): this lock guards nothing another process would see, so lock the file there now.
        handle.close()
    with handle:
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _names(handle, path: Path) -> bool:
    """Whether `path` still names the open file `handle`."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
