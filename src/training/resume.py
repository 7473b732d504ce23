"""Resuming a run: the state that carries across epochs (`RunState`), reading and restoring it from
a checkpoint (`starting_state`), and refusing changes a resume may not make (`check_resume_compatible`;
the keys it may change: `src.config.RESUMABLE_CHANGES`)."""
from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from src import atomic
from src.config import RESUMABLE_CHANGES, Config, flatten
from src.data.dataset import ClassIndex
from src.errors import clipped, clipped_repr, first_line, is_whole, state_dict_problem
from src.training import distributed as dist_utils
from src.training.artifacts import METRICS_COLUMNS, RunPaths, metrics_csv_text, write_metrics_csv
from src.models.trained import CheckpointError, load_checkpoint
from src.safe_load import safe_torch_load, unusual_layout

if TYPE_CHECKING:  # train.py imports this module
    from src.training.train import Runtime


@dataclass
class RunState:
    """Everything that continues across epochs and must survive a resume."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps of epoch `epoch + 1` when stopped mid-epoch
    partial: torch.Tensor | None = None  # EpochSums.reduced_state() of that partial epoch
    best_val_top1: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)

    def record_epoch(self, row: dict) -> bool:
        """Append a finished epoch's `row` to the history; whether its val top-1 is the best so far."""
        self.history.append(row)
        self.epoch, self.step, self.partial = row["epoch"], 0, None
        improved = row["val_top1"] > self.best_val_top1
        if improved:
            self.best_val_top1, self.best_epoch = row["val_top1"], row["epoch"]
        return improved


# What a checkpoint needs beyond load_checkpoint's keys to continue training (evaluation needs none).
RESUME_KEYS = ("optimizer_state", "scheduler_state", "scaler_state", "rng", "best_val_top1", "best_epoch", "history")


def check_resume_compatible(checkpoint: dict, config: Config, classes: ClassIndex, fingerprint: str,
                            path: Path) -> None:
    """Raise CheckpointError listing every incompatible difference."""
    try:  # Config.to_dict stored plain JSON values: a tensor (a crafted file) made the comparison a traceback
        json.dumps(checkpoint["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot resume from {path}: its stored config is malformed ({exc})") from None
    old, new = flatten(checkpoint["config"]), flatten(config.to_dict())
    differences = [f"{clipped(key)}: {clipped_repr(old.get(key))} -> {clipped_repr(new.get(key))}"
                   for key in sorted(old.keys() | new.keys())
                   if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key)]
    if list(checkpoint["classes"]) != list(classes.names):
        differences.append("the individuals (class list) differ")
    elif checkpoint.get("data_fingerprint") != fingerprint:
        differences.append("the training split lists other image paths or labels (a dataset prepared again "
                           "from another --raw-dir form lists the same images under other paths)")
    if config.trainer.max_epochs < checkpoint["epoch"]:
        differences.append(f"trainer.max_epochs {config.trainer.max_epochs} is below the "
                           f"{checkpoint['epoch']} epochs already trained")
    if differences:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(differences))


def check_training_state(checkpoint: dict, path: Path, steps_per_epoch: int) -> None:
    """Raise CheckpointError when the progress a checkpoint records cannot be this run's (a damaged
    or hand-edited file): training from it would run epochs that do not exist, or write a CSV it
    cannot hold, and fail only after an epoch of work."""
    epoch, step, history = checkpoint["epoch"], checkpoint.get("step", 0), checkpoint["history"]
    partial = checkpoint.get("partial")  # the epoch's sums so far when it stopped mid-epoch
    if epoch < 0:
        raise CheckpointError(f"cannot resume from {path}: malformed training state (epoch {epoch})")
    trained_with = checkpoint.get("steps_per_epoch", steps_per_epoch)  # absent from earlier versions' files
    if not is_whole(trained_with):  # a tensor of several values made the comparison below a traceback
        raise CheckpointError(f"cannot resume from {path}: malformed training state "
                              f"(steps per epoch: a {type(trained_with).__name__}, not a whole number)")
    if trained_with != steps_per_epoch:  # the schedule counts steps: it would jump ahead or back
        raise CheckpointError(f"cannot resume from {path}: it trained {trained_with} steps per epoch, the "
                              f"training split now gives {steps_per_epoch} (an image became readable or unreadable "
                              "since, or data.pipeline counts unreadable images differently)")
    problems = []
    if not is_whole(step) or not 0 <= step < steps_per_epoch:
        problems.append(f"step {clipped_repr(step)} (an epoch has {steps_per_epoch})")
    elif step and not (isinstance(partial, torch.Tensor) and partial.shape == (4,) and unusual_layout(partial) is None):
        # weights_only also loads meta and sparse tensors: training failed with a traceback adding to them
        problems.append("no sums for the partial epoch")
    elif step and not bool(torch.isfinite(partial).all()):  # training would blame its first step's loss
        problems.append("the partial epoch's sums hold NaN or infinite values")
    rows_ok = isinstance(history, list) and all(
        isinstance(row, dict) and all(isinstance(row.get(column), Real) for column in METRICS_COLUMNS)
        for row in history)
    if not rows_ok or [row["epoch"] for row in history] != list(range(1, epoch + 1)):
        problems.append(f"the metrics history does not hold one row for each of the {epoch} epochs")
    best_epoch = checkpoint["best_epoch"]
    if not is_whole(best_epoch) or not 0 <= best_epoch <= epoch:
        problems.append(f"best epoch {clipped_repr(best_epoch)}")
    best_val_top1 = checkpoint["best_val_top1"]
    if not isinstance(best_val_top1, Real) or not math.isfinite(best_val_top1):
        problems.append(f"best val top-1 {clipped_repr(best_val_top1)}")  # a NaN best would never be beaten
    if problems:
        raise CheckpointError(f"cannot resume from {path}: malformed training state ({'; '.join(problems)})")


