"""Parsing every input format, on the real annotation files where they are available."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.data.annotations import (AnnotationError, LabelsFix, Record, check_names,
                                  parse_annotation_file, parse_cvjena_line, read_cvjena, read_folder, read_list_file)
from src.data.io import IMAGE_EXTENSIONS
from src.data.prepare import count_summary, filter_min_images, make_splits
from src.data.splits import DEFAULT_FRACTIONS

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
REAL = SHARED / "chimpanzee_faces" / "annotations"
needs_real = pytest.mark.skipif(not (REAL / "raw" / "annotations_ctai.txt").is_file(),
                                reason=f"real annotation files not found under {REAL}")

OLD_LINE = ("face_images/img-id2-object-1.png Name Victor Age 3 Age_group Infant Gender Male "
            "RightEye 48 55 LeftEye 99 73 MouthCenter 20 125 LeftEarlobe 152 146 RightEarlobe Inf Inf ")


def _line(name: str = "Victor", path: str = "face_images/a.png", age: str = "3", gender: str = "Male",
          current: bool = False) -> str:
    group_key = "Age_Group" if current else "Age_group"
    prefix = "Filename " if current else ""
    return (f"{prefix}{path} Name {name} Age {age} {group_key} Infant Gender {gender} RightEye 1 2 "
            f"LeftEye 3 4 MouthCenter 5 -6 LeftEarlobe Inf Inf RightEarlobe 9 10")


@needs_real
def test_real_annotation_counts():
    czoo = parse_annotation_file(REAL / "raw" / "annotations_czoo.txt", "CZoo")
    ctai = parse_annotation_file(REAL / "raw" / "annotations_ctai.txt", "CTai")
    merged = czoo + ctai
    assert count_summary(merged) == {"images": 7187, "individuals": 102,
                                     "per_source": {"CZoo": 2109, "CTai": 5078}}
    kept = filter_min_images(merged, 10)
    assert count_summary(kept) == {"images": 7150, "individuals": 87,
                                   "per_source": {"CZoo": 2109, "CTai": 5041}}
    assert count_summary(merged)["images"] - len(kept) == 37  # the 15 individuals below 10 images


@needs_real
def test_real_min10_split_has_the_documented_counts():
    """README and DATA.md: seed 0 splits the min10 set 5,007 / 1,089 / 1,054, every one of the 87
    individuals in each of the three disjoint splits, and the open-set split keeps 77 and holds out 10."""
    records = [*parse_annotation_file(REAL / "raw" / "annotations_czoo.txt", "CZoo", "data_CZoo"),
               *parse_annotation_file(REAL / "raw" / "annotations_ctai.txt", "CTai", "data_CTai")]
    rows = [(r.path, r.individual) for r in filter_min_images(records, 10)]
    closed, open_set, unknown = make_splits(rows, DEFAULT_FRACTIONS, 0, 10)
    assert {split: len(part) for split, part in closed.items()} == {"train": 5007, "val": 1089, "test": 1054}
    names = {name for _, name in rows}
    assert len(names) == 87 and all({name for _, name in part} == names for part in closed.values())
    assert sorted(row for part in closed.values() for row in part) == sorted(rows)  # disjoint, complete
    assert len(unknown) == 10 and len({name for _, name in open_set["train"]}) == 77
    assert make_splits(rows, DEFAULT_FRACTIONS, 0, 10) == (closed, open_set, unknown)
    assert make_splits(rows, DEFAULT_FRACTIONS, 1, 10)[0]["train"] != closed["train"]


@needs_real
def test_real_fields_are_kept():
    records = parse_annotation_file(REAL / "raw" / "annotations_ctai.txt", "CTai", "data_CTai")
    first = records[0]
    assert first.path == "data_CTai/face_images/img-id1-object-1.png"
    assert (first.individual, first.age, first.age_group, first.gender) == ("Fredy", 32, "Adult", "Male")
    assert first.keypoints == ((81, 82), (159, 102), (70, 193), (244, 177), None)
    assert first.origin == "data_CTai/annotations_ctai.txt:1"
    assert sum(r.age is None for r in records) > 0
    assert {r.gender for r in records} == {"Male", "Female", "Unknown"}


@needs_real
def test_current_release_format_matches_older_revision():
    """The excerpt of the current release (`Filename ` prefix, `Age_Group`) parses to the same fields
    as the same images in the older revision."""
    current = parse_annotation_file(REAL / "format-current-release-excerpt.txt", "CTai")
    older = {r.path: r for r in parse_annotation_file(REAL / "raw" / "annotations_ctai.txt", "CTai")}
    assert len(current) == 5
    for record in current:
        same = older[record.path]
        assert (record.individual, record.age, record.age_group, record.gender, record.keypoints) == \
            (same.individual, same.age, same.age_group, same.gender, same.keypoints)


def test_both_spellings_and_special_values():
    old = parse_cvjena_line(_line(age="NaN", gender="Unknown"), "f:1")
    new = parse_cvjena_line(_line(age="NaN", gender="Unknown", current=True), "f:2")
    assert old == new
    assert old["age"] is None and old["gender"] == "Unknown"
    assert old["keypoints"] == ((1, 2), (3, 4), (5, -6), None, (9, 10))
    assert parse_cvjena_line(OLD_LINE, "f:3")["keypoints"][4] is None


@pytest.mark.parametrize("line, message", [
    (_line().replace(" Gender Male", ""), "f:7: missing field(s) Gender"),
    (_line(age="three"), "f:7: Age 'three' is not a number"),
    (_line().replace("RightEye 1 2", "RightEye 1"), "f:7: RightEye needs two coordinates"),
    (_line().replace("LeftEye 3 4", "LeftEye 3 x"), "f:7: LeftEye coordinates"),
    ("face_images/a.png Victor Age 3", "f:7: expected '<image> Name <name> Age ...'"),
    (_line() + " Name Again", "f:7: field Name appears twice"),
])
def test_malformed_lines_name_file_and_line(line, message):
    with pytest.raises(AnnotationError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_cvjena_line(line, "f:7")


def test_huge_values_in_annotation_and_labels_fix_files_are_clipped_in_errors(tmp_path):
    """A crafted 1 MB value was quoted whole (an Age, a name, an alias), in a 1 MB error line."""
    huge = "x" * 1_000_000
    with pytest.raises(AnnotationError, match=r"Age 'xxx.*\.\.\. is not a number") as exc:
        parse_cvjena_line(_line(age=huge), "f:7")
    assert len(str(exc.value)) < 600, str(exc.value)[:300]
    with pytest.raises(AnnotationError, match=r"individual name 'Mr xxx.*\.\.\. contains whitespace") as exc:
        check_names([Record("a.png", f"Mr {huge}", "CZoo", "f:1")], spaces_to_underscores=False)
    assert len(str(exc.value)) < 600, str(exc.value)[:300]
    (tmp_path / "fix.txt").write_text(f"{huge} -> {huge}\n")
    with pytest.raises(AnnotationError, match=r"alias 'xxx.*\.\.\. renames nothing") as exc:
        LabelsFix.load(tmp_path / "fix.txt")
    assert len(str(exc.value)) < len(str(tmp_path)) + 400, str(exc.value)[:300]


def test_malformed_line_in_file_names_its_line_number(tmp_path):
    f = tmp_path / "annotations_czoo.txt"
    f.write_text(_line() + "\n\n" + _line(age="x") + "\n")
    with pytest.raises(AnnotationError, match=r"annotations_czoo.txt:3: Age 'x'"):
        parse_annotation_file(f, "CZoo")


def test_unknown_image_format_and_absolute_path_are_refused(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(_line(path="face_images/a.xyz") + "\n")
    with pytest.raises(AnnotationError, match=r"a.txt:1: unknown image format '.xyz'"):
        parse_annotation_file(f, "CZoo")
    f.write_text(_line(path="/abs/a.png") + "\n")
    with pytest.raises(AnnotationError, match="must be relative"):
        parse_annotation_file(f, "CZoo")


def _release(root: Path) -> Path:
    base = root / "datasets_cropped_chimpanzee_faces"
    for folder, filename in (("data_CZoo", "annotations_czoo.txt"), ("data_CTai", "annotations_ctai.txt")):
        (base / folder).mkdir(parents=True)
        (base / folder / filename).write_text(_line(name=folder[5:]) + "\n")
    return base


def test_read_cvjena_accepts_repository_root_or_release_folder(tmp_path):
    base = _release(tmp_path)
    from_root = read_cvjena(tmp_path)
    assert [(r.path, r.individual, r.source) for r in from_root] == [
        ("datasets_cropped_chimpanzee_faces/data_CZoo/face_images/a.png", "CZoo", "CZoo"),
        ("datasets_cropped_chimpanzee_faces/data_CTai/face_images/a.png", "CTai", "CTai")]
    assert [r.path for r in read_cvjena(base)] == ["data_CZoo/face_images/a.png", "data_CTai/face_images/a.png"]


def test_read_cvjena_missing_annotation_file_or_folder(tmp_path):
    base = _release(tmp_path)
    (base / "data_CTai" / "annotations_ctai.txt").unlink()
    with pytest.raises(AnnotationError, match="^missing annotation file .*annotations_ctai.txt"):
        read_cvjena(tmp_path)
    with pytest.raises(AnnotationError, match="raw folder .* not found"):
        read_cvjena(tmp_path / "nowhere")
    # An empty folder, or one of the release's sub-folders given for it, said "missing annotation
    # file .../data_CZoo/data_CZoo/annotations_czoo.txt".
    for wrong in (tmp_path / "empty", base / "data_CZoo"):
        wrong.mkdir(exist_ok=True)
        with pytest.raises(AnnotationError, match=f"^no release in {wrong}: expected datasets_cropped_chimpanzee_"
                                                  "faces/ in it, or data_CZoo/ and data_CTai/ .--download fetches"):
            read_cvjena(wrong)


def test_an_empty_annotation_file_of_the_release_is_refused(tmp_path):
    """An empty annotations_ctai.txt (a copy that stopped) gave a dataset of C-Zoo alone, exit 0."""
    base = _release(tmp_path)
    (base / "data_CTai" / "annotations_ctai.txt").write_text("\n")
    with pytest.raises(AnnotationError, match="annotations_ctai.txt: no annotation lines, where the release "
                                              "has faces in both files .* --download fetches it again"):
        read_cvjena(tmp_path)


def test_names_with_whitespace_are_refused_or_replaced():
    line = _line(name="Mr  Bean")
    assert parse_cvjena_line(line, "f:1")["name"] == "Mr Bean"
    records = [Record("a.png", "Mr Bean", "CZoo", "f:1"), Record("b.png", "Kofi", "CZoo", "f:2")]
    with pytest.raises(AnnotationError, match=r"f:1: individual name 'Mr Bean' contains whitespace; "
                                              r"rename it \(e.g. 'Mr_Bean'\)"):
        check_names(records, spaces_to_underscores=False)
    fixed = check_names(records, spaces_to_underscores=True)
    assert [(r.individual, r.published_name) for r in fixed] == [("Mr_Bean", "Mr Bean"), ("Kofi", "Kofi")]
    clash = records + [Record("c.png", "Mr_Bean", "CZoo", "f:3")]
    with pytest.raises(AnnotationError, match="would merge 'Mr Bean' into an existing individual"):
        check_names(clash, spaces_to_underscores=True)
    spelled_twice = records + [Record("c.png", "Mr\tBean", "CZoo", "f:3")]  # both become 'Mr_Bean'
    with pytest.raises(AnnotationError, match=r"would merge 'Mr\\tBean' into an existing individual 'Mr_Bean'"):
        check_names(spelled_twice, spaces_to_underscores=True)


def test_the_name_of_a_rejected_photo_is_no_individual_s(tmp_path):
    """Inference labels a rejected photo 'unknown': an individual of that name would read as one."""
    records = [Record("a.png", "unknown", "CZoo", "f:1"), Record("b.png", "Kofi", "CZoo", "f:2")]
    with pytest.raises(AnnotationError, match=r"f:1: individual name 'unknown' is what inference calls a rejected "
                                              r"photo; rename it in --labels-fix"):
        check_names(records, spaces_to_underscores=False)
    with pytest.raises(AnnotationError, match=r"individual name 'Unknown' is what inference calls a rejected"):
        check_names([Record("a.png", "Unknown", "CZoo", "f:1")], spaces_to_underscores=False)
    # Named by escapes only: the raw character in the suggestions acted in the terminal. With a space
    # too, the control character is what --spaces-to-underscores cannot mend, and is named.
    for name in ("Zo\x07e", "Zo\x07 e"):
        with pytest.raises(AnnotationError) as refused:
            check_names([Record("a.png", name, "CZoo", "f:1")], spaces_to_underscores=True)
        assert str(refused.value) == (f"f:1: individual name {name!r} holds a control character (U+0007); rename it "
                                      f"in --labels-fix (in a YAML file: aliases: {{{json.dumps(name)}: Unnamed_1}}) "
                                      f"or drop it (exclude_names: [{json.dumps(name)}])")
        fix = tmp_path / "escapes.yaml"  # the suggestion works
        fix.write_text(f"aliases: {{{json.dumps(name)}: Unnamed_1}}\n")
        assert check_names(LabelsFix.load(fix).apply([Record("a.png", name, "CZoo", "f:1")])[0],
                           spaces_to_underscores=False)[0].individual == "Unnamed_1"
    fix_file = tmp_path / "fix.txt"
    fix_file.write_text("Abeni -> unknown\n")
    with pytest.raises(AnnotationError, match=r"alias 'Abeni' -> 'unknown': the new name is what inference calls a "
                                              r"rejected photo$"):
        LabelsFix.load(fix_file)
    fix_file.write_text("unknown -> Unnamed_1\n")  # the way out the message suggests
    kept, _, _ = LabelsFix.load(fix_file).apply(records)
    assert [r.individual for r in check_names(kept, spaces_to_underscores=False)] == ["Unnamed_1", "Kofi"]


def test_list_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my photos\nphotos/a b.jpg Kofi\n\nphotos/c.PNG Lome\n")
    records = read_list_file(f)
    assert [(r.path, r.individual, r.source, r.origin) for r in records] == [
        ("photos/a b.jpg", "Kofi", "mine.txt", f"{f}:2"), ("photos/c.PNG", "Lome", "mine.txt", f"{f}:4")]
    f.write_text("photos/a.jpg Kofi\nphotos/b.jpg\n")
    with pytest.raises(AnnotationError, match=r"mine.txt:2: expected '<path> <individual>'"):
        read_list_file(f)
    f.write_text("path,individual\nphotos/a.jpg,Kofi\n")  # saved as CSV from a spreadsheet
    with pytest.raises(AnnotationError) as exc:
        read_list_file(f)
    assert str(exc.value) == (f"{f}:1: expected '<path> <individual>' (separated by whitespace, not a comma: a CSV "
                              "file's lines do not read), got 'path,individual'")
    f.write_text("photos/a.jpg Kofi\n\nphotos/a.doc Kofi\n")
    with pytest.raises(AnnotationError, match=r"mine.txt:3: unknown image format '.doc'"):
        read_list_file(f)
    # A path with a space and no name splits into path 'photos/b' and "name" 'c.png': say so.
    f.write_text("photos/a.jpg Kofi\nphotos/b c.png\n")
    with pytest.raises(AnnotationError, match=r"mine.txt:2: .*'photos/b c.png': the individual is missing"):
        read_list_file(f)
    # A name of several words: it said "unknown image format '.png Mr'" for 'Mr Bean/a b.png Mr Bean'.
    for line, name, mended in (("Mr Bean/a b.png Mr Bean", "Mr Bean", "Mr_Bean"),
                               ("Mr Big Bean/c.JPG\tMr  Big Bean", "Mr  Big Bean", "Mr_Big_Bean")):
        f.write_text(f"{line}\n")
        with pytest.raises(AnnotationError) as exc:
            read_list_file(f)
        assert str(exc.value) == (f"{f}:1: individual name {name!r} contains whitespace (the name is the last "
                                  f"word of a line); rename it (e.g. {mended!r})")
    f.write_text("\n")
    with pytest.raises(AnnotationError, match="no images listed"):
        read_list_file(f)


def test_folder_layout(tmp_path):
    for rel in ("Kofi/a.png", "Kofi/2019/b.JPG", "Lome/c.pgm", "Lome/.hidden.png", "Lome/Thumbs.db",
                ".git/config", "README.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    records = read_folder(tmp_path)
    assert [(r.path, r.individual, r.source) for r in records] == [
        ("Kofi/2019/b.JPG", "Kofi", "folder"), ("Kofi/a.png", "Kofi", "folder"),
        ("Lome/c.pgm", "Lome", "folder")]


COMPOSED, DECOMPOSED = "Zo\u00e9", "Zoe\u0301"  # 'Zoé' both ways: typed, and as macOS may store a folder


def test_a_name_written_two_unicode_ways_is_one_individual(tmp_path):
    """The same-looking name composed in one folder and decomposed in another is one individual,
    and a labels-fix entry typed either way applies to it."""
    for rel in (f"{COMPOSED}/a.png", f"{DECOMPOSED}/b.png", "Kofi/c.png"):
        (tmp_path / "photos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / rel).write_bytes(b"x")
    records = read_folder(tmp_path / "photos")
    assert sorted({r.individual for r in records}) == ["Kofi", COMPOSED]
    assert {r.published_name for r in records} == {COMPOSED, DECOMPOSED, "Kofi"}  # as found
    fix_file = tmp_path / "fix.txt"
    fix_file.write_text(f"{DECOMPOSED} -> Zoe\nexclude-name Kofi\n", encoding="utf-8")
    kept, excluded, unused = LabelsFix.load(fix_file).apply(records)
    assert [r.individual for r in kept] == ["Zoe", "Zoe"] and len(excluded) == 1 and unused == []


@pytest.mark.parametrize("suffix", [".txt", ".yaml"])
def test_one_name_aliased_two_ways_in_two_unicode_forms_is_refused(tmp_path, suffix):
    """Written composed and decomposed, one name is one key: two different targets are ambiguous,
    the same target twice is harmless."""
    fix_file = tmp_path / f"fix{suffix}"
    lines = (f"{COMPOSED} -> Zoe\n{DECOMPOSED} -> Zola\n" if suffix == ".txt"
             else f"aliases:\n  {COMPOSED}: Zoe\n  {DECOMPOSED}: Zola\n")
    fix_file.write_text(lines, encoding="utf-8")
    with pytest.raises(AnnotationError, match="one name in different Unicode forms, mapped to 'Zoe' and 'Zola'"):
        LabelsFix.load(fix_file)
    fix_file.write_text(lines.replace("Zola", "Zoe"), encoding="utf-8")
    assert LabelsFix.load(fix_file).aliases == {COMPOSED: "Zoe"}


def test_folder_layout_follows_linked_sub_folders_and_keeps_broken_links(tmp_path):
    """Photos linked in from another disk are read, a link to an ancestor does not loop, a broken
    link becomes a record (reported as a missing file later) instead of vanishing."""
    elsewhere = tmp_path / "camera" / "2019"
    elsewhere.mkdir(parents=True)
    (elsewhere / "b.png").write_bytes(b"x")
    root = tmp_path / "photos"
    (root / "Kofi").mkdir(parents=True)
    (root / "Kofi" / "a.png").write_bytes(b"x")
    (root / "Kofi" / "THUMBS.DB").write_bytes(b"x")
    (root / "Kofi" / "2019").symlink_to(elsewhere)
    (root / "Kofi" / "loop").symlink_to(root / "Kofi")
    (root / "Kofi" / "gone.png").symlink_to(tmp_path / "unmounted" / "gone.png")
    assert [r.path for r in read_folder(root)] == ["Kofi/2019/b.png", "Kofi/a.png", "Kofi/gone.png"]
    (root / "Lome").symlink_to(tmp_path / "unmounted" / "Lome")
    with pytest.raises(AnnotationError, match=r"Lome: broken link to .*unmounted/Lome"):
        read_folder(root)
    with pytest.raises(AnnotationError, match=r"a.png is not a folder"):  # one image given, not the root
        read_folder(root / "Kofi" / "a.png")


@pytest.mark.parametrize("files, message", [
    ([], "^empty folder"),
    (["Kofi/notes.docx"], "notes.docx: unknown image format '.docx'"),
    (["a.png"], "a.png: image directly under"),
])
def test_folder_layout_errors(tmp_path, files, message):
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "Empty").mkdir()
    with pytest.raises(AnnotationError, match=message):
        read_folder(tmp_path)


def test_files_of_unknown_formats_are_counted_in_one_error_that_says_what_to_do(tmp_path):
    """A camera or photo manager writes a file beside every photo (.xmp, a RAW file beside the JPEG):
    the error named the first alone, so each run stopped at the next, and gave no way out."""
    for rel in ("Kofi/a.jpg", "Kofi/a.NEF", "Kofi/a.xmp", "Lome/b.jpg", "Lome/2019/b.xmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    with pytest.raises(AnnotationError) as exc:
        read_folder(tmp_path)
    assert str(exc.value) == (f"{tmp_path / 'Kofi' / 'a.NEF'}: unknown image format '.NEF' (3 such files in all: "
                              f".NEF .xmp); supported: {' '.join(IMAGE_EXTENSIONS)}; move such files out of "
                              f"{tmp_path}, or name the images in a --list file")


def test_a_flat_folder_of_photos_is_pointed_to_a_list_file(tmp_path):
    """Photos of several individuals in one folder ('Zoe_001.jpg', ...) cannot be read as folders; the
    error said so without naming the way that reads them."""
    (tmp_path / "Zoe_001.jpg").write_bytes(b"x")
    with pytest.raises(AnnotationError) as exc:
        read_folder(tmp_path)
    assert str(exc.value).endswith("(is --folder one individual's folder?); photos of several individuals in one "
                                   "folder are read from a --list file")


def _records(*names: str) -> list[Record]:
    return [Record(f"img{i}.png", name, "CTai", f"f:{i}") for i, name in enumerate(names, 1)]


def test_labels_fix_yaml(tmp_path):
    f = tmp_path / "fix.yaml"
    f.write_text("aliases:\n  Woodstiock: Woodstock\n  Nobody: Somebody\n"
                 "exclude_names: [Adult]\nexclude_images: [img2.png]\n")
    fix = LabelsFix.load(f)
    kept, excluded, unused = fix.apply(_records("Woodstiock", "Woodstock", "Adult", "Woodstock"))
    assert [(r.path, r.individual, r.published_name) for r in kept] == [
        ("img1.png", "Woodstock", "Woodstiock"), ("img4.png", "Woodstock", "Woodstock")]
    assert [(r.path, reason) for r, reason in excluded] == [
        ("img2.png", "image excluded"), ("img3.png", "name Adult excluded")]
    assert unused == ["alias Nobody"]


def test_labels_fix_text_matches_yaml(tmp_path):
    yaml_file, text_file = tmp_path / "fix.yml", tmp_path / "fix.txt"
    yaml_file.write_text("aliases: {Freddy: Fredy}\nexclude_names: [Adult]\nexclude_images: [x.png]\n")
    text_file.write_text("# cleanup\nFreddy -> Fredy\nexclude-name Adult  # placeholder\nexclude-image x.png\n")
    a, b = LabelsFix.load(yaml_file), LabelsFix.load(text_file)
    assert (a.aliases, a.exclude_names, a.exclude_images) == (b.aliases, b.exclude_names, b.exclude_images)


@pytest.mark.parametrize("name, text, message", [
    ("fix.txt", "Freddy Fredy\n", r"fix.txt:1: expected 'Old -> New'"),
    ("fix.txt", "A -> B\nB -> C\n", "alias chain 'A' -> 'B' -> 'C'"),
    ("fix.txt", "A -> B C\n", "the new name contains whitespace"),
    ("fix.txt", "A -> B\x07\n", "the new name holds a control character"),
    ("fix.yaml", "aliases:\n  Abeni: Abeni\n", "alias 'Abeni' -> 'Abeni' renames nothing; drop it"),
    ("fix.yaml", "aliases: [A, B]\n", "aliases must map"),
    ("fix.yaml", "alias: {A: B}\n", r"unknown key\(s\) \['alias'\]"),
    ("fix.yaml", "exclude_names: Adult\n", "exclude_names must be a list"),
    ("fix.yaml", "aliases: {A: B\n", r"fix.yaml:\d+: not valid YAML \(expected ',' or '}'"),
    ("fix.yaml", "- Adult\n", "expected a mapping with keys aliases"),
    ("fix.yaml", "exclude_names: [{Adult: 1}]\n", "exclude_names must be a list of names or paths"),
    ("fix.yaml", "aliases: {A: [B]}\n", "aliases must map"),
    ("fix.yaml", "aliases:\n  A: B\n  A: C\n", r"fix.yaml:3: not valid YAML \('A' is given twice\)"),
    # A second block would silently replace the first, dropping its aliases.
    ("fix.yaml", "aliases: {A: B}\nexclude_names: []\naliases: {C: D}\n", "'aliases' is given twice"),
    ("fix.txt", "A -> B\n# later\nA -> C\n", r"fix.txt:3: 'A' already has the alias 'B'"),
])
def test_labels_fix_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(AnnotationError, match=message):
        LabelsFix.load(tmp_path / name)


def test_labels_fix_yaml_names_stay_as_written(tmp_path):
    """Names are strings: YAML 1.1 would read `No` as False, `null` as None and `007` as 7."""
    f = tmp_path / "fix.yaml"
    f.write_text("aliases:\n  No: 'Yes'\n  Off: null\n  007: Bond\nexclude_names: [On, 1e3]\n")
    fix = LabelsFix.load(f)
    assert fix.aliases == {"No": "Yes", "Off": "null", "007": "Bond"}
    assert fix.exclude_names == {"On", "1e3"}
    kept, _, unused = fix.apply(_records("No", "007", "Kofi"))
    assert [r.individual for r in kept] == ["Yes", "Bond", "Kofi"] and unused == ["alias Off",
                                                                                  "exclude-name 1e3",
                                                                                  "exclude-name On"]


def test_example_labels_fix_loads():
    fix = LabelsFix.load(Path(__file__).resolve().parents[2] / "configs" / "labels_fix_example.yaml")
    assert fix.aliases["Woodstiock"] == "Woodstock" and fix.exclude_names == {"Adult"}
    assert not fix.exclude_images


def test_an_exclusion_matches_the_published_name_of_an_aliased_individual(tmp_path):
    """an3: the docstring promises exclusions match the published name *or* the alias target; only
    the target was tested (no exclusion of an aliased name at all)."""
    fix_file = tmp_path / "fix.txt"
    fix_file.write_text("Woodstiock -> Woodstock\nexclude-name Woodstiock\n")
    records = [Record("a.png", "Woodstiock", "CTai", "f:1"), Record("b.png", "Kofi", "CTai", "f:2")]
    kept, excluded, unused = LabelsFix.load(fix_file).apply(records)
    assert [r.path for r in kept] == ["b.png"]
    assert [(r.path, reason) for r, reason in excluded] == [("a.png", "name Woodstiock excluded")]
    assert unused == []


def test_two_names_that_become_one_after_replacing_spaces_are_refused():
    """an2: only a clash with an existing underscore name was tested; two spaced names that both
    become 'Mr_Bean' would silently merge two individuals."""
    records = [Record("a.png", "Mr Bean", "CZoo", "f:1"), Record("b.png", "Mr  Bean", "CZoo", "f:2")]
    with pytest.raises(AnnotationError, match="would merge"):
        check_names(records, spaces_to_underscores=True)


def test_a_keypoint_with_one_infinite_coordinate_is_not_visible():
    """an1: `Inf Inf` was tested, a half-infinite point (x finite, y Inf) was not."""
    line = ("face_images/a.png Name Victor Age 3 Age_group Infant Gender Male RightEye 1 Inf "
            "LeftEye 3 4 MouthCenter 5 6 LeftEarlobe Inf 8 RightEarlobe 9 10")
    keypoints = parse_cvjena_line(line, "f:1")["keypoints"]
    assert keypoints[0] is None and keypoints[3] is None and keypoints[1] == (3, 4)


def test_an_exclusion_matches_the_alias_target_and_either_unicode_form(tmp_path):
    """Excluding 'Fredy' must drop the 'Freddy' images an alias renames to it too (they would come back
    under the excluded name), and a name excluded in decomposed form (as macOS gives a folder name)
    must drop the composed one; both passed every test when broken."""
    fix_file = tmp_path / "fix.txt"
    fix_file.write_text(f"Freddy -> Fredy\nexclude-name Fredy\nexclude-name {DECOMPOSED}\n", encoding="utf-8")
    kept, excluded, unused = LabelsFix.load(fix_file).apply(_records("Freddy", "Fredy", COMPOSED, "Kofi"))
    assert [r.individual for r in kept] == ["Kofi"] and unused == []
    assert [(r.path, reason) for r, reason in excluded] == [
        ("img1.png", "name Fredy excluded"), ("img2.png", "name Fredy excluded"),
        ("img3.png", f"name {COMPOSED} excluded")]
