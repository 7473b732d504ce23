"""Tasks for the worker processes of tests/test_parallel.py, in a module of their own: a worker
imports a task's module, and the test module's (through tests/conftest.py) imports torch, seconds
per worker that every map paid."""
from __future__ import annotations

import os
import signal
import time


def exit_abruptly(item: int) -> int:
    """What the kernel's out-of-memory killer does to a worker, as far as its pool can tell."""
    if item == 3:
        os._exit(9)
    return item


def note_and_wait(path: str) -> str:
    """A task that leaves a trace: the file it was given."""
    with open(path, "w"):
        pass
    time.sleep(0.05)
    return path


def sigint_disposition(_item) -> str:
    return signal.Signals(signal.SIGINT).name if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "handled"


class TwoPartError(Exception):
    """An exception that pickles but does not unpickle (its __init__ takes two arguments, its args
    hold one): the project's ImageLoadError is one."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")


def raise_two_part_error(item: int) -> int:
    raise TwoPartError(str(item), "unreadable")
