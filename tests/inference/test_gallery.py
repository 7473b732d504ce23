"""Galleries: the command line, matching arithmetic, safe and atomic storage, checkpoint binding."""
from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from src import locks
from src.training.artifacts import threshold_sidecar_path
from src.inference import gallery as gallery_cli
from src.inference import predict
from src.inference.gallery import Gallery, GalleryError
from src.inference.identify import Identifier, InferenceError
from tests.conftest import REPO


class Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def enroll(gallery: Path, checkpoint: Path, name: str, *images) -> int:
    return gallery_cli.main(["enroll", "--gallery", str(gallery), "--checkpoint", str(checkpoint),
                             "--name", name, *map(str, images)])


def test_enroll_list_remove(learned, unseen, tmp_path, capsys):
    gallery = tmp_path / "g.npz"
    (first, first_photos), (second, second_photos) = list(unseen.items())[:2]
    assert enroll(gallery, learned.checkpoint, first, *first_photos[:3]) == 0
    assert enroll(gallery, learned.checkpoint, second, second_photos[0]) == 0
    # More photos of an enrolled individual; the one enrolled before is recognised and not repeated.
    assert enroll(gallery, learned.checkpoint, first, *first_photos[2:5]) == 0
    out = capsys.readouterr().out
    assert f"already enrolled as {first}: {first_photos[2]}" in out
    assert f"{first}: +2 images (3 before, 5 now)" in out
    assert f"{second}: +1 image (new individual, 1 now)" in out  # not "+1 images"

    assert gallery_cli.main(["list", "--gallery", str(gallery)]) == 0
    listing = capsys.readouterr().out
    assert "2 individuals, 6 images" in listing
    assert Identifier.from_checkpoint(learned.checkpoint).info.checkpoint_sha256 in listing
    assert gallery_cli.main(["remove", "--gallery", str(gallery), first]) == 0
    loaded = Gallery.load(gallery)
    assert loaded.counts() == {second: 1} and loaded.labels.tolist() == [0]
    # what is left of each photo's record is its own: a copy of it is still known, one of a removed photo is not
    kept = Path(second_photos[0]).resolve()
    assert loaded.photos() == {hashlib.sha256(kept.read_bytes()).hexdigest(): (second, str(kept))}
    assert gallery_cli.main(["list", "--gallery", str(gallery)]) == 0
    removed, listed = capsys.readouterr().out.splitlines()[:2]
    assert removed == f"removed {first} (5 images)" and listed.startswith(f"{gallery}: 1 individual, 1 image; ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".g.npz.lock", "g.npz"]  # no temporary file left behind

    assert gallery_cli.main(["remove", "--gallery", str(gallery), "Nobody"]) == 2
    assert "no individual 'Nobody'" in capsys.readouterr().err
    assert gallery_cli.main(["remove", "--gallery", str(gallery), second.swapcase()]) == 2
    assert (f"no individual {second.swapcase()!r} in the gallery (names are case-sensitive: did you mean "
            f"{second!r}?)") in capsys.readouterr().err


def test_remove_takes_a_name_in_either_unicode_form(learned, unseen, tmp_path, capsys):
    """macOS file names and some keyboards give "Zoé" decomposed (e + combining accent)."""
    gallery = tmp_path / "g.npz"
    photos = next(iter(unseen.values()))
    composed = unicodedata.normalize("NFC", "Zoé")
    assert enroll(gallery, learned.checkpoint, composed, photos[0]) == 0
    capsys.readouterr()
    # given twice (and in both forms): removed once; it was "no individual 'Zoé' in the gallery"
    assert gallery_cli.main(["remove", "--gallery", str(gallery), unicodedata.normalize("NFD", composed),
                             composed]) == 0
    assert capsys.readouterr().out == f"removed {composed} (1 image)\n"
    assert Gallery.load(gallery).counts() == {}


def test_enroll_takes_a_name_in_either_unicode_form(learned, unseen, tmp_path, capsys):
    """A decomposed --name (a macOS folder name pasted in) enrolls under the composed one and reports
    it; it was a KeyError traceback and exit 1, after the gallery was saved."""
    gallery = tmp_path / "g.npz"
    photos = next(iter(unseen.values()))
    composed = unicodedata.normalize("NFC", "Zoé")
    assert enroll(gallery, learned.checkpoint, unicodedata.normalize("NFD", composed), photos[0]) == 0
    assert enroll(gallery, learned.checkpoint, unicodedata.normalize("NFD", composed), photos[1]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{composed}: +1 image (new individual, 1 now)"
    assert out[2] == f"{composed}: +1 image (1 before, 2 now)"
    assert Gallery.load(gallery).counts() == {composed: 2}


def test_a_new_name_that_differs_from_an_enrolled_one_only_in_case_is_warned_about(learned, unseen, tmp_path,
                                                                                     capsys):
    """`--name fifi` beside an enrolled 'Fifi' made a second individual without a word."""
    gallery = tmp_path / "g.npz"
    photos = next(iter(unseen.values()))
    assert enroll(gallery, learned.checkpoint, "Fifi", photos[0]) == 0
    assert enroll(gallery, learned.checkpoint, "Fifi", photos[1]) == 0
    assert "warning" not in capsys.readouterr().err
    assert enroll(gallery, learned.checkpoint, "fifi", photos[2]) == 0
    assert capsys.readouterr().err == ("warning: 'fifi' is a new individual beside 'Fifi' (names are case-sensitive); "
                                       "if they are one animal: gallery remove fifi, then enroll its photos as Fifi\n")
    assert Gallery.load(gallery).counts() == {"Fifi": 2, "fifi": 1}


def test_enroll_needs_no_threshold_file(learned, unseen, tmp_path, capsys):
    """Enrolling only embeds photos: a damaged threshold file of evaluation (which predictions would
    refuse) does not stop it."""
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(learned.checkpoint.read_bytes())
    threshold_sidecar_path(checkpoint).write_text("{not json")
    name, photos = next(iter(unseen.items()))
    assert enroll(tmp_path / "g.npz", checkpoint, name, *photos[:2]) == 0
    assert Gallery.load(tmp_path / "g.npz").counts() == {name: 2}
    with pytest.raises(InferenceError, match="not a valid threshold file"):
        Identifier.from_checkpoint(checkpoint)


def test_enroll_skips_unreadable_photos_and_refuses_bad_names(learned, unseen, tmp_path, capsys, monkeypatch):
    gallery = tmp_path / "g.npz"
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "Thumbs.db").write_text("a folder's thumbnails")
    name, photos = next(iter(unseen.items()))
    shutil.copy(photos[0], tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)  # named as given, relative, as a missing file is (it was the absolute path)
    assert enroll(gallery, learned.checkpoint, name, "a.png", "notes.txt", "gone.png", ".") == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["skipped gone.png: file not found", "skipped notes.txt: not an image in a known format",
                   "note: 1 repeated input counted once",
                   "note: 1 file not named as images left out: Thumbs.db"]  # notes.txt was named on its own
    assert Gallery.load(gallery).counts() == {name: 1}
    for bad in ("unknown", "two words", "red\x1b[31m"):  # a terminal escape: every listing would replay it
        assert enroll(gallery, learned.checkpoint, bad, photos[1]) == 2
    err = capsys.readouterr().err
    assert "holds a control character" in err
    assert "individual name 'two words' contains whitespace (e.g. 'two_words')" in err
    assert "individual name 'unknown' is what inference calls a rejected photo" in err
    assert gallery_cli.name_refusal("unknown ") == "individual name 'unknown ' contains whitespace"  # no suggestion
    assert Gallery.load(gallery).counts() == {name: 1}


def test_enroll_from_a_prepared_split(tiny_run, tmp_path, capsys):
    from src.data.dataset import PreparedData

    gallery = tmp_path / "g.npz"
    argv = ["enroll", "--gallery", str(gallery), "--checkpoint", str(tiny_run["best"]),
            "--from-split", str(tiny_run["data_root"]), "train"]
    assert gallery_cli.main(argv) == 0
    rows = PreparedData.load(tiny_run["data_root"]).split("train")
    counts = Gallery.load(gallery).counts()
    assert sum(counts.values()) == len(rows) and set(counts) == {name for _, name in rows}
    assert "warning" not in capsys.readouterr().err  # a closed-set model, its own lists
    # Enrolled again: the first photos are named, the rest counted (it printed one line per photo).
    assert gallery_cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("already enrolled as ") for line in out) == gallery_cli.ALREADY_ENROLLED_SHOWN
    assert f"... and {len(rows) - gallery_cli.ALREADY_ENROLLED_SHOWN} more photos already enrolled" in out


