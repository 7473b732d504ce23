"""PreparedData, ClassIndex and ImageListDataset on a hand-made prepared folder (no prepare run needed)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from src.data.dataset import (ClassIndex, DatasetError, ImageListDataset, PreparedData, collate_skip_none,
                              data_fingerprint)
from src.data.decode import decode_for_cache
from src.data.lists import write_list

ROWS = [("faces/b/1.png", "Bako"), ("faces/a/1.png", "Abeni"), ("faces/c/1.png", "Chiku"),
        ("faces/a/2.png", "Abeni"), ("faces/b/2.png", "Bako"), ("faces/c/2.png", "Chiku")]
MODES = ("RGB", "L", "RGBA")  # every image must come out as 3-channel RGB


def _write_images(raw: Path) -> None:
    for i, (rel, _) in enumerate(ROWS):
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new(MODES[i % 3], (20 + i, 16), color=(10 * i,) * len(MODES[i % 3])).save(raw / rel)


@pytest.fixture
def root(tmp_path) -> Path:
    """A prepared folder: prepared.json, a train list and an open-set list, images under raw/."""
    raw = tmp_path / "raw"
    _write_images(raw)
    annotations = tmp_path / "prepared" / "annotations"
    write_list(annotations / "train.txt", ROWS)
    write_list(annotations / "open_set" / "unknown_test.txt", ROWS[:2])
    (annotations / "prepared.json").write_text(json.dumps({
        "raw_dir": str(raw.resolve()), "min_images": 2, "seed": 7, "num_classes": 3,
        "num_images": 6, "format_version": 1}))
    return tmp_path / "prepared"


def test_prepared_data_reads_json_and_splits(root, tmp_path):
    data = PreparedData.load(root)
    assert (data.raw_dir, data.min_images, data.seed, data.num_classes) == (tmp_path / "raw", 2, 7, 3)
    assert data.split("train") == ROWS
    assert data.split("unknown_test", open_set=True) == ROWS[:2]


def test_relative_raw_dir_is_relative_to_root(root, tmp_path):
    meta = json.loads((root / "annotations" / "prepared.json").read_text())
    meta["raw_dir"] = "../raw"
    (root / "annotations" / "prepared.json").write_text(json.dumps(meta))
    assert PreparedData.load(root).raw_dir.resolve() == (tmp_path / "raw").resolve()


@pytest.mark.parametrize("change, message", [
    (lambda p: p.unlink(), "python -m src.data.prepare"),
    (lambda p: p.write_text("{"), "not valid JSON"),
    (lambda p: p.write_text(json.dumps({"raw_dir": "/x"})), "missing min_images"),
    (lambda p: p.write_text(json.dumps({"raw_dir": "/x", "min_images": 1, "seed": 0, "num_classes": 1,
                                        "format_version": 2})), "format_version 2"),
    (lambda p: p.write_text(json.dumps({"raw_dir": "/x", "min_images": "ten", "seed": 0, "num_classes": 1,
                                        "format_version": 1})), "wrong type"),
    (lambda p: p.write_text("[]"), "missing raw_dir"),
    # Each of these was a traceback: OverflowError, ValueError (embedded null byte) from the cache,
    # RecursionError.
    (lambda p: p.write_text('{"raw_dir": "/x", "min_images": Infinity, "seed": 0, "num_classes": 1, '
                            '"format_version": 1}'), "wrong type .min_images: inf"),
    (lambda p: p.write_text(json.dumps({"raw_dir": "/x\0y", "min_images": 1, "seed": 0, "num_classes": 1,
                                        "format_version": 1})), "wrong type .raw_dir: '/x.x00y'"),
    (lambda p: p.write_text(json.dumps({"raw_dir": "/x", "min_images": 1, "seed": True, "num_classes": 1.5,
                                        "format_version": 1})), "wrong type .seed: True, num_classes: 1.5"),
    (lambda p: p.write_text("[" * 100_000), "not valid JSON .nested too deep"),
    # was quoted whole: a 10 MB line
    (lambda p: p.write_text(json.dumps({"raw_dir": "/x", "min_images": 1, "seed": 0, "num_classes": 1,
                                        "format_version": "x" * 10_000_000})), "format_version 'xxx"),
])
def test_unusable_prepared_json_is_a_one_line_error(root, change, message):
    change(root / "annotations" / "prepared.json")
    with pytest.raises(DatasetError, match=message) as exc:
        PreparedData.load(root)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 1000, str(exc.value)[:300]


def test_a_relative_root_that_is_not_there_names_the_working_folder(tmp_path, monkeypatch):
    """A checkpoint's config says `data/standin`; evaluated from another folder, the data is not found."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as relative:
        PreparedData.load("data/standin")
    assert f"(a relative root is read from the working folder, {tmp_path})" in str(relative.value)
    with pytest.raises(DatasetError) as absolute:
        PreparedData.load(tmp_path / "data")
    assert "working folder" not in str(absolute.value)


