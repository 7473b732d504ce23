"""Advisory locks: exclusive between processes, released at the end of the block and at exit."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from src import locks
from src.locks import LockHeld, exclusive, shared
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")

HOLD = ("import sys, time; from src.locks import exclusive\n"
        "with exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")


def test_a_second_process_is_refused_until_the_first_lets_go(tmp_path):
    lock = tmp_path / "sub" / ".run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match="held by another process"):
            with exclusive(lock, wait=False):
                pass
    finally:
        holder.kill()  # like kill -9: the kernel releases the lock
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with exclusive(lock, wait=False) as real:
                assert real
            break
        except LockHeld:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_released_at_the_end_of_the_block(tmp_path):
    lock = tmp_path / ".lock"
    with exclusive(lock, wait=False):
        pass
    with exclusive(lock, wait=False):  # would raise if the first were still held
        pass
    assert lock.is_file()


def test_a_lock_file_replaced_while_waiting_is_locked_afresh(tmp_path, monkeypatch):
    """A waiter that gets the lock on a file no longer at the path (deleted or replaced meanwhile)
    locks the file now there; otherwise a third process would lock that one too and both would run."""
    lock = tmp_path / ".lock"
    opened, holding, release = threading.Event(), threading.Event(), threading.Event()

    def waiter():
        with exclusive(lock):
            holding.set()
            release.wait(10)

    with exclusive(lock):
        real_open = open
        monkeypatch.setattr(locks, "open", lambda *args: (opened.set(), real_open(*args))[1], raising=False)
        thread = threading.Thread(target=waiter)
        thread.start()
        assert opened.wait(10)
        time.sleep(0.2)  # let the waiter block in flock on the file it opened
        replacement = tmp_path / "new"
        replacement.touch()
        os.replace(replacement, lock)
    try:
        assert holding.wait(10)
        with pytest.raises(LockHeld):
            with exclusive(lock, wait=False):
                pass
    finally:
        release.set()
        thread.join(10)


def test_shared_locks_are_held_together_and_wait_for_an_exclusive_one(tmp_path):
    lock = tmp_path / ".lock"
    with shared(lock) as first, shared(lock) as second:
        assert first and second
        with pytest.raises(LockHeld):
            with exclusive(lock, wait=False):
                pass
    reading, waited = threading.Event(), []

    def reader():
        with shared(lock, on_wait=lambda: waited.append(True)):
            reading.set()

    with exclusive(lock):
        thread = threading.Thread(target=reader)
        thread.start()
        assert not reading.wait(0.3)
    assert reading.wait(10) and waited == [True]
    thread.join(10)


def test_a_shared_lock_needs_no_write_access_and_makes_no_folder(tmp_path, monkeypatch):
    """Readers of a read-only copy of a prepared dataset (a cluster's data mount) lock the file prepare
    left there; with no file or no folder there is nothing to lock, and nothing is created."""
    lock = tmp_path / ".lock"
    lock.touch()

    def read_only(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise OSError(30, "Read-only file system", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(locks, "open", read_only, raising=False)
    with shared(lock) as real, open(lock) as other:
        assert real
        with pytest.raises(BlockingIOError):
            locks.fcntl.flock(other, locks.fcntl.LOCK_EX | locks.fcntl.LOCK_NB)
    for missing in (tmp_path / ".other.lock", tmp_path / "none" / ".lock"):
        with shared(missing) as real:
            assert not real
        assert not missing.exists() and not (tmp_path / "none").exists()


# The child says so once fork has returned in it, that is after the fork handlers ran there: 'held' alone
# came before them at times, and the lock was then found held. One os.write each: print's pieces interleaved.
HOLD_AND_FORK = ("import os, sys, time; from src.locks import exclusive\nwith exclusive(sys.argv[1]):\n"
                 "    if os.fork() == 0:\n        os.write(1, b'forked\\n'); time.sleep(30); os._exit(0)\n"
                 "    os.write(1, b'held\\n'); time.sleep(60)")


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    """A child forked while the lock is held (a DataLoader worker) shared its open file, and so the
    lock: killed by kill -9, a training run's lock stayed held ~5 s more, until its workers noticed."""
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(lock)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert {holder.stdout.readline().strip() for _ in range(2)} == {"held", "forked"}
        holder.kill()
        holder.wait()
        with exclusive(lock, wait=False) as real:  # the child still sleeps
            assert real
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the child, in the holder's session
