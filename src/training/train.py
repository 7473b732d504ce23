"""Train an identification model from a config: `python -m src.training.train --config <yaml>`.

Read top to bottom: `make_runtime` -> `load_data` -> `build_model_and_optimizer` -> `wrap_for_training`,
then per epoch (in `fit`) `train_one_epoch`, `evaluate` and `CheckpointSaver.save` (a snapshot, written
in the background when due). Works unchanged under `torchrun --nproc_per_node N`.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from src import atomic, locks
from src.config import Config, ConfigError, config_from_dict, load_config
from src.data.dataset import ClassIndex, DatasetError, PreparedData
from src.data.loaders import IGNORED, BatchSource, build_source
from src.errors import capped, first_line, state_dict_problem
from src.models.backbones import ModelError
from src.models.factory import create_model
from src.tables import progress_bar
from src.training import distributed as dist_utils
from src.training.artifacts import RunPaths, epoch_line
from src.training.checkpoint import (FORMAT_VERSION, CheckpointError, CheckpointSaver, device_snapshot,
                                     load_checkpoint)
from src.training.resume import check_resume_compatible, check_training_state, data_fingerprint

# Devices on which the checkpoint's weights are snapshotted every epoch while validation runs, kept if
# the epoch is saved and dropped if not. The ~300 copies (resnet18 and its AdamW state) queue behind
# validation, so launching them costs no GPU time: on an H200 resnet18 went from 88.8% to 90.4% of its
# ceiling, its epoch's share outside training and validation from 2.2% to 0.5%. On the CPU a copy is
# the work itself, so it is made only for an epoch that is saved; the same holds on a GPU with no room
# for the copy (`device_snapshot` gives None: a copy to the host would wait every epoch).
SNAPSHOT_DURING_VALIDATION = {"cuda"}

# What a checkpoint needs beyond load_checkpoint's keys to continue training (evaluation needs none).
RESUME_KEYS = ("optimizer_state", "scheduler_state", "scaler_state", "rng", "best_val_top1", "best_epoch", "history")
# Non-finite losses are detected on the device and checked every this many steps: one host sync per
# 50 steps costs nothing measurable, while a sync every step would stall the GPU queue.
NONFINITE_CHECK_EVERY = 50
# torch.compile modes that capture CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class TrainingStopped(Exception):
    """Raised to end a run early with a message and an exit code (after saving what can be saved).
    `resumable`: the run's last checkpoint continues it (`run(config, resume="auto")`)."""

    def __init__(self, message: str, exit_code: int, resumable: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.resumable = resumable


def batch_stats(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss x n, top-1 hits, top-5 hits, n] of one batch's n labelled rows (padding rows, labelled
    IGNORED, count nowhere), float64, on the device. `loss`: the mean over the labelled rows."""
    count = (labels != IGNORED).sum().double()
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # never for IGNORED
    return torch.stack([loss.double() * count, hits[:, 0].sum().double(), hits.any(dim=1).sum().double(), count])


@dataclass
class Runtime:
    device: torch.device
    dist: dist_utils.DistInfo
    amp_dtype: torch.dtype | None  # None: fp32
    batch_stats: Callable = batch_stats

    def autocast(self):
        """Mixed precision as configured (fp32 when amp_dtype is None)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def print(self, *args, **kwargs) -> None:
        if self.dist.is_main:
            print(*args, **kwargs, flush=True)


