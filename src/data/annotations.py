"""Read every input `prepare` accepts into one kind of record, and apply a user's label fixes.

Three inputs end up as the same `Record` list, so that everything after reading (label fixes, image
checks, filtering, splits, reports) is written once:

- the cvjena release (`cvjena/chimpanzee_faces`): `annotations_czoo.txt` and `annotations_ctai.txt`,
  one face per line, in either of the two published spellings (see `parse_cvjena_line`);
- a list file, `<relative path> <individual>` per line (`src/data/lists.py`);
- a folder per individual, `root/<individual>/<image>`.

Names are kept as published here, only brought to Unicode's composed form (`canonical_name`); `LabelsFix`
(aliases and exclusions from a user-editable file) and `check_names` with `--spaces-to-underscores` are the
only places that change them, so the default run reproduces the published counts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from src.data.io import IMAGE_EXTENSIONS, files_under
from src.data.lists import ListFormatError, canonical_name, name_problem, read_numbered_list, underscored
from src.errors import clipped_repr, missing
from src.textfiles import parse_yaml, read_utf8


class AnnotationError(ValueError):
    """Input that cannot be read; the message is one line naming the file (and line)."""


KEYPOINT_NAMES = ("RightEye", "LeftEye", "MouthCenter", "LeftEarlobe", "RightEarlobe")
SINGLE_FIELDS = ("Name", "Age", "Age_group", "Gender")
# The current public release spells the age-group key `Age_Group`; the older revision `Age_group`.
FIELD_SPELLINGS = {"Age_Group": "Age_group"}

RELEASE_FOLDER = "datasets_cropped_chimpanzee_faces"
# Written by `python -m src.data.standin` beside the release's data folders: synthetic images in the
# release's layout, under the real names, must never pass for the release (`holds_standins`).
STANDIN_MARKER = "STANDIN.txt"
# (source, folder, annotation file) in merge order: CZoo first, as in the published merged list.
CVJENA_SOURCES = (("CZoo", "data_CZoo", "annotations_czoo.txt"),
                  ("CTai", "data_CTai", "annotations_ctai.txt"))

Keypoint = tuple[float, float] | None


@dataclass(frozen=True)
class Record:
    """One image of one individual, with every field the input carries.

    `path` is relative to the raw folder (POSIX separators) and is what the list files store.
    `origin` (`file:line`, or the path for folder input) is unique per record and says where to
    look when something about the record is reported.
    """
    path: str
    individual: str
    source: str
    origin: str
    published_name: str = ""
    age: float | None = None
    age_group: str | None = None
    gender: str | None = None
    keypoints: tuple[Keypoint, ...] = field(default=(None,) * len(KEYPOINT_NAMES))

    def __post_init__(self) -> None:
        if not self.published_name:
            object.__setattr__(self, "published_name", self.individual)
        object.__setattr__(self, "individual", canonical_name(self.individual))


# --- the cvjena release ---------------------------------------------------------------------------

def parse_cvjena_line(line: str, where: str) -> dict:
    """Fields of one annotation line, in either published spelling.

    Older revision: `face_images/x.png Name N Age 5 Age_group Adult Gender Male RightEye x y ...`;
    current release: the same with a leading `Filename ` and `Age_Group`. Age may be `NaN`, gender
    and age group `Unknown`, a keypoint `Inf Inf` (not visible) or negative (outside the crop).
    A name of several words is returned joined by single spaces, so that the caller decides what to
    do about it (refuse, alias, or replace spaces) instead of a misleading "malformed line".
    """
    tokens = line.split()
    if tokens and tokens[0] == "Filename":
        tokens = tokens[1:]
    if not tokens:
        raise AnnotationError(f"{where}: empty annotation")
    values = _group_by_key(tokens[1:], where)
    absent = [k for k in (*SINGLE_FIELDS, *KEYPOINT_NAMES) if k not in values]
    if absent:
        raise AnnotationError(f"{where}: missing field(s) {', '.join(absent)} in {clipped_repr(line.strip())}")
    for key in SINGLE_FIELDS[1:]:
        if len(values[key]) != 1:
            raise AnnotationError(f"{where}: {key} needs one value, got {values[key]}")
    return {
        "path": tokens[0],
        "name": " ".join(values["Name"]),
        "age": _parse_age(values["Age"][0], where),
        "age_group": values["Age_group"][0],
        "gender": values["Gender"][0],
        "keypoints": tuple(_parse_keypoint(k, values[k], where) for k in KEYPOINT_NAMES),
    }


def _group_by_key(tokens: list[str], where: str) -> dict[str, list[str]]:
    """`Key v v Key v ...` -> {Key: [v, v]}; refuses unknown or repeated keys."""
    known = {*SINGLE_FIELDS, *KEYPOINT_NAMES, *FIELD_SPELLINGS}
    if not tokens or tokens[0] not in known:
        raise AnnotationError(f"{where}: expected '<image> Name <name> Age ...', got "
                              f"{clipped_repr(' '.join(tokens[:3]))}")
    values: dict[str, list[str]] = {}
    current = ""
    for token in tokens:
        if token in known:
            current = FIELD_SPELLINGS.get(token, token)
            if current in values:
                raise AnnotationError(f"{where}: field {current} appears twice")
            values[current] = []
        else:
            values[current].append(token)
    if not values.get("Name"):
        raise AnnotationError(f"{where}: empty Name")
    return values


def _parse_age(text: str, where: str) -> float | None:
    try:
        age = float(text)
    except ValueError:
        raise AnnotationError(f"{where}: Age {clipped_repr(text)} is not a number or NaN") from None
    return age if math.isfinite(age) else None


def _parse_keypoint(key: str, values: list[str], where: str) -> Keypoint:
    if len(values) != 2:
        raise AnnotationError(f"{where}: {key} needs two coordinates, got {values}")
    try:
        x, y = float(values[0]), float(values[1])
    except ValueError:
        raise AnnotationError(f"{where}: {key} coordinates {values} are not numbers or Inf") from None
    return (x, y) if math.isfinite(x) and math.isfinite(y) else None


def parse_annotation_file(path: str | Path, source: str, prefix: str = "") -> list[Record]:
    """Records of one cvjena annotation file. Image paths become `prefix/<path in the file>`.

    `prefix` is the annotation file's folder relative to the raw folder, because the file's own paths
    (`face_images/...`) are relative to the file. Error messages name the file as given; a record's
    `origin` names it relative to the raw folder when `prefix` is given.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"missing annotation file {path}")
    lines = read_utf8(path, AnnotationError).splitlines()
    short = f"{prefix}/{path.name}" if prefix else str(path)  # origin: relative to the raw folder
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        fields = parse_cvjena_line(line, where)
        records.append(Record(
            path=_relative_image_path(fields["path"], prefix, where),
            individual=fields["name"], source=source, origin=f"{short}:{lineno}",
            age=fields["age"], age_group=fields["age_group"], gender=fields["gender"],
            keypoints=fields["keypoints"]))
    return records


