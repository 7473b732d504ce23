"""The guide's contract end to end on a tiny stand-in set: epoch line, CSV, checkpoints, errors."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from src.config import Config, ConfigError, load_config
from src.data.dataset import DatasetError, PreparedData
from src.data.lists import read_list
from src.training import distributed as dist_utils
from src.training import train as train_module
from src.training.artifacts import METRICS_COLUMNS, RunPaths
from src.models.trained import load_checkpoint
from src.training.resume import RunState
from src.training.train import (batch_stats, build_model_and_optimizer, make_runtime, run, seed_everything,
                                wrap_for_training)
from src.training.train import main as train_main
from tests.conftest import REPO, TINY_INDIVIDUALS, main_in_process, write_config

EPOCH_LINE = re.compile(r"^\[Epoch (\d+)/(\d+)\] lr=\d\.\d{5} \| train_loss=\d+\.\d{4} top1=[01]\.\d{4} "
                        r"\| val_loss=\d+\.\d{4} top1=[01]\.\d{4}$")


def train_cli(config_path, *extra, timeout=240):
    return subprocess.run([sys.executable, "-m", "src.training.train", "--config", str(config_path), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_prints_the_guides_epoch_line_and_writes_the_artifacts(tiny_data, tmp_path):
    config_path = write_config(tmp_path, tiny_data)
    result = train_cli(config_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[Epoch")]
    assert [EPOCH_LINE.match(line).groups() for line in lines] == [("1", "2"), ("2", "2")]
    assert "\r" not in result.stdout + result.stderr  # no progress bar outside a terminal
    assert f"note: {tiny_data} holds stand-in images (synthetic, not chimpanzees)" in result.stdout
    artifacts = tmp_path / "artifacts"
    assert sorted(p.name for p in artifacts.iterdir()) == ["tiny_best.pt", "tiny_last.pt", "tiny_metrics.csv"]
    header = (artifacts / "tiny_metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,lr,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5"


def test_the_training_script_run_as_a_file_is_the_guides_command(tiny_data, tmp_path):
    """The guide calls src/training/train.py the training script: `python src/training/train.py --config ...`
    ended in a traceback (No module named 'src') instead of training."""
    script = subprocess.run([sys.executable, "src/training/train.py", "--config",
                             str(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1}))],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert script.returncode == 0, script.stderr
    assert [EPOCH_LINE.match(line).groups() for line in script.stdout.splitlines() if line.startswith("[Epoch")] \
        == [("1", "1")]
    elsewhere = subprocess.run([sys.executable, str(REPO / "src/training/train.py"), "--config", "absent.yaml"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (elsewhere.returncode, elsewhere.stderr) == (2, "error: config file not found: absent.yaml\n")


def test_metrics_rows_best_checkpoint_and_contents(tiny_run):
    rows = read_rows(tiny_run["metrics"])
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == set(METRICS_COLUMNS)
        for key in ("train_top1", "train_top5", "val_top1", "val_top5"):
            assert 0.0 <= float(row[key]) <= 1.0
        assert float(row["train_top1"]) <= float(row["train_top5"])
    val_top1 = [float(r["val_top1"]) for r in rows]
    best = load_checkpoint(tiny_run["best"])
    last = load_checkpoint(tiny_run["last"])
    assert best["epoch"] == val_top1.index(max(val_top1)) + 1
    assert last["epoch"] == 3
    for checkpoint in (best, last):
        assert {"model_state", "optimizer_state", "epoch", "config", "classes"} <= set(checkpoint)
        assert len(checkpoint["classes"]) == TINY_INDIVIDUALS
        assert checkpoint["config"]["model"]["backbone"] == "resnet18"


def test_epoch_seconds_count_the_previous_epochs_checkpoint_snapshot(tiny_data, tmp_path, monkeypatch):
    """An epoch's `seconds` (history, read by the speed benchmark) runs from the previous epoch's row,
    so that epoch's checkpoint snapshot counts: the epochs add up to the run's wall time after set-up."""
    from src.training import checkpoint as checkpoint_module

    real_snapshot = checkpoint_module.snapshot

    def slow_snapshot(tree):
        time.sleep(0.3)
        return real_snapshot(tree)

    monkeypatch.setattr(checkpoint_module, "snapshot", slow_snapshot)
    history = run(load_config(write_config(tmp_path, tiny_data))).history
    for row in history:
        assert row["train_seconds"] > 0 and row["val_seconds"] > 0
        assert row["seconds"] >= row["train_seconds"] + row["val_seconds"]
    # Epoch 1 is the best so far and is snapshotted after its row: epoch 2 pays for that.
    assert history[1]["seconds"] >= history[1]["train_seconds"] + history[1]["val_seconds"] + 0.3


TIMINGS = {"seconds", "train_seconds", "val_seconds"}


def _same_checkpoint(a, b, where="checkpoint"):
    """Equal trees of tensors and values, the history's timings aside."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a.keys() - TIMINGS:
            _same_checkpoint(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _same_checkpoint(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("interval", [0, float("inf")])
def test_weights_snapshotted_during_validation_save_the_same_checkpoints(tiny_data, tmp_path, monkeypatch, interval):
    """The GPU's way (the weights snapshotted while validation runs, the epoch's other fields added
    once known, dropped for an epoch not saved) writes the same checkpoints as snapshotting the whole
    checkpoint after validation; forced on here, on the CPU. So does an epoch whose early copy found
    no room on the GPU. Interval 0 saves every epoch; .inf keeps the best epochs in memory until the end."""
    saved = {}
    early = train_module.device_snapshot
    for way, devices, snapshot_early in (("after", set(), early), ("during", {"cpu"}, early),
                                         ("no room for it", {"cpu"}, lambda tree: None)):
        monkeypatch.setattr(train_module, "SNAPSHOT_DURING_VALIDATION", devices)
        monkeypatch.setattr(train_module, "device_snapshot", snapshot_early)
        (tmp_path / way).mkdir()
        config = load_config(write_config(tmp_path / way, tiny_data, **{
            "trainer.max_epochs": 3, "trainer.checkpoint_interval_s": interval}))
        run(config)
        saved[way] = [load_checkpoint(config.trainer.output_dir / f"tiny_{kind}.pt") for kind in ("best", "last")]
        for checkpoint in saved[way]:
            checkpoint.pop("config")  # its folders differ
    _same_checkpoint(saved["after"], saved["during"])
    _same_checkpoint(saved["after"], saved["no room for it"])
    assert [checkpoint["epoch"] for checkpoint in saved["during"]] == [saved["during"][0]["best_epoch"], 3]


def test_training_learns_on_the_tiny_set(tiny_run):
    rows = read_rows(tiny_run["metrics"])
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_same_seed_same_metrics(tiny_data, tmp_path):
    for run_dir in (tmp_path / "a", tmp_path / "b"):
        run_dir.mkdir()
        run(load_config(write_config(run_dir, tiny_data)))
    a = (tmp_path / "a" / "artifacts" / "tiny_metrics.csv").read_text()
    b = (tmp_path / "b" / "artifacts" / "tiny_metrics.csv").read_text()
    assert a == b


@pytest.mark.parametrize("override, needle", [
    ({"trainer.max_epoch": 3}, "unknown key 'trainer.max_epoch'"),
    ({"trainer.batch_size": "many"}, "'trainer.batch_size'"),
    ({"data.num_classes": 87}, "data.num_classes: config says 87"),
    ({"model.head": "cosface"}, "'model.head'"),
])
def test_config_errors_exit_2_with_one_line(tiny_data, tmp_path, capsys, caplog, override, needle):
    # main() in this process: the refusal is its own (the next test runs the real command line).
    result = main_in_process(train_main, ["--config", str(write_config(tmp_path, tiny_data, **override))], capsys,
                             caplog)
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_refused_run_leaves_no_lock_file_nor_a_folder_it_created(tiny_data, tmp_path, capsys, caplog):
    """A run refused after claiming its outputs (a data.num_classes that does not fit the data, a checkpoint
    that cannot resume) left `<output_dir>/.<name>.lock` behind, and the folders made to hold it."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("kept")
    for output_dir in (tmp_path / "new" / "artifacts", existing):
        config_path = write_config(tmp_path, tiny_data, **{"data.num_classes": 87,
                                                            "trainer.output_dir": str(output_dir)})
        result = main_in_process(train_main, ["--config", str(config_path)], capsys, caplog)
        assert result.returncode == 2 and "data.num_classes: config says 87" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "tiny.yaml"]
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_the_command_line_refuses_a_bad_config_in_one_line(tiny_data, tmp_path):
    result = train_cli(write_config(tmp_path, tiny_data, **{"trainer.max_epoch": 3}))
    assert result.returncode == 2
    assert "unknown key 'trainer.max_epoch'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_config_error(tiny_data, tmp_path, capsys, caplog):
    config_path = write_config(tmp_path, tiny_data, **{"trainer.device": "cuda"})
    result = main_in_process(train_main, ["--config", str(config_path)], capsys, caplog)
    assert result.returncode == 2 and "trainer.device" in result.stderr


def test_plain_pipeline_trains_like_the_cached_one(tiny_data, tmp_path):
    (tmp_path / "cached").mkdir()
    (tmp_path / "plain").mkdir()
    cached = run(load_config(write_config(tmp_path / "cached", tiny_data, **{"trainer.max_epochs": 1})))
    plain = run(load_config(write_config(tmp_path / "plain", tiny_data, **{"trainer.max_epochs": 1,
                                                                             "data.pipeline": "plain"})))
    # Same pixels, same order, same augmentation draws: the two pipelines compute the same epoch.
    assert cached.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], abs=1e-6)
    assert cached.history[0]["val_top1"] == plain.history[0]["val_top1"]


def test_compile_mode_reaches_torch_compile(tiny_data, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: seen.append(options) or module)
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.compile": True,
                                                              "trainer.compile_mode": "reduce-overhead"}))
    runtime = make_runtime(config)
    model, _, _, _ = build_model_and_optimizer(config, TINY_INDIVIDUALS, runtime, steps_per_epoch=1)
    train_runner, eval_runner = wrap_for_training(model, config, runtime)
    assert train_runner is eval_runner is model
    assert seen == [{"dynamic": False, "mode": "reduce-overhead"}]


@pytest.mark.parametrize("mode, under_torchrun", [("reduce-overhead", "default"),
                                                  ("max-autotune", "max-autotune-no-cudagraphs")])
def test_cuda_graph_modes_compile_without_graphs_under_torchrun(tiny_data, tmp_path, monkeypatch, capsys, mode,
                                                                under_torchrun):
    """The resnet50 configs ask for CUDA graphs, which DDP's hooks do not mix with: under torchrun the same
    config compiles without them (a note says so) instead of being refused."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: seen.append(options) or module)
    monkeypatch.setattr(dist_utils, "init_distributed", lambda device: dist_utils.DistInfo(enabled=True))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.compile": True, "trainer.compile_mode": mode}))
    runtime = make_runtime(config)
    model, _, _, _ = build_model_and_optimizer(config, TINY_INDIVIDUALS, runtime, steps_per_epoch=1)
    monkeypatch.setattr(train_module, "DistributedDataParallel", lambda module, device_ids: module)
    wrap_for_training(model, config, runtime)
    assert seen == [{"dynamic": False, "mode": under_torchrun}] * 2  # DDP's runner and evaluation's
    assert (f"note: trainer.compile_mode '{mode}' captures CUDA graphs, which this project uses in a single process "
            f"only: compiling in '{under_torchrun}' mode under torchrun") in capsys.readouterr().out


def _moved_raw_dir(tiny_data, tmp_path):
    """A copy of tiny_data's lists whose prepared.json names a raw folder that is gone."""
    shutil.copytree(tiny_data / "annotations", tmp_path / "data" / "annotations")
    meta = tmp_path / "data" / "annotations" / "prepared.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "raw_dir": str(tmp_path / "moved")}))
    return tmp_path / "data"


def _val_list(tiny_data, tmp_path, lines, split="val"):
    """A copy of tiny_data's lists (same raw images) whose `split`.txt is `lines(original lines)`."""
    shutil.copytree(tiny_data / "annotations", tmp_path / "data" / "annotations")
    meta = tmp_path / "data" / "annotations" / "prepared.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "raw_dir": str(PreparedData.load(tiny_data).raw_dir)}))
    listed = tmp_path / "data" / "annotations" / f"{split}.txt"
    listed.write_text("".join(lines(listed.read_text().splitlines(keepends=True))))
    return tmp_path / "data"


def test_an_individual_without_a_readable_training_image_is_warned_about(tiny_data, tmp_path, capsys):
    first = PreparedData.load(tiny_data).split("train")[0][1]
    data = _val_list(tiny_data, tmp_path, lambda lines: ["gone/" + line if line.rstrip().endswith(f" {first}")
                                                         else line for line in lines], split="train")
    assert train_main(["--config", str(write_config(tmp_path, data, **{"trainer.max_epochs": 1}))]) == 0
    out = capsys.readouterr().out
    assert f"warning: 1 individual(s) have no readable training image, so the model cannot learn them: {first}" in out


@pytest.mark.parametrize("setup, message", [
    (lambda data, tmp: ({"data.cache_dir": str(tmp / "a_file")}, data),
     "data.cache_dir: cannot write the image cache in"),
    (lambda data, tmp: ({}, _moved_raw_dir(data, tmp)), "training images could be read under"),
    (lambda data, tmp: ({}, _val_list(data, tmp, lambda lines: [])), "the val split of"),
    (lambda data, tmp: ({}, _val_list(data, tmp, lambda lines: ["gone/" + line for line in lines])),
     "images of the val split could be read under"),
    (lambda data, tmp: ({"data.pipeline": "plain"},
                        _val_list(data, tmp, lambda lines: ["gone/" + line for line in lines])),
     "images of the val split could be read under"),
    (lambda data, tmp: ({}, tmp / "no_such_root"), "annotations/prepared.json not found"),
])
def test_unusable_data_or_cache_folder_exits_2_in_one_line(tiny_data, tmp_path, capsys, setup, message):
    (tmp_path / "a_file").write_text("not a folder")
    overrides, data_root = setup(tiny_data, tmp_path)
    assert train_main(["--config", str(write_config(tmp_path, data_root, **overrides))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    if "nothing to validate" in err[-1]:
        assert err[-1].endswith("there is nothing to validate the epochs on (re-run prepare)")
    assert not list((tmp_path / "artifacts").glob("tiny_*"))  # nothing written
    if "no_such_root" in str(data_root):  # refused before the output folder and its lock are made
        assert not (tmp_path / "artifacts").exists()


def test_run_gives_the_signal_handlers_back_and_runs_from_a_thread(tiny_data, tmp_path):
    """The Python API in a notebook, a script or a worker thread: Ctrl-C behaves as before the run,
    and a run started off the main thread (where Python cannot install handlers) trains."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    run(load_config(write_config(tmp_path, tiny_data, "main_thread", **{"trainer.max_epochs": 1})))
    assert {sig: signal.getsignal(sig) for sig in before} == before
    results = []
    config = load_config(write_config(tmp_path, tiny_data, "in_thread", **{"trainer.max_epochs": 1}))
    worker = threading.Thread(target=lambda: results.append(run(config)))
    worker.start()
    worker.join(timeout=300)
    assert len(results) == 1 and results[0].epoch == 1
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_determinism_setting_does_not_carry_over_to_the_next_run(first, second):
    """A sweep in one process: each run gets the trainer.deterministic its own config asks for."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        seed_everything(0, first)
        seed_everything(0, second)
        assert torch.are_deterministic_algorithms_enabled() is second
        assert torch.backends.cudnn.benchmark is not second
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_a_deterministic_run_fixes_the_cublas_workspace_unless_set(monkeypatch):
    """Without CUBLAS_WORKSPACE_CONFIG, cuBLAS matrix products may differ between runs on a GPU."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0, False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seed_everything(0, True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    seed_everything(0, True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("below", [[], ["runs"]])
def test_output_dir_that_is_or_is_under_a_file_exits_2_in_one_line(tiny_data, tmp_path, capsys, below):
    """The line names the file that stands in the way, not the folder asked for."""
    (tmp_path / "taken").write_text("a file where the outputs should go")
    output_dir = tmp_path.joinpath("taken", *below)
    config_path = write_config(tmp_path, tiny_data, **{"trainer.output_dir": str(output_dir)})
    assert train_main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: trainer.output_dir: cannot write in {output_dir} "
                   f"({tmp_path / 'taken'}: a file, not a folder)\n")
    assert (tmp_path / "taken").read_text() == "a file where the outputs should go"


@pytest.mark.parametrize("artifact", ["best", "last", "metrics"])
def test_a_folder_where_the_run_writes_a_file_is_refused_before_training(tiny_data, tmp_path, capsys, artifact):
    """Before, the first epoch trained, then the checkpoint write failed ('Is a directory')."""
    paths = RunPaths(tmp_path / "artifacts", "tiny")
    folder = getattr(paths, artifact)
    folder.mkdir(parents=True)
    config_path = write_config(tmp_path, tiny_data, **{"trainer.output_dir": str(paths.output_dir)})
    assert train_main(["--config", str(config_path)]) == 2
    assert capsys.readouterr().err == (f"error: trainer.output_dir: {folder} is a folder, where the run writes a "
                                       "file; move it, or give the run another name\n")
    assert [p.name for p in paths.output_dir.iterdir()] == [folder.name]  # and no lock file


@pytest.mark.parametrize("batch, processes, reason", [
    (2, 2, "gives each of the 2 processes 1 image a step; BatchNorm needs at least 2"),
    (32, 3, "(the global batch) does not divide among 3 processes; use a multiple of 3"),
    (6, 4, "(the global batch) does not divide among 4 processes; use a multiple of 4")])
def test_a_batch_that_does_not_give_each_process_two_images_is_refused(tiny_data, tmp_path, monkeypatch,
                                                                        batch, processes, reason):
    """BatchNorm cannot train on one image: the step would end in a ValueError traceback. A batch
    that does not divide is named as such (32 on 3 processes was blamed on BatchNorm)."""
    monkeypatch.setattr(dist_utils, "init_distributed",
                        lambda device: dist_utils.DistInfo(world_size=processes, enabled=True))
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.batch_size": batch}))
    with pytest.raises(ConfigError) as raised:
        make_runtime(config)
    assert str(raised.value) == f"trainer.batch_size: {batch} {reason}"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_training_starts_exits_in_one_line(tiny_data, tmp_path, capsys, monkeypatch, signum, code):
    """Ctrl-C or SIGTERM while the data load or the image cache is built (before the run's own
    handler). SIGTERM's default ended the process silently, leaving the cache's workers running."""
    def interrupted(root):
        # To this thread: os.kill may reach another of the process's threads, and the handler then
        # runs only when this one next looks (on a busy machine, after the load had returned None).
        signal.raise_signal(signum)
        raise AssertionError("the signal's handler did not raise")

    monkeypatch.setattr(train_module.PreparedData, "load", interrupted)
    assert train_main(["--config", str(write_config(tmp_path, tiny_data))]) == code
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == f"error: stopped by {name} before training started; no checkpoint was written\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back


def test_python_api_takes_a_dict_and_names_an_unnamed_run(tiny_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown key 'trainer.max_epoch'"):
        run({"trainer": {"max_epoch": 1}})  # a dict is validated like a YAML file
    raw = yaml.safe_load(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1}).read_text())
    config = Config.model_validate(raw)  # built in Python: no file, so no name
    assert config.name is None
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "run_last.pt").write_bytes(b"an earlier run's checkpoint")
    state = run(config)
    assert state.epoch == 1 and load_checkpoint(artifacts / "run_last.pt")["config"]["name"] == "run"
    assert sorted(p.name for p in artifacts.glob("run_*")) == ["run_best.pt", "run_last.pt", "run_metrics.csv"]
    # A new run over an earlier one says what it replaces and how to continue that one instead.
    assert f"note: starting a new run, which replaces the earlier run's {artifacts / 'run_last.pt'}" \
        in capsys.readouterr().out


def test_python_api_validates_a_changed_config_as_a_whole_before_any_work(tiny_data, tmp_path):
    """A key set in Python is validated alone: max_epochs lowered below warmup_epochs trained with a
    rate that never reached trainer.lr. model_copy(update=...) validates nothing: an unknown backbone
    surfaced from the model code; and anything but a Config or a dict was an AttributeError."""
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.warmup_epochs": 2}))
    config.trainer.max_epochs = 1
    with pytest.raises(ConfigError, match=r"^'trainer\.warmup_epochs': must be at most trainer\.max_epochs \(1\)"):
        run(config)
    renamed = config.model_copy(update={"model": config.model.model_copy(update={"backbone": "resnet19"})})
    with pytest.raises(ConfigError, match=r"^'model\.backbone': Input should be 'resnet18', "):
        run(renamed)
    with pytest.raises(ConfigError, match=r"^'<root>': Input should be a valid dictionary or instance of Config"):
        run(None)
    assert not (tmp_path / "artifacts").exists()


def test_partial_writes_of_a_killed_run_are_removed_at_the_next_start(tiny_data, tmp_path, capsys):
    """kill -9 during a checkpoint write leaves its temporary file (hundreds of MB for a resnet50);
    the next run of that name, holding the lock, removes it. Another run's files are not its own."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    killed = [artifacts / ".tiny_last.pt.tmp-4242", artifacts / ".tiny_metrics.csv.tmp-4242"]
    others = [artifacts / ".other_last.pt.tmp-4242", artifacts / "tiny_notes.txt"]
    for path in killed + others:
        path.write_bytes(b"partial")
    assert train_main(["--config", str(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1}))]) == 0
    out = capsys.readouterr().out
    assert not any(path.exists() for path in killed) and all(path.exists() for path in others)
    for path in killed:
        assert f"note: removed {path}, a partial write of a run that was killed" in out


def test_val_images_that_vanish_mid_run_stop_it_keeping_the_epochs_held_in_memory(tiny_data, tmp_path, monkeypatch,
                                                                                  capsys):
    """The plain pipeline finds unreadable images only when it reads them: validation that read none
    stops the run (exit 2), and a best epoch not yet written (interval 1 h) is written first."""
    real_evaluate, calls = train_module.evaluate, []

    def images_gone_after_the_first_epoch(*args, **kwargs):
        sums = real_evaluate(*args, **kwargs)
        calls.append(None)
        if len(calls) == 2:
            sums.totals.zero_()  # what a pass over deleted images sums to
        return sums

    monkeypatch.setattr(train_module, "evaluate", images_gone_after_the_first_epoch)
    config = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 3, "trainer.checkpoint_interval_s": 3600,
                                                  "data.pipeline": "plain"})
    capsys.readouterr()
    with pytest.raises(train_module.DatasetError, match="nothing to validate the epochs on"):
        run(load_config(config))
    artifacts = tmp_path / "artifacts"
    best, last = load_checkpoint(artifacts / "tiny_best.pt"), load_checkpoint(artifacts / "tiny_last.pt")
    assert best["epoch"] == last["epoch"] == 1
    assert f"wrote epoch 1 (the best so far) to {artifacts / 'tiny_best.pt'}" in capsys.readouterr().out


