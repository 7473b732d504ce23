"""Terminal output: plain-text tables whose columns line up whatever the names (a CJK character takes
two terminal cells and a combining accent none, where `len` counts one each; the standard library's
unicodedata gives each character's width class, where the `wcwidth` package would be a dependency for
three tables), stdout that survives a closed pipe, and the commands' progress bars."""
from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Sequence

from tqdm import tqdm

from src.errors import STDOUT_FAILURES


def counted(count: int, noun: str) -> str:
    """`1 image`, `2 images`: the count with the noun in the number it takes (a plural in -s)."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def progress_bar(total: int, desc: str, show: bool, **options) -> tqdm:
    """A tqdm bar on stderr that is gone once done (stdout stays for results); `show=False` gives a
    silent one with the same interface."""
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, disable=not show, dynamic_ncols=True,
                **options)


def display_width(text: str) -> int:
    """Terminal cells `text` takes: 2 for wide and full-width characters, 0 for combining marks."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
               for char in text)


def format_rows(rows: Sequence[Sequence[str]], align: str) -> str:
    """`rows` as lines of columns two spaces apart. `align` has one '<' (left) or '>' (right) per
    column but the last, which is left as it is (no trailing spaces)."""
    cells = [[display_width(row[column]) for column in range(len(align))] for row in rows]
    widths = [max(column) for column in zip(*cells)]

    def padded(text: str, fill: int, side: str) -> str:
        return text + " " * fill if side == "<" else " " * fill + text

    return "\n".join("  ".join([*(padded(row[i], widths[i] - cell[i], side) for i, side in enumerate(align)), row[-1]])
                     for row, cell in zip(rows, cells))


def print_stdout(text: str) -> None:
    """`text` (a table, a line) on stdout. A reader that stops early (`... | head`) closes the pipe:
    what follows (a summary on stderr, a file to save) still happens, without a BrokenPipeError
    traceback, now or when Python flushes stdout at exit. Any other failure (a full disk) is
    recorded: the command still saves what it saves, then ends with one line (`errors.command_main`)."""
    try:
        print(text, flush=True)
    except OSError as exc:
        stdout_failed(exc)


def stdout_failed(exc: OSError) -> None:
    """After a write to stdout failed: what follows is dropped, and a failure other than a closed pipe
    is recorded for `errors.command_main` to end the command with."""
    drop_stdout()
    if not isinstance(exc, BrokenPipeError):
        STDOUT_FAILURES.append(f"cannot write the results to stdout ({exc.strerror or exc})")


def drop_stdout() -> None:
    """Send whatever is still written to stdout to /dev/null: after a write failed (a closed pipe),
    Python would fail again, with a traceback, when it flushes stdout at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
