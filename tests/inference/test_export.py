"""ONNX and TorchScript exports: parity with PyTorch, dynamic batch, and predict --onnx."""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from src.inference import export, predict
from src.inference.gallery import Gallery
from src.inference.identify import Identifier, InferenceError
from src.training.artifacts import threshold_sidecar_path
from tests.conftest import REPO


@pytest.fixture(scope="module")
def exported(learned, tmp_path_factory):
    """The command line's output folder and the JSON it wrote beside the .onnx file."""
    out = tmp_path_factory.mktemp("exported")
    assert export.main(["--checkpoint", str(learned.checkpoint), "--out", str(out), "--runs", "3"]) == 0
    return out, json.loads((out / "learned_best.json").read_text())


def test_exports_match_pytorch_on_stand_in_images(exported):
    out, info = exported
    checks = info["checks"]
    assert sorted(p.name for p in out.iterdir()) == ["learned_best.json", "learned_best.onnx",
                                                     "learned_best.torchscript.pt"]
    for name in ("onnx", "torchscript"):
        assert checks["max_abs_diff"][name]["embeddings"] < 1e-4
        assert checks["max_abs_diff"][name]["logits"] < 1e-4
    assert checks["check_images"] > checks["traced_batch"]  # the dynamic batch axis was exercised
    assert all(ms > 0 for ms in checks["latency_ms_per_image"].values())
    assert len(info["model"]["classes"]) == 16 and info["thresholds"]["values"] == {}  # not evaluated
    assert info["onnx_sha256"] == hashlib.sha256((out / "learned_best.onnx").read_bytes()).hexdigest()


def test_predict_from_onnx_matches_the_checkpoint(learned, exported, unseen):
    out, _ = exported
    photos = [p for ps in unseen.values() for p in ps[:2]]
    from_checkpoint = Identifier.from_checkpoint(learned.checkpoint).identify(photos, top_k=3)
    from_onnx = Identifier.from_onnx(out / "learned_best.onnx").identify(photos, top_k=3, batch_size=5)
    assert [p.names for p in from_onnx] == [p.names for p in from_checkpoint]
    assert np.allclose([p.scores for p in from_onnx], [p.scores for p in from_checkpoint], atol=1e-5)

    onnx = Identifier.from_onnx(out / "learned_best.onnx")
    gallery = Gallery.new(onnx.info.checkpoint_sha256, 64)  # the checkpoint's sha256 travels with the export
    for name, paths in unseen.items():
        embedded = [item.embedding for batch in onnx.embed(paths[:3]) for item in batch]
        gallery.add(name, np.stack(embedded), [str(p) for p in paths[:3]])
    with_gallery = Identifier.from_onnx(out / "learned_best.onnx", gallery=gallery, threshold=0.5)
    assert with_gallery.names == tuple(unseen) and len(with_gallery.identify(photos)) == len(photos)


def test_torchscript_file_runs_alone_at_any_batch_size(learned, exported):
    out, _ = exported
    identifier = Identifier.from_checkpoint(learned.checkpoint)
    images = torch.randn(5, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(out / "learned_best.torchscript.pt"))
    embeddings, logits = loaded(images)
    reference = identifier.backend(images)
    assert embeddings.shape == (5, 64) and torch.allclose(embeddings.norm(dim=1), torch.ones(5), atol=1e-5)
    assert np.abs(embeddings.detach().numpy() - reference[0]).max() < 1e-4
    assert np.abs(logits.detach().numpy() - reference[1]).max() < 1e-4


