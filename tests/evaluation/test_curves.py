"""Training curves from a metrics CSV, finished or still being written."""
import pytest

from src.evaluation import curves
from src.training.artifacts import METRICS_COLUMNS

HEADER = ",".join(METRICS_COLUMNS)


def test_curves_of_a_finished_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert curves.main([str(tiny_run["metrics"]), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 1000
    assert capsys.readouterr().out.strip() == str(out)


def test_a_run_in_progress_plots_its_finished_epochs(tmp_path):
    csv = tmp_path / "demo_metrics.csv"
    csv.write_text(f"{HEADER}\n1,0.001,4.0,0.1,0.3,3.9,0.1,0.3\n2,0.0009,3.5,0.2,0.5,3.6,0.2,0.4\n3,0.0008,3.1\n")
    history = curves.read_metrics_csv(csv)
    assert history["epoch"].tolist() == [1.0, 2.0]
    assert history["val_top5"].tolist() == [0.3, 0.4]
    assert curves.default_output(csv) == tmp_path / "demo_curves.png"
    assert curves.main([str(csv)]) == 0
    assert (tmp_path / "demo_curves.png").stat().st_size > 1000


@pytest.mark.parametrize("content, message", [
    (None, "metrics file not found"),
    (f"{HEADER}\n", "no finished epoch yet"),
    ("epoch,loss\n1,2.0\n", "missing columns"),
])
def test_unusable_metrics_fail_in_one_line(content, message, tmp_path, capsys):
    csv = tmp_path / "x_metrics.csv"
    if content is not None:
        csv.write_text(content)
    assert curves.main([str(csv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "x_curves.png").exists()


def test_a_metrics_file_that_is_not_utf8_fails_in_one_line(tmp_path, capsys):
    """E.g. the CSV re-saved as UTF-16 by a spreadsheet; evaluation then just leaves the curves out."""
    csv = tmp_path / "x_metrics.csv"
    csv.write_bytes(f"{HEADER}\n1,0.001,4.0,0.1,0.3,3.9,0.1,0.3\n".encode("utf-16"))
    assert curves.main([str(csv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {csv}: not a metrics CSV of this project (not UTF-8 text: invalid start byte)"]


def test_an_out_path_that_cannot_be_written_fails_in_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert curves.main([str(tiny_run["metrics"]), "--out", str(tmp_path / "a_file" / "curves.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {tmp_path / 'a_file' / 'curves.png'}")
