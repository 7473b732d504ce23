"""Train an identification model from a config: `python -m src.training.train --config <yaml>`.

Read top to bottom: `make_runtime` -> `load_data` -> `build_model_and_optimizer` -> `wrap_for_training`,
then per epoch (in `fit`) `train_one_epoch`, `validate`, `RunState.record_epoch` and
`CheckpointSaver.save` (a snapshot, written in the background when due). Resuming (`starting_state`) is
in `resume.py`, stopping on a signal (`StopRequest`) in `stopping.py`, the lock on the run's files
(`claim_outputs`) in `outputs.py`. Works unchanged under `torchrun --nproc_per_node N`.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

if __name__ == "__main__" and not __package__:
    # Run as a file, `python src/training/train.py` (the guide calls train.py the training script), the
    # `src` imports below fail: go on as the guide's command, `python -m src.training.train`, instead.
    _repository = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (_repository, os.environ.get("PYTHONPATH"))))
    os.execv(sys.executable, [sys.executable, "-m", "src.training.train", *sys.argv[1:]])

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from src.config import Config, ConfigError, config_from_dict, load_config
from src.data.dataset import ClassIndex, DatasetError, PreparedData, data_fingerprint
from src.data.loaders import IGNORED, BatchSource, build_source, mixed_seed
from src.errors import (INTERRUPTED_EXIT, TERMINATED_EXIT, Terminated, capped, command_parser, first_line,
                        option_errors_returned, out_of_memory, path_argument, show_warnings, sigterm_raises)
from src.models.backbones import ModelError
from src.models.factory import create_model
from src.models.trained import FORMAT_VERSION, CheckpointError
from src.tables import drop_stdout, progress_bar
from src.training import distributed as dist_utils
from src.training.artifacts import RunPaths, epoch_line
from src.training.checkpoint import CheckpointSaver, Snapshot, device_snapshot
from src.training.outputs import claim_outputs
from src.training.resume import (RunState, check_resume_compatible, check_training_state, read_resume_checkpoint,
                                 rng_state, starting_state)
from src.training.stopping import StopRequest, TrainingStopped

# Devices on which the checkpoint's weights are snapshotted every epoch while validation runs, kept if
# the epoch is saved and dropped if not. The ~300 copies (resnet18 and its AdamW state) queue behind
# validation, so launching them costs no GPU time: on an H200 resnet18 went from 88.8% to 90.4% of its
# ceiling, its epoch's share outside training and validation from 2.2% to 0.5%. On the CPU a copy is
# the work itself, so it is made only for an epoch that is saved; the same holds on a GPU with no room
# for the copy (`device_snapshot` gives None: a copy to the host would wait every epoch).
SNAPSHOT_DURING_VALIDATION = {"cuda"}

# Non-finite losses are detected on the device and checked every this many steps: one host sync per
# 50 steps costs nothing measurable, while a sync every step would stall the GPU queue.
NONFINITE_CHECK_EVERY = 50
# torch.compile modes that capture CUDA graphs -> the same without them. CUDA graphs and DDP's gradient
# hooks are a combination PyTorch's tracker lists open bugs for (e.g. pytorch/pytorch#128218, #139207):
# under torchrun the mode without graphs runs instead, so that one config serves one GPU and several.
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


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
    output_lost: OSError | None = None  # why stdout could not be written; `fit` then stops, saved
    compile_mode: str = "default"  # trainer.compile_mode, or its form without CUDA graphs under torchrun

    def autocast(self):
        """Mixed precision as configured (fp32 when amp_dtype is None)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def print(self, *args, **kwargs) -> None:
        """On the main process. A stdout that cannot be written (its pipe closed: `| head`, a pager
        quit; a full disk) must not end the run with a traceback and lose the epochs not yet saved:
        its output is dropped from then on, and the run stops after the epoch, saved (`fit`)."""
        if self.dist.is_main and self.output_lost is None:
            try:
                print(*args, **kwargs, flush=True)
            except OSError as exc:
                self.output_lost = exc
                drop_stdout()


