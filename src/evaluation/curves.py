"""Training curves of a run, finished or still going: loss, top-1, top-5 and learning rate per epoch.

    python -m src.evaluation.curves artifacts/<name>_metrics.csv [--out artifacts/<name>_curves.png]

Training rewrites `<name>_metrics.csv` whenever it writes its checkpoints (after every epoch, or at
most every `trainer.checkpoint_interval_s` seconds), so running this again redraws the curves up to
the last epoch written. A line that cannot be read is left out rather than failing the plot:
quietly when it is the last (a file being written), with a warning naming it elsewhere.
"""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import numpy as np

from src.errors import capped, command_main, command_parser, missing, path_argument, show_warnings
from src.evaluation.plots import plot_training_curves
from src.tables import print_stdout
from src.training.artifacts import METRICS_COLUMNS

METRICS_SUFFIX = "_metrics.csv"
MAX_VALUE = 1e100  # of any value plotted
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

log = logging.getLogger(__name__)


class CurvesError(ValueError):
    """A metrics file that cannot be plotted; one line naming the file."""


def read_metrics_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Every complete epoch row of a metrics CSV, one array per column of METRICS_COLUMNS."""
    path = Path(path)
    try:
        if not path.is_file():
            raise CurvesError(f"{path}: metrics file {missing(path, folder=False)}")
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's BOM
            reader = csv.DictReader(handle)
            absent = [column for column in METRICS_COLUMNS if column not in (reader.fieldnames or [])]
            if absent:
                raise CurvesError(f"{path}: not a metrics CSV of this project (missing columns {absent})")
            rows, unread, cut_short = [], [], False
            for row in reader:  # blank lines are not rows
                cells = [row[column] for column in METRICS_COLUMNS]
                cut_short = any(cell in (None, "") for cell in cells)  # a half-written line
                values = None if cut_short else _plottable(cells)
                if values is None:
                    unread.append(reader.line_num)
                else:
                    rows.append(values)
            if cut_short:
                unread.pop()  # the last row, cut short: a file being written
    except UnicodeDecodeError as exc:
        raise CurvesError(f"{path}: not a metrics CSV of this project (not UTF-8 text: {exc.reason})") from None
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise CurvesError(f"{path}: not a metrics CSV of this project ({exc})") from None
    except OSError as exc:  # no permission to read it: evaluation then leaves the curves out
        raise CurvesError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not rows:
        raise CurvesError(f"{path}: no finished epoch yet" if not unread else
                          f"{path}: no epoch row to plot (line {capped([str(n) for n in unread])}: values that "
                          f"are not numbers, or beyond ±{MAX_VALUE:g})")
    if unread:
        log.warning("%s: left out line %s, not a complete epoch row", path, capped([str(n) for n in unread]))
    table = np.array(rows, dtype=np.float64)
    return {column: table[:, i] for i, column in enumerate(METRICS_COLUMNS)}


def _plottable(cells: list[str]) -> list[float] | None:
    """The row's values, or None unless each is a number within ±MAX_VALUE: training writes finite
    values only, and 1e308 or -1e308 (a hand edit) broke matplotlib's axes (NaN fails the comparison)."""
    try:
        values = [float(cell) for cell in cells]
    except ValueError:
        return None
    return values if all(abs(value) <= MAX_VALUE for value in values) else None


def default_output(csv_path: Path) -> Path:
    """`artifacts/<name>_metrics.csv` -> `artifacts/<name>_curves.png`."""
    name = csv_path.name.removesuffix(METRICS_SUFFIX) if csv_path.name.endswith(METRICS_SUFFIX) else csv_path.stem
    return csv_path.with_name(f"{name}_curves.png")


def check_output(out: Path) -> None:
    """Refuse an --out that would destroy something: the plot is a PNG, and it replaces only a PNG
    (a typo such as `--out artifacts/x_best.pt` must not turn a checkpoint, or the CSV, into a picture)."""
    if out.suffix.lower() != ".png":
        raise CurvesError(f"--out {out}: the curves are a PNG; name it <something>.png")
    try:
        replaces_another_file = out.exists() and not _is_png(out)
    except OSError as exc:  # a folder this user cannot search (Path.exists raises it on Python 3.11)
        raise CurvesError(f"cannot write {out} ({exc})") from None
    if replaces_another_file:
        raise CurvesError(f"--out {out}: exists and is not a PNG; refusing to replace it")


def _is_png(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:  # a folder, or unreadable: not a PNG this tool wrote
        return False


@command_main
def main(argv=None) -> int:
    parser = command_parser("src.evaluation.curves", __doc__)
    parser.add_argument("metrics_csv", type=path_argument, help="artifacts/<name>_metrics.csv written by training")
    parser.add_argument("--out", type=path_argument, default=None,
                        help="PNG to write (default: <name>_curves.png beside the CSV)")
    args = parser.parse_args(argv)
    show_warnings()
    out = args.out or default_output(args.metrics_csv)
    try:
        check_output(out)
        history = read_metrics_csv(args.metrics_csv)
    except CurvesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        plot_training_curves(history, out, title=f"{args.metrics_csv.name}: {len(history['epoch'])} epochs")
    except OSError as exc:
        print(f"error: cannot write {out} ({exc})", file=sys.stderr)
        return 2
    print_stdout(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
