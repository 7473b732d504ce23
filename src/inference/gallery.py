"""Galleries: recognise individuals the model never saw in training, without retraining it.

    python -m src.inference.gallery enroll --gallery g.npz --checkpoint c.pt --name Zuri photos/zuri/
    python -m src.inference.gallery enroll --gallery g.npz --checkpoint c.pt --from-split data/chimpanzee_faces train
    python -m src.inference.gallery list --gallery g.npz
    python -m src.inference.gallery remove --gallery g.npz Zuri

A gallery holds, for every enrolled photo, its L2-normalised embedding, its individual, the file it
came from and the sha256 of that file's bytes (so a copy or a moved photo is recognised as enrolled),
plus the sha256 of the checkpoint that computed the embeddings. Embeddings of other
weights live in another space, so a gallery refuses any other checkpoint (and exports of one). It
holds only what was enrolled; `--from-split <prepared root> train` enrolls the training individuals
from the prepared data, so one gallery can cover known and new individuals alike.

Matching (`Gallery.scores`, `scoring.MATCH_MODES`): `prototype` (the default) scores an individual
by the cosine similarity to its mean embedding, renormalised; `nearest` by its most similar enrolled
photo (the 1-NN similarity that evaluation reports and calibrates its threshold on). Averaging
cancels the pose and lighting of single photos, which is why prototypes identified new individuals
better in the measurements quoted in docs/INFERENCE.md (Galleries).

Storage: one `.npz` written by numpy and read with `allow_pickle=False`: plain arrays only, so a
crafted file cannot run code. Its member names are checked before anything is read, and each
array's declared size against the bytes it holds before it is allocated. Every write goes to a
temporary file in the same folder, is fsynced and renamed over the old file, so a crash never
leaves half a gallery.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import math
import re
import sys
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src import atomic, locks
from src.data.dataset import DatasetError, PreparedData
from src.data import lists
from src.data.io import file_problem
from src.data.lists import canonical_name
from src.errors import capped, clipped_repr, command_main, command_parser, missing, path_argument
from src.inference.identify import DEFAULT_BATCH_SIZE, USAGE_ERRORS, Embedded, Identifier, PhotoBytes
from src.inference.inputs import Inputs, Skipped, collect_images, printable
from src.models.scoring import gallery_scores
from src.safe_load import PICKLE_MAGIC, ZIP_MAGIC, holds_torch_pickle
from src.tables import counted, format_rows, print_stdout

FORMAT_VERSION = 2  # 2 added `digests`; a format-1 gallery is read with its photos' digests unknown
ARRAYS = ("format_version", "checkpoint_sha256", "names", "embeddings", "labels", "sources", "digests")
FORMAT_1_ARRAYS = ARRAYS[:-1]
UNKNOWN_DIGEST = ""  # a photo enrolled by format 1, or added from Python without its file's digest
SHA256_HEX = re.compile("[0-9a-f]{64}")  # hashlib's hexdigest
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
ALREADY_ENROLLED_SHOWN = 10  # photos named one by one when enrolled again; beyond, a count


class GalleryError(ValueError):
    """A gallery that cannot be used as asked; one line (the command lines exit 2)."""


def name_refusal(name) -> str | None:
    """Why `name` cannot be an individual's (`lists.name_problem`), as a sentence, or None."""
    problem = lists.name_problem(name)
    if problem is None:
        return None
    fixed = lists.underscored(name) if isinstance(name, str) else ""
    suggestion = f" (e.g. {clipped_repr(fixed)})" if fixed != name and lists.name_problem(fixed) is None else ""
    return f"individual name {clipped_repr(name)} {problem}{suggestion}"


def check_name(name: str) -> None:
    problem = name_refusal(name)
    if problem is not None:
        raise GalleryError(problem)


