"""Writing checkpoints that are impossible to half-write (reading them: `src/models/trained.py`).

Saving writes a temporary file in the same folder, fsyncs it and renames it over the target: a
crash or a full disk during a save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from src.atomic import atomic_destination
from src.safe_load import CheckpointError
from src.training.artifacts import RunPaths, write_metrics_csv


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to `path` via a same-folder temporary file, fsync and rename."""
    free = None
    try:
        with atomic_destination(path) as tmp:
            free = _free_bytes(tmp.parent)
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:
        # On a full disk torch's writer fails with "[enforce fail at inline_container.cc] unexpected
        # pos ...", which does not name the cause: name it when the disk could not hold the file.
        # (Free space is read before the write: a failed writer may hold its space until collected.)
        needed = _tensor_bytes(obj)
        if free is not None and free < needed:
            raise OSError(errno.ENOSPC, f"no room on the disk of {Path(path).parent}: {free / 2**20:.0f} MB "
                          f"free, the checkpoint needs about {needed / 2**20:.0f} MB") from exc
        raise


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # a file system that cannot tell: the save goes ahead all the same
        return None


def _tensor_bytes(tree) -> int:
    """The bytes of the tensors in `tree`: about a checkpoint's size on disk."""
    sizes = []
    _map_tensors(tree, lambda tensor: sizes.append(tensor.nelement() * tensor.element_size()))
    return sum(sizes)


