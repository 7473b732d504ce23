"""One-line error messages: from exceptions raised by libraries (torch, onnxruntime, ...), for
arguments of the Python API that its command lines check while parsing, and the commands' parsers."""
from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import numbers
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

NAMES_SHOWN = 3  # names listed in a message before "and N more", so that it stays one short line


# A command's exit code when Ctrl-C or SIGTERM stops it: 128 + the signal's number, what a shell
# reports for a process the signal killed.
INTERRUPTED_EXIT = 130
STOPPED_BY_CTRL_C = "error: stopped by Ctrl-C (SIGINT)"
TERMINATED_EXIT = 143
STOPPED_BY_SIGTERM = "error: stopped by SIGTERM"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (`sigterm_raises`) as Ctrl-C raises KeyboardInterrupt; a
    BaseException like it, so that an `except Exception` around a library call does not take it for
    that call's failure."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM (`kill`, a batch scheduler's time limit) raises Terminated in the block. Its default
    ends the process on the spot, silently, where the exception unwinds as Ctrl-C does: worker pools
    shut down, temporary files are removed, and the command ends with one line. Main thread only, and
    only where nothing else handles SIGTERM (training's StopRequest takes over inside)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(_signum, _frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving in the block reaches its handler at the end of the block: for steps
    that must not be left halfway (starting a worker process, renaming a set of files). Main thread
    only (signal handlers can be set nowhere else); elsewhere signals come as they always do.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    # A handler set outside Python (getsignal gives None) could not be put back: it stays.
    held = {signum: signal.signal(signum, lambda number, _frame: arrived.append(number))
            for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not None}
    try:
        yield
    finally:
        for signum, previous in held.items():
            signal.signal(signum, previous)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


def show_warnings() -> None:
    """A command's set-up: the warnings its modules log (a cache that left images out, a damaged CSV
    line) go to stderr as `warning: ...` lines, as the commands print their own. Without it Python
    prints them bare (training) or as `WARNING:` (evaluation did)."""
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")


# Why a command's stdout could not be written (a full disk; a closed pipe is no failure): the
# command goes on, so that a --output file or a gallery is still saved, and `command_main` then ends
# it with this line and exit code 2.
STDOUT_FAILURES: list[str] = []

# Whether a command's `main` is running in this thread: a command that runs another's (the benchmarks
# make their data with standin's and prepare's) leaves a stop to the outermost.
_RUNNING = threading.local()


def option_errors_returned(main: Callable[..., int]) -> Callable[..., int]:
    """A command's `main(argv)` that returns the exit status of an option error or `--help` (2 or 0,
    a ParserExit from its CommandParser) as it returns every other status: called from Python
    (`gallery.main([...])` in a notebook or a loop) a mistyped option must not end the caller's
    program. `sys.exit(main())` exits with the same status as before."""
    @functools.wraps(main)
    def returning_the_status(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ParserExit as exc:
            return exc.code
    return returning_the_status


def command_main(main: Callable[..., int]) -> Callable[..., int]:
    """A command's `main` that Ctrl-C or SIGTERM ends with one line and INTERRUPTED_EXIT or
    TERMINATED_EXIT, and that ends with one line and exit code 2 when its results could not be
    written to stdout or memory ran out, instead of a traceback (training has its own, which first
    saves a checkpoint once training is under way). Option errors are returned (`option_errors_returned`)."""
    main = option_errors_returned(main)

    @functools.wraps(main)
    def main_with_one_line_stops(*args, **kwargs) -> int:
        if getattr(_RUNNING, "command", False):
            # Run by another command, which reports stops and stdout failures: a stop caught here became
            # an exit code, and the outer command went on, or failed with a second line and exit code 1.
            return main(*args, **kwargs)
        STDOUT_FAILURES.clear()
        _RUNNING.command = True
        try:
            with sigterm_raises():
                code = main(*args, **kwargs)
        except MemoryError as exc:
            print(out_of_memory(exc), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(STOPPED_BY_CTRL_C, file=sys.stderr)
            return INTERRUPTED_EXIT
        except Terminated:
            print(STOPPED_BY_SIGTERM, file=sys.stderr)
            return TERMINATED_EXIT
        finally:
            _RUNNING.command = False
        if STDOUT_FAILURES and code != 2:  # a 2 has said what went wrong in a line of its own
            print(f"error: {STDOUT_FAILURES[0]}", file=sys.stderr)
            return 2
        return code
    return main_with_one_line_stops


def uncaught_ctrl_c_says_one_line() -> None:
    """A KeyboardInterrupt that nothing catches prints STOPPED_BY_CTRL_C instead of a traceback: Ctrl-C
    in a command's first seconds, while Python imports torch and before `main` (and its
    `command_main`) runs. Python still exits by SIGINT (130 in a shell); only what it prints changes."""
    print_exception = sys.excepthook

    def print_ctrl_c_in_one_line(kind, value, traceback) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(STOPPED_BY_CTRL_C, file=sys.stderr)
        else:
            print_exception(kind, value, traceback)
    sys.excepthook = print_ctrl_c_in_one_line


def out_of_memory(exc: MemoryError) -> str:
    """The one line for the machine running out of memory (decoding an image too large for it, too
    many workers): a shortage, not bad input, yet a traceback helps no one either. A DataLoader worker's
    error comes with the worker's traceback as its message; its last line names the image, or is a bare
    `MemoryError` (Python's own, from an allocation)."""
    lines = str(exc).strip().splitlines()
    if lines and lines[0].startswith("Caught MemoryError in DataLoader worker"):
        worker_said = lines[-1].removeprefix("MemoryError").removeprefix(": ")
        return f"error: {worker_said or 'out of memory'}"
    return f"error: {first_line(exc) if lines else 'out of memory'}"


# What the commands import. The README writes them `python -m ...`; run with a Python outside .venv they
# ended in a traceback about a missing module.
COMMAND_PACKAGES = ("numpy", "PIL", "pydantic", "torch", "torchvision", "yaml")


def exit_without_the_packages() -> None:
    """Exit with one line and code 2 when this Python lacks a package of COMMAND_PACKAGES."""
    missing = [name for name in COMMAND_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {sys.executable} lacks the project's packages ({', '.join(missing)}): run the command with "
              ".venv/bin/python, or `source .venv/bin/activate` first (`bash scripts/setup.sh` creates .venv)",
              file=sys.stderr)
        sys.exit(2)


def first_line(exc: BaseException) -> str:
    """The first line of the exception's message, or its type's name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_whole(value) -> bool:
    """Whether `value` is an integer and not a bool (True passes isinstance(True, int)): for numbers
    read from a file or given to the API, where `true` for a count is a mistake."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value, error: type[Exception]) -> int:
    """`value` as an int when it is a whole number of at least 1 (a batch size, a top-k, a count),
    else `error` naming `name`: 0 or a negative number would give nothing, silently, or a traceback."""
    if not is_whole(value) or value < 1:
        raise error(f"{name} must be a whole number of at least 1, not {value!r}")
    return int(value)


class ParserExit(SystemExit):
    """How a CommandParser ends a command: an option error (2) or `--help` (0). A SystemExit, as
    argparse's own, which `option_errors_returned` turns into the status `main` returns (a command's
    own `raise SystemExit(...)` is not one, and passes)."""


class CommandParser(argparse.ArgumentParser):
    """A command's argument parser whose errors are one line, as the command's own are: argparse
    prints its usage block (3-5 lines) before `error: ...`; `--help` still shows it all."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        try:
            super().exit(status, message)  # prints the message, then raises SystemExit
        except SystemExit:
            raise ParserExit(status) from None


def command_parser(module: str, description: str) -> CommandParser:
    """The parser of `python -m <module>`, described by the first paragraph of `description` (a
    docstring's summary may run over two lines; its first line alone ended mid-sentence in --help)."""
    return CommandParser(prog=f"python -m {module}", description=" ".join(description.split("\n\n")[0].split()))


def path_argument(text: str) -> Path:
    """An argparse `type` for paths: an empty string is refused, where Path("") is the current folder
    (`--out ''`, an unset shell variable, wrote a report or an export into it; `--raw-dir ''` read it)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (it would mean the current folder)")
    return Path(text)


def state_dict_problem(exc: RuntimeError, limit: int = 200) -> str:
    """The first problem `load_state_dict` names, shortened: its message starts with a header that
    names none ("Error(s) in loading state_dict for ...:"), then one line per problem."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return clipped(next((line for line in lines[1:] if line), first_line(exc)), limit)


def clipped(text: str, limit: int = 120) -> str:
    """`text`, cut to `limit` characters with "..." where longer: a value read from a file in a
    one-line message (a crafted checkpoint's 1 MB string made a 1 MB line)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def clipped_repr(value) -> str:
    """`repr(value)`, clipped (`clipped`)."""
    return clipped(repr(value))


def folder_or_file(path: Path, error: type[Exception], what: str) -> tuple[bool, bool]:
    """(`path` is a folder, `path` is a regular file); `error`, one line naming the `what` path, where
    the system refuses the lookup: Path.is_dir and is_file raise OSError then, rather than answer
    False (a name over 255 bytes, a folder this user cannot search)."""
    try:
        return path.is_dir(), path.is_file()
    except OSError as exc:
        raise error(f"{path}: {unusable_path(exc, what)}") from None


def unusable_path(exc: OSError, what: str = "") -> str:
    """Why a path the system refused to look up (`folder_or_file`) cannot be used: `not a usable
    <what> path (File name too long)`."""
    return f"not a usable {what + ' ' if what else ''}path ({exc.strerror or exc})"


def missing(path: str | Path, folder: bool) -> str:
    """Why `path` is not the folder (or regular file) asked for: `not found`, or what stands there
    instead, for messages such as `raw folder x is a file, not a folder`."""
    path = Path(path)
    if not path.exists():
        return "not found"
    if folder:
        return "is a file, not a folder"
    return "is a folder, not a file" if path.is_dir() else "is not a regular file (a pipe or a device)"


def capped(names: Sequence[str]) -> str:
    """`a, b, c and 7 more`: names for a one-line message, however many there are."""
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown if len(names) <= NAMES_SHOWN else f"{shown} and {len(names) - NAMES_SHOWN} more"
