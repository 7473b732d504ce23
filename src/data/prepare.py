"""`python -m src.data.prepare`: from raw images and labels to the prepared dataset every stage reads.

Stages, one function each, in this order:

1. `read_input`      the cvjena release, a list file or a folder per individual -> records
2. `apply_labels_fix` the user's aliases and exclusions (`--labels-fix`), before any filtering
3. `check_names`     individual names must pass `lists.name_problem`: no whitespace (the list format
                     splits on it), no control or invisible characters, not `unknown` (what inference
                     calls a rejected photo)
   `check_release_complete` the cvjena release only: every annotated image must be there
4. `check_images`    decode every image; missing, unreadable, repeated and duplicate images are excluded
5. `filter_min_images` keep individuals with at least `--min-images` usable images
6. `make_splits`     stratified train/val/test and the open-set hold-out (`src/data/splits.py`)
7. `build_report` (`src/data/validate.py`), `write_lists`, `write_metadata`, `prepared_info`: the
   validation report, the lists, `metadata.csv` and `prepared.json` (removed before the first write
   and written last, so its presence means the rest is complete and current), all under a lock

The file layout under `<out-dir>/annotations/` is the contract in docs/DESIGN.md. The function
`prepare` runs everything and returns a `PrepareResult`, so tests and other stages need no subprocess.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from src import atomic, locks
from src.config import DataConfig
from src.data.annotations import (KEYPOINT_NAMES, AnnotationError, LabelsFix, Record, check_names,
                                  holds_standins, read_cvjena, read_folder, read_list_file,
                                  sites_as_individuals)
from src.data.dataset import FORMAT_VERSION, PREPARE_LOCK
from src.data.download import DEFAULT_URL, DownloadError, absent_images, fetch_release
from src.data.lists import Row, canonical_name, write_list
from src.data.splits import (DEFAULT_FRACTIONS, MIN_IMAGES_PER_INDIVIDUAL, SplitError,
                             choose_unknown, open_set_split, split_counts, stratified_split)
from src.data.validate import LABELS_FIX, Exclusion, ImageCheck, build_report, check_images, write_report
from src.errors import command_main, command_parser, missing, path_argument
from src.tables import stdout_failed

DEFAULT_RAW_DIR = Path("data/chimpanzee_faces/raw")
DEFAULT_OUT_DIR = DataConfig.model_fields["root"].default  # where training looks by default
DEFAULT_MIN_IMAGES = 10
DEFAULT_OPEN_SET_INDIVIDUALS = 10
DEFAULT_SEED = 0
# The two files named after --min-images; a rerun with another N removes the earlier N's.
MIN_IMAGES_FILES = re.compile(r"(annotations_merged|kept_ids)_min\d+\.txt")
OPEN_SET_FILES = ("train.txt", "val.txt", "test.txt", "unknown_ids.txt", "unknown_val.txt",
                  "unknown_test.txt")

log = logging.getLogger("src.data.prepare")  # not __name__: that is __main__ under -m


class PrepareError(Exception):
    """The dataset cannot be prepared; the message is one line a user can act on."""


@dataclass
class PrepareResult:
    """What a run wrote: the annotations folder, `prepared.json`'s content and the report."""
    annotations_dir: Path
    prepared: dict
    report: dict

    @property
    def problems(self) -> int:
        return self.report["problems"]


# --- 1. input -----------------------------------------------------------------------------------

def read_input(raw_dir: Path | None, folder: Path | None,
               list_file: Path | None) -> tuple[Path, str, list[Record]]:
    """(raw folder, input kind, records) for whichever input was given.

    The raw folder is what list paths are relative to: the folder itself for `--folder`, `--raw-dir`
    (default: the list file's folder) for `--list`, `--raw-dir` for the cvjena release.
    """
    if folder is not None:
        if raw_dir is not None:
            raise PrepareError("--folder is the raw folder itself; drop --raw-dir")
        return folder.resolve(), "folder", read_folder(folder)
    if list_file is not None:
        raw = (raw_dir or list_file.parent).resolve()
        if not raw.is_dir():
            raise PrepareError(f"raw folder {raw} {missing(raw, folder=True)}")
        return raw, "list", read_list_file(list_file)
    raw = (raw_dir or DEFAULT_RAW_DIR).resolve()
    return raw, "cvjena", read_cvjena(raw)