def find_release_base(raw_dir: str | Path) -> Path:
    """The folder that holds `data_CZoo/` and `data_CTai/`.

    Accepts the repository root of the public clone (holding `datasets_cropped_chimpanzee_faces/`)
    or that folder itself.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise AnnotationError(f"raw folder {raw_dir} {missing(raw_dir, folder=True)} (--download fetches the "
                              "public release; --folder or --list read your own photos)")
    nested = raw_dir / RELEASE_FOLDER
    return nested if nested.is_dir() else raw_dir


def holds_standins(raw_dir: str | Path) -> bool:
    """Whether the release layout under `raw_dir` was drawn by `src.data.standin` (its STANDIN_MARKER)."""
    return Path(raw_dir).is_dir() and (find_release_base(raw_dir) / STANDIN_MARKER).is_file()


def read_cvjena(raw_dir: str | Path) -> list[Record]:
    """Both annotation files of the release under `raw_dir`, merged (CZoo first)."""
    raw_dir = Path(raw_dir)
    base = find_release_base(raw_dir)
    if not any((base / folder).is_dir() for _, folder, _ in CVJENA_SOURCES):  # an empty or wrong folder
        raise AnnotationError(f"no release in {raw_dir}: expected {RELEASE_FOLDER}/ in it, or "
                              f"{' and '.join(f'{folder}/' for _, folder, _ in CVJENA_SOURCES)} (--download fetches "
                              f"the public release; --folder or --list read your own photos)")
    records = []
    for source, folder, filename in CVJENA_SOURCES:
        annotation_file = base / folder / filename
        prefix = (base / folder).relative_to(raw_dir).as_posix()
        found = parse_annotation_file(annotation_file, source, prefix)
        if not found:  # else the dataset would be the other source's alone, silently
            raise AnnotationError(f"{annotation_file}: no annotation lines, where the release has faces in both "
                                  f"files (a download or copy that stopped?); --download fetches it again")
        records += found
    return records


def _relative_image_path(text: str, prefix: str, where: str) -> str:
    """Validated `prefix/text` in POSIX form; refuses absolute paths and non-image extensions."""
    rel = PurePosixPath(text.replace("\\", "/"))
    if rel.is_absolute() or (rel.parts and rel.parts[0].endswith(":")):
        raise AnnotationError(f"{where}: image path {clipped_repr(text)} must be relative")
    if rel.suffix.lower() not in IMAGE_EXTENSIONS:
        raise AnnotationError(f"{where}: unknown image format {clipped_repr(rel.suffix or '(no extension)')} in "
                              f"{clipped_repr(text)}; supported: {' '.join(IMAGE_EXTENSIONS)}")
    return (PurePosixPath(prefix) / rel).as_posix()  # an empty prefix is '.', which joins to `rel` alone


# --- generic inputs: a list file and a folder per individual ------------------------------------

def read_list_file(list_file: str | Path) -> list[Record]:
    """Records of a `<relative path> <individual>` list; paths are relative to the raw folder."""
    try:
        rows = read_numbered_list(list_file)
    except ListFormatError as exc:
        raise AnnotationError(str(exc)) from None
    if not rows:
        raise AnnotationError(f"{list_file}: no images listed")
    source = Path(list_file).name
    records = []
    for lineno, rel, name in rows:
        where = f"{list_file}:{lineno}"
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS:  # 'a b.png' read as path 'a', name 'b.png'
            raise AnnotationError(f"{where}: expected '<path> <individual>', got {clipped_repr(f'{rel} {name}')}: "
                                  f"the individual is missing")
        full_name = _name_with_whitespace(rel, name)
        if full_name is not None:  # it said "unknown image format '.png Mr'"
            raise AnnotationError(f"{where}: individual name {clipped_repr(full_name)} contains whitespace (the "
                                  "name is the last word of a line); rename it "
                                  f"(e.g. {clipped_repr(underscored(full_name))})")
        records.append(Record(path=_relative_image_path(rel, "", where), individual=name, source=source,
                              origin=where))
    return records


def _name_with_whitespace(rel: str, name: str) -> str | None:
    """The whole name when a list line is an image path, then a name of several words: 'Mr Bean/a.png
    Mr Bean' splits into the path 'Mr Bean/a.png Mr' and the name 'Bean'."""
    if Path(rel).suffix.lower() in IMAGE_EXTENSIONS:
        return None
    ends = [gap for gap in re.finditer(r"\s+", rel) if Path(rel[:gap.start()]).suffix.lower() in IMAGE_EXTENSIONS]
    return f"{rel[ends[-1].end():]} {name}" if ends else None