@dataclass
class EpochSums:
    """Running sums kept on the device, so no step waits for the GPU to report a number. A
    non-finite loss makes the loss sum non-finite, which is how the loop detects it."""

    totals: torch.Tensor  # [loss x n, top-1 hits, top-5 hits, n], float64
    lr: float = 0.0

    @classmethod
    def zeros(cls, device) -> "EpochSums":
        return cls(torch.zeros(4, dtype=torch.float64, device=device))

    def add(self, stats: torch.Tensor) -> None:
        self.totals += stats

    def finite(self, runtime: Runtime) -> bool:
        """True unless the loss sum is non-finite on any rank (a host sync: call it sparingly)."""
        return not dist_utils.any_rank(not bool(torch.isfinite(self.totals[0])), runtime.dist, runtime.device)

    def reduced_state(self, runtime: Runtime) -> torch.Tensor:
        """The sums over all ranks, on the CPU (what a mid-epoch checkpoint stores)."""
        return dist_utils.all_reduce_sum(self.totals.clone(), runtime.dist).cpu()

    @classmethod
    def from_state(cls, state: torch.Tensor, device) -> "EpochSums":
        return cls(state.double().to(device))

    def means(self, runtime: Runtime) -> dict[str, float | int]:
        """Mean loss, top-1 and top-5 over the labelled images, and their number (`images`)."""
        loss, top1, top5, count = dist_utils.all_reduce_sum(self.totals.clone(), runtime.dist).tolist()
        images, count = int(count), max(count, 1.0)
        return {"loss": loss / count, "top1": top1 / count, "top5": top5 / count, "images": images}


# ---------------------------------------------------------------------------------------------
# Set-up


def resume_argument(text: str) -> str:
    """`auto` or a checkpoint's path, as given; an empty one is refused (`path_argument`)."""
    path_argument(text)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("src.training.train", __doc__)
    parser.add_argument("--config", required=True, type=path_argument, help="YAML config (see configs/)")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT|auto", type=resume_argument,
                        help="continue from a checkpoint; 'auto' takes <trainer.output_dir>/<name>_last.pt if present")
    return parser.parse_args(argv)


def make_runtime(config: Config) -> Runtime:
    """The run's device, process group and arithmetic; first refuses what they cannot run."""
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
    if config.trainer.sync_batchnorm and info.enabled and device.type != "cuda":
        raise ConfigError("trainer.sync_batchnorm: SyncBatchNorm runs on CUDA only; set it to false on the CPU")
    # TF32 for what autocast leaves in fp32 (and for fp32 runs): on Ampere and later GPUs several
    # times faster, at a precision training does not notice. Evaluation and inference turn it off for
    # their passes (devices.reproducible_arithmetic).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    amp_dtype = None
    if config.trainer.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if config.trainer.amp_dtype == "bf16" else torch.float16
    stats = batch_stats
    if config.trainer.compile and device.type == "cuda":
        # A dozen small metric kernels per step become one (launches are what cost on a GPU).
        stats = torch.compile(batch_stats, dynamic=False)
    compile_mode = config.trainer.compile_mode
    if info.enabled and config.trainer.compile and compile_mode in WITHOUT_CUDA_GRAPHS:
        compile_mode = WITHOUT_CUDA_GRAPHS[compile_mode]
    runtime = Runtime(device, info, amp_dtype, stats, compile_mode=compile_mode)
    if info.enabled:
        runtime.print(f"torchrun: {info.world_size} process(es), {torch.distributed.get_backend()}, global batch "
                      f"{config.trainer.batch_size} ({config.trainer.batch_size // info.world_size} per process)")
    if compile_mode != config.trainer.compile_mode:
        runtime.print(f"note: trainer.compile_mode '{config.trainer.compile_mode}' captures CUDA graphs, which this "
                      f"project uses in a single process only: compiling in '{compile_mode}' mode under torchrun")
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
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace (PyTorch's reproducibility notes). It reads
        # this when it starts, at the first matrix product, after this point; a user's own value wins.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def load_data(config: Config, data: PreparedData,
              runtime: Runtime) -> tuple[ClassIndex, BatchSource, BatchSource, str]:
    if data.standins:
        runtime.print(f"note: {config.data.root} holds stand-in images (synthetic, not chimpanzees): its numbers "
                      "say nothing about chimpanzees")
    lists = data.splits(["train", "val"], open_set=config.data.open_set)  # of one prepare
    train_rows, val_rows = lists["train"], lists["val"]
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