def test_a_root_the_system_cannot_look_up_is_one_line(tmp_path):
    """`data.root` or `--data-root` with a name over 255 bytes (or in a folder this user cannot search):
    Path.is_file raised, a traceback in training and evaluation."""
    root = tmp_path / ("a" * 300)
    with pytest.raises(DatasetError, match=r"annotations/prepared\.json: not a usable prepared dataset path "
                                           r"\(File name too long\)$"):
        PreparedData.load(root)


def test_missing_split_file_names_the_file(root):
    data = PreparedData.load(root)
    with pytest.raises(DatasetError, match=r"val\.txt: split file not found"):
        data.split("val")
    with pytest.raises(DatasetError, match=r"open_set.train\.txt"):
        data.split("train", open_set=True)
    with pytest.raises(DatasetError, match="plain name"):
        data.split("../train")
    # A typo is not a list prepare failed to write ("run prepare again" would not help).
    with pytest.raises(DatasetError) as typo:
        data.split("trian")
    assert str(typo.value) == ("no split 'trian': prepare writes train, val, test "
                               "(and, with the open-set lists, unknown_val, unknown_test)")
    with pytest.raises(DatasetError, match="^no split 'unknown': prepare writes train, val, test, unknown_val, "
                                           "unknown_test$"):
        data.split("unknown", open_set=True)


def test_class_index_is_sorted_stable_and_round_trips():
    classes = ClassIndex.from_rows(ROWS)
    assert classes.names == ("Abeni", "Bako", "Chiku") and len(classes) == 3
    assert [classes.index(n) for n in ("Abeni", "Bako", "Chiku")] == [0, 1, 2]
    assert ClassIndex.from_rows(list(reversed(ROWS))) == classes
    assert ClassIndex.from_list(classes.to_list()) == classes
    saved_order = ClassIndex.from_list(["Chiku", "Abeni"])  # a checkpoint's order is kept, not re-sorted
    assert saved_order.index("Chiku") == 0 and saved_order != ClassIndex(["Abeni", "Chiku"])
    with pytest.raises(DatasetError, match="'Abeni' appears twice"):  # a damaged checkpoint: ids would shift
        ClassIndex.from_list(["Abeni", "Bako", "Abeni"])
    assert "Bako" in classes and "Zuri" not in classes
    with pytest.raises(DatasetError, match="'Zuri' is not one of the 3 classes"):
        classes.index("Zuri")


