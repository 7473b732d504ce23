"""Image problems (missing, corrupt, truncated, duplicate), image formats, and label-quality flags."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data.annotations import Record, parse_annotation_file
from src.data.validate import (ImageCheck, check_image, check_images, label_quality, levenshtein, render_markdown,
                               split_summary, write_report)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
RAW = SHARED / "chimpanzee_faces" / "annotations" / "raw"


def _pixels(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _save(path: Path, seed: int, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed)).save(path, fmt)
    return path


def _record(path: str, name: str = "Kofi", i: int = 0, **fields) -> Record:
    return Record(path, name, fields.pop("source", "CTai"), f"list:{i or path}", **fields)


def test_image_problems_are_found(tmp_path):
    _save(tmp_path / "ok.png", 1)
    _save(tmp_path / "copy.png", 1)                      # same pixels, other file
    _save(tmp_path / "copy.bmp", 1, "BMP")               # same pixels, other container
    _save(tmp_path / "other.png", 2)
    _save(tmp_path / "clash_a.png", 3)
    _save(tmp_path / "clash_b.png", 3)                   # same pixels, other individual
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    data = (tmp_path / "other.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    records = [_record("ok.png"), _record("copy.png"), _record("copy.bmp"), _record("other.png"),
               _record("other.png", i=99), _record("missing.png"), _record("corrupt.png"),
               _record("truncated.png"), _record("empty.jpg"),
               _record("clash_a.png", "Kofi"), _record("clash_b.png", "Lome")]
    exclusions, checks = check_images(records, tmp_path, workers=2)
    found = {(e.record.origin, e.category) for e in exclusions}
    assert found == {("list:99", "listed twice"), ("list:missing.png", "missing file"),
                     ("list:corrupt.png", "unreadable"), ("list:truncated.png", "unreadable"),
                     ("list:empty.jpg", "unreadable"), ("list:copy.png", "duplicate"),
                     ("list:copy.bmp", "duplicate"), ("list:clash_a.png", "duplicate"),
                     ("list:clash_b.png", "duplicate")}
    details = {e.record.origin: e.detail for e in exclusions}
    assert details["list:copy.png"] == "same pixels as ok.png"
    assert details["list:99"] == "first listed at list:other.png"
    assert details["list:clash_a.png"] == "same pixels labelled Kofi, Lome: clash_b.png"
    assert details["list:clash_b.png"] == "same pixels labelled Kofi, Lome: clash_a.png"
    assert details["list:truncated.png"].startswith("corrupt or truncated image (")
    assert details["list:empty.jpg"] == "empty file (0 bytes)"  # not "not an image in a known format"
    assert checks["ok.png"].size == (12, 12)


def test_listed_twice_with_different_individuals_excludes_every_copy(tmp_path):
    _save(tmp_path / "a.png", 1)
    records = [_record("a.png", "Kofi", 1), _record("a.png", "Lome", 2)]
    exclusions, _ = check_images(records, tmp_path)
    assert [(e.record.origin, e.detail) for e in exclusions] == [
        ("list:1", "listed as Kofi, Lome"), ("list:2", "listed as Kofi, Lome")]


def _jpeg_with_orientation(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(_pixels(4)[:, :6]).save(path, "JPEG", exif=exif.tobytes())


@pytest.mark.parametrize("name, write, size", [
    ("rgb.png", lambda p: _save(p, 5), (12, 12)),
    ("exif.jpg", _jpeg_with_orientation, (12, 6)),
    ("gray.pgm", lambda p: Image.fromarray(_pixels(6)[:, :, 0]).save(p), (12, 12)),
    ("gray.png", lambda p: Image.fromarray(_pixels(7)[:, :, 0], "L").save(p), (12, 12)),
    ("rgba.png", lambda p: Image.fromarray(np.dstack([_pixels(8), _pixels(9)[:, :, :1]])).save(p), (12, 12)),
    ("deep.png", lambda p: Image.fromarray((_pixels(10)[:, :, 0].astype(np.uint16) * 257)).save(p), (12, 12)),
    ("palette.gif", lambda p: Image.fromarray(_pixels(11)).convert("P").save(p), (12, 12)),
])
def test_common_formats_load(tmp_path, name, write, size):
    write(tmp_path / name)
    check = check_image(tmp_path / name)
    assert (check.reason, check.size) == ("", size)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_folder_or_a_pipe_where_an_image_should_be_is_not_called_missing(tmp_path):
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")  # opening it to decode would wait for a writer forever
    records = [Record("folder.png", "A", "CZoo", "list:1"), Record("pipe.png", "A", "CZoo", "list:2")]
    exclusions, _ = check_images(records, tmp_path, workers=2)
    assert {(e.record.path, e.category, e.detail) for e in exclusions} == {
        ("folder.png", "unreadable", "is a folder, not a file"),
        ("pipe.png", "unreadable", "is not a regular file (a pipe or a device)")}


def test_a_file_the_system_cannot_read_is_not_called_corrupt(tmp_path, monkeypatch):
    """A permission or disk error says so; "corrupt or truncated" would send the user to the image."""
    _save(tmp_path / "locked.png", 1)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.png"))

    monkeypatch.setattr("src.data.io.Image.open", refuse)
    assert check_image(tmp_path / "locked.png").reason == "cannot be read (Permission denied)"


def test_levenshtein():
    assert levenshtein("woodstiock", "woodstock") == 1
    assert levenshtein("marc", "max") == 2
    assert levenshtein("", "abc") == 3 and levenshtein("same", "same") == 0


def _people(spec: list[tuple[str, int, dict]]) -> list[Record]:
    records = []
    for name, n, fields in spec:
        records += [_record(f"{name}/{len(records) + i}.png", name, **fields) for i in range(n)]
    return records


def test_label_quality_flags():
    records = _people([
        ("Woodstock", 87, {"age": 16.0, "age_group": "Adult", "gender": "Male"}),
        ("Woodstiock", 1, {"age": 16.0, "age_group": "Adult", "gender": "Male"}),
        ("Tita", 41, {"gender": "Female"}), ("Zita", 42, {"gender": "Female"}),
        ("kofi", 1, {}), ("Kofi", 30, {}),
        ("Adult", 5, {"age_group": "Infant", "gender": "Unknown"}), ("unknown", 2, {}), ("?", 1, {}),
        ("Atra", 20, {"gender": "Female", "age": 28.0}), ("Atra", 1, {"gender": "Male", "age": 28.0}),
        ("Victor", 40, {"age": 3.0, "age_group": "Infant"}), ("Victor", 2, {"age": 32.0, "age_group": "Adult"}),
        ("Sagu", 40, {"age": 9.0, "age_group": "Juvenile"}), ("Sagu", 60, {"age": 20.0, "age_group": "Adult"}),
        ("Tai", 3, {"source": "CZoo"}), ("Tai", 4, {"source": "CTai"}),
    ])
    flags = label_quality(records)
    placeholders = [(f["name"], f["images"]) for f in flags["placeholder_names"]]
    assert placeholders == [("Adult", 5), ("unknown", 2), ("?", 1)]
    assert {(f["name"], f["similar_to"], f["edit_distance"]) for f in flags["near_duplicate_names"]} == {
        ("Woodstiock", "Woodstock", 1), ("kofi", "Kofi", 0)}
    sex = {f["name"]: f for f in flags["sex_inconsistent"]}
    assert list(sex) == ["Atra"] and sex["Atra"]["sexes"] == {"Female": 20, "Male": 1}
    assert sex["Atra"]["outliers"] == [r.path for r in records if r.individual == "Atra" and r.gender == "Male"]
    age = {f["name"]: f for f in flags["age_inconsistent"]}
    assert set(age) == {"Victor", "Sagu"}
    assert len(age["Victor"]["outliers"]) == 2 and age["Victor"]["ages"] == {"3": 40, "32": 2}
    assert age["Sagu"]["outliers"] == []  # two large groups: maybe photos years apart
    assert flags["names_in_several_sources"] == [
        {"name": "Tai", "images": 7, "sources": {"CTai": 4, "CZoo": 3}}]


@pytest.mark.skipif(not (RAW / "annotations_ctai.txt").is_file(), reason=f"no real annotations in {RAW}")
def test_label_quality_on_the_real_annotations():
    records = parse_annotation_file(RAW / "annotations_czoo.txt", "CZoo") + \
        parse_annotation_file(RAW / "annotations_ctai.txt", "CTai")
    flags = label_quality(records)
    assert [(f["name"], f["images"]) for f in flags["placeholder_names"]] == [("Adult", 416)]
    assert {(f["name"], f["similar_to"]) for f in flags["near_duplicate_names"]} == {
        ("Freddy", "Fredy"), ("Wapii", "Wapi"), ("Akouba", "Akrouba"), ("Woodstiock", "Woodstock"),
        ("Liliou", "Lilou"), ("Ibrahiim", "Ibrahim")}
    assert {f["name"] for f in flags["sex_inconsistent"]} == {
        "Kinshasa", "Shogun", "Atra", "Wala", "Caramel", "Akwaba", "Jacobo", "Mustapha"}
    assert sum(len(f["outliers"]) for f in flags["sex_inconsistent"]) == 10
    victor = next(f for f in flags["age_inconsistent"] if f["name"] == "Victor")
    assert victor["ages"] == {"3": 224, "32": 2}
    assert len(flags["age_inconsistent"]) == 23 and "Adult" not in {f["name"] for f in flags["age_inconsistent"]}
    assert sum(len(f["outliers"]) for f in flags["age_inconsistent"]) == 17
    assert flags["names_in_several_sources"] == []


def _report(excluded: int) -> dict:
    entry = {"path": "a.png", "individual": "Kofi", "source": "folder", "origin": "a.png",
             "category": "missing file", "detail": ""}
    return {"raw_dir": "/raw", "input": "folder", "min_images": 10, "problems": excluded,
            "counts": {"all": {"parsed_images": excluded, "parsed_individuals": 1, "excluded": excluded,
                               "usable_images": 0, "kept_images": 0, "kept_individuals": 0}},
            "splits": None, "excluded": [entry] * excluded, "below_threshold": [],
            "label_quality": label_quality([]), "labels_fix": None}


def test_report_files_and_capped_markdown(tmp_path):
    md_path, json_path = write_report(_report(100), tmp_path)
    assert json.loads(json_path.read_text())["problems"] == 100
    text = md_path.read_text()
    assert "**100 problem(s)**" in text and "- missing file: 100" in text
    assert "... and 60 more (all in validation_report.json)" in text
    assert "None applied (names as published)." in render_markdown(_report(0))


def test_markdown_lists_problem_images_not_the_labels_fix_exclusions(tmp_path):
    """A labels fix dropping a whole placeholder name (416 images in C-Tai) must not push the problem
    images that need a look out of the capped table."""
    report = _report(0)
    fix_entry = {"path": "adult/1.png", "individual": "Adult", "source": "CTai", "origin": "a:1",
                 "category": "labels-fix", "detail": "name Adult excluded"}
    problem = {"path": "broken.png", "individual": "Kofi", "source": "CTai", "origin": "a:2",
               "category": "unreadable", "detail": "not an image in a known format"}
    report["excluded"] = [fix_entry] * 50 + [problem]
    text = render_markdown(report)
    assert "| `broken.png` | Kofi | unreadable: not an image in a known format |" in text
    assert "adult/1.png" not in text and "more (all in" not in text
    assert "- labels-fix: 50 (as the labels-fix file asks; listed in validation_report.json)" in text


def test_split_summary_counts_pixels_shared_by_two_splits():
    """The leakage count must see a face in train and test under two paths (e.g. splits edited by hand)."""
    closed = {"train": [("a.png", "Kofi"), ("b.png", "Kofi"), ("c.png", "Lome")],
              "val": [("d.png", "Kofi"), ("e.png", "Lome")], "test": [("copy_of_a.png", "Kofi"), ("f.png", "Lome")]}
    checks = {path: ImageCheck(digest=path) for rows in closed.values() for path, _ in rows}
    checks["copy_of_a.png"] = checks["a.png"]
    summary = split_summary(closed, checks)
    assert summary["same_pixels_in_two_splits"] == 1
    assert summary["per_split"]["val"] == {"images": 2, "individuals": 2, "single_image": ["Kofi", "Lome"]}
    assert summary["images_per_individual"] == {"min": 3, "median": 3.5, "max": 4, "fewest": ["Lome"],
                                                "most": ["Kofi"]}
    assert split_summary(None, checks) is None
    assert "None: fewer than 2 individuals kept." in render_markdown(_report(1))


def test_names_differing_only_by_accents_or_case_folding_are_flagged_whatever_their_counts():
    """'Zoé' and 'Zoe', or 'Straße' and 'STRASSE', with many images each are one animal typed two ways;
    the rarity rule that keeps 'Tita' and 'Zita' apart must not hide them."""
    records = _people([("Zoé", 12, {}), ("Zoe", 12, {}), ("Straße", 10, {}), ("STRASSE", 11, {}),
                       ("Tita", 41, {}), ("Zita", 42, {})])
    flags = label_quality(records)["near_duplicate_names"]
    assert {(f["name"], f["similar_to"], f["edit_distance"]) for f in flags} == {
        ("Zoe", "Zoé", 0), ("Straße", "STRASSE", 0)}


def test_sexes_are_compared_whatever_their_case():
    """A hand-edited 'male' beside the release's 'Male' is the same sex, not a second one."""
    records = _people([("Kofi", 10, {"gender": "Male"}), ("Kofi", 1, {"gender": "male"}),
                       ("Zuri", 10, {"gender": "Female"}), ("Zuri", 1, {"gender": "male"})])
    flags = label_quality(records)["sex_inconsistent"]
    assert [(f["name"], f["sexes"]) for f in flags] == [("Zuri", {"Female": 10, "male": 1})]
    assert flags[0]["outliers"] == [records[-1].path]


