"""Reading the project's text inputs (configs, lists, annotation files) with a one-line error."""
from __future__ import annotations

from pathlib import Path


def read_utf8(path: Path, error: type[Exception], encoding: str = "utf-8") -> str:
    """The text of `path`; raises `error` naming the file and the first bad byte when it is not UTF-8
    (a binary file or another encoding given by mistake), instead of a UnicodeDecodeError traceback."""
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
