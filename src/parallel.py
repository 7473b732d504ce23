"""`map` in worker processes that do not inherit this process's threads, nor re-run its script, and
that fail loudly when a worker dies."""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext

from src.errors import signals_held

# A forked child gets a copy of every lock some thread of the parent held at that moment (torch's
# thread pools, a checkpoint-writer thread, tqdm's monitor, logging); one that was held is never
# released and the child hangs. A fork server is started clean and forks the workers from itself.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class WorkerDied(RuntimeError):
    """A worker process ended without a result (killed for lack of memory, a crash)."""


def map_in_processes(function: Callable, items: Iterable, workers: int, preload: str,
                     chunksize: int = 1) -> Iterator:
    """`map(function, items)` in `workers` processes, results in order, as they come.

    `preload` is the module of `function` (the caller's `__name__`): the fork server imports it once,
    so that the workers start without importing anything (the cache's, `src.data.decode`, is kept
    free of torch, whose import takes about a second).
    concurrent.futures rather than `multiprocessing.Pool`: a Pool replaces a worker that was killed
    (out of memory, say) and waits forever for the task it held; the executor raises instead.
    At most one process per CPU core: the work is CPU-bound, and a typo such as `workers: 400` would
    otherwise start hundreds of processes, each with its own memory.
    """
    workers = max(1, min(workers, os.cpu_count() or 1))
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload([preload])  # takes effect when the server starts (once per process)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_end_with, initargs=(os.getpid(),)) as executor:
        # Functions of `__main__` (a module of ours run with -m) need it in the workers, where it is
        # imported by name: our entry points are guarded. Any other caller's main stays out. The
        # executor starts its workers as `map` submits the tasks, so the block covers all of them.
        # Signals are held: a worker whose start a KeyboardInterrupt cut short fails with a traceback
        # of its own once this process has exited.
        try:
            with signals_held(), nullcontext() if preload == "__main__" else _main_script_hidden():
                if START_METHOD == "forkserver":
                    _start_fork_server()
                results = executor.map(function, items, chunksize=chunksize)
        except BaseException:  # a Ctrl-C held while the workers started: the queue must not run first
            # One call that cancels and waits: a later shutdown() (the `with`'s) would reset the
            # cancellation before the executor's thread acted on it.
            executor.shutdown(wait=True, cancel_futures=True)
            raise
        try:
            yield from results
        except BrokenProcessPool as exc:
            if exc.__cause__ is not None:  # the traceback of a result or exception the pipe could not unpickle
                problem = [line for line in str(exc.__cause__).splitlines() if line.strip("' ")][-1]
                raise WorkerDied(f"a worker's result or error could not be passed back ({problem})") from None
            raise WorkerDied(f"a worker process died without a result (out of memory?); try fewer "
                             f"workers than {workers}") from None


def _end_with(caller: int) -> None:
    """Worker initializer: end this worker when `caller` ends.

    A caller that exits normally stops its workers. One killed outright (`kill -9`, the out-of-memory
    killer) cannot, and the workers never notice by themselves: each holds both ends of its task
    queue (multiprocessing hands a queue's two pipe ends to every process it reaches), so no read
    ever sees end-of-file. They would run on for good, and with them the fork server (each worker
    holds the caller's end of the server's liveness pipe) and multiprocessing's resource tracker.
    A daemon thread waits for the caller (a pidfd on Linux, else a poll of its process id) and exits."""
    threading.Thread(target=_exit_after, args=(caller,), name="caller-watch", daemon=True).start()


def _exit_after(caller: int) -> None:
    try:
        handle = os.pidfd_open(caller)  # readable once the process has ended
    except (AttributeError, OSError):  # not Linux (>= 5.3), or the caller is already gone
        while _running(caller):
            time.sleep(1.0)
    else:
        waiting = select.poll()  # not select.select, which refuses descriptors past 1023
        waiting.register(handle, select.POLLIN)
        waiting.poll()
    os._exit(1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone (PermissionError: its id reused by another user)
        return False
    return True


def _start_fork_server() -> None:
    """Start the fork server (once per process) with SIGINT ignored, which it and every worker it
    forks keep: Ctrl-C in a terminal signals the whole process group, and a fork server or worker
    interrupted would print a traceback of its own. This process alone stops, and so stops them
    (`executor.map` cancels the tasks not begun when left). Ctrl-C in the few milliseconds of the
    server's start is lost, not held."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        multiprocessing.forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _main_script_hidden():
    """Start workers that do not import the caller's `__main__`.

    Spawned and fork-server workers import the parent's main script (or `-m` module) so that they
    can unpickle functions defined there. Ours run functions of `preload` only, and a user's script
    without an `if __name__ == "__main__":` guard would start training again in every worker, whose
    cache build then waits forever on the parent's cache lock: a silent hang. multiprocessing decides
    what to import from `sys.modules["__main__"]` when each worker starts, so a bare module stands in
    while they start.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