# ---------------------------------------------------------------------------------------------
# Reading and restoring


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    # One state per GPU the saving process saw; a run resumed on fewer GPUs (or on the CPU) restores
    # those it has. Training's own draws (batches, augmentation, dropout) are seeded per step; these
    # states are what other code drawing from the global generators continues from.
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def restore(checkpoint: dict, path: Path, model, optimizer, scheduler, scaler, runtime: Runtime) -> RunState:
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"cannot resume from {path}: its weights do not fit the model the config describes "
                              f"({state_dict_problem(exc)})") from None
    try:
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        scheduler.load_state_dict(checkpoint["scheduler_state"])
        # The stored rate is the checkpoint's schedule's next one; a raised trainer.max_epochs redraws the
        # schedule from this step on, the first step included (it ran at the finished run's floor).
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        if checkpoint["scaler_state"]:  # empty from a run without fp16 (bf16, fp32): a new scaler starts
            scaler.load_state_dict(checkpoint["scaler_state"])
        restore_rng(checkpoint["rng"])
        return RunState(epoch=checkpoint["epoch"], step=checkpoint.get("step", 0),
                        partial=checkpoint.get("partial") if runtime.dist.is_main else None,
                        best_val_top1=checkpoint["best_val_top1"], best_epoch=checkpoint["best_epoch"],
                        history=list(checkpoint["history"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:  # a damaged or crafted state
        raise CheckpointError(f"cannot resume from {path}: malformed training state "
                              f"({type(exc).__name__}: {clipped(first_line(exc))})") from None


def read_resume_checkpoint(argument: str | None, paths: RunPaths) -> tuple[Path | None, dict | None]:
    """The checkpoint `--resume` names ('auto': the run's last one, if any) and its contents."""
    if argument is None or (argument == "auto" and not paths.last.is_file()):
        return None, None
    path = paths.last if argument == "auto" else Path(argument)
    checkpoint = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it lacks the training state to continue "
                              f"(missing {', '.join(missing)})")
    check_not_going_back(path, checkpoint, paths)
    return path, checkpoint


def epoch_and_step(checkpoint: dict) -> tuple:
    """(epochs done, steps into the next): how far a checkpoint's run had come."""
    return checkpoint.get("epoch", 0), checkpoint.get("step", 0)


def describe_progress(checkpoint: dict) -> str:
    epoch, step = epoch_and_step(checkpoint)
    return f"epoch {epoch}" + (f", step {step} of epoch {epoch + 1}" if step else "")


def check_not_going_back(path: Path, checkpoint: dict, paths: RunPaths) -> None:
    """`--resume artifacts/<name>_best.pt` (or an older copy) continues under this run's files and
    replaces its `_last.pt`: where that file had come further, the later epochs were lost without a
    word (the CSV rewritten without them). Refused; the `_last.pt` is what resumes."""
    if not paths.last.is_file() or path.resolve() == paths.last.resolve():
        return
    try:  # two numbers are needed, not the weights: memory-mapped, they are never read
        last = safe_torch_load(paths.last, mmap=True)
    except CheckpointError:  # a damaged file: nothing a resume could continue from
        return
    if not isinstance(last, dict):
        return  # not a checkpoint either
    came_to, resumes_at = epoch_and_step(last), epoch_and_step(checkpoint)
    if not all(is_whole(number) for number in (*came_to, *resumes_at)):
        return  # a damaged file; check_training_state names a malformed `checkpoint`
    if came_to > resumes_at:
        raise CheckpointError(f"cannot resume from {path} ({describe_progress(checkpoint)}): it would replace "
                              f"{paths.last}, which has come further ({describe_progress(last)}); resume that "
                              f"one (--resume auto), or move it away first to go back to "
                              f"{describe_progress(checkpoint)}")


def bring_best_along(checkpoint: dict, resume_path: Path, paths: RunPaths, state: RunState, runtime: Runtime) -> None:
    """Resuming a checkpoint under other files (a new name or output_dir): its run's best epoch becomes
    this run's `_best.pt`. Where that epoch's weights cannot be found, the best is chosen afresh among
    the epochs trained from here, rather than the run ending with a `_best.pt` that is missing or
    another run's."""
    if state.best_epoch == 0:
        return
    old_best = RunPaths(resume_path.parent, checkpoint["config"].get("name")).best
    if state.best_epoch == state.epoch and state.step == 0:  # the checkpoint itself is that epoch
        source = resume_path
    elif old_best.is_file() and epoch_of_this_run(old_best, state.history) == state.best_epoch:
        source = old_best
    else:
        runtime.print(f"note: epoch {state.best_epoch}, the best of {resume_path}, is not beside it in "
                      f"{old_best.name} (missing, damaged, of another epoch or another run's); {paths.best} will "
                      "be the best of the epochs trained from here")
        state.best_val_top1, state.best_epoch = -1.0, 0
        return
    if source.resolve() != paths.best.resolve():
        copy_best_epoch(source, resume_path, paths)
    runtime.print(f"note: {paths.best} is epoch {state.best_epoch}, the best so far, from {source}")


def copy_best_epoch(source: Path, resume_path: Path, paths: RunPaths) -> None:
    """Copy `source`, the best epoch of the checkpoint resumed, to the run's `_best.pt`, atomically."""
    try:
        with atomic.atomic_destination(paths.best) as temporary:
            shutil.copyfile(source, temporary)
    except OSError as exc:  # a full disk, say: the command's other file errors are one line too
        raise CheckpointError(f"cannot resume from {resume_path}: could not copy its best epoch ({source}) "
                              f"to {paths.best} ({exc.strerror or exc})") from None


def epoch_of_this_run(path: Path, history: list[dict]) -> int | None:
    """The epoch `path` holds when it is an epoch's end in the run whose metrics history is `history`
    (its own history is the start of that one), else None: missing, damaged, stopped mid-epoch, another
    run's (an earlier run of the same name: its rows differ, in their seconds at least), or an epoch
    past `history`'s end. None is no reason to refuse a resume: the best is then chosen afresh."""
    try:
        saved = load_checkpoint(path, mmap=True)
    except CheckpointError:
        return None
    epoch, step, its_history = saved["epoch"], saved.get("step", 0), saved.get("history")
    if not (is_whole(step) and step == 0 and 1 <= epoch <= len(history) and isinstance(its_history, list)
            and len(its_history) == epoch):
        return None
    # Compared as text: a NaN (a validation loss that overflowed) equals itself, and the tensors a crafted
    # file may hold compare without raising. Floats are written exactly, so their text is equal when they are.
    return epoch if repr(its_history) == repr(history[:epoch]) else None


def starting_state(checkpoint: dict | None, resume_path: Path | None, paths: RunPaths, trained: tuple,
                   config: Config, runtime: Runtime) -> RunState:
    """A new run's state, or the checkpoint's, restored into `trained` (model, optimizer, scheduler,
    scaler); the same on every process. Says which, and what a new run replaces."""
    state = RunState() if checkpoint is None else restore(checkpoint, resume_path, *trained, runtime)
    # Each process reads --resume itself: on machines that do not share trainer.output_dir they would
    # start from different points and combine gradients of different steps.
    if not dist_utils.same_on_all_ranks([state.epoch, state.step], runtime.dist, runtime.device):
        raise CheckpointError(f"cannot resume: the {runtime.dist.world_size} processes found different "
                              f"checkpoints (this one: {resume_path or 'none'}, {state.epoch} epochs done); "
                              f"every machine must see the same {resume_path or paths.last} "
                              "(trainer.output_dir on shared storage)")
    # Continuing this run's own `_last.pt`, not a checkpoint taken on under other files.
    own_last = checkpoint is not None and resume_path.resolve() == paths.last.resolve()
    if own_last and runtime.dist.is_main:
        mend_metrics_csv(paths, state, runtime)
        mend_best_file(paths, state, runtime)
    if checkpoint is not None and state.epoch == config.trainer.max_epochs:
        runtime.print(f"{resume_path} has finished all {state.epoch} epochs: nothing to train "
                      "(raise trainer.max_epochs to train longer)")
    elif checkpoint is not None:
        runtime.print(f"resumed from {resume_path} at epoch {state.epoch + 1}"
                      + (f", step {state.step}" if state.step else ""))
        planned, now = flatten(checkpoint["config"]).get("trainer.max_epochs"), config.trainer.max_epochs
        if planned is not None and planned != now and config.trainer.schedule == "cosine":
            # Told by the rates, not the lengths: a run extended while still warming up keeps its rate.
            then, rate = checkpoint["optimizer_state"]["param_groups"][0]["lr"], trained[1].param_groups[0]["lr"]
            change = ("it rises again: a warm restart" if rate > then else "it falls faster" if rate < then
                      else "the same at this step")
            runtime.print(f"note: trainer.max_epochs {planned} -> {now}: from here the learning rate follows the "
                          f"cosine of a {now}-epoch run (lr {then:.5f} -> {rate:.5f}: {change})")
        if runtime.dist.is_main and not own_last:
            bring_best_along(checkpoint, resume_path, paths, state, runtime)
    elif paths.last.is_file():  # the guide's command starts from scratch; say what it will replace
        runtime.print(f"note: starting a new run, which replaces the earlier run's {paths.last}, {paths.best.name} "
                      f"and {paths.metrics.name}; to continue that run instead, resume it (--resume auto)")
    # Rank 0 alone mends or brings along the best epoch (it alone writes the files), which may change it:
    # every rank takes rank 0's, so that all return the same state and compare the next epochs with one best.
    best_epoch, state.best_val_top1 = dist_utils.from_rank_0([state.best_epoch, state.best_val_top1], runtime.dist,
                                                             runtime.device)
    state.best_epoch = int(best_epoch)
    return state


def mend_metrics_csv(paths: RunPaths, state: RunState, runtime: Runtime) -> None:
    """A save writes `_last.pt`, then the CSV: a run killed in between (kill -9), or whose CSV write
    failed (a full disk), left a CSV an epoch behind, which nothing rewrote when that epoch was the run's
    last (a resume trains nothing). Resuming its `_last.pt`, a CSV that differs from that checkpoint's
    history is rewritten from it now."""
    expected = metrics_csv_text(state.history)
    try:
        if paths.metrics.read_text(encoding="utf-8") == expected:
            return
    except FileNotFoundError:  # deleted by hand: the next save writes it (a finished run's resume writes nothing)
        return
    except (OSError, ValueError):  # unreadable or not UTF-8: damaged, rewritten like a stale one
        pass
    try:
        write_metrics_csv(paths.metrics, state.history)
    except OSError as exc:
        raise CheckpointError(f"cannot resume: could not rewrite {paths.metrics} from the checkpoint's history "
                              f"({exc.strerror or exc})") from None
    runtime.print(f"note: rewrote {paths.metrics} from the history of the checkpoint resumed ({state.epoch} "
                  "epochs): it did not match (a run killed, or stopped by a full disk, while saving)")


def mend_best_file(paths: RunPaths, state: RunState, runtime: Runtime) -> None:
    """A save writes `_last.pt`, then `_best.pt` (`CheckpointSaver._write`): a run killed in between, or
    whose `_best.pt` write failed (a full disk), left `_last.pt` holding its best epoch and `_best.pt` an
    older one, or an earlier run's. Resuming that `_last.pt`, it is copied to `_best.pt`. A `_best.pt`
    that is not the epoch `_last.pt` names otherwise (removed or replaced by hand, or left by a version
    that wrote `_best.pt` first) is not kept as if it were: an epoch of this run's history becomes the
    best so far; anything else, and the best is chosen afresh among the epochs trained from here."""
    if state.best_epoch == 0:  # no best epoch yet: a `_best.pt` there is not this run's (a stop says so)
        return
    held = epoch_of_this_run(paths.best, state.history)
    if held == state.best_epoch:
        return
    if state.best_epoch == state.epoch and state.step == 0:  # `_last.pt` is that epoch
        copy_best_epoch(paths.last, paths.last, paths)
        runtime.print(f"note: {paths.best} is epoch {state.best_epoch}, the best so far, copied from {paths.last}: "
                      f"{paths.best.name} did not hold it (a run stopped between writing the two, by kill -9 or a "
                      "full disk, or a file removed)")
        return
    named = state.best_epoch
    if held is not None:
        state.best_epoch, state.best_val_top1 = held, state.history[held - 1]["val_top1"]
        runtime.print(f"note: {paths.best} holds epoch {held}, not epoch {named}, the best that {paths.last} names; "
                      f"epoch {held} (val top1={state.best_val_top1:.4f}) is the best so far")
    else:
        state.best_val_top1, state.best_epoch = -1.0, 0
        runtime.print(f"note: epoch {named}, the best that {paths.last} names, is not in {paths.best} (missing, "
                      f"damaged or another run's); {paths.best} will be the best of the epochs trained from here")