# --- 2. labels fix ------------------------------------------------------------------------------

def apply_labels_fix(records: list[Record], fix: LabelsFix | None
                     ) -> tuple[list[Record], list[Exclusion], dict | None]:
    """(records after the fix, exclusions it made, a summary for the report); no fix, no change."""
    if fix is None:
        return records, [], None
    kept, excluded, unused = fix.apply(records)
    renamed = Counter(f"{r.published_name} -> {r.individual}" for r in kept
                      if r.individual != canonical_name(r.published_name))  # an alias, not NFC alone
    info = {"file": fix.source, "aliases_applied": dict(sorted(renamed.items())),
            "excluded_images": len(excluded), "unused": unused}
    log.info("labels fix %s: %d alias(es) applied, %s image(s) excluded%s", fix.source, len(renamed),
             f"{len(excluded):,}", f"; unused entries: {', '.join(unused)}" if unused else "")
    return kept, [Exclusion(r, LABELS_FIX, reason) for r, reason in excluded], info


def check_release_complete(records: Sequence[Record], raw: Path) -> None:
    """Every image the release's annotations list (less the labels fix's exclusions) must be there. One
    missing means an interrupted download, unpacking or copy, and preparing the rest would give another
    dataset (fewer images, fewer individuals, other splits) under the release's name. A user's own
    list or folder has no such reference, so there a missing file is a reported problem instead."""
    absent, summary = absent_images(records, raw)
    if absent:
        raise PrepareError(f"the release in {raw} is incomplete: {len(absent):,} annotated image(s) missing "
                           f"(first: {absent[0].path}; present: {summary}); --download completes it, or list "
                           f"images to leave out as exclude-image in a --labels-fix file")


# --- 5. filtering and counting ------------------------------------------------------------------

def filter_min_images(records: Sequence[Record], min_images: int) -> list[Record]:
    """The records of individuals with at least `min_images` records (the report lists the others)."""
    counts = Counter(r.individual for r in records)
    return [r for r in records if counts[r.individual] >= min_images]


def count_summary(records: Sequence[Record]) -> dict:
    """{"images", "individuals", "per_source": {source: images}}; sources in first-seen order."""
    return {"images": len(records), "individuals": len({r.individual for r in records}),
            "per_source": dict(Counter(r.source for r in records))}


def describe(records: Sequence[Record]) -> str:
    """'7,150 images / 87 individuals (CZoo 2,109, CTai 5,041)'."""
    s = count_summary(records)
    sources = ", ".join(f"{src} {n:,}" for src, n in s["per_source"].items())
    return f"{s['images']:,} images / {s['individuals']:,} individuals" + (f" ({sources})" if sources else "")


# --- 6. splits ----------------------------------------------------------------------------------

def make_splits(rows: list[Row], fractions: Sequence[float], seed: int,
                open_set_individuals: int) -> tuple[dict[str, list[Row]], dict[str, list[Row]] | None,
                                                    list[str]]:
    """(closed-set splits, open-set splits or None when disabled, held-out individuals)."""
    closed = stratified_split(rows, fractions, seed)
    if open_set_individuals == 0:
        return closed, None, []
    unknown = choose_unknown([name for _, name in rows], open_set_individuals, seed)
    return closed, open_set_split(closed, unknown), unknown


# --- 7. outputs ---------------------------------------------------------------------------------

