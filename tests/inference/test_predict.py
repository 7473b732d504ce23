"""The predict command line: bad input skipped with reasons, exit codes, table, CSV and JSON."""
from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from src.data.io import MAX_PIXELS
from src.data.lists import REJECTED_NAME
from src.inference import export, gallery, predict
from tests.conftest import REPO, main_in_process


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height but holds almost no pixel data: enough to trip the pixel
    limit, which is checked before anything is decoded (so the test allocates nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


@pytest.fixture
def mixed_folder(unseen, tmp_path) -> tuple[Path, Path]:
    """A folder holding a valid photo, a truncated PNG and a text file; returns (folder, valid)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    valid = Path(shutil.copy(next(iter(unseen.values()))[0], folder / "valid.png"))
    (folder / "corrupt.png").write_bytes(valid.read_bytes()[:150])
    (folder / "notes.txt").write_text("field notes, not a photo\n")
    return folder, valid


def test_cli_on_a_folder_with_a_corrupt_png_and_a_text_file(learned, mixed_folder, tmp_path):
    """As a user runs it: `python -m`, a subprocess, no terminal (so no progress bar). In a folder the
    text file is no image by its name (a camera's sidecar file must not make every run fail); named
    on its own, it is decoded and skipped."""
    folder, valid = mixed_folder
    result = subprocess.run([sys.executable, "-m", "src.inference.predict", "--checkpoint", str(learned.checkpoint),
                             str(folder), "--top-k", "3", "--output", str(tmp_path / "out.csv")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["image", "prediction", "score"] and len(table) == 2
    assert table[1].startswith(str(valid))
    assert f"skipped {folder / 'corrupt.png'}: corrupt or truncated image" in result.stderr
    assert f"skipped {folder / 'notes.txt'}" not in result.stderr and "\r" not in result.stderr
    assert (f"1 identified, 0 unknown, 1 skipped (1 file not named as images left out: {folder / 'notes.txt'}); "
            in result.stderr)
    assert "no unknown rejection" in result.stderr
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    assert rows[str(valid)]["prediction"] == rows[str(valid)]["name_1"] and rows[str(valid)]["skipped"] == ""
    assert list(rows) == [str(folder / "corrupt.png"), str(valid)]


def test_a_text_file_named_on_its_own_is_skipped(learned, mixed_folder, capsys):
    folder, valid = mixed_folder
    assert predict.main(["--checkpoint", str(learned.checkpoint), str(folder / "notes.txt"), str(valid)]) == 1
    err = capsys.readouterr().err
    assert f"skipped {folder / 'notes.txt'}: not an image in a known format" in err
    assert "1 identified, 0 unknown, 1 skipped; " in err


def test_json_output_and_inputs_that_name_nothing(learned, mixed_folder, tmp_path, capsys):
    folder, valid = mixed_folder
    (tmp_path / "empty").mkdir()
    png_header_only(folder / "huge.png", 8_500, 8_500)  # 72 Mpx: over MAX_PIXELS, under PIL's own limit
    argv = ["--checkpoint", str(learned.checkpoint), str(valid), str(tmp_path / "empty"), str(tmp_path / "missing.jpg"),
            str(tmp_path / "*.nothing"), str(folder / "huge.png"), "--threshold", "0.0", "--output",
            str(tmp_path / "out.json")]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert "empty folder" in err and "file not found" in err and "no file matches" in err
    assert f"exceeds the {MAX_PIXELS:,}-pixel limit" in err
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["threshold"] == 0.0 and report["threshold_origin"] == "--threshold"
    [done] = [r for r in report["results"] if "prediction" in r]
    assert done["image"] == str(valid) and not done["unknown"] and len(done["top_k"]) == 5
    assert len([r for r in report["results"] if "skipped" in r]) == 4


def test_all_readable_inputs_exit_0_and_globs_expand(learned, unseen, capsys):
    photos = next(iter(unseen.values()))
    assert predict.main(["--checkpoint", str(learned.checkpoint), str(photos[0].parent / "unseen_*_1.png")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(unseen)


@pytest.mark.parametrize("argv, needle", [
    (["--checkpoint", "{tmp}/missing.pt", "x.png"], "checkpoint file not found"),
    (["--checkpoint", "{tmp}/text.pt", "x.png"], "text.pt: not a PyTorch checkpoint"),
    (["--onnx", "{tmp}/missing.onnx", "x.png"], "missing.json not found"),
    (["--onnx", "{tmp}", "x.png"], "a folder; give the <name>.onnx that export wrote"),  # was "<tmp>.json not found"
    (["--onnx", "{tmp}/text.pt", "x.png"], "text.pt: not an .onnx file"),
    (["--checkpoint", "{checkpoint}", "--gallery", "{tmp}/text.pt", "x.png"], "not a gallery file"),
    # scores are cosines or probabilities: 1.5 rejected every photo without a word
    (["--checkpoint", "{checkpoint}", "--threshold", "1.5", "x.png"], "--threshold 1.5 is outside -1..1"),
    (["--checkpoint", "{checkpoint}", "--threshold", "-2", "x.png"], "--threshold -2.0 is outside -1..1"),
])
def test_unusable_models_and_galleries_exit_2(learned, tmp_path, capsys, argv, needle):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    argv = [a.format(tmp=tmp_path, checkpoint=learned.checkpoint) for a in argv]
    assert predict.main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--output", "out.txt"], "--output must end in .csv or .json, not 'out.txt'"),
    (["--top-k", "0"], "--top-k and --batch-size must be at least 1"),
    (["--batch-size", "0"], "--top-k and --batch-size must be at least 1"),
    ([], "the following arguments are required: inputs"),
    (["--match", "nearest"], "--match chooses how a gallery is matched; it needs --gallery"),  # else ignored
])
def test_bad_options_exit_2(learned, capsys, argv, message):
    assert predict.main(["--checkpoint", str(learned.checkpoint), "x.png", *argv][: None if argv else 2]) == 2
    assert capsys.readouterr().err == f"error: {message} (see python -m src.inference.predict --help)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(learned, capsys):
    assert predict.main(["--checkpoint", str(learned.checkpoint), "--device", "cuda", "x.png"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_checkpoint_with_an_unusable_class_list_exits_2_in_one_line(learned, tmp_path, capsys):
    state = torch.load(learned.checkpoint, weights_only=True)
    torch.save({**state, "classes": ["Zuri Two", *state["classes"][1:]]}, tmp_path / "renamed.pt")
    assert predict.main(["--checkpoint", str(tmp_path / "renamed.pt"), "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'renamed.pt'}: the config or class list stored in the checkpoint "
                          "is invalid (class name 'Zuri Two'") and err.count("\n") == 1, err


def test_an_output_that_cannot_be_written_exits_2_in_one_line_before_any_work(learned, unseen, tmp_path, capsys):
    """A file where the output's folder should be was found only after every photo was identified."""
    (tmp_path / "a_file").write_text("not a folder")
    photo = next(iter(unseen.values()))[0]
    for output in (tmp_path / "a_file" / "out.csv", tmp_path / "a_file" / "sub" / "out.json"):
        code = predict.main(["--checkpoint", str(learned.checkpoint), str(photo), "--output", str(output)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"error: --output {output}: cannot write it ([Errno 20] a file, not a folder: "
                              f"'{tmp_path / 'a_file'}')"), err


def test_an_output_in_a_folder_that_cannot_be_searched_exits_2_in_one_line(learned, unseen, tmp_path, capsys,
                                                                          unsearchable):
    """Path.exists raised PermissionError: a traceback."""
    locked = unsearchable(tmp_path / "locked")
    code = predict.main(["--checkpoint", str(learned.checkpoint), str(next(iter(unseen.values()))[0]),
                         "--output", str(locked / "out.csv")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: --output {locked / 'out.csv'}: cannot write it ([Errno 13] Permission denied"), err


def test_a_path_too_long_to_look_up_is_skipped_on_a_terminal_too(learned, unseen, monkeypatch, capsys):
    """On a terminal, the progress bar's check for folders among the inputs raised OSError for a name over
    255 bytes: a traceback, where the same input in a log or a pipe is skipped as not a usable path."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    too_long = "a" * 300 + ".png"
    assert predict.main(["--checkpoint", str(learned.checkpoint), str(next(iter(unseen.values()))[0]), too_long]) == 1
    assert f"skipped {too_long}: not a usable path (File name too long)" in capsys.readouterr().err


def test_an_image_above_pillows_own_limit_is_skipped_as_too_large(learned, tmp_path, capsys):
    png_header_only(tmp_path / "huge.png", 20_000, 20_000)  # 400 Mpx: Pillow refuses it when opening
    assert predict.main(["--checkpoint", str(learned.checkpoint), str(tmp_path / "huge.png")]) == 1
    assert f"huge.png: exceeds the {MAX_PIXELS:,}-pixel limit" in capsys.readouterr().err


def test_results_follow_the_order_of_the_inputs(learned, unseen, tmp_path, capsys):
    """A missing file between two photos is reported in its place, not first: the CSV rows line up
    with the command line (and a photo named twice is identified once)."""
    first, second = next(iter(unseen.values()))[:2]
    out = tmp_path / "out.csv"
    argv = ["--checkpoint", str(learned.checkpoint), str(first), str(tmp_path / "missing.png"), str(second),
            str(first), "--top-k", "1", "--output", str(out)]
    assert predict.main(argv) == 1
    capsys.readouterr()
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == [str(first), str(tmp_path / "missing.png"), str(second)]
    assert [bool(row["skipped"]) for row in rows] == [False, True, False]
    with out.open(newline="") as handle:
        assert {len(line) for line in csv.reader(handle)} == {7}  # a skipped row as wide as the rest


def test_a_pattern_searches_the_folders_it_matches_and_skips_keep_their_place(learned, unseen, tmp_path, capsys):
    """`photos/day*` matching folders found nothing ("no file matches"), while `photos/day1` was
    searched; a broken link in a folder came before all the photos, not between them."""
    photo = next(iter(unseen.values()))[0]
    folder = tmp_path / "trip" / "day1"
    folder.mkdir(parents=True)
    for name in ("a.png", "c.png"):
        shutil.copy(photo, folder / name)
    (folder / "b.png").symlink_to(tmp_path / "deleted.png")
    out = tmp_path / "out.csv"
    argv = ["--checkpoint", str(learned.checkpoint), str(tmp_path / "trip" / "day*"), str(folder / "a.png"),
            "--threshold", "1.0", "--top-k", "1", "--output", str(out)]  # no score reaches 1.0: all unknown
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == [str(folder / name) for name in ("a.png", "b.png", "c.png")]
    assert "0 identified, 2 unknown, 1 skipped (1 repeated input counted once)" in err


def test_a_file_name_that_is_not_utf8_is_shown_and_written(learned, unseen, tmp_path, capsys):
    """Photos copied from an old camera or a Latin-1 archive: the name's odd byte must stop neither
    the table on a strict UTF-8 stdout nor the CSV (both raised UnicodeEncodeError, the CSV after
    truncating the previous results), and the CSV row must still name the file. The output goes
    into a folder that does not exist yet. Enrolling the file twice names it too."""
    try:
        odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png"))
        shutil.copy(next(iter(unseen.values()))[0], odd)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "new" / "out.csv"
    assert predict.main(["--checkpoint", str(learned.checkpoint), str(odd), "--output", str(out)]) == 0
    assert f"{tmp_path}/caf\ufffd.png" in capsys.readouterr().out
    [row] = out.read_bytes().splitlines()[1:]
    assert row.startswith(os.fsencode(odd) + b",")
    enroll = ["enroll", "--gallery", str(tmp_path / "g.npz"), "--checkpoint", str(learned.checkpoint),
              "--name", "Zuri", str(odd)]
    assert gallery.main(enroll) == 0 and gallery.main(enroll) == 0
    assert f"already enrolled as Zuri: {tmp_path}/caf\ufffd.png" in capsys.readouterr().out


def test_control_characters_in_file_names_are_shown_escaped_and_written_as_they_are(learned, unseen, tmp_path,
                                                                                    capsys):
    """A newline in a photo's name split its row of the table in two, and a terminal escape in one was
    replayed by the terminal; the CSV keeps the names as they are, so that they still name the files."""
    photo = next(iter(unseen.values()))[0]
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("two\nlines.png", "red\x1b[31m.png"):
        shutil.copy(photo, folder / name)
    (folder / "text\u202egnp.png").write_text("not a photo")
    out = tmp_path / "out.csv"
    assert predict.main(["--checkpoint", str(learned.checkpoint), str(folder), "--output", str(out)]) == 1
    table, err = capsys.readouterr()
    assert [line.split()[0] for line in table.splitlines()] == [
        "image", f"{folder}/red\\x1b[31m.png", f"{folder}/two\\nlines.png"]
    assert f"skipped {folder}/text\\u202egnp.png: not an image" in err
    assert "\x1b" not in err + table and "\u202e" not in err
    with open(out, newline="") as handle:
        written = [row[0] for row in csv.reader(handle)][1:]
    assert written == [str(folder / name) for name in ("red\x1b[31m.png", "text\u202egnp.png", "two\nlines.png")]


def test_a_reader_that_stops_early_does_not_stop_the_run(learned, unseen, tmp_path):
    """`predict ... | head`: the closed pipe ends the table, not the run; --output is still written."""
    out = tmp_path / "out.json"
    process = subprocess.Popen([sys.executable, "-m", "src.inference.predict", "--checkpoint", str(learned.checkpoint),
                                str(next(iter(unseen.values()))[0].parent), "--output", str(out)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the table is printed: the model takes seconds to load
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0, err
    assert "Traceback" not in err and len(json.loads(out.read_text())["results"]) == 60


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_and_a_broken_link_in_a_folder_are_reported_as_skipped(learned, mixed_folder, tmp_path, capsys):
    """Before, both were left out of the results without a word (exit 0 with only valid.png)."""
    folder, valid = mixed_folder
    for name in ("corrupt.png", "notes.txt"):
        (folder / name).unlink()
    os.mkfifo(folder / "fifo.png")
    (folder / "link.png").symlink_to(tmp_path / "deleted.png")
    assert predict.main(["--checkpoint", str(learned.checkpoint), str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"skipped {folder / 'fifo.png'}: not a regular file" in err
    assert f"skipped {folder / 'link.png'}: broken link" in err and "1 identified, 0 unknown, 2 skipped" in err


@pytest.mark.parametrize("threshold, unknown", [("0.0", False), ("1.0", True)])
def test_csv_and_json_outputs_carry_the_best_score_and_the_unknown_flag(learned, unseen, tmp_path, capsys,
                                                                        threshold, unknown):
    photos = [str(p) for ps in unseen.values() for p in ps[:1]][:3]
    for suffix in (".csv", ".json"):
        out = tmp_path / f"out{suffix}"
        predict.main(["--checkpoint", str(learned.checkpoint), *photos, "--top-k", "3", "--threshold", threshold,
                      "--output", str(out)])
        table = capsys.readouterr().out.splitlines()[1:]  # an unknown photo's prediction says so, not its best match
        assert [line.split()[1] == "unknown" for line in table] == [unknown] * 3
        if suffix == ".csv":
            with open(out, newline="") as handle:
                rows = list(csv.DictReader(handle))
            assert [row["unknown"] for row in rows] == [str(unknown)] * 3
            assert [row["prediction"] for row in rows] == [REJECTED_NAME if unknown else row["name_1"] for row in rows]
            assert all(row["score"] == row["score_1"] and float(row["score_1"]) >= float(row["score_3"])
                       for row in rows)
        else:
            results = json.loads(out.read_text())["results"]
            assert [r["unknown"] for r in results] == [unknown] * 3
            assert [r["prediction"] for r in results] == [REJECTED_NAME if unknown else r["top_k"][0]["name"]
                                                          for r in results]
            assert all(r["score"] == r["top_k"][0]["score"] == max(t["score"] for t in r["top_k"]) for r in results)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_table_that_cannot_be_written_still_leaves_the_output_file(learned, unseen, tmp_path):
    """`predict ... --output r.csv > table.txt` on a full disk: the table's failure was a traceback, and
    then an exit before r.csv was written; it is one line, after the file."""
    photo = next(iter(unseen.values()))[0]
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "src.inference.predict", "--checkpoint", str(learned.checkpoint),
                                 str(photo), "--output", str(tmp_path / "r.csv")],
                                cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=240)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "error: cannot write the results to stdout (No space left on device)"
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 2  # header and the photo's row


@pytest.mark.parametrize("name, content", [
    ("x_best.json", '{"format_version": 1, "model": {}, "thresholds": {}, "checks": {}}\n'),  # an export's description
    ("prepared.json", '{"raw_dir": "/data/raw", "min_images": 10, "seed": 0}\n'),
    ("x_metrics.csv", "epoch,lr,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5\n1,0.1,2,0,0,2,0,0\n"),
    ("notes.json", "not json at all"),
])
def test_an_output_that_is_not_an_earlier_result_is_refused_before_any_work(learned, unseen, tmp_path, capsys, caplog,
                                                                           name, content):
    """`--output exported/x_best.json` (or prepared.json, metadata.csv, a metrics CSV): a mistyped path
    silently replaced that file with the results, destroying an export or a prepared dataset."""
    target = tmp_path / name
    target.write_text(content)
    photo = next(iter(unseen.values()))[0]
    # In this process: the refusal is main's (the tests above run the real command line).
    result = main_in_process(predict.main, ["--checkpoint", str(learned.checkpoint), str(photo), "--output",
                                            str(target)], capsys, caplog)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: --output {target}: exists and is not a result of predict"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert target.read_text() == content


def test_an_earlier_result_is_replaced_and_a_folder_refused(learned, unseen, tmp_path, capsys):
    photo = next(iter(unseen.values()))[0]
    for name in ("r.csv", "r.json"):
        out = tmp_path / name
        argv = ["--checkpoint", str(learned.checkpoint), str(photo), "--output", str(out)]
        assert predict.main(argv) == 0
        first = out.read_bytes()
        assert predict.main([*argv, "--top-k", "2"]) == 0  # a result of predict: replaced
        assert out.read_bytes() != first
    (tmp_path / "folder.csv").mkdir()
    assert predict.main(["--checkpoint", str(learned.checkpoint), str(photo), "--output",
                         str(tmp_path / "folder.csv")]) == 2
    assert "is a folder" in capsys.readouterr().err


TOO_LONG = "x" * 300  # a file name longer than the file system allows (255 bytes)


@pytest.mark.parametrize("command, argv", [
    (predict.main, ["--checkpoint", f"{TOO_LONG}.pt", "a.png"]),
    (predict.main, ["--onnx", f"{TOO_LONG}.onnx", "a.png"]),
    (predict.main, ["--checkpoint", "x.pt", "--gallery", f"{TOO_LONG}.npz", "a.png"]),
    (gallery.main, ["list", "--gallery", f"{TOO_LONG}.npz"]),
    (gallery.main, ["enroll", "--gallery", "g.npz", "--checkpoint", f"{TOO_LONG}.pt", "--name", "Zuri", "a.png"]),
    (export.main, ["--checkpoint", f"{TOO_LONG}.pt", "--out", "exported"]),
], ids=["predict-checkpoint", "predict-onnx", "predict-gallery", "gallery-list", "enroll-checkpoint", "export"])
def test_a_model_or_gallery_path_the_file_system_refuses_exits_2_in_one_line(tmp_path, monkeypatch, capsys,
                                                                             command, argv):
    """Path.is_file and is_dir raise, rather than answer False, for a name over 255 bytes: each
    command stopped with an OSError traceback."""
    monkeypatch.chdir(tmp_path)
    assert command(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    # a checkpoint's lookup is refused by safe_torch_load itself, the other paths' by the OSError caught
    assert err.startswith("error: ") and "File name too long" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing made: no lock file, no export folder