@pytest.mark.parametrize("names, message", [
    (["A", "B", "A"], "appears twice"), (["A B"], "whitespace"), ([""], "non-empty"),
    # the rule of prepare and galleries (lists.name_problem): a model trained on a hand-edited list
    # would otherwise have an individual that gallery enroll --from-split refuses
    (["Zo\x07e"], "class name 'Zo\\\\x07e' holds a control character"),
    (["Unknown"], "class name 'Unknown' is what inference calls a rejected photo"),
    # a second "Zuri" that looks like the first, and a name that reorders the line it is printed in
    (["Zuri\u200b"], r"holds an invisible or text-direction character \(U\+200B\)"),
    (["Ab\u202eeni"], r"holds an invisible or text-direction character \(U\+202E\)"),
])
def test_class_index_refuses_bad_names(names, message):
    with pytest.raises(DatasetError, match=message):
        ClassIndex(names)


def test_dataset_gives_the_cache_s_pixels_and_labels(root):
    data = PreparedData.load(root)
    classes = ClassIndex.from_rows(ROWS)
    dataset = ImageListDataset(data.split("train"), data.raw_dir, classes, cache_size=12)
    assert len(dataset) == 6
    for i, (rel, name) in enumerate(ROWS):
        image, label = dataset[i]
        assert torch.equal(image, torch.from_numpy(decode_for_cache(data.raw_dir / rel, 12)))
        assert image.dtype == torch.uint8 and image.shape == (12, 12, 3) and label == classes.index(name)


def test_dataset_refuses_individuals_outside_the_class_index(root):
    with pytest.raises(DatasetError, match="Chiku"):
        ImageListDataset(ROWS, root, ClassIndex(["Abeni", "Bako"]), cache_size=12)


def test_unreadable_images_are_dropped_and_counted(root, caplog):
    data = PreparedData.load(root)
    classes = ClassIndex.from_rows(ROWS)
    (data.raw_dir / ROWS[0][0]).unlink()
    dataset = ImageListDataset(ROWS, data.raw_dir, classes, cache_size=16)
    with caplog.at_level(logging.WARNING, logger="src.data.dataset"):
        assert dataset[0] is None and dataset[0] is None
    assert [r.getMessage() for r in caplog.records if ROWS[0][0] in r.getMessage()] == [
        f"skipping unreadable image {data.raw_dir / ROWS[0][0]}: file not found"]  # once per path

    for workers in (0, 2):  # the count travels with the batch, so worker processes report it too
        loader = DataLoader(dataset, batch_size=3, num_workers=workers, collate_fn=collate_skip_none)
        batches = list(loader)
        assert sum(skipped for _, _, skipped in batches) == 1
        assert sum(len(labels) for _, labels, _ in batches) == 5
        assert batches[0][0].shape == (2, 16, 16, 3) and batches[0][1].dtype == torch.int64


def test_collate_of_an_all_unreadable_batch_is_empty():
    images, labels, skipped = collate_skip_none([None, None])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 2


def test_an_image_listed_twice_is_warned_about_and_under_two_names_refused(root, caplog):
    """Prepare lists each image once; a hand edit may list one again (it weighs twice) or under
    another individual (it would be trained as both)."""
    data = PreparedData.load(root)
    train = root / "annotations" / "train.txt"
    first = train.read_text().splitlines()[0]
    train.write_text(train.read_text() + first + "\n")
    with caplog.at_level(logging.WARNING, logger="src.data.dataset"):
        assert data.split("train")[-1] == data.split("train")[0]
    assert f"{train}: 1 line(s) repeat an earlier one (first: {first.rsplit(maxsplit=1)[0]})" in caplog.text
    rel, name = first.rsplit(maxsplit=1)
    train.write_text(train.read_text() + f"{rel} Someone_else\n")
    with pytest.raises(DatasetError, match=rf"{rel} is listed as '{name}' and as 'Someone_else': an image shows one"):
        data.split("train")


def test_open_set_lists_of_a_dataset_prepared_without_them_name_the_option(root):
    """data.open_set: true on data prepared with --open-set-individuals 0 said "split file not found;
    run prepare", as if prepare had not run."""
    shutil.rmtree(root / "annotations" / "open_set")
    with pytest.raises(DatasetError, match=rf"^{root} was prepared without an open-set split "
                                           r"\(--open-set-individuals 0\), which data.open_set: true needs: "):
        PreparedData.load(root).split("train", open_set=True)


