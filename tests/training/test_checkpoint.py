"""Atomic checkpoint writes: a failure during a save (a full disk) leaves the previous file intact."""
import errno
import os
import pickle
import time
import warnings
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from src.config import Config
from src.data.dataset import ClassIndex
from src.training import checkpoint, train
from src.training.artifacts import METRICS_COLUMNS, RunPaths
from src.safe_load import CheckpointError, safe_torch_load
from src.training.checkpoint import CheckpointSaver, CheckpointWriter, atomic_save, snapshot
from src.training.resume import RunState
from tests.conftest import write_config


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
    writer.save([(checkpoint.snapshot({"epoch": 1}), path)])
    writer.wait()
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    writer.save([(checkpoint.snapshot({"epoch": 2}), path)])
    with pytest.raises(CheckpointError, match="No space left on device.*previous one is intact"):
        writer.wait()
    monkeypatch.undo()
    assert safe_torch_load(path)["epoch"] == 1


def zip_writer_out_of_room(obj, target):
    """What torch.save raises when the disk fills up under it (seen on a 2 MB tmpfs, torch 2.14)."""
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("free_mb, message", [
    (1, r"no room on the disk of .*: 1 MB free, the checkpoint needs about 4 MB\); the previous one is intact"),
    (1000, r"unexpected pos 576 vs 534\); the previous one is intact"),  # not the disk: the error as it came
])
def test_a_full_disk_is_named_as_the_cause(tmp_path, monkeypatch, free_mb, message):
    monkeypatch.setattr(checkpoint.torch, "save", zip_writer_out_of_room)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda folder: SimpleNamespace(free=free_mb << 20))
    writer = CheckpointWriter()
    writer.save([(snapshot({"epoch": 1, "w": torch.zeros(1 << 20)}), tmp_path / "run_last.pt")])
    with pytest.raises(CheckpointError, match=message):
        writer.wait()
    assert list(tmp_path.iterdir()) == []


def test_snapshot_is_independent_of_later_training(tmp_path):
    weights = torch.ones(4)
    copy = checkpoint.snapshot({"model_state": {"w": weights}, "history": [{"epoch": 1}]})
    weights.add_(1)
    assert torch.equal(copy.on_host()["model_state"]["w"], torch.ones(4))


def test_a_snapshot_without_room_for_a_gpu_copy_is_copied_to_the_host(monkeypatch):
    def out_of_memory(tree):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(checkpoint, "_clone", out_of_memory)
    weights = torch.ones(4)
    copy = checkpoint.snapshot({"model_state": {"w": weights}})
    weights.add_(1)
    assert copy.device is None and torch.equal(copy.on_host()["model_state"]["w"], torch.ones(4))
    assert checkpoint.device_snapshot({"model_state": {"w": weights}}) is None  # the caller decides


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_snapshot_is_copied_on_the_gpu_and_reaches_the_host_when_written(tmp_path):
    weights = torch.randn(1 << 20, device="cuda")
    conv = torch.randn(8, 3, 5, 5, device="cuda").to(memory_format=torch.channels_last)
    tracked = torch.tensor(7, device="cuda")  # BatchNorm's num_batches_tracked: int64, another foreach group
    expected = [weights.cpu(), conv.cpu(), 7]
    copy = checkpoint.snapshot({"model_state": {"w": weights, "conv": conv, "tracked": tracked},
                                "step": torch.tensor(3)})
    assert copy.tree["model_state"]["w"].is_cuda and copy.device == weights.device
    for tensor in (weights, conv, tracked):
        tensor.mul_(0)  # training goes on: queued after the copy on the same stream
    writer = CheckpointWriter()
    writer.save([(copy, tmp_path / "x_last.pt")])
    writer.wait()
    written = safe_torch_load(tmp_path / "x_last.pt")
    state = written["model_state"]
    assert torch.equal(state["w"], expected[0]) and torch.equal(state["conv"], expected[1])
    assert state["conv"].is_contiguous(memory_format=torch.channels_last) and state["tracked"].item() == 7
    assert written["step"].item() == 3


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


class _SystemCall:
    """Calls a function of the `os` module when unpickled: torch words its refusal differently."""

    def __reduce__(self):
        return (os.getpid, ())


def _torchscript_export(path) -> None:
    with warnings.catch_warnings():  # torch.jit's deprecation notices, about torch, not this project
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


