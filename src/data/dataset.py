"""What training, evaluation and inference read: the prepared split lists, as labelled RGB images.

`python -m src.data.prepare` writes list files of `<path relative to the raw folder> <individual>` and
records the raw folder in `prepared.json`. This module finds those files (`PreparedData`), turns
individual names into class ids (`ClassIndex`, saved inside checkpoints so that a model's outputs keep
their meaning when the lists change) and loads the images (`ImageListDataset`).
"""
from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from src import locks
from src.data.annotations import RELEASE_FOLDER
from src.data.decode import decode_for_cache
from src.data.io import IMAGE_EXTENSIONS, ImageLoadError
from src.data.lists import ListFormatError, Row, name_problem, read_list
from src.data.splits import SPLITS, UNKNOWN_SPLITS
from src.errors import clipped, clipped_repr, folder_or_file, is_whole
from src.textfiles import read_json, read_utf8

FORMAT_VERSION = 1  # of prepared.json: written by src/data/prepare.py, read here
PREPARE_LOCK = ".prepare.lock"  # in annotations/: prepare writes under it (exclusive), readers read (shared)
_REQUIRED_KEYS = ("raw_dir", "min_images", "seed", "num_classes", "format_version")
_RERUN = "run `python -m src.data.prepare` to (re)create it"

log = logging.getLogger(__name__)


class DatasetError(Exception):
    """A problem with the prepared dataset, in one line that says what to do about it."""


def _not_prepared(root: Path, path: Path) -> str:
    """Why `root` holds no prepared dataset (`path`, its prepared.json, is missing), naming the folder
    to give where the user gave a folder near one."""
    if (root / "prepared.json").is_file():
        # `--data-root data/x/annotations`: the last message suggested preparing into it.
        return (f"{root} is the annotations folder of a prepared dataset: give the dataset's own folder, "
                f"{root.parent} (the --out-dir of prepare)")
    if (root / RELEASE_FOLDER).is_dir() or root.name == RELEASE_FOLDER:
        # `data.root: data/x/raw`: the last message suggested preparing into the raw folder.
        above = [p for p in root.parents if (p / "annotations" / "prepared.json").is_file()]
        fix = (f"give the prepared one, {above[0]} (the --out-dir of prepare)" if above else
               f"prepare it (`python -m src.data.prepare --raw-dir {root} --out-dir <folder>`) and give <folder>")
        return f"{root} is a raw folder (the --raw-dir of prepare), not a prepared dataset: {fix}"
    if _holds_individual_folders(root):
        # `data.root: photos`: the last message suggested `--out-dir photos`, which prepare --folder refuses.
        return (f"{root} is a folder of photos (the --folder of prepare), not a prepared dataset: prepare it "
                f"(`python -m src.data.prepare --folder {root} --out-dir <folder>`, a folder outside it) and "
                "give <folder>")
    # E.g. evaluate run from another folder on a checkpoint whose config says `data/...`.
    relative = "" if root.is_absolute() else f" (a relative root is read from the working folder, {Path.cwd()})"
    return f"{path} not found{relative}: {_RERUN} (e.g. --out-dir {root})"


def _holds_individual_folders(root: Path) -> bool:
    """Whether `root` looks like the input of prepare --folder: a sub-folder holding an image."""
    try:
        return any(sub.is_dir() and any(path.suffix.lower() in IMAGE_EXTENSIONS for path in sub.iterdir())
                   for sub in root.iterdir())
    except OSError:  # missing, not a folder, or not readable: the generic message says what to do
        return False


