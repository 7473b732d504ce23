"""Inputs named on the command line (paths, folders, glob patterns) turned into image files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from src.inference.inputs import Skipped, collect_images


def listed(inputs):
    return inputs.files, inputs.skipped


@pytest.mark.parametrize("names, listed", [
    # As file browsers do: a camera's IMG_9 before IMG_10 (text order put IMG_10 first).
    (("IMG_10.jpg", "IMG_9.jpg", "IMG_100.jpg", "b/IMG_2.jpg", "a1.jpg", "a٣.jpg", "x².jpg"),
     ["IMG_9.jpg", "IMG_10.jpg", "IMG_100.jpg", "a1.jpg", "a٣.jpg", "b/IMG_2.jpg", "x².jpg"]),
    # a1/ and a01/ are equal as numbers: their files must not interleave, and which comes first must
    # not depend on the file system's listing order.
    (("a1/x.jpg", "a01/y.jpg", "a1/z.jpg", "IMG_01.jpg", "IMG_1.jpg", "cam.jpg", "cam/1.jpg"),
     ["IMG_01.jpg", "IMG_1.jpg", "a01/y.jpg", "a1/x.jpg", "a1/z.jpg", "cam/1.jpg", "cam.jpg"]),
])
def test_a_folder_lists_numbered_files_in_number_order(tmp_path, names, listed):
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    assert [str(path.relative_to(tmp_path)) for path in collect_images([tmp_path]).files] == listed
    numbered = [tmp_path / name for name in listed if name.startswith("IMG_")]
    assert collect_images([tmp_path / "IMG_*.jpg"]).files == numbered


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_entries_that_are_not_regular_files_are_listed_as_skipped(odd_entries):
    """Before, a folder's FIFOs and broken links were dropped without a word, and a FIFO given by
    name was 'file not found' (it exists). Hidden entries stay left out."""
    folder, photo, fifo, link = odd_entries
    assert listed(collect_images([folder])) == ([photo], [Skipped(str(fifo), "not a regular file"),
                                                  Skipped(str(link), "broken link"),
                                                  Skipped(str(folder / "only_a_fifo" / "d.png"), "not a regular file")])
    assert listed(collect_images([fifo, link])) == ([], [Skipped(str(fifo), "not a regular file"),
                                                 Skipped(str(link), "broken link")])
    assert listed(collect_images([folder / "*.png"])) == ([photo], [Skipped(str(fifo), "not a regular file"),
                                                            Skipped(str(link), "broken link")])
    # A folder of nothing but a FIFO is not "empty": its entry says what it is.
    assert listed(collect_images([folder / "only_a_fifo"])) == ([], [Skipped(str(folder / "only_a_fifo" / "d.png"),
                                                                      "not a regular file")])


def test_files_in_folders_that_are_not_named_as_images_are_left_out_and_named(tmp_path):
    """A camera folder holds sidecar files (notes.txt, IMG_1.xmp, Thumbs.db): before, each was a
    'skipped' input, so every run on such a folder ended with exit 1."""
    for name in ("IMG_1.JPG", "IMG_1.xmp", "notes.txt", "Thumbs.db", "day2/IMG_2.png", "day2/readme"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    others = [tmp_path / name for name in ("IMG_1.xmp", "Thumbs.db", "day2/readme", "notes.txt")]  # natural order
    inputs = collect_images([tmp_path])
    assert (inputs.files, inputs.skipped, inputs.not_images) == (
        [tmp_path / "IMG_1.JPG", tmp_path / "day2/IMG_2.png"], [], others)
    assert inputs.notes() == [f"4 files not named as images left out: {others[0]}, {others[1]}, {others[2]} and 1 more"]
    # The same folder twice, and as a pattern (which matches a folder and its files): each file once.
    again = collect_images([tmp_path, tmp_path / "**", tmp_path])
    assert (again.files, again.not_images, again.repeats) == (inputs.files, others, 4)
    # Named on its own too, it is decoded (and skipped) later, not also counted as left out.
    named = collect_images([tmp_path / "notes.txt", tmp_path])
    assert (named.files, named.not_images) == ([tmp_path / "notes.txt", *inputs.files], others[:3])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").touch()
    assert listed(collect_images([tmp_path / "docs", tmp_path / "empty*"])) == (
        [], [Skipped(str(tmp_path / "docs"), "no image files in it"),
             Skipped(str(tmp_path / "empty*"), "no file matches this pattern")])


def test_a_file_named_twice_by_different_paths_counts_once(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").touch()
    monkeypatch.chdir(tmp_path)
    inputs = collect_images(["photos", "./photos/a.png", tmp_path / "photos" / "a.png", "photos/../photos/a.png"])
    assert (inputs.files, inputs.repeats) == ([Path("photos/a.png")], 3)
    assert inputs.notes() == ["3 repeated inputs counted once"]


def test_two_links_to_one_photo_are_two_inputs(tmp_path):
    (tmp_path / "a.png").touch()
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    inputs = collect_images([tmp_path])
    assert (inputs.files, inputs.repeats) == ([tmp_path / "a.png", tmp_path / "link.png"], 0)


def test_an_empty_input_is_skipped_not_read_as_the_current_folder(tmp_path, monkeypatch):
    """`predict "$PHOTOS"` with PHOTOS unset scored every image under the current folder."""
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert collect_images([""]).entries == [Skipped("", "an empty path")]


def test_linked_sub_folders_are_searched_and_a_link_to_an_ancestor_does_not_loop(tmp_path):
    """A linked sub-folder (photos from another disk) was left out without a word, though `prepare
    --folder` follows such links."""
    other_disk, photos = tmp_path / "other_disk", tmp_path / "photos"
    other_disk.mkdir()
    photos.mkdir()
    (other_disk / "b.png").touch()
    (photos / "a.png").touch()
    (photos / "camera2").symlink_to(other_disk)
    (photos / "loop").symlink_to(photos)
    assert listed(collect_images([photos])) == ([photos / "a.png", photos / "camera2" / "b.png"], [])


def test_a_path_the_file_system_refuses_to_look_up_is_skipped(tmp_path):
    """A name longer than the file system allows (255 bytes) made `Path.is_dir` raise: `predict` and
    `gallery enroll` stopped with an OSError traceback instead of skipping the input."""
    (tmp_path / "a.png").touch()
    too_long = str(tmp_path / ("x" * 300 + ".png"))
    assert listed(collect_images([too_long, tmp_path / "a.png", too_long[:-4] + "*.png"])) == (
        [tmp_path / "a.png"], [Skipped(too_long, "not a usable path (File name too long)"),
                               Skipped(too_long[:-4] + "*.png", "not a usable path (File name too long)")])