def test_train_images_that_vanish_mid_run_stop_it_keeping_the_epochs_held_in_memory(tiny_data, tmp_path, fresh_copy,
                                                                                    monkeypatch, capsys):
    """A training batch with no readable image stops the run (DatasetError); the best epoch held in
    memory (interval 1 h) is written first, as for a non-finite loss. Before, it was lost."""
    data = fresh_copy(tiny_data)
    prepared = data / "annotations" / "prepared.json"
    prepared.write_text(prepared.read_text().replace(str(tiny_data), str(data)))
    real_evaluate = train_module.evaluate

    def images_gone_after_the_first_epoch(*args, **kwargs):
        sums = real_evaluate(*args, **kwargs)
        shutil.rmtree(data / "raw")  # the second call finds none either: the run stops before it
        return sums

    monkeypatch.setattr(train_module, "evaluate", images_gone_after_the_first_epoch)
    config = write_config(tmp_path, data, **{"trainer.max_epochs": 3, "trainer.checkpoint_interval_s": 3600,
                                             "data.pipeline": "plain"})
    capsys.readouterr()
    with pytest.raises(DatasetError, match="all .* images of a training batch could not be read"):
        run(load_config(config))
    artifacts = tmp_path / "artifacts"
    best, last = load_checkpoint(artifacts / "tiny_best.pt"), load_checkpoint(artifacts / "tiny_last.pt")
    assert best["epoch"] == last["epoch"] == 1
    assert len(read_rows(artifacts / "tiny_metrics.csv")) == 1
    assert f"wrote epoch 1 (the best so far) to {artifacts / 'tiny_best.pt'}" in capsys.readouterr().out