def test_the_raw_folder_given_as_the_root_names_the_prepared_one(tmp_path):
    """`data.root: data/x/raw` or `evaluate --data-root data/x/raw`: the error said to run prepare with
    `--out-dir data/x/raw`, which would put a prepared dataset inside the raw release."""
    raw = tmp_path / "x" / "raw"
    (raw / "datasets_cropped_chimpanzee_faces").mkdir(parents=True)
    with pytest.raises(DatasetError) as exc:
        PreparedData.load(raw)
    assert str(exc.value) == (f"{raw} is a raw folder (the --raw-dir of prepare), not a prepared dataset: prepare "
                              f"it (`python -m src.data.prepare --raw-dir {raw} --out-dir <folder>`) and give <folder>")
    (tmp_path / "x" / "annotations").mkdir()
    (tmp_path / "x" / "annotations" / "prepared.json").write_text("{}")
    for given in (raw, raw / "datasets_cropped_chimpanzee_faces"):
        with pytest.raises(DatasetError) as exc:
            PreparedData.load(given)
        assert str(exc.value) == (f"{given} is a raw folder (the --raw-dir of prepare), not a prepared dataset: "
                                  f"give the prepared one, {tmp_path / 'x'} (the --out-dir of prepare)")


def test_a_folder_of_own_photos_given_as_the_root_says_to_prepare_it(tmp_path):
    """`data.root: photos` (the --folder of prepare): the error said to prepare with `--out-dir photos`,
    which prepare --folder refuses (the output must lie outside the photos)."""
    photos = tmp_path / "photos"
    (photos / "Zoë").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(photos / "Zoë" / "IMG_0001.JPG")
    with pytest.raises(DatasetError) as exc:
        PreparedData.load(photos)
    assert str(exc.value) == (f"{photos} is a folder of photos (the --folder of prepare), not a prepared dataset: "
                              f"prepare it (`python -m src.data.prepare --folder {photos} --out-dir <folder>`, a "
                              f"folder outside it) and give <folder>")


def test_the_annotations_folder_given_as_the_root_names_its_parent(root):
    """`evaluate --data-root data/x/annotations` (or `gallery enroll --from-split`): the error said to
    run prepare with `--out-dir data/x/annotations`, which would nest a second dataset inside the first."""
    with pytest.raises(DatasetError) as exc:
        PreparedData.load(root / "annotations")
    assert str(exc.value) == (f"{root / 'annotations'} is the annotations folder of a prepared dataset: give the "
                              f"dataset's own folder, {root} (the --out-dir of prepare)")


def test_class_order_is_code_point_order_whatever_the_case():
    """Class ids are positions in this order: a case-insensitive (or locale) sort would give 'bako'
    and 'Chiku' other ids than a model trained with code-point order, and passed every test."""
    rows = [("b.png", "bako"), ("c.png", "Chiku"), ("a.png", "Abeni")]
    assert ClassIndex.from_rows(rows).names == ("Abeni", "Chiku", "bako")


def test_data_fingerprint_follows_images_labels_and_class_order_not_row_order():
    """Resume and evaluate refuse data whose fingerprint differs; neither the row order nor the class
    order was checked by any test."""
    classes = ClassIndex.from_rows(ROWS)
    fingerprint = data_fingerprint(ROWS, classes)
    assert data_fingerprint(list(reversed(ROWS)), classes) == fingerprint  # the same data, listed otherwise
    assert data_fingerprint(ROWS, ClassIndex(["Bako", "Abeni", "Chiku"])) != fingerprint  # ids renumbered
    assert data_fingerprint([(ROWS[0][0], "Chiku"), *ROWS[1:]], classes) != fingerprint  # one image relabelled