@dataclass
class EpochSums:
    """Running sums kept on the device, so no step waits for the GPU to report a number. A
    non-finite loss makes the loss sum non-finite, which is how the loop detects it."""

    totals: torch.Tensor  # [loss x n, top-1 hits, top-5 hits, n], float64
    steps: int = 0
    lr: float = 0.0

    @classmethod
    def zeros(cls, device) -> "EpochSums":
        return cls(torch.zeros(4, dtype=torch.float64, device=device))

    def add(self, stats: torch.Tensor) -> None:
        self.totals += stats
        self.steps += 1

    def finite(self, runtime: Runtime) -> bool:
        """True unless the loss sum is non-finite on any rank (a host sync: call it sparingly)."""
        return not dist_utils.any_rank(not bool(torch.isfinite(self.totals[0])), runtime.dist, runtime.device)

    def reduced_state(self, runtime: Runtime) -> torch.Tensor:
        """The sums over all ranks, on the CPU (what a mid-epoch checkpoint stores)."""
        return dist_utils.all_reduce_sum(self.totals.clone(), runtime.dist).cpu()

    @classmethod
    def from_state(cls, state: torch.Tensor, steps: int, device) -> "EpochSums":
        return cls(state.double().to(device), steps=steps)

    def means(self, runtime: Runtime) -> dict[str, float | int]:
        """Mean loss, top-1 and top-5 over the labelled images, and their number (`images`)."""
        loss, top1, top5, count = dist_utils.all_reduce_sum(self.totals.clone(), runtime.dist).tolist()
        images, count = int(count), max(count, 1.0)
        return {"loss": loss / count, "top1": top1 / count, "top5": top5 / count, "images": images}