# Files a file manager or OS leaves in photo folders; anything else that is not an image is refused.
IGNORED_FILES = {"thumbs.db", "desktop.ini"}  # compared lowercased, as Windows names are


def read_folder(root: str | Path) -> list[Record]:
    """Records of `root/<individual>/<image>`; images in sub-folders belong to that individual.

    Sub-folders are included (photos sorted by date or camera under an individual's folder are common)
    rather than ignored, because silently dropping images is worse than a surprising count. Hidden files,
    OS clutter and non-image files directly under `root` (a README) are skipped; an image directly under
    `root` or a file of an unknown format in an individual's folder is an error, since either usually
    means the wrong folder was given.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"{root} is not a folder" if root.exists() else f"folder {root} not found")
    records, unknown_formats = [], []
    for entry in sorted(root.iterdir()):
        if _hidden(entry.name):
            continue
        if entry.is_symlink() and not entry.exists():  # e.g. a link into a disk not mounted now
            raise AnnotationError(f"{entry}: broken link to {os.readlink(entry)}; mount or fix its "
                                  f"target, or remove the link")
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            raise AnnotationError(f"{entry}: image directly under {root}; expected "
                                  f"{root}/<individual>/<image> (is --folder one individual's folder?); photos "
                                  f"of several individuals in one folder are read from a --list file")
        if entry.is_dir():
            if entry.name[0] == "#" or entry.name[0].isspace():  # a list line starting so would not read back
                raise AnnotationError(f"{entry}: a folder name starting with {entry.name[0]!r} cannot go into "
                                      f"the list files (read back as a comment or another path); rename it")
            images, others = _read_individual_folder(root, entry)
            records += images
            unknown_formats += others
    if unknown_formats:  # all named at once: a camera's sidecars (.xmp, RAW beside JPEG) come by the hundred
        first, count = unknown_formats[0], len(unknown_formats)
        suffixes = " ".join(sorted({path.suffix or "(no extension)" for path in unknown_formats}))
        in_all = f" ({count} such files in all: {suffixes})" if count > 1 else ""
        raise AnnotationError(f"{first}: unknown image format {first.suffix or '(no extension)'!r}{in_all}; "
                              f"supported: {' '.join(IMAGE_EXTENSIONS)}; move such files out of {root}, or name "
                              f"the images in a --list file")
    if not records:
        raise AnnotationError(f"empty folder {root}: no images in {root}/<individual>/ sub-folders")
    return records


def _read_individual_folder(root: Path, folder: Path) -> tuple[list[Record], list[Path]]:
    """Every image under `folder` (`files_under`: linked sub-folders followed, each real folder once),
    and the files of other formats. A broken link is kept, so that it is reported as a missing file,
    not dropped."""
    records, unknown_formats = [], []
    for path in sorted(files_under(folder, _hidden)):
        rel = path.relative_to(root).as_posix()
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # its bytes were held as surrogates; the lists could not hold it
            shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise AnnotationError(f"{root}/{shown}: a file or folder name that is not UTF-8 (written in another "
                                  f"encoding, e.g. unpacked from an old archive); rename it") from None
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            unknown_formats.append(path)
            continue
        records.append(Record(path=rel, individual=folder.name, source="folder", origin=rel))
    return records, unknown_formats


def sites_as_individuals(root: Path, records: Sequence[Record]) -> str | None:
    """A one-line warning when `read_folder`'s `root` looks like `root/<site>/<individual>/<image>`,
    whose images it labels with the site's name, else None. Suspected when no top-level folder holds
    an image directly, each holds two or more folders of images, and no such folder name recurs under
    another top-level folder: the years or dates of `Kofi/2019/` do recur, individuals (each at one
    site) do not. Names alone cannot tell an individual's own session folders from individuals, so
    this warns rather than refuses a layout the folder input documents."""
    inner: dict[str, set[str]] = {}
    for record in records:
        top, *below = record.path.split("/")
        if len(below) < 2:  # an image directly in a top-level folder: an individual's folder
            return None
        inner.setdefault(top, set()).add(below[0])
    recurring = Counter(name for names in inner.values() for name in names)
    if not inner or any(len(names) < 2 for names in inner.values()) or max(recurring.values()) > 1:
        return None
    site = min(inner)
    names = sorted(inner[site])
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (f"{root / site} holds no image directly, only {len(names)} folders of images ({shown}), and none of "
            f"their names recurs under another top-level folder as years or dates do: if they are individuals "
            f"(a <site>/<individual>/ layout), all its images are labelled {site!r}; give --folder {root / site} "
            f"(one prepare per site) or name the images with a --list file")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_FILES


# --- names: what lists.name_problem refuses ---------------------------------------------------------

def check_names(records: list[Record], spaces_to_underscores: bool) -> list[Record]:
    """Refuse individual names with whitespace, or replace each run of it by '_' when asked; refuse
    every other name `lists.name_problem` refuses ('unknown', a control character) in any case.

    The list format is space-separated, so such a name cannot be written; refusing is the default
    because a silent rename would make the written lists disagree with the user's folders. Two names
    that become the same after the replacement are refused too (they would merge two individuals).
    """
    renamed: dict[str, str] = {}
    for record in records:
        name = record.individual
        problem = name_problem(name)
        if problem is None or name in renamed:
            continue
        fixed = underscored(name)
        left = name_problem(fixed)
        if left is not None:  # 'Unknown' too: read beside predictions, it would pass for one
            # A name that cannot be typed (a terminal escape, which would also act if printed raw) is
            # named in a YAML fix file by its escapes, as JSON writes them.
            how = (f"('{name} -> Unnamed_1') or drop it ('exclude-name {name}')" if name.isprintable() else
                   f"(in a YAML file: aliases: {{{json.dumps(name)}: Unnamed_1}}) or drop it "
                   f"(exclude_names: [{json.dumps(name)}])")
            raise AnnotationError(f"{record.origin}: individual name {clipped_repr(name)} {left}; rename it in "
                                  f"--labels-fix {how}")
        if not spaces_to_underscores:
            raise AnnotationError(
                f"{record.origin}: individual name {clipped_repr(name)} contains whitespace; rename it "
                f"(e.g. {clipped_repr(fixed)}), alias it in --labels-fix, or pass --spaces-to-underscores")
        renamed[name] = fixed
    existing = {r.individual for r in records} - set(renamed)
    targets = Counter(renamed.values())
    clashes = sorted(old for old, new in renamed.items() if new in existing or targets[new] > 1)
    if clashes:
        raise AnnotationError(f"--spaces-to-underscores would merge {clipped_repr(clashes[0])} into an existing "
                              f"individual {clipped_repr(renamed[clashes[0]])}; rename one of them")
    return [dataclasses.replace(r, individual=renamed.get(r.individual, r.individual)) for r in records]


# --- aliases and exclusions (--labels-fix) ----------------------------------------------------------

def _canonical_aliases(aliases: dict[str, str], path: Path) -> dict[str, str]:
    """`aliases` with both names in composed form (NFC). Two spellings of one name (composed and
    decomposed, as typed and as macOS stores a folder name) must not map it to two names."""
    canonical: dict[str, tuple[str, str]] = {}  # old name (NFC) -> (as written, new name)
    for old, new in aliases.items():
        key, target = canonical_name(old), canonical_name(new)
        written, earlier = canonical.get(key, (old, target))
        if earlier != target:
            raise AnnotationError(f"{path}: aliases {clipped_repr(written)} and {clipped_repr(old)} are one name in "
                                  f"different Unicode forms, mapped to {clipped_repr(earlier)} and "
                                  f"{clipped_repr(target)}; keep one")
        canonical[key] = (old, target)
    return {key: target for key, (_, target) in canonical.items()}


@dataclass
class LabelsFix:
    """User-editable label corrections, applied before any filtering.

    `aliases` rename individuals (`Old -> New`), `exclude_names` drop every image of an individual
    (e.g. a placeholder name), `exclude_images` drop single images by their path relative to the raw
    folder (e.g. a face labelled with the wrong sex).
    """
    aliases: dict[str, str] = field(default_factory=dict)
    exclude_names: set[str] = field(default_factory=set)
    exclude_images: set[str] = field(default_factory=set)
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> LabelsFix:
        """YAML (`.yaml`/`.yml`: keys aliases, exclude_names, exclude_images) or text lines
        (`Old -> New`, `exclude-name <name>`, `exclude-image <path>`, `#` comments)."""
        path = Path(path)
        if not path.is_file():
            raise AnnotationError(f"labels-fix file {path} not found")
        text = read_utf8(path, AnnotationError)
        fix = cls._from_yaml(text, path) if path.suffix.lower() in (".yaml", ".yml") \
            else cls._from_text(text, path)
        fix.source = str(path)
        fix.aliases = _canonical_aliases(fix.aliases, path)
        fix.exclude_names = {canonical_name(name) for name in fix.exclude_names}
        fix._check(path)
        return fix

    @classmethod
    def _from_yaml(cls, text: str, path: Path) -> LabelsFix:
        data = parse_yaml(text, path, AnnotationError, strings_only=True) or {}
        if not isinstance(data, dict):
            raise AnnotationError(f"{path}: expected a mapping with keys aliases, exclude_names, "
                                  f"exclude_images")
        unknown = set(data) - {"aliases", "exclude_names", "exclude_images"}
        if unknown:
            raise AnnotationError(f"{path}: unknown key(s) {sorted(map(str, unknown))}; expected "
                                  f"aliases, exclude_names, exclude_images")
        aliases = data.get("aliases") or {}
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise AnnotationError(f"{path}: aliases must map old name -> new name")
        return cls(aliases=aliases, exclude_names=_string_set(data, "exclude_names", path),
                   exclude_images=_string_set(data, "exclude_images", path))

    @classmethod
    def _from_text(cls, text: str, path: Path) -> LabelsFix:
        fix = cls()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if "->" in line:
                old, _, new = (part.strip() for part in line.partition("->"))
                if fix.aliases.get(old, new) != new:
                    raise AnnotationError(f"{path}:{lineno}: {clipped_repr(old)} already has the alias "
                                          f"{clipped_repr(fix.aliases[old])}; keep one")
                fix.aliases[old] = new
            elif keyword == "exclude-name" and rest:
                fix.exclude_names.add(rest)
            elif keyword == "exclude-image" and rest:
                fix.exclude_images.add(rest)
            else:
                raise AnnotationError(f"{path}:{lineno}: expected 'Old -> New', 'exclude-name <name>' "
                                      f"or 'exclude-image <path>', got {clipped_repr(line)}")
        return fix

    def _check(self, path: Path) -> None:
        for old, new in self.aliases.items():
            alias = f"{clipped_repr(old)} -> {clipped_repr(new)}"
            if not old:
                raise AnnotationError(f"{path}: alias {alias}: the old name is empty")
            problem = name_problem(new)
            if problem is not None:
                raise AnnotationError(f"{path}: alias {alias}: the new name {problem}")
            if new == old:  # else the chain test below would report 'Abeni' -> 'Abeni' -> 'Abeni'
                raise AnnotationError(f"{path}: alias {alias} renames nothing; drop it")
            if new in self.aliases:
                raise AnnotationError(f"{path}: alias chain {alias} -> {clipped_repr(self.aliases[new])}; "
                                      f"point {clipped_repr(old)} at the final name")

    def apply(self, records: list[Record]) -> tuple[list[Record], list[tuple[Record, str]], list[str]]:
        """(kept records with aliases applied, (excluded record, reason) pairs, unused entries).

        Exclusions match the published name or the alias target; unused entries are reported so a
        typo in the fix file does not pass unnoticed.
        """
        kept, excluded = [], []
        used: set[str] = set()
        for record in records:
            name = self.aliases.get(record.individual, record.individual)
            if name != record.individual:
                used.add(f"alias {record.individual}")
            hit = next((n for n in (record.individual, name) if n in self.exclude_names), None)
            if hit is not None:
                used.add(f"exclude-name {hit}")
                excluded.append((record, f"name {hit} excluded"))
            elif record.path in self.exclude_images:
                used.add(f"exclude-image {record.path}")
                excluded.append((record, "image excluded"))
            else:
                kept.append(dataclasses.replace(record, individual=name))
        entries = [f"alias {old}" for old in self.aliases] + \
            [f"exclude-name {n}" for n in sorted(self.exclude_names)] + \
            [f"exclude-image {p}" for p in sorted(self.exclude_images)]
        return kept, excluded, [e for e in entries if e not in used]


def _string_set(data: dict, key: str, path: Path) -> set[str]:
    values = data.get(key) or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise AnnotationError(f"{path}: {key} must be a list of names or paths")
    return set(values)
