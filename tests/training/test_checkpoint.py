"""Atomic checkpoint writes: a failure during a save (a full disk) leaves the previous file intact."""
import errno

import pytest
import torch

from src.training import checkpoint
from src.training.checkpoint import CheckpointError, CheckpointWriter, atomic_save, safe_torch_load


def disk_full(obj, target):
    with open(target, "wb") as handle:
        handle.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "run_last.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert safe_torch_load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run_last.pt"]


def test_the_background_writer_reports_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "run_last.pt"
    writer = CheckpointWriter()
    writer.save([({"epoch": 1}, path)])
    writer.wait()
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    writer.save([({"epoch": 2}, path)])
    with pytest.raises(CheckpointError, match="No space left on device.*previous one is intact"):
        writer.wait()
    monkeypatch.undo()
    assert safe_torch_load(path)["epoch"] == 1


def test_snapshot_is_independent_of_later_training(tmp_path):
    weights = torch.ones(4)
    copy = checkpoint.snapshot({"model_state": {"w": weights}, "history": [{"epoch": 1}]})
    weights.add_(1)
    assert torch.equal(copy["model_state"]["w"], torch.ones(4))
