"""Advisory file locks (POSIX `flock`): one process at a time over a shared output.

The kernel releases a lock when its process ends, even by `kill -9` (a child forked while it is held
does not keep it), so a lock file left behind is harmless and never needs cleaning up. Windows has no
`flock`: there the locks do nothing and say so.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from src import atomic

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


# The lock files this process holds open. A child forked meanwhile (a DataLoader worker) shares each
# one's open file, and with it the lock, which then outlived a parent killed outright until every
# child had ended: closed in the child, the lock stays the parent's alone.
_held: set = set()


def _close_held_in_child() -> None:
    for handle in _held:
        handle.close()
    _held.clear()


if fcntl is not None:
    os.register_at_fork(after_in_child=_close_held_in_child)


class LockHeld(RuntimeError):
    """Another process holds the lock (raised only when not waiting for it)."""


@contextmanager
def exclusive(path: str | Path, *, wait: bool = True,
              on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if missing) for the block; yields whether the lock
    is real. `wait=False`: raise LockHeld at once when another process holds it. `on_wait`: called
    once before waiting for another process (to say why the command pauses)."""
    if fcntl is None:
        yield False
        return
    path = Path(path)
    while True:
        atomic.make_folder(path.parent)
        handle = open(path, "a")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockHeld(f"{path} is held by another process") from None
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                fcntl.flock(handle, fcntl.LOCK_EX)
            if _names(handle, path):
                break
        except BaseException:  # LockHeld; Ctrl-C while waiting, say
            handle.close()
            raise
        # The file was deleted or replaced between our open and our lock (a clean-up of the output
        # folder, say): this lock guards nothing another process would see, so lock the file there now.
        handle.close()
    with handle:
        _held.add(handle)
        try:
            yield True
        finally:
            _held.discard(handle)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _names(handle, path: Path) -> bool:
    """Whether `path` still names the open file `handle`."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
