"""Resume and faults: kill -9, SIGTERM, bad checkpoints, incompatible configs, non-finite losses."""
from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from src.config import RESUMABLE_CHANGES, Config, flatten, load_config
from src.data.dataset import ClassIndex, data_fingerprint
from src.locks import exclusive
from src.training import train as train_module
from src.training.artifacts import METRICS_COLUMNS, RunPaths
from src.models.trained import CheckpointError, load_checkpoint
from src.training.checkpoint import atomic_save
from src.training.resume import (RunState, bring_best_along, check_not_going_back, check_resume_compatible,
                                 check_training_state, mend_best_file, restore, restore_rng, rng_state)
from src.training.stopping import StopRequest, TrainingStopped
from src.training.train import run
from tests.conftest import REPO, main_in_process, write_config

EPOCHS = 3


@pytest.fixture(scope="module")
def uninterrupted(tiny_run):
    """Reference: the same config run from start to end without interruption. tiny_run is that run
    (write_config's, for EPOCHS epochs; only the folders differ); the tests only read it."""
    assert tiny_run["config"].trainer.max_epochs == EPOCHS
    return tiny_run["last"].parent


def start_training(config_path):
    return subprocess.Popen([sys.executable, "-m", "src.training.train", "--config", str(config_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epoch_line(process, epoch: int, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(f"[Epoch {epoch}/"):
            return
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"no epoch {epoch} line; stderr: {process.stderr.read()}")


def train_in_process(capsys, caplog, config_path, *extra) -> subprocess.CompletedProcess:
    """The refusals and notes of a resume need the command's exit code and output, not a new
    interpreter importing torch (3-4 s each): the real command line keeps its tests (kill -9,
    SIGTERM, a closed pipe, a full disk; test_train.py)."""
    return main_in_process(train_module.main, ["--config", str(config_path), *map(str, extra)], capsys, caplog)


def assert_same_run(artifacts, reference):
    assert (artifacts / "tiny_metrics.csv").read_text() == (reference / "tiny_metrics.csv").read_text()
    for kind in ("best", "last"):
        ours = load_checkpoint(artifacts / f"tiny_{kind}.pt")
        theirs = load_checkpoint(reference / f"tiny_{kind}.pt")
        assert ours["epoch"] == theirs["epoch"]
        for key, value in theirs["model_state"].items():
            assert torch.equal(ours["model_state"][key], value), key


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_data, tmp_path, uninterrupted, capsys, caplog):
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": EPOCHS})
    process = start_training(config_path)
    wait_for_epoch_line(process, 1)
    last = tmp_path / "artifacts" / "tiny_last.pt"
    deadline = time.monotonic() + 60
    while not last.exists() and time.monotonic() < deadline:  # written in the background
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # during epoch 2 (or the write of epoch 1's checkpoint)
    process.wait()
    assert load_checkpoint(last)["epoch"] >= 1
    # The kill needs a process of its own, the resume does not (test_distributed.py resumes on the command line).
    result = train_in_process(capsys, caplog, config_path, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert_same_run(tmp_path / "artifacts", uninterrupted)


def with_scores(scores: dict[int, float]) -> Callable:
    """`RunState.record_epoch` with epoch e's val top-1 set to `scores[e]` (which tiny epoch scores best
    otherwise depends on the libraries' arithmetic)."""
    record_epoch = RunState.record_epoch

    def scored(self, row):
        return record_epoch(self, {**row, "val_top1": scores[row["epoch"]]})
    return scored


KILLED_RUN_SCORES = {1: 0.5, 2: 0.6, 3: 0.55}
# `python -c` this with the train command's arguments: a run scoring KILLED_RUN_SCORES, killed (SIGKILL: nothing
# of it runs after) as soon as the first checkpoint file of epoch 2, a new best, is written: between the two.
KILLED_BETWEEN_TWO_FILES = """
import os, signal, sys
from src.training import checkpoint, train
from tests.training.test_resume import KILLED_RUN_SCORES, RunState, with_scores

real_save = checkpoint.atomic_save

def save_then_die(obj, path):
    real_save(obj, path)
    if obj["epoch"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.atomic_save = save_then_die
RunState.record_epoch = with_scores(KILLED_RUN_SCORES)
sys.exit(train.main(sys.argv[1:]))
"""


def test_kill_9_between_a_saves_two_files_then_resume_keeps_a_best_file_of_the_run(tiny_data, tmp_path, capsys,
                                                                                  caplog, monkeypatch):
    """`_best.pt` was written first: killed before `_last.pt`, the run left `_best.pt` at epoch 2 and `_last.pt`
    at epoch 1, naming epoch 1 its best, whose weights `_best.pt` had replaced. The resume trained epoch 2
    again; where it scored lower (on a GPU, not bit-identical to the first time; here its score is set so),
    the run ended saying its best was epoch 1, with `_best.pt` an epoch 2 of which the CSV knows nothing.
    Now `_last.pt` is written first, and the resume copies it, epoch 2, to `_best.pt`."""
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 3})
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_TWO_FILES, "--config", str(config_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    monkeypatch.setattr(RunState, "record_epoch", with_scores({1: 0.5, 2: 0.4, 3: 0.45}))
    result = train_in_process(capsys, caplog, config_path, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    artifacts = tmp_path / "artifacts"
    best, last = load_checkpoint(artifacts / "tiny_best.pt"), load_checkpoint(artifacts / "tiny_last.pt")
    assert best["epoch"] == last["best_epoch"] == 2 and best["history"] == last["history"][:2]
    assert f"note: {artifacts / 'tiny_best.pt'} is epoch 2, the best so far, copied from" in result.stdout


def test_sigterm_saves_mid_epoch_and_resume_matches(tiny_data, tmp_path, uninterrupted, capsys, caplog):
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": EPOCHS})
    process = start_training(config_path)
    wait_for_epoch_line(process, 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    assert f"--config {config_path} --resume auto" in stderr and "Traceback" not in stderr
    # The signal needs a process of its own, the resume does not (test_distributed.py resumes on the command line).
    result = train_in_process(capsys, caplog, config_path, "--resume", str(tmp_path / "artifacts" / "tiny_last.pt"))
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "artifacts", uninterrupted)


@pytest.mark.parametrize("stop_at_step", [1, 6], ids=["epoch 1 step 1", "epoch 2 step 2"])
def test_a_run_stopped_mid_epoch_resumes_to_match_an_uninterrupted_run(tiny_data, tmp_path, uninterrupted,
                                                                      monkeypatch, capsys, stop_at_step):
    """The SIGTERM test's signal lands wherever the run happens to be (often between epochs): restarting
    the stopped epoch from its first step, or dropping its sums so far, passed it. Here the stop comes
    at a known step, also in the first epoch (no epoch done, no best epoch yet)."""
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": EPOCHS}))
    steps = []

    def stop_once(self, step, runtime):
        steps.append(step)
        if len(steps) == stop_at_step:
            self.signal_name = "SIGTERM"
        return len(steps) == stop_at_step

    with monkeypatch.context() as patched:
        patched.setattr(StopRequest, "requested", stop_once)
        with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM in epoch \d after step"):
            run(config)
    saved = load_checkpoint(tmp_path / "artifacts" / "tiny_last.pt")
    steps_per_epoch = saved["steps_per_epoch"]
    assert (saved["epoch"], saved["step"]) == divmod(stop_at_step, steps_per_epoch)
    capsys.readouterr()
    assert run(config, resume="auto").epoch == EPOCHS
    assert_same_run(tmp_path / "artifacts", uninterrupted)
    out = capsys.readouterr().out  # resuming its own _last.pt with the same config: nothing to note
    assert "note: trainer.max_epochs" not in out and "the best so far" not in out


def test_a_stop_after_an_epoch_that_is_not_the_best_saves_that_epoch(tiny_data, tmp_path, monkeypatch):
    """With writes throttled, the stop's forced save writes the epoch it stopped after; the best
    epoch held in memory alone would have put `_last.pt` and the CSV back to that epoch."""
    real_evaluate = train_module.evaluate

    def tied(*args, **kwargs):  # every epoch scores the same: epoch 1 stays the best
        sums = real_evaluate(*args, **kwargs)
        sums.totals[1] = sums.totals[3] / 2
        return sums

    agreements = []

    def stop_after_epoch_2(self, runtime):
        agreements.append(runtime)
        if len(agreements) == 2:
            self.signal_name = "SIGTERM"
        return len(agreements) == 2

    monkeypatch.setattr(train_module, "evaluate", tied)
    monkeypatch.setattr(StopRequest, "requested", lambda self, step, runtime: False)
    monkeypatch.setattr(StopRequest, "agreed", stop_after_epoch_2)  # called once per epoch, after it
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 3,
                                                              "trainer.checkpoint_interval_s": 3600}))
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after epoch 2"):
        run(config)
    artifacts = tmp_path / "artifacts"
    assert load_checkpoint(artifacts / "tiny_last.pt")["epoch"] == 2
    assert load_checkpoint(artifacts / "tiny_best.pt")["epoch"] == 1
    assert len((artifacts / "tiny_metrics.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes in /proc")
def test_sigterm_to_every_process_of_a_plain_pipeline_run_stops_it_saved(tiny_data, tmp_path):
    """A batch scheduler signals the whole job: DataLoader workers killed by it made torch raise in
    the main process mid-step (`DataLoader worker ... is killed by signal: Terminated`), a traceback
    and no mid-epoch checkpoint."""
    config_path = write_config(tmp_path, tiny_data, **{"data.pipeline": "plain", "data.workers": 2,
                                                       "trainer.max_epochs": 50, "trainer.batch_size": 8})
    process = subprocess.Popen([sys.executable, "-m", "src.training.train", "--config", str(config_path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        deadline = time.monotonic() + 120
        while len(children.read_text().split()) < 2:  # the epoch's DataLoader workers are running
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, stderr
    assert stderr.startswith("error: stopped by SIGTERM in epoch 1") and stderr.count("\n") == 1, stderr
    assert load_checkpoint(tmp_path / "artifacts" / "tiny_last.pt")["epoch"] == 0  # the mid-epoch save


def test_a_run_whose_output_cannot_be_written_stops_saved(tiny_data, tmp_path):
    """`train ... | head -1`, a pager quit, or `2>&1 | head` (its error line has nowhere to go
    either): the run died at its next print with a BrokenPipeError traceback, losing the epochs a
    checkpoint interval still held."""
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 6, "trainer.checkpoint_interval_s": 1000})
    process = subprocess.Popen([sys.executable, "-m", "src.training.train", "--config", str(config_path)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_epoch_line(process, 1)
    process.stdout.close()  # the reader is gone: the next line cannot be written, nor the error line
    assert process.wait(timeout=120) == 141
    stopped_after = load_checkpoint(tmp_path / "artifacts" / "tiny_last.pt")["epoch"]
    assert 2 <= stopped_after < 6  # the epoch whose line met the closed pipe, saved
    csv_lines = (tmp_path / "artifacts" / "tiny_metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + stopped_after


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("epochs", [1, 3])
def test_a_run_whose_output_is_on_a_full_disk_stops_saved_unless_finished(tiny_data, tmp_path, epochs):
    """The first line fails: a run with epochs to go stops after the first, saved and resumable; a
    run whose first epoch is its last has nothing to stop (it was "stopped ... Resume with", exit 141)."""
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": epochs,
                                                       "trainer.checkpoint_interval_s": 1000})
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "src.training.train", "--config", str(config_path)],
                                cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=240)
    assert load_checkpoint(tmp_path / "artifacts" / "tiny_last.pt")["epoch"] == 1
    if epochs == 1:
        assert (result.returncode, result.stderr) == (0, "")
    else:
        assert result.returncode == 141 and result.stderr.splitlines() == [
            "error: stopped by SIGPIPE (stdout could not be written: [Errno 28] No space left on device) after "
            f"epoch 1; saved {tmp_path / 'artifacts' / 'tiny_last.pt'}. Resume with: python -m src.training.train "
            f"--config {config_path} --resume auto"]


@pytest.mark.parametrize("warmup_epochs, epochs, change", [
    (0, 1, "lr 0.00002 -> 0.00101: it rises again: a warm restart"),
    (1, 1, "lr 0.00200 -> 0.00200: the same at this step")])  # warm-up just over: the cosine's top either way
def test_extending_a_finished_run(tiny_data, tmp_path, capsys, caplog, warmup_epochs, epochs, change):
    settings = {"trainer.warmup_epochs": warmup_epochs}
    run(load_config(write_config(tmp_path, tiny_data, **settings, **{"trainer.max_epochs": epochs})))
    extended = write_config(tmp_path, tiny_data, **settings, **{"trainer.max_epochs": epochs + 1})
    result = train_in_process(capsys, caplog, extended, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert [line[:11] for line in result.stdout.splitlines() if line.startswith("[Epoch")] == [
        f"[Epoch {epochs + 1}/{epochs + 1}]"]
    assert (f"note: trainer.max_epochs {epochs} -> {epochs + 1}: from here the learning rate follows the cosine of a "
            f"{epochs + 1}-epoch run ({change})") in result.stdout
    csv_lines = (tmp_path / "artifacts" / "tiny_metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv_lines] == ["epoch", "1", "2"]


def test_an_extended_run_steps_at_the_rates_of_a_run_of_the_new_length(tiny_data, tmp_path):
    """The optimizer's stored rate is the old schedule's next one: the first step after raising
    trainer.max_epochs ran at the finished run's floor (trainer.lr x min_lr_ratio), not the new schedule's rate."""
    rates = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: rates.append(optimizer.param_groups[0]["lr"]))
    try:
        run(load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1})))
        rates.clear()
        run(load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 2})), resume="auto")
        extended = list(rates)
        rates.clear()
        run(load_config(write_config(tmp_path, tiny_data, name="straight", **{"trainer.max_epochs": 2})))
    finally:
        hook.remove()
    assert extended == rates[len(rates) - len(extended):]


