"""Identify the individuals in photos from the command line.

    python -m src.inference.predict --checkpoint artifacts/chimp_best.pt photos/ more/*.jpg
        [--top-k 5] [--threshold T] [--gallery g.npz [--match nearest|prototype]]
        [--output out.csv|out.json] [--device cpu|cuda|cuda:N] [--batch-size N]
    python -m src.inference.predict --onnx exported/chimp_best.onnx photos/   # ONNX Runtime, no model code

Inputs are images, folders (searched recursively, linked sub-folders too; hidden files left out)
and glob patterns (a matching folder is searched too); a file named twice counts once. In folders and a pattern's
matches, files not named as images (notes.txt, Thumbs.db) are left out and counted. Every file is
decoded as training decodes images; one that is not an image, is corrupt or truncated, or is larger
than the decompression-bomb limit (`src.data.io.MAX_PIXELS`, 64 megapixels) is skipped with its
reason, as are missing paths, broken links, FIFOs and other files that are not regular, folders
without image files and patterns without a match, and the rest is processed. A table goes to the
terminal; `--output` writes every input (skipped ones with their reason) as CSV or JSON,
atomically (a file already there is replaced whole or not at all) and creating missing folders;
it replaces only an earlier result of predict (another file there, or a file where its folder
should be, is refused before any work).
A progress bar shows for folders when stderr is a terminal.

Exit codes: 0 every input scored (identified or unknown); 1 some input skipped; 2 unusable options,
checkpoint, export or gallery.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


from src import atomic
from src.errors import command_main, command_parser, path_argument
from src.inference.gallery import Gallery, GalleryError
from src.inference.identify import (DEFAULT_BATCH_SIZE, DEFAULT_MATCH, DEFAULT_TOP_K, USAGE_ERRORS, Identifier,
                                     Prediction)
from src.inference.inputs import Skipped, collect_images, printable
from src.models.scoring import MATCH_MODES
from src.tables import format_rows, print_stdout, progress_bar

OUTPUT_FORMATS = (".csv", ".json")
Result = Prediction | Skipped


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command_parser("src.inference.predict", __doc__)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=path_argument, help="training checkpoint, e.g. artifacts/<name>_best.pt")
    model.add_argument("--onnx", type=path_argument, help="exported model (python -m src.inference.export); "
                                                 "runs with ONNX Runtime")
    parser.add_argument("inputs", nargs="+", help="images, folders or glob patterns")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"individuals listed per image (default {DEFAULT_TOP_K})")
    parser.add_argument("--threshold", type=float, default=None,
                        help="call an image unknown when its best score is below this (default: the "
                             "threshold evaluation stored beside the checkpoint, if any)")
    parser.add_argument("--gallery", type=path_argument, default=None,
                        help="name the individuals of this gallery (python -m src.inference.gallery) "
                             "instead of the training individuals")
    parser.add_argument("--match", choices=MATCH_MODES, default=None,
                        help=f"with --gallery: score an individual by its nearest enrolled photo or by "
                             f"its prototype (default {DEFAULT_MATCH})")
    parser.add_argument("--output", type=path_argument, default=None, help="also write the results to .csv or .json")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (an ONNX model: cpu or cuda)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    if args.output is not None and args.output.suffix.lower() not in OUTPUT_FORMATS:
        parser.error(f"--output must end in {' or '.join(OUTPUT_FORMATS)}, not {args.output.name!r}")
    if args.match is not None and args.gallery is None:  # without a gallery the classifier scores
        parser.error("--match chooses how a gallery is matched; it needs --gallery")
    if args.output is not None:
        problem = output_problem(args.output)
        if problem is not None:
            parser.error(f"--output {args.output}: {problem}")
    args.match = args.match or DEFAULT_MATCH
    return args


CSV_HEADER_START = "image,prediction,score,unknown,skipped"
JSON_KEYS = frozenset({"model", "scored_against", "threshold", "threshold_origin", "results"})


def output_problem(path: Path) -> str | None:
    """Why `--output` must not be written, or None. It replaces only an earlier result of predict: a
    mistyped `--output exported/x_best.json` (the export's description), `annotations/prepared.json`,
    `<checkpoint>.threshold.json`, `annotations/metadata.csv` or `<name>_metrics.csv` was silently
    replaced by the results, after every image had been identified."""
    try:
        atomic.check_folder_possible(path.parent)  # found now, not after every image is identified
        there, folder = path.exists() or path.is_symlink(), path.is_dir()
    except OSError as exc:  # a file where a folder should be; a folder this user cannot search
        return f"cannot write it ({exc})"
    if not there:
        return None
    if folder:
        return "is a folder; name a .csv or .json file"
    csv_file = path.suffix.lower() == ".csv"
    try:
        with open(path, "rb") as handle:
            content = handle.read(1 << 20) if csv_file else handle.read()  # a CSV is told by its header
    except OSError as exc:
        return f"cannot read the file already there ({exc.strerror or exc})"
    if not content.strip():  # an empty file (made by `touch`, or a shell's `>`): nothing to lose
        return None
    if csv_file:
        ours = content.lstrip(b"\xef\xbb\xbf").startswith(CSV_HEADER_START.encode())
    else:
        try:
            payload = json.loads(content)
        except ValueError:
            payload = None
        ours = isinstance(payload, dict) and set(payload) == JSON_KEYS
    return None if ours else "exists and is not a result of predict; refusing to replace it (name another file)"


def build_identifier(args: argparse.Namespace) -> Identifier:
    gallery = Gallery.load(args.gallery) if args.gallery is not None else None
    if args.onnx is not None:
        return Identifier.from_onnx(args.onnx, args.device, gallery, args.threshold, args.match)
    return Identifier.from_checkpoint(args.checkpoint, args.device, gallery, args.threshold, args.match)


def run(identifier: Identifier, files: list[Path], args: argparse.Namespace) -> list[Result]:
    """Every file's Prediction or Skipped, in order; a progress bar for folders on a terminal."""
    # os.path.isdir, not Path.is_dir: it answers False where the system refuses the lookup (a name over
    # 255 bytes), an input collect_images has already skipped.
    show = sys.stderr.isatty() and any(os.path.isdir(p) for p in args.inputs)
    with progress_bar(len(files), "identify", show, unit="img") as bar:
        return list(identifier.predict(files, args.top_k, args.batch_size, progress=bar.update))


def format_table(predictions: Sequence[Prediction]) -> str:
    """One row per image: prediction, its score and the top-k list."""
    rows = [("image", "prediction", "score", "top-k")]
    rows += [(printable(p.source), p.label, f"{p.scores[0]:.4f}",
              ", ".join(f"{name} {score:.4f}" for name, score in zip(p.names, p.scores)))
             for p in predictions]
    return format_rows(rows, "<<>")


def write_csv(path: Path, results: Sequence[Result], top_k: int) -> None:
    """Columns: image, prediction, score, unknown, skipped (the reason), then name_i, score_i.

    A file name that is not UTF-8 on disk (Python holds its odd bytes as surrogates) is written
    back as its original bytes, as the table on stdout shows it, so that it still names the file."""
    header = CSV_HEADER_START.split(",")
    header += [f"{field}_{i}" for i in range(1, top_k + 1) for field in ("name", "score")]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for item in results:
        if isinstance(item, Skipped):
            row = [item.source, "", "", "", item.reason]
        else:
            ranked = [value for name, score in zip(item.names, item.scores) for value in (name, f"{score:.6f}")]
            row = [item.source, item.label, f"{item.scores[0]:.6f}", item.unknown, "", *ranked]
        writer.writerow(row + [""] * (len(header) - len(row)))  # every row as wide as the header
    atomic.write_bytes(path, buffer.getvalue().encode("utf-8", "surrogateescape"))


def write_json(path: Path, results: Sequence[Result], identifier: Identifier, model: Path) -> None:
    def entry(item: Result) -> dict:
        if isinstance(item, Skipped):
            return {"image": item.source, "skipped": item.reason}
        return {"image": item.source, "prediction": item.label, "score": item.scores[0], "unknown": item.unknown,
                "top_k": [{"name": n, "score": s} for n, s in zip(item.names, item.scores)]}

    payload = {"model": str(model), "scored_against": identifier.describe(),
               "threshold": identifier.threshold.value, "threshold_origin": identifier.threshold.origin,
               "results": [entry(item) for item in results]}
    atomic.write_text(path, json.dumps(payload, indent=2) + "\n")  # ASCII: odd bytes of names are escaped


@command_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        identifier = build_identifier(args)
    except (GalleryError, *USAGE_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    inputs = collect_images(args.inputs)
    predicted = iter(run(identifier, inputs.files, args))
    results = [next(predicted) if isinstance(entry, Path) else entry for entry in inputs.entries]
    predictions = [item for item in results if isinstance(item, Prediction)]
    skipped = [item for item in results if isinstance(item, Skipped)]
    unknown = sum(item.unknown for item in predictions)

    if predictions:
        print_stdout(format_table(predictions))
    for item in skipped:
        print(f"skipped {printable(item.source)}: {item.reason}", file=sys.stderr)
    notes = inputs.notes()
    left_out = f" ({'; '.join(notes)})" if notes else ""
    print(f"{len(predictions) - unknown} identified, {unknown} unknown, {len(skipped)} skipped{left_out}; "
          f"scored against {identifier.describe()}", file=sys.stderr)
    if args.output is not None:
        try:
            if args.output.suffix.lower() == ".csv":
                write_csv(args.output, results, args.top_k)
            else:
                write_json(args.output, results, identifier, args.onnx or args.checkpoint)
        except OSError as exc:
            print(f"error: --output {args.output}: cannot write it ({exc})", file=sys.stderr)
            return 2
        print(f"wrote {args.output}", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
