"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every output of the project that another stage or a later run reads goes through here: write to a
temporary file in the same folder (same file system, so the rename is atomic), flush and fsync it,
rename it over the target, fsync the folder so the rename itself survives a power cut. As a write in
place would, the new file keeps the permissions of the one it replaces, and a symbolic link at the
target is written through (the file it points to is replaced, the link stays).
"""
from __future__ import annotations

import errno
import glob
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from src.errors import signals_held

# A write to `x` goes through `.x.tmp-<pid>` in the same folder (`_temporary`).
TEMPORARY_INFIX = ".tmp-"


@contextmanager
def atomic_destination(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; on success it replaces `path` durably, on
    an exception it is removed and `path` is untouched."""
    path = through_link(Path(path))
    make_folder(path.parent)
    tmp = _temporary(path)
    try:
        with naming(path):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            _take_place_of(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)


@contextmanager
def replaced_together() -> Iterator[Callable[[str | Path], Path]]:
    """Yields `stage(path)`, the temporary path to write `path` at (beside it, with this module's
    writers, which fsync it). When the block ends, every staged file written replaces its destination,
    in the order staged (stage last the file that describes the others), and its folder is fsynced; on an
    exception none does and the staged files are removed: a set of files that belong together (an
    export, a report folder) stays whole, the earlier set or the new one, if the run is stopped midway
    (Ctrl-C and SIGTERM wait for the renames to end; a folder where a file should be is refused before
    the first). Only a stop no process can delay (kill -9, a power cut) during the renames, or a rename
    failing for another reason (an I/O error), leaves some files of each set."""
    staged: dict[Path, Path] = {}

    def stage(path: str | Path) -> Path:
        path = through_link(Path(path))
        staged[path] = _temporary(path)
        return staged[path]

    try:
        yield stage
        written = {path: tmp for path, tmp in staged.items() if tmp.is_file()}  # a writer may have given up
        blocked = next((path for path in written if path.is_dir()), None)
        if blocked is not None:  # its rename would fail after the others had been made
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file", str(blocked))
        with signals_held():  # a stop between two renames would mix the sets; it comes after the last
            for path, tmp in written.items():
                _take_place_of(tmp, path)
            for folder in {path.parent for path in written}:
                sync_folder(folder)
    finally:
        for tmp in staged.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # its folder is not there, or is a file: nothing was written
                pass


def _temporary(path: Path) -> Path:
    """Where this process writes `path` before renaming it over it (`remove_leftovers` finds them)."""
    return path.with_name(f".{path.name}{TEMPORARY_INFIX}{os.getpid()}")


def through_link(path: Path) -> Path:
    """The file a symbolic link at `path` points to, which a write replaces, as `open(path, "w")` would:
    renaming over the link itself left the file it points to (a shared gallery, say) as it was."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path  # realpath: a link loop is no error


def _take_place_of(tmp: Path, path: Path) -> None:
    """Renames `tmp` over `path`, with the permissions of the file it replaces, as a write in place keeps
    them: a file that its owner had made private (0600) became readable by all (the umask's 0644)."""
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
    except FileNotFoundError:  # a new file: the umask's permissions
        pass
    os.replace(tmp, path)


def sync_folder(folder: str | Path) -> None:
    """fsync a folder, so that the renames made in it survive a power cut."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_leftovers(path: str | Path) -> list[Path]:
    """Removes the temporary files of writes to `path` that were killed before their rename (kill -9,
    a power cut: nothing ran to clean up) and returns them. Only while no other process can be writing
    `path` (one holding its lock), whose temporary file this would remove."""
    path = through_link(Path(path))
    return _removed(path.parent.glob(f".{glob.escape(path.name)}{TEMPORARY_INFIX}*"))


def remove_leftovers_in(folder: str | Path) -> list[Path]:
    """`remove_leftovers` for every file in `folder`, for a command that holds a lock over all it writes
    there (prepare's annotations): the files a killed run was writing need not be the ones it writes now."""
    return _removed(Path(folder).glob(f".*{TEMPORARY_INFIX}[0-9]*"))


def _removed(leftovers: Iterator[Path]) -> list[Path]:
    leftovers = sorted(leftovers)
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def make_folder(folder: str | Path) -> None:
    """`mkdir -p`. Where a file stands in the way, the error names that file as not a folder (mkdir
    says "File exists", naming the file, as if the folder were there already)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        check_folder_possible(folder)
        raise


def check_folder_possible(folder: str | Path) -> None:
    """Raises what `make_folder` would for a file standing in the way, without creating anything: for a
    command to refuse an output folder before its work rather than after it."""
    folder = Path(folder)
    blocking = next((part for part in [folder, *folder.parents] if part.exists() and not part.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(blocking))


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError raised inside that names no file gets `path` as its file: a failed write (a full
    disk) names none, unlike a failed open, and a one-line error should say where."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_destination(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