def test_an_onnx_file_and_a_json_of_other_weights_are_refused(exported, tiny_run, unseen, tmp_path, capsys):
    """Exporting another checkpoint of the same name with `--format torchscript` rewrites the JSON
    beside an .onnx file it did not rewrite: predict --onnx then read the other model's class list
    (an IndexError traceback, or wrong names when the counts agree). Now it is refused."""
    out, _ = exported
    for name in ("learned_best.onnx", "learned_best.json"):
        shutil.copy(out / name, tmp_path)
    other = tmp_path / "retrained" / "learned_best.pt"
    other.parent.mkdir()
    shutil.copy(tiny_run["best"], other)
    assert export.main(["--checkpoint", str(other), "--out", str(tmp_path), "--format", "torchscript",
                        "--runs", "1"]) == 0
    capsys.readouterr()
    photo = next(iter(unseen.values()))[0]
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(photo)]) == 2
    err = capsys.readouterr().err
    assert "was exported from checkpoint sha256" in err and "export again" in err and err.count("\n") == 1, err


def test_export_of_a_bad_checkpoint_exits_2(tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_exits_2_in_one_line(learned, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert export.main(["--checkpoint", str(learned.checkpoint), "--out", str(tmp_path / "a_file"), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'a_file'}: cannot write the export") and err.count("\n") == 1


def test_a_full_disk_during_the_torchscript_write_exits_2_in_one_line(learned, tmp_path, capsys, monkeypatch):
    """torch.jit.save writing to a file aborts the whole process on a full disk (a C++ error thrown in
    a destructor, seen on a 20 MB tmpfs): the export serialises in memory and writes from Python,
    where a full disk is an OSError like any other."""
    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.atomic, "write_bytes", disk_full)
    out = tmp_path / "out"
    assert export.main(["--checkpoint", str(learned.checkpoint), "--out", str(out), "--format", "torchscript",
                        "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {out}: cannot write the export ([Errno 28] No space left on device)\n"
    assert list(out.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line_after_the_export(learned, tmp_path):
    """`export ... > log.txt` on a full disk: the table of checks was an OSError traceback."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "src.inference.export", "--checkpoint", str(learned.checkpoint),
                                 "--out", str(tmp_path), "--format", "torchscript", "--runs", "1"],
                                cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=240)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == "error: cannot write the results to stdout (No space left on device)"
    assert (tmp_path / "learned_best.torchscript.pt").is_file() and (tmp_path / "learned_best.json").is_file()


def test_export_from_python_takes_str_paths_and_checks_its_arguments(learned, tmp_path):
    """`export()` called from a script: str paths like the command line's, defaults for the
    formats and runs, and a one-line InferenceError for arguments the command line would refuse."""
    checks = export.export(str(learned.checkpoint), str(tmp_path / "out"), formats="torchscript", runs=1)
    assert set(checks["files"]) == {"torchscript"}
    assert (tmp_path / "out" / f"{learned.checkpoint.stem}.torchscript.pt").is_file()
    for options, message in [({"formats": ["tflite"]}, "formats must be one or more of"),
                             ({"formats": []}, "formats must be one or more of"),
                             ({"runs": 0}, "runs must be a whole number of at least 1")]:
        with pytest.raises(InferenceError, match=message):
            export.export(learned.checkpoint, tmp_path / "bad", **options)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("output", ["embeddings", "logits"])
def test_a_nan_difference_from_pytorch_fails_the_export(exported, monkeypatch, capsys, fmt, output):
    """Weights that give NaN make every difference NaN, and `nan > tolerance` is False: the export
    printed `nan` and exited 0. Wherever the NaN is, the check now fails (exit 1)."""
    _, info = exported
    checks = json.loads(json.dumps(info["checks"]))
    checks["max_abs_diff"][fmt][output] = float("nan")
    monkeypatch.setattr(export, "export", lambda *_, **__: checks)
    assert export.main(["--checkpoint", "unused.pt", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: the {fmt} export's {output} differ from PyTorch's by nan (> 0.0001); do not use it\n", err


def test_an_export_whose_outputs_drift_from_pytorch_fails(learned, tmp_path, monkeypatch, capsys):
    """The check compares each exported file's own outputs with PyTorch's (near 0 above could as well
    be PyTorch's against themselves)."""
    real_export = export.export_torchscript

    def drifting(*args, **kwargs):
        runner = real_export(*args, **kwargs)
        return lambda images: tuple(output + 0.01 for output in runner(images))

    monkeypatch.setattr(export, "export_torchscript", drifting)
    argv = ["--checkpoint", str(learned.checkpoint), "--out", str(tmp_path), "--format", "torchscript", "--runs", "1"]
    assert export.main(argv) == 1
    assert capsys.readouterr().err == ("error: the torchscript export's embeddings differ from PyTorch's by 1.00e-02 "
                                       "(> 0.0001); do not use it\n")


def edit_classes(model: dict) -> None:
    model["classes"] = model["classes"][:-1]


def edit_image_size(model: dict) -> None:
    model["config"]["data"]["image_size"] = 48


def edit_embedding_dim(model: dict) -> None:
    model["config"]["model"]["embedding_dim"] = 32


def reverse_classes(model):
    model["classes"].reverse()


def rename_a_class(model):
    model["classes"][0] = "Zola"


def edit_backbone(model):
    model["config"]["model"]["backbone"] = "resnet50"


EDITED = "learned_best.json is not the description exported with it (its class names or config were edited)"


@pytest.mark.parametrize("edit, message", [
    (edit_classes, "gives 16 logits per image, but learned_best.json lists 15 classes"),  # was an IndexError
    (edit_image_size, "takes 3 x 32 x 32 images, but learned_best.json says image_size 48"),  # was InvalidArgument
    (edit_embedding_dim, "gives 64-dimensional embeddings, but learned_best.json says embedding_dim 32"),
    # Same counts and sizes as the graph, so the shape check passes: reordered or renamed classes named
    # every photo after another individual, silently.
    (reverse_classes, EDITED), (rename_a_class, EDITED), (edit_backbone, EDITED),
])
def test_an_export_json_edited_by_hand_exits_2_in_one_line(exported, unseen, tmp_path, capsys,
                                                           edit, message):
    out, info = exported
    shutil.copy(out / "learned_best.onnx", tmp_path)
    edited = json.loads(json.dumps(info))
    edit(edited["model"])
    (tmp_path / "learned_best.json").write_text(json.dumps(edited))
    photo = next(iter(unseen.values()))[0]
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(photo)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'learned_best.onnx'}: {message}; export again\n", err


def test_a_class_named_unknown_in_the_export_json_is_refused(exported, unseen, tmp_path, capsys):
    """A prediction of that class read as a rejected photo (the summary and CSV said otherwise)."""
    out, info = exported
    shutil.copy(out / "learned_best.onnx", tmp_path)
    edited = json.loads(json.dumps(info))
    edited["model"]["classes"][4] = "unknown"
    (tmp_path / "learned_best.json").write_text(json.dumps(edited))
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(next(iter(unseen.values()))[0])]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'learned_best.json'}: not a valid export description "
                                       "(ValueError: class name 'unknown' is what inference calls a rejected photo)\n")


@pytest.mark.parametrize("sha256", [None, 123])
def test_a_checkpoint_sha256_edited_into_a_non_string_is_refused_in_one_line(exported, unseen, tmp_path, capsys,
                                                                               sha256):
    """Was a TypeError traceback: the message naming other weights sliced the JSON's value as a string."""
    out, info = exported
    shutil.copy(out / "learned_best.onnx", tmp_path)
    edited = json.loads(json.dumps(info))
    edited["model"]["checkpoint_sha256"] = sha256
    (tmp_path / "learned_best.json").write_text(json.dumps(edited))
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(next(iter(unseen.values()))[0])]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'learned_best.json'}: not a valid export description "
                                       f"(TypeError: checkpoint_sha256 is {sha256!r}, not a string)\n")