def test_a_resume_needs_no_pretrained_weights(tiny_data, tmp_path):
    """The checkpoint's weights replace the pretrained ones, yet a resume loaded those first: a
    weights file since deleted (or ImageNet weights offline) made the run impossible to continue."""
    from torchvision.models import resnet18

    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)
    overrides = {"model.pretrained": str(weights)}
    run(load_config(write_config(tmp_path, tiny_data, **overrides, **{"trainer.max_epochs": 1})))
    weights.unlink()
    state = run(load_config(write_config(tmp_path, tiny_data, **overrides, **{"trainer.max_epochs": 2})), resume="auto")
    assert state.epoch == 2


def test_incompatible_config_is_refused_listing_differences(tiny_run, tmp_path, capsys, caplog):
    changed = write_config(tmp_path, tiny_run["data_root"],
                           **{"model.embedding_dim": 64, "trainer.lr": 0.1, "trainer.max_epochs": 3})
    result = train_in_process(capsys, caplog, changed, "--resume", str(tiny_run["last"]))
    assert result.returncode == 2
    assert "model.embedding_dim: 32 -> 64" in result.stderr and "trainer.lr" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_speed_settings_may_change_on_resume(tiny_run):
    checkpoint = load_checkpoint(tiny_run["last"])
    config = tiny_run["config"].model_copy(deep=True)
    config.trainer.compile, config.trainer.compile_mode = True, "reduce-overhead"
    config.trainer.checkpoint_interval_s = 30.0
    check_resume_compatible(checkpoint, config, ClassIndex.from_list(checkpoint["classes"]),
                            checkpoint["data_fingerprint"], tiny_run["last"])  # does not raise
    with pytest.raises(CheckpointError, match="the training split lists other image paths or labels"):
        check_resume_compatible(checkpoint, config, ClassIndex.from_list(checkpoint["classes"]),
                                "another list", tiny_run["last"])
    config.trainer.weight_decay = 0.5
    with pytest.raises(CheckpointError, match="trainer.weight_decay"):
        check_resume_compatible(checkpoint, config, ClassIndex.from_list(checkpoint["classes"]),
                                checkpoint["data_fingerprint"], tiny_run["last"])


