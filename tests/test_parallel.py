"""Worker processes: results in order, a dead worker is an error (not a hang), and a caller's
unguarded script is not re-run in the workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from src import parallel
from src.parallel import WorkerDied, map_in_processes
from tests import parallel_tasks
from tests.conftest import REPO
from tests.parallel_tasks import exit_abruptly, note_and_wait, raise_two_part_error, sigint_disposition

# A user's script with no `if __name__ == "__main__":` guard: every time it is executed it notes
# its process id, then builds an image cache with two worker processes.
UNGUARDED_SCRIPT = """\
import os, sys
sys.path.insert(0, {repo!r})
with open({marker!r}, "a") as marker:
    marker.write(f"{{os.getpid()}}\\n")
from src.data.cache import load_or_build_cache
rows = [(line.split()[0], line.split()[1]) for line in open({train_list!r})]
cached = load_or_build_cache(rows, {raw_dir!r}, {cache_dir!r}, 16, workers=2)
print("built", len(cached.kept), flush=True)
"""


# Ctrl-C while a map starts: the fork server is still importing torch (preloading src.data.cache).
INTERRUPTED_SCRIPT = """\
import sys, time
sys.path.insert(0, {repo!r})
from src.parallel import map_in_processes
print("ready", flush=True)
try:
    for _ in map_in_processes(time.sleep, [1.0] * 60, 2, "src.data.cache"):
        pass
except KeyboardInterrupt:
    sys.exit("interrupted")
"""


def test_results_come_in_order():
    paths = [f"/folder/{i}" for i in range(50)]
    assert list(map_in_processes(os.path.basename, paths, 2, "os.path", chunksize=4)) == [str(i) for i in range(50)]


def test_no_more_processes_than_cores(monkeypatch):
    started = []
    real = parallel.ProcessPoolExecutor
    monkeypatch.setattr(parallel, "ProcessPoolExecutor",
                        lambda workers, **options: started.append(workers) or real(workers, **options))
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    assert list(map_in_processes(os.path.basename, ["/a/b", "/c/d"], 400, "os.path")) == ["b", "d"]
    assert started == [2]


def test_a_worker_that_dies_is_an_error_not_a_hang():
    # multiprocessing.Pool, used before, replaced the dead worker and waited for its task forever.
    with pytest.raises(WorkerDied, match="a worker process died without a result"):
        list(map_in_processes(exit_abruptly, range(8), 2, parallel_tasks.__name__))


def test_an_error_that_cannot_be_passed_back_is_named_not_taken_for_a_dead_worker():
    """Before, it read "a worker process died without a result (out of memory?); try fewer workers"."""
    with pytest.raises(WorkerDied, match=r"^a worker's result or error could not be passed back \(TypeError: "
                                         r".*missing 1 required positional argument: 'reason'\)$"):
        list(map_in_processes(raise_two_part_error, range(2), 2, parallel_tasks.__name__))


def test_a_map_stopped_early_drops_the_tasks_not_begun(tmp_path):
    """Interrupted (Ctrl-C, SIGTERM) or no longer read, a map does not run its whole queue first
    (200 x 50 ms here on 2 workers): executor.map cancels its pending tasks when left early, which a
    stopped cache build relies on."""
    results = map_in_processes(note_and_wait, [str(tmp_path / f"{i}") for i in range(200)], 2,
                               parallel_tasks.__name__)
    next(results)
    results.close()
    assert len(list(tmp_path.iterdir())) < 50


def test_an_unguarded_script_runs_once_and_does_not_hang(tiny_data, tmp_path):
    marker = tmp_path / "executions.txt"
    annotations = tiny_data / "annotations"
    raw_dir = json.loads((annotations / "prepared.json").read_text())["raw_dir"]
    script = tmp_path / "my_experiment.py"
    script.write_text(UNGUARDED_SCRIPT.format(repo=str(REPO), marker=str(marker), raw_dir=raw_dir,
                                              train_list=str(annotations / "train.txt"),
                                              cache_dir=str(tmp_path / "cache")))
    # Before the fix each worker re-ran the script and waited forever on the parent's cache lock.
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    train_images = len((annotations / "train.txt").read_text().splitlines())
    assert result.stdout.split() == ["built", str(train_images)]
    assert len(marker.read_text().split()) == 1  # the script itself, in no worker


def test_a_module_run_with_dash_m_reaches_its_own_functions_in_the_workers(tmp_path):
    """`python -m src.data.standin` hands its workers functions of `__main__`: those workers need the
    module (a regression of hiding the caller's main from every pool made them fail, and the pool
    waited for them forever)."""
    result = subprocess.run([sys.executable, "-m", "src.data.standin", "--out", str(tmp_path / "raw"),
                             "--individuals", "2", "--images", "10", "--size", "32", "--workers", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "raw").rglob("*.png"))) == 20


def test_ctrl_c_while_workers_start_stops_the_caller_alone(tmp_path):
    """Ctrl-C in a terminal signals the whole process group. The fork server (importing torch here)
    and the workers ignore it, so none prints a traceback of its own; the caller stops them."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_SCRIPT.format(repo=str(REPO)))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert err.strip() == "interrupted" and process.returncode == 1
    assert time.monotonic() - started < 15  # the tasks under way, not the queue's 30 s


def test_workers_ignore_ctrl_c():
    assert set(map_in_processes(sigint_disposition, range(4), 2, parallel_tasks.__name__)) == {"SIGINT"}


# A caller killed with SIGKILL (`kill -9`, the out-of-memory killer) while its workers are busy.
KILLED_SCRIPT = """\
import sys, time
sys.path.insert(0, {repo!r})
from src.parallel import map_in_processes
list(map_in_processes(time.sleep, [600.0] * 2, 2, "time"))
"""


def descendants(pid: int) -> set[int]:
    """The processes below `pid`, from /proc (children's children included)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_workers_and_fork_server_end_when_the_caller_is_killed(tmp_path):
    """Before, after a `kill -9` of the caller the fork server and its workers ran on for good: a
    worker holds both ends of its task queue, so it never saw the caller go."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT.format(repo=str(REPO)))
    process = subprocess.Popen([sys.executable, str(script)])
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(below) < 4 and time.monotonic() < deadline:  # fork server, resource tracker, 2 workers
            time.sleep(0.1)
            below = descendants(process.pid)
        assert len(below) >= 4, f"the workers did not start: {below}"
        process.kill()
        process.wait()
        deadline = time.monotonic() + 20
        while any(map(alive, below)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in below if alive(pid)]
    finally:
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