# trainer.optimizer -> a builder from (parameter groups, trainer config). AdamW is fused, on CUDA and
# on the CPU alike: one kernel for the whole update instead of a few per parameter tensor (on one CPU
# thread resnet18's step took 60 ms, fused 8 ms). SGD is Nesterov where it has momentum; torch refuses
# Nesterov without it, and momentum 0 is a valid config (plain SGD).
OPTIMIZERS = {
    "adamw": lambda groups, trainer: torch.optim.AdamW(groups, lr=trainer.lr, fused=True),
    "sgd": lambda groups, trainer: torch.optim.SGD(groups, lr=trainer.lr, momentum=trainer.momentum,
                                                   nesterov=trainer.momentum > 0),
}


def build_model_and_optimizer(config: Config, num_classes: int, runtime: Runtime, steps_per_epoch: int,
                              resuming: bool = False):
    # Resuming, the checkpoint's weights replace any pretrained ones: those need not be downloadable
    # (a node offline) nor still on disk.
    model = create_model(config.model.model_copy(update={"pretrained": False}) if resuming else config.model,
                         num_classes)
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
    optimizer = OPTIMIZERS[config.trainer.optimizer](groups, config.trainer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps_per_epoch))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    return model, optimizer, scheduler, scaler


def wrap_for_training(model: torch.nn.Module, config: Config, runtime: Runtime):
    """The callables that run a training step and an evaluation step.

    Training: DDP around the model, torch.compile around that. Evaluation bypasses DDP, which may
    run collectives in a forward, while ranks can hold different numbers of validation batches;
    `evaluate` shares rank 0's buffers once instead.
    dynamic=False: training batches have one shape, and validation batches another (the source pads
    them to one size, `BatchSource.pad`), so no kernel needs to be shape-generic.
    """
    compile_ = (partial(torch.compile, dynamic=False, mode=runtime.compile_mode)
                if config.trainer.compile else (lambda module: module))
    if not runtime.dist.enabled:
        runner = compile_(model)
        return runner, runner
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return compile_(DistributedDataParallel(model, device_ids=device_ids)), compile_(model)


# ---------------------------------------------------------------------------------------------
# Epochs


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
        sums = EpochSums.from_state(state.partial, runtime.device)
    check_every = NONFINITE_CHECK_EVERY if runtime.device.type == "cuda" else 1
    bar = _progress(len(source), start, config, runtime, f"epoch {epoch}")
    for step, (images, labels) in enumerate(source.batches(epoch, start), start):
        if config.model.dropout:
            # Dropout draws from torch's global generators. Seeded per step and rank: with one seed for
            # the run, every torchrun rank drew the same masks; and a resumed run draws those it would
            # have. Only with dropout: a seeding is a host call in the step's path (~0.2 ms on the CPU).
            torch.manual_seed(mixed_seed(config.trainer.seed, epoch, step, runtime.dist.rank))
        with runtime.autocast():
            # logits: the class scores, which the top-1/top-5 rank; loss_logits: the same with the
            # head's margin at each image's label (ArcFace; a linear head has none): what the loss trains.
            _, logits, loss_logits = runner(images, labels)
        loss = F.cross_entropy(loss_logits, labels, label_smoothing=config.trainer.label_smoothing)
        sums.add(runtime.batch_stats(loss.detach(), logits.detach(), labels))
        if (step + 1) % check_every == 0 and not sums.finite(runtime):
            raise non_finite_loss(f"epoch {epoch} near step {step + 1}", runtime)
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
    if not sums.finite(runtime):  # the steps since the last check
        raise non_finite_loss(f"epoch {epoch}", runtime)
    return sums


def non_finite_loss(where: str, runtime: Runtime) -> TrainingStopped:
    # fp16's narrow range overflows where bf16's does not; in bf16 or fp32 (the CPU) only the rate helps.
    other_remedy = " or trainer.amp_dtype: bf16" if runtime.amp_dtype == torch.float16 else ""
    return TrainingStopped(f"non-finite loss in {where}; stopped without saving this epoch (the last good "
                           f"checkpoint is kept). Try a lower trainer.lr{other_remedy}", exit_code=3)


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


# ---------------------------------------------------------------------------------------------
# Main


