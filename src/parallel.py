"""Worker processes that do not inherit this process's threads, nor re-run its script."""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import sys
import types
from contextlib import contextmanager, nullcontext

# A forked child gets a copy of every lock some thread of the parent held at that moment (torch's
# thread pools, a checkpoint-writer thread, tqdm's monitor, logging); one that was held is never
# released and the child hangs. A fork server is started clean and forks the workers from itself.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def process_pool(workers: int, preload: str) -> multiprocessing.pool.Pool:
    """A `multiprocessing.Pool` of `workers` processes running functions of module `preload` (the
    caller's `__name__`).

    The fork server imports `preload` once (torch, for the cache: about a second), so each pool's
    workers start without importing anything.
    """
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload([preload])  # takes effect when the server starts (once per process)
    # Functions of `__main__` (a module of ours run with -m) need it in the workers, where it is
    # imported by name: our entry points are guarded. Any other caller's main stays out.
    with nullcontext() if preload == "__main__" else _main_script_hidden():
        return context.Pool(workers)


@contextmanager
def _main_script_hidden():
    """Start workers that do not import the caller's `__main__`.

    Spawned and fork-server workers import the parent's main script (or `-m` module) so that they
    can unpickle functions defined there. Ours run functions of `preload` only, and a user's script
    without an `if __name__ == "__main__":` guard would start training again in every worker, whose
    cache build then waits forever on the parent's cache lock: a silent hang. multiprocessing decides
    what to import from `sys.modules["__main__"]` when each worker starts, which `Pool()` does
    before it returns, so a bare module stands in for that moment.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
