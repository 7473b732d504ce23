"""The evaluation figures, as PNG files.

Figures are built with `matplotlib.figure.Figure` directly (the Agg renderer, no pyplot): nothing
global is switched, no display is needed, and plotting from a training process cannot open windows.
Each file is written to a temporary name and renamed, so a viewer never sees half a PNG (the curves
of a run in progress are redrawn while someone may be looking at them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from src.atomic import atomic_destination


def _save(figure: Figure, path: Path) -> None:
    with atomic_destination(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix: cell (i, j) is the fraction of individual i's images predicted
    as j, so rare and frequent individuals read on the same scale."""
    support = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, support, out=np.zeros(matrix.shape, dtype=np.float64), where=support > 0)
    size = max(5.0, 0.14 * len(names) + 2.0)
    figure = Figure(figsize=(size + 1.0, size))
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true individual's images")
    ticks = np.arange(len(names))
    font = 9 if len(names) <= 30 else 6  # a row is about 8 + 115 / n points high
    axes.set_xticks(ticks, names, rotation=90, fontsize=font)
    axes.set_yticks(ticks, names, fontsize=font)
    axes.set_xlabel("predicted individual")
    axes.set_ylabel("true individual")
    axes.set_title("Confusion matrix (rows normalised)")
    _save(figure, path)


def plot_cmc(cmc: list[float], path: Path) -> None:
    """Identification rate against rank (1..len(cmc))."""
    ranks = np.arange(1, len(cmc) + 1)
    figure = Figure(figsize=(5.0, 3.6))
    axes = figure.add_subplot()
    axes.plot(ranks, cmc, marker="o")
    for rank, value in zip(ranks[[0, -1]], np.asarray(cmc)[[0, -1]]):
        axes.annotate(f"{value:.3f}", (rank, value), textcoords="offset points", xytext=(0, -12),
                      ha="center", fontsize=8)
    axes.set_xticks(ranks)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("rank")
    axes.set_ylabel("identification rate")
    axes.set_title("CMC: gallery = train split")
    axes.grid(alpha=0.3)
    _save(figure, path)


def plot_training_curves(history: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Loss, top-1, top-5 and learning rate against epoch, train and validation on the same axes."""
    figure = Figure(figsize=(10.0, 7.0))
    panels = figure.subplots(2, 2, sharex=True)
    epochs = history["epoch"]
    for axes, metric, label in ((panels[0, 0], "loss", "loss"), (panels[0, 1], "top1", "top-1 accuracy"),
                                (panels[1, 0], "top5", "top-5 accuracy")):
        axes.plot(epochs, history[f"train_{metric}"], marker=".", label="train")
        axes.plot(epochs, history[f"val_{metric}"], marker=".", label="val")
        axes.set_ylabel(label)
        axes.legend()
    for axes in (panels[0, 1], panels[1, 0]):
        axes.set_ylim(0.0, 1.02)
    panels[1, 1].plot(epochs, history["lr"], marker=".", color="tab:green")
    panels[1, 1].set_ylabel("learning rate (last step of the epoch)")
    panels[1, 1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for axes in panels.flat:
        axes.grid(alpha=0.3)
    for axes in panels[1]:
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    _save(figure, path)
