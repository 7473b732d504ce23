"""Inputs named on the command line (paths, folders, glob patterns) turned into image files."""
from __future__ import annotations

import os

import pytest

from src.inference.inputs import Skipped, collect_images


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
    assert [str(path.relative_to(tmp_path)) for path in collect_images([tmp_path])[0]] == listed
    numbered = [tmp_path / name for name in listed if name.startswith("IMG_")]
    assert collect_images([tmp_path / "IMG_*.jpg"])[0] == numbered


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_entries_that_are_not_regular_files_are_listed_as_skipped(odd_entries):
    """Before, a folder's FIFOs and broken links were dropped without a word, and a FIFO given by
    name was 'file not found' (it exists). Hidden entries stay left out."""
    folder, photo, fifo, link = odd_entries
    assert collect_images([folder]) == ([photo], [Skipped(str(fifo), "not a regular file"),
                                                  Skipped(str(link), "broken link"),
                                                  Skipped(str(folder / "only_a_fifo" / "d.png"), "not a regular file")])
    assert collect_images([fifo, link]) == ([], [Skipped(str(fifo), "not a regular file"),
                                                 Skipped(str(link), "broken link")])
    assert collect_images([folder / "*.png"]) == ([photo], [Skipped(str(fifo), "not a regular file"),
                                                            Skipped(str(link), "broken link")])
    # A folder of nothing but a FIFO is not "empty": its entry says what it is.
    assert collect_images([folder / "only_a_fifo"]) == ([], [Skipped(str(folder / "only_a_fifo" / "d.png"),
                                                                      "not a regular file")])