@pytest.mark.parametrize("threshold, problem", [
    ("0.5", "TypeError: the classifier threshold is '0.5', not a number"),  # was a TypeError traceback
    ([0.5], "TypeError: the classifier threshold is [0.5], not a number"),
    (10 ** 400, "OverflowError: int too large to convert to float"),
], ids=["quoted", "list", "huge"])
def test_a_hand_edited_threshold_in_the_export_json_exits_2_in_one_line(exported, unseen, tmp_path, capsys,
                                                                         threshold, problem):
    out, info = exported
    shutil.copy(out / "learned_best.onnx", tmp_path)
    edited = json.loads(json.dumps(info))
    edited["thresholds"]["values"]["classifier"] = threshold
    (tmp_path / "learned_best.json").write_text(json.dumps(edited))
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(next(iter(unseen.values()))[0])]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'learned_best.json'}: not a valid export description ({problem})\n", err


HUGE = "x" * 10_000_000  # a crafted JSON value: was quoted whole, a 10 MB error line


def _set_format_version(info):
    info["format_version"] = HUGE


def _set_threshold(info):
    info["thresholds"]["values"]["classifier"] = HUGE


def _add_threshold_kind(info):
    info["thresholds"]["values"][HUGE] = "0.5"


def _set_checkpoint_sha256(info):
    info["model"]["checkpoint_sha256"] = [HUGE]


