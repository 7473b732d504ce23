"""Worker processes that do not inherit this process's threads."""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool

# A forked child gets a copy of every lock some thread of the parent held at that moment (torch's
# thread pools, a checkpoint-writer thread, tqdm's monitor, logging); one that was held is never
# released and the child hangs. A fork server is started clean and forks the workers from itself.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def process_pool(workers: int, preload: str) -> multiprocessing.pool.Pool:
    """A `multiprocessing.Pool` of `workers` processes running functions of module `preload`.

    The fork server imports `preload` once (torch, for the cache: about a second), so each pool's
    workers start without importing anything.
    """
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload([preload])  # takes effect when the server starts (once per process)
    return context.Pool(workers)