@dataclass
class Gallery:
    """Enrolled embeddings. Invariant: every name has at least one embedding, and `labels` index
    `names`, so that column i of `scores` is `names[i]`."""

    checkpoint_sha256: str
    names: list[str]
    embeddings: np.ndarray  # M x D float32, unit rows
    labels: np.ndarray      # M int64
    sources: list[str]      # M absolute paths of the enrolled photos
    digests: list[str] | None = None  # M sha256 of the photos' bytes (hex) or UNKNOWN_DIGEST; None: all unknown

    def __post_init__(self) -> None:
        if self.digests is None:  # built from its fields by code written before format 2
            self.digests = [UNKNOWN_DIGEST] * len(self.sources)

    @classmethod
    def new(cls, checkpoint_sha256: str, dim: int) -> Gallery:
        return cls(checkpoint_sha256, [], np.zeros((0, dim), np.float32), np.zeros(0, np.int64), [], [])

    # --- storage --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Gallery:
        """Read and validate a gallery file. Raises GalleryError (pickled content included)."""
        path = existing_gallery(path)
        with gallery_archive(path) as (archive, members):
            arrays = {key: read_member(archive, member, path) for key, member in members}
        return cls._validated(arrays, path)

    @classmethod
    def _validated(cls, arrays: dict[str, np.ndarray], path: Path, problem: str = "corrupt gallery") -> Gallery:
        """The gallery `arrays` (one per name in ARRAYS, as `gallery_members` and `save` provide) hold."""
        if arrays["format_version"].shape != () or arrays["format_version"].dtype.kind not in "iu":
            raise GalleryError(f"{path}: {problem}: format_version must be one integer")
        version = int(arrays["format_version"])
        if version > FORMAT_VERSION:
            raise GalleryError(f"{path}: gallery format {version} is newer than this code reads ({FORMAT_VERSION})")
        if version >= 2 and "digests" not in arrays:
            raise GalleryError(f"{path}: {problem}: format {version} needs digests")
        names, embeddings, labels, sources = (arrays[k] for k in ("names", "embeddings", "labels", "sources"))
        digests = arrays["digests"] if version >= 2 else np.full(labels.shape, UNKNOWN_DIGEST)
        sha256 = arrays["checkpoint_sha256"]
        problems = [
            (sha256.shape != () or sha256.dtype.kind != "U", "checkpoint_sha256 must be one string"),
            (names.ndim != 1 or names.dtype.kind != "U", "names must be a 1-D array of strings"),
            (np.unique(names).size != names.size, "names must be unique"),
            (embeddings.ndim != 2 or embeddings.dtype.kind != "f", "embeddings must be a 2-D float array"),
            (embeddings.dtype.kind == "f" and not np.isfinite(embeddings).all(), "embeddings must be finite"),
            # `add` stores unit rows, which matching assumes: a zero row would score 0 against everything.
            (embeddings.ndim == 2 and embeddings.dtype.kind == "f"
             and not np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-3),
             "embeddings must be rows of length 1"),
            (labels.shape != embeddings.shape[:1] or labels.dtype.kind not in "iu",
             "labels must be one integer per embedding"),
            (sources.shape != labels.shape or sources.dtype.kind != "U", "sources must be one string per embedding"),
            (digests.shape != labels.shape or digests.dtype.kind != "U", "digests must be one string per embedding"),
            (not np.array_equal(np.unique(labels), np.arange(names.size)),
             "every individual needs an embedding, and labels must index names"),
        ]
        for failed, message in problems:
            if failed:
                raise GalleryError(f"{path}: {problem}: {message}")
        bad_name = next(filter(None, map(name_refusal, names.tolist())), None)  # the names enroll refuses
        if bad_name is not None:
            raise GalleryError(f"{path}: {problem}: {bad_name}")
        return cls(str(sha256), names.tolist(), embeddings.astype(np.float32),
                   labels.astype(np.int64), sources.tolist(), digests.tolist())

    def save(self, path: str | Path) -> None:
        """Write atomically. A gallery that `load` would refuse (its fields edited by hand into an
        inconsistent state) raises GalleryError instead, and the file already at `path` is kept."""
        arrays = {"format_version": np.int64(FORMAT_VERSION), "checkpoint_sha256": np.str_(self.checkpoint_sha256),
                  "names": np.array(self.names, dtype=np.str_), "embeddings": np.asarray(self.embeddings),
                  "labels": np.asarray(self.labels), "sources": np.array(self.sources, dtype=np.str_),
                  "digests": np.array(self.digests, dtype=np.str_)}
        self._validated({key: np.asarray(value) for key, value in arrays.items()}, Path(path),
                        problem="not saved, the gallery is inconsistent")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic.write_bytes(path, buffer.getvalue())

    # --- contents -------------------------------------------------------------------------------

    def check_checkpoint(self, checkpoint_sha256: str, embedding_dim: int) -> None:
        if checkpoint_sha256 != self.checkpoint_sha256:
            raise GalleryError(
                f"the gallery was enrolled with another checkpoint (sha256 {self.checkpoint_sha256[:12]}..., "
                f"this one is {checkpoint_sha256[:12]}...): its embeddings do not compare with this model's; "
                "enroll the individuals again with this checkpoint")
        if self.embeddings.shape[1] != embedding_dim:
            raise GalleryError(f"corrupt gallery: its embeddings have {self.embeddings.shape[1]} dimensions, "
                               f"the model's {embedding_dim}")

    def counts(self) -> dict[str, int]:
        return dict(zip(self.names, np.bincount(self.labels, minlength=len(self.names)).tolist()))

    def owners(self) -> dict[str, str]:
        """Enrolled file -> its individual, to skip files enrolled before."""
        return {source: self.names[label] for source, label in zip(self.sources, self.labels.tolist())}

    def photos(self) -> dict[str, tuple[str, str]]:
        """Digest of an enrolled photo's bytes -> (its individual, its file): a copy of it, or the
        photo moved, is the same photo."""
        return {digest: (self.names[label], source)
                for digest, label, source in zip(self.digests, self.labels.tolist(), self.sources)
                if digest != UNKNOWN_DIGEST}

    def add(self, name: str, embeddings: np.ndarray, sources: Sequence[str],
            digests: Sequence[str] | None = None) -> None:
        """Enroll photos of `name`: a new individual, or more photos of an enrolled one.
        `embeddings` is `M x D` (D the model's embedding size, e.g. from `Identifier.embed`), one row
        per file of `sources`, with the sha256 of each file's bytes in `digests` (`photo_digest`; None:
        unknown); rows are L2-normalised here. Raises GalleryError, leaving the gallery unchanged, for
        input that would make it unusable (and, once saved, unloadable)."""
        name = canonical_name(name)
        check_name(name)
        embeddings = np.asarray(embeddings)
        sources = [str(source) for source in sources]
        digests = [UNKNOWN_DIGEST] * len(sources) if digests is None else list(digests)
        dim = self.embeddings.shape[1]
        if embeddings.ndim != 2 or embeddings.dtype.kind not in "fiu" or embeddings.shape[1] != dim:
            raise GalleryError(f"{name}: embeddings must be a 2-D array of {dim}-dimensional rows (one per "
                               f"photo), not shape {embeddings.shape} of {embeddings.dtype}")
        if len(embeddings) == 0:
            raise GalleryError(f"{name}: no embeddings given; an individual needs at least one photo")
        if len(sources) != len(embeddings):
            raise GalleryError(f"{name}: {len(embeddings)} embeddings but {len(sources)} sources; give one "
                               "file per embedding")
        if len(digests) != len(sources):
            raise GalleryError(f"{name}: {len(sources)} sources but {len(digests)} digests; give one per file")
        if not all(isinstance(digest, str) and (digest == UNKNOWN_DIGEST or SHA256_HEX.fullmatch(digest))
                   for digest in digests):
            raise GalleryError(f"{name}: digests must be the photos' sha256 as 64 hex digits (`photo_digest`), "
                               "or '' where unknown")
        norms = np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
        if not (np.isfinite(norms).all() and (norms > 0).all()):
            raise GalleryError(f"{name}: embeddings must be finite and non-zero")
        unit = (embeddings / norms).astype(np.float32)
        if name not in self.names:
            self.names.append(name)
        label = self.names.index(name)
        self.embeddings = np.concatenate([self.embeddings, unit])
        self.labels = np.concatenate([self.labels, np.full(len(unit), label, np.int64)])
        self.sources += sources
        self.digests += digests

    def remove(self, name: str) -> None:
        name = canonical_name(name)
        if name not in self.names:
            same_letters = [known for known in self.names if known.casefold() == name.casefold()]
            hint = f" (names are case-sensitive: did you mean {same_letters[0]!r}?)" if same_letters else ""
            raise GalleryError(f"no individual {name!r} in the gallery{hint}")
        label = self.names.index(name)
        keep = self.labels != label
        self.embeddings = self.embeddings[keep]
        self.sources = list(itertools.compress(self.sources, keep))
        self.digests = list(itertools.compress(self.digests, keep))
        self.labels = self.labels[keep] - (self.labels[keep] > label)
        del self.names[label]

    # --- matching -------------------------------------------------------------------------------

    def scores(self, queries: np.ndarray, match: str) -> np.ndarray:
        """Cosine similarity of each query (unit rows) to each individual, `N x len(names)`, by its
        nearest enrolled photo or by its prototype."""
        return gallery_scores(match, queries, self.embeddings, self.labels)


