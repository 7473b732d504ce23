"""`prepare` end to end on tiny generated images: outputs, exclusions, inputs, errors, the CLI."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from itertools import count
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data.annotations import AnnotationError, LabelsFix, Record, sites_as_individuals
from src.data import prepare as prepare_module
from src.data import standin
from src.data.dataset import DatasetError, PreparedData
from src.data.lists import read_list
from src.data.prepare import PrepareError, apply_labels_fix, main, prepare
from src.data.splits import SplitError, choose_unknown, stratified_split

REPO = Path(__file__).resolve().parents[2]
REAL_RAW = REPO.parent / "shared" / "chimpanzee_faces" / "annotations" / "raw"
RELEASE = "datasets_cropped_chimpanzee_faces"
_seeds = count()


def _png(path: Path) -> None:
    """A tiny image with unique pixels (identical images would be excluded as duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(next(_seeds)).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _line(filename: str, name: str, current: bool) -> str:
    head = f"Filename face_images/{filename} Name {name} Age 5 Age_Group" if current else \
        f"face_images/{filename} Name {name} Age NaN Age_group"
    return f"{head} Adult Gender Male RightEye 1 2 LeftEye 3 4 MouthCenter 5 6 LeftEarlobe Inf Inf " \
           f"RightEarlobe -1 9 \n"


def make_release(root: Path, czoo: dict[str, int], ctai: dict[str, int], images: bool = True) -> Path:
    """The cvjena layout under `root`: CZoo in the older format, CTai in the current one."""
    for folder, filename, sizes, current in (("data_CZoo", "annotations_czoo.txt", czoo, False),
                                             ("data_CTai", "annotations_ctai.txt", ctai, True)):
        base = root / RELEASE / folder
        lines = []
        for name, n in sizes.items():
            for i in range(n):
                filename_i = f"img-{name}-{i}.png"
                lines.append(_line(filename_i, name, current))
                if images:
                    _png(base / "face_images" / filename_i)
        base.mkdir(parents=True, exist_ok=True)
        (base / filename).write_text("".join(lines))
    return root


CZOO = {"Kofi": 12, "Lome": 10}
CTAI = {"Fredy": 20, "Freddy": 2, "Adult": 10, "Wapi": 10, "Tita": 11, "Zita": 9}


def _quiet(**kwargs) -> dict:
    return {"open_set_individuals": 2, "workers": 2, **kwargs}


def test_prepare_writes_the_design_layout(tmp_path):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    result = prepare(raw, tmp_path / "out", **_quiet())
    ann = tmp_path / "out" / "annotations"
    assert result.annotations_dir == ann
    prepared = json.loads((ann / "prepared.json").read_text())
    assert prepared == result.prepared
    assert {k: prepared[k] for k in ("raw_dir", "min_images", "seed", "num_classes", "num_images",
                                     "format_version")} == {
        "raw_dir": str(raw.resolve()), "min_images": 10, "seed": 0, "num_classes": 6, "num_images": 73,
        "format_version": 1}
    assert prepared["open_set"]["num_classes"] == 4 and prepared["open_set"]["num_unknown"] == 2
    assert prepared["sources"] == {"CZoo": 22, "CTai": 51}
    assert prepared["standins"] is False

    merged = read_list(ann / "annotations_merged_all.txt")
    assert len(merged) == 84 and merged[0] == (f"{RELEASE}/data_CZoo/face_images/img-Kofi-0.png", "Kofi")
    assert all((raw / path).is_file() for path, _ in merged)
    kept = read_list(ann / "annotations_merged_min10.txt")
    assert {n for _, n in kept} == {"Kofi", "Lome", "Fredy", "Adult", "Wapi", "Tita"}
    kept_ids = (ann / "kept_ids_min10.txt").read_text().split()
    assert kept_ids == ["Adult", "Fredy", "Kofi", "Lome", "Tita", "Wapi"]
    splits = {s: read_list(ann / f"{s}.txt") for s in ("train", "val", "test")}
    assert sorted(r for rows in splits.values() for r in rows) == sorted(kept)
    assert all({n for _, n in rows} == {n for _, n in kept} for rows in splits.values())
    assert {s: len(rows) for s, rows in splits.items()} == prepared["splits"]

    unknown = (ann / "open_set" / "unknown_ids.txt").read_text().split()
    assert len(unknown) == 2
    known_train = read_list(ann / "open_set" / "train.txt")
    assert known_train == [r for r in splits["train"] if r[1] not in unknown]
    held = read_list(ann / "open_set" / "unknown_val.txt") + read_list(ann / "open_set" / "unknown_test.txt")
    assert {n for _, n in held} == set(unknown)

    with (ann / "metadata.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 84
    first = rows[0]
    assert (first["source"], first["age"], first["age_group"], first["gender"]) == ("CZoo", "", "Adult", "Male")
    assert (first["right_eye_x"], first["left_earlobe_x"], first["right_earlobe_x"]) == ("1", "", "-1")
    assert (first["width"], first["height"], first["excluded"]) == ("8", "8", "")
    assert {r["split"] for r in rows if r["individual"] == "Freddy"} == {""}
    assert {r["split"] for r in rows if r["individual"] == "Kofi"} == {"train", "val", "test"}
    ctai_row = next(r for r in rows if r["source"] == "CTai")
    assert ctai_row["age"] == "5"

    report = json.loads((ann / "validation_report.json").read_text())
    assert report["problems"] == 0 and report["excluded"] == []
    assert [b["name"] for b in report["below_threshold"]] == ["Freddy", "Zita"]
    assert [f["name"] for f in report["label_quality"]["placeholder_names"]] == ["Adult"]
    assert {s: (v["images"], v["individuals"]) for s, v in report["splits"]["per_split"].items()} == {
        s: (len(rows), len({n for _, n in rows})) for s, rows in splits.items()}
    assert report["splits"]["per_split"]["test"]["single_image"] == ["Adult", "Lome", "Tita", "Wapi"]
    assert report["splits"]["images_per_individual"] == {"min": 10, "median": 10.5, "max": 20,
                                                         "fewest": ["Adult", "Lome", "Wapi"], "most": ["Fredy"]}
    assert report["splits"]["same_pixels_in_two_splits"] == 0
    markdown = (ann / "validation_report.md").read_text()
    assert "| test | 9 | 6 | 4 |" in markdown
    assert "- scored on a single image in test: Adult, Lome, Tita, Wapi" in markdown


def test_prepare_is_deterministic_and_seeded(tmp_path):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    lists = []
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare(raw, tmp_path / out, seed=seed, **_quiet())
        lists.append([(tmp_path / out / "annotations" / f).read_text()
                      for f in ("train.txt", "val.txt", "test.txt", "open_set/unknown_ids.txt")])
    assert lists[0] == lists[1] and lists[0] != lists[2]


def test_raw_dir_may_be_the_release_folder(tmp_path):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    result = prepare(raw / RELEASE, tmp_path / "out", **_quiet())
    rows = read_list(result.annotations_dir / "annotations_merged_all.txt")
    assert rows[0][0] == "data_CZoo/face_images/img-Kofi-0.png"
    assert result.prepared["raw_dir"] == str((raw / RELEASE).resolve())


def test_annotations_saved_by_a_windows_editor_give_the_same_dataset(tmp_path):
    """CRLF line endings, a byte-order mark and tabs between fields change nothing in any output."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    prepare(raw, tmp_path / "unix", **_quiet())
    for annotation_file in (raw / RELEASE).glob("data_*/annotations_*.txt"):
        text = annotation_file.read_text().replace(" Name ", "\tName\t").replace("\n", "\r\n")
        annotation_file.write_text(text, encoding="utf-8-sig", newline="")
    assert b"\r\n" in annotation_file.read_bytes()
    prepare(raw, tmp_path / "windows", **_quiet())
    unix, windows = tmp_path / "unix" / "annotations", tmp_path / "windows" / "annotations"
    for path in sorted(unix.rglob("*.txt")) + [unix / "metadata.csv"]:
        assert path.read_bytes() == (windows / path.relative_to(unix)).read_bytes(), path.name


def test_problem_images_are_excluded_and_reported(tmp_path):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    faces = raw / RELEASE / "data_CTai" / "face_images"
    (faces / "img-Tita-0.png").write_bytes(b"")  # e.g. a copy stopped midway
    (faces / "img-Tita-1.png").write_bytes(b"not an image")
    shutil.copy(faces / "img-Wapi-0.png", faces / "img-Wapi-1.png")
    result = prepare(raw, tmp_path / "out", **_quiet())
    excluded = {(e["path"].rsplit("/", 1)[1], e["category"]) for e in result.report["excluded"]}
    assert excluded == {("img-Tita-0.png", "unreadable"), ("img-Tita-1.png", "unreadable"),
                        ("img-Wapi-1.png", "duplicate")}
    assert result.problems == 3
    # Tita falls to 9 usable images and Wapi to 9: both below the threshold now
    kept_ids = (result.annotations_dir / "kept_ids_min10.txt").read_text().split()
    assert kept_ids == ["Adult", "Fredy", "Kofi", "Lome"]
    below = {b["name"]: (b["images"], b["annotated"]) for b in result.report["below_threshold"]}
    assert below["Tita"] == (9, 11) and below["Wapi"] == (9, 10)
    report_md = (result.annotations_dir / "validation_report.md").read_text()
    assert "img-Tita-1.png" in report_md and "unreadable" in report_md


def test_a_split_that_cannot_be_made_leaves_the_earlier_output_whole(tmp_path, monkeypatch):
    """Rerunning with an open-set K too large for the data fails without touching the dataset
    prepared before (prepared.json used to be deleted and the report replaced)."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)  # 6 individuals with 10+ images
    prepare(raw, tmp_path / "out", **_quiet())
    annotations = tmp_path / "out" / "annotations"
    before = {p: p.read_bytes() for p in annotations.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:  # impossible by the annotations alone: refused before decoding
        m.setattr("src.data.prepare.check_images", lambda *a: pytest.fail("images decoded"))
        with pytest.raises(SplitError, match="cannot hold out 5 of 6 individuals"):
            prepare(raw, tmp_path / "out", open_set_individuals=5, workers=2)
    # Possible by the annotations; an unreadable image then leaves Lome 9 of 10, so 5 individuals.
    (raw / RELEASE / "data_CZoo" / "face_images" / "img-Lome-0.png").write_bytes(b"")
    with pytest.raises(SplitError, match="cannot hold out 4 of 5 individuals"):
        prepare(raw, tmp_path / "out", open_set_individuals=4, workers=2)
    assert {p: p.read_bytes() for p in annotations.rglob("*") if p.is_file()} == before


def test_strict_exits_1_on_problems(tmp_path, capsys):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    (raw / RELEASE / "data_CZoo" / "face_images" / "img-Kofi-0.png").write_bytes(b"not an image")
    args = ["--raw-dir", str(raw), "--out-dir", str(tmp_path / "out"), "--open-set-individuals", "2"]
    assert main(args) == 0
    assert main(args + ["--strict"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: --strict: 1 image problem(s)")


def test_labels_fix_is_applied_before_filtering(tmp_path):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    fix = tmp_path / "fix.txt"
    fix.write_text("Freddy -> Fredy\nexclude-name Adult\n"
                   f"exclude-image {RELEASE}/data_CTai/face_images/img-Tita-0.png\nNobody -> Somebody\n")
    result = prepare(raw, tmp_path / "out", labels_fix=fix, **_quiet())
    kept = read_list(result.annotations_dir / "annotations_merged_min10.txt")
    assert sum(n == "Fredy" for _, n in kept) == 22
    assert {n for _, n in kept} == {"Kofi", "Lome", "Fredy", "Wapi", "Tita"}
    assert result.prepared["labels_fix"] == str(fix)
    assert result.report["problems"] == 0
    info = result.report["labels_fix"]
    assert info["aliases_applied"] == {"Freddy -> Fredy": 2}
    assert info["excluded_images"] == 11 and info["unused"] == ["alias Nobody"]
    with (result.annotations_dir / "metadata.csv").open() as f:
        rows = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(f)}
    freddy = rows["img-Freddy-0.png"]
    assert (freddy["individual"], freddy["published_name"]) == ("Fredy", "Freddy")
    assert rows["img-Adult-0.png"]["excluded"] == "labels-fix: name Adult excluded"


@pytest.mark.skipif(not (REAL_RAW / "annotations_ctai.txt").is_file(),
                    reason=f"no real annotations in {REAL_RAW}")
def test_real_annotations_without_images(tmp_path, caplog):
    """The real files with no images: counts by the annotations are logged, then the run stops with
    one line saying the release is incomplete, before decoding or writing anything."""
    for folder, filename in (("data_CZoo", "annotations_czoo.txt"), ("data_CTai", "annotations_ctai.txt")):
        (tmp_path / "raw" / RELEASE / folder).mkdir(parents=True)
        shutil.copy(REAL_RAW / filename, tmp_path / "raw" / RELEASE / folder / filename)
    caplog.set_level("INFO", logger="src.data.prepare")
    with pytest.raises(PrepareError, match="incomplete: 7,187 annotated image.s. missing .* present: CZoo 0 of "
                                           "2,109, CTai 0 of 5,078"):
        prepare(tmp_path / "raw", tmp_path / "out", workers=2)
    assert "7,187 images / 102 individuals (CZoo 2,109, CTai 5,078)" in caplog.text
    assert "7,150 images / 87 individuals (CZoo 2,109, CTai 5,041) by the annotations alone" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_release_with_missing_images_is_refused_whole(tmp_path, monkeypatch, capsys):
    """A partly downloaded or copied release used to be prepared from what was there (exit 0, fewer
    individuals, other splits): now one line says it is incomplete, and the earlier output stays whole.
    An image left out on purpose goes into the labels fix; a list's missing file stays a problem."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    prepare(raw, tmp_path / "out", **_quiet())
    annotations = tmp_path / "out" / "annotations"
    before = {p: p.read_bytes() for p in annotations.rglob("*") if p.is_file()}
    missing = f"{RELEASE}/data_CTai/face_images/img-Tita-3.png"
    (raw / missing).unlink()
    shutil.rmtree(raw / RELEASE / "data_CZoo" / "face_images")  # as if the copy stopped
    monkeypatch.setattr("src.data.prepare.check_images", lambda *a: pytest.fail("images decoded"))
    args = ["--raw-dir", str(raw), "--out-dir", str(tmp_path / "out"), "--open-set-individuals", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: the release in {raw.resolve()} is incomplete: 23 "
                                                   f"annotated image(s) missing (first: {RELEASE}/data_CZoo/")
    assert "present: CZoo 0 of 22, CTai 61 of 62); --download completes it" in err
    assert {p: p.read_bytes() for p in annotations.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    fix = tmp_path / "fix.txt"  # the same images left out on purpose
    fix.write_text(f"exclude-image {missing}\n" + "".join(f"exclude-image {RELEASE}/data_CZoo/face_images/img-{name}-"
                                                          f"{i}.png\n" for name, n in CZOO.items() for i in range(n)))
    result = prepare(raw, tmp_path / "out", labels_fix=fix, **_quiet())
    assert result.problems == 0 and result.report["labels_fix"]["excluded_images"] == 23
    assert result.prepared["num_images"] == 20 + 10 + 10 + 10  # Fredy, Adult, Wapi, Tita (10 of 11 left)


def _folder(root: Path, sizes: dict[str, int]) -> Path:
    for name, n in sizes.items():
        for i in range(n):
            _png(root / name / f"{i}.png")
    return root


def test_the_individuals_below_min_images_are_named_on_the_console(tmp_path, caplog):
    """Only counts were shown: that Tiny (2 photos) will never be named by the model was in the report
    alone. Problem images count against an individual too (Pia: 3 files, 1 unreadable)."""
    root = _folder(tmp_path / "photos", {"Kofi": 3, "Lome": 3, "Pia": 3, "Tiny": 2})
    (root / "Pia" / "0.png").write_bytes(b"")
    caplog.set_level("INFO", logger="src.data.prepare")
    prepare(folder=root, out_dir=tmp_path / "out", min_images=3, open_set_individuals=0)
    assert ("left out   2 individual(s) below 3 usable images, which training will not see: Pia 2, Tiny 2"
            in caplog.text)


SITES = {"Tai/Kofi": 2, "Tai/Zuri": 2, "Tai/Ama": 2, "Tai/Lome": 2, "Zoo/Fredy": 2, "Zoo/Pia": 2}


@pytest.mark.parametrize("layout", [{"Kofi/2019": 2, "Kofi/2020": 2, "Zuri/2019": 2, "Zuri/2021": 2},
                                    {"Kofi/a": 2, "Kofi/b": 2, "Zuri": 2, "Zuri/c": 2},
                                    {"Kofi/a": 2, "Kofi/b": 2, "Zuri/c": 4}, {"Kofi": 4, "Zuri": 4}])
def test_a_folder_of_sites_is_warned_about_and_year_folders_are_not(tmp_path, caplog, layout):
    """photos/<site>/<individual>/ was read silently as a few individuals named after the sites. Not so
    an individual's years (they recur), loose images in it, or a single sub-folder."""
    caplog.set_level("INFO", logger="src.data.prepare")
    sites = _folder(tmp_path / "sites", SITES)
    result = prepare(folder=sites, out_dir=tmp_path / "out", min_images=3, open_set_individuals=0)
    assert result.prepared["num_classes"] == 2  # still read as documented: the warning says what happened
    assert (f"warning    {sites / 'Tai'} holds no image directly, only 4 folders of images (Ama, Kofi, Lome, ...), "
            "and none of their names recurs under another top-level folder as years or dates do: if they are "
            "individuals (a <site>/<individual>/ layout), all its images are labelled 'Tai'; give --folder "
            f"{sites / 'Tai'} (one prepare per site) or name the images with a --list file") in caplog.text
    caplog.clear()
    prepare(folder=_folder(tmp_path / "photos", layout), out_dir=tmp_path / "out", min_images=3,
            open_set_individuals=0)
    assert "holds no image directly" not in caplog.text and "individuals (folder 8)" in caplog.text
    assert sites_as_individuals(sites, []) is None  # no image at all: prepare's own error says so


@pytest.mark.parametrize("out_dir", [".", "data"])
def test_an_out_dir_inside_the_folder_of_photos_is_refused(tmp_path, out_dir):
    """Before, it worked once; the next run read annotations/ as an individual and failed on '.txt'."""
    root = _folder(tmp_path / "photos", {"Kofi": 3, "Lome": 3})
    with pytest.raises(PrepareError, match=f"--out-dir .* is inside --folder {root}: choose an --out-dir outside"):
        prepare(folder=root, out_dir=root / out_dir, min_images=3, open_set_individuals=0)
    assert sorted(p.name for p in root.iterdir()) == ["Kofi", "Lome"]


def test_folder_input_with_many_formats(tmp_path):
    root = _folder(tmp_path / "photos", {"Kofi": 5, "Lome": 5, "Pia": 5})
    rgb = np.random.default_rng(99).integers(0, 256, (16, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(root / "Kofi" / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(rgb[:, :, 0]).save(root / "Kofi" / "gray.pgm")
    Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 200).save(root / "Lome" / "deep.png")
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(root / "Lome" / "alpha.png")
    (root / "Pia" / "2019").mkdir()
    Image.fromarray(rgb[::2]).save(root / "Pia" / "2019" / "nested.tif")
    result = prepare(folder=root, out_dir=tmp_path / "out", min_images=5, open_set_individuals=0)
    assert result.problems == 0 and result.prepared["num_images"] == 20
    assert result.prepared["input"] == "folder" and result.prepared["open_set"] is None
    rows = read_list(result.annotations_dir / "annotations_merged_all.txt")
    assert ("Pia/2019/nested.tif", "Pia") in rows and ("Kofi/rotated.jpg", "Kofi") in rows
    with (result.annotations_dir / "metadata.csv").open() as f:
        sizes = {r["path"]: (r["width"], r["height"]) for r in csv.DictReader(f)}
    assert sizes["Kofi/rotated.jpg"] == ("16", "10")  # EXIF orientation applied
    assert not (result.annotations_dir / "open_set").exists()


def test_folder_input_reports_a_broken_link_as_missing(tmp_path):
    root = _folder(tmp_path / "photos", {"Kofi": 3, "Lome": 3})
    (root / "Kofi" / "usb.png").symlink_to(tmp_path / "unmounted.png")
    result = prepare(folder=root, out_dir=tmp_path / "out", min_images=3, open_set_individuals=0)
    excluded = [(e["path"], e["category"]) for e in result.report["excluded"]]
    assert excluded == [("Kofi/usb.png", "missing file")]


def test_folder_names_with_spaces(tmp_path):
    root = _folder(tmp_path / "photos", {"Mr Bean": 3, "Kofi": 3})
    with pytest.raises(AnnotationError, match="individual name 'Mr Bean' contains whitespace"):
        prepare(folder=root, out_dir=tmp_path / "out", min_images=3, open_set_individuals=0)
    result = prepare(folder=root, out_dir=tmp_path / "out", min_images=3, open_set_individuals=0,
                     spaces_to_underscores=True)
    rows = read_list(result.annotations_dir / "annotations_merged_all.txt")
    assert sorted(rows)[-3:] == [(f"Mr Bean/{i}.png", "Mr_Bean") for i in range(3)]


def test_list_input(tmp_path):
    root = _folder(tmp_path / "photos", {"Kofi": 3, "Lome": 3})
    listing = tmp_path / "photos" / "mine.txt"
    listing.write_text("".join(f"{n}/{i}.png {n}\n" for n in ("Kofi", "Lome") for i in range(3)))
    result = prepare(list_file=listing, out_dir=tmp_path / "out", min_images=3, open_set_individuals=0)
    assert result.prepared["raw_dir"] == str(root.resolve()) and result.prepared["num_images"] == 6
    elsewhere = tmp_path / "mine.txt"
    shutil.copy(listing, elsewhere)
    result = prepare(root, tmp_path / "out2", list_file=elsewhere, min_images=3, open_set_individuals=0)
    assert result.prepared["num_classes"] == 2


# The class matters: main gives PrepareError and SplitError one line; a plain ValueError would be a traceback.
@pytest.mark.parametrize("kwargs, error, message", [
    ({"min_images": 2}, PrepareError, "--min-images 2: at least 3"),
    ({"open_set_individuals": 1}, PrepareError, "--open-set-individuals 1: use 0"),
    ({"fractions": (0.8, 0.2, 0.2)}, SplitError, "summing to 1"),
    # The line names the option that fixes it (it said "0 skips the open-set split", naming no option).
    ({"open_set_individuals": 10}, SplitError,
     r"cannot hold out 10 of 6 individuals.*; --open-set-individuals 0 skips it \(or 2 to 4\)$"),
    # Was "cannot hold out 10 of 0 individuals for the open-set split", which hid the cause.
    ({"min_images": 500}, PrepareError,
     "^0 individual.s. with at least 500 usable images; identification needs 2 or more"),
])
def test_bad_parameters(tmp_path, kwargs, error, message):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    with pytest.raises(error, match=message):
        prepare(raw, tmp_path / "out", **kwargs)


@pytest.mark.parametrize("ctai_text, message", [
    (None, "error: missing annotation file .*annotations_ctai.txt"),
    ("face_images/a.png Name Kofi Age 3\n", r"error: .*annotations_ctai.txt:1: missing field\(s\) Age_group"),
    (_line("a.bmpx", "Kofi", current=False), r"error: .*annotations_ctai.txt:1: unknown image format '.bmpx'"),
])
def test_cli_bad_cvjena_input_is_one_line(tmp_path, capsys, ctai_text, message):
    make_release(tmp_path / "raw", CZOO, {}, images=False)
    ctai = tmp_path / "raw" / RELEASE / "data_CTai" / "annotations_ctai.txt"
    if ctai_text is None:
        ctai.unlink()
    else:
        ctai.write_text(ctai_text)
    assert main(["--raw-dir", str(tmp_path / "raw"), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(message, err), err


def test_cli_subprocess_success_and_errors(tmp_path):
    """The real entry point: counts on stdout and exit 0; bad input gives one `error:` line and exit 2."""
    root = _folder(tmp_path / "photos", {"Kofi": 4, "Lome": 4, "Pia": 4, "Riet": 4})
    run = [sys.executable, "-m", "src.data.prepare", "--out-dir", str(tmp_path / "out")]
    ok = subprocess.run(run + ["--folder", str(root), "--min-images", "4", "--open-set-individuals", "2"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "parsed     16 images / 4 individuals (folder 16)" in ok.stdout
    assert "open set   2 known, 2 held out (1 in unknown_val, 1 in unknown_test)" in ok.stdout
    (root / "Kofi" / "notes.txt").write_text("x")
    bad = subprocess.run(run + ["--folder", str(root)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "notes.txt: unknown image format '.txt'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("option, message", [
    ("--list", r"error: .*mine\.txt: not UTF-8 text"),          # e.g. a list saved as UTF-16 by an editor
    ("--labels-fix", r"error: .*mine\.txt: not UTF-8 text"),
    ("--workers", r"error: --workers -2: give a number of threads, or 0"),
])
def test_cli_unreadable_text_files_and_bad_workers_are_one_line(tmp_path, capsys, option, message):
    root = _folder(tmp_path / "photos", {"Kofi": 3, "Lome": 3})
    listing = tmp_path / "mine.txt"
    listing.write_bytes("Kofi/0.png Kofi\n".encode("utf-16"))
    argv = {"--list": ["--list", str(listing), "--raw-dir", str(root)],
            "--labels-fix": ["--folder", str(root), "--labels-fix", str(listing)],
            "--workers": ["--folder", str(root), "--workers", "-2"]}[option]
    assert main([*argv, "--out-dir", str(tmp_path / "out"), "--min-images", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(message, err), err


@pytest.mark.parametrize("argv, message", [
    (lambda root, f: ["--raw-dir", str(f)], "raw folder {f} is a file, not a folder (--download fetches the "
                                            "public release; --folder or --list read your own photos)"),
    (lambda root, f: ["--list", str(f), "--raw-dir", str(f)], "raw folder {f} is a file, not a folder"),
    (lambda root, f: ["--list", str(root), "--raw-dir", str(root)], "{root}: list file is a folder, not a file"),
    (lambda root, f: ["--list", "/dev/null", "--raw-dir", str(root)],
     "/dev/null: list file is not a regular file (a pipe or a device)"),
])
def test_cli_a_file_given_for_a_folder_or_a_folder_for_a_file_is_named_so(tmp_path, capsys, argv, message):
    root = _folder(tmp_path / "photos", {"Kofi": 3, "Lome": 3})
    a_file = tmp_path / "mine.txt"
    a_file.write_text("Kofi/0.png Kofi\n")
    assert main([*argv(root, a_file), "--out-dir", str(tmp_path / "out"), "--min-images", "3"]) == 2
    assert capsys.readouterr().err == f"error: {message.format(root=root.resolve(), f=a_file.resolve())}\n"


def test_cli_an_out_dir_under_a_file_is_refused_before_any_image_is_decoded(tmp_path, capsys, monkeypatch):
    root = _folder(tmp_path / "photos", {"Kofi": 3, "Lome": 3})
    (tmp_path / "notes.txt").write_text("kept")
    monkeypatch.setattr(prepare_module, "check_images", lambda *args: pytest.fail("decoded the images first"))
    assert main(["--folder", str(root), "--out-dir", str(tmp_path / "notes.txt" / "out"), "--min-images", "3"]) == 2
    assert capsys.readouterr().err == f"error: [Errno 20] a file, not a folder: '{tmp_path / 'notes.txt'}'\n"


@pytest.mark.parametrize("folder", ["#Kofi", " Kofi"])
def test_cli_folder_names_that_would_not_read_back_from_the_lists(tmp_path, capsys, folder):
    """'#Kofi/0.png #Kofi' would be a comment and ' Kofi/0.png' lose its space: refused, not dropped."""
    root = _folder(tmp_path / "photos", {folder: 3, "Lome": 3, "Pia": 3})
    argv = ["--folder", str(root), "--out-dir", str(tmp_path / "out"), "--min-images", "3", "--spaces-to-underscores"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder}: a folder name starting with {folder[0]!r} cannot go into" in err, err
    assert not (tmp_path / "out" / "annotations" / "prepared.json").exists()


@pytest.mark.parametrize("individual, image", [(b"Zo\xe9", b"0.png"), (b"Kofi", b"\xff.png")])
def test_cli_folder_and_file_names_that_are_not_utf8(tmp_path, capsys, individual, image):
    """Names in another encoding (a Latin-1 'Zoé') reach Python with surrogates, which the UTF-8 lists
    cannot hold: the split seeded by the name ended in a UnicodeEncodeError traceback."""
    root = _folder(tmp_path / "photos", {"Lome": 3, "Pia": 3})
    _png(root / os.fsdecode(individual) / os.fsdecode(image))
    argv = ["--folder", str(root), "--out-dir", str(tmp_path / "out"), "--min-images", "3",
            "--open-set-individuals", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    shown = (individual + b"/" + image).decode("utf-8", "backslashreplace")
    assert err == f"error: {root}/{shown}: a file or folder name that is not UTF-8 (written in another encoding, " \
                  "e.g. unpacked from an old archive); rename it\n"


def test_the_labels_fix_summary_counts_aliases_not_unicode_forms(tmp_path):
    """A decomposed name becomes its composed form on reading; the labels-fix summary lists the
    aliases the file applied, not that normalisation."""
    records = [Record("a.png", "Zoe\u0301", "folder", "a.png"), Record("b.png", "Kofii", "folder", "b.png")]
    (tmp_path / "fix.txt").write_text("Kofii -> Kofi\n", encoding="utf-8")
    kept, _, info = apply_labels_fix(records, LabelsFix.load(tmp_path / "fix.txt"))
    assert [r.individual for r in kept] == ["Zo\u00e9", "Kofi"]
    assert info["aliases_applied"] == {"Kofii -> Kofi": 1}


def test_a_rerun_without_open_set_removes_the_earlier_open_set_lists(tmp_path):
    """Stale open-set lists of an earlier run would be read as current by training and evaluation."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    prepare(raw, tmp_path / "out", **_quiet())
    open_dir = tmp_path / "out" / "annotations" / "open_set"
    assert (open_dir / "unknown_ids.txt").is_file()
    prepare(raw, tmp_path / "out", **_quiet(open_set_individuals=0))
    assert not any(open_dir.glob("*.txt"))


def test_a_rerun_with_another_min_images_removes_the_earlier_min_lists(tmp_path):
    """`--min-images 5` then the default left annotations_merged_min5.txt and kept_ids_min5.txt beside
    the min10 ones, lists of a run that is no longer the prepared dataset; a user's own file stays."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    ann = tmp_path / "out" / "annotations"
    prepare(raw, tmp_path / "out", **_quiet(min_images=5))
    assert {p.name for p in ann.glob("*_min*.txt")} == {"annotations_merged_min5.txt", "kept_ids_min5.txt"}
    (ann / "kept_ids_min5_mine.txt").write_text("Kofi\n")
    prepare(raw, tmp_path / "out", **_quiet())
    assert {p.name for p in ann.glob("*_min*.txt")} == {"annotations_merged_min10.txt", "kept_ids_min10.txt",
                                                       "kept_ids_min5_mine.txt"}
    prepare(raw, tmp_path / "out", **_quiet(min_images=5))  # and back: a two-digit N is removed too
    assert {p.name for p in ann.glob("*_min*.txt")} == {"annotations_merged_min5.txt", "kept_ids_min5.txt",
                                                       "kept_ids_min5_mine.txt"}


def test_two_runs_into_one_out_dir_do_not_mix_their_files(tmp_path, monkeypatch, caplog):
    """A second prepare (another seed) that wrote while the first was writing left the first's
    prepared.json and metadata beside the second's split lists. Now whichever writes last writes whole."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    for seed in (0, 1):
        prepare(raw, tmp_path / f"seed{seed}", **_quiet(seed=seed))
    write_metadata = prepare_module.write_metadata
    second = threading.Thread(target=prepare, args=(raw, tmp_path / "out"), kwargs=_quiet(seed=1))

    def first_run_writing(*args):
        if not second.is_alive():  # the second run's own call passes through
            second.start()
            deadline = time.monotonic() + 60  # the whole second run, unless it waits for this one
            while second.is_alive() and "waiting    for another" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
        write_metadata(*args)

    monkeypatch.setattr(prepare_module, "write_metadata", first_run_writing)
    prepare(raw, tmp_path / "out", **_quiet(seed=0))
    second.join()
    out = tmp_path / "out" / "annotations"
    seed = json.loads((out / "prepared.json").read_text())["seed"]
    expected = tmp_path / f"seed{seed}" / "annotations"
    for name in ("train.txt", "val.txt", "test.txt", "open_set/unknown_ids.txt", "metadata.csv"):
        assert (out / name).read_text() == (expected / name).read_text(), name
    assert f"waiting    for another prepare writing into {out} ..." in caplog.text


def test_a_reader_gets_the_lists_of_one_prepare(tmp_path, monkeypatch, caplog):
    """A prepare writing into the folder a training run read prepared.json from wrote train.txt, then
    val.txt, ...: the run got the new train list beside the old val list, images in both. Now a reader
    waits for the prepare; one that loaded the dataset before it is refused, a new one reads its lists."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    out = tmp_path / "out"
    prepare(raw, tmp_path / "seed1", **_quiet(seed=1))
    prepare(raw, out, **_quiet(seed=0))
    loaded_before = PreparedData.load(out)
    write_list, midway, go = prepare_module.write_list, threading.Event(), threading.Event()

    def pausing_after_train_txt(path, rows):
        write_list(path, rows)
        if path == out / "annotations" / "train.txt":
            midway.set()
            go.wait(30)

    monkeypatch.setattr(prepare_module, "write_list", pausing_after_train_txt)
    second = threading.Thread(target=prepare, args=(raw, out), kwargs=_quiet(seed=1))
    second.start()
    assert midway.wait(60)
    read = {}

    def reader(name, data):
        try:
            data = data()
            read[name] = {split: data.split(split) for split in ("train", "val")}
        except DatasetError as exc:
            read[name] = str(exc)

    readers = [threading.Thread(target=reader, args=("before", lambda: loaded_before)),
               threading.Thread(target=reader, args=("new", lambda: PreparedData.load(out)))]
    for thread in readers:
        thread.start()
    deadline = time.monotonic() + 10  # until both wait for the prepare (unlocked, they had read meanwhile)
    while caplog.text.count("waiting for a prepare writing into") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.set()
    for thread in (second, *readers):
        thread.join(60)
    assert read["before"] == (f"{out / 'annotations' / 'prepared.json'} changed since this command read it (a "
                              f"prepare into {out} ran meanwhile): run the command again once prepare has finished")
    train, val = read["new"]["train"], read["new"]["val"]
    assert not {path for path, _ in train} & {path for path, _ in val}
    assert (train, val) == tuple(read_list(tmp_path / "seed1" / "annotations" / f"{s}.txt") for s in ("train", "val"))
    assert caplog.text.count(f"waiting for a prepare writing into {out / 'annotations'} ...") == 2


KILLED_BEFORE_RENAMING = """
import os, signal, sys
from src import atomic
from src.data.prepare import main
rename = atomic._take_place_of
def killed_at(tmp, path):
    if path.name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    rename(tmp, path)
atomic._take_place_of = killed_at
main(sys.argv[2:])
"""


@pytest.mark.parametrize("killed_writing", ["metadata.csv", "unknown_ids.txt"])
def test_a_rerun_removes_what_a_killed_prepare_was_writing(tmp_path, caplog, killed_writing):
    """kill -9 while a file was written left its temporary file (`.metadata.csv.tmp-<pid>`) in annotations/
    for good: no later run removed it."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAMING, killed_writing, "--raw-dir", str(raw),
                             "--out-dir", str(out), "--open-set-individuals", "2"], cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = list(out.rglob(f".{killed_writing}.tmp-*"))
    assert leftovers and not (out / "annotations" / "prepared.json").exists()
    caplog.set_level("INFO", logger="src.data.prepare")
    prepare(raw, out, **_quiet())
    assert not list(out.rglob("*.tmp-*")) and (out / "annotations" / "prepared.json").is_file()
    assert f"removed    {leftovers[0]}, a partial write of a prepare that was killed" in caplog.text


def test_open_set_columns_and_counts_match_the_lists(tmp_path):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    result = prepare(raw, tmp_path / "out", **_quiet(open_set_individuals=3))  # 3: the two sides differ
    ann = result.annotations_dir
    unknown_test = read_list(ann / "open_set" / "unknown_test.txt")
    unknown_val = read_list(ann / "open_set" / "unknown_val.txt")
    info = result.prepared["open_set"]
    assert info["unknown_test_individuals"] == len({n for _, n in unknown_test})
    assert info["unknown_val_individuals"] == len({n for _, n in unknown_val})
    assert info["unknown_val_individuals"] + info["unknown_test_individuals"] == 3
    with (ann / "metadata.csv").open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    for split in ("train", "val", "test"):  # a known individual's image is "known" whatever its split
        for path, _ in read_list(ann / "open_set" / f"{split}.txt"):
            assert (rows[path]["split"], rows[path]["open_set"]) == (split, "known")
    for path, _ in unknown_test:
        assert rows[path]["open_set"] == "unknown_test"


def test_a_negative_open_set_count_is_refused(tmp_path):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    with pytest.raises(PrepareError, match="--open-set-individuals -1"):
        prepare(raw, tmp_path / "out", **_quiet(open_set_individuals=-1))


def test_a_failed_rerun_leaves_no_prepared_json_beside_its_new_report(tmp_path):
    """prepared.json means 'the rest is complete and current': a rerun that stops after rewriting the
    report must not leave the earlier one behind."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    prepare(raw, tmp_path / "out", **_quiet())
    assert (tmp_path / "out" / "annotations" / "prepared.json").is_file()
    with pytest.raises(PrepareError, match="identification needs 2 or more"):
        prepare(raw, tmp_path / "out", **_quiet(min_images=15, open_set_individuals=0))
    assert not (tmp_path / "out" / "annotations" / "prepared.json").exists()
    assert json.loads((tmp_path / "out" / "annotations" / "validation_report.json").read_text())["min_images"] == 15


def test_the_report_counts_exclusions_per_source(tmp_path):
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    (raw / RELEASE / "data_CTai" / "face_images" / "img-Tita-0.png").write_bytes(b"")
    result = prepare(raw, tmp_path / "out", **_quiet())
    counts = result.report["counts"]
    assert (counts["CTai"]["excluded"], counts["CZoo"]["excluded"], counts["all"]["excluded"]) == (1, 0, 1)
    # Tita keeps 10 usable images; Freddy (2) and Zita (9) are usable but below min10.
    assert (counts["CTai"]["usable_images"], counts["CTai"]["kept_images"], counts["CTai"]["kept_individuals"]) == (
        61, 50, 4)


def test_a_reader_that_stops_early_ends_the_progress_lines_quietly(tmp_path):
    """`prepare ... | head -1`: logging reported every later line in a 20-line "--- Logging error ---"."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    process = subprocess.Popen([sys.executable, "-m", "src.data.prepare", "--raw-dir", str(raw), "--out-dir",
                                str(tmp_path / "out"), "--open-set-individuals", "2"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("input ")
    process.stdout.close()  # while it decodes the images: every later line meets a closed pipe
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and err == ""
    assert (tmp_path / "out" / "annotations" / "prepared.json").is_file()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line_after_the_dataset(tmp_path):
    """`prepare ... > out.txt` on a full disk: every progress line was a 20-line "--- Logging error ---",
    and the command still exited 0."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "src.data.prepare", "--raw-dir", str(raw), "--out-dir",
                                 str(tmp_path / "out"), "--open-set-individuals", "2"],
                                cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: cannot write the results to stdout (No space left on device)\n"
    assert (tmp_path / "out" / "annotations" / "prepared.json").is_file()


def test_stand_in_images_are_said_to_be_so_and_recorded(tmp_path, caplog):
    """Stand-ins carry the release's layout and real names: nothing else tells them from the release."""
    standin.generate_small(tmp_path / "raw", individuals=3, images=10, size=32, seed=0, workers=1)
    with caplog.at_level("INFO", logger="src.data"):
        result = prepare(tmp_path / "raw", tmp_path / "out", open_set_individuals=0)
    assert result.prepared["standins"] is True and PreparedData.load(tmp_path / "out").standins
    assert "synthetic images drawn by src.data.standin, not chimpanzees" in caplog.text


def test_fractions_and_seed_reach_the_split_lists_and_the_open_set(tmp_path):
    """Mutation testing: prepare splitting 70/15/15 whatever --fractions said, or drawing the held-out
    individuals with seed 0 whatever --seed said, passed every test."""
    raw = make_release(tmp_path / "raw", CZOO, CTAI)
    assert main(["--raw-dir", str(raw), "--out-dir", str(tmp_path / "out"), "--seed", "1", "--fractions", "0.5",
                 "0.25", "0.25", "--open-set-individuals", "2", "--workers", "2"]) == 0
    ann = tmp_path / "out" / "annotations"
    kept = read_list(ann / "annotations_merged_min10.txt")
    expected = stratified_split(kept, (0.5, 0.25, 0.25), seed=1)
    assert {split: read_list(ann / f"{split}.txt") for split in expected} == expected
    unknown = (ann / "open_set" / "unknown_ids.txt").read_text().split()
    assert unknown == choose_unknown([name for _, name in kept], 2, seed=1) != choose_unknown(
        [name for _, name in kept], 2, seed=0)
    assert json.loads((ann / "prepared.json").read_text())["fractions"] == [0.5, 0.25, 0.25]


def test_an_image_listed_twice_has_one_split_in_the_metadata(tmp_path):
    """The excluded second line of a repeated image shares the kept one's path: metadata.csv must not
    give it the kept one's split too (a count of the split column would hold the image twice)."""
    root = _folder(tmp_path / "photos", {"Kofi": 3, "Lome": 3})
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{n}/{i}.png {n}\n" for n in ("Kofi", "Lome") for i in range(3)) + "Kofi/0.png Kofi\n")
    result = prepare(root, tmp_path / "out", list_file=listing, min_images=3, open_set_individuals=0)
    with (result.annotations_dir / "metadata.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["path"] == "Kofi/0.png"]
    assert [(r["excluded"].split(":")[0], r["split"] != "") for r in rows] == [("", True), ("listed twice", False)]