def test_resuming_a_finished_run_trains_nothing(tiny_run, tmp_path, capsys, caplog):
    config_path = write_config(tmp_path, tiny_run["data_root"], **{"trainer.max_epochs": 3})
    (tmp_path / "artifacts").mkdir()
    shutil.copy2(tiny_run["last"], tmp_path / "artifacts" / "tiny_last.pt")
    result = train_in_process(capsys, caplog, config_path, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "has finished all 3 epochs: nothing to train" in result.stdout
    assert "[Epoch" not in result.stdout and "resumed" not in result.stdout and "done:" not in result.stdout
    assert not (tmp_path / "artifacts" / "tiny_metrics.csv").exists()  # nothing rewritten


def test_a_csv_an_epoch_behind_the_last_checkpoint_is_rewritten_on_resume(tiny_run, tmp_path, capsys, caplog):
    # What a kill -9 between the final epoch's `_last.pt` and its CSV leaves: the resume trains nothing,
    # so no later save would ever add that epoch's row.
    config_path = write_config(tmp_path, tiny_run["data_root"], **{"trainer.max_epochs": 3})
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copy2(tiny_run["last"], artifacts / "tiny_last.pt")
    complete = tiny_run["metrics"].read_text()
    (artifacts / "tiny_metrics.csv").write_text("".join(complete.splitlines(keepends=True)[:-1]))
    result = train_in_process(capsys, caplog, config_path, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert f"note: rewrote {artifacts / 'tiny_metrics.csv'}" in result.stdout
    assert (artifacts / "tiny_metrics.csv").read_text() == complete


def test_a_second_run_into_the_same_outputs_is_refused(tiny_data, tmp_path, capsys, caplog):
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1})
    with exclusive(tmp_path / "artifacts" / ".tiny.lock"):  # as a run in progress holds it
        result = train_in_process(capsys, caplog, config_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: another run is training 'tiny' into ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [".tiny.lock"]
    assert train_in_process(capsys, caplog, config_path).returncode == 0  # once it has ended


def test_resume_auto_without_a_checkpoint_starts_fresh(tiny_data, tmp_path, capsys, caplog):
    config_path = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1})
    result = train_in_process(capsys, caplog, config_path, "--resume", "auto")
    assert result.returncode == 0 and "resumed" not in result.stdout


def test_truncated_and_random_checkpoints_give_one_line_errors(tiny_run, tmp_path, capsys, caplog):
    data = tiny_run["last"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    for path in (truncated, garbage):
        result = train_in_process(capsys, caplog, tiny_run["config_path"], "--resume", str(path))
        assert result.returncode == 2, result.stderr
        assert str(path) in result.stderr and len(result.stderr.strip().splitlines()) == 1


class _CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_without_running_code(tiny_run, tmp_path, capsys, caplog):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"format_version": 1, "payload": _CreatesAFile(str(marker))}, handle)
    torch.save({"model_state": _CreatesAFile(str(marker))}, tmp_path / "evil_zip.pt")
    for path in (evil, tmp_path / "evil_zip.pt"):
        with pytest.raises(CheckpointError, match="not a safe checkpoint|not a PyTorch checkpoint"):
            load_checkpoint(path)
        result = train_in_process(capsys, caplog, tiny_run["config_path"], "--resume", str(path))
        assert result.returncode == 2
    assert not marker.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 3}))
    run(config.model_copy(update={"trainer": config.trainer.model_copy(update={"max_epochs": 1})}))
    last = tmp_path / "artifacts" / "tiny_last.pt"
    good = last.read_bytes()
    real_cross_entropy = train_module.F.cross_entropy

    def poisoned(*args, **kwargs):
        return real_cross_entropy(*args, **kwargs) * float("nan")

    monkeypatch.setattr(train_module.F, "cross_entropy", poisoned)
    with pytest.raises(TrainingStopped, match="non-finite loss") as info:
        run(config, resume="auto")
    assert info.value.exit_code == 3
    assert last.read_bytes() == good