def test_enrolling_a_closed_set_split_for_an_open_set_model_is_warned_about(tiny_run, tmp_path, capsys):
    """The closed-set lists hold the individuals such a model held out: the gallery would name them."""
    checkpoint = torch.load(tiny_run["best"], weights_only=True)
    checkpoint["config"]["data"]["open_set"] = True
    open_model = tmp_path / "open_best.pt"
    torch.save(checkpoint, open_model)
    argv = ["enroll", "--gallery", str(tmp_path / "g.npz"), "--checkpoint", str(open_model),
            "--from-split", str(tiny_run["data_root"]), "train"]
    assert gallery_cli.main(argv) == 0
    assert "warning: the checkpoint was trained on the open-set lists; add --open-set" in capsys.readouterr().err


def test_list_names_individuals_in_alphabetical_order(tmp_path, capsys):
    gallery = Gallery.new("sha", 2)
    gallery.add("Zuri", np.array([[1.0, 0.0]]), ["z1"])
    gallery.add("Abeni", np.array([[0.0, 1.0], [0.6, 0.8]]), ["a1", "a2"])  # enrolled second
    gallery_cli.save(gallery, tmp_path / "g.npz")
    assert gallery_cli.main(["list", "--gallery", str(tmp_path / "g.npz")]) == 0
    assert [line.split() for line in capsys.readouterr().out.splitlines()[2:]] == [["Abeni", "2"], ["Zuri", "1"]]


