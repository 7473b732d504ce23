"""The guide's contract in `src.training.artifacts`: the epoch line, the metrics CSV, the file names."""
import errno
import os
from pathlib import Path

import pytest

from src import atomic
from src.training.artifacts import RunPaths, epoch_line, threshold_sidecar_path, write_metrics_csv

# The guide's two example epochs (docs: the user's model-training guide, section 3); every value differs,
# so a field printed in another's place shows.
GUIDE_ROWS = [
    {"epoch": 1, "lr": 0.0004, "train_loss": 4.1234, "train_top1": 0.0567, "train_top5": 0.1234,
     "val_loss": 3.9876, "val_top1": 0.0890, "val_top5": 0.2012},
    {"epoch": 2, "lr": 0.0004, "train_loss": 3.5678, "train_top1": 0.1234, "train_top5": 0.2345,
     "val_loss": 3.4567, "val_top1": 0.1567, "val_top5": 0.3123},
]


def test_epoch_line_is_the_guides_example_line():
    assert epoch_line(GUIDE_ROWS[0], 200) == \
        "[Epoch 1/200] lr=0.00040 | train_loss=4.1234 top1=0.0567 | val_loss=3.9876 top1=0.0890"
    assert epoch_line(GUIDE_ROWS[1], 200) == \
        "[Epoch 2/200] lr=0.00040 | train_loss=3.5678 top1=0.1234 | val_loss=3.4567 top1=0.1567"


def test_metrics_csv_is_the_guides_example_content(tmp_path):
    path = tmp_path / "x_metrics.csv"
    write_metrics_csv(path, GUIDE_ROWS)
    assert path.read_text() == ("epoch,lr,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5\n"
                                "1,0.0004,4.1234,0.0567,0.1234,3.9876,0.0890,0.2012\n"
                                "2,0.0004,3.5678,0.1234,0.2345,3.4567,0.1567,0.3123\n")


def test_metrics_csv_keeps_a_warm_up_learning_rate(tmp_path):
    """Warm-up lrs are small and not round: fixed decimals would write 0.000133 as 0.0001."""
    path = tmp_path / "x_metrics.csv"
    write_metrics_csv(path, [{**GUIDE_ROWS[0], "lr": 0.0004 / 3}])
    assert path.read_text().splitlines()[1].split(",")[1] == "0.000133333"


def test_metrics_csv_writes_a_small_learning_rate_in_plain_decimals(tmp_path):
    """The cosine's end, every rate below 1e-4 (the baseline config's last 16 of 50 epochs), was written
    as 4.00007e-06: the guide's CSV has plain decimals in every column."""
    path = tmp_path / "x_metrics.csv"
    write_metrics_csv(path, [{**GUIDE_ROWS[0], "lr": 4.00007e-06}])
    assert path.read_text().splitlines()[1].split(",")[1] == "0.00000400007"


def test_artifact_names_are_the_guides_and_the_sidecar_follows_the_checkpoints_full_name():
    paths = RunPaths(Path("artifacts"), "train_chimp_min10")
    assert [paths.best.name, paths.last.name, paths.metrics.name] == [
        "train_chimp_min10_best.pt", "train_chimp_min10_last.pt", "train_chimp_min10_metrics.csv"]
    assert threshold_sidecar_path(paths.best) == Path("artifacts/train_chimp_min10_best.pt.threshold.json")


def test_a_failed_csv_write_keeps_the_previous_csv(tmp_path, monkeypatch):
    """The CSV is rewritten whole at every save: a write that fails (a full disk) must not leave half of one."""
    path = tmp_path / "x_metrics.csv"
    write_metrics_csv(path, GUIDE_ROWS[:1])
    before = path.read_text()

    def no_room(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", no_room)
    with pytest.raises(OSError):
        write_metrics_csv(path, GUIDE_ROWS)
    assert path.read_text() == before
