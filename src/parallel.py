"""`map` in worker processes that do not inherit this process's threads, nor re-run its script, and
that fail loudly when a worker dies."""
from __future__ import annotations

import multiprocessing
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext

# A forked child gets a copy of every lock some thread of the parent held at that moment (torch's
# thread pools, a checkpoint-writer thread, tqdm's monitor, logging); one that was held is never
# released and the child hangs. A fork server is started clean and forks the workers from itself.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class WorkerDied(RuntimeError):
    """A worker process ended without a result (killed for lack of memory, a crash)."""


def map_in_processes(function: Callable, items: Iterable, workers: int, preload: str,
                     chunksize: int = 1) -> Iterator:
    """`map(function, items)` in `workers` processes, results in order, as they come.

    `preload` is the module of `function` (the caller's `__name__`): the fork server imports it once
    (torch, for the cache: about a second), so that the workers start without importing anything.
    concurrent.futures rather than `multiprocessing.Pool`: a Pool replaces a worker that was killed
    (out of memory, say) and waits forever for the task it held; the executor raises instead.
    At most one process per CPU core: the work is CPU-bound, and a typo such as `workers: 400` would
    otherwise start hundreds of processes, each with its own memory.
    """
    workers = max(1, min(workers, os.cpu_count() or 1))
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload([preload])  # takes effect when the server starts (once per process)
    with ProcessPoolExecutor(workers, mp_context=context) as executor:
        # Functions of `__main__` (a module of ours run with -m) need it in the workers, where it is
        # imported by name: our entry points are guarded. Any other caller's main stays out. The
        # executor starts its workers as `map` submits the tasks, so the block covers all of them.
        with nullcontext() if preload == "__main__" else _main_script_hidden():
            results = executor.map(function, items, chunksize=chunksize)
        try:
            yield from results
        except BrokenProcessPool:
            raise WorkerDied(f"a worker process died without a result (out of memory?); try fewer "
                             f"workers than {workers}") from None


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