def _zip_with_an_undecodable_name(path) -> None:
    """torch's zip layout, then its directory entry flagged UTF-8 with a name that is not."""
    torch.save({"x": torch.zeros(2)}, path)
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central directory entry
    data[entry + 9] |= 0x08  # general purpose flags, bit 11: the name is UTF-8
    data[entry + 46] = 0xFF  # the name's first byte: never valid UTF-8
    path.write_bytes(bytes(data))


def _zip_bomb(path) -> None:
    """torch's zip layout, its tensor data compressed: 10 MB of zeros in a file of 10 kB."""
    torch.save({"x": torch.zeros(2_500_000)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _project_keys(**changes) -> dict:
    return {"format_version": 1, "model_state": {}, "epoch": 1, "config": {}, "classes": ["a", "b"], **changes}


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_text("- epoch: 3\n- lr: 0.1\n"), "x_last.pt: not a PyTorch checkpoint\n"),  # text
    (lambda p: p.write_text('{"epoch": 3}'), "x_last.pt: not a PyTorch checkpoint\n"),  # JSON
    (lambda p: p.write_text("data:\n  root: data\n"), "x_last.pt: not a PyTorch checkpoint\n"),  # a config
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), "x_last.pt: not a PyTorch checkpoint\n"),  # an image
    # a metrics CSV: torch's own words were "IndexError: pop from empty list"
    (lambda p: p.write_text("epoch,lr,train_loss\n1,0.1,2.5\n"), "x_last.pt: not a PyTorch checkpoint\n"),
    # a TorchScript export: torch suggested weights_only=False, which would run its code
    (lambda p: _torchscript_export(p), "x_last.pt: a TorchScript export, not a training checkpoint (load it "
                                        "with torch.jit.load; predict takes the checkpoint, or the ONNX export "
                                        "with --onnx)"),
    # a zip whose member name does not decode: zipfile raised UnicodeDecodeError, a traceback
    (lambda p: _zip_with_an_undecodable_name(p), "x_last.pt: truncated or damaged checkpoint ("),
    # a gallery: torch's words were "file in archive is not in a subdirectory"
    (lambda p: np.savez(p.with_suffix(".npz"), a=np.zeros(3)) or p.with_suffix(".npz").rename(p),
     "x_last.pt: not a PyTorch checkpoint\n"),
    (lambda p: torch.save({"x": torch.zeros(10_000)}, p) or p.write_bytes(p.read_bytes()[:20_000]),
     "truncated or damaged checkpoint ("),
    (lambda p: p.write_bytes(pickle.dumps({"x": _Payload()}, protocol=4)), "not a safe checkpoint"),
    (lambda p: torch.save({"x": _Payload()}, p), "not a safe checkpoint"),  # torch's own zip format
    (lambda p: torch.save({"x": _SystemCall()}, p), "not a safe checkpoint"),
    (lambda p: torch.save({"x": _Payload()}, p, pickle_protocol=4), "not a safe checkpoint"),  # zip, protocol 4
    # loaded: torch inflated each member in memory (a file of 2 MB took 2 GB)
    (lambda p: _zip_bomb(p), "not a file torch.save wrote: its zip members are compressed"),
    (lambda p: p.write_bytes(b""), "empty file (0 bytes), not a checkpoint"),
    (lambda p: p.mkdir(), "a folder, not a checkpoint file"),
    (lambda p: os.mkfifo(p), "checkpoint file is not a regular file (a pipe or a device)"),  # was "not found"
    (lambda p: torch.save(_project_keys(format_version="1"), p), "malformed format_version: str"),
    (lambda p: torch.save(_project_keys(model_state={"a": torch.ones(2), "b": torch.tensor([0.0, float("nan")])}), p),
     "the weights hold NaN or infinite values (first: b); not a usable checkpoint"),
    (lambda p: torch.save(_project_keys(config="resnet18", epoch=None), p), "malformed epoch: NoneType, config: str"),
    # an AttributeError traceback in torch's load_state_dict; weights cast to float without a word
    (lambda p: torch.save(_project_keys(model_state={"a": torch.ones(2), 5: torch.zeros(1)}), p),
     "not a checkpoint of this project (model_state: the key 5 is a int, not a string; weights are "
     "floating-point tensors under string names)"),
    (lambda p: torch.save(_project_keys(model_state={"a": torch.ones(2, dtype=torch.int8)}), p),
     "(model_state: 'a' is a torch.int8 tensor; "),
    (lambda p: torch.save(_project_keys(model_state={"a": torch.ones(2, dtype=torch.complex64)}), p),
     "(model_state: 'a' is a torch.complex64 tensor; "),
    (lambda p: torch.save(_project_keys(model_state={"a": [1.0]}), p), "(model_state: 'a' is a list; "),
    # tensors weights_only allows: tracebacks (meta: Tensor.item(); sparse, nested: NotImplementedError)
    (lambda p: torch.save(_project_keys(model_state={"a": torch.ones(2, device="meta")}), p),
     "(model_state: 'a' is a meta (data-less) tensor; "),
    (lambda p: torch.save(_project_keys(model_state={"a": torch.ones(2).to_sparse()}), p),
     "(model_state: 'a' is a torch.sparse_coo tensor; "),
    (lambda p: torch.save(_project_keys(model_state={"a": torch.ones(2, 2).to_sparse_csr()}), p),
     "(model_state: 'a' is a torch.sparse_csr tensor; "),
    (lambda p: torch.save(_project_keys(model_state={"a": torch.nested.nested_tensor([torch.ones(2)])}), p),
     "(model_state: 'a' is a nested tensor; "),
])
@pytest.mark.filterwarnings("ignore:(Sparse CSR tensor support|The PyTorch API of nested tensors):UserWarning")
def test_unusable_files_exit_2_in_one_line_naming_the_problem(tiny_data, tmp_path, capsys, write, message):
    path = tmp_path / "x_last.pt"
    write(path)
    assert train.main(["--config", str(write_config(tmp_path, tiny_data)), "--resume", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {path}: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "unpickled" not in captured.out


def test_a_checkpoint_that_cannot_be_read_says_so(tmp_path, monkeypatch):
    """What a file without read permission gives (faked: root reads it anyway). Before, the message
    was "not a PyTorch checkpoint", as for an image given by mistake."""
    path = tmp_path / "x_best.pt"
    torch.save({"x": torch.zeros(2)}, path)

    def denied(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    monkeypatch.setattr(type(path), "open", denied)
    with pytest.raises(CheckpointError, match=r"x_best.pt: cannot read the checkpoint \(Permission denied\)$"):
        safe_torch_load(path)


def _state(epoch: int) -> dict:
    row = {column: float(epoch) for column in METRICS_COLUMNS}
    return {"epoch": epoch, "w": torch.full((2,), float(epoch)), "history": [row] * epoch}


def test_saver_keeps_a_best_epoch_in_memory_until_a_write_is_due(tmp_path):
    paths = RunPaths(tmp_path, "x")
    saver = CheckpointSaver(paths, interval_s=3600, enabled=True)
    saver.save(lambda _: _state(1), improved=True, force=False)  # not due: held in memory
    saver.save(lambda _: _state(2), improved=False, force=False)  # neither due nor better: not even copied
    saver.wait()
    assert not list(tmp_path.iterdir())
    saver.save(lambda _: _state(3), improved=False, force=True)  # the run's end
    saver.wait()
    assert torch.load(paths.best)["epoch"] == 1 and torch.load(paths.last)["epoch"] == 3
    assert len(paths.metrics.read_text().splitlines()) == 1 + 3
    assert saver.write_pending_best() is None  # the best was written with the last


def test_saver_writes_a_pending_best_as_best_and_last_and_only_on_rank_0(tmp_path):
    saver = CheckpointSaver(RunPaths(tmp_path, "x"), interval_s=3600, enabled=True)
    saver.save(lambda _: _state(4), improved=True, force=False)
    assert saver.write_pending_best() == 4  # a non-finite loss ends the run: nothing is lost
    assert torch.load(tmp_path / "x_last.pt")["epoch"] == torch.load(tmp_path / "x_best.pt")["epoch"] == 4
    other_rank = CheckpointSaver(RunPaths(tmp_path / "rank1", "x"), interval_s=0, enabled=False)
    other_rank.save(lambda _: _state(1), improved=True, force=True)
    other_rank.wait()
    assert not (tmp_path / "rank1").exists()


@pytest.mark.parametrize("saves, written", [
    ([(1, True, True)], [("x_last.pt", 1), ("x_best.pt", 1)]),
    ([(1, True, False), (2, False, True)], [("x_last.pt", 1), ("x_best.pt", 1), ("x_last.pt", 2)]),
    ([(1, True, False), "failure"], [("x_last.pt", 1), ("x_best.pt", 1)]),
], ids=["a new best", "a best held in memory, then a later epoch", "a best held in memory, then a failure"])
def test_a_save_writes_the_best_epoch_as_last_before_best(tmp_path, monkeypatch, saves, written):
    """Each file is atomic, a save of two is not. `_best.pt` was written first: a run killed before its
    `_last.pt` (kill -9; a full disk also ends the writes there) left a `_best.pt` of an epoch `_last.pt` had
    not reached, written over the best epoch that `_last.pt` names. Now `_last.pt` holds the best epoch before
    `_best.pt` is written, so after any write a resume finds it in one of the two (`resume.mend_best_file`)."""
    writes = []
    real_save = checkpoint.atomic_save
    monkeypatch.setattr(checkpoint, "atomic_save",
                        lambda obj, path: writes.append((path.name, obj["epoch"])) or real_save(obj, path))
    saver = CheckpointSaver(RunPaths(tmp_path, "x"), interval_s=3600, enabled=True)
    for save in saves:
        if save == "failure":  # a non-finite loss, say: `train.pending_best_written_on_failure`
            saver.write_pending_best()
        else:
            epoch, improved, force = save
            saver.save(lambda _, epoch=epoch: _state(epoch), improved=improved, force=force)
    saver.wait()
    assert writes == written


def test_a_write_starts_only_once_the_previous_one_has_ended(tmp_path, monkeypatch):
    """Two writes in flight at once would share the temporary file of `_last.pt` (one per process)."""
    events = []
    real_save = checkpoint.atomic_save

    def slow_save(obj, path):
        events.append(f"start {obj['epoch']}")
        time.sleep(0.3)
        real_save(obj, path)
        events.append(f"end {obj['epoch']}")

    monkeypatch.setattr(checkpoint, "atomic_save", slow_save)
    writer = CheckpointWriter()
    writer.save([(snapshot({"epoch": 1}), tmp_path / "x_last.pt")])
    writer.save([(snapshot({"epoch": 2}), tmp_path / "x_last.pt")])
    writer.wait()
    assert events == ["start 1", "end 1", "start 2", "end 2"]


def test_the_checkpoint_interval_runs_from_the_last_write(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    paths = RunPaths(tmp_path, "x")
    saver = CheckpointSaver(paths, interval_s=60, enabled=True)
    clock[0] += 61
    saver.save(lambda _: _state(1), improved=False, force=False)  # due
    clock[0] += 30
    saver.save(lambda _: _state(2), improved=False, force=False)  # 30 s after that write: not due
    saver.wait()
    assert torch.load(paths.last)["epoch"] == 1


def test_a_checkpoint_holds_the_gradient_scalers_state():
    """fp16's loss scale, learnt over the run, is resumed rather than started again at 65536."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    saved = train.checkpoint_dict(model, optimizer, scheduler, scaler, RunState(), Config(), ClassIndex(["a", "b"]),
                                  "f", 4)
    assert saved["scaler_state"]["scale"] == 1024.0


def test_weights_copied_earlier_are_saved_with_the_rest_of_the_checkpoint(tmp_path):
    """The weights snapshotted while a GPU validates, then the epoch's other fields once known: the
    saved file holds both, and later changes to either original do not reach it."""
    paths = RunPaths(tmp_path, "x")
    saver = CheckpointSaver(paths, interval_s=3600, enabled=True)
    weights = torch.ones(3)
    rng = torch.zeros(2)
    early = snapshot({"model_state": {"w": weights}})
    weights.add_(1)  # training goes on
    saver.save(lambda with_weights: {"epoch": 2, "rng": rng, "with_weights": with_weights,
                                     "history": [{c: 1.0 for c in METRICS_COLUMNS}]},
               improved=False, force=True, weights=early)
    rng.add_(5)
    saver.wait()
    saved = torch.load(paths.last)
    assert saved["epoch"] == 2 and torch.equal(saved["model_state"]["w"], torch.ones(3))
    assert saved["with_weights"] is False  # the weights come from the early snapshot alone
    assert torch.equal(saved["rng"], torch.zeros(2))


def test_fields_added_to_a_snapshot_are_copies():
    rng = torch.zeros(2)
    partial = torch.ones(4, dtype=torch.float64)
    extended = snapshot({"model_state": {"w": torch.ones(3)}}).extended({"rng": rng, "partial": [partial], "epoch": 2})
    rng.add_(5)
    partial.mul_(0)
    tree = extended.on_host()
    assert torch.equal(tree["rng"], torch.zeros(2))
    assert torch.equal(tree["partial"][0], torch.ones(4, dtype=torch.float64))
    assert tree["epoch"] == 2 and torch.equal(tree["model_state"]["w"], torch.ones(3))