@dataclass
class Snapshot:
    """A checkpoint frozen at one moment: its tensors are copies, so training can go on mutating
    the originals. GPU tensors are copied on the GPU and reach the host only when written."""

    tree: dict
    device: torch.device | None = None  # the GPU its tensors are on; None: all on the CPU
    ready: torch.cuda.Event | None = None  # recorded on that GPU after its copies were queued

    def extended(self, fields: dict) -> "Snapshot":
        """This snapshot with `fields` added: host values and CPU tensors (cloned), e.g. a checkpoint's
        epoch, history and RNG states added to weights copied earlier."""
        def clone(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.is_cuda:
                raise ValueError("Snapshot.extended takes CPU tensors only; snapshot GPU ones")
            return tensor.detach().clone()
        return Snapshot({**self.tree, **_map_tensors(fields, clone)}, self.device, self.ready)

    def on_host(self) -> dict:
        """The checkpoint with every tensor on the CPU (the writer thread calls this). The copies run
        on a stream of their own, so they overlap the training kernels instead of queueing between
        them, and wait for that stream alone."""
        if self.device is None:
            return self.tree
        stream = torch.cuda.Stream(self.device)
        stream.wait_event(self.ready)
        with torch.cuda.stream(stream):
            return _map_tensors(self.tree, lambda tensor: tensor.to("cpu"))


def snapshot(tree: dict) -> Snapshot:
    """A `Snapshot` of `tree`, taken without waiting for the GPU.

    Each tensor is cloned where it lives. On a GPU that is a device-to-device copy, queued in a few
    ms for a resnet50 and its AdamW state (~300 MB). Copying into pinned host memory here instead,
    with one wait, took 16% of a resnet50 epoch in the speed benchmark on an H100 (~0.25 s in two of
    three epochs). The price is GPU memory: up to two snapshots (a best epoch held until the next
    write, and one being written) of the model and optimizer state."""
    taken = device_snapshot(tree)
    if taken is None:
        # No room on the GPU for a copy: copy to the host instead, slower (it waits) but sure.
        return Snapshot(_map_tensors(tree, lambda tensor: tensor.detach().to("cpu", copy=True)))
    return taken


def device_snapshot(tree: dict) -> Snapshot | None:
    """`snapshot`'s copy where the tensors live, or None if the GPU has no room for it: a caller
    snapshotting early, in case the state is saved, then takes a `snapshot` when it is."""
    try:
        copy, devices = _clone(tree)
    except torch.OutOfMemoryError:
        return None
    if not devices:
        return Snapshot(copy)
    if len(devices) > 1:  # one process trains on one GPU; a tree across GPUs is nobody's checkpoint here
        raise ValueError(f"a checkpoint's tensors are on several GPUs: {sorted(map(str, devices))}")
    device = devices.pop()
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    return Snapshot(copy, device, ready)


def _clone(tree) -> tuple[dict, set[torch.device]]:
    """`tree` with every tensor cloned where it lives, and the GPUs they live on.

    One clone per tensor. One `torch._foreach_copy_` per dtype instead (a few kernel launches
    rather than ~320 for resnet18 and its AdamW state) was measured on an H100, in a run that changed
    other things too: the epoch's share outside training and validation went from 2.2% to 2.1%, so
    the simple form stays."""
    devices = set()

    def clone(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_cuda:
            devices.add(tensor.device)
        return tensor.detach().clone()

    return _map_tensors(tree, clone), devices


def _map_tensors(tree, function):
    if isinstance(tree, torch.Tensor):
        return function(tree)
    if isinstance(tree, dict):
        return {key: _map_tensors(value, function) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(value, function) for value in tree)
    return tree


class CheckpointWriter:
    """Writes checkpoints on a background thread: the caller takes a `snapshot` at once, the copy
    to the host, the serialisation and the fsync of a few hundred MB overlap the next epoch. One
    write is in flight at a time; an error of a write is raised by the next `save` or `wait`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, items: list[tuple[Snapshot, Path]], after=None) -> None:
        """Write each `(snapshot, path)` atomically, in order, then call `after()`."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(items, after),
                                        name="checkpoint-writer", daemon=False)
        self._thread.start()

    def _write(self, items: list[tuple[Snapshot, Path]], after) -> None:
        try:
            on_host = {}  # one copy to the host for a snapshot written twice (best and last)
            for checkpoint, path in items:
                if id(checkpoint) not in on_host:
                    on_host[id(checkpoint)] = checkpoint.on_host()
                atomic_save(on_host[id(checkpoint)], path)
            if after is not None:
                after()
        except BaseException as exc:  # reported to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"could not write a checkpoint ({error}); the previous one is intact") from None


class CheckpointSaver:
    """When a run's checkpoints and CSV are written. Forced saves (the last epoch, a stop) always
    write; otherwise at most every `interval_s` seconds, a new best epoch being kept in memory (a
    snapshot) until the next write. `enabled` is false on every rank but 0, which alone writes."""

    def __init__(self, paths: RunPaths, interval_s: float, enabled: bool):
        self.paths, self.interval_s, self.enabled = paths, interval_s, enabled
        self.writer = CheckpointWriter()
        self.pending_best: Snapshot | None = None  # a best epoch not yet written
        self.last_write = time.monotonic()

    def save(self, checkpoint: Callable[[bool], dict], improved: bool, force: bool,
             weights: Snapshot | None = None) -> None:
        """Snapshot the checkpoint now if it is due or a new best; write now if forced or due.
        `checkpoint(with_weights)` builds it, with the model and optimizer state if `with_weights`.
        `weights`: that state snapshotted earlier (then asked for without it), used if this epoch is
        saved and dropped if not."""
        due = force or time.monotonic() - self.last_write >= self.interval_s
        if not self.enabled or not (due or improved):
            return
        current = (snapshot(checkpoint(True)) if weights is None
                   else weights.extended(checkpoint(False)))
        if improved:
            self.pending_best = current
        if due:
            self._write(current)
            self.pending_best, self.last_write = None, time.monotonic()

    def write_pending_best(self) -> int | None:
        """Before a run ends on an error (`train.pending_best_written_on_failure` lists them): the newest
        good state held in memory (a best epoch not yet written) becomes both best and last, so the stop
        loses none of the epochs before. Returns that epoch, or None when nothing was pending. Waits
        for the writes."""
        epoch = None
        if self.pending_best is not None:
            epoch = self.pending_best.tree["epoch"]
            self._write(self.pending_best)
        self.wait()
        return epoch

    def wait(self) -> None:
        self.writer.wait()

    def _write(self, current: Snapshot) -> None:
        """Write `current` as `_last.pt` and the best epoch held in memory as `_best.pt`, in the background,
        then the CSV of `current`'s history. Each file is atomic, the pair is not: so that a run killed
        between two files (kill -9, a full disk) never leaves a `_best.pt` newer than `_last.pt` (the best
        epoch of a trajectory the resume no longer follows, written over the best epoch `_last.pt` names),
        `_best.pt` is written after `_last.pt` holds that epoch; a best epoch older than `current` is
        first written as `_last.pt` (one write more). A resume then finds the best epoch of its `_last.pt`
        in `_best.pt` or in `_last.pt` itself (`resume.mend_best_file`)."""
        best = self.pending_best
        items = [] if best is None else [(best, self.paths.last), (best, self.paths.best)]
        if current is not best:
            items.append((current, self.paths.last))
        history = current.tree["history"]
        self.writer.save(items, after=lambda: write_metrics_csv(self.paths.metrics, history))