def _read_prepared(root: Path) -> dict:
    """`<root>/annotations/prepared.json`, checked; DatasetError saying what to do when it is unusable."""
    path = root / "annotations" / "prepared.json"
    if not folder_or_file(path, DatasetError, "prepared dataset")[1]:
        raise DatasetError(_not_prepared(root, path))
    try:
        meta = read_json(path, DatasetError)
    except DatasetError as exc:
        raise DatasetError(f"{exc}; {_RERUN}") from None
    missing = [key for key in _REQUIRED_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise DatasetError(f"{path}: missing {', '.join(missing)}; {_RERUN}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{path}: format_version {clipped_repr(meta['format_version'])}, this code reads "
                           f"{FORMAT_VERSION}; {_RERUN}")
    wrong = [key for key in _REQUIRED_KEYS[1:] if not is_whole(meta[key])]
    if not isinstance(meta["raw_dir"], str) or "\0" in meta["raw_dir"]:  # no path holds a NUL
        wrong.insert(0, "raw_dir")
    if wrong:
        raise DatasetError(f"{path}: a value has the wrong type ("
                           + ", ".join(clipped(f"{key}: {meta[key]!r}", 80) for key in wrong) + f"); {_RERUN}")
    return meta


def _reading(root: Path):
    """The prepare lock of `root`, shared: `prepare` writes its files under it, exclusive."""
    annotations = root / "annotations"
    return locks.shared(annotations / PREPARE_LOCK,
                        on_wait=partial(log.warning, "waiting for a prepare writing into %s ...", annotations))


@dataclass(frozen=True)
class PreparedData:
    """The output of `prepare` under `root`: where the images are and which split lists exist."""

    root: Path
    raw_dir: Path
    min_images: int
    seed: int
    num_classes: int
    standins: bool = False  # synthetic images of src.data.standin (prepared.json's `standins`)
    prepared: dict = field(default_factory=dict, compare=False, repr=False)  # prepared.json as loaded

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        """Read `<root>/annotations/prepared.json`; a relative raw_dir is taken relative to root."""
        root = Path(root)
        with _reading(root):
            meta = _read_prepared(root)
        return cls(root=root, raw_dir=root / meta["raw_dir"], min_images=meta["min_images"], seed=meta["seed"],
                   num_classes=meta["num_classes"], standins=meta.get("standins") is True, prepared=meta)

    def has_open_set(self) -> bool:
        """Whether prepare wrote the open-set lists (not with `--open-set-individuals 0`)."""
        return (self.root / "annotations" / "open_set").is_dir()

    def splits(self, names: Sequence[str], open_set: bool = False) -> dict[str, list[Row]]:
        """The rows of each named split (`split`), read together while no prepare writes into `root` (its
        lock, shared), so that all are of one prepare: one running into the same folder wrote train.txt,
        then val.txt, ..., and a reader in between got a new train list with an old val list, whose
        images overlap. A prepare that ran since `load` is refused, its lists being of another dataset
        than the prepared.json loaded (raw_dir, num_classes)."""
        with self._as_loaded():
            return {name: self._read_split(name, open_set) for name in names}

    def splits_and_sources(self, names: Sequence[str], open_set: bool = False
                           ) -> tuple[dict[str, list[Row]], dict[str, str]]:
        """`splits`, and image path -> source (CZoo, CTai, ...) from `annotations/metadata.csv` (empty
        when absent), read under the same hold: read later, a prepare in between left the metadata of
        other images, and images of the lists came out of source `unknown`."""
        with self._as_loaded():
            return {name: self._read_split(name, open_set) for name in names}, self._read_sources()

    @contextmanager
    def _as_loaded(self) -> Iterator[None]:
        """Hold the prepare lock of `root`, shared, for the block, refusing a prepare that ran since `load`."""
        with _reading(self.root):
            path = self.root / "annotations" / "prepared.json"
            try:
                current = read_json(path, DatasetError)
            except DatasetError:  # removed: a prepare that failed or was killed since
                current = None
            if current != self.prepared:
                raise DatasetError(f"{path} changed since this command read it (a prepare into {self.root} ran "
                                   "meanwhile): run the command again once prepare has finished")
            yield

    def _read_sources(self) -> dict[str, str]:
        path = self.root / "annotations" / "metadata.csv"
        if not path.is_file():
            return {}
        reader = csv.DictReader(read_utf8(path, DatasetError).splitlines())
        missing = [column for column in ("path", "source") if column not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: not the metadata.csv prepare writes (no column {', '.join(missing)}); "
                               "re-run prepare")
        return {row["path"]: row["source"] or "unknown" for row in reader}

    def split(self, name: str, open_set: bool = False) -> list[Row]:
        """Rows of `annotations/<name>.txt`, or of `annotations/open_set/<name>.txt` when open_set."""
        return self.splits([name], open_set)[name]

    def _read_split(self, name: str, open_set: bool) -> list[Row]:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise DatasetError(f"split name {name!r} must be a plain name such as 'train'")
        folder = self.root / "annotations" / ("open_set" if open_set else "")
        path = folder / f"{name}.txt"
        if not path.is_file():
            written = SPLITS + (UNKNOWN_SPLITS if open_set else ())
            if name not in written:
                more = "" if open_set else f" (and, with the open-set lists, {', '.join(UNKNOWN_SPLITS)})"
                raise DatasetError(f"no split {name!r}: prepare writes {', '.join(written)}{more}")
            if open_set and not self.has_open_set():  # said "split file not found; run prepare", which had run
                raise DatasetError(f"{self.root} was prepared without an open-set split (--open-set-individuals 0), "
                                   "which data.open_set: true needs: prepare it again with --open-set-individuals K "
                                   "(at least 2), or set data.open_set: false")
            raise DatasetError(f"{path}: split file not found; {_RERUN}")
        try:
            rows = read_list(path)
        except ListFormatError as exc:
            raise DatasetError(str(exc)) from None
        check_repeats(rows, path)
        return rows


def check_repeats(rows: list[Row], path: Path) -> None:
    """Prepare lists each image once; a hand-edited list may not. An image under two individuals is
    refused (it would be trained as both); one listed again under the same one is warned about, since
    it is read, trained and scored once per line."""
    labels: dict[str, str] = {}
    repeated = []
    for rel, name in rows:
        if rel in labels:
            if labels[rel] != name:
                raise DatasetError(f"{path}: {rel} is listed as {clipped_repr(labels[rel])} and as "
                                   f"{clipped_repr(name)}: an image shows one individual (re-run prepare, or edit "
                                   "the list)")
            repeated.append(rel)
        labels[rel] = name
    if repeated:
        log.warning("%s: %d line(s) repeat an earlier one (first: %s); each line counts, so such an image "
                    "weighs more in training and scores", path, len(repeated), repeated[0])


class ClassIndex:
    """Individual name <-> class id, where the id is the name's position in `names`.

    `from_rows` sorts the names (plain code-point order, the same on every machine and locale), so the
    same individuals always get the same ids. A checkpoint stores `to_list()`; `from_list` restores
    exactly that order, whatever lists exist when the checkpoint is loaded.
    """

    def __init__(self, names: Iterable[str]):
        names = tuple(names)
        for name in names:
            problem = name_problem(name)
            if problem is not None:
                raise DatasetError(f"class name {clipped_repr(name)} {problem}")
        if len(set(names)) != len(names):
            duplicate = next(n for i, n in enumerate(names) if n in names[:i])
            raise DatasetError(f"class name {clipped_repr(duplicate)} appears twice")
        self._names = names
        self._ids = {name: i for i, name in enumerate(names)}

    @classmethod
    def from_rows(cls, rows: Iterable[Row]) -> ClassIndex:
        """The sorted individuals of a list, e.g. of the train split."""
        return cls(sorted({name for _, name in rows}))

    @classmethod
    def from_list(cls, names: Sequence[str]) -> ClassIndex:
        """Inverse of `to_list` (a checkpoint's `classes`): keeps the given order."""
        return cls(names)

    def to_list(self) -> list[str]:
        return list(self._names)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def index(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise DatasetError(f"individual {clipped_repr(name)} is not one of the {len(self)} classes") from None

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassIndex) and self._names == other._names

    def __hash__(self) -> int:
        return hash(self._names)

    def __repr__(self) -> str:
        more = ", ..." if len(self) > 3 else ""
        return f"ClassIndex({len(self)} classes: {', '.join(self._names[:3])}{more})"


def data_fingerprint(rows: list[tuple[str, str]], classes: ClassIndex) -> str:
    """sha256 of a training split's images, their labels and the class list: a checkpoint records it,
    and resuming or evaluating on data that differs (re-prepared, relabelled) is refused."""
    digest = hashlib.sha256()
    for rel, name in sorted(rows):
        digest.update(f"{rel}\t{name}\n".encode())
    digest.update("\n".join(classes.names).encode())
    return digest.hexdigest()


class ImageListDataset(Dataset):
    """`(image, label)` for each row, the image decoded as the cache stores it (`decode_for_cache`:
    `cache_size x cache_size x 3` uint8), every epoch: the plain pipeline's DataLoader dataset.

    An image that fails to load yields None instead of raising, with one warning per path per
    process; `collate_skip_none` drops those from the batch and counts them.
    """

    def __init__(self, rows: Iterable[Row], raw_dir: str | Path, class_index: ClassIndex, cache_size: int):
        self.rows = list(rows)
        self.raw_dir = Path(raw_dir)
        self.labels = [class_index.index(name) for _, name in self.rows]  # unknown names fail here, early
        self.cache_size = cache_size
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        rel = self.rows[i][0]
        try:
            pixels = decode_for_cache(self.raw_dir / rel, self.cache_size)
        except ImageLoadError as exc:
            if rel not in self._warned:
                self._warned.add(rel)
                log.warning("skipping unreadable image %s", exc)
            return None
        return torch.from_numpy(pixels), self.labels[i]


def collate_skip_none(batch: list[tuple[Any, int] | None]) -> tuple[Any, torch.Tensor, int]:
    """`(images, labels, n_skipped)`: the batch without the None samples of unreadable images.

    DataLoader workers are separate processes, so a counter on the dataset never reaches the training
    loop; the count travels with the batch instead. A batch with nothing left gives an empty image
    tensor and empty labels. The kept images must share a shape (`ImageListDataset` decodes every
    one at the cache size).
    """
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    images, labels = default_collate(kept)
    return images, labels, skipped