def run(config: Config | dict, resume: str | None = None) -> RunState:
    """Train as configured (a Config, or a dict of sections as in a YAML file); returns the final
    state. Raises ConfigError, DatasetError, ModelError, CheckpointError or TrainingStopped."""
    # A Config is validated again as a whole, as a dict is: a key set in Python is checked alone
    # (max_epochs lowered below warmup_epochs passed) and `model_copy(update=...)` checks nothing.
    # Unnamed (built in Python, no file to name the run after), it is named `run`.
    config = config_from_dict(config.model_dump() if isinstance(config, Config) else config)
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
    model, optimizer, scheduler, scaler = build_model_and_optimizer(config, len(classes), runtime, len(train_source),
                                                                    resuming=checkpoint is not None)
    state = starting_state(checkpoint, resume_path, paths, (model, optimizer, scheduler, scaler), config, runtime)
    if state.epoch == config.trainer.max_epochs:  # resumed from a finished run
        return state
    train_runner, eval_runner = wrap_for_training(model, config, runtime)
    stop.install(second_signal_exits=not runtime.dist.enabled)

    saver = CheckpointSaver(paths, config.trainer.checkpoint_interval_s, enabled=runtime.dist.is_main)

    def build_checkpoint(with_weights: bool) -> dict:
        return checkpoint_dict(model, optimizer, scheduler, scaler, state, config, classes, fingerprint,
                               len(train_source), with_weights)

    max_epochs = config.trainer.max_epochs
    previous_row_at = time.perf_counter()
    with pending_best_written_on_failure(saver, paths, runtime):
        for epoch in range(state.epoch + 1, max_epochs + 1):
            started = time.perf_counter()
            sums = train_one_epoch(train_runner, model, train_source, optimizer, scheduler, scaler, epoch,
                                   state, config, runtime, stop)
            if state.step < len(train_source):  # a stop request ended the epoch: save its steps and sums so far
                state.partial = sums.reduced_state(runtime)
                saver.save(build_checkpoint, improved=False, force=True)
                saver.wait()
                earlier_best = state.best_epoch == 0 and paths.best.is_file()  # this run has no best epoch yet
                raise stop.stopped(f"in epoch {epoch} after step {state.step}/{len(train_source)}", paths.last,
                                   f" ({paths.best.name} is still the earlier run's)" if earlier_best else "")
            train = sums.means(runtime)  # waits for the device: train_seconds is the steps' own
            validation_started = time.perf_counter()
            val, early_weights = validate(eval_runner, model, optimizer, val_source, data, config, runtime)
            now = time.perf_counter()
            # `seconds` runs from the previous epoch's row, so that epoch's checkpoint snapshot and epoch
            # line count too: the epochs' seconds add up to the run's wall time after set-up.
            row = epoch_row(epoch, sums.lr, train, val, seconds=now - previous_row_at,
                            train_seconds=validation_started - started, val_seconds=now - validation_started,
                            skipped_images=skipped_images((train_source, val_source), runtime))
            previous_row_at = now
            improved = state.record_epoch(row)
            report_epoch(row, max_epochs, runtime)
            if runtime.output_lost is not None and epoch < max_epochs:  # the last epoch is saved anyway
                stop.request("SIGPIPE", f"stdout could not be written: {runtime.output_lost}")
            stopping = stop.agreed(runtime)  # all ranks stop after this epoch, or none does
            saver.save(build_checkpoint, improved, force=epoch == max_epochs or stopping, weights=early_weights)
            if stopping:
                saver.wait()
                raise stop.stopped(f"after epoch {epoch}", paths.last)
    saver.wait()
    runtime.print(f"done: best val top1={state.best_val_top1:.4f} at epoch {state.best_epoch}; "
                  f"{paths.best}, {paths.last}, {paths.metrics}")
    return state


@contextmanager
def pending_best_written_on_failure(saver: CheckpointSaver, paths: RunPaths, runtime: Runtime):
    """A non-finite loss (TrainingStopped), images found unreadable mid-run (DatasetError: a
    training batch, or the validation pass, with none readable) or memory running out (the GPU's or
    the host's) passes through after the best epoch held in memory is written: the run loses none of the good
    epochs before it. (A stop request's forced save has written it already.)"""
    try:
        yield
    except (TrainingStopped, DatasetError, torch.OutOfMemoryError, MemoryError):
        written = saver.write_pending_best()
        if written is not None:
            runtime.print(f"wrote epoch {written} (the best so far) to {paths.best} and {paths.last}")
        raise


