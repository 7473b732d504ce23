"""What is wrong with a dataset before it is trained on: image problems and suspect labels.

Two kinds of findings, treated differently on purpose:

- *Problems* (an image listed twice, a missing file, an image that does not decode, an exact duplicate)
  make an image unusable or leak it across splits. The image is excluded, its reason listed in the
  report, and `prepare --strict` fails.
- *Label-quality flags* (placeholder names, near-duplicate names, one individual with both sexes or
  ages years apart) are suspicions about the published labels. They are reported with image counts
  and the images involved so that a user can write a `--labels-fix` file; they never change the data
  on their own, so the default run reproduces the published counts.

The report's content (`build_report`) and its two renderings (`write_report`: JSON and Markdown) are
both here.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from src import atomic
from src.data.annotations import Record
from src.data.dataset import FORMAT_VERSION
from src.data.io import ImageLoadError, load_rgb
from src.data.lists import Row
from src.errors import missing

PROBLEM_CATEGORIES = ("listed twice", "missing file", "unreadable", "duplicate")
LABELS_FIX = "labels-fix"

# Names that identify no animal: the dataset's age-group words (the published C-Tai labels use
# 'Adult' for faces nobody identified) and the usual words for "no name". Compared after lowercasing
# and dropping punctuation, so '?', '-' and 'n/a' match too.
PLACEHOLDER_WORDS = {"infant", "juvenile", "subadult", "adult", "elderly", "unknown", "unidentified",
                     "unnamed", "noname", "none", "na", "nan", ""}
AGE_GROUP_ORDER = ("infant", "juvenile", "subadult", "adult", "elderly")
# Photos of one individual span a few years at most, so a recorded age that differs by more than this
# from the individual's usual age is suspect (C-Tai has ages 11 years apart for one name).
AGE_SPAN_YEARS = 2.0
# Near-duplicate names: edit distance at most 1 (2 for names of 8+ letters), ignoring case and accents, and the
# rarer name at most this share of the other's images. Rarity separates a one-off typo ('Woodstiock',
# 1 image, beside 'Woodstock', 87) from two real animals with similar names ('Tita' 41, 'Zita' 42).
RARER_SHARE = 0.2
# An age seen on at most this share of an individual's images, far from its other ages, is an outlier.
OUTLIER_SHARE = 0.1
MARKDOWN_LIST_LIMIT = 40


@dataclass(frozen=True)
class Exclusion:
    """An image left out of every list, and why."""
    record: Record
    category: str
    detail: str = ""

    def as_dict(self) -> dict:
        r = self.record
        return {"path": r.path, "individual": r.individual, "source": r.source, "origin": r.origin,
                "category": self.category, "detail": self.detail}


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of decoding one image: a reason when it failed, else its size and a pixel digest."""
    reason: str = ""
    missing: bool = False
    size: tuple[int, int] | None = None
    digest: str = ""


# --- image problems -----------------------------------------------------------------------------

def check_image(path: Path) -> ImageCheck:
    """Decode fully with `load_rgb` (truncation shows only on a full decode) and hash the pixels.

    Hashing decoded pixels rather than file bytes also catches the same face saved twice in
    different files or containers.
    """
    if not path.is_file():  # a folder or a pipe in the image's place is there, but not an image
        return ImageCheck(reason=missing(path, folder=False), missing=not path.exists())
    try:
        img = load_rgb(path)
    except ImageLoadError as exc:
        return ImageCheck(reason=exc.reason)
    digest = hashlib.blake2b(img.tobytes(), digest_size=16)
    digest.update(f"{img.width}x{img.height}".encode())
    return ImageCheck(size=img.size, digest=digest.hexdigest())


def check_images(records: Sequence[Record], raw_dir: Path,
                 workers: int | None = None) -> tuple[list[Exclusion], dict[str, ImageCheck]]:
    """(exclusions for every problem found, {path: check}) for the records' images.

    Decoding runs in threads: Pillow releases the GIL while decoding, and thousands of small crops
    would otherwise take minutes on one core.
    """
    exclusions = listed_twice(records)
    twice = {e.record.origin for e in exclusions}
    paths = sorted({r.path for r in records})
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = dict(zip(paths, pool.map(lambda p: check_image(raw_dir / p), paths)))
    remaining = [r for r in records if r.origin not in twice]
    for record in remaining:
        check = checks[record.path]
        if check.reason:
            exclusions.append(Exclusion(record, "missing file") if check.missing
                              else Exclusion(record, "unreadable", check.reason))
    readable = [r for r in remaining if not checks[r.path].reason]
    exclusions += exact_duplicates(readable, checks)
    return exclusions, checks