def test_non_finite_loss_messages_say_where_it_was_found(tiny_data, tmp_path, monkeypatch):
    """A step's check (every step on the CPU) names the step; the check after the epoch's last step,
    which covers the steps since the last check (on CUDA they come every 50), names the epoch. Either
    suggests trainer.amp_dtype: bf16 only for a run in fp16: the CPU's fp32 run was told to try it."""
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1}))
    real_cross_entropy = train_module.F.cross_entropy
    monkeypatch.setattr(train_module.F, "cross_entropy",
                        lambda *args, **kwargs: real_cross_entropy(*args, **kwargs) * float("nan"))
    with pytest.raises(TrainingStopped) as info:
        run(config)
    assert (str(info.value), info.value.exit_code) == (
        "non-finite loss in epoch 1 near step 1; stopped without saving this epoch (the last good checkpoint "
        "is kept). Try a lower trainer.lr", 3)
    fp16 = SimpleNamespace(amp_dtype=torch.float16)
    assert str(train_module.non_finite_loss("epoch 2", fp16)).endswith("lower trainer.lr or trainer.amp_dtype: bf16")

    real_progress, real_finite, bar_closed = train_module._progress, train_module.EpochSums.finite, []

    def progress_telling_its_close(*args):
        bar = real_progress(*args)
        close = bar.close
        bar.close = lambda: bar_closed.append(True) or close()
        return bar

    monkeypatch.setattr(train_module, "_progress", progress_telling_its_close)
    monkeypatch.setattr(train_module.EpochSums, "finite",  # no step's check sees it, as between two on CUDA
                        lambda sums, runtime: not bar_closed or real_finite(sums, runtime))
    with pytest.raises(TrainingStopped) as info:
        run(config)
    assert (str(info.value), info.value.exit_code) == (
        "non-finite loss in epoch 1; stopped without saving this epoch (the last good checkpoint is kept). "
        "Try a lower trainer.lr", 3)
    assert not (tmp_path / "artifacts" / "tiny_last.pt").exists()