def test_a_placeholder_name_gets_no_sex_or_age_flags():
    """'Adult' pools many animals (C-Tai's unidentified faces): its mixed sexes and ages are expected,
    and its "outliers" would send images with nothing wrong to exclude_images."""
    records = _people([("Adult", 20, {"gender": "Female", "age": 30.0, "age_group": "Adult"}),
                       ("Adult", 2, {"gender": "Male", "age": 4.0, "age_group": "Infant"})])
    flags = label_quality(records)
    assert [f["name"] for f in flags["placeholder_names"]] == ["Adult"]
    assert flags["sex_inconsistent"] == [] and flags["age_inconsistent"] == []


def test_the_same_bytes_in_another_shape_are_not_a_duplicate(tmp_path):
    """The digest covers the size: a 4x8 and an 8x4 crop holding the same bytes (two uniform crops,
    say) are two images, not a duplicate to exclude; hashing the bytes alone passed every test."""
    pixels = _pixels(1, 8)[:4]
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    Image.fromarray(pixels.reshape(8, 4, 3)).save(tmp_path / "tall.png")
    exclusions, checks = check_images([_record("wide.png"), _record("tall.png")], tmp_path, workers=1)
    assert exclusions == [] and checks["wide.png"].size == (8, 4) and checks["tall.png"].size == (4, 8)


def test_paths_that_differ_only_in_case_are_two_images(tmp_path):
    """On a case-sensitive disk 'A.png' and 'a.png' are two files: comparing paths without case would
    exclude one as "listed twice" (on a case-insensitive disk the pixel check finds the one file)."""
    _save(tmp_path / "A.png", 1)
    if (tmp_path / "a.png").exists():
        pytest.skip("case-insensitive file system")
    _save(tmp_path / "a.png", 2)
    exclusions, _ = check_images([_record("A.png"), _record("a.png")], tmp_path, workers=1)
    assert exclusions == []