@pytest.mark.parametrize("shortage, line", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"),
     "error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): "
     "lower trainer.batch_size or data.image_size"),
    (MemoryError("x.png: out of memory while decoding"), "error: x.png: out of memory while decoding")])
def test_running_out_of_memory_mid_run_is_one_line_and_keeps_the_epochs_held_in_memory(
        shortage, line, tiny_data, tmp_path, monkeypatch, capsys, caplog):
    """Running out of memory (CUDA's, simulated here, or the host's, e.g. the plain pipeline decoding an
    image) in epoch 2's validation: before, a traceback, and epoch 1, the best so far, held in memory
    (interval 1 h), was lost. Now it is written first, as for a non-finite loss, and the run ends with
    exit 2 and one line."""
    real_evaluate, calls = train_module.evaluate, []

    def out_of_memory_in_the_second_validation(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise shortage
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", out_of_memory_in_the_second_validation)
    config = write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 3, "trainer.checkpoint_interval_s": 3600})
    result = main_in_process(train_main, ["--config", str(config)], capsys, caplog)
    assert result.returncode == 2
    assert result.stderr == line + "\n"
    artifacts = tmp_path / "artifacts"
    best, last = load_checkpoint(artifacts / "tiny_best.pt"), load_checkpoint(artifacts / "tiny_last.pt")
    assert best["epoch"] == last["epoch"] == 1
    assert f"wrote epoch 1 (the best so far) to {artifacts / 'tiny_best.pt'}" in result.stdout