def _set_class_name(info):
    info["model"]["classes"][0] = f"a {HUGE}"


def _add_config_key(info):
    info["model"]["config"]["model"][HUGE] = 1


def _set_origin_and_threshold(info):  # the origin heads the message about a threshold out of range
    info["thresholds"]["origin"] = HUGE
    info["thresholds"]["values"]["classifier"] = 5


@pytest.mark.parametrize("edit", [_set_format_version, _set_threshold, _add_threshold_kind, _set_checkpoint_sha256,
                                  _set_class_name, _add_config_key, _set_origin_and_threshold])
def test_a_huge_value_in_the_export_json_is_clipped_in_the_error_line(exported, unseen, tmp_path, capsys, edit):
    out, info = exported
    shutil.copy(out / "learned_best.onnx", tmp_path)
    edited = json.loads(json.dumps(info))
    edit(edited)
    (tmp_path / "learned_best.json").write_text(json.dumps(edited))
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(next(iter(unseen.values()))[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "xxx..." in err, err[:300]
    assert len(err) < len(str(tmp_path)) + 600, err[:300]


def test_an_onnx_graph_without_the_outputs_predict_reads_exits_2_in_one_line(exported, tmp_path, capsys):
    import onnx

    out, _ = exported
    shutil.copy(out / "learned_best.json", tmp_path)
    model = onnx.load(str(out / "learned_best.onnx"))
    for node in model.graph.node:  # "logits" renamed, its metadata (the checkpoint's sha256) kept
        node.output[:] = ["scores" if name == "logits" else name for name in node.output]
    model.graph.output[1].name = "scores"
    onnx.save(model, str(tmp_path / "learned_best.onnx"))
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), "x.png"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'learned_best.onnx'}: the graph has no logits (not "
                                       "written by export); export again\n")


def test_the_thresholds_evaluation_stored_travel_with_the_export(learned, tmp_path):
    """An export must reject unknown photos as its checkpoint does: the stored thresholds go into its JSON."""
    checkpoint = tmp_path / "learned_best.pt"
    shutil.copyfile(learned.checkpoint, checkpoint)
    thresholds = {"classifier": 0.25, "nearest": 0.5, "prototype": 0.45}
    threshold_sidecar_path(checkpoint).write_text(json.dumps({
        "thresholds": thresholds, "method": "by hand", "split": "val",
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}))
    assert Identifier.from_checkpoint(checkpoint).threshold.value == 0.25
    export.export(checkpoint, tmp_path / "out", ["onnx"], runs=1)
    info = json.loads((tmp_path / "out" / "learned_best.json").read_text())
    assert info["thresholds"]["values"] == thresholds
    assert Identifier.from_onnx(tmp_path / "out" / "learned_best.onnx").threshold.value == 0.25
    info = Identifier.embedder(checkpoint).info  # with a gallery, the match mode's own threshold
    gallery = Gallery.new(info.checkpoint_sha256, info.config.model.embedding_dim)
    gallery.add("Zuri", np.ones((1, info.config.model.embedding_dim)), ["z1.png"])
    for match in ("nearest", "prototype"):
        onnx = Identifier.from_onnx(tmp_path / "out" / "learned_best.onnx", gallery=gallery, match=match)
        assert onnx.threshold.value == thresholds[match]


