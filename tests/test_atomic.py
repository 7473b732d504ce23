"""Atomic writes: the old file or the new one, never half of one, and no temporary file left."""
from __future__ import annotations

import errno
import os
import signal
import stat

import pytest

from src import atomic
from src.errors import Terminated, sigterm_raises


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # missing folders are created
    atomic.write_text(target, "first")
    atomic.write_text(target, "second")
    assert target.read_text() == "second" and sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_destination(target) as temporary:
            temporary.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failed_write_names_the_file_it_was_for(tmp_path):
    """A write that fails (a full disk) raises an OSError without a file name, unlike a failed open:
    the error names the target, so a one-line message says where the disk is full."""
    target = tmp_path / "out.txt"
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*out.txt'") as raised:
        with atomic.atomic_destination(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    with pytest.raises(PermissionError) as raised:  # an error that names its file keeps it
        with atomic.atomic_destination(target):
            raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere")
    assert raised.value.filename == "/elsewhere"
    with pytest.raises(OSError, match="^disk full$"):  # no system error number: left as raised
        with atomic.atomic_destination(target):
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("below", [["out.txt"], ["sub", "out.txt"]])
def test_a_file_where_a_folder_should_be_is_named_as_such(tmp_path, below):
    """mkdir says "File exists" for a file in the way, as if the folder were there already."""
    (tmp_path / "notes.yaml").write_text("kept")
    target = tmp_path.joinpath("notes.yaml", *below)
    with pytest.raises(NotADirectoryError, match=r"a file, not a folder: '.*notes.yaml'$") as raised:
        atomic.write_text(target, "new")
    assert raised.value.filename == str(tmp_path / "notes.yaml")
    assert (tmp_path / "notes.yaml").read_text() == "kept"


def test_a_write_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    """Durability: the data reaches the disk before the rename makes it the file (else a power cut
    can leave an empty file under the real name)."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        return real_fsync(fd)

    def replace(source, target):
        events.append("replace")
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic.write_text(tmp_path / "out.txt", "data")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, the folder


def test_leftovers_are_only_the_temporary_files_of_that_path(tmp_path):
    target = tmp_path / "x_last.pt"
    mine = tmp_path / ".x_last.pt.tmp-42"
    others = [tmp_path / ".x_last.pt.bak.tmp-42", tmp_path / ".x_last.ptx.tmp-42", tmp_path / "x_last.pt"]
    for path in [mine, *others]:
        path.write_text("partial")
    assert atomic.remove_leftovers(target) == [mine]
    assert all(path.exists() for path in others) and not mine.exists()


def test_leftovers_in_a_folder_are_the_temporary_files_of_any_of_its_files(tmp_path):
    mine = [tmp_path / ".metadata.csv.tmp-42", tmp_path / ".train.txt.tmp-7"]
    others = [tmp_path / ".prepare.lock", tmp_path / ".notes.tmp-old", tmp_path / "train.txt"]
    for path in [*mine, *others]:
        path.write_text("partial")
    assert atomic.remove_leftovers_in(tmp_path) == sorted(mine)
    assert all(path.exists() for path in others) and not any(path.exists() for path in mine)
    assert atomic.remove_leftovers_in(tmp_path / "missing") == []


def test_files_replaced_together_all_or_none(tmp_path):
    old = {"model.onnx": b"old model", "model.json": b"describes the old model"}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(KeyboardInterrupt):
        with atomic.replaced_together() as stage:
            atomic.write_bytes(stage(tmp_path / "model.onnx"), b"new model")
            raise KeyboardInterrupt  # stopped before the description was written
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == old  # no staged file left either

    with atomic.replaced_together() as stage:
        atomic.write_bytes(stage(tmp_path / "model.onnx"), b"new model")
        stage(tmp_path / "curves.png")  # staged, never written: nothing to replace
        atomic.write_bytes(stage(tmp_path / "model.json"), b"describes the new model")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == {
        "model.onnx": b"new model", "model.json": b"describes the new model"}


@pytest.mark.parametrize("signum, stop", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_stop_between_the_renames_comes_after_the_last(tmp_path, monkeypatch, signum, stop):
    """Ctrl-C or SIGTERM as the first staged file is renamed: before, the stop came before the second
    rename, and a new model.onnx stood beside the JSON describing the old one."""
    for name in ["model.onnx", "model.json"]:
        (tmp_path / name).write_text(f"old {name}")
    real_replace = os.replace

    def replace_then_signal(source, target):
        real_replace(source, target)
        signal.raise_signal(signum)

    with pytest.raises(stop), sigterm_raises():
        with atomic.replaced_together() as stage:
            for name in ["model.onnx", "model.json"]:  # the description last
                stage(tmp_path / name).write_text(f"new {name}")
            monkeypatch.setattr(os, "replace", replace_then_signal)
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == {
        "model.onnx": "new model.onnx", "model.json": "new model.json"}



def _replaced_together_with(path, text: str) -> None:
    with atomic.replaced_together() as stage:
        stage(path).write_text(text)


@pytest.mark.parametrize("write", [atomic.write_text, _replaced_together_with])
def test_a_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path, write):
    """Before, the new file had the umask's permissions: a file made private (0600) became 0644."""
    private = tmp_path / "private.csv"
    private.write_text("old")
    private.chmod(0o600)
    write(private, "new")
    assert private.read_text() == "new" and stat.S_IMODE(private.stat().st_mode) == 0o600


@pytest.mark.parametrize("write", [atomic.write_text, _replaced_together_with])
def test_a_write_to_a_symbolic_link_replaces_the_file_it_points_to(tmp_path, write):
    """As `open(path, "w")` does. Before, the link became a file and the one it points to (a shared
    gallery, say) kept the old contents."""
    (tmp_path / "shared").mkdir()
    real = tmp_path / "shared" / "gallery.npz"
    real.write_text("old")
    link = tmp_path / "gallery.npz"
    link.symlink_to(real)
    write(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(path.name for path in (tmp_path / "shared").iterdir()) == ["gallery.npz"]


def test_a_folder_where_a_staged_file_goes_is_refused_before_any_rename(tmp_path):
    """Before, model.onnx was replaced, then the rename onto the folder failed: a mixed set."""
    (tmp_path / "model.onnx").write_text("old model.onnx")
    (tmp_path / "model.json").mkdir()
    with pytest.raises(IsADirectoryError, match=r"a folder, not a file: '.*model.json'$"):
        with atomic.replaced_together() as stage:
            for name in ["model.onnx", "model.json"]:
                stage(tmp_path / name).write_text(f"new {name}")
    assert (tmp_path / "model.onnx").read_text() == "old model.onnx"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.json", "model.onnx"]