def test_non_finite_loss_writes_the_best_epoch_held_in_memory(tiny_data, tmp_path, monkeypatch):
    """With checkpoints throttled, epochs 1-2 live only in memory when epoch 3 turns non-finite: the
    best of them is written (as best and last, with its CSV) instead of being lost."""
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 3,
                                                              "trainer.checkpoint_interval_s": 3600}))
    annotations = tiny_data / "annotations"
    train_steps = len((annotations / "train.txt").read_text().splitlines()) // 16
    val_steps = -(-len((annotations / "val.txt").read_text().splitlines()) // 16)
    calls = []
    real_cross_entropy = train_module.F.cross_entropy

    def poisoned_from_epoch_3(*args, **kwargs):
        calls.append(1)
        loss = real_cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) > 2 * (train_steps + val_steps) else loss

    monkeypatch.setattr(train_module.F, "cross_entropy", poisoned_from_epoch_3)
    with pytest.raises(TrainingStopped, match="non-finite loss in epoch 3"):
        run(config)
    artifacts = tmp_path / "artifacts"
    best, last = load_checkpoint(artifacts / "tiny_best.pt"), load_checkpoint(artifacts / "tiny_last.pt")
    assert best["epoch"] == last["epoch"] == best["best_epoch"] in (1, 2)
    rows = (artifacts / "tiny_metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + best["epoch"]


def test_an_image_deleted_mid_run_is_skipped_and_counted(tiny_data, tmp_path, fresh_copy, monkeypatch, capsys,
                                                         caplog):
    data = fresh_copy(tiny_data)
    prepared = (data / "annotations" / "prepared.json").read_text()
    (data / "annotations" / "prepared.json").write_text(prepared.replace(str(tiny_data), str(data)))
    config_path = write_config(tmp_path, data, **{"trainer.max_epochs": 3, "data.pipeline": "plain"})
    victim_rel = (data / "annotations" / "train.txt").read_text().split()[0]
    real_train_one_epoch = train_module.train_one_epoch

    def deleting_after_epoch_1(*args, **kwargs):
        sums = real_train_one_epoch(*args, **kwargs)
        (data / "raw" / victim_rel).unlink(missing_ok=True)  # after epoch 1's steps: epochs 2 and 3 miss it
        return sums

    # In this process, deleted at a known point (it was deleted when a command's epoch line came).
    monkeypatch.setattr(train_module, "train_one_epoch", deleting_after_epoch_1)
    result = train_in_process(capsys, caplog, config_path)
    assert result.returncode == 0, result.stderr
    assert "unreadable images skipped" in result.stdout
    assert "skipping unreadable image" in result.stderr and victim_rel.split("/")[-1] in result.stderr


def test_a_checkpoint_of_another_dataset_is_refused(tiny_run, tmp_path, capsys, caplog):
    """The open-set split has other individuals: resuming the closed-set run on it must not start."""
    other = write_config(tmp_path, tiny_run["data_root"],
                         **{"data.open_set": True, "data.num_classes": 4, "trainer.max_epochs": 3})
    result = train_in_process(capsys, caplog, other, "--resume", str(tiny_run["last"]))
    assert result.returncode == 2
    assert "the individuals (class list) differ" in result.stderr and "data.open_set: False -> True" in result.stderr


@pytest.mark.parametrize("damage, message", [
    (lambda state: state.pop("optimizer_state"), "lacks the training state to continue (missing optimizer_state)"),
    (lambda state: state.update(rng={"torch": 1}), "malformed training state (TypeError"),
    (lambda state: state["model_state"].update({"backbone.conv1.weight": torch.zeros(1)}),
     "its weights do not fit the model the config describes (size mismatch for backbone.conv1.weight"),
])
def test_a_checkpoint_without_a_usable_training_state_is_refused(tiny_run, tmp_path, capsys, damage, message):
    """E.g. a checkpoint stripped for sharing: it evaluates, but training cannot continue from it."""
    state = torch.load(tiny_run["last"], weights_only=True)
    damage(state)
    path = tmp_path / "stripped.pt"
    torch.save(state, path)
    before = tiny_run["last"].stat().st_mtime_ns
    assert train_module.main(["--config", str(tiny_run["config_path"]), "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume from {path}: ") and err.count("\n") == 1 and message in err, err
    assert tiny_run["last"].stat().st_mtime_ns == before


def test_a_checkpoint_from_more_gpus_restores_the_ones_present(monkeypatch):
    """Trained on 4 GPUs, resumed on 1: that GPU's generator state is restored, not an error."""
    saved = rng_state()
    saved["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.__setitem__(index, state))
    restore_rng(saved)
    assert list(restored) == [0] and torch.equal(restored[0], saved["cuda"][0])


@pytest.mark.parametrize("saved_in_fp16", [False, True])
def test_a_resume_may_switch_to_and_from_fp16(saved_in_fp16):
    """trainer.amp_dtype may change on resume: a run in bf16 or fp32 saves its disabled gradient
    scaler as {}, which an fp16 scaler refused ("malformed training state"); it starts a new one."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    saved_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=saved_in_fp16)
    checkpoint = {"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                  "scheduler_state": scheduler.state_dict(), "scaler_state": saved_scaler.state_dict(),
                  "rng": rng_state(), "epoch": 1, "best_val_top1": 0.5, "best_epoch": 1, "history": [{}]}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    runtime = SimpleNamespace(dist=SimpleNamespace(is_main=True))
    state = restore(checkpoint, Path("run_last.pt"), model, optimizer, scheduler, scaler, runtime)
    assert state.epoch == 1 and scaler.get_scale() == (1024.0 if saved_in_fp16 else 65536.0)
    # and from fp16 to bf16: the saved scale is not needed
    restore(checkpoint, Path("run_last.pt"), model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
            runtime)


@pytest.mark.parametrize("damage, message", [
    (lambda state: state.update(epoch=2, step=99, partial=torch.zeros(4, dtype=torch.float64),
                                history=state["history"][:2], best_epoch=1),
     "malformed training state (step 99 (an epoch has 4))"),
    (lambda state: state.update(epoch=-1), "malformed training state (epoch -1)"),
    (lambda state: state.update(history=state["history"][:-1]),
     "malformed training state (the metrics history does not hold one row for each of the 3 epochs)"),
    (lambda state: state.update(best_epoch=7), "malformed training state (best epoch 7)"),
    (lambda state: state.update(steps_per_epoch=5),  # e.g. an image unreadable when it was trained
     "it trained 5 steps per epoch, the training split now gives 4 (an image became readable or unreadable "
     "since, or data.pipeline counts unreadable images differently)"),
    (lambda state: state.update(best_val_top1=float("nan")), "malformed training state (best val top-1 nan)"),
])
def test_a_checkpoint_with_impossible_progress_is_refused_before_training(tiny_run, tmp_path, capsys, damage,
                                                                         message):
    """A hand-edited or damaged state used to train epochs -1..3, an epoch with no steps (a row of
    zeros), or fail only at the first write after an epoch of work."""
    state = torch.load(tiny_run["last"], weights_only=True)
    damage(state)
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    config_path = write_config(tmp_path, tiny_run["data_root"], **{"trainer.max_epochs": 4})
    assert train_module.main(["--config", str(config_path), "--resume", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: cannot resume from {path}: {message}\n" and "[Epoch" not in out
    assert not (tmp_path / "artifacts" / "tiny_last.pt").exists()


def test_keys_a_resume_may_change_are_keys_of_the_config():
    """A key renamed in src/config.py but not in its section's RESUMABLE would silently become one that must match."""
    assert RESUMABLE_CHANGES <= set(flatten(Config().to_dict()))
    # exactly those docs/TRAINING.md lists: a key added to a RESUMABLE would let a resume change it unseen
    assert RESUMABLE_CHANGES == {*(f"trainer.{key}" for key in (
        "max_epochs", "device", "amp", "amp_dtype", "compile", "compile_mode", "progress", "deterministic",
        "output_dir", "checkpoint_interval_s")), *(f"data.{key}" for key in (
            "pipeline", "cache_dir", "cache_on_device", "workers", "root")), "name"}


def test_a_resume_refuses_a_change_of_every_other_key(tmp_path):
    """Each key outside RESUMABLE_CHANGES, of every section (augment's too), is named as a difference."""
    config = Config()
    stored = config.to_dict()
    fixed = sorted(set(flatten(stored)) - RESUMABLE_CHANGES)
    for key in fixed:
        *section, name = key.split(".")
        (stored[section[0]] if section else stored)[name] = "changed"
    checkpoint = {"config": stored, "classes": ["a", "b"], "data_fingerprint": "f", "epoch": 1}
    with pytest.raises(CheckpointError) as info:
        check_resume_compatible(checkpoint, config, ClassIndex(["a", "b"]), "f", tmp_path / "x.pt")
    assert [key for key in fixed if f"{key}: 'changed' -> " not in str(info.value)] == []
    assert {key.split(".")[0] for key in fixed} >= {"data", "augment", "model", "trainer"}


@pytest.mark.parametrize("old_best_kept", [True, False])
def test_a_run_continued_under_another_name_and_folder_has_its_own_best(tiny_run, tmp_path, capsys, old_best_kept):
    """docs/TRAINING.md's way to extend a run from a renamed config: `--resume <the old _last.pt>`. The new
    files get the best epoch so far, or, where its weights are gone, the best of the epochs trained
    from here; the final line never names a `_best.pt` that is missing or another run's."""
    old = tmp_path / "old"
    old.mkdir()
    # A run whose best epoch was its first: which tiny epoch scores best depends on the libraries'
    # arithmetic, and a best epoch that is the checkpoint itself needs no file to bring along.
    trained = load_checkpoint(tiny_run["last"])
    for row in trained["history"][1:]:
        row["val_top1"] = 0.0
    trained.update(best_epoch=1, best_val_top1=trained["history"][0]["val_top1"])
    atomic_save(trained, old / tiny_run["last"].name)
    if old_best_kept:
        atomic_save({**trained, "epoch": 1, "history": trained["history"][:1]}, old / tiny_run["best"].name)
    config = write_config(tmp_path, tiny_run["data_root"], name="longer",
                          **{"trainer.max_epochs": 4, "trainer.output_dir": str(tmp_path / "new")})
    assert train_module.main(["--config", str(config), "--resume", str(old / tiny_run["last"].name)]) == 0
    out = capsys.readouterr().out
    best = load_checkpoint(tmp_path / "new" / "longer_best.pt")
    history = load_checkpoint(tmp_path / "new" / "longer_last.pt")["history"]
    # the first of equal bests, among every epoch or among those trained from here
    candidates = history if old_best_kept else [row for row in history if row["epoch"] > trained["epoch"]]
    expected = max(candidates, key=lambda row: (row["val_top1"], -row["epoch"]))["epoch"]
    assert best["epoch"] == expected
    if old_best_kept:
        assert f"is epoch 1, the best so far, from {old / tiny_run['best'].name}" in out
    else:
        assert expected > trained["epoch"] and f"epoch {trained['best_epoch']}, the best of" in out


def test_a_best_epoch_that_cannot_be_copied_to_the_new_files_refuses_the_resume_in_one_line(tiny_run, tmp_path,
                                                                                             capsys, monkeypatch):
    """Resuming under another name copies the run's best epoch to the new `_best.pt`; a full disk there
    ended the command with an OSError traceback. Now one line and exit 2; the new folder gets no file."""
    import src.training.resume

    def disk_full(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device", str(destination))

    monkeypatch.setattr(src.training.resume.shutil, "copyfile", disk_full)
    config = write_config(tmp_path, tiny_run["data_root"], name="longer",
                          **{"trainer.max_epochs": 4, "trainer.output_dir": str(tmp_path / "new")})
    assert train_module.main(["--config", str(config), "--resume", str(tiny_run["last"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume from {tiny_run['last']}: could not copy its best epoch"), err
    assert "No space left on device" in err and err.count("\n") == 1, err
    assert not [path for path in (tmp_path / "new").glob("*") if path.name != ".longer.lock"]


def test_a_new_run_stopped_before_its_first_epoch_says_whose_best_is_left(tiny_run, tmp_path, monkeypatch):
    """Its `_last.pt` and CSV replace the earlier run's; `_best.pt` is still the earlier run's."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copy2(tiny_run["best"], artifacts / "tiny_best.pt")

    def stop_now(self, step, runtime):
        self.signal_name = "SIGTERM"
        return True

    monkeypatch.setattr(StopRequest, "requested", stop_now)
    with pytest.raises(TrainingStopped, match=r"after step 1/\d+; saved .*tiny_last.pt \(tiny_best.pt is still "
                                              r"the earlier run's\)$"):
        run(load_config(write_config(tmp_path, tiny_run["data_root"], **{"trainer.max_epochs": 3})))


def test_relabelling_a_training_image_changes_the_data_fingerprint():
    """r2: the only fingerprint checks use a made-up string ('another list') or a removed line; a
    labels fix that moves one image to another individual (same paths, same class list) must also
    refuse a resume: the run would silently continue on other labels."""
    rows = [("a/1.png", "Abeni"), ("a/2.png", "Abeni"), ("b/1.png", "Bako"), ("b/2.png", "Bako")]
    relabelled = [rows[0], ("a/2.png", "Bako"), *rows[2:]]
    classes = ClassIndex.from_rows(rows)
    assert ClassIndex.from_rows(relabelled).names == classes.names
    assert data_fingerprint(rows, classes) != data_fingerprint(relabelled, classes)
    assert data_fingerprint(rows, classes) == data_fingerprint(rows[::-1], classes)  # order does not matter


def test_restoring_the_rng_state_replays_every_generator():
    """r5/r6: the kill-9 and SIGTERM resume tests cannot see the RNG restore (batches and augmentation
    have their own seeds; dropout is 0 in the test config), so dropping any of the restores passed."""
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.normal()  # a cached gaussian in numpy's state
    state = rng_state()
    first = (torch.rand(3), np.random.normal(size=3), [random.random() for _ in range(3)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng(state)
    again = (torch.rand(3), np.random.normal(size=3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def _restore_with_rng(crafted: Callable[[dict], dict]) -> None:
    """`restore` of a small sound checkpoint whose rng state is `crafted(rng_state())`."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = {"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                  "scheduler_state": scheduler.state_dict(), "scaler_state": {}, "epoch": 1, "best_val_top1": 0.5,
                  "best_epoch": 1, "history": [], "rng": crafted(rng_state())}
    runtime = SimpleNamespace(dist=SimpleNamespace(is_main=True))
    restore(checkpoint, "x.pt", model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), runtime)


def test_a_crafted_rng_state_is_a_malformed_training_state():
    """numpy's generator state is stored as a tensor (weights_only); a crafted file holding a number
    there ended the resume with an AttributeError traceback ('int' object has no attribute 'numpy')."""
    with pytest.raises(CheckpointError, match=r"^cannot resume from x.pt: malformed training state \(AttributeError: "):
        _restore_with_rng(lambda rng: {**rng, "numpy": {**rng["numpy"], "keys": 5}})


def test_a_resume_with_fewer_epochs_than_already_trained_is_refused(tmp_path):
    """r1: no test lowers max_epochs below the checkpoint's epochs (only raising or keeping it)."""
    config = Config()
    config.trainer.max_epochs = 3
    classes = ClassIndex(["a", "b"])
    checkpoint = {"config": config.to_dict(), "classes": ["a", "b"], "data_fingerprint": "f", "epoch": 3}
    check_resume_compatible(checkpoint, config, classes, "f", tmp_path / "x.pt")  # equal: fine
    config.trainer.max_epochs = 2
    with pytest.raises(CheckpointError, match="max_epochs 2 is below the 3 epochs already trained"):
        check_resume_compatible(checkpoint, config, classes, "f", tmp_path / "x.pt")


def test_a_stored_config_holding_a_tensor_is_refused_in_one_line(tmp_path):
    """weights_only loads tensors anywhere: a crafted config value of several numbers made the comparison
    with the run's config a RuntimeError traceback ("Boolean value of Tensor ... is ambiguous")."""
    config = Config()
    stored = config.to_dict()
    stored["trainer"]["lr"] = torch.tensor([0.1, 0.2])
    checkpoint = {"config": stored, "classes": ["a", "b"], "data_fingerprint": "f", "epoch": 1}
    with pytest.raises(CheckpointError) as info:
        check_resume_compatible(checkpoint, config, ClassIndex(["a", "b"]), "f", tmp_path / "x.pt")
    assert str(info.value) == (f"cannot resume from {tmp_path / 'x.pt'}: its stored config is malformed "
                               "(Object of type Tensor is not JSON serializable)")


def test_a_step_count_of_a_whole_epoch_is_refused():
    """r3: step must be < steps_per_epoch (a whole epoch is `epoch + 1, step 0`); only 99 was tried."""
    row = {column: 1.0 for column in METRICS_COLUMNS}
    state = {"epoch": 2, "step": 4, "partial": torch.zeros(4, dtype=torch.float64), "steps_per_epoch": 4,
             "history": [{**row, "epoch": 1}, {**row, "epoch": 2}], "best_epoch": 1, "best_val_top1": 0.5}
    check_training_state({**state, "step": 3}, "x.pt", steps_per_epoch=4)  # the last step: fine
    with pytest.raises(CheckpointError, match=r"step 4 \(an epoch has 4\)"):
        check_training_state(state, "x.pt", steps_per_epoch=4)


@pytest.mark.parametrize("steps_per_epoch", [torch.tensor([4, 4]), "4"], ids=["tensor", "string"])
def test_a_steps_per_epoch_that_is_not_a_whole_number_is_a_malformed_state(steps_per_epoch):
    """A crafted `steps_per_epoch` holding a tensor of several values ended in a RuntimeError traceback
    ("Boolean value of Tensor ... is ambiguous"); a string was called a different number of steps."""
    row = {column: 1.0 for column in METRICS_COLUMNS}
    state = {"epoch": 1, "step": 0, "steps_per_epoch": steps_per_epoch, "history": [{**row, "epoch": 1}],
             "best_epoch": 1, "best_val_top1": 0.5}
    with pytest.raises(CheckpointError) as info:
        check_training_state(state, "x.pt", steps_per_epoch=4)
    assert str(info.value) == ("cannot resume from x.pt: malformed training state (steps per epoch: a "
                               f"{type(steps_per_epoch).__name__}, not a whole number)")


@pytest.mark.parametrize("partial", [torch.zeros(4, device="meta"), torch.zeros(4).to_sparse()], ids=["meta", "sparse"])
def test_partial_epoch_sums_without_dense_data_are_a_malformed_state(partial):
    """weights_only loads meta and sparse tensors: a crafted mid-epoch checkpoint holding one as the
    epoch's sums passed the check, then training ended in a traceback ("Cannot copy out of meta tensor";
    "add(sparse, dense) is not supported")."""
    row = {column: 1.0 for column in METRICS_COLUMNS}
    state = {"epoch": 1, "step": 2, "partial": partial, "steps_per_epoch": 4, "history": [{**row, "epoch": 1}],
             "best_epoch": 1, "best_val_top1": 0.5}
    check_training_state({**state, "partial": torch.zeros(4, dtype=torch.float64)}, "x.pt", steps_per_epoch=4)
    with pytest.raises(CheckpointError, match=r"malformed training state \(no sums for the partial epoch\)"):
        check_training_state(state, "x.pt", steps_per_epoch=4)


def _minimal(epoch):
    return {"format_version": 1, "model_state": {}, "epoch": epoch, "config": {"name": "run"}, "classes": ["a"]}


def _history(epochs: int, seconds: float = 1.0) -> list[dict]:
    """A run's metrics rows; `seconds` tells two runs of one config apart, as the rows' real times do."""
    return [{**{column: 0.0 for column in METRICS_COLUMNS}, "epoch": epoch, "val_top1": epoch / 10, "seconds": seconds}
            for epoch in range(1, epochs + 1)]


@pytest.mark.parametrize("best_file", [_minimal(1), b"PK\x03\x04 cut off"], ids=["another epoch", "damaged"])
def test_a_best_file_of_another_epoch_is_not_brought_along(tmp_path, best_file):
    """r4: the test of a run continued under another name only has a best file of the right epoch or
    none; one of another epoch (the old run went on after this _last.pt was copied) must not become
    the new run's _best.pt under the resumed run's best score. A damaged one refused the resume."""
    old = tmp_path / "old"
    old.mkdir()
    torch.save(_minimal(3), old / "run_last.pt")
    if isinstance(best_file, bytes):
        (old / "run_best.pt").write_bytes(best_file)
    else:
        torch.save(best_file, old / "run_best.pt")  # not epoch 2, the best the checkpoint names
    state = RunState(epoch=3, best_epoch=2, best_val_top1=0.7)
    paths = RunPaths(tmp_path / "new", "longer")
    said = []
    bring_best_along(_minimal(3), old / "run_last.pt", paths, state, SimpleNamespace(print=said.append))
    assert not paths.best.exists() and (state.best_epoch, state.best_val_top1) == (0, -1.0)
    assert "is not beside it" in said[0]


def test_another_runs_best_file_of_the_same_epoch_is_not_brought_along(tmp_path):
    """Only the epoch number was compared: beside the checkpoint, an earlier run's `_best.pt` of that
    epoch number (a run of the same name started again, which had not replaced it yet) became the new
    run's `_best.pt`, as if it were this run's best epoch. Its history tells them apart."""
    old = tmp_path / "old"
    old.mkdir()
    torch.save({**_minimal(3), "history": _history(3)}, old / "run_last.pt")
    torch.save({**_minimal(2), "history": _history(2, seconds=2.0)}, old / "run_best.pt")
    state = RunState(epoch=3, best_epoch=2, best_val_top1=0.2, history=_history(3))
    paths = RunPaths(tmp_path / "new", "longer")
    said = []
    bring_best_along(_minimal(3), old / "run_last.pt", paths, state, SimpleNamespace(print=said.append))
    assert not paths.best.exists() and (state.best_epoch, state.best_val_top1) == (0, -1.0)
    assert "is not beside it" in said[0] and "another run's" in said[0]


def test_a_mid_epoch_checkpoint_is_not_brought_along_as_its_best_epoch(tmp_path):
    """Stopped in epoch 4 after epoch 3 was the best: the checkpoint holds epoch 3 plus some steps of
    epoch 4, not epoch 3's weights; the new `_best.pt` is the old run's `_best.pt`."""
    old = tmp_path / "old"
    old.mkdir()
    torch.save({**_minimal(3), "step": 2, "history": _history(3)}, old / "run_last.pt")
    torch.save({**_minimal(3), "model_state": {"w": torch.ones(1)}, "history": _history(3)}, old / "run_best.pt")
    state = RunState(epoch=3, step=2, best_epoch=3, best_val_top1=0.7, history=_history(3))
    paths = RunPaths(tmp_path / "new", "longer")
    bring_best_along({**_minimal(3), "step": 2}, old / "run_last.pt", paths, state, SimpleNamespace(print=print))
    assert paths.best.read_bytes() == (old / "run_best.pt").read_bytes() and state.best_epoch == 3


@pytest.mark.parametrize("last, best_file, expected, note", [
    # (epoch, step, best epoch) of `_last.pt`; (epoch, seconds) of `_best.pt`, seconds 1.0 being this run's
    ((2, 0, 2), (1, 1.0), "copied", "is epoch 2, the best so far, copied from"),  # killed between the two
    ((1, 0, 1), (1, 2.0), "copied", "is epoch 1, the best so far, copied from"),  # over an earlier run's
    ((3, 0, 2), (1, 1.0), (1, 0.1), "holds epoch 1, not epoch 2, the best that"),
    ((2, 1, 2), (1, 1.0), (1, 0.1), "holds epoch 1, not epoch 2"),  # mid-epoch: not epoch 2's weights
    ((3, 0, 2), None, (0, -1.0), "is not in"),
    ((2, 0, 1), (3, 1.0), (0, -1.0), "is not in"),  # past `_last.pt`: written first by an earlier version
    ((3, 0, 2), (2, 1.0), (2, 0.2), None),
    ((0, 1, 0), (2, 2.0), (0, -1.0), None),  # no best epoch yet: `_best.pt` is still the earlier run's
], ids=["the best is _last.pt", "an earlier run's best of that epoch", "an older best of the run",
        "mid-epoch", "no best file", "a best file of an epoch not reached", "the best file matches",
        "no best epoch yet"])
def test_resuming_a_last_file_whose_best_epoch_is_not_in_the_best_file(tmp_path, last, best_file, expected, note):
    """A run killed between a save's two files (`_last.pt` is written first) names, in `_last.pt`, a best
    epoch that `_best.pt` does not hold: `_last.pt` itself is copied to `_best.pt` when it is that epoch;
    otherwise an epoch of the run that `_best.pt` holds becomes the best so far, or the best is chosen afresh."""
    paths = RunPaths(tmp_path, "run")
    epoch, step, best_epoch = last
    history = _history(epoch)
    torch.save({**_minimal(epoch), "step": step, "history": history, "best_epoch": best_epoch}, paths.last)
    if best_file is not None:
        held, seconds = best_file
        torch.save({**_minimal(held), "history": _history(held, seconds), "best_epoch": held}, paths.best)
    before = paths.best.read_bytes() if paths.best.exists() else None
    state = RunState(epoch=epoch, step=step, best_epoch=best_epoch, history=history,
                     best_val_top1=best_epoch / 10 if best_epoch else -1.0)
    said = []
    mend_best_file(paths, state, SimpleNamespace(print=said.append))
    if expected == "copied":
        assert paths.best.read_bytes() == paths.last.read_bytes()
        assert (state.best_epoch, state.best_val_top1) == (best_epoch, best_epoch / 10)
    else:
        assert (paths.best.read_bytes() if paths.best.exists() else None) == before
        assert (state.best_epoch, state.best_val_top1) == expected
    assert said == [] if note is None else (len(said) == 1 and note in said[0]), said


def test_resuming_the_best_file_would_not_replace_a_last_file_that_came_further(tiny_run, tmp_path, capsys):
    """`--resume artifacts/<name>_best.pt` by mistake (tab completion): the run went on from the best
    epoch and replaced `_last.pt` and the CSV, losing every later epoch without a word."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    last = load_checkpoint(tiny_run["last"])
    atomic_save(last, artifacts / "tiny_last.pt")
    atomic_save({**last, "epoch": 1, "history": last["history"][:1], "best_epoch": 1,
                 "best_val_top1": last["history"][0]["val_top1"]}, artifacts / "tiny_best.pt")
    shutil.copy2(tiny_run["metrics"], artifacts / "tiny_metrics.csv")
    before = {path.name: path.read_bytes() for path in artifacts.iterdir()}
    config = write_config(tmp_path, tiny_run["data_root"], **{"trainer.max_epochs": 4})
    assert train_module.main(["--config", str(config), "--resume", str(artifacts / "tiny_best.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume from {artifacts / 'tiny_best.pt'} (epoch 1): it would replace "
                          f"{artifacts / 'tiny_last.pt'}, which has come further (epoch 3)"), err
    assert err.count("\n") == 1
    assert {path.name: path.read_bytes() for path in artifacts.iterdir() if path.name != ".tiny.lock"} == before


def test_the_last_file_a_resume_would_replace_is_read_without_its_weights(tmp_path, monkeypatch):
    """Checking that `--resume <older file>` does not go back behind `_last.pt` needs its epoch and step;
    it loaded the whole file (a few hundred MB of weights and optimizer state for resnet50) to read them."""
    import src.safe_load

    paths = RunPaths(tmp_path, "run")
    torch.save({**_minimal(3), "model_state": {"weight": torch.ones(1000)}}, paths.last)
    loads = []
    torch_load = torch.load
    monkeypatch.setattr(src.safe_load.torch, "load", lambda path, **kwargs: loads.append((path, kwargs.get("mmap")))
                        or torch_load(path, **kwargs))
    older = tmp_path / "run_best.pt"
    with pytest.raises(CheckpointError, match=r"\(epoch 1\): it would replace .*run_last.pt, which has come further"):
        check_not_going_back(older, _minimal(1), paths)
    assert loads == [(paths.last, True)]  # memory-mapped: no tensor is read


def test_a_last_file_stopped_mid_epoch_has_come_further_than_its_epochs_start(tmp_path):
    """Going back by a few steps of a stopped epoch loses them too."""
    paths = RunPaths(tmp_path, "run")
    torch.save({**_minimal(3), "step": 2}, paths.last)
    with pytest.raises(CheckpointError, match=r"\(epoch 3\): it would replace .*\(epoch 3, step 2 of epoch 4\)"):
        check_not_going_back(tmp_path / "run_copy.pt", _minimal(3), paths)


@pytest.mark.parametrize("last", [[3, 0], {**_minimal(3), "step": "x"}], ids=["not a dict", "malformed step"])
def test_a_last_file_that_is_no_usable_checkpoint_does_not_block_a_resume(tmp_path, last):
    """Only a `_last.pt` whose progress can be read and compared refuses going back to an older file."""
    paths = RunPaths(tmp_path, "run")
    torch.save(last, paths.last)
    check_not_going_back(tmp_path / "run_best.pt", _minimal(1), paths)  # no CheckpointError


def test_a_resume_checkpoint_with_a_malformed_step_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    """A hand-edited step (`"x"`) in a checkpoint of the same epoch as the run's `_last.pt` ended in a
    TypeError traceback when the two were compared."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copy2(tiny_run["last"], artifacts / "tiny_last.pt")
    edited = tmp_path / "edited.pt"
    torch.save({**load_checkpoint(tiny_run["last"]), "step": "x"}, edited)
    config = write_config(tmp_path, tiny_run["data_root"], **{"trainer.max_epochs": 4})
    assert train_module.main(["--config", str(config), "--resume", str(edited)]) == 2
    assert capsys.readouterr().err == (f"error: cannot resume from {edited}: malformed training state "
                                       "(step 'x' (an epoch has 4))\n")


LONG = "x" * 10**6  # a crafted checkpoint's string field: its repr made the one-line error 1 MB long


def test_long_values_of_a_crafted_training_state_are_clipped_in_its_error():
    row = {column: 1.0 for column in METRICS_COLUMNS}
    state = {"epoch": 1, "step": LONG, "steps_per_epoch": 4, "history": [{**row, "epoch": 1}],
             "best_epoch": LONG, "best_val_top1": LONG}
    with pytest.raises(CheckpointError) as info:
        check_training_state(state, "x.pt", steps_per_epoch=4)
    assert len(str(info.value)) < 500 and f"step '{'x' * 20}" in str(info.value) and "..." in str(info.value)


def test_a_long_value_of_a_crafted_stored_config_is_clipped_in_the_differences(tmp_path):
    config = Config()
    stored = config.to_dict()
    stored["model"]["backbone"] = LONG
    stored[LONG] = 1  # a key of no section
    checkpoint = {"config": stored, "classes": ["a", "b"], "data_fingerprint": "f", "epoch": 1}
    with pytest.raises(CheckpointError) as info:
        check_resume_compatible(checkpoint, config, ClassIndex(["a", "b"]), "f", tmp_path / "x.pt")
    assert len(str(info.value)) < 500 and "model.backbone: 'xxx" in str(info.value)


def test_a_long_value_in_a_crafted_rng_state_is_clipped_in_its_error():
    """random.setstate repeats the version it was given in its ValueError."""
    with pytest.raises(CheckpointError, match=r"malformed training state \(ValueError: ") as info:
        _restore_with_rng(lambda rng: {**rng, "python": (LONG, *rng["python"][1:])})
    assert len(str(info.value)) < 500


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_partial_epoch_sums_that_are_not_finite_are_a_malformed_state(bad):
    """A crafted mid-epoch checkpoint with NaN in its sums was resumed, and training stopped at its first
    step with "non-finite loss ... Try a lower trainer.lr", blaming the run instead of the file."""
    row = {column: 1.0 for column in METRICS_COLUMNS}
    state = {"epoch": 1, "step": 2, "partial": torch.tensor([bad, 1.0, 2.0, 16.0], dtype=torch.float64),
             "steps_per_epoch": 4, "history": [{**row, "epoch": 1}], "best_epoch": 1, "best_val_top1": 0.5}
    with pytest.raises(CheckpointError, match=r"malformed training state \(the partial epoch's sums hold NaN"):
        check_training_state(state, "x.pt", steps_per_epoch=4)
    check_training_state({**state, "step": 0}, "x.pt", steps_per_epoch=4)  # at an epoch's start they are unused


def test_the_best_file_a_resume_brings_along_is_read_without_its_optimizer_state(tmp_path, monkeypatch):
    """Its epoch and sound weights are what count; it loaded the whole file (~300 MB for resnet50 with AdamW)."""
    import src.safe_load

    old = tmp_path / "old"
    old.mkdir()
    torch.save({**_minimal(2), "optimizer_state": {"m": torch.ones(1000)}, "history": _history(2)}, old / "run_best.pt")
    loads = []
    torch_load = torch.load
    monkeypatch.setattr(src.safe_load.torch, "load", lambda path, **kwargs: loads.append((path, kwargs.get("mmap")))
                        or torch_load(path, **kwargs))
    state = RunState(epoch=3, best_epoch=2, best_val_top1=0.7, history=_history(3))
    paths = RunPaths(tmp_path / "new", "longer")
    bring_best_along(_minimal(3), old / "run_last.pt", paths, state, SimpleNamespace(print=lambda *args: None))
    assert loads == [(old / "run_best.pt", True)] and paths.best.read_bytes() == (old / "run_best.pt").read_bytes()
