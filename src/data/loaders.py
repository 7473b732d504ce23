"""Batch sources: what the training loop iterates, for both data pipelines.

A source yields `(images, labels)` already on the training device: images normalised, channels_last
(unless `trainer.channels_last: false`), float32 or autocast's dtype; labels int64. Both pipelines
share everything but where the uint8 pixels come from:

- `cached`: every image is decoded once into a memory-mapped uint8 cache (`src/data/cache.py`), kept
  in GPU memory on CUDA; a step is one gather plus batch augmentation on the device.
- `plain`: DataLoader workers decode and resize every image every epoch (for datasets too large
  to cache); the uint8 batch then goes through the same device augmentation.

The order of images and every augmentation draw are functions of (seed, epoch, step, rank) alone,
never of a global RNG, the number of workers or processes, or where a run was resumed: a run interrupted at any
step and resumed sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import logging
import math
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from src.config import Config, ConfigError
from src.data.augment import BatchAugment
from src.data.cache import load_or_build_cache
from src.data.decode import cache_size_for
from src.data.dataset import ClassIndex, DatasetError, ImageListDataset, collate_skip_none
from src.parallel import WorkerDied

log = logging.getLogger(__name__)


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (SplitMix-style mixing keeps nearby tuples unrelated).

    Written out rather than numpy's SeedSequence: a few integer operations per training step, and
    every batch order and augmentation draw depends on it, so checkpoints resume exactly only as long
    as it stays this function."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**64 - 1)
        value = (value * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return value >> 1


# The label of padding rows: F.cross_entropy's default ignore_index, so that the loss leaves them out.
IGNORED = -100


def batch_plan(num_images: int, batch_size: int, *, train: bool, seed: int, epoch: int,
               rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """Index batches for one rank and epoch.

    Training: a seeded permutation cut into global batches of `batch_size` (the last partial one
    dropped, so BatchNorm never sees a batch of one and compiled shapes stay fixed); each rank takes
    its contiguous slice of every global batch, so the images in a global step do not depend on the
    number of processes. Evaluation: every image exactly once, ranks taking interleaved shares, in
    the fewest batches of at most `batch_size // world_size` (a rank's share of the global batch)
    whose sizes differ by one at most (a source with `pad` pads the smaller ones by a row).
    """
    if train:
        generator = torch.Generator().manual_seed(mixed_seed(seed, epoch))
        order = torch.randperm(num_images, generator=generator)
        per_rank = batch_size // world_size
        return [order[start + rank * per_rank: start + (rank + 1) * per_rank]
                for start in range(0, num_images - batch_size + 1, batch_size)]
    mine = torch.arange(num_images)[rank::world_size]
    return list(mine.tensor_split(math.ceil(len(mine) / max(1, batch_size // world_size)))) if len(mine) else []


def pad_batch(images: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch grown to `size` rows by repeating its last image, labelled IGNORED. Indexing keeps
    the images' memory format (a cat with an expanded row would make them contiguous, and a compiled
    function would compile again for the other strides)."""
    if len(labels) >= size:
        return images, labels
    rows = torch.arange(size, device=labels.device)
    index = rows.clamp(max=len(labels) - 1)
    return images[index], torch.where(rows < len(labels), labels[index], IGNORED)


@dataclass
class BatchSource:
    """One split as batches on the device; `skipped` counts unreadable images of the last epoch:
    `left_out` (left out of the cache when it was built) plus those found while decoding (plain).

    `pad` (evaluation only): every batch padded to the plan's largest with IGNORED rows, before the
    augmentation, so that compiled functions (the augmentation, the model) see one shape: one
    compilation and one CUDA graph, where a last, smaller batch would cost a compilation of its own.
    """

    labels: torch.Tensor
    augment: BatchAugment
    train: bool
    batch_size: int
    seed: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
    left_out: int = 0
    skipped: int = 0
    pad: bool = False

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def plan(self, epoch: int) -> list[torch.Tensor]:
        return batch_plan(self.num_images, self.batch_size, train=self.train, seed=self.seed,
                          epoch=epoch, rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        """Batches per epoch, as `plan` makes them (without a training plan's random permutation)."""
        return self.num_images // self.batch_size if self.train else len(self.plan(0))

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped = self.left_out
        plan = self.plan(epoch)
        size = max(map(len, plan), default=0)
        for step, (pixels, labels) in enumerate(self._pixels(plan[start_step:]), start_step):
            if self.train:
                # Draw for the whole global batch and keep this rank's slice: a sample's
                # augmentation does not depend on the number of processes.
                generator = torch.Generator(self.device).manual_seed(mixed_seed(self.seed, epoch, step))
                uniform = self.augment.draw(self.batch_size, generator, self.device)
                start = self.rank * (self.batch_size // self.world_size)
                yield self.augment.apply_uniform(pixels, uniform[start:start + len(pixels)]), labels
            else:
                if self.pad:  # also a batch the plain pipeline found an unreadable image in
                    pixels, labels = pad_batch(pixels, labels, size)
                yield self.augment.eval(pixels), labels

    def _pixels(self, plan: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


@dataclass(kw_only=True)  # a field without a default after BatchSource's defaults
class CachedSource(BatchSource):
    images: torch.Tensor  # N x S x S x 3 uint8, on the device or memory-mapped on the host

    def _pixels(self, plan):
        if not plan:
            return
        # One host-to-device copy of the epoch's indices, not one per step.
        on_device = torch.cat(plan).to(self.device).split([len(batch) for batch in plan])
        if self.images.device.type == self.device.type:
            pixels = (self.images[indices] for indices in on_device)
        else:  # the cache in host memory, training on the GPU
            pixels = staged_batches(self.images, plan, self.device)
        yield from zip(pixels, (self.labels[indices] for indices in on_device))


# Pinned buffers of the host-cache path: one being gathered while up to two wait for their copy.
STAGING_SLOTS = 3


def staged_batches(images: torch.Tensor, plan: list[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """`images[indices]` for each batch of `plan`, on `device`, from a cache in host memory.

    A background thread gathers the next batch from the memory map into one of a few pinned buffers
    while the current one trains; each is copied to the GPU asynchronously (pageable memory would
    make every copy wait). Only these buffers are pinned, never the whole cache: host memory stays
    the cache's page cache plus a few batches. A buffer is refilled only once the GPU has copied it.
    The gather is NumPy's `take` (mode "clip" writes straight into the buffer; "raise" goes through a
    temporary): 1.8 ms for 128 images at 256 px on 2 cores (median of 15), where "raise" took 5.5 ms,
    `torch.index_select` into the buffer 5-10 ms and plain indexing (a new tensor each time) 24 ms.
    """
    cuda = device.type == "cuda"  # tests run this on the CPU: no pinned memory, no events there
    shape = (max(len(batch) for batch in plan), *images.shape[1:])
    buffers = [torch.empty(shape, dtype=images.dtype, pin_memory=cuda) for _ in range(STAGING_SLOTS)]
    copied: list[torch.cuda.Event | None] = [None] * STAGING_SLOTS
    source = images.numpy()

    def gather(step: int) -> torch.Tensor:
        slot = step % STAGING_SLOTS
        if copied[slot] is not None:
            copied[slot].synchronize()  # the GPU has finished copying what this buffer held
        staging = buffers[slot][:len(plan[step])]
        np.take(source, plan[step].numpy(), axis=0, out=staging.numpy(), mode="clip")  # indices are valid
        return staging

    with ThreadPoolExecutor(1, thread_name_prefix="cache-gather") as pool:
        pending = pool.submit(gather, 0)
        for step in range(len(plan)):
            staging = pending.result()
            pixels = staging.to(device, non_blocking=True)
            if cuda:  # the copy runs on `device`'s stream, which need not be the current device's (cuda:N)
                copied[step % STAGING_SLOTS] = torch.cuda.Event()
                copied[step % STAGING_SLOTS].record(torch.cuda.current_stream(device))
            if step + 1 < len(plan):
                pending = pool.submit(gather, step + 1)
            yield pixels


@dataclass(kw_only=True)
class PlainSource(BatchSource):
    dataset: ImageListDataset  # decodes with the cache's own resize, unreadable images -> None
    workers: int = 0

    def _pixels(self, plan):
        loader = DataLoader(self.dataset, batch_sampler=plan, num_workers=self.workers,
                            collate_fn=collate_skip_none, pin_memory=self.device.type == "cuda",
                            worker_init_fn=leave_sigterm_to_the_main_process)
        with sigterm_held():  # the workers start here, and inherit the held SIGTERM
            batches = iter(loader)
        try:
            for pixels, labels, skipped in batches:
                self.skipped += skipped
                if self.train and skipped:
                    pixels, labels = refill(pixels, labels, skipped)
                if len(labels):
                    yield pixels.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        finally:
            # Stopped now, not when the iterator is collected: a worker's exception re-raised here (a
            # MemoryError) holds it in a reference cycle until after exit's join of the workers, which
            # ignore SIGTERM (`leave_sigterm_to_the_main_process`), so the command hung after its error.
            # torch has no public call for this (its iterator's __del__ makes the same one).
            if self.workers:
                batches._shutdown_workers()


def refill(pixels: torch.Tensor, labels: torch.Tensor, missing: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch back to its size after `missing` unreadable images were left out, by
    repeating the readable ones: BatchNorm cannot train on one image, compiled shapes stay fixed, and
    under torchrun every process must take every step."""
    if not len(labels):
        raise DatasetError(f"all {missing} images of a training batch could not be read (see the warnings "
                           "above): were the raw images moved or deleted? Prepare the data again")
    again = torch.arange(missing) % len(labels)
    return torch.cat([pixels, pixels[again]]), torch.cat([labels, labels[again]])


def leave_sigterm_to_the_main_process(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM. A batch scheduler signals every process of a job, and torch's
    workers die of a SIGTERM not sent by their parent, which makes torch raise in the main process
    (`DataLoader worker ... is killed by signal`) in the middle of a step: a traceback instead of
    training's stop at the step boundary with a checkpoint, after which the workers end as at every
    epoch's end. A SIGTERM that came before this ran was held (`sigterm_held`) and is dropped now."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextmanager
def sigterm_held() -> Iterator[None]:
    """SIGTERM blocked in this thread for the block, delivered at its end. Processes forked in the
    block start with it blocked: torch's worker handler, installed before `worker_init_fn` runs,
    would otherwise die of a SIGTERM that arrives in between."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no fork, no signal masks
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# Where `trainer.compile` compiles the augmentation too: its compiled form is written for inductor's GPU
# kernels (`augment._fused`); on the CPU the eager library kernels run.
COMPILED_AUGMENTATION_DEVICES = ("cuda",)


def build_source(config: Config, rows: list[tuple[str, str]], raw_dir: Path, classes: ClassIndex, *,
                 train: bool, device: torch.device, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, pad: bool = False,
                 batch_size: int | None = None) -> BatchSource:
    """The batch source for one split, as `data.pipeline` asks; images of `dtype` (training under
    autocast passes its dtype: the model's first layer would cast to it anyway); `pad`: see
    BatchSource; `batch_size`: other than `trainer.batch_size` (evaluation's, from 1: the model in eval
    mode needs no two images for BatchNorm)."""
    cache_size = cache_size_for(config.data.image_size)
    memory_format = torch.channels_last if config.trainer.channels_last else torch.contiguous_format
    augment = BatchAugment(config.augment, config.data.image_size, dtype, memory_format)
    if config.trainer.compile and device.type in COMPILED_AUGMENTATION_DEVICES:
        # Fuses the ~70 small kernels of a batch's augmentation into a few: on a fast GPU their
        # launches cost about as much host time as a resnet18 step.
        augment.apply_uniform = torch.compile(augment.apply_uniform, dynamic=False)
        if pad:  # training's validation: one shape. Evaluation's splits, each with batches of its own sizes,
            # stay eager: a compilation per shape costs seconds, the launches it would save over a split milliseconds.
            augment.eval = torch.compile(augment.eval, dynamic=False)
    common = dict(augment=augment, train=train, pad=pad,
                  batch_size=config.trainer.batch_size if batch_size is None else batch_size,
                  seed=config.trainer.seed, device=device,
                  rank=rank, world_size=world_size)
    if config.data.pipeline == "plain":
        dataset = ImageListDataset(rows, raw_dir, classes, cache_size)
        labels = torch.tensor(dataset.labels, dtype=torch.long, device=device)
        return PlainSource(labels=labels, dataset=dataset, workers=config.data.workers, **common)
    try:
        cached = load_or_build_cache(rows, raw_dir, config.data.cache_folder, cache_size, config.data.workers)
    except OSError as exc:  # images that cannot be read are left out inside; this is the cache folder itself
        raise ConfigError(f"data.cache_dir: cannot write the image cache in {config.data.cache_folder} "
                          f"({exc})") from None
    except WorkerDied as exc:
        raise ConfigError(f"data.workers: building the image cache, {exc}") from None
    kept = np.asarray(cached.kept, dtype=np.int64)
    labels = torch.tensor([classes.index(rows[i][1]) for i in kept], dtype=torch.long, device=device)
    images = cached.images
    if device.type == "cuda" and config.data.cache_on_device:
        images = cache_on_gpu(images, device)  # else it stays memory-mapped: CachedSource stages each batch
    return CachedSource(labels=labels, images=images, left_out=len(cached.failed), **common)


def cache_on_gpu(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole cache copied into `device`'s memory; one too large for it stays in host memory (as
    with `data.cache_on_device: false`) with a warning, rather than ending the run with a traceback."""
    try:
        return images.to(device)
    except torch.OutOfMemoryError:
        log.warning("the image cache (%.2f GiB) does not fit in the free memory of %s: it stays in host memory "
                    "and each batch is copied over (data.cache_on_device: false skips the attempt)",
                    images.nbytes / 2**30, device)
        return images