def refuse_folder(path: Path) -> None:
    if path.is_dir():
        raise GalleryError(f"{path}: a folder, not a gallery file (.npz)")


def existing_gallery(path: str | Path) -> Path:
    """`path`, or GalleryError when no gallery file is there (nothing, or a folder)."""
    path = Path(path)
    refuse_folder(path)
    if not path.is_file():
        raise GalleryError(f"{path}: gallery file {missing(path, folder=False)}")
    return path


@contextmanager
def gallery_archive(path: Path) -> Iterator[tuple[zipfile.ZipFile, list[tuple[str, zipfile.ZipInfo]]]]:
    """The open .npz at `path` and its gallery arrays' members (`gallery_members`); a file that is no
    gallery is refused from its first bytes and member names alone, before any array is read."""
    with open(path, "rb") as handle:
        magic = handle.read(len(ZIP_MAGIC))
    if magic.startswith(PICKLE_MAGIC):
        raise GalleryError(f"{path}: refused: it is a pickle (loading it could run code); galleries are .npz")
    if magic != ZIP_MAGIC:
        raise GalleryError(f"{path}: not a gallery file (.npz written by `gallery enroll`)")
    try:
        with zipfile.ZipFile(path) as archive:
            yield archive, gallery_members(archive, path)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise GalleryError(f"{path}: truncated or corrupt gallery file ({exc})") from None


