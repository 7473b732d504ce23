"""The image-list format shared by every stage: one `<relative path> <individual>` per line.

Paths may contain spaces (the folder layout of user photos often does); individual names may not,
so a line splits on its *last* run of whitespace.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from src import atomic
from src.errors import clipped_repr, missing
from src.textfiles import read_utf8

Row = tuple[str, str]  # (path relative to the raw folder, individual): one line of a list
# What inference calls a photo it rejects; an individual of that name (in any case) would read as a
# rejection, so no stage accepts it (`name_problem`).
REJECTED_NAME = "unknown"
# Zero-width space, word joiner, invisible operators, byte-order mark, combining grapheme joiner,
# Mongolian vowel separator, Hangul fillers (blank letters); the bidirectional marks, embeddings,
# overrides and isolates (Unicode's "Bidi_Control" characters).
INVISIBLE_OR_DIRECTION = frozenset("\u200b\u2060\u2061\u2062\u2063\u2064\ufeff\u034f\u180e"
                                   "\u115f\u1160\u3164\uffa0"
                                   "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class ListFormatError(ValueError):
    """A list file that cannot be read; the message names the file and line."""


def read_list(path: str | Path) -> list[tuple[str, str]]:
    """Rows of `(relative_path, individual)` in file order; blank lines and `#` comments skipped."""
    return [(rel, name) for _, rel, name in read_numbered_list(path)]


def read_numbered_list(path: str | Path) -> list[tuple[int, str, str]]:
    """`read_list` with each row's line number first, for messages about a user's own list."""
    path = Path(path)
    if not path.is_file():
        raise ListFormatError(f"{path}: list file {missing(path, folder=False)}")
    rows = []
    for lineno, line in enumerate(read_utf8(path, ListFormatError).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if "\0" in line:  # no file name holds one; every later open() would fail with a traceback
            raise ListFormatError(f"{path}:{lineno}: a NUL character in {clipped_repr(line)}")
        if len(parts) != 2:
            comma = " (separated by whitespace, not a comma: a CSV file's lines do not read)" if "," in line else ""
            raise ListFormatError(f"{path}:{lineno}: expected '<path> <individual>'{comma}, "
                                  f"got {clipped_repr(line)}")
        rows.append((lineno, parts[0], parts[1]))
    return rows


def canonical_name(name: str) -> str:
    """An individual's name in Unicode's composed form (NFC). 'Zoé' typed on a keyboard is composed,
    while macOS may store the folder name 'Zoé' decomposed (e + a combining accent): two strings that
    look the same would otherwise be two individuals, too far apart for the near-duplicate check."""
    return unicodedata.normalize("NFC", name)


def is_list_name(name) -> bool:
    """Whether `name` can be an individual's name in a list: a non-empty string without whitespace
    (a line splits on its last run of whitespace, so a name with a space would not read back)."""
    return isinstance(name, str) and bool(name) and not any(c.isspace() for c in name)


def name_problem(name) -> str | None:
    """What keeps `name` from being an individual's name (`individual name 'x' <problem>`), or None:
    the one rule of annotations, split lists, a checkpoint's class list and galleries. A name with
    whitespace would not read back from a list; a control character (a terminal escape, say) would
    be replayed by every listing that prints the name; a zero-width space makes a second name that
    looks like the first, and a text-direction control reorders the line it is printed in (other
    format characters, a soft hyphen or the zero-width joiner inside many emoji, are part of names
    people type); `unknown` would read as a rejected photo."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if any(c.isspace() for c in name):
        return "contains whitespace"
    control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"holds a control character (U+{ord(control):04X})"
    hidden = next((c for c in name if c in INVISIBLE_OR_DIRECTION), None)
    if hidden is not None:
        return f"holds an invisible or text-direction character (U+{ord(hidden):04X})"
    if name.lower() == REJECTED_NAME:
        return "is what inference calls a rejected photo"
    return None


def underscored(name: str) -> str:
    """`name` with each run of whitespace replaced by '_': the mend suggested for (or, with
    `prepare --spaces-to-underscores`, applied to) a name with whitespace."""
    return "_".join(name.split())


def write_list(path: str | Path, rows) -> None:
    """Write `(relative_path, individual)` rows; refuses names that would not read back."""
    path = Path(path)
    lines = []
    for rel, name in rows:
        if not is_list_name(name):
            raise ListFormatError(f"individual name {clipped_repr(name)} is empty or contains whitespace")
        lines.append(f"{rel} {name}\n")
    atomic.write_text(path, "".join(lines))
