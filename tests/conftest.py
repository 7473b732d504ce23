"""Shared fixtures: a tiny prepared stand-in dataset and a config to train on it in seconds."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from src.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

TINY_INDIVIDUALS = 6
TINY_IMAGES = 16


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared dataset of stand-in images: 6 individuals x 16 images of 40 px, cvjena layout."""
    from src.data import prepare, standin

    root = tmp_path_factory.mktemp("tiny_data")
    assert standin.main(["--out", str(root / "raw"), "--individuals", str(TINY_INDIVIDUALS),
                         "--images", str(TINY_IMAGES), "--size", "40", "--seed", "0", "--workers", "1"]) == 0
    assert prepare.main(["--raw-dir", str(root / "raw"), "--out-dir", str(root), "--min-images", "10",
                         "--seed", "0", "--open-set-individuals", "2"]) == 0
    return root


def write_config(directory: Path, data_root: Path, name: str = "tiny", **overrides) -> Path:
    """A CPU config for the tiny dataset; `overrides` maps 'section.key' to a value."""
    raw = {
        "data": {"root": str(data_root), "num_classes": TINY_INDIVIDUALS, "image_size": 32,
                 "workers": 0, "cache_dir": str(directory / "cache")},
        "model": {"backbone": "resnet18", "embedding_dim": 32, "head": "arcface"},
        "trainer": {"max_epochs": 2, "batch_size": 16, "lr": 0.002, "warmup_epochs": 0.5,
                    "device": "cpu", "amp": False, "output_dir": str(directory / "artifacts"),
                    "progress": "never"},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> dict:
    """A finished 3-epoch training run on `tiny_data`: its config, checkpoints and metrics."""
    from src.training.train import run

    directory = tmp_path_factory.mktemp("tiny_run")
    config_path = write_config(directory, tiny_data, **{"trainer.max_epochs": 3})
    config = load_config(config_path)
    run(config)
    artifacts = Path(config.trainer.output_dir)
    return {"config_path": config_path, "config": config, "data_root": tiny_data,
            "best": artifacts / "tiny_best.pt", "last": artifacts / "tiny_last.pt",
            "metrics": artifacts / "tiny_metrics.csv"}


@pytest.fixture
def fresh_copy(tmp_path):
    """Copy a file tree into tmp_path (tests that modify a shared fixture work on a copy)."""
    def copy(source: Path) -> Path:
        target = tmp_path / source.name
        shutil.copytree(source, target) if source.is_dir() else shutil.copy2(source, target)
        return target
    return copy


@pytest.fixture
def unsearchable(monkeypatch):
    """`unsearchable(folder)`: Path.exists raises PermissionError for every path in `folder`, as Python
    3.11 does for a user without search permission on it. Simulated: the tests may run as root, whom no
    permission stops."""
    exists = Path.exists

    def make(folder: Path) -> Path:
        def exists_or_no_permission(path, *args, **kwargs):
            if folder in Path(path).parents:
                raise PermissionError(13, "Permission denied", str(path))
            return exists(path, *args, **kwargs)
        monkeypatch.setattr(Path, "exists", exists_or_no_permission)
        return folder
    return make


def main_in_process(main, argv: list[str], capsys, caplog) -> subprocess.CompletedProcess:
    """A command's main(argv) in this process, as `subprocess.run` reports `python -m` (without the
    seconds a new interpreter takes to import torch). Its stderr also holds what the command's would:
    the logged warnings (pytest's log capture keeps them from show_warnings' handler) and Python's
    warnings, so that a test of one line sees them. An exception main() lets out, which the command
    would print as a traceback, fails the test."""
    capsys.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = main(argv)
        except SystemExit as exited:  # argparse's errors: the status the interpreter would exit with
            code = exited.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            code = code or 0
    out, err = capsys.readouterr()
    err += "".join(f"warning: {record.getMessage()}\n" for record in caplog.records
                   if record.levelno >= logging.WARNING)
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught
                   if not issubclass(w.category, DeprecationWarning))  # ignored outside __main__
    return subprocess.CompletedProcess([main.__module__, *argv], code, out, err)


def arithmetic_flags() -> tuple[bool, bool, bool, bool]:
    """The process-wide settings `devices.reproducible_arithmetic` changes and gives back."""
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


@pytest.fixture
def training_arithmetic():
    """The flags as training leaves them (autotuning and TF32 on) for the test, restored after it."""
    saved = arithmetic_flags()
    wanted = (True, False, True, True)
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = wanted
    yield wanted
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_as_a_terminal_delivers_it():
    """Started in the background (`bash scripts/test.sh &`, nohup), the suite inherits SIGINT ignored,
    and so would every command its tests start: the commands keep an ignored SIGINT ignored, as a
    shell's background jobs expect, and the tests of Ctrl-C failed. A handler is reset to the default
    in the commands the tests start, as in a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test and every command it starts computes on one thread.

    CI runs the suite on a shared 2-core machine. Two OpenMP threads there spin-wait for each other
    whenever another process holds a core: measured under load, test_same_seed_same_metrics took 33 s
    (26 s of CPU) on 2 threads and 11 s (9 s of CPU) on one. One thread also gives the in-process runs
    and the commands the tests compare them with (resume, evaluation) the same arithmetic whatever
    the machine's core count. OMP_NUM_THREADS set by the caller is kept."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the commands the tests start
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(threads)