def test_scores_nearest_and_prototype():
    gallery = Gallery.new("sha", 2)
    gallery.add("a", np.array([[1.0, 0.0], [0.0, 1.0]]), ["a1", "a2"])
    gallery.add("b", np.array([[0.6, 0.8]]), ["b1"])
    query = np.array([[1.0, 0.0]])
    assert np.allclose(gallery.scores(query, "nearest"), [[1.0, 0.6]])
    assert np.allclose(gallery.scores(query, "prototype"), [[np.sqrt(0.5), 0.6]])


def test_a_gallery_of_another_checkpoint_is_refused(learned, tiny_run, unseen, tmp_path, capsys):
    gallery = tmp_path / "g.npz"
    name, photos = next(iter(unseen.items()))
    assert enroll(gallery, learned.checkpoint, name, photos[0]) == 0
    with pytest.raises(GalleryError, match="another checkpoint"):
        Identifier.from_checkpoint(tiny_run["best"], gallery=Gallery.load(gallery))
    assert predict.main(["--checkpoint", str(tiny_run["best"]), "--gallery", str(gallery), str(photos[1])]) == 2
    assert enroll(gallery, tiny_run["best"], name, photos[1]) == 2
    assert "another checkpoint" in capsys.readouterr().err
    assert Gallery.load(gallery).counts() == {name: 1}


def test_an_empty_gallery_is_refused_for_predictions(learned, tmp_path):
    sha = Identifier.from_checkpoint(learned.checkpoint).info.checkpoint_sha256
    Gallery.new(sha, 64).save(tmp_path / "empty.npz")
    with pytest.raises(InferenceError, match="no individuals"):
        Identifier.from_checkpoint(learned.checkpoint, gallery=Gallery.load(tmp_path / "empty.npz"))


def test_pickled_galleries_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(GalleryError, match="pickle"):
        Gallery.load(raw)
    buffer = io.BytesIO()  # a real .npz whose names array is a pickled object array
    np.savez(buffer, format_version=np.int64(1), checkpoint_sha256=np.str_("x"),
             names=np.array([Payload(marker)], dtype=object), embeddings=np.zeros((1, 2), np.float32),
             labels=np.zeros(1, np.int64), sources=np.array(["s"]))
    (tmp_path / "objects.npz").write_bytes(buffer.getvalue())
    with pytest.raises(GalleryError, match="pickled"):
        Gallery.load(tmp_path / "objects.npz")
    assert not marker.exists()


def test_pickled_checkpoints_are_refused_without_running_them(tmp_path, unseen, capsys):
    marker = tmp_path / "ran"
    torch.save({"format_version": 1, "model_state": {}, "epoch": 1, "config": {}, "classes": [],
                "payload": Payload(marker)}, tmp_path / "evil.pt")
    photo = next(iter(unseen.values()))[0]
    assert predict.main(["--checkpoint", str(tmp_path / "evil.pt"), str(photo)]) == 2
    assert "not a safe checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_a_failed_save_leaves_the_previous_gallery_intact(tmp_path, monkeypatch):
    path = tmp_path / "g.npz"
    gallery = Gallery.new("sha", 2)
    gallery.add("a", np.array([[1.0, 0.0]]), ["a1"])
    gallery.save(path)
    before = path.read_bytes()
    gallery.add("b", np.array([[0.0, 1.0]]), ["b1"])

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        gallery.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["g.npz"]


@pytest.mark.parametrize("command", ["enroll", "remove"])
def test_a_gallery_command_removes_what_a_killed_one_was_writing(learned, unseen, tmp_path, capsys, command):
    """kill -9 while a gallery was written left `.g.npz.tmp-<pid>` beside it, as large as the gallery, for good."""
    gallery = tmp_path / "g.npz"
    (first, photos), (second, more) = list(unseen.items())[:2]
    assert enroll(gallery, learned.checkpoint, first, photos[0]) == 0
    killed_write = tmp_path / ".g.npz.tmp-4194304"  # a pid no process has now
    killed_write.write_bytes(gallery.read_bytes()[:100])
    if command == "enroll":
        assert enroll(gallery, learned.checkpoint, second, more[0]) == 0
    else:
        assert gallery_cli.main(["remove", "--gallery", str(gallery), first]) == 0
    said = capsys.readouterr().err
    assert f"note: removed {killed_write}, a partial write of a gallery command that was killed" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == [".g.npz.lock", "g.npz"]