def test_running_out_of_memory_in_a_dataloader_worker_ends_the_command(tiny_data, tmp_path):
    """The plain pipeline's workers ignore SIGTERM; a MemoryError re-raised from one kept the DataLoader
    iterator alive until exit, whose join of the workers then waited forever, after the error line."""
    config = write_config(tmp_path, tiny_data, **{"data.pipeline": "plain", "data.workers": 2})
    probe = ("import sys\nfrom src.data import dataset\n"
             "def short(*args, **kwargs):\n    raise MemoryError('x.png: out of memory while decoding')\n"
             "dataset.decode_for_cache = short\nfrom src.training.train import main\n"
             f"sys.exit(main(['--config', {str(config)!r}]))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == "error: x.png: out of memory while decoding"  # not torch's first line


def test_an_image_the_cache_leaves_out_is_a_warning_line(tiny_data, tmp_path):
    """Before, training printed the cache's warning bare, and evaluation as `WARNING: ...`."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "annotations", data / "annotations")
    shutil.copytree(tiny_data / "raw", data / "raw")
    prepared = json.loads((data / "annotations" / "prepared.json").read_text())
    (data / "annotations" / "prepared.json").write_text(json.dumps({**prepared, "raw_dir": "raw"}))
    broken = (data / "annotations" / "train.txt").read_text().split()[0]
    (data / "raw" / broken).write_text("not an image any more")
    result = train_cli(write_config(tmp_path, data, **{"trainer.max_epochs": 1}))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == (f"warning: 1 of {len(read_list(data / 'annotations' / 'train.txt'))} "
                                             f"images could not be read and are left out: {broken}: not an image "
                                             "in a known format")


def test_the_configured_seed_is_the_one_used(tiny_data, tmp_path, monkeypatch):
    seeds = []
    real = train_module.seed_everything
    monkeypatch.setattr(train_module, "seed_everything", lambda seed, deterministic: (seeds.append(seed),
                                                                                       real(seed, deterministic)))
    train_module.run(load_config(write_config(tmp_path, tiny_data, **{"trainer.seed": 7, "trainer.max_epochs": 1})))
    assert seeds == [7]


def test_lr_schedule_warms_up_from_the_first_step_then_decays_to_the_floor(tiny_data, tmp_path):
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 4, "trainer.warmup_epochs": 1,
                                                              "trainer.min_lr_ratio": 0.1}))
    factor = train_module.lr_lambda(config, steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.1)  # the first step trains, at 1/10 of the rate (not at 0)
    assert factor(9) == pytest.approx(1.0) and factor(10) == pytest.approx(1.0)
    assert factor(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert factor(40) == pytest.approx(0.1)  # ends on trainer.min_lr_ratio, not 0
    constant = load_config(write_config(tmp_path, tiny_data, "constant", **{
        "trainer.max_epochs": 4, "trainer.warmup_epochs": 1, "trainer.schedule": "constant"}))
    assert [train_module.lr_lambda(constant, 10)(step) for step in (10, 25, 39)] == [1.0, 1.0, 1.0]


def test_the_epochs_lr_is_the_rate_its_last_step_used(tiny_run):
    checkpoint = load_checkpoint(tiny_run["last"])
    config, steps = tiny_run["config"], checkpoint["steps_per_epoch"]
    factor = train_module.lr_lambda(config, steps)
    for row in checkpoint["history"]:
        assert row["lr"] == pytest.approx(config.trainer.lr * factor(row["epoch"] * steps - 1))


def test_top5_counts_a_label_ranked_second_and_top1_does_not():
    ranked = [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # class c ranks 8 - c, but for class 0 (first)
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, 2.0, 3.0, -1.0], ranked, ranked, ranked])
    labels = torch.tensor([2, 3, 2, 1])  # ranked 2nd in row 0; 5th, 6th and 7th in the rows after
    loss = torch.tensor(0.5)
    assert batch_stats(loss, logits, labels).tolist() == [2.0, 0.0, 2.0, 4.0]


def test_the_csv_row_holds_the_epochs_own_train_and_val_figures(tiny_data, tmp_path, monkeypatch):
    """Each metrics column is the figure of its own split (a val column filled from the train sums,
    say, would look just as plausible in the CSV)."""
    seen = {"train": [], "val": []}

    def recording(split, stage):
        def run_stage(*args, **kwargs):
            sums = stage(*args, **kwargs)
            loss, top1, top5, count = sums.totals.tolist()
            seen[split].append({"loss": loss / count, "top1": top1 / count, "top5": top5 / count})
            return sums
        return run_stage

    monkeypatch.setattr(train_module, "train_one_epoch", recording("train", train_module.train_one_epoch))
    monkeypatch.setattr(train_module, "evaluate", recording("val", train_module.evaluate))
    history = run(load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 2}))).history
    for row, train, val in zip(history, seen["train"], seen["val"], strict=True):
        for key in ("loss", "top1", "top5"):
            assert row[f"train_{key}"] == pytest.approx(train[key]) and row[f"val_{key}"] == pytest.approx(val[key])


def test_the_best_epoch_is_the_first_of_equal_val_top1(tiny_data, tmp_path, monkeypatch):
    """A later epoch that only ties the best val top-1 does not replace `_best.pt`."""
    real_evaluate = train_module.evaluate

    def tied(*args, **kwargs):
        sums = real_evaluate(*args, **kwargs)
        sums.totals[1] = sums.totals[3] / 2  # top-1 of exactly 0.5 every epoch
        return sums

    monkeypatch.setattr(train_module, "evaluate", tied)
    state = run(load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 2})))
    assert state.best_epoch == 1
    assert load_checkpoint(tmp_path / "artifacts" / "tiny_best.pt")["epoch"] == 1


def test_an_epoch_with_val_top1_0_is_the_first_best():
    """A run whose every epoch scores 0 (a hard start) still has a `_best.pt`: its first epoch."""
    assert RunState().record_epoch({"epoch": 1, "val_top1": 0.0})


def test_biases_and_norm_weights_are_not_weight_decayed(tiny_data, tmp_path):
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.weight_decay": 0.05}))
    model, optimizer, _, _ = build_model_and_optimizer(config, TINY_INDIVIDUALS, make_runtime(config), 4)
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in decayed) == (parameter.ndim > 1), name


def test_adamw_takes_its_fused_step_on_the_cpu_too(tiny_data, tmp_path):
    """torch's default AdamW step on the CPU loops over the parameter tensors: 60 ms a step for
    resnet18 on one thread, where the fused one takes 8 ms."""
    config = load_config(write_config(tmp_path, tiny_data))
    _, optimizer, _, _ = build_model_and_optimizer(config, TINY_INDIVIDUALS, make_runtime(config), 4)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


def test_sgd_uses_the_configured_momentum(tiny_data, tmp_path):
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.optimizer": "sgd", "trainer.momentum": 0.8}))
    _, optimizer, _, _ = build_model_and_optimizer(config, TINY_INDIVIDUALS, make_runtime(config), 4)
    assert all(group["momentum"] == 0.8 and group["nesterov"] for group in optimizer.param_groups)


def test_sgd_without_momentum_is_plain_sgd(tiny_data, tmp_path):
    """`trainer.momentum: 0` is a valid config (plain SGD): it must not crash building the optimizer
    (torch refuses Nesterov without momentum)."""
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.optimizer": "sgd", "trainer.momentum": 0.0}))
    model, optimizer, _, _ = build_model_and_optimizer(config, TINY_INDIVIDUALS, make_runtime(config), 4)
    assert all(group["momentum"] == 0.0 and not group["nesterov"] for group in optimizer.param_groups)


def test_label_smoothing_and_grad_clipping_reach_the_step(tiny_data, tmp_path, monkeypatch):
    smoothing, clipped = [], []
    real_ce, real_clip = train_module.F.cross_entropy, torch.nn.utils.clip_grad_norm_

    def cross_entropy(*args, **kwargs):
        smoothing.append(kwargs.get("label_smoothing"))
        return real_ce(*args, **kwargs)

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        clipped.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(train_module.F, "cross_entropy", cross_entropy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    run(load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1, "trainer.label_smoothing": 0.1,
                                                         "trainer.grad_clip_norm": 2.0})))
    assert clipped and set(clipped) == {2.0}
    assert 0.1 in smoothing  # the training loss (validation's has none)


def test_validation_individuals_absent_from_training_are_refused(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "annotations", data / "annotations")
    meta = data / "annotations" / "prepared.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "raw_dir": str(PreparedData.load(tiny_data).raw_dir)}))
    val = data / "annotations" / "val.txt"
    val.write_text(val.read_text() + "face_images/stranger.png Stranger\n")
    with pytest.raises(DatasetError, match="validation split has individuals absent from training: \\['Stranger'\\]"):
        run(load_config(write_config(tmp_path, data, **{"trainer.max_epochs": 1})))


def test_the_last_epoch_is_written_even_when_checkpoints_are_due_rarely(tiny_data, tmp_path):
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 2,
                                                              "trainer.checkpoint_interval_s": 3600}))
    run(config)
    assert load_checkpoint(tmp_path / "artifacts" / "tiny_last.pt")["epoch"] == 2


def test_a_lock_file_that_cannot_be_removed_does_not_change_the_runs_outcome(tiny_data, tmp_path, monkeypatch):
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.max_epochs": 1}))

    unlink = Path.unlink

    def refuse_the_lock(path, missing_ok=False):
        if path.name == ".tiny.lock":
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, missing_ok)
    monkeypatch.setattr(Path, "unlink", refuse_the_lock)
    assert [row["epoch"] for row in run(config).history] == [1]
    assert (tmp_path / "artifacts" / ".tiny.lock").exists()
