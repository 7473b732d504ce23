"""What the user names as inputs (paths, folders, glob patterns) turned into image files, in the order
given; and the `Skipped` record of an input that is not processed. Used by `predict` and `gallery
enroll`; the identifier itself takes paths and images."""
from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Skipped:
    """An input that was not processed, and why (unreadable file, pixel limit, no match, ...)."""

    source: str
    reason: str


def printable(path: str | Path) -> str:
    """A file name for a terminal. One that is not UTF-8 on disk reaches Python with its odd bytes
    as surrogates, which a strict UTF-8 stdout refuses with a traceback; they are shown as U+FFFD,
    as a terminal shows those bytes (the CSV keeps them, so that it still names the file)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def file_problem(path: Path) -> str | None:
    """None for a regular file (or a link to one), else why it is no image file: a link to nothing,
    or a FIFO, socket or device (opening a FIFO would wait for a writer forever)."""
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return "broken link"
    return "not a regular file" if path.exists() else "file not found"


def input_entries(patterns: Sequence[str | Path]) -> tuple[list[Path | Skipped], int]:
    """Each input's files, in the order given: a path, a folder's files (recursively, by name with
    numbers as numbers, hidden ones left out) or a glob pattern's matches (a matching folder's files
    too); a Skipped, in its place, for an entry that is no regular file (a broken link, a FIFO) and
    for an input that yields nothing (missing path, empty folder, glob without a match). A file named more than once
    counts once; the second value is how many such repeats were left out. Whether a file is an image
    is decided by decoding it."""
    entries: list[Path | Skipped] = []
    seen: set[Path] = set()
    repeats = 0
    for pattern in map(str, patterns):
        path = Path(pattern)
        if path.is_dir():
            found, reason = _files_under(path), "empty folder: no files in it"
        elif path.exists() or path.is_symlink():
            found, reason = [path], ""
        elif glob.has_magic(pattern):
            # dict: `photos/**` matches a folder and the files in it
            found = list(dict.fromkeys(file for match in sorted(map(Path, glob.glob(pattern, recursive=True)),
                                                               key=_natural_order)
                                       for file in (_files_under(match) if match.is_dir() else [match])))
            reason = "no file matches this pattern"
        else:
            found, reason = [], "file not found"
        if not found:
            entries.append(Skipped(pattern, reason))
        for entry in found:
            problem = file_problem(entry)
            if problem is not None:
                entries.append(Skipped(str(entry), problem))
            elif entry in seen:
                repeats += 1
            else:
                seen.add(entry)
                entries.append(entry)
    return entries, repeats


def _files_under(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*")
                   if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=_natural_order)


def _natural_order(path: Path) -> list[tuple[list[str | int], str]]:
    """Numbers in names compared as numbers, as file browsers list them: IMG_9 before IMG_10. Part by
    part, each with its text after it, so that a folder's files stay together (a1/ and a01/ do not
    mix) and IMG_1 and IMG_01 keep one order on every machine."""
    return [([int(piece) if piece.isdecimal() else piece for piece in re.split(r"(\d+)", part)], part)
            for part in path.parts]


def collect_images(patterns: Sequence[str | Path]) -> tuple[list[Path], list[Skipped]]:
    """`input_entries`, split: the files, and the Skipped entries."""
    entries, _ = input_entries(patterns)
    return ([entry for entry in entries if isinstance(entry, Path)],
            [entry for entry in entries if isinstance(entry, Skipped)])