def listed_twice(records: Sequence[Record]) -> list[Exclusion]:
    """Repeated paths (see `_repeats`)."""
    return _repeats(records, lambda r: r.path, "listed twice",
                    same=lambda first: f"first listed at {first.origin}",
                    conflicting=lambda r, copies, names: f"listed as {', '.join(names)}")


def exact_duplicates(records: Sequence[Record], checks: dict[str, ImageCheck]) -> list[Exclusion]:
    """Identical pixels under different paths (see `_repeats`). A duplicate left in would land in
    train and test alike and inflate accuracy."""
    return _repeats(records, lambda r: checks[r.path].digest, "duplicate",
                    same=lambda first: f"same pixels as {first.path}",
                    conflicting=lambda r, copies, names: f"same pixels labelled {', '.join(names)}: "
                                                         f"{', '.join(c.path for c in copies if c is not r)}")


def _repeats(records: Sequence[Record], key: Callable[[Record], str], category: str,
             same: Callable[[Record], str],
             conflicting: Callable[[Record, list[Record], list[str]], str]) -> list[Exclusion]:
    """Records sharing a `key`: every copy after the first (in input order) when all carry one
    individual, detail `same(first)`; every copy when they disagree (nothing says which label is
    right), detail `conflicting(record, copies, sorted individuals)`."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    exclusions = []
    for copies in groups.values():
        if len(copies) == 1:
            continue
        names = sorted({r.individual for r in copies})
        if len(names) == 1:
            exclusions += [Exclusion(r, category, same(copies[0])) for r in copies[1:]]
        else:
            exclusions += [Exclusion(r, category, conflicting(r, copies, names)) for r in copies]
    return exclusions


# --- label quality ------------------------------------------------------------------------------

def label_quality(records: Sequence[Record]) -> dict[str, list[dict]]:
    """Every label-quality flag over the records, each with image counts; see the module doc."""
    placeholders = placeholder_names(records)
    # A placeholder pools many animals: its mixed sexes and ages say nothing about one animal's labels,
    # and its `outliers` would be images with nothing wrong to exclude.
    placeholder_set = {f["name"] for f in placeholders}
    named = [r for r in records if r.individual not in placeholder_set]
    return {
        "placeholder_names": placeholders,
        "near_duplicate_names": near_duplicate_names(records),
        "sex_inconsistent": sex_inconsistencies(named),
        "age_inconsistent": age_inconsistencies(named),
        "names_in_several_sources": names_in_several_sources(records),
    }


def _normalise(word: str | None) -> str:
    return "".join(c for c in (word or "").lower() if c.isalnum())


def _by_individual(records: Iterable[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.individual].append(record)
    return groups


def _sources(records: Iterable[Record]) -> list[str]:
    return sorted({r.source for r in records})


def placeholder_names(records: Sequence[Record]) -> list[dict]:
    """Names that are an age-group word (including every age group the data uses) or a word for "no
    name" ('unknown', 'unnamed', 'n/a', ...: PLACEHOLDER_WORDS)."""
    words = PLACEHOLDER_WORDS | {_normalise(r.age_group) for r in records if r.age_group}
    flags = [{"name": name, "images": len(group), "sources": _sources(group)}
             for name, group in _by_individual(records).items() if _normalise(name) in words]
    return sorted(flags, key=lambda f: -f["images"])


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), two-row dynamic programme."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _folded(name: str) -> str:
    """The name without case or accents ('Zoé', 'ZOE' -> 'zoe'): spellings of one name typed differently."""
    return "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c)).casefold()


def near_duplicate_names(records: Sequence[Record], rarer_share: float = RARER_SHARE) -> list[dict]:
    """Pairs of names that look like one name misspelled, compared across all sources. Names equal but
    for case or accents (distance 0) are flagged whatever their counts."""
    groups = _by_individual(records)
    counts = {name: len(group) for name, group in groups.items()}
    names = sorted(counts)
    folded = {name: _folded(name) for name in names}
    flags = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            limit = 2 if min(len(folded[a]), len(folded[b])) >= 8 else 1
            if abs(len(folded[a]) - len(folded[b])) > limit:  # cheap test first: the distance is at least this
                continue
            distance = levenshtein(folded[a], folded[b])
            if distance > limit:
                continue
            rare, common = sorted((a, b), key=lambda n: (counts[n], n))
            if distance == 0 or counts[rare] <= rarer_share * counts[common]:
                flags.append({"name": rare, "images": counts[rare], "sources": _sources(groups[rare]),
                              "similar_to": common, "similar_images": counts[common],
                              "similar_sources": _sources(groups[common]), "edit_distance": distance})
    return sorted(flags, key=lambda f: (-f["similar_images"], f["name"]))