def test_predict_onnx_notes_thresholds_evaluation_stored_after_the_export(learned, unseen, tmp_path, capsys):
    """The export keeps the thresholds of export time; re-evaluating the checkpoint afterwards changed
    what the checkpoint rejected while the export went on with the old threshold without a word."""
    checkpoint = tmp_path / "learned_best.pt"
    shutil.copyfile(learned.checkpoint, checkpoint)
    sidecar = threshold_sidecar_path(checkpoint)
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    def evaluate(thresholds, weights=sha256):
        sidecar.write_text(json.dumps({"thresholds": thresholds, "method": "m", "checkpoint_sha256": weights}))

    evaluate({"classifier": 0.25, "nearest": 0.5, "prototype": 0.45})
    export.export(checkpoint, tmp_path / "out", ["onnx"], runs=1)
    onnx = tmp_path / "out" / "learned_best.onnx"
    assert "note" not in Identifier.from_onnx(onnx).describe()
    evaluate({"classifier": 0.25, "nearest": 0.6, "prototype": 0.45})  # re-evaluated: only nearest moved
    assert "note" not in Identifier.from_onnx(onnx).describe()
    gallery = Gallery.new(sha256, Identifier.embedder(checkpoint).info.config.model.embedding_dim)
    gallery.add("Zuri", np.ones((1, gallery.embeddings.shape[1])), ["z1.png"])
    nearest = Identifier.from_onnx(onnx, gallery=gallery, match="nearest")
    assert nearest.threshold.value == 0.5  # still the export's own, as documented
    assert nearest.threshold.origin.endswith(f"; note: evaluation has since stored the nearest threshold 0.6 in "
                                             f"{sidecar}: export again to use it")
    evaluate({"classifier": 0.3, "nearest": 0.6, "prototype": 0.45})
    assert predict.main(["--onnx", str(onnx), str(next(iter(unseen.values()))[0])]) == 0
    assert "unknown below 0.25 (stored in learned_best.pt.threshold.json: m; note: evaluation has since stored the " \
           f"classifier threshold 0.3 in {sidecar}: export again to use it)" in capsys.readouterr().err
    assert "note" not in Identifier.from_onnx(onnx, threshold=0.1).describe()  # --threshold overrides both
    evaluate({"classifier": 0.3}, weights="0" * 64)  # for other weights (training replaced the checkpoint)
    assert "note" not in Identifier.from_onnx(onnx).describe()
    sidecar.write_text("{damaged")  # says nothing about the export's own copy
    assert Identifier.from_onnx(onnx).threshold.value == 0.25


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_an_export_stopped_midway_leaves_the_earlier_export_whole(exported, tiny_run, unseen, tmp_path, capsys,
                                                                   monkeypatch, stop):
    """Ctrl-C during the latency runs (the longest part), or a full disk when the JSON is written,
    after the .onnx of another checkpoint of the same name had replaced the earlier one: the earlier
    JSON then described other weights and predict --onnx refused the earlier export, which was lost."""
    out, _ = exported
    for name in ("learned_best.onnx", "learned_best.torchscript.pt", "learned_best.json"):
        shutil.copy(out / name, tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    other = tmp_path / "retrained" / "learned_best.pt"
    other.parent.mkdir()
    shutil.copy(tiny_run["best"], other)

    def interrupted(*args, **kwargs):
        raise stop

    if isinstance(stop, OSError):
        monkeypatch.setattr(export.atomic, "write_text", interrupted)
    else:
        monkeypatch.setattr(export, "median_latency_ms", interrupted)
    if isinstance(stop, OSError):
        assert export.main(["--checkpoint", str(other), "--out", str(tmp_path), "--runs", "1"]) == 2
        assert "cannot write the export" in capsys.readouterr().err
    else:
        with pytest.raises(KeyboardInterrupt):
            export.export(other, tmp_path, runs=1)
    monkeypatch.undo()
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    assert after == before  # nothing replaced, no staged file left behind
    capsys.readouterr()
    photo = next(iter(unseen.values()))[0]
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(photo)]) == 0


