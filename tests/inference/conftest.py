"""Fixtures for the inference tests: stand-in images and a model that has learned something.

`tiny_run` (tests/conftest.py) is a real training run, but 3 epochs on 6 individuals leave its
embeddings at chance for individuals it never saw. Tests about recognising individuals use `learned`
instead: resnet18 trained for 96 steps on 16 stand-in individuals, through the project's own decoding
and batch augmentation, saved in the checkpoint layout of src/training/train.py. It identifies unseen
individuals enrolled from 4 photos at about 3.5x chance; docs/INFERENCE.md (Galleries) quotes a properly
trained model.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.config import Config, config_from_dict
from src.data.augment import BatchAugment
from src.data.decode import cache_size_for, decode_for_cache
from src.data.standin import individual_name, render
from src.models.factory import create_model
from src.models.trained import FORMAT_VERSION
from src.training.checkpoint import atomic_save

STANDIN_SIZE = 36          # rendered side in pixels (each side varies by 10%, as real crops do)
TRAIN_INDIVIDUALS = 16
TRAIN_IMAGES = 16
EPOCHS = 12
BATCH = 32
# Individuals from this index on were never trained on (names are unique per index).
UNSEEN_START = 100


def render_individuals(folder: Path, indices, images: int, tag: str) -> dict[str, list[Path]]:
    """`images` stand-in PNGs per individual index; `tag` makes each call's images distinct."""
    folder.mkdir(parents=True, exist_ok=True)
    rendered = {}
    for index in indices:
        name = individual_name(index)
        rendered[name] = []
        for j in range(images):
            path = folder / f"{tag}_{name}_{j}.png"
            render(name, f"{tag}/{name}/{j}", STANDIN_SIZE, seed=0)[0].save(path)
            rendered[name].append(path)
    return rendered


def minimal_checkpoint(model: torch.nn.Module, config: Config, classes: list[str], epoch: int) -> dict:
    """The keys load_checkpoint requires, as src/training/train.py writes them."""
    return {"format_version": FORMAT_VERSION, "model_state": model.state_dict(), "epoch": epoch,
            "config": config.to_dict(), "classes": classes}


def train(config: Config, images: dict[str, list[Path]], epochs: int, seed: int = 0) -> torch.nn.Module:
    """A short AdamW + one-cycle run on decode_for_cache pixels with BatchAugment.train.

    On one thread: on a shared 2-core machine it is several times faster than two contending ones.
    The weights are NOT the same on every machine: oneDNN picks its kernels by CPU type (measured: 5
    steps of this model under ONEDNN_MAX_CPU_ISA=AVX2 or SSE41 give other weights than on AVX-512), and
    the stand-ins' pixels follow the installed Pillow and numpy. The accuracy bounds the tests assert
    are sized for that spread (tests/inference/test_identify.py).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, images, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(config: Config, images: dict[str, list[Path]], epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cache_size = cache_size_for(config.data.image_size)
    pixels = torch.from_numpy(np.stack([decode_for_cache(p, cache_size) for ps in images.values() for p in ps]))
    labels = torch.tensor([i for i, ps in enumerate(images.values()) for _ in ps])
    model = create_model(config.model, len(images))
    augment = BatchAugment(config.augment, config.data.image_size)
    steps_per_epoch = len(labels) // BATCH
    # Fused, as training's: a step here took 0.14-0.17 s of CPU instead of 0.20 with the per-tensor update.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.trainer.lr, weight_decay=1e-4, fused=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.trainer.lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.2)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * BATCH:(step + 1) * BATCH]
            _, _, loss_logits = model(augment.train(pixels[batch], generator), labels[batch])
            loss = F.cross_entropy(loss_logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@dataclass(frozen=True)
class Learned:
    checkpoint: Path
    images: dict[str, list[Path]]  # the training photos, by individual


@pytest.fixture(scope="session")
def learned(tmp_path_factory) -> Learned:
    """A linear-head resnet18 trained briefly on stand-ins (about 20 s on one core)."""
    folder = tmp_path_factory.mktemp("learned")
    config = config_from_dict({
        "data": {"image_size": 32, "num_classes": TRAIN_INDIVIDUALS},
        # Light augmentation: with ~100 steps, heavy occlusion and rotation only slow learning down.
        "augment": {"rotation_degrees": 0, "random_erasing": 0, "color_jitter": 0.1, "crop_scale_min": 0.85},
        "model": {"backbone": "resnet18", "embedding_dim": 64, "head": "linear"},
        "trainer": {"lr": 0.003, "device": "cpu"}})
    images = render_individuals(folder / "train", range(TRAIN_INDIVIDUALS), TRAIN_IMAGES, "train")
    model = train(config, images, EPOCHS)
    path = folder / "learned_best.pt"
    atomic_save(minimal_checkpoint(model, config, list(images), EPOCHS), path)
    return Learned(path, images)


@pytest.fixture(scope="session")
def unseen(tmp_path_factory) -> dict[str, list[Path]]:
    """10 images each of 6 individuals no model here was trained on."""
    return render_individuals(tmp_path_factory.mktemp("unseen"), range(UNSEEN_START, UNSEEN_START + 6), 10, "unseen")


@pytest.fixture(scope="session")
def strangers(tmp_path_factory) -> dict[str, list[Path]]:
    """6 images each of 12 more never-trained individuals, never enrolled either."""
    return render_individuals(tmp_path_factory.mktemp("strangers"), range(UNSEEN_START + 50, UNSEEN_START + 62), 6,
                              "stranger")


@pytest.fixture
def odd_entries(unseen, tmp_path) -> tuple[Path, Path, Path, Path]:
    """A folder holding a photo, a FIFO and a broken link, all named like images, plus hidden ones
    and a folder holding only a FIFO; returns (folder, photo, fifo, link)."""
    folder = tmp_path / "photos"
    (folder / "only_a_fifo").mkdir(parents=True)
    photo = Path(shutil.copy(next(iter(unseen.values()))[0], folder / "a.png"))
    os.mkfifo(folder / "b_fifo.png")
    (folder / "c_link.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(folder / ".hidden_fifo.png")
    (folder / ".hidden_link.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(folder / "only_a_fifo" / "d.png")
    return folder, photo, folder / "b_fifo.png", folder / "c_link.png"
