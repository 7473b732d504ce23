"""torchrun with 2 CPU processes (gloo): same command, same artifacts, same meaning of the metrics."""
from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch

from src.config import load_config
from src.data.dataset import PreparedData
from src.data.loaders import build_source
from src.models.trained import load_checkpoint, load_trained
from src.training import distributed as dist_utils
from src.training.distributed import DistInfo
from src.training.train import Runtime, evaluate, run
from src.training.train import main as train_main
from tests.conftest import REPO, main_in_process, write_config
from tests.test_locks import HOLD as HOLD_LOCK

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun on gloo, tested on Linux")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def torchrun(config_path, *extra, processes=2, timeout=300):
    command = [*TORCHRUN, str(processes), "-m", "src.training.train", "--config", str(config_path), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def metrics(path):
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


# A tiny learning rate keeps the weights of the two-process and the single-process run together
# (test_metrics_match_a_single_process_run); the other checks of that run do not depend on it.
TWO_PROCESS_RUN = {"trainer.max_epochs": 1, "trainer.lr": 1e-6}


@pytest.fixture(scope="module")
def uneven_data(tiny_data, tmp_path_factory):
    """tiny_data less its last validation image: 17 on 2 processes with 8 per batch, so rank 0
    evaluates 2 batches and rank 1 one."""
    data = tmp_path_factory.mktemp("uneven") / "data"
    shutil.copytree(tiny_data, data)
    prepared = data / "annotations" / "prepared.json"
    prepared.write_text(prepared.read_text().replace(str(tiny_data), str(data)))
    val = data / "annotations" / "val.txt"
    val.write_text("".join(val.read_text().splitlines(keepends=True)[:-1]))
    return data


@pytest.fixture(scope="module")
def two_process_run(uneven_data, tmp_path_factory):
    """One epoch under `torchrun --nproc_per_node 2` on uneven_data: the result and the folder of its
    config and artifacts (tests that go on from it copy them). Three tests check it: its own run
    costs seconds of importing torch in three processes."""
    directory = tmp_path_factory.mktemp("two_processes")
    return torchrun(write_config(directory, uneven_data, **TWO_PROCESS_RUN), timeout=180), directory


def test_two_processes_train_write_once_and_resume(uneven_data, tmp_path, two_process_run):
    first, directory = two_process_run
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("[Epoch 1/1]") == 1  # rank 0 alone prints
    assert "torchrun: 2 process(es), gloo, global batch 16 (8 per process)" in first.stdout
    assert sorted(p.name for p in (directory / "artifacts").iterdir()) == [
        "tiny_best.pt", "tiny_last.pt", "tiny_metrics.csv"]  # rank 0's lock file removed at the end
    artifacts = shutil.copytree(directory / "artifacts", tmp_path / "artifacts")
    extended = write_config(tmp_path, uneven_data, **{**TWO_PROCESS_RUN, "trainer.max_epochs": 2})
    second = torchrun(extended, "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and second.stdout.count("[Epoch 2/2]") == 1
    assert [row["epoch"] for row in metrics(artifacts / "tiny_metrics.csv")] == [1.0, 2.0]


def test_metrics_match_a_single_process_run(uneven_data, tmp_path, two_process_run):
    """Same global batch, seed, order and augmentation draws (each rank takes its slice of the global
    batch). What differs is BatchNorm: each rank normalises its half-batch with its own statistics
    (SyncBatchNorm, which would remove that, is CUDA-only). A tiny learning rate keeps the weights
    of both runs together, so the losses differ only by that normalisation: measured ~1.5%; the
    tolerance is 5%. Top-k over 64 images moves in steps of 1.6% and is not compared."""
    multi, directory = two_process_run
    assert multi.returncode == 0, multi.stderr
    # In this process: the reference needs no interpreter of its own (one thread, as the command's).
    run(load_config(write_config(tmp_path, uneven_data, **TWO_PROCESS_RUN)))
    [one] = metrics(tmp_path / "artifacts" / "tiny_metrics.csv")
    [two] = metrics(directory / "artifacts" / "tiny_metrics.csv")
    assert two["lr"] == one["lr"]
    for key in ("train_loss", "val_loss"):
        assert two[key] == pytest.approx(one[key], rel=0.05), key


FAIL_ON_RANK_1 = """
import os, sys
from src.training import train
if os.environ["RANK"] == "1":
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure on rank 1")
    train.train_one_epoch = broken
sys.exit(train.main())
"""


def test_a_failing_process_ends_the_job_with_its_error(tiny_data, tmp_path):
    script = tmp_path / "fail_rank1.py"
    script.write_text(FAIL_ON_RANK_1)
    config_path = write_config(tmp_path, tiny_data)
    started = time.monotonic()
    result = subprocess.run([*TORCHRUN, "2", str(script), "--config", str(config_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=240, env={"PYTHONPATH": str(REPO),
                                                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "simulated failure on rank 1" in result.stderr
    assert time.monotonic() - started < 120


def test_uneven_validation_shards_do_not_hang(two_process_run):
    """17 validation images on 2 processes with 8 per batch: rank 0 evaluates 2 batches, rank 1 one.
    Evaluation must not run collectives per batch (DDP's forward would wait for the other rank)."""
    result, _ = two_process_run  # run with a timeout: a hang fails it
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[Epoch 1/1]") == 1


def test_validation_figures_are_those_of_one_process_on_the_saved_weights(two_process_run):
    """17 validation images split between 2 ranks (9 and 8, padded to one batch size): the epoch's
    val figures count every image once, so they are one process's on the checkpoint's weights, up to
    the rounding of other batch sizes (the 5% of test_metrics_match_a_single_process_run is training's)."""
    result, directory = two_process_run
    assert result.returncode == 0, result.stderr
    trained = load_trained(directory / "artifacts" / "tiny_last.pt", torch.device("cpu"))
    data = PreparedData.load(trained.config.data.root)
    val = build_source(trained.config, data.split("val"), data.raw_dir, trained.classes, train=False, pad=True,
                       device=trained.device)
    runtime = Runtime(trained.device, DistInfo(), amp_dtype=None)
    one = evaluate(trained.model, trained.model, val, trained.config, runtime).means(runtime)
    [row] = trained.checkpoint["history"]
    assert one["images"] == 17
    assert (row["val_top1"], row["val_top5"]) == (one["top1"], one["top5"])
    assert row["val_loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def one_process_run(tiny_data, tmp_path_factory):
    """One epoch under `torchrun --nproc_per_node 1`: the result and the folder of its config and
    artifacts (tests that go on from it copy them)."""
    directory = tmp_path_factory.mktemp("one_process")
    return torchrun(write_config(directory, tiny_data, **{"trainer.max_epochs": 1}), processes=1), directory


def test_one_process_under_torchrun_uses_the_process_group(one_process_run):
    """`torchrun --nproc_per_node 1` is the cheapest check of the NCCL path on one GPU: it must set up
    the process group and DDP, not fall back to the plain single-process path."""
    result, _ = one_process_run
    assert result.returncode == 0, result.stderr
    assert "torchrun: 1 process(es), gloo" in result.stdout


TWO_RUNS = """
import sys
from src.config import load_config
from src.training.train import run
config = load_config(sys.argv[1])
run(config)
config.trainer.max_epochs = 2
state = run(config, resume="auto")
print(f"second run ended at epoch {state.epoch}", flush=True)
"""


def test_run_twice_in_one_torchrun_worker_resumes_on_every_rank(tiny_data, tmp_path):
    """The Python API under torchrun: `run(config)` then `run(config, resume="auto")` in the same
    workers. The second run reuses the process group (initialising it twice was an error), and no
    rank reads `_last.pt` before rank 0 has written it (rank 1 used to start over from epoch 1 while
    rank 0 resumed at epoch 2, and the job crashed on mismatched collectives)."""
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS)
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1})
    result = subprocess.run([*TORCHRUN, "2", str(script), str(config_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=240, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("second run ended at epoch 2") == 2  # both ranks
    assert "resumed from" in result.stdout and result.stdout.count("[Epoch 2/2]") == 1
    assert [row["epoch"] for row in metrics(tmp_path / "artifacts" / "tiny_metrics.csv")] == [1.0, 2.0]


RUN_AND_SAY_THE_BEST = """
import os, sys
from src.config import load_config
from src.training.train import run
state = run(load_config(sys.argv[1]), resume="auto")
print(f"rank {os.environ['RANK']}: best epoch {state.best_epoch}, val top1 {state.best_val_top1}", flush=True)
"""


def test_every_rank_takes_the_best_epoch_rank_0_mended(tiny_run, tmp_path):
    """Resuming a `_last.pt` whose best epoch (2) is not in `_best.pt` (none): rank 0 alone looks at the
    files and chooses the best afresh, rank 1 kept epoch 2, so `run()` returned another state on each
    rank and the ranks compared the next epochs with different bests. The run is finished: nothing trains."""
    script = tmp_path / "run_and_say_the_best.py"
    script.write_text(RUN_AND_SAY_THE_BEST)
    last = load_checkpoint(tiny_run["last"])
    (tmp_path / "artifacts").mkdir()
    torch.save({**last, "best_epoch": 2, "best_val_top1": last["history"][1]["val_top1"]},
               tmp_path / "artifacts" / "tiny_last.pt")
    config_path = write_config(tmp_path, tiny_run["data_root"], **{"trainer.max_epochs": 3})
    result = subprocess.run([*TORCHRUN, "2", str(script), str(config_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=240, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "is not in" in result.stdout, result.stdout  # rank 0's note: the best is chosen afresh
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0: best epoch 0, val top1 -1.0", "rank 1: best epoch 0, val top1 -1.0"]

def test_rank_variables_without_torchrun_give_one_line(tiny_data, tmp_path, monkeypatch, capsys, caplog):
    """RANK and WORLD_SIZE left in the environment by something other than torchrun (no
    MASTER_ADDR / MASTER_PORT) end the run with one line and exit 2, not a rendezvous traceback."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # main() in this process: the environment is all it reads (torchrun's tests run the command line).
    result = main_in_process(train_main, ["--config", str(write_config(tmp_path, tiny_data))], capsys, caplog)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not: launch with torchrun, "
        "or unset RANK and WORLD_SIZE to train in one process"]


def test_more_processes_than_gpus_give_one_line(tiny_data, tmp_path, monkeypatch, capsys, caplog):
    """`torchrun --nproc_per_node 4` on a machine that shows the processes 2 GPUs, simulated as rank 3:
    before, ranks 2 and 3 ended in torch's `invalid device ordinal` traceback at torch.cuda.set_device."""
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def set_device(index):
        if index >= 2:
            raise RuntimeError("CUDA error: invalid device ordinal")

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    config_path = write_config(tmp_path, tiny_data, **{"trainer.device": "cuda"})
    result = main_in_process(train_main, ["--config", str(config_path)], capsys, caplog)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "[rank 3] error: torchrun: this process has LOCAL_RANK 3 but sees 2 CUDA GPU(s): start at most "
        "one process per GPU (--nproc_per_node 2 or fewer)"]


@pytest.mark.parametrize("rank, world_size, port_in_use, message", [
    # rank 0 cannot listen at MASTER_PORT (another job holds it): was torch's traceback, some 25 lines
    (0, 1, True, "error: torchrun: rank 0 of 1 could not set up the gloo process group at 127.0.0.1:{port} "
                 "(The server socket has failed to listen on any local network address."),
    # WORLD_SIZE says 2, one process came (a world size mismatch): the same traceback after the timeout
    (0, 2, False, "error: torchrun: rank 0 of 2 could not set up the gloo process group at 127.0.0.1:{port} "
                  "(Timed out after "),
    # a rank no process group has: waited for the whole timeout, then the traceback
    (2, 2, False, "[rank 2] error: RANK 2, WORLD_SIZE 2 and LOCAL_RANK 0: RANK must be 0 to WORLD_SIZE - 1"),
], ids=["port-in-use", "world-size-mismatch", "rank-out-of-range"])
def test_a_process_group_that_cannot_be_set_up_gives_one_line(tiny_data, tmp_path, monkeypatch, capsys, caplog,
                                                              rank, world_size, port_in_use, message):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        if not port_in_use:
            held.close()
        for name, value in {"RANK": rank, "WORLD_SIZE": world_size, "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": port}.items():
            monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(dist_utils, "TIMEOUT", timedelta(seconds=1))
        result = main_in_process(train_main, ["--config", str(write_config(tmp_path, tiny_data))], capsys, caplog)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(message.format(port=port)), line



@pytest.mark.parametrize("variables, message", [
    # was a ValueError traceback from init_distributed; the error's report parsed RANK again
    ({"RANK": "x", "WORLD_SIZE": "2"}, "error: RANK is 'x', not a whole number"),
    ({"RANK": "1", "WORLD_SIZE": "2.5"}, "[rank 1] error: WORLD_SIZE is '2.5', not a whole number"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "y" * 300}, "[rank 1] error: LOCAL_RANK is 'yyyy"),
], ids=["rank", "world-size", "local-rank-clipped"])
def test_rank_variables_that_are_not_whole_numbers_give_one_line(tiny_data, tmp_path, monkeypatch, capsys, caplog,
                                                                 variables, message):
    for name, value in {"LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **variables}.items():
        monkeypatch.setenv(name, value)
    result = main_in_process(train_main, ["--config", str(write_config(tmp_path, tiny_data))], capsys, caplog)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(message) and line.endswith(
        ", not a whole number: launch with torchrun, or unset RANK and WORLD_SIZE to train in one process"), line
    assert len(line) < 250, line

SIGNAL_RANK_1_AFTER_EPOCH_1 = """
import os, signal, sys
from src.training import train
if os.environ["RANK"] == "1":
    original = train.train_one_epoch
    def signalled(*args, **kwargs):
        sums = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as if a scheduler signalled this process alone
        return sums
    train.train_one_epoch = signalled
sys.exit(train.main())
"""


OWN_OUTPUT_DIR_PER_RANK = """
import os, sys
from pathlib import Path
from src.training import train
load_config = train.load_config
def rank_1_elsewhere(path):
    config = load_config(path)
    if os.environ["RANK"] == "1":  # a second machine whose artifacts folder is not the first one's
        config.trainer.output_dir = Path(config.trainer.output_dir).parent / "artifacts_rank_1"
    return config
train.load_config = rank_1_elsewhere
sys.exit(train.main())
"""

def test_a_signal_to_one_rank_stops_every_rank_and_saves(tiny_data, tmp_path):
    """Before, rank 1 stopped alone: rank 0 died on the broken collective, and with checkpoints
    throttled (60 s) the epochs done were lost although the message said they were saved."""
    script = tmp_path / "signal_rank1.py"
    script.write_text(SIGNAL_RANK_1_AFTER_EPOCH_1)
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 3, "trainer.checkpoint_interval_s": 60})
    result = subprocess.run([*TORCHRUN, "2", str(script), "--config", str(config_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=240,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    stops = [line for line in result.stderr.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 1 and "after epoch 1; saved" in stops[0], result.stderr
    assert "Resume with: the same torchrun command with --resume auto" in stops[0]
    assert [row["epoch"] for row in metrics(tmp_path / "artifacts" / "tiny_metrics.csv")] == [1.0]


RANK_0_EXITS_LATE = """
import os, sys, time
from src.training import train
code = train.main()
if os.environ["RANK"] == "0":
    time.sleep(3)
sys.exit(code)
"""

def test_a_run_already_training_stops_every_rank_in_one_line_each(tiny_data, tmp_path):
    """Only rank 0 takes the run's lock; before, rank 1 went on into DDP alone and died there."""
    config_path = write_config(tmp_path, tiny_data)
    lock = tmp_path / "artifacts" / ".tiny.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    script = tmp_path / "rank_0_exits_late.py"
    script.write_text(RANK_0_EXITS_LATE)  # else torchrun may end rank 1 before it can say anything
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run([*TORCHRUN, "2", str(script), "--config", str(config_path)], cwd=REPO,
                                capture_output=True, text=True, timeout=120,
                                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error: another run is training 'tiny'" in line]
    assert sorted(line.startswith("[rank 1] error:") for line in errors) == [False, True], result.stderr
    assert not (tmp_path / "artifacts" / "tiny_last.pt").exists()


def test_processes_that_resume_from_different_checkpoints_are_refused(tiny_data, tmp_path, one_process_run):
    """Two machines that do not share trainer.output_dir: one finds a checkpoint, the other none.
    Before, they trained different epochs together, combining unrelated gradients."""
    script = tmp_path / "own_output_dir.py"
    script.write_text(OWN_OUTPUT_DIR_PER_RANK)
    result, directory = one_process_run
    assert result.returncode == 0, result.stderr
    shutil.copytree(directory / "artifacts", tmp_path / "artifacts")  # rank 0's folder now holds epoch 1
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 2})
    result = subprocess.run([*TORCHRUN, "2", str(script), "--config", str(config_path), "--resume", "auto"],
                            cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "cannot resume: the 2 processes found different checkpoints" in result.stderr, result.stderr
    assert "[Epoch 2/2]" not in result.stdout


RECORD_DROPOUT_MASKS = """
import os, sys
from pathlib import Path
import torch
from src.training import train
build = train.build_model_and_optimizer
drawn = []  # per training step: (which inputs of the neck's dropout were non-zero, which outputs are)
def recording(*args, **kwargs):
    built = build(*args, **kwargs)
    built[0].neck[0].register_forward_hook(
        lambda module, inputs, output: drawn.append((inputs[0] != 0, output != 0)) if module.training else None)
    return built
train.build_model_and_optimizer = recording
code = train.main()
torch.save(drawn, Path(sys.argv[-1]).parent / f"masks_{os.environ['RANK']}.pt")
sys.exit(code)
"""


# Validation images whose files are deleted: all in rank 1's share (ranks take every other image).
DELETED_VAL_LINES = (1, 3, 5)


@pytest.fixture(scope="module")
def recorded_two_process_run(tiny_data, tmp_path_factory):
    """One epoch under `torchrun --nproc_per_node 2` with `model.dropout: 0.5`, each rank recording
    what its dropout kept at every step, on the plain pipeline with DELETED_VAL_LINES' images gone:
    the result and the folder of its config and recordings."""
    directory = tmp_path_factory.mktemp("recorded")
    data = directory / "data"
    shutil.copytree(tiny_data, data)
    prepared = data / "annotations" / "prepared.json"
    prepared.write_text(prepared.read_text().replace(str(tiny_data), str(data)))
    val_lines = (data / "annotations" / "val.txt").read_text().splitlines()
    for line in DELETED_VAL_LINES:
        (data / "raw" / val_lines[line].split()[0]).unlink()
    script = directory / "record_dropout_masks.py"
    script.write_text(RECORD_DROPOUT_MASKS)
    config_path = write_config(directory, data, **{"trainer.max_epochs": 1, "model.dropout": 0.5,
                                                   "data.pipeline": "plain"})
    result = subprocess.run([*TORCHRUN, "2", str(script), "--config", str(config_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=240,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return result, directory


def test_each_process_draws_its_own_dropout_masks(recorded_two_process_run):
    """Every rank seeded its generators alike, so with `model.dropout > 0` all drew the same masks,
    each for other images. Compared where both ranks' inputs are non-zero (a zero stays zero)."""
    result, directory = recorded_two_process_run
    assert result.returncode == 0, result.stderr
    rank_0, rank_1 = (torch.load(directory / f"masks_{rank}.pt") for rank in (0, 1))
    assert len(rank_0) == len(rank_1) == 4  # 66 training images, global batch 16
    for (inputs_0, kept_0), (inputs_1, kept_1) in zip(rank_0, rank_1):
        both = inputs_0 & inputs_1
        assert both.sum() > 100 and 0.3 < kept_0[inputs_0].float().mean() < 0.7
        assert not torch.equal(kept_0[both], kept_1[both])


def test_unreadable_images_are_counted_on_every_rank(recorded_two_process_run):
    """The epoch's warning counted rank 0's unreadable images only: here none, all being rank 1's."""
    result, _ = recorded_two_process_run
    assert result.returncode == 0, result.stderr
    assert f"  warning: {len(DELETED_VAL_LINES)} unreadable images skipped this epoch\n" in result.stdout