def validate(runner, model, optimizer, source: BatchSource, data: PreparedData, config: Config,
             runtime: Runtime) -> tuple[dict[str, float | int], Snapshot | None]:
    """The epoch's validation means, and its weights snapshotted while validation still runs on the
    device (SNAPSHOT_DURING_VALIDATION, on rank 0, which alone writes; None elsewhere)."""
    sums = evaluate(runner, model, source, config, runtime)
    early_weights = (device_snapshot(weights_dict(model, optimizer))
                     if runtime.dist.is_main and runtime.device.type in SNAPSHOT_DURING_VALIDATION else None)
    val = sums.means(runtime)
    if val["images"] == 0:  # the plain pipeline finds unreadable images only when it reads them
        raise no_validation_images(source.num_images, data, config)
    return val, early_weights


def skipped_images(sources: tuple[BatchSource, ...], runtime: Runtime) -> int:
    """The epoch's unreadable images on all ranks: each rank finds those of its own share as it decodes
    them (plain pipeline); those left out of the cache are every rank's `left_out`, counted once."""
    found = torch.tensor(sum(source.skipped - source.left_out for source in sources), device=runtime.device)
    return int(dist_utils.all_reduce_sum(found, runtime.dist).item()) + sum(source.left_out for source in sources)


def epoch_row(epoch: int, lr: float, train: dict, val: dict, *, seconds: float, train_seconds: float,
              val_seconds: float, skipped_images: int) -> dict:
    """The epoch's row of `RunState.history`. The times are kept there (not in the guide's CSV):
    the speed benchmark reads them."""
    return {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
            "train_top5": train["top5"], "val_loss": val["loss"], "val_top1": val["top1"],
            "val_top5": val["top5"], "seconds": seconds, "train_seconds": train_seconds,
            "val_seconds": val_seconds, "skipped_images": skipped_images}


def report_epoch(row: dict, max_epochs: int, runtime: Runtime) -> None:
    runtime.print(epoch_line(row, max_epochs))
    if row["skipped_images"]:
        runtime.print(f"  warning: {row['skipped_images']} unreadable images skipped this epoch")


def _report(message: str, all_ranks_agree: bool) -> None:
    """Print an error line. Under torchrun: rank 0 alone for what every rank agreed on (a stop),
    else every rank, tagged with its own, since an error of one process must never go unsaid."""
    try:
        rank = dist_utils.whole_number_from_environment("RANK", "0")
    except ConfigError:  # the error being reported is init_distributed's, naming RANK
        rank = 0
    if rank == 0 or not all_ranks_agree:
        # One write of the whole line: print() writes the text and its newline separately, and
        # lines of ranks failing at the same moment ran into each other.
        try:
            sys.stderr.write(("" if rank == 0 else f"[rank {rank}] ") + message + "\n")
            sys.stderr.flush()
        except OSError:  # stderr on the pipe that closed (`2>&1 | head`): the exit code still says it
            pass


@option_errors_returned
def main(argv=None) -> int:
    args = parse_args(argv)
    show_warnings()
    try:
        config = load_config(args.config)
        with sigterm_raises():
            run(config, args.resume)
    except (ConfigError, DatasetError, ModelError, CheckpointError) as exc:
        _report(f"error: {exc}", all_ranks_agree=False)
        return 2
    except torch.OutOfMemoryError as exc:  # CUDA's; the CPU's allocator raises a plain RuntimeError
        _report(f"error: the GPU ran out of memory ({first_line(exc)}): lower trainer.batch_size or data.image_size",
                all_ranks_agree=False)
        return 2
    except MemoryError as exc:  # the host's: e.g. the plain pipeline decoding an image too large for it
        _report(out_of_memory(exc), all_ranks_agree=False)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:  # before training started (then StopRequest handles them)
        name, code = ("SIGTERM", TERMINATED_EXIT) if isinstance(exc, Terminated) else ("SIGINT", INTERRUPTED_EXIT)
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
