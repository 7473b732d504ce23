"""Training curves from a metrics CSV, finished or still being written."""
import subprocess
import sys
from pathlib import Path

import pytest

from src.evaluation import curves
from src.training.artifacts import METRICS_COLUMNS
from tests.conftest import REPO

HEADER = ",".join(METRICS_COLUMNS)


def test_curves_of_a_finished_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert curves.main([str(tiny_run["metrics"]), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 1000
    assert capsys.readouterr().out.strip() == str(out)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line_after_the_png(tiny_run, tmp_path):
    """`curves ... > out.txt` on a full disk: printing the PNG's path was an OSError traceback."""
    out = tmp_path / "curves.png"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "src.evaluation.curves", str(tiny_run["metrics"]), "--out",
                                 str(out)], cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: cannot write the results to stdout (No space left on device)\n"
    assert out.read_bytes().startswith(b"\x89PNG")


def test_a_run_in_progress_plots_its_finished_epochs(tmp_path, caplog):
    csv = tmp_path / "demo_metrics.csv"
    csv.write_text(f"{HEADER}\n1,0.001,4.0,0.1,0.3,3.9,0.1,0.3\n2,0.0009,3.5,0.2,0.5,3.6,0.2,0.4\n3,0.0008,3.1\n\n")
    history = curves.read_metrics_csv(csv)
    assert history["epoch"].tolist() == [1.0, 2.0]
    assert history["val_top5"].tolist() == [0.3, 0.4]
    assert curves.default_output(csv) == tmp_path / "demo_curves.png"
    assert curves.main([str(csv)]) == 0
    assert (tmp_path / "demo_curves.png").stat().st_size > 1000
    assert not caplog.records  # the last line, still being written, is left out quietly


def test_a_damaged_line_before_the_last_is_named(tmp_path, caplog):
    csv = tmp_path / "demo_metrics.csv"
    csv.write_text(f"{HEADER}\n1,0.001,4.0,0.1,0.3,3.9,0.1,0.3\ngarbage\n2,0.0009,3.5,0.2,0.5,3.6,0.2,0.4\n")
    assert curves.read_metrics_csv(csv)["epoch"].tolist() == [1.0, 2.0]
    assert [record.getMessage() for record in caplog.records] == [
        f"{csv}: left out line 3, not a complete epoch row"]
    result = subprocess.run([sys.executable, "-m", "src.evaluation.curves", str(csv)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == f"warning: {csv}: left out line 3, not a complete epoch row\n"


@pytest.mark.parametrize("content, message", [
    (None, "metrics file not found"),
    ("folder", "metrics file is a folder, not a file"),
    (f"{HEADER}\n", "no finished epoch yet"),
    (f"{HEADER}\n1,0.001,4.0", "no finished epoch yet"),  # the first row, being written
    # hand edits: a matplotlib traceback ("arange: cannot compute length"), and "no finished epoch yet"
    (f"{HEADER}\n1,0.1,1e308,0.1,0.3,3.9,0.1,0.3\n2,0.1,-1e308,0.1,0.3,3.9,0.1,0.3\n",
     "no epoch row to plot (line 2, 3: values that are not numbers, or beyond ±1e+100)"),
    (f"{HEADER}\n1,0.1,abc,0.1,0.3,3.9,0.1,0.3\n", "no epoch row to plot (line 2: "),
    (f"{HEADER}\n1,0.1,nan,0.1,0.3,3.9,0.1,0.3\n", "no epoch row to plot (line 2: "),
    ("epoch,loss\n1,2.0\n", "missing columns"),
    (f"{HEADER}\n" + "x" * 200_000 + "\n", "field larger than field limit"),  # was a csv.Error traceback
])
def test_unusable_metrics_fail_in_one_line(content, message, tmp_path, capsys):
    csv = tmp_path / "x_metrics.csv"
    if content == "folder":
        csv.mkdir()
    elif content is not None:
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


def test_out_replaces_only_a_png(tiny_run, tmp_path, capsys):
    """A mistyped --out (the checkpoint, the CSV itself, a report) is refused and left as it was."""
    metrics = tmp_path / "x_metrics.csv"
    metrics.write_bytes(tiny_run["metrics"].read_bytes())
    checkpoint = tmp_path / "x_best.pt"
    checkpoint.write_bytes(b"PK\x03\x04 a checkpoint")
    for out, message in [(checkpoint, "the curves are a PNG"), (metrics, "the curves are a PNG"),
                         (tmp_path / "old.PNG.txt", "the curves are a PNG")]:
        assert curves.main([str(metrics), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    not_a_png = tmp_path / "notes.png"
    not_a_png.write_text("my notes")
    assert curves.main([str(metrics), "--out", str(not_a_png)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {not_a_png}: exists and is not a PNG; "
                                               "refusing to replace it")
    assert checkpoint.read_bytes() == b"PK\x03\x04 a checkpoint" and not_a_png.read_text() == "my notes"
    assert metrics.read_bytes() == tiny_run["metrics"].read_bytes()
    assert curves.main([str(metrics), "--out", str(tmp_path / "c.png")]) == 0  # a new PNG, then its update
    assert curves.main([str(metrics), "--out", str(tmp_path / "c.png")]) == 0


def test_a_metrics_file_saved_with_a_bom_is_read(tmp_path):
    csv = tmp_path / "x_metrics.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + f"{HEADER}\n1,0.001,4.0,0.1,0.3,3.9,0.1,0.3\n".encode())
    assert curves.read_metrics_csv(csv)["epoch"].tolist() == [1.0]


def refuse_to_open(monkeypatch, refused: Path) -> None:
    """`refused` cannot be opened, as for a user without read permission (simulated: the tests may run
    as root, whom no permission stops)."""
    open_path = Path.open

    def open_or_no_permission(path, *args, **kwargs):
        if path == refused:
            raise PermissionError(13, "Permission denied", str(path))
        return open_path(path, *args, **kwargs)
    monkeypatch.setattr(Path, "open", open_or_no_permission)


def test_a_metrics_file_that_cannot_be_read_fails_in_one_line(tmp_path, capsys, monkeypatch):
    """A PermissionError traceback before (and evaluation then failed to write its whole report)."""
    csv = tmp_path / "x_metrics.csv"
    csv.write_text(f"{HEADER}\n1,0.001,4.0,0.1,0.3,3.9,0.1,0.3\n")
    refuse_to_open(monkeypatch, csv)
    assert curves.main([str(csv)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {csv}: cannot read it (Permission denied)"]
    assert not (tmp_path / "x_curves.png").exists()


def test_an_out_path_in_a_folder_that_cannot_be_searched_fails_in_one_line(tmp_path, capsys, unsearchable):
    """Path.exists raised PermissionError: a traceback."""
    csv = tmp_path / "x_metrics.csv"
    csv.write_text(f"{HEADER}\n1,0.001,4.0,0.1,0.3,3.9,0.1,0.3\n")
    out = unsearchable(tmp_path / "locked") / "curves.png"
    assert curves.main([str(csv), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot write {out} ([Errno 13] Permission denied: '{out}')"]