def test_an_onnx_file_exported_without_the_description_check_is_refused(exported, unseen, tmp_path, capsys):
    import onnx

    out, _ = exported
    shutil.copy(out / "learned_best.json", tmp_path)
    model = onnx.load(str(out / "learned_best.onnx"))
    kept = [prop for prop in model.metadata_props if prop.key == "checkpoint_sha256"]  # as exports were before
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "learned_best.onnx"))
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(next(iter(unseen.values()))[0])]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'learned_best.onnx'}: does not record the checkpoint "
                                       "and description it was exported with (an older export); export it again\n")


def test_a_damaged_onnx_file_that_still_loads_exits_2_in_one_line(exported, unseen, tmp_path, capsys):
    """Its metadata and shapes intact, its weights not: it ran and named photos from garbage scores."""
    import onnx

    out, _ = exported
    shutil.copy(out / "learned_best.json", tmp_path)
    model = onnx.load(str(out / "learned_best.onnx"))
    weights = max(model.graph.initializer, key=lambda tensor: len(tensor.raw_data))
    weights.raw_data = bytes(len(weights.raw_data))  # zeroed, as a damaged block of the file reads
    onnx.save(model, str(tmp_path / "learned_best.onnx"))
    assert predict.main(["--onnx", str(tmp_path / "learned_best.onnx"), str(next(iter(unseen.values()))[0])]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'learned_best.onnx'}: not the file learned_best.json "
                                       "was exported with (its sha256 differs: a damaged or altered copy); copy or "
                                       "export it again\n")


def test_the_exported_recipe_alone_gives_predicts_embeddings(exported, unseen):
    """Someone running the .onnx file without this project follows the JSON's `preprocessing` with
    PIL and NumPy, and gets the embeddings predict --onnx computes. The recipe names the one resize
    call that does it: "take the centre square; resize it", followed as crop then resize, gave other
    pixels along the square's edges (PIL's filter reads beyond a resize box)."""
    import onnxruntime
    from PIL import Image, ImageOps

    out, info = exported
    recipe = info["preprocessing"]
    photos = [paths[0] for paths in unseen.values()]
    inputs = []
    for path in photos:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) / 2, (image.height - side) / 2
        square = image.resize((recipe["resize"],) * 2, Image.Resampling.BICUBIC,
                              box=(left, top, left + side, top + side))
        start, end = recipe["crop_offset"], recipe["crop_offset"] + recipe["crop"]
        pixels = np.asarray(square, dtype=np.float32)[start:end, start:end] / 255
        inputs.append(((pixels - recipe["mean"]) / recipe["std"]).transpose(2, 0, 1))
    session = onnxruntime.InferenceSession(str(out / "learned_best.onnx"), providers=["CPUExecutionProvider"])
    embeddings, _ = session.run(None, {"images": np.stack(inputs).astype(np.float32)})
    expected = [item.embedding for batch in Identifier.from_onnx(out / "learned_best.onnx").embed(photos)
                for item in batch]
    assert recipe["crop"] == info["model"]["config"]["data"]["image_size"]
    assert "Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))" in recipe["recipe"]
    assert np.abs(embeddings - np.stack(expected)).max() < 1e-5
