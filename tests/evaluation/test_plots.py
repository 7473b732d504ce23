"""What each figure draws, read back from the matplotlib figure instead of the PNG's pixels."""
import numpy as np
import pytest

from src.evaluation import plots
from src.training.artifacts import METRICS_COLUMNS


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plot functions would save, in order; nothing is written."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    return figures


def test_confusion_matrix_rows_are_normalised(drawn):
    plots.plot_confusion_matrix(np.array([[1, 3], [0, 2]]), ["A", "B"], None)
    assert drawn[0].axes[0].images[0].get_array().tolist() == [[0.25, 0.75], [0.0, 1.0]]


def test_cmc_is_drawn_against_ranks_from_one(drawn):
    plots.plot_cmc([0.5, 0.75, 1.0], None)
    line = drawn[0].axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [0.5, 0.75, 1.0]


def test_training_curves_draw_each_column_in_its_panel(drawn):
    history = {column: np.array([i + 0.1, i + 0.2]) for i, column in enumerate(METRICS_COLUMNS)}
    plots.plot_training_curves(history, None, title="t")
    loss, top1, top5, lr = drawn[0].axes[:4]
    for axes, metric in ((loss, "loss"), (top1, "top1"), (top5, "top5")):
        assert [list(line.get_ydata()) for line in axes.lines] == [
            history[f"train_{metric}"].tolist(), history[f"val_{metric}"].tolist()], metric
    assert list(lr.lines[0].get_ydata()) == history["lr"].tolist()