def gallery_members(archive: zipfile.ZipFile, path: Path) -> list[tuple[str, zipfile.ZipInfo]]:
    """Each gallery array's member, from the names alone: another kind of zip (a checkpoint of
    hundreds of members, 100 MB) is named as such without reading it."""
    names = archive.namelist()
    if holds_torch_pickle(names):
        raise GalleryError(f"{path} is a PyTorch checkpoint, not a gallery (a .npz from `gallery enroll`)")
    members = {name.removesuffix(".npy"): name for name in names if name.endswith(".npy")}
    missing = [key for key in FORMAT_1_ARRAYS if key not in members]  # a format 2 without digests: `_validated`
    if missing:
        raise GalleryError(f"{path}: not a gallery file (missing {capped(missing)})")
    return [(key, archive.getinfo(members[key])) for key in ARRAYS if key in members]


def read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """One .npy member, its header checked first: numpy allocates the shape a header declares before
    reading, so a crafted shape would ask for terabytes (a MemoryError traceback)."""
    key = member.filename.removesuffix(".npy")
    with archive.open(member) as stream:
        try:
            version = np.lib.format.read_magic(stream)
        except ValueError:  # no .npy magic: raw bytes
            raise GalleryError(f"{path}: corrupt gallery: {key} not stored as an array") from None
        reader = NPY_HEADER_READERS.get(version)
        if reader is None:  # 3.0 only differs for structured arrays, which no gallery holds
            raise GalleryError(f"{path}: corrupt gallery: {key} is in .npy format {version}, not 1.0 or 2.0")
        try:
            shape, _, dtype = reader(stream)
        except ValueError:  # numpy's message quotes the header, up to 10 KB of it
            raise GalleryError(f"{path}: corrupt gallery: {key} has a damaged array header") from None
        data_size = member.file_size - stream.tell()
    if dtype.hasobject:  # checked before the size: a pickle's length is not the array's
        raise GalleryError(f"{path}: refused: it holds pickled Python objects ({key})")
    declared = math.prod(shape) * dtype.itemsize
    if declared != data_size:
        raise GalleryError(f"{path}: corrupt gallery: {key} declares shape {shape} of {dtype} ({declared:,} "
                           f"bytes), but holds {data_size:,} bytes")
    with archive.open(member) as stream:
        try:
            return np.lib.format.read_array(stream, allow_pickle=False)
        except MemoryError:  # the zip's own size field can lie as well as the header
            raise GalleryError(f"{path}: corrupt gallery: {key} does not fit in memory") from None
        except ValueError as exc:  # fewer bytes than the zip's size field promised
            raise GalleryError(f"{path}: truncated or corrupt gallery file ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command_parser("src.inference.gallery", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    enroll = commands.add_parser("enroll", help="add photos of a new or enrolled individual")
    enroll.add_argument("--gallery", required=True, type=path_argument, help="gallery file (.npz); created if absent")
    enroll.add_argument("--checkpoint", required=True, type=path_argument, help="the checkpoint predictions will use")
    source = enroll.add_mutually_exclusive_group(required=True)
    source.add_argument("--name", help="the individual the images show")
    source.add_argument("--from-split", nargs=2, metavar=("ROOT", "SPLIT"),
                        help="every image of a prepared split under its own individual, e.g. "
                             "data/chimpanzee_faces train")
    enroll.add_argument("--open-set", action="store_true", help="with --from-split: the open_set/ lists")
    enroll.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    enroll.add_argument("images", nargs="*", help="with --name: images, folders or glob patterns")

    listing = commands.add_parser("list", help="the enrolled individuals and their photo counts")
    listing.add_argument("--gallery", required=True, type=path_argument)

    remove = commands.add_parser("remove", help="remove individuals with all their photos")
    remove.add_argument("--gallery", required=True, type=path_argument)
    remove.add_argument("names", nargs="+")

    args = parser.parse_args(argv)
    if args.command == "enroll":
        if args.name is not None and not args.images:
            parser.error("enroll --name needs images, folders or glob patterns")
        if args.from_split is not None and args.images:
            parser.error("enroll --from-split takes its images from the split; drop the image arguments")
        if args.open_set and args.from_split is None:
            parser.error("--open-set goes with --from-split")
    return args


def enroll_jobs(args: argparse.Namespace) -> tuple[list[tuple[Path, str]], Inputs]:
    """(image, individual) pairs to enroll: the given images under --name, or a prepared split's rows;
    plus what the inputs left out (the arguments that named no file, ...)."""
    if args.name is not None:
        check_name(args.name)
        inputs = collect_images(args.images)
        return [(path, args.name) for path in inputs.files], inputs
    root, split = args.from_split
    if not root:  # PreparedData.load("") would read the current folder's prepared data
        raise GalleryError("--from-split: an empty ROOT (it would mean the current folder)")
    try:
        data = PreparedData.load(root)
        return [(data.raw_dir / rel, name) for rel, name in data.split(split, open_set=args.open_set)], Inputs([])
    except DatasetError as exc:
        raise GalleryError(str(exc)) from None


def read_photo(path: Path) -> bytes | None:
    """The file's bytes, or None when it is no regular file (a FIFO would wait for a writer forever)
    or cannot be read (embedding it then reports why)."""
    if file_problem(path) is not None:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def digest_of(data: bytes | None) -> str:
    """sha256 of a photo's bytes (`read_photo`), or UNKNOWN_DIGEST for a file that could not be read."""
    return UNKNOWN_DIGEST if data is None else hashlib.sha256(data).hexdigest()


def photo_digest(path: str | Path) -> str:
    """sha256 of the file's bytes, or UNKNOWN_DIGEST when it cannot be read."""
    return digest_of(read_photo(Path(path)))


def learn_digests(gallery: Gallery) -> None:
    """The digests a format-1 gallery lacks, of its photos still where enroll found them (it stores
    absolute paths; a relative one was added from Python and names no file for certain)."""
    gallery.digests = [photo_digest(source) if digest == UNKNOWN_DIGEST and Path(source).is_absolute() else digest
                       for digest, source in zip(gallery.digests, gallery.sources)]


# A photo to enroll: its bytes (or, when they could not be read, its path as given, for embedding
# to say why), its absolute path, its individual and its digest.
NewPhoto = tuple[PhotoBytes | Path, str, str, str]


def not_yet_enrolled(gallery: Gallery, jobs: list[tuple[Path, str]]) -> Iterator[NewPhoto]:
    """The photos the gallery does not hold yet, by path or by content (a copy, or the folder
    moved), each once. Enrolling a folder again is not a failure: only its new photos are added.

    Lazily, so that `embed_jobs` holds one batch's bytes at a time: each file is read once, when its
    turn comes, and decoded from the bytes its digest was computed from. The photos left out are
    named once all are done."""
    owners, photos = gallery.owners(), gallery.photos()
    given: dict[str, Path] = {}  # digest -> the first of these photos with it
    enrolled, repeated = [], []
    for path, name in jobs:
        key = str(Path(path).resolve())
        if key in owners:
            enrolled.append(f"already enrolled as {owners[key]}: {printable(path)}")
            continue
        data = read_photo(path)
        digest = digest_of(data)
        if digest in photos:
            owner, source = photos[digest]
            enrolled.append(f"already enrolled as {owner}: {printable(path)} (the same photo as {printable(source)})")
            continue
        if digest in given:  # not "already enrolled": the first may yet prove unreadable, and is then skipped
            repeated.append(f"given twice: {printable(path)} (the same photo as {printable(given[digest])})")
            continue
        if digest != UNKNOWN_DIGEST:
            given[digest] = path
        yield (path if data is None else PhotoBytes(path, data)), key, name, digest
    # Each one named while they are few; a split enrolled again would print hundreds of lines.
    for lines, what in ((enrolled, "already enrolled"), (repeated, "given twice")):
        for line in lines[:ALREADY_ENROLLED_SHOWN]:
            print_stdout(line)
        if len(lines) > ALREADY_ENROLLED_SHOWN:
            print_stdout(f"... and {len(lines) - ALREADY_ENROLLED_SHOWN} more photos {what}")


def embed_jobs(identifier: Identifier, todo: Iterable[NewPhoto]
               ) -> tuple[dict[str, list[tuple[np.ndarray, str, str]]], list[Skipped]]:
    """Per individual, (embedding, absolute path, digest) of each readable photo; and the unreadable
    ones, named as given (as the inputs that named no file are). One batch at a time, so that only
    one batch's bytes are held."""
    enrolled: dict[str, list[tuple[np.ndarray, str, str]]] = defaultdict(list)
    skipped = []
    photos = iter(todo)
    while batch := list(itertools.islice(photos, DEFAULT_BATCH_SIZE)):
        results = itertools.chain.from_iterable(identifier.embed([image for image, _, _, _ in batch]))
        for (_, key, name, digest), item in zip(batch, results):
            if isinstance(item, Embedded):  # under the name as `Gallery.add` stores it, for the counts after
                enrolled[canonical_name(name)].append((item.embedding, key, digest))
            else:
                skipped.append(item)
    return enrolled, skipped


def save(gallery: Gallery, path: Path) -> None:
    """`gallery.save` with a one-line error for a path that cannot be written (a folder, a missing
    permission, a full disk); the write is atomic, so a gallery already there is unchanged."""
    try:
        gallery.save(path)
    except OSError as exc:
        raise unwritable(path, exc) from None


def unwritable(path: Path, exc: OSError) -> GalleryError:
    return GalleryError(f"{path}: cannot write the gallery ({exc}); any previous file there is unchanged")


@contextmanager
def changing(path: Path) -> Iterator[None]:
    """Hold `.<gallery name>.lock` beside the gallery while a command reads, changes and writes it:
    two commands at once would each write their own change, and the later would silently drop the
    earlier's. The second waits, and says so."""
    refuse_folder(path)  # `.` has no name to put a lock file beside
    if path.exists():  # a file that is no gallery (a checkpoint given by mistake) gets no lock file beside it
        with gallery_archive(path):
            pass
    def say() -> None:
        print(f"waiting for another gallery command to finish with {path} ...", file=sys.stderr, flush=True)

    # Beside the file written, a symbolic link's target: commands given two links to one gallery, or a
    # link and the file, take turns too.
    written = atomic.through_link(path)
    with ExitStack() as stack:
        try:
            stack.enter_context(locks.exclusive(written.with_name(f".{written.name}.lock"), on_wait=say))
        except OSError as exc:  # its folder cannot be written: neither can the gallery
            raise unwritable(path, exc) from None
        for leftover in atomic.remove_leftovers(path):
            print(f"note: removed {leftover}, a partial write of a gallery command that was killed",
                  file=sys.stderr, flush=True)
        yield


def enroll(args: argparse.Namespace) -> int:
    """Embed the photos and add them; the gallery is written once, after every photo is done, and
    not at all when none could be read."""
    jobs, inputs = enroll_jobs(args)
    identifier = Identifier.embedder(args.checkpoint, args.device)
    info = identifier.info
    if args.from_split is not None and info.config.data.open_set and not args.open_set:
        # The closed-set lists hold the individuals this model held out: the gallery would name them.
        print("warning: the checkpoint was trained on the open-set lists; add --open-set to enroll from "
              "those (the closed-set split enrolls the held-out individuals too)", file=sys.stderr)
    with changing(args.gallery):
        gallery = (Gallery.load(args.gallery) if args.gallery.exists()
                   else Gallery.new(info.checkpoint_sha256, info.config.model.embedding_dim))
        gallery.check_checkpoint(info.checkpoint_sha256, info.config.model.embedding_dim)
        learn_digests(gallery)
        enrolled, unreadable = embed_jobs(identifier, not_yet_enrolled(gallery, jobs))
        before = gallery.counts()
        for name, photos in enrolled.items():
            embeddings, sources, digests = zip(*photos)
            gallery.add(name, np.stack(embeddings), sources, digests)
        if enrolled:
            save(gallery, args.gallery)
    skipped = inputs.skipped + unreadable

    for item in skipped:
        print(f"skipped {printable(item.source)}: {item.reason}", file=sys.stderr)
    for note in inputs.notes():
        print(f"note: {note}", file=sys.stderr)
    after = gallery.counts()
    for name in enrolled:
        same_letters = [known for known in before if known != name and known.casefold() == name.casefold()]
        if same_letters and name not in before:  # a typo would split one animal's photos in two, unnoticed
            print(f"warning: {name!r} is a new individual beside {same_letters[0]!r} (names are case-sensitive); "
                  f"if they are one animal: gallery remove {name}, then enroll its photos as {same_letters[0]}",
                  file=sys.stderr)
        status = f"{before[name]} before" if name in before else "new individual"
        print_stdout(f"{name}: +{counted(after[name] - before.get(name, 0), 'image')} ({status}, {after[name]} now)")
    print_stdout(f"{args.gallery}: {summary(after)}"
                 + ("" if enrolled else " (unchanged: nothing enrolled)"))
    return 1 if skipped else 0


def summary(counts: dict[str, int]) -> str:
    return f"{counted(len(counts), 'individual')}, {counted(sum(counts.values()), 'image')}"


def list_gallery(args: argparse.Namespace) -> int:
    gallery = Gallery.load(args.gallery)
    counts = gallery.counts()
    rows = [("individual", "images"), *((name, str(count)) for name, count in sorted(counts.items()))]
    print_stdout(f"{args.gallery}: {summary(counts)}; checkpoint sha256 "
                 f"{gallery.checkpoint_sha256}\n" + format_rows(rows, "<"))
    return 0


def remove_individuals(args: argparse.Namespace) -> int:
    """All names must be enrolled, else nothing is removed."""
    # As enrolled ("Zoé" typed in either Unicode form), each once: a name given twice is removed once.
    names = list(dict.fromkeys(canonical_name(name) for name in args.names))
    existing_gallery(args.gallery)  # named before a lock file (and its folder) is made for nothing
    with changing(args.gallery):
        gallery = Gallery.load(args.gallery)
        counts = gallery.counts()
        for name in names:
            gallery.remove(name)
        save(gallery, args.gallery)
    for name in names:
        print_stdout(f"removed {name} ({counted(counts[name], 'image')})")
    return 0


@command_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = {"enroll": enroll, "list": list_gallery, "remove": remove_individuals}[args.command]
    try:
        return command(args)
    except (GalleryError, *USAGE_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