def _keypoint_column(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()  # RightEye -> right_eye


METADATA_COLUMNS = ["path", "individual", "published_name", "source", "origin", "age", "age_group",
                    "gender", *[f"{_keypoint_column(k)}_{axis}" for k in KEYPOINT_NAMES for axis in "xy"],
                    "width", "height", "excluded", "split", "open_set"]


def write_metadata(path: Path, parsed: Sequence[Record], fixed: Sequence[Record],
                   exclusions: Sequence[Exclusion], checks: dict[str, ImageCheck],
                   closed: dict[str, list[Row]], open_set: dict[str, list[Row]] | None) -> None:
    """One row per parsed image with every field, why it was excluded and where it went.

    Keypoints that are not visible (`Inf` in the release) and unknown ages are empty cells.
    """
    current = {r.origin: r for r in fixed}
    reasons = {e.record.origin: e.category + (f": {e.detail}" if e.detail else "") for e in exclusions}
    split_of = {path: split for split, rows in closed.items() for path, _ in rows}
    open_of = {path: ("known" if split in ("train", "val", "test") else split)
               for split, rows in (open_set or {}).items() for path, _ in rows}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(METADATA_COLUMNS)
    for record in parsed:
        r = current.get(record.origin, record)
        excluded = reasons.get(r.origin, "")
        size = checks[r.path].size if r.path in checks and checks[r.path].size else ("", "")
        coordinates = [_number(v) for point in r.keypoints for v in (point or (None, None))]
        writer.writerow([r.path, r.individual, r.published_name, r.source, r.origin, _number(r.age),
                         r.age_group or "", r.gender or "", *coordinates, *size, excluded,
                         "" if excluded else split_of.get(r.path, ""),
                         "" if excluded else open_of.get(r.path, "")])
    atomic.write_text(path, buffer.getvalue())


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _write_names(path: Path, names: Sequence[str]) -> None:
    atomic.write_text(path, "".join(f"{n}\n" for n in names))


def write_lists(annotations_dir: Path, min_images: int, usable: Sequence[Record], kept: Sequence[Record],
                closed: dict[str, list[Row]], open_set: dict[str, list[Row]] | None,
                unknown: Sequence[str]) -> None:
    """The list files of docs/DESIGN.md. Those of an earlier run with another --min-images, or with the
    open-set split when it is now disabled, are removed: beside the current ones they would pass for
    lists of this dataset."""
    write_list(annotations_dir / "annotations_merged_all.txt", [(r.path, r.individual) for r in usable])
    current = (f"annotations_merged_min{min_images}.txt", f"kept_ids_min{min_images}.txt")
    write_list(annotations_dir / current[0], [(r.path, r.individual) for r in kept])
    _write_names(annotations_dir / current[1], sorted({r.individual for r in kept}))
    for path in annotations_dir.iterdir():
        if MIN_IMAGES_FILES.fullmatch(path.name) and path.name not in current:
            path.unlink()
    for split, rows in closed.items():
        write_list(annotations_dir / f"{split}.txt", rows)
    open_dir = annotations_dir / "open_set"
    if open_set is None:
        for name in OPEN_SET_FILES:
            (open_dir / name).unlink(missing_ok=True)
        return
    for split, rows in open_set.items():
        write_list(open_dir / f"{split}.txt", rows)
    _write_names(open_dir / "unknown_ids.txt", unknown)


def prepared_info(raw_dir: Path, input_kind: str, min_images: int, seed: int, fractions: Sequence[float],
                  kept: Sequence[Record], closed: dict[str, list[Row]],
                  open_set: dict[str, list[Row]] | None, unknown: Sequence[str], fix: LabelsFix | None,
                  problems: int, standins: bool) -> dict:
    """The content of `prepared.json`: the DESIGN.md keys first, then counts a reader may check."""
    num_classes = len({r.individual for r in kept})
    info = {"raw_dir": str(raw_dir), "min_images": min_images, "seed": seed, "num_classes": num_classes,
            "num_images": len(kept), "format_version": FORMAT_VERSION, "input": input_kind,
            "fractions": list(fractions), "splits": {s: len(rows) for s, rows in closed.items()},
            "sources": count_summary(kept)["per_source"], "labels_fix": fix.source if fix else None,
            "problems": problems, "standins": standins, "open_set": None}
    if open_set is not None:
        info["open_set"] = {
            "num_classes": num_classes - len(unknown), "num_unknown": len(unknown),
            "unknown_val_individuals": len({n for _, n in open_set["unknown_val"]}),
            "unknown_test_individuals": len({n for _, n in open_set["unknown_test"]}),
            "splits": {s: len(rows) for s, rows in open_set.items()}}
    return info


# --- the whole run ------------------------------------------------------------------------------

def check_parameters(min_images: int, fractions: Sequence[float], open_set_individuals: int,
                     workers: int | None = None) -> None:
    """Refuse parameters that can only fail later, before any work is done."""
    if min_images < MIN_IMAGES_PER_INDIVIDUAL:
        raise PrepareError(f"--min-images {min_images}: at least {MIN_IMAGES_PER_INDIVIDUAL} are needed "
                           f"so that every individual is in train, val and test")
    split_counts(MIN_IMAGES_PER_INDIVIDUAL, fractions)  # raises SplitError for bad fractions
    if open_set_individuals < 0 or open_set_individuals == 1:
        raise PrepareError(f"--open-set-individuals {open_set_individuals}: use 0 (no open-set split) "
                           f"or at least 2 (one for unknown_val, one for unknown_test)")
    if workers is not None and workers < 0:
        raise PrepareError(f"--workers {workers}: give a number of threads, or 0 (as when left out) for up to 8")


def prepare(raw_dir: str | Path | None = None, out_dir: str | Path = DEFAULT_OUT_DIR, *,
            folder: str | Path | None = None, list_file: str | Path | None = None,
            min_images: int = DEFAULT_MIN_IMAGES, seed: int = DEFAULT_SEED,
            fractions: Sequence[float] = DEFAULT_FRACTIONS,
            open_set_individuals: int = DEFAULT_OPEN_SET_INDIVIDUALS,
            labels_fix: str | Path | LabelsFix | None = None, spaces_to_underscores: bool = False,
            workers: int | None = None) -> PrepareResult:
    """Run every stage and write `<out_dir>/annotations/`; see the module doc.

    Raises AnnotationError, SplitError or PrepareError with a one-line message. The validation report
    is written even when no individual is left, so that the reason can be read.
    """
    check_parameters(min_images, fractions, open_set_individuals, workers)
    if folder is not None and Path(out_dir).resolve().is_relative_to(Path(folder).resolve()):
        # The next run would read the outputs (annotations/, the image cache) as individuals' photos.
        raise PrepareError(f"--out-dir {out_dir} is inside --folder {folder}: choose an --out-dir outside the "
                           "folder of photos")
    atomic.check_folder_possible(Path(out_dir) / "annotations")  # before decoding thousands of images
    fix = LabelsFix.load(labels_fix) if isinstance(labels_fix, (str, Path)) else labels_fix
    raw, input_kind, parsed = read_input(_path(raw_dir), _path(folder), _path(list_file))
    log.info("input      %s: %s", input_kind, raw)
    nested = sites_as_individuals(raw, parsed) if input_kind == "folder" else None
    if nested:
        log.warning("warning    %s", nested)
    standins = input_kind == "cvjena" and holds_standins(raw)
    if standins:
        log.warning("stand-in   these are synthetic images drawn by src.data.standin, not chimpanzees "
                    "(prepared.json records it; training says so)")
    log.info("parsed     %s", describe(parsed))
    fixed, fix_exclusions, fix_info = apply_labels_fix(parsed, fix)
    fixed = check_names(fixed, spaces_to_underscores)
    annotated_kept = filter_min_images(fixed, min_images)
    log.info("min%-7d %s by the annotations alone", min_images, describe(annotated_kept))
    if input_kind == "cvjena":
        check_release_complete(fixed, raw)
    annotated_individuals = {r.individual for r in annotated_kept}
    # Refused before decoding: problem images can only lower this count. Fewer than 2 individuals is
    # left to the end, which names --min-images and writes the report saying why.
    if open_set_individuals and len(annotated_individuals) >= 2:
        choose_unknown(sorted(annotated_individuals), open_set_individuals, seed)

    problems, checks = check_images(fixed, raw, workers)
    problem_origins = {e.record.origin for e in problems}
    usable = [r for r in fixed if r.origin not in problem_origins]
    kept = filter_min_images(usable, min_images)
    exclusions = fix_exclusions + problems
    _log_exclusions(exclusions)
    log.info("usable     %s", describe(usable))
    _log_left_out(fixed, usable, min_images)

    annotations_dir = Path(out_dir) / "annotations"
    kept_individuals = len({r.individual for r in kept})
    # Split before writing anything, so that a split that cannot be made leaves an earlier output whole.
    splits = make_splits([(r.path, r.individual) for r in kept], fractions, seed, open_set_individuals) \
        if kept_individuals >= 2 else None
    report = build_report(raw, input_kind, min_images, parsed, fixed, exclusions, usable, kept, fix_info,
                          splits[0] if splits else None, checks)
    # Two runs into one --out-dir (say a job array's `prepare && train`, or another seed tried at once)
    # would interleave their files: one seed's train.txt beside the other's prepared.json. Each writes
    # all of its files under the lock, so the last one to write leaves a whole output.
    with _writing_alone(annotations_dir):
        (annotations_dir / "prepared.json").unlink(missing_ok=True)  # a failed run leaves none behind
        md_path, _ = write_report(report, annotations_dir)
        if splits is None:
            raise PrepareError(f"{kept_individuals} individual(s) with at least {min_images} usable images; "
                               f"identification needs 2 or more ({len(exclusions):,} of {len(parsed):,} "
                               f"images excluded, see {md_path})")
        log.info("kept       %s -> num_classes %d", describe(kept), kept_individuals)
        closed, open_set, unknown = splits
        prepared = prepared_info(raw, input_kind, min_images, seed, fractions, kept, closed, open_set,
                                 unknown, fix, report["problems"], standins)
        write_lists(annotations_dir, min_images, usable, kept, closed, open_set, unknown)
        write_metadata(annotations_dir / "metadata.csv", parsed, fixed, exclusions, checks, closed, open_set)
        atomic.write_text(annotations_dir / "prepared.json", json.dumps(prepared, indent=2) + "\n")
    _log_splits(prepared)
    log.info("wrote      %s (report: %s)", annotations_dir, md_path.name)
    return PrepareResult(annotations_dir, prepared, report)


@contextmanager
def _writing_alone(annotations_dir: Path) -> Iterator[None]:
    """Hold `annotations/.prepare.lock` for the block, saying so when another run holds it first; training,
    evaluation and inference read the lists under it, shared (`PreparedData`)."""
    say = partial(log.warning, "waiting    for another prepare writing into %s ...", annotations_dir)
    with locks.exclusive(annotations_dir / PREPARE_LOCK, on_wait=say):
        for folder in (annotations_dir, annotations_dir / "open_set"):
            for leftover in atomic.remove_leftovers_in(folder):
                log.info("removed    %s, a partial write of a prepare that was killed", leftover)
        yield


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _log_exclusions(exclusions: Sequence[Exclusion]) -> None:
    by_category = Counter(e.category for e in exclusions)
    detail = ", ".join(f"{n:,} {category}" for category, n in by_category.most_common())
    log.info("excluded   %s image(s)%s", f"{len(exclusions):,}", f": {detail}" if detail else "")


LEFT_OUT_SHOWN = 10  # names on the console; the report lists every one


def _log_left_out(fixed: Sequence[Record], usable: Sequence[Record], min_images: int) -> None:
    """Name the individuals below --min-images: the model will not know them, so a photo of one is
    given another individual's name (or `unknown`), which a count alone does not make plain."""
    counts = Counter(r.individual for r in usable)
    below = sorted(name for name in {r.individual for r in fixed} if counts[name] < min_images)
    if below:
        shown = ", ".join(f"{name} {counts[name]}" for name in below[:LEFT_OUT_SHOWN])
        more = f", {len(below) - LEFT_OUT_SHOWN:,} more" if len(below) > LEFT_OUT_SHOWN else ""
        log.info("left out   %s individual(s) below %d usable images, which training will not see: %s%s",
                 f"{len(below):,}", min_images, shown, more)


def _log_splits(prepared: dict) -> None:
    log.info("split      %s", " / ".join(f"{s} {n:,}" for s, n in prepared["splits"].items()))
    if prepared["open_set"]:
        o = prepared["open_set"]
        log.info("open set   %d known, %d held out (%d in unknown_val, %d in unknown_test)",
                 o["num_classes"], o["num_unknown"], o["unknown_val_individuals"],
                 o["unknown_test_individuals"])


# --- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = command_parser("src.data.prepare",
                       "Prepare the dataset: merged and min-N lists, splits, metadata, validation report.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--folder", type=path_argument, metavar="ROOT",
                        help="a folder per individual: <root>/<individual>/<image>")
    source.add_argument("--list", dest="list_file", type=path_argument, metavar="FILE",
                        help="a '<relative path> <individual>' list; paths relative to --raw-dir")
    p.add_argument("--raw-dir", type=path_argument, metavar="DIR",
                   help=f"the cvjena release (default {DEFAULT_RAW_DIR}), or the folder --list paths are "
                        f"relative to (default: the list's folder)")
    p.add_argument("--out-dir", type=path_argument, default=DEFAULT_OUT_DIR, metavar="DIR",
                   help=f"outputs go to <out-dir>/annotations/ (default {DEFAULT_OUT_DIR})")
    p.add_argument("--min-images", type=int, default=DEFAULT_MIN_IMAGES, metavar="N",
                   help=f"keep individuals with at least this many usable images (default {DEFAULT_MIN_IMAGES})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S",
                   help=f"seed of the splits (default {DEFAULT_SEED})")
    p.add_argument("--fractions", type=float, nargs=3, default=list(DEFAULT_FRACTIONS),
                   metavar=("TRAIN", "VAL", "TEST"),
                   help=f"split fractions (default {' '.join(map(str, DEFAULT_FRACTIONS))})")
    p.add_argument("--open-set-individuals", type=int, default=DEFAULT_OPEN_SET_INDIVIDUALS, metavar="K",
                   help=f"individuals held out for the open-set split (default {DEFAULT_OPEN_SET_INDIVIDUALS}; "
                        "0 disables it)")
    p.add_argument("--labels-fix", type=path_argument, metavar="FILE",
                   help="aliases and exclusions (YAML or text), applied before filtering")
    p.add_argument("--spaces-to-underscores", action="store_true",
                   help="replace whitespace in individual names by '_' instead of refusing them")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if any image problem was found (missing, unreadable, duplicate)")
    p.add_argument("--download", action="store_true",
                   help="fetch the public release into --raw-dir first (resumes, then verifies)")
    p.add_argument("--url", default=DEFAULT_URL, help="archive to download (default: the public release)")
    p.add_argument("--workers", type=int, metavar="N", help="threads for decoding images (default: up to 8)")
    return p