@dataclass
class RunState:
    """Everything that continues across epochs and must survive a resume."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps of epoch `epoch + 1` when stopped mid-epoch
    partial: torch.Tensor | None = None  # EpochSums.reduced_state() of that partial epoch
    best_val_top1: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Set-up


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT|auto",
                        help="continue from a checkpoint; 'auto' takes artifacts/<name>_last.pt if present")
    return parser.parse_args(argv)


def make_runtime(config: Config) -> Runtime:
    wanted = config.trainer.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'cuda' requested but no CUDA GPU is available; set trainer.device: cpu")
    info = dist_utils.init_distributed(wanted)
    device = torch.device(wanted, info.local_rank) if wanted == "cuda" else torch.device("cpu")
    batch = config.trainer.batch_size
    if batch % info.world_size:
        raise ConfigError(f"trainer.batch_size: {batch} (the global batch) does not divide among "
                          f"{info.world_size} processes; use a multiple of {info.world_size}")
    if batch // info.world_size < 2:
        raise ConfigError(f"trainer.batch_size: {batch} gives each of the {info.world_size} processes "
                          f"{batch // info.world_size} image a step; BatchNorm needs at least 2")
    # TF32 for what autocast leaves in fp32 (and for fp32 runs): on Ampere and later GPUs several
    # times faster, at a precision training does not notice. Evaluation turns it off again.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    amp_dtype = None
    if config.trainer.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if config.trainer.amp_dtype == "bf16" else torch.float16
    if info.enabled and config.trainer.compile and config.trainer.compile_mode in CUDA_GRAPH_MODES:
        # CUDA graphs and DDP's gradient hooks are a combination PyTorch's tracker lists open bugs for
        # (e.g. pytorch/pytorch#128218, #139207); refuse it rather than hang or crash mid-run.
        raise ConfigError(f"trainer.compile_mode: '{config.trainer.compile_mode}' uses CUDA graphs, which "
                          "this project runs in a single process only; use 'default' under torchrun")
    if config.trainer.sync_batchnorm and info.enabled and device.type != "cuda":
        raise ConfigError("trainer.sync_batchnorm: SyncBatchNorm runs on CUDA only; set it to false on the CPU")
    # Compiled, a dozen small metric kernels per step become one (launches are what cost on a GPU).
    stats = torch.compile(batch_stats, dynamic=False) if config.trainer.compile and device.type == "cuda" else batch_stats
    runtime = Runtime(device, info, amp_dtype, stats)
    if info.enabled:
        runtime.print(f"torchrun: {info.world_size} process(es), {torch.distributed.get_backend()}, global batch "
                      f"{config.trainer.batch_size} ({config.trainer.batch_size // info.world_size} per process)")
    if config.trainer.amp and device.type == "cpu":
        runtime.print("note: trainer.amp applies to CUDA only; training in fp32 on the CPU")
    return runtime


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # Both ways, so that an earlier deterministic run in the same process does not carry over.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def load_data(config: Config, data: PreparedData,
              runtime: Runtime) -> tuple[ClassIndex, BatchSource, BatchSource, str]:
    train_rows = data.split("train", open_set=config.data.open_set)
    val_rows = data.split("val", open_set=config.data.open_set)
    classes = ClassIndex.from_rows(train_rows)
    if len(classes) != config.data.num_classes:
        raise ConfigError(f"data.num_classes: config says {config.data.num_classes} but the prepared "
                          f"training split under {config.data.root} has {len(classes)} individuals")
    unknown = sorted({name for _, name in val_rows} - set(classes.names))
    if unknown:
        raise DatasetError(f"validation split has individuals absent from training: {unknown[:5]}")
    common = dict(device=runtime.device, rank=runtime.dist.rank, world_size=runtime.dist.world_size,
                  dtype=runtime.amp_dtype or torch.float32)
    train = build_source(config, train_rows, data.raw_dir, classes, train=True, **common)
    val = build_source(config, val_rows, data.raw_dir, classes, train=False, pad=True, **common)
    if train.num_images == 0:
        raise DatasetError(f"none of the {len(train_rows)} training images could be read under {data.raw_dir} "
                           f"(raw_dir of {config.data.root}/annotations/prepared.json): were they moved or deleted?")
    if len(train) == 0:
        raise ConfigError(f"trainer.batch_size: {config.trainer.batch_size} is larger than the "
                          f"{train.num_images} training images")
    if val.num_images == 0:
        raise no_validation_images(len(val_rows), data, config)
    images_per_class = torch.bincount(train.labels.cpu(), minlength=len(classes))
    unlearnable = [classes.names[i] for i in (images_per_class == 0).nonzero().flatten().tolist()]
    if unlearnable:  # the cache left out its unreadable images (the plain pipeline finds them later)
        runtime.print(f"warning: {len(unlearnable)} individual(s) have no readable training image, so the model "
                      f"cannot learn them: {capped(unlearnable)}")
    return classes, train, val, data_fingerprint(train_rows, classes)


def no_validation_images(listed: int, data: PreparedData, config: Config) -> DatasetError:
    """Without a validation image every epoch would score 0 and `_best.pt` be chosen on nothing."""
    split = "open_set/val" if config.data.open_set else "val"
    where = (f"the {split} split of {config.data.root} is empty" if listed == 0 else
             f"none of the {listed} images of the {split} split could be read under {data.raw_dir}")
    return DatasetError(f"{where}: there is nothing to validate the epochs on (re-run prepare)")


def lr_lambda(config: Config, steps_per_epoch: int):
    """Multiplier of trainer.lr at a step: linear warm-up, then cosine decay (or constant)."""
    warmup = int(config.trainer.warmup_epochs * steps_per_epoch)
    total = config.trainer.max_epochs * steps_per_epoch
    floor = config.trainer.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.trainer.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_model_and_optimizer(config: Config, num_classes: int, runtime: Runtime, steps_per_epoch: int):
    model = create_model(config.model, num_classes)
    if config.trainer.sync_batchnorm and runtime.dist.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if config.trainer.channels_last else torch.contiguous_format
    model = model.to(runtime.device, memory_format=memory_format)
    decay, no_decay = [], []
    for parameter in model.parameters():
        # Norm layers and biases are not weight-decayed (standard for ResNets and AdamW).
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.trainer.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.trainer.optimizer == "adamw":
        # fused: one kernel for the whole update on CUDA instead of a few per parameter tensor.
        optimizer = torch.optim.AdamW(groups, lr=config.trainer.lr, fused=runtime.device.type == "cuda")
    else:
        optimizer = torch.optim.SGD(groups, lr=config.trainer.lr, momentum=config.trainer.momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps_per_epoch))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    return model, optimizer, scheduler, scaler


def wrap_for_training(model: torch.nn.Module, config: Config, runtime: Runtime):
    """The callables that run a training step and an evaluation step.

    Training: DDP around the model, torch.compile around that. Evaluation bypasses DDP, which may
    run collectives in a forward, while ranks can hold different numbers of validation batches;
    `evaluate` shares rank 0's buffers once instead.
    dynamic=False: training batches have one shape; the last, smaller validation batch costs one
    extra compilation instead of making every kernel shape-generic.
    """
    compile_ = (partial(torch.compile, dynamic=False, mode=config.trainer.compile_mode)
                if config.trainer.compile else (lambda module: module))
    if not runtime.dist.enabled:
        runner = compile_(model)
        return runner, runner
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return compile_(DistributedDataParallel(model, device_ids=device_ids)), compile_(model)


# ---------------------------------------------------------------------------------------------
# Epochs


class StopRequest:
    """Once installed, SIGINT/SIGTERM set a flag; the loop stops at the next step boundary and
    saves. A second signal ends the process at once (a user pressing Ctrl-C twice means it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}
        self.second_signal_exits = True

    def install(self, second_signal_exits: bool) -> None:
        """Python delivers signals to the main thread only: called from another thread this
        installs nothing, and stopping that run is its caller's business.

        `second_signal_exits`: true in a single process (Ctrl-C twice ends it). Under torchrun a
        repeated signal is the same stop delivered twice (a scheduler signals every process of the
        job, and torchrun forwards its own), and torchrun's --shutdown-timeout is the hard stop."""
        self.second_signal_exits = second_signal_exits
        if threading.current_thread() is threading.main_thread():
            # A signal the caller ignores stays ignored: a shell starts background jobs (`cmd &`,
            # nohup) with SIGINT ignored, and a Ctrl-C meant for the shell must not stop them.
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                              if signal.getsignal(sig) is not signal.SIG_IGN}

    def uninstall(self) -> None:
        """Give back the caller's handlers: `run()` called from a notebook or a script must not
        leave Ctrl-C setting a flag that nothing reads any more."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:
            if self.second_signal_exits:
                sys.stderr.write(f"error: stopped at once by a second {signal.Signals(signum).name}, without "
                                 "saving this epoch; the checkpoints written before are kept (--resume auto "
                                 "continues from the last)\n")
                raise SystemExit(128 + signum)
            return
        self.signal_name = signal.Signals(signum).name

    def stopped(self, where: str, saved: Path, note: str = "") -> TrainingStopped:
        """The error that ends a run stopped by the signal (exit 130 for SIGINT, 143 for SIGTERM)."""
        return TrainingStopped(f"stopped by {self.signal_name} {where}; saved {saved}{note}",
                               exit_code=130 if self.signal_name == "SIGINT" else 143, resumable=True)

    def requested(self, step: int, runtime: Runtime) -> bool:
        """Single process: checked every step. Under torchrun the ranks agree every 10 steps, so all
        of them stop at the same step (a signal may reach them at slightly different times)."""
        if runtime.dist.enabled and (step + 1) % 10:
            return False
        return self.agreed(runtime)

    def agreed(self, runtime: Runtime) -> bool:
        """Whether any rank has a stop request; every rank then takes the signal's name (a signal
        sent to one process stops them all, with the same message and exit code)."""
        code = signal.Signals[self.signal_name].value if self.signal_name else 0
        code = int(dist_utils.max_over_ranks([code], runtime.dist, runtime.device)[0])
        if code and self.signal_name is None:
            self.signal_name = signal.Signals(code).name
        return bool(code)


def _progress(total: int, initial: int, config: Config, runtime: Runtime, desc: str):
    show = config.trainer.progress == "always" or (config.trainer.progress == "auto" and sys.stderr.isatty())
    return progress_bar(total, desc, show and runtime.dist.is_main, initial=initial)


def train_one_epoch(runner, model, source: BatchSource, optimizer, scheduler, scaler, epoch: int,
                    state: RunState, config: Config, runtime: Runtime, stop: StopRequest) -> EpochSums:
    """Runs epoch `epoch` from `state.step`; returns its sums. On a stop request, returns early with
    `state.step` < len(source) so the caller can save a mid-epoch checkpoint."""
    model.train()
    start = state.step
    sums = EpochSums.zeros(runtime.device)
    if start and state.partial is not None:  # resumed mid-epoch: rank 0 carries the sums so far
        sums = EpochSums.from_state(state.partial, start, runtime.device)
    check_every = NONFINITE_CHECK_EVERY if runtime.device.type == "cuda" else 1
    bar = _progress(len(source), start, config, runtime, f"epoch {epoch}")
    for step, (images, labels) in enumerate(source.batches(epoch, start), start):
        with runtime.autocast():
            _, logits, loss_logits = runner(images, labels)
        loss = F.cross_entropy(loss_logits, labels, label_smoothing=config.trainer.label_smoothing)
        sums.add(runtime.batch_stats(loss.detach(), logits.detach(), labels))
        if (step + 1) % check_every == 0 and not sums.finite(runtime):
            raise TrainingStopped(
                f"non-finite loss in epoch {epoch} near step {step + 1}; stopped without saving this "
                f"epoch (the last good checkpoint is kept). Try a lower trainer.lr or trainer.amp_dtype: bf16",
                exit_code=3)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.trainer.grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.trainer.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        sums.lr = optimizer.param_groups[0]["lr"]  # the rate this step used, shown in the epoch line
        scheduler.step()
        bar.update()
        state.step = step + 1
        if stop.requested(step, runtime):
            break
    bar.close()
    if not sums.finite(runtime):
        raise TrainingStopped(f"non-finite loss in epoch {epoch}; stopped without saving this epoch "
                              "(the last good checkpoint is kept). Try a lower trainer.lr", exit_code=3)
    return sums


@torch.no_grad()
def evaluate(runner, model, source: BatchSource, config: Config, runtime: Runtime) -> EpochSums:
    model.eval()
    dist_utils.broadcast_buffers(model, runtime.dist)  # evaluate the model rank 0 saves
    sums = EpochSums.zeros(runtime.device)
    bar = _progress(len(source), 0, config, runtime, "validate")
    for images, labels in source.batches(0):  # padded to one size, with IGNORED rows
        with runtime.autocast():
            _, logits, loss_logits = runner(images, labels.clamp(min=0))  # the head gathers at each label
        sums.add(runtime.batch_stats(F.cross_entropy(loss_logits, labels, ignore_index=IGNORED), logits, labels))
        bar.update()
    bar.close()
    return sums


# ---------------------------------------------------------------------------------------------
# Checkpoints


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
    # those it has. Only dropout draws from these: batches and augmentation have their own seeds.
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def weights_dict(model, optimizer) -> dict:
    """The checkpoint's tensors that live on the training device."""
    return {"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict()}


def checkpoint_dict(model, optimizer, scheduler, scaler, state: RunState, config: Config, classes: ClassIndex,
                    fingerprint: str, steps_per_epoch: int, with_weights: bool = True) -> dict:
    """The whole checkpoint; without `weights_dict`'s part if not `with_weights`."""
    return {"format_version": FORMAT_VERSION, **(weights_dict(model, optimizer) if with_weights else {}),
            "scheduler_state": scheduler.state_dict(),
            "scaler_state": scaler.state_dict(), "epoch": state.epoch, "step": state.step,
            "partial": state.partial, "best_val_top1": state.best_val_top1, "best_epoch": state.best_epoch,
            "history": state.history, "config": config.to_dict(), "classes": classes.to_list(),
            "data_fingerprint": fingerprint, "steps_per_epoch": steps_per_epoch, "rng": rng_state()}


def restore(checkpoint: dict, path: Path, model, optimizer, scheduler, scaler, runtime: Runtime) -> RunState:
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"cannot resume from {path}: its weights do not fit the model the config describes "
                              f"({state_dict_problem(exc)})") from None
    try:
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        scheduler.load_state_dict(checkpoint["scheduler_state"])
        scaler.load_state_dict(checkpoint["scaler_state"])
        restore_rng(checkpoint["rng"])
        return RunState(epoch=checkpoint["epoch"], step=checkpoint.get("step", 0),
                        partial=checkpoint.get("partial") if runtime.dist.is_main else None,
                        best_val_top1=checkpoint["best_val_top1"], best_epoch=checkpoint["best_epoch"],
                        history=list(checkpoint["history"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a damaged or crafted training state
        raise CheckpointError(f"cannot resume from {path}: malformed training state "
                              f"({type(exc).__name__}: {first_line(exc)})") from None


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
    return path, checkpoint


def bring_best_along(checkpoint: dict, resume_path: Path, paths: RunPaths, state: RunState, runtime: Runtime) -> None:
    """Resuming a checkpoint under other files (a new name or output_dir): its run's best epoch becomes
    this run's `_best.pt`. Where that epoch's weights cannot be found, the best is chosen afresh among
    the epochs trained from here, rather than the run ending with a `_best.pt` that is missing or
    another run's."""
    if state.best_epoch == 0:
        return
    old_best = resume_path.parent / f"{checkpoint['config'].get('name')}_best.pt"
    if state.best_epoch == state.epoch and state.step == 0:  # the checkpoint itself is that epoch
        source = resume_path
    elif old_best.is_file() and load_checkpoint(old_best)["epoch"] == state.best_epoch:
        source = old_best
    else:
        runtime.print(f"note: epoch {state.best_epoch}, the best of {resume_path}, is not beside it in "
                      f"{old_best.name}; {paths.best} will be the best of the epochs trained from here")
        state.best_val_top1, state.best_epoch = -1.0, 0
        return
    if source.resolve() != paths.best.resolve():
        with atomic.atomic_destination(paths.best) as temporary:
            shutil.copyfile(source, temporary)
    runtime.print(f"note: {paths.best} is epoch {state.best_epoch}, the best so far, from {source}")


# ---------------------------------------------------------------------------------------------
# Main


@contextmanager
def claim_outputs(paths: RunPaths, runtime: Runtime):
    """Hold `<output_dir>/.<name>.lock` for the run (rank 0, which alone writes): a second run of
    the same name into the same folder would interleave its checkpoints and CSV with this one's."""
    with ExitStack() as stack:
        held, locked, unwritable = False, False, None
        if runtime.dist.is_main:
            try:
                locked = stack.enter_context(locks.exclusive(paths.lock, wait=False))  # False: no flock here
            except locks.LockHeld:
                held = True
            except OSError as exc:  # output_dir is under a file, or cannot be created or written
                unwritable = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror or type(exc).__name__
        # Every rank stops, not rank 0 alone (the others would wait for it in the first collective).
        held, failed = dist_utils.max_over_ranks([held, unwritable is not None], runtime.dist, runtime.device)
        if failed:
            raise ConfigError(f"trainer.output_dir: cannot write in {paths.output_dir} "
                              f"({unwritable or 'on rank 0'})")
        if held:
            raise CheckpointError(f"another run is training '{paths.name}' into {paths.output_dir} (it holds "
                                  f"{paths.lock}); wait for it to end, or give this run another name or "
                                  "trainer.output_dir")
        if locked:  # no write of these files can be in progress
            for leftover in (left for path in (paths.best, paths.last, paths.metrics)
                             for left in atomic.remove_leftovers(path)):
                runtime.print(f"note: removed {leftover}, a partial write of a run that was killed")
        yield


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
    if checkpoint is not None and state.epoch == config.trainer.max_epochs:
        runtime.print(f"{resume_path} has finished all {state.epoch} epochs: nothing to train "
                      "(raise trainer.max_epochs to train longer)")
    elif checkpoint is not None:
        runtime.print(f"resumed from {resume_path} at epoch {state.epoch + 1}"
                      + (f", step {state.step}" if state.step else ""))
        if runtime.dist.is_main and resume_path.resolve() != paths.last.resolve():
            bring_best_along(checkpoint, resume_path, paths, state, runtime)
    elif paths.last.is_file():  # the guide's command starts from scratch; say what it will replace
        runtime.print(f"note: starting a new run, which replaces the earlier run's {paths.last}, {paths.best.name} "
                      f"and {paths.metrics.name}; to continue that run instead, resume it (--resume auto)")
    return state


def run(config: Config | dict, resume: str | None = None) -> RunState:
    """Train as configured (a Config, or a dict of sections as in a YAML file); returns the final
    state. Raises ConfigError, DatasetError, ModelError, CheckpointError or TrainingStopped."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    elif config.name is None:  # built in Python: no file to name the run after
        config = config.model_copy(update={"name": "run"})
    runtime = make_runtime(config)
    data = PreparedData.load(config.data.root)  # before claiming outputs: a wrong data.root creates no folder
    paths = RunPaths(config.trainer.output_dir, config.name)
    stop = StopRequest()
    try:
        with claim_outputs(paths, runtime):
            return fit(config, data, runtime, paths, resume, stop)
    finally:
        stop.uninstall()


def fit(config: Config, data: PreparedData, runtime: Runtime, paths: RunPaths, resume: str | None,
        stop: StopRequest) -> RunState:
    seed_everything(config.trainer.seed, config.trainer.deterministic)
    resume_path, checkpoint = read_resume_checkpoint(resume, paths)
    classes, train_source, val_source, fingerprint = load_data(config, data, runtime)
    if checkpoint is not None:
        check_resume_compatible(checkpoint, config, classes, fingerprint, resume_path)
        check_training_state(checkpoint, resume_path, len(train_source))
    model, optimizer, scheduler, scaler = build_model_and_optimizer(config, len(classes), runtime, len(train_source))
    state = starting_state(checkpoint, resume_path, paths, (model, optimizer, scheduler, scaler), config, runtime)
    if state.epoch == config.trainer.max_epochs:  # resumed from a finished run
        return state
    train_runner, eval_runner = wrap_for_training(model, config, runtime)
    stop.install(second_signal_exits=not runtime.dist.enabled)

    saver = CheckpointSaver(paths, config.trainer.checkpoint_interval_s, enabled=runtime.dist.is_main)

    def checkpoint(with_weights: bool) -> dict:
        return checkpoint_dict(model, optimizer, scheduler, scaler, state, config, classes, fingerprint,
                               len(train_source), with_weights)

    max_epochs = config.trainer.max_epochs
    previous_row_at = time.perf_counter()
    for epoch in range(state.epoch + 1, max_epochs + 1):
        started = time.perf_counter()
        try:
            sums = train_one_epoch(train_runner, model, train_source, optimizer, scheduler, scaler, epoch,
                                   state, config, runtime, stop)
        except TrainingStopped:
            written = saver.write_pending_best()
            if written is not None:
                runtime.print(f"wrote epoch {written} (the best so far) to {paths.best} and {paths.last}")
            raise
        if state.step < len(train_source):
            state.partial = sums.reduced_state(runtime)
            saver.save(checkpoint, improved=False, force=True)
            saver.wait()
            earlier_best = state.best_epoch == 0 and paths.best.is_file()  # this run has no best epoch yet
            raise stop.stopped(f"in epoch {epoch} after step {state.step}/{len(train_source)}", paths.last,
                               f" ({paths.best.name} is still the earlier run's)" if earlier_best else "")
        train = sums.means(runtime)  # waits for the device: train_seconds is the steps' own
        validation_started = time.perf_counter()
        val_sums = evaluate(eval_runner, model, val_source, config, runtime)
        early_weights = (device_snapshot(weights_dict(model, optimizer))
                         if saver.enabled and runtime.device.type in SNAPSHOT_DURING_VALIDATION else None)
        val = val_sums.means(runtime)
        if val["images"] == 0:  # the plain pipeline finds unreadable images only when it reads them
            saver.write_pending_best()  # images deleted mid-run: the good epochs held in memory are kept
            raise no_validation_images(val_source.num_images, data, config)
        now = time.perf_counter()
        # The times are kept in the history (not the guide's CSV): the speed benchmark reads them.
        # `seconds` runs from the previous epoch's row, so that epoch's checkpoint snapshot and epoch
        # line count too: the epochs' seconds add up to the run's wall time after set-up.
        row = {"epoch": epoch, "lr": sums.lr, "train_loss": train["loss"], "train_top1": train["top1"],
               "train_top5": train["top5"], "val_loss": val["loss"], "val_top1": val["top1"],
               "val_top5": val["top5"], "seconds": now - previous_row_at,
               "train_seconds": validation_started - started, "val_seconds": now - validation_started,
               "skipped_images": train_source.skipped + val_source.skipped}
        previous_row_at = now
        state.history.append(row)
        state.epoch, state.step, state.partial = epoch, 0, None
        improved = val["top1"] > state.best_val_top1
        if improved:
            state.best_val_top1, state.best_epoch = val["top1"], epoch
        stopping = stop.agreed(runtime)  # all ranks stop after this epoch, or none does
        saver.save(checkpoint, improved, force=epoch == max_epochs or stopping, weights=early_weights)
        runtime.print(epoch_line(row, max_epochs))
        if row["skipped_images"]:
            runtime.print(f"  warning: {row['skipped_images']} unreadable images skipped this epoch")
        if stopping:
            saver.wait()
            raise stop.stopped(f"after epoch {epoch}", paths.last)
    saver.wait()
    runtime.print(f"done: best val top1={state.best_val_top1:.4f} at epoch {state.best_epoch}; "
                  f"{paths.best}, {paths.last}, {paths.metrics}")
    return state


def _report(message: str, all_ranks_agree: bool) -> None:
    """Print an error line. Under torchrun: rank 0 alone for what every rank agreed on (a stop),
    else every rank, tagged with its own, since an error of one process must never go unsaid."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or not all_ranks_agree:
        # One write of the whole line: print() writes the text and its newline separately, and
        # lines of ranks failing at the same moment ran into each other.
        sys.stderr.write(("" if rank == 0 else f"[rank {rank}] ") + message + "\n")
        sys.stderr.flush()


class Terminated(Exception):
    """SIGTERM before training started (`sigterm_raises`)."""


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated until `StopRequest` takes over, as Ctrl-C raises KeyboardInterrupt.
    Its default ends the process on the spot: silently, leaving the image cache's worker processes
    and fork server running, where an exception stops the workers and exits with one line."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(_signum, _frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        with sigterm_raises():
            run(config, args.resume)
    except (ConfigError, DatasetError, ModelError, CheckpointError) as exc:
        _report(f"error: {exc}", all_ranks_agree=False)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:  # before training started (then StopRequest handles them)
        name, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("SIGINT", 130)
        _report(f"error: stopped by {name} before training started; no checkpoint was written", all_ranks_agree=False)
        return code
    except TrainingStopped as exc:
        command = ("the same torchrun command with" if dist_utils.launched_by_torchrun()
                   else f"python -m src.training.train --config {args.config}")
        hint = f". Resume with: {command} --resume auto"
        _report(f"error: {exc}" + (hint if exc.resumable else ""), all_ranks_agree=True)
        return exc.exit_code
    finally:
        dist_utils.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
