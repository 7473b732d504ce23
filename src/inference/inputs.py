"""What the user names as inputs (paths, folders, glob patterns) turned into image files, in the order
given; and the `Skipped` record of an input that is not processed. Used by `predict` and `gallery
enroll`; the identifier itself takes paths and images."""
from __future__ import annotations

import glob
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from src.data.io import IMAGE_EXTENSIONS, file_problem, files_under
from src.data.lists import INVISIBLE_OR_DIRECTION
from src.errors import capped, unusable_path
from src.tables import counted


@dataclass(frozen=True)
class Skipped:
    """An input that was not processed, and why (unreadable file, pixel limit, no match, ...)."""

    source: str
    reason: str


def printable(path: str | Path) -> str:
    """A file name for a terminal. One that is not UTF-8 on disk reaches Python with its odd bytes
    as surrogates, which a strict UTF-8 stdout refuses with a traceback; they are shown as U+FFFD,
    as a terminal shows those bytes (the CSV keeps them, so that it still names the file). Control
    and text-direction characters are shown escaped (`\\n`, `\\x1b`, `\\u202e`): a newline split
    a row of the table in two, and a terminal escape was replayed by the terminal (the rule of
    individuals' names, `lists.name_problem`)."""
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(char.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(char) == "Cc" or char in INVISIBLE_OR_DIRECTION else char
                   for char in text)


@dataclass(frozen=True)
class Inputs:
    """The inputs' files and Skipped entries in the order given (the table, the CSV and the JSON
    follow the command line), and what `entries` leaves out without a Skipped."""

    entries: list[Path | Skipped]
    repeats: int = 0  # files named more than once, counted once
    not_images: list[Path] = field(default_factory=list)  # in folders and pattern matches: notes.txt, Thumbs.db

    @property
    def files(self) -> list[Path]:
        return [entry for entry in self.entries if isinstance(entry, Path)]

    @property
    def skipped(self) -> list[Skipped]:
        return [entry for entry in self.entries if isinstance(entry, Skipped)]

    def notes(self) -> list[str]:
        """What was left out without a Skipped entry, for the command's summary: files named twice,
        and files in folders that are no images by their names (named, as a photo in a format the
        list lacks would be among them)."""
        notes = [f"{counted(self.repeats, 'repeated input')} counted once"] if self.repeats else []
        if self.not_images:
            notes.append(f"{counted(len(self.not_images), 'file')} not named as images left out: "
                         + capped([printable(path) for path in self.not_images]))
        return notes


def collect_images(patterns: Sequence[str | Path]) -> Inputs:
    """Each input's files, in the order given: a path, a folder's image files (recursively, linked
    sub-folders too, by name with numbers as numbers, hidden ones left out) or a glob pattern's image
    files (a matching folder's too); a Skipped, in its place, for an entry that is no regular file (a
    broken link, a FIFO) and for an input that yields nothing (missing path, folder without image
    files, glob without a match). A file named more than once counts once (by its absolute path: two
    links to one photo are two inputs).

    In folders and among a pattern's matches a file is an image by its extension (IMAGE_EXTENSIONS,
    as `prepare --folder` reads folders), so that a camera's sidecar files or a Thumbs.db are no
    failures; a file named on its own is decoded whatever its name, and skipped if it is no image."""
    entries: list[Path | Skipped] = []
    seen: set[Path] = set()
    not_images: dict[Path, Path] = {}  # absolute path: as found
    repeats = 0
    for pattern in map(str, patterns):
        try:
            found, others, reason = _expand(pattern)
        except OSError as exc:
            found, others, reason = [], [], unusable_path(exc)
        not_images.update((_absolute(other), other) for other in others)
        if not found:
            entries.append(Skipped(pattern, reason))
        for entry in found:
            problem = file_problem(entry)
            if problem is not None:
                entries.append(Skipped(str(entry), problem))
            elif _absolute(entry) in seen:  # `photos/` and `/home/me/photos/a.png` name a file twice
                repeats += 1
            else:
                seen.add(_absolute(entry))
                entries.append(entry)
    left_out = [found_as for absolute, found_as in not_images.items() if absolute not in seen]  # named on its own too
    return Inputs(entries, repeats, left_out)


def _expand(pattern: str) -> tuple[list[Path], list[Path], str]:
    """The files one input names: (image files, files not named as images, why it names none)."""
    path = Path(pattern)
    if not pattern:  # Path("") is the current folder: an unset shell variable would score all of it
        return [], [], "an empty path"
    if path.is_dir():
        found, others = _images(_files_under(path))
        return found, others, "no image files in it" if others else "empty folder: no files in it"
    if path.exists() or path.is_symlink():
        return [path], [], ""
    if glob.has_magic(pattern):
        matches = sorted(map(Path, glob.glob(pattern, recursive=True)), key=_natural_order)
        # dict: `photos/**` matches a folder and the files in it
        found, others = _images(dict.fromkeys(file for match in matches
                                              for file in (_files_under(match) if match.is_dir() else [match])))
        return found, others, "no image file matches this pattern" if others else "no file matches this pattern"
    return [], [], "file not found"


def _absolute(path: Path) -> Path:
    """`path` absolute, with `.` and `..` resolved but links kept (`Path.resolve` would follow them)."""
    return Path(os.path.abspath(path))


def _files_under(folder: Path) -> list[Path]:
    return sorted(files_under(folder, hidden=lambda name: name.startswith(".")), key=_natural_order)


def _images(files: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """The files named as images (IMAGE_EXTENSIONS), in order, and the others."""
    files = list(files)
    return ([file for file in files if file.suffix.lower() in IMAGE_EXTENSIONS],
            [file for file in files if file.suffix.lower() not in IMAGE_EXTENSIONS])


def _natural_order(path: Path) -> list[tuple[list[str | int], str]]:
    """Numbers in names compared as numbers, as file browsers list them: IMG_9 before IMG_10. Part by
    part, each with its text after it, so that a folder's files stay together (a1/ and a01/ do not
    mix) and IMG_1 and IMG_01 keep one order on every machine."""
    return [([int(piece) if piece.isdecimal() else piece for piece in re.split(r"(\d+)", part)], part)
            for part in path.parts]