def sex_inconsistencies(records: Sequence[Record]) -> list[dict]:
    """Individuals with both sexes recorded; `outliers` are the images that disagree with the
    majority, ready to paste into `exclude_images`."""
    flags = []
    for name, group in _by_individual(records).items():
        sexes = [_normalise(r.gender) for r in group]  # 'Male' and 'male' are one sex
        known = Counter(sex for sex in sexes if sex in ("male", "female"))
        if len(known) < 2:
            continue
        majority = known.most_common(1)[0][0]
        flags.append({"name": name, "images": len(group), "sources": _sources(group),
                      "sexes": dict(Counter(r.gender for r in group).most_common()),
                      "outliers": [r.path for r, sex in zip(group, sexes) if sex in known and sex != majority]})
    return sorted(flags, key=lambda f: -f["images"])


def age_inconsistencies(records: Sequence[Record], span: float = AGE_SPAN_YEARS,
                        outlier_share: float = OUTLIER_SHARE) -> list[dict]:
    """Individuals whose recorded ages lie more than `span` years apart, or whose age groups are
    more than one step apart (Infant and Adult, say).

    Large groups of ages years apart can be photos taken years apart; a few images far from every
    large group are more likely label errors. So `outliers` lists only the images whose age (or age
    group) is rare (at most `outlier_share` of the individual's images) and more than `span` years
    (one age-group step) from every common one.
    """
    flags = []
    for name, group in _by_individual(records).items():
        ages = Counter(r.age for r in group if r.age is not None)
        ranks = Counter(_age_rank(r) for r in group if _age_rank(r) is not None)
        if not (_spread(ages) > span or _spread(ranks) > 1):
            continue
        odd_ages = _isolated(ages, span, outlier_share * len(group))
        odd_ranks = _isolated(ranks, 1, outlier_share * len(group))
        flags.append({"name": name, "images": len(group), "sources": _sources(group),
                      "ages": {f"{a:g}": n for a, n in sorted(ages.items())},
                      "age_groups": dict(Counter(r.age_group for r in group).most_common()),
                      "outliers": [r.path for r in group if r.age in odd_ages or _age_rank(r) in odd_ranks]})
    return sorted(flags, key=lambda f: -f["images"])


def _spread(counts: Counter) -> float:
    return max(counts) - min(counts) if counts else 0


def _isolated(counts: Counter, distance: float, rare: float) -> set:
    """Values seen at most `rare` times and more than `distance` from every more common value."""
    common = [v for v, n in counts.items() if n > rare]
    return {v for v, n in counts.items()
            if n <= rare and common and all(abs(v - c) > distance for c in common)}


def _age_rank(record: Record) -> int | None:
    word = _normalise(record.age_group)
    return AGE_GROUP_ORDER.index(word) if word in AGE_GROUP_ORDER else None


def names_in_several_sources(records: Sequence[Record]) -> list[dict]:
    """One name in several sources is merged into one individual; C-Zoo and C-Tai animals cannot be
    the same, so such a name needs an alias for one of them."""
    flags = []
    for name, group in _by_individual(records).items():
        per_source = Counter(r.source for r in group)
        if len(per_source) > 1:
            flags.append({"name": name, "images": len(group), "sources": dict(sorted(per_source.items()))})
    return flags


# --- the report ---------------------------------------------------------------------------------

def count_problems(exclusions: Iterable[Exclusion]) -> int:
    return sum(e.category in PROBLEM_CATEGORIES for e in exclusions)


def build_report(raw_dir: Path, input_kind: str, min_images: int, parsed: Sequence[Record],
                 fixed: Sequence[Record], exclusions: Sequence[Exclusion], usable: Sequence[Record],
                 kept: Sequence[Record], fix_info: dict | None, closed: dict[str, list[Row]] | None,
                 checks: dict[str, ImageCheck]) -> dict:
    """The validation report's content (rendered by `src.data.validate.write_report`); `closed` is the
    closed-set split, None when fewer than 2 individuals are kept."""
    usable_counts = Counter(r.individual for r in usable)
    below = [{"name": name, "images": usable_counts[name], "annotated": len(group), "sources": _sources(group)}
             for name, group in sorted(_by_individual(fixed).items()) if usable_counts[name] < min_images]
    return {"format_version": FORMAT_VERSION, "raw_dir": str(raw_dir), "input": input_kind,
            "min_images": min_images, "problems": count_problems(exclusions),
            "counts": _source_counts(parsed, exclusions, usable, kept),
            "splits": split_summary(closed, checks),
            "excluded": [e.as_dict() for e in exclusions], "below_threshold": below,
            "label_quality": label_quality(fixed), "labels_fix": fix_info}


