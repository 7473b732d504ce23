"""The guide's artifacts (file names, the epoch line and the metrics CSV) and the evaluation's threshold
file beside a checkpoint."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src import atomic

METRICS_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5")


@dataclass(frozen=True)
class RunPaths:
    output_dir: Path
    name: str

    @property
    def best(self) -> Path:
        return Path(self.output_dir) / f"{self.name}_best.pt"

    @property
    def last(self) -> Path:
        return Path(self.output_dir) / f"{self.name}_last.pt"

    @property
    def metrics(self) -> Path:
        return Path(self.output_dir) / f"{self.name}_metrics.csv"

    @property
    def lock(self) -> Path:
        """Held while a run writes the three files above (`outputs.claim_outputs`)."""
        return Path(self.output_dir) / f".{self.name}.lock"


def threshold_sidecar_path(checkpoint: Path) -> Path:
    """`artifacts/x_best.pt` -> `artifacts/x_best.pt.threshold.json` (read by inference)."""
    return checkpoint.with_name(checkpoint.name + ".threshold.json")


def epoch_line(row: dict, max_epochs: int) -> str:
    """`[Epoch 1/200] lr=0.00040 | train_loss=4.1234 top1=0.0567 | val_loss=3.9876 top1=0.0890`"""
    return (f"[Epoch {row['epoch']}/{max_epochs}] lr={row['lr']:.5f} | "
            f"train_loss={row['train_loss']:.4f} top1={row['train_top1']:.4f} | "
            f"val_loss={row['val_loss']:.4f} top1={row['val_top1']:.4f}")


def _format(column: str, value) -> str:
    if column == "epoch":
        return str(int(value))
    if column == "lr":
        # 6 significant digits (a warm-up's rates are not round), in plain decimals as in the guide's
        # CSV: `:g` wrote the cosine's end, every rate below 1e-4, as 4e-06.
        return np.format_float_positional(value, precision=6, fractional=False, trim="-")
    return f"{value:.4f}"


def metrics_csv_text(history: list[dict]) -> str:
    """The metrics CSV of the run's `history`: a header and one row per epoch."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRICS_COLUMNS)
    for row in history:
        writer.writerow([_format(column, row[column]) for column in METRICS_COLUMNS])
    return buffer.getvalue()


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """Rewrite the whole CSV from the run's history (kept in every checkpoint), atomically: after a
    resume the file holds each epoch exactly once, whatever happened to the previous file."""
    atomic.write_text(path, metrics_csv_text(history))
