"""Advisory file locks (POSIX `flock`): one process at a time over a shared output (`exclusive`),
or readers of it all at once, while no writer holds it (`shared`).

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

    def open_lock_file():
        atomic.make_folder(path.parent)
        return open(path, "a")

    with _locked(path, open_lock_file, fcntl.LOCK_EX, wait, on_wait) as real:
        yield real


@contextmanager
def shared(path: str | Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold a shared lock on `path` for the block: readers hold it together, and wait while a writer
    holds `exclusive`. Yields whether the lock is real. A reader may not be able to write there (a
    read-only copy of the data), so the file is opened for reading when it cannot be created, and no
    folder is made; where there is no lock file to open, no writer has used one: no lock."""
    if fcntl is None:
        yield False
        return
    path = Path(path)

    def open_lock_file():
        try:
            return open(path, "a")
        except FileNotFoundError:  # no folder: nothing there to read either
            return None
        except OSError:  # not writable here
            try:
                return open(path, "r")
            except OSError:
                return None

    with _locked(path, open_lock_file, fcntl.LOCK_SH, True, on_wait) as real:
        yield real


@contextmanager
def _locked(path: Path, open_lock_file: Callable, operation: int, wait: bool,
            on_wait: Callable[[], None] | None) -> Iterator[bool]:
    """Lock the file `open_lock_file` opens (None: no lock) with `operation` for the block."""
    while True:
        handle = open_lock_file()
        if handle is None:
            yield False
            return
        try:
            try:
                fcntl.flock(handle, operation | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockHeld(f"{path} is held by another process") from None
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                fcntl.flock(handle, operation)
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