def _source_counts(parsed: Sequence[Record], exclusions: Sequence[Exclusion], usable: Sequence[Record],
                   kept: Sequence[Record]) -> dict[str, dict]:
    def per(records: Sequence[Record], source: str | None) -> list[Record]:
        return [r for r in records if source is None or r.source == source]

    excluded = [e.record for e in exclusions]
    sources = list(dict.fromkeys(r.source for r in parsed))
    return {source or "all": {
        "parsed_images": len(per(parsed, source)),
        "parsed_individuals": len({r.individual for r in per(parsed, source)}),
        "excluded": len(per(excluded, source)), "usable_images": len(per(usable, source)),
        "kept_images": len(per(kept, source)),
        "kept_individuals": len({r.individual for r in per(kept, source)})}
        for source in [*sources, None]}


def split_summary(closed: dict[str, list[Row]] | None, checks: dict[str, ImageCheck]) -> dict | None:
    """What training and scoring will see: per split the images, individuals and those with a single
    image there (their val or test score rests on one photo); images per individual (class balance);
    and images whose pixels lie in two splits (leakage: 0 unless duplicate detection failed)."""
    if closed is None:
        return None
    per_individual = Counter(name for rows in closed.values() for _, name in rows)
    sizes = sorted(per_individual.values())
    splits = {}
    for split, rows in closed.items():
        counts = Counter(name for _, name in rows)
        splits[split] = {"images": len(rows), "individuals": len(counts),
                         "single_image": sorted(name for name, n in counts.items() if n == 1)}
    splits_of_pixels: dict[str, set[str]] = defaultdict(set)
    for split, rows in closed.items():
        for path, _ in rows:
            splits_of_pixels[checks[path].digest].add(split)
    return {"per_split": splits,
            "images_per_individual": {
                "min": sizes[0], "median": statistics.median(sizes), "max": sizes[-1],
                "fewest": sorted(name for name, n in per_individual.items() if n == sizes[0]),
                "most": sorted(name for name, n in per_individual.items() if n == sizes[-1])},
            "same_pixels_in_two_splits": sum(len(found) > 1 for found in splits_of_pixels.values())}


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Writes `validation_report.json` (everything) and `validation_report.md` (the same, lists
    capped, labels-fix exclusions only counted); returns their paths, the Markdown one first."""
    atomic.make_folder(out_dir)
    json_path, md_path = out_dir / "validation_report.json", out_dir / "validation_report.md"
    atomic.write_text(json_path, json.dumps(report, indent=2) + "\n")
    atomic.write_text(md_path, render_markdown(report))
    return md_path, json_path


def render_markdown(report: dict) -> str:
    """A readable report: counts per source, problems, thresholds, label flags, labels fix."""
    n = report["min_images"]
    lines = ["# Validation report", "",
             f"Raw folder: `{report['raw_dir']}`; input: {report['input']}; minimum images per "
             f"individual: {n}.", "",
             f"**{report['problems']:,} problem(s)**; images excluded: {len(report['excluded']):,}.", "",
             "## Counts per source", "",
             f"| source | parsed images | individuals | excluded | usable | min{n} images | "
             f"min{n} individuals |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for source, c in report["counts"].items():
        lines.append(f"| {source} | {c['parsed_images']:,} | {c['parsed_individuals']:,} | "
                     f"{c['excluded']:,} | {c['usable_images']:,} | {c['kept_images']:,} | "
                     f"{c['kept_individuals']:,} |")
    lines += ["", f"## Splits of the min{n} set", ""]
    lines += _markdown_splits(report["splits"])
    lines += ["", "## Excluded images", ""]
    lines += _markdown_exclusions(report["excluded"])
    lines += ["", f"## Individuals below {n} usable images", ""]
    lines += _capped([f"- {b['name']} ({', '.join(b['sources'])}): {b['images']} usable of "
                      f"{b['annotated']} annotated" for b in report["below_threshold"]]) or ["None."]
    lines += ["", "## Label quality (suspicions, nothing changed)", ""]
    lines += _markdown_flags(report["label_quality"])
    lines += ["", "## Labels fix", ""]
    lines += _markdown_labels_fix(report["labels_fix"])
    return "\n".join(lines) + "\n"


def _markdown_splits(summary: dict | None) -> list[str]:
    if summary is None:
        return ["None: fewer than 2 individuals kept."]
    lines = ["| split | images | individuals | individuals with 1 image |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {split} | {s['images']:,} | {s['individuals']:,} | {len(s['single_image']):,} |"
              for split, s in summary["per_split"].items()]
    sizes = summary["images_per_individual"]
    lines += ["", f"- images per individual: min {sizes['min']:,} ({_names(sizes['fewest'])}), median "
                  f"{sizes['median']:g}, max {sizes['max']:,} ({_names(sizes['most'])}): the largest class has "
                  f"{sizes['max'] / sizes['min']:.1f} times the images of the smallest"]
    lines += [f"- scored on a single image in {split}: {_names(s['single_image'])}"
              for split, s in summary["per_split"].items() if split != "train" and s["single_image"]]
    lines.append(f"- images with the same pixels in two splits: {summary['same_pixels_in_two_splits']:,} (exact "
                 "duplicates are excluded before splitting; photos taken moments apart are not detected and "
                 "may be in train and test alike)")
    return lines


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit:,} more" if len(names) > limit else "")


def _capped(items: list[str]) -> list[str]:
    if len(items) <= MARKDOWN_LIST_LIMIT:
        return items
    return items[:MARKDOWN_LIST_LIMIT] + [f"- ... and {len(items) - MARKDOWN_LIST_LIMIT:,} more "
                                          f"(all in validation_report.json)"]


def _markdown_exclusions(excluded: list[dict]) -> list[str]:
    if not excluded:
        return ["None."]
    by_category = Counter(e["category"] for e in excluded)
    lines = [f"- {category}: {count:,}" + (" (as the labels-fix file asks; listed in validation_report.json)"
                                           if category == LABELS_FIX else "")
             for category, count in by_category.most_common()]
    # Only problem images get a row: hundreds of exclusions the user asked for (a whole placeholder name)
    # would otherwise fill the capped table and push the images that need a look out of it.
    problems = [e for e in excluded if e["category"] in PROBLEM_CATEGORIES]
    if not problems:
        return lines
    lines += ["", "| path | individual | reason |", "| --- | --- | --- |"]
    rows = [f"| `{e['path']}` | {e['individual']} | {e['category']}"
            f"{': ' + e['detail'] if e['detail'] else ''} |" for e in problems]
    return lines + _capped(rows)


def _markdown_flags(flags: dict[str, list[dict]]) -> list[str]:
    sections = {
        "placeholder_names": ("Placeholder names (an age-group word or 'unknown', not an animal)",
                              lambda f: f"- {f['name']} ({', '.join(f['sources'])}): {f['images']} images"),
        "near_duplicate_names": ("Near-duplicate names (probably one name misspelled)",
                                 lambda f: f"- {f['name']} ({f['images']}, {', '.join(f['sources'])}) ~ "
                                           f"{f['similar_to']} ({f['similar_images']}, "
                                           f"{', '.join(f['similar_sources'])}), edit distance "
                                           f"{f['edit_distance']}"),
        "sex_inconsistent": ("Both sexes recorded for one individual",
                             lambda f: f"- {f['name']}: {f['images']} images, {_pairs(f['sexes'])}; "
                                       f"{len(f['outliers'])} against the majority"),
        "age_inconsistent": (f"Ages more than {AGE_SPAN_YEARS:g} years or age groups more than one "
                             f"step apart for one individual",
                             lambda f: f"- {f['name']}: {f['images']} images, ages "
                                       f"{_pairs(f['ages'])}; age groups {_pairs(f['age_groups'])}; "
                                       f"{len(f['outliers'])} outlier(s)"),
        "names_in_several_sources": ("One name in several sources (merged into one individual)",
                                     lambda f: f"- {f['name']}: {_pairs(f['sources'])}"),
    }
    lines = []
    for key, (title, line) in sections.items():
        lines += [f"### {title}", ""] + (_capped([line(f) for f in flags[key]]) or ["None."]) + [""]
    lines.append("`outliers` in validation_report.json lists those images (paths relative to the raw "
                 "folder, ready for `exclude_images` in a labels-fix file). Two large groups of ages years "
                 "apart may be photos taken years apart; rare outliers are more likely label errors.")
    return lines


def _pairs(counts: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items())


def _markdown_labels_fix(info: dict | None) -> list[str]:
    if not info:
        return ["None applied (names as published)."]
    lines = [f"File: `{info['file']}`.", "",
             f"- aliases applied: {_pairs(info['aliases_applied']) or 'none'}",
             f"- images excluded: {info['excluded_images']:,}"]
    if info["unused"]:
        lines.append(f"- entries that matched nothing: {', '.join(info['unused'])}")
    return lines