@command_main
def main(argv: Sequence[str] | None = None) -> int:
    """0 on success, 1 when --strict found problems, 2 with one `error:` line for bad input."""
    args = build_parser().parse_args(argv)
    with _progress_on_stdout():
        try:
            result = _run(args)
        except (AnnotationError, SplitError, PrepareError, DownloadError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.strict and result.problems:
        print(f"error: --strict: {result.problems} image problem(s); see "
              f"{result.annotations_dir / 'validation_report.md'}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> PrepareResult:
    if args.download:
        if args.folder or args.list_file:
            raise PrepareError("--download fetches the cvjena release; it cannot be combined with "
                               "--folder or --list")
        fetch_release(args.raw_dir or DEFAULT_RAW_DIR, args.url)
    return prepare(args.raw_dir, args.out_dir, folder=args.folder, list_file=args.list_file,
                   min_images=args.min_images, seed=args.seed, fractions=args.fractions,
                   open_set_individuals=args.open_set_individuals, labels_fix=args.labels_fix,
                   spaces_to_underscores=args.spaces_to_underscores, workers=args.workers)


class _StdoutLines(logging.StreamHandler):
    """A stdout that cannot be written (a reader that stops early, `prepare ... | head -1`, or a full
    disk) drops the lines that follow, as `tables.print_stdout` does, where logging reported each one
    in a 20-line "--- Logging error ---": the run goes on, and a full disk ends it with one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            stdout_failed(exc)
        else:
            super().handleError(record)


@contextmanager
def _progress_on_stdout() -> Iterator[None]:
    """Progress lines of this module and `src.data.download` on stdout while the command runs
    (errors go to stderr); removed afterwards, so that calling `main` twice does not print twice."""
    parent = logging.getLogger("src.data")
    handler = _StdoutLines(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = parent.level
    parent.addHandler(handler)
    parent.setLevel(logging.INFO)
    try:
        yield
    finally:
        parent.removeHandler(handler)
        parent.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