@pytest.mark.parametrize("through_a_link", [False, True])
def test_two_commands_changing_one_gallery_take_turns(learned, unseen, tmp_path, capsys, through_a_link):
    """Before, two enrolls at once each read the gallery and wrote back their own change: the later
    write dropped the earlier's individual, and both said they had enrolled. A command given a symbolic
    link to the gallery locked beside the link, so it did not wait for one given the gallery itself."""
    gallery = tmp_path / "g.npz"
    if through_a_link:
        (tmp_path / "elsewhere").mkdir()
        gallery = tmp_path / "elsewhere" / "link.npz"
        gallery.symlink_to(tmp_path / "g.npz")
    (first, first_photos), (second, second_photos) = list(unseen.items())[:2]
    assert enroll(tmp_path / "other.npz", learned.checkpoint, first, first_photos[0]) == 0
    capsys.readouterr()
    results, said = [], ""
    with locks.exclusive(tmp_path / ".g.npz.lock"):  # another command is changing the gallery
        worker = threading.Thread(target=lambda: results.append(
            enroll(gallery, learned.checkpoint, second, second_photos[0])), daemon=True)
        worker.start()
        deadline = time.monotonic() + 120
        while "waiting for another gallery command" not in said and time.monotonic() < deadline:
            time.sleep(0.05)
            said += capsys.readouterr().err
        assert f"waiting for another gallery command to finish with {gallery}" in said and not results
        shutil.copyfile(tmp_path / "other.npz", tmp_path / "g.npz")  # that command's write
    worker.join(timeout=120)
    assert results == [0]
    assert Gallery.load(tmp_path / "g.npz").counts() == {first: 1, second: 1}


def test_enrolling_into_a_path_that_cannot_be_written_exits_2_in_one_line(learned, unseen, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    photo = next(iter(unseen.values()))[0]
    assert enroll(tmp_path / "a_file" / "g.npz", learned.checkpoint, "Zuri", photo) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'a_file' / 'g.npz'}: cannot write the gallery") and err.count("\n") == 1


@pytest.mark.parametrize("changes, message", [
    ({"format_version": np.str_("1")}, "corrupt gallery: format_version must be one integer"),
    ({"names": np.array([["Zuri"]])}, "corrupt gallery: names must be a 1-D array of strings"),
    ({"embeddings": np.full((1, 64), np.nan, np.float32)}, "corrupt gallery: embeddings must be finite"),
    ({"embeddings": np.zeros((1, 64), np.float32)}, "corrupt gallery: embeddings must be rows of length 1"),
    ({"embeddings": np.ones(64, np.float32)}, "corrupt gallery: embeddings must be a 2-D float array"),
    ({"checkpoint_sha256": np.array([1, 2])}, "corrupt gallery: checkpoint_sha256 must be one string"),
    ({"embeddings": np.eye(1, 8, dtype=np.float32)},
     "corrupt gallery: its embeddings have 8 dimensions, the model's 64"),
    # Names that enroll refuses: `unknown` would print a confident match as if it were a rejection.
    ({"names": np.array(["unknown"])}, "corrupt gallery: individual name 'unknown' is what inference calls a rejected"),
    ({"names": np.array([""])}, "corrupt gallery: individual name '' must be a non-empty string"),
    ({"names": np.array(["Zuri Two"])}, "corrupt gallery: individual name 'Zuri Two' contains whitespace"),
    ({"names": np.array(["Zuri\x1b[31m"])}, "corrupt gallery: individual name 'Zuri\\x1b[31m' holds a control"),
    # a crafted name was quoted whole, twice (the refused name and the suggested one): a 2 MB line
    ({"names": np.array(["Zuri " + "x" * 1_000_000])}, "corrupt gallery: individual name 'Zuri xxx"),
])
def test_damaged_galleries_of_the_right_checkpoint_exit_2_in_one_line(learned, unseen, tmp_path, capsys,
                                                                      changes, message):
    arrays = {"format_version": np.int64(1), "checkpoint_sha256": np.str_(hashlib.sha256(
                  learned.checkpoint.read_bytes()).hexdigest()), "names": np.array(["Zuri"]),
              "embeddings": np.eye(1, 64, dtype=np.float32), "labels": np.zeros(1, np.int64),
              "sources": np.array(["zuri.png"]), **changes}
    np.savez(tmp_path / "g.npz", **arrays)
    photo = next(iter(unseen.values()))[0]
    assert predict.main(["--checkpoint", str(learned.checkpoint), "--gallery", str(tmp_path / "g.npz"),
                         str(photo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err[:300]
    assert len(err) < len(str(tmp_path)) + 400, err[:300]


def test_adding_from_python_validates_and_normalises_and_save_never_writes_an_unloadable_file(tmp_path):
    """`Gallery.add` from a script: input that would break the gallery is refused with the gallery
    unchanged (before, a saved gallery could then no longer be loaded); rows are made unit length,
    as matching assumes."""
    gallery = Gallery.new("0" * 64, 4)
    bad = [(np.ones((2, 3)), ["a", "b"], "4-dimensional rows"), (np.ones(4), ["a"], "2-D array"),
           (np.ones((2, 4)), ["a"], "2 embeddings but 1 sources"), (np.zeros((0, 4)), [], "no embeddings"),
           (np.zeros((1, 4)), ["a"], "finite and non-zero"), (np.full((1, 4), np.nan), ["a"], "finite")]
    for embeddings, sources, message in bad:
        with pytest.raises(GalleryError, match=message):
            gallery.add("Zuri", embeddings, sources)
    with pytest.raises(GalleryError, match="1 sources but 2 digests"):
        gallery.add("Zuri", np.ones((1, 4)), ["a"], ["0" * 64, "1" * 64])
    for digest in (hashlib.sha256(b"x").digest(), "abc", "A" * 64, None):  # bytes would have been stored as "b'...'"
        with pytest.raises(GalleryError, match="digests must be the photos' sha256 as 64 hex digits"):
            gallery.add("Zuri", np.ones((1, 4)), ["a"], [digest])
    assert gallery.names == [] and gallery.embeddings.shape == (0, 4) and gallery.sources == gallery.digests == []
    gallery.add("Zuri", np.array([[3.0, 0, 0, 4.0], [0, 2.0, 0, 0]]), ["a.png", Path("b.png")])
    assert np.allclose(gallery.embeddings, [[0.6, 0, 0, 0.8], [0, 1, 0, 0]]) and gallery.sources == ["a.png", "b.png"]
    assert gallery.digests == ["", ""]  # unknown: not read from files the caller named
    path = tmp_path / "g.npz"
    gallery.save(path)
    gallery.labels = np.array([0, 3])  # edited by hand into an inconsistent state
    with pytest.raises(GalleryError, match="not saved"):
        gallery.save(path)
    assert Gallery.load(path).counts() == {"Zuri": 2}
    old_style = Gallery("0" * 64, ["Zuri"], np.eye(1, 4, dtype=np.float32), np.zeros(1, np.int64), ["a.png"])
    assert old_style.digests == [""]  # built from its fields as before format 2: every digest unknown
    emptied = Gallery.load(path)
    emptied.remove("Zuri")
    emptied.save(path)  # an emptied gallery is still a valid file
    assert Gallery.load(path).counts() == {}


def test_a_name_written_two_unicode_ways_is_one_enrolled_individual():
    """'Zoé' composed (typed) and decomposed (a macOS folder name) enroll, and remove, one individual."""
    gallery = Gallery.new("0" * 64, 4)
    gallery.add("Zo\u00e9", np.eye(1, 4), ["a.png"])
    gallery.add("Zoe\u0301", np.eye(1, 4, 1), ["b.png"])
    assert gallery.counts() == {"Zo\u00e9": 2}
    gallery.remove("Zoe\u0301")
    assert gallery.counts() == {}


def npz_with_member(path, name: str, data: bytes) -> None:
    """A gallery .npz whose member `name` holds `data` instead of what numpy wrote (valid CRCs)."""
    arrays = {"format_version": np.int64(1), "checkpoint_sha256": np.str_("x"), "names": np.array(["Zuri"]),
              "embeddings": np.eye(1, 8, dtype=np.float32), "labels": np.zeros(1, np.int64),
              "sources": np.array(["zuri.png"])}
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{key}.npy", data if key == name else buffer.getvalue())


def npy_declaring(shape: tuple[int, ...], data: bytes) -> bytes:
    """A .npy member whose header declares float32 `shape` but which holds `data`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


@pytest.mark.parametrize("data, message", [
    (b"not an array", "corrupt gallery: embeddings not stored as an array"),  # was AttributeError
    # A header promising more rows than the data holds: was "refused: it holds pickled Python objects".
    (npy_declaring((9, 8), bytes(32)), "corrupt gallery: embeddings declares shape (9, 8) of float32 (288 bytes), "
                                       "but holds 32 bytes"),
    # Was numpy's _ArrayMemoryError traceback: 11.6 TiB allocated before reading anything.
    (npy_declaring((10**11, 32), bytes(32)), "corrupt gallery: embeddings declares shape (100000000000, 32) of "
                                             "float32 (12,800,000,000,000 bytes), but holds 32 bytes"),
])
def test_galleries_with_damaged_members_are_named_as_such(tmp_path, capsys, data, message):
    npz_with_member(tmp_path / "g.npz", "embeddings", data)
    with pytest.raises(GalleryError) as error:
        Gallery.load(tmp_path / "g.npz")
    assert message in str(error.value) and "pickle" not in str(error.value)
    assert gallery_cli.main(["list", "--gallery", str(tmp_path / "g.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'g.npz'}: corrupt gallery") and err.count("\n") == 1, err


def test_a_member_whose_zip_entry_lies_about_its_size_too_is_refused_in_one_line(tmp_path, monkeypatch):
    """The header check trusts the zip's size field; when both lie, numpy's allocation fails."""
    npz_with_member(tmp_path / "g.npz", "embeddings", npy_declaring((1, 8), bytes(32)))

    def allocation_fails(*_, **__):
        raise MemoryError("Unable to allocate 11.6 TiB")

    monkeypatch.setattr(np.lib.format, "read_array", allocation_fails)
    with pytest.raises(GalleryError, match="corrupt gallery: format_version does not fit in memory"):
        Gallery.load(tmp_path / "g.npz")


def test_a_pytorch_checkpoint_given_as_the_gallery_is_named_without_reading_it(tmp_path, capsys, monkeypatch):
    """A checkpoint is a zip too: before, every member was read (134 MB for a real one) and all of
    their names listed in an 8 KB "one-line" error."""
    torch.save({f"layer{i}": torch.zeros(2) for i in range(40)}, tmp_path / "model_best.pt")
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *_, **__: pytest.fail("a member was read"))
    assert gallery_cli.main(["list", "--gallery", str(tmp_path / "model_best.pt")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'model_best.pt'} is a PyTorch checkpoint, not a gallery "
                                       "(a .npz from `gallery enroll`)\n")


def test_names_listed_in_a_gallery_error_are_capped(tmp_path):
    """A zip of many members, few of them a gallery's: the error names a few, then a count."""
    with zipfile.ZipFile(tmp_path / "g.npz", "w") as archive:
        archive.writestr("names.npy", b"")
        for i in range(200):
            archive.writestr(f"photo_{i:03}.txt", b"x")
    with pytest.raises(GalleryError) as error:
        Gallery.load(tmp_path / "g.npz")
    message = str(error.value)
    assert "not a gallery file (missing format_version, checkpoint_sha256, embeddings and 2 more)" in message
    assert len(message) < 200 and "\n" not in message


def test_a_folder_given_as_the_gallery_is_named_as_such(learned, unseen, tmp_path, capsys, monkeypatch):
    with pytest.raises(GalleryError, match="a folder, not a gallery file"):
        Gallery.load(tmp_path)
    monkeypatch.chdir(tmp_path)  # `--gallery .`: no name to put a lock file beside (was a ValueError traceback)
    for folder in (".", str(tmp_path)):
        assert enroll(Path(folder), learned.checkpoint, "Zuri", next(iter(unseen.values()))[0]) == 2
        assert capsys.readouterr().err == f"error: {folder}: a folder, not a gallery file (.npz)\n"


def test_names_with_format_characters_are_names_and_control_characters_are_not():
    """A soft hyphen or a zero-width joiner (inside many emoji) is part of a name someone typed; a
    zero-width space makes a second "Zuri" that looks like the first, a right-to-left override
    reorders the listing it is printed in."""
    assert gallery_cli.name_refusal("Zo\u00adé") is None and gallery_cli.name_refusal("Ali\u200dce") is None
    assert "control character (U+0007)" in gallery_cli.name_refusal("Zuri\x07")
    assert "invisible or text-direction character (U+200B)" in gallery_cli.name_refusal("Zuri\u200b")
    assert "invisible or text-direction character (U+202E)" in gallery_cli.name_refusal("Ab\u202eeni")
    for blank in ("\u2063", "\u3164", "\u034f", "\u180e"):  # invisible separator, Hangul filler, CGJ, MVS
        assert f"(U+{ord(blank):04X})" in gallery_cli.name_refusal(f"Zuri{blank}")


def test_list_into_a_reader_that_stops_early_exits_cleanly(tmp_path):
    """`gallery list ... | head`: the closed pipe ends the listing without a BrokenPipeError traceback
    (enroll and remove print through the same function)."""
    gallery = Gallery.new("0" * 64, 2)
    for i in range(300):
        gallery.add(f"chimp{i}", np.array([[1.0, 0.0]]), [f"{i}.png"])
    gallery.save(tmp_path / "g.npz")
    process = subprocess.Popen([sys.executable, "-m", "src.inference.gallery", "list", "--gallery",
                                str(tmp_path / "g.npz")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdout.close()  # before the listing: the interpreter takes a second to start
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and "Traceback" not in err, err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_list_into_a_full_disk_exits_2_in_one_line(tmp_path):
    """`gallery list > listing.txt` on a full disk was an OSError traceback (predict's table too)."""
    gallery = Gallery.new("0" * 64, 2)
    gallery.add("Zuri", np.array([[1.0, 0.0]]), ["a.png"])
    gallery.save(tmp_path / "g.npz")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "src.inference.gallery", "list", "--gallery",
                                 str(tmp_path / "g.npz")], cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True)
    assert (result.returncode, result.stderr) == (
        2, "error: cannot write the results to stdout (No space left on device)\n")


def test_enroll_into_a_reader_that_stops_early_still_saves(learned, unseen, tmp_path):
    """Its "already enrolled" lines come before the save: a closed pipe there lost the new photos."""
    name, photos = next(iter(unseen.items()))
    gallery = tmp_path / "g.npz"
    assert enroll(gallery, learned.checkpoint, name, photos[0]) == 0
    process = subprocess.Popen([sys.executable, "-m", "src.inference.gallery", "enroll", "--gallery", str(gallery),
                                "--checkpoint", str(learned.checkpoint), "--name", name, *map(str, photos[:3])],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and "Traceback" not in err, err
    assert Gallery.load(gallery).counts() == {name: 3}


def _save_arrays(path, **changes):
    arrays = {"format_version": np.int64(1), "checkpoint_sha256": np.str_("x"), "names": np.array(["Zuri", "Abeni"]),
              "embeddings": np.eye(2, 8, dtype=np.float32), "labels": np.array([0, 1]),
              "sources": np.array(["z.png", "a.png"]), **changes}
    np.savez(path, **arrays)


@pytest.mark.parametrize("changes, message", [
    ({"names": np.array(["Zuri", "Zuri"])}, "names must be unique"),   # g2: two columns named alike
    ({"format_version": np.int64(3)}, "gallery format 3 is newer than this code reads (2)"),  # g4
    ({"format_version": np.int64(2)}, "corrupt gallery: format 2 needs digests"),
    ({"format_version": np.int64(2), "digests": np.array(["0" * 64])}, "digests must be one string per embedding"),
    # g6: Abeni has no embedding; `nearest` scores one column per label present, so every column after
    # it would carry the next individual's name
    ({"labels": np.array([0, 0])}, "every individual needs an embedding"),
])
def test_galleries_this_code_cannot_read_correctly_are_refused(tmp_path, changes, message):
    _save_arrays(tmp_path / "g.npz", **changes)
    with pytest.raises(GalleryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Gallery.load(tmp_path / "g.npz")


def test_a_photo_enrolled_by_absolute_path_is_recognised_when_given_relative(tmp_path, monkeypatch, capsys):
    """g3: enroll stores resolved paths; the CLI tests only ever pass absolute ones, so comparing the
    paths as given passed too. From the photos' folder, `enroll ... a.png` again must not add it twice."""
    (tmp_path / "a.png").write_bytes(b"x")
    gallery = Gallery.new("0" * 64, 2)
    gallery.add("Zuri", np.array([[1.0, 0.0]]), [str((tmp_path / "a.png").resolve())])
    monkeypatch.chdir(tmp_path)
    todo = list(gallery_cli.not_yet_enrolled(gallery, [(Path("a.png"), "Zuri"), (Path("b.png"), "Zuri")]))
    assert len(todo) == 1 and str((tmp_path / "b.png").resolve()) in todo[0]  # (path as given,) absolute path, name
    assert "already enrolled as Zuri: a.png" in capsys.readouterr().out


def test_an_empty_from_split_root_is_refused(tmp_path, capsys):
    """`--from-split "$DATA" train` with DATA unset read the current folder's prepared data."""
    assert gallery_cli.main(["enroll", "--gallery", str(tmp_path / "g.npz"), "--checkpoint", "m.pt",
                             "--from-split", "", "train"]) == 2
    assert capsys.readouterr().err == "error: --from-split: an empty ROOT (it would mean the current folder)\n"


def test_a_copied_or_moved_photo_is_enrolled_once(learned, unseen, tmp_path, capsys):
    """Photos were recognised by path only: the same folder enrolled again after moving it, or a copy
    of a photo in another individual's folder, was added again (a prototype weighting it twice)."""
    gallery = tmp_path / "g.npz"
    (first, photos), (second, others) = list(unseen.items())[:2]
    assert enroll(gallery, learned.checkpoint, first, *photos[:3]) == 0
    moved = tmp_path / "moved"
    moved.mkdir()
    for photo in photos[:3]:
        shutil.copy2(photo, moved / f"renamed_{photo.name}")
    shutil.copy2(photos[0], tmp_path / "mislabelled.png")
    capsys.readouterr()
    before = gallery.read_bytes()
    assert enroll(gallery, learned.checkpoint, first, moved) == 0
    assert enroll(gallery, learned.checkpoint, second, tmp_path / "mislabelled.png") == 0
    out = capsys.readouterr().out
    assert f"already enrolled as {first}: {moved / f'renamed_{photos[1].name}'} (the same photo as {photos[1]})" in out
    assert f"already enrolled as {first}: {tmp_path / 'mislabelled.png'} (the same photo as {photos[0]})" in out
    assert out.count("(unchanged: nothing enrolled)") == 2 and gallery.read_bytes() == before

    shutil.copy2(others[0], tmp_path / "copy.png")  # one photo given twice in one call: enrolled once
    assert enroll(gallery, learned.checkpoint, second, others[0], tmp_path / "copy.png") == 0
    assert f"{second}: +1 image (new individual, 1 now)" in capsys.readouterr().out
    enrolled = [*photos[:3], others[0]]
    assert Gallery.load(gallery).digests == [hashlib.sha256(p.read_bytes()).hexdigest() for p in enrolled]


def test_a_photo_given_twice_is_not_called_enrolled_when_it_could_not_be_read(learned, unseen, tmp_path, capsys):
    """The second of two copies given in one call was reported `already enrolled as Zuri`, though the
    first, and so the photo, was then skipped as unreadable."""
    gallery, photo = tmp_path / "g.npz", next(iter(unseen.values()))[0]
    for copy in ("bad1.png", "bad2.png"):
        (tmp_path / copy).write_bytes(b"not an image")
    assert enroll(gallery, learned.checkpoint, "Zuri", photo, tmp_path / "bad1.png", tmp_path / "bad2.png") == 1
    out, err = capsys.readouterr()
    assert "already enrolled" not in out
    assert f"given twice: {tmp_path / 'bad2.png'} (the same photo as {tmp_path / 'bad1.png'})" in out
    assert f"skipped {tmp_path / 'bad1.png'}: not an image" in err and Gallery.load(gallery).counts() == {"Zuri": 1}


def test_a_format_1_gallery_is_read_and_learns_the_digests_of_its_photos_still_there(tmp_path, capsys):
    there, gone = tmp_path / "there.png", tmp_path / "gone.png"
    there.write_bytes(b"photo")
    _save_arrays(tmp_path / "g.npz", sources=np.array([str(there), str(gone)]))
    gallery = Gallery.load(tmp_path / "g.npz")
    assert gallery.digests == ["", ""]
    gallery_cli.learn_digests(gallery)
    assert gallery.digests == [hashlib.sha256(b"photo").hexdigest(), ""]
    shutil.copy2(there, tmp_path / "copy.png")
    assert list(gallery_cli.not_yet_enrolled(gallery, [(tmp_path / "copy.png", "Abeni")])) == []
    assert f"already enrolled as Zuri: {tmp_path / 'copy.png'} (the same photo as {there})" in capsys.readouterr().out
    gallery.save(tmp_path / "g.npz")  # now in format 2
    assert Gallery.load(tmp_path / "g.npz").digests == gallery.digests


def test_a_file_that_is_no_gallery_gets_no_lock_file_beside_it(learned, unseen, tmp_path, capsys):
    """`--gallery artifacts/x_best.pt` by mistake was refused, but left `.x_best.pt.lock` beside it."""
    checkpoint, notes = tmp_path / "x_best.pt", tmp_path / "notes.md"
    shutil.copy2(learned.checkpoint, checkpoint)
    notes.write_text("# not a gallery\n")
    photo = next(iter(unseen.values()))[0]
    for wrong in (checkpoint, notes):
        assert enroll(wrong, learned.checkpoint, "Zuri", photo) == 2
        assert gallery_cli.main(["remove", "--gallery", str(wrong), "Zuri"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and "is a PyTorch checkpoint, not a gallery" in err[0] and "not a gallery file" in err[2]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.md", "x_best.pt"]


def test_a_change_reads_the_gallery_once(tmp_path, monkeypatch):
    """The check before the lock reads member names only: reading every array twice cost a second on
    a gallery of 100,000 photos."""
    _save_arrays(tmp_path / "g.npz")
    read = []
    real = gallery_cli.read_member
    monkeypatch.setattr(gallery_cli, "read_member", lambda *args: read.append(args[1].filename) or real(*args))
    assert gallery_cli.main(["remove", "--gallery", str(tmp_path / "g.npz"), "Zuri"]) == 0
    assert sorted(read) == sorted(f"{key}.npy" for key in gallery_cli.FORMAT_1_ARRAYS)


def test_enroll_reads_each_photo_once_and_stores_what_its_path_would_give(learned, unseen, tmp_path, monkeypatch,
                                                                          capsys):
    """Each new photo was read twice, once for its digest and once to decode it; now its bytes serve
    both, a batch at a time (not every file's bytes held until the first batch is embedded)."""
    photos = next(iter(unseen.values()))[:3]
    truncated, copy = tmp_path / "truncated.png", tmp_path / "copy.png"
    truncated.write_bytes(photos[0].read_bytes()[:100])
    shutil.copy2(photos[1], copy)
    inputs = [*photos, truncated, copy]
    events = []
    real_open, real_embed = io.open, Identifier.embed

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            events.append(Path(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)  # Pillow's Image.open
    monkeypatch.setattr(io, "open", counting_open)        # Path.open, Path.read_bytes
    monkeypatch.setattr(Identifier, "embed", lambda self, images: events.append("embed") or real_embed(self, images))
    monkeypatch.setattr(gallery_cli, "DEFAULT_BATCH_SIZE", 2, raising=False)
    assert enroll(tmp_path / "g.npz", learned.checkpoint, "Zuri", *inputs) == 1
    monkeypatch.undo()

    assert [events.count(path) for path in inputs] == [1] * len(inputs)
    assert events.index("embed") < events.index(photos[2])
    out, err = capsys.readouterr()
    assert f"given twice: {copy} (the same photo as {photos[1]})" in out
    assert f"skipped {truncated}: corrupt or truncated image" in err
    gallery = Gallery.load(tmp_path / "g.npz")
    assert gallery.digests == [hashlib.sha256(photo.read_bytes()).hexdigest() for photo in photos]
    expected = [item.embedding for batch in Identifier.embedder(learned.checkpoint).embed(photos) for item in batch]
    np.testing.assert_allclose(gallery.embeddings, np.stack(expected), atol=1e-5)
