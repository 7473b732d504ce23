"""The evaluation command end to end on the tiny stand-in run: report, figures, threshold, bad input."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src import locks
from src.config import Config, load_config
from src.data.dataset import PREPARE_LOCK, ClassIndex, PreparedData, data_fingerprint
from src.evaluation import evaluate
from src.evaluation.evaluate import EmbeddedSplit, data_warnings, open_set_section, threshold_section
from src.evaluation.report import confusion_csv, render_markdown, rounded, trained_for
from src.inference.gallery import Gallery
from src.inference.identify import Embedded, Identifier, ModelInfo, Threshold
from src.models.factory import IdentificationModel, create_model
from src.models.scoring import SCORE_KINDS
from src.training.artifacts import threshold_sidecar_path
from src.models import trained
from src.models.trained import load_checkpoint
from src.training.checkpoint import atomic_save
from src.training.resume import RunState
from src.training.train import checkpoint_dict
from tests.conftest import REPO, arithmetic_flags, write_config
from tests.evaluation.test_curves import refuse_to_open

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_KEYS = {"report_version", "checkpoint", "data", "closed_set", "retrieval", "by_source", "open_set",
               "threshold", "warnings", "figures"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.evaluation.evaluate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)


def run_main(capsys, *args) -> tuple[int, list[str]]:
    code = evaluate.main([*map(str, args), "--device", "cpu"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def checkpoint(tiny_run, tmp_path_factory) -> Path:
    """tiny_run's best checkpoint and metrics CSV in a folder of their own, where the sidecar goes."""
    folder = tmp_path_factory.mktemp("checkpoint")
    for key in ("best", "metrics"):
        shutil.copy2(tiny_run[key], folder)
    return folder / tiny_run["best"].name


@pytest.fixture(scope="module")
def closed_report(checkpoint, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("eval") / "tiny_test"
    result = evaluate_cli("--checkpoint", checkpoint, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line_after_the_report(checkpoint, tmp_path):
    """`evaluate ... > summary.txt` on a full disk: printing the summary was an OSError traceback."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "src.evaluation.evaluate", "--checkpoint", str(checkpoint),
                                 "--out", str(tmp_path / "eval"), "--device", "cpu"],
                                cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=240)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == "error: cannot write the results to stdout (No space left on device)"
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["closed_set"]["top1"] >= 0


def unit_values(report: dict):
    """Every number that must lie in [0, 1]: the metrics of every section."""
    closed, retrieval = report["closed_set"], report["retrieval"]
    yield from (closed[k] for k in ("top1", "top5", "balanced_accuracy", "macro_f1"))
    yield from (row["accuracy"] for row in closed["per_individual"])
    yield from (retrieval["one_nn_accuracy"], retrieval["map_at_r"], *retrieval["cmc"])
    for row in report["by_source"].values():
        yield from (row[k] for k in ("top1", "top5", "balanced_accuracy", "macro_f1", "one_nn_accuracy", "map_at_r"))
    if report["open_set"]["evaluated"]:
        yield from (report["open_set"][k] for k in ("auroc", "baks", "baus", "balanced_mean"))


def test_a_checkpoint_path_the_system_cannot_look_up_is_one_line(capsys):
    """A name over 255 bytes (or a folder this user cannot search): Path.is_dir raised in safe_torch_load,
    a traceback here and in training's --resume (inference caught the OSError itself)."""
    too_long = "a" * 300 + ".pt"
    assert run_main(capsys, "--checkpoint", too_long) == (
        2, [f"error: {too_long}: not a usable checkpoint path (File name too long)"])


def test_report_keys_and_value_ranges(closed_report, tiny_run):
    out, result = closed_report
    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    assert all(0.0 <= value <= 1.0 for value in unit_values(report))
    closed, retrieval = report["closed_set"], report["retrieval"]
    assert closed["top1"] <= closed["top5"]
    assert len(retrieval["cmc"]) == 10 and retrieval["cmc"] == sorted(retrieval["cmc"])
    assert retrieval["cmc"][0] == pytest.approx(retrieval["one_nn_accuracy"])
    data = PreparedData.load(tiny_run["data_root"])
    test_rows = data.split("test")
    assert closed["num_images"] == retrieval["num_queries"] == len(test_rows)
    assert report["data"]["images"] == {name: len(data.split(name)) for name in ("train", "val", "test")}
    assert sum(row["support"] for row in closed["per_individual"]) == len(test_rows)
    assert set(report["by_source"]) == {"CZoo", "CTai"}  # from annotations/metadata.csv
    assert sum(row["num_images"] for row in report["by_source"].values()) == len(test_rows)
    assert report["open_set"]["evaluated"] is False and "data.open_set: true" in report["open_set"]["note"]
    assert report["warnings"] == []
    assert result.stdout.splitlines()[-1] == f"report: {out / 'report.md'}"
    assert "\r" not in result.stderr  # no progress bar outside a terminal


def test_figures_csv_and_markdown(closed_report, tiny_run):
    out, _ = closed_report
    for name in ("confusion_matrix.png", "cmc.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    rows = (out / "confusion_matrix.csv").read_text().splitlines()
    classes = load_checkpoint(tiny_run["best"])["classes"]
    assert rows[0].split(",")[1:] == classes and len(rows) == len(classes) + 1
    markdown = (out / "report.md").read_text()
    epoch = load_checkpoint(tiny_run["best"])["epoch"]
    assert f"), epoch {epoch}, resnet18" in markdown
    for link in ("(confusion_matrix.png)", "(cmc.png)", "(training_curves.png)", "(confusion_matrix.csv)"):
        assert link in markdown
    assert "## Closed set" in markdown and "## Retrieval" in markdown and "## Open set" in markdown


def test_a_checkpoint_stopped_mid_epoch_is_reported_with_its_steps():
    """Its weights are neither epoch's: before, the report said `epoch 2` for 2 epochs and 23 steps."""
    assert trained_for({"epoch": 2, "step": 23}) == "epoch 2 and 23 steps of epoch 3"
    assert trained_for({"epoch": 2, "step": 0}) == trained_for({"epoch": 2}) == "epoch 2"


def test_threshold_is_stored_beside_the_checkpoint(closed_report, checkpoint, tiny_run):
    out, _ = closed_report
    report = json.loads((out / "report.json").read_text())
    sidecar = json.loads(threshold_sidecar_path(checkpoint).read_text())
    assert set(sidecar) == {"thresholds", "method", "split", "checkpoint_sha256"}
    # one threshold per way inference scores a photo; ArcFace's classifier score is a cosine too
    assert sidecar["thresholds"] == report["threshold"]["thresholds"]
    assert set(sidecar["thresholds"]) == set(SCORE_KINDS)
    # None where no val photo was predicted right: tiny_run is near chance on val (1-5 of 18 right
    # per kind, depending on the CPU type and thread count it trained with); the next test checks that.
    assert all(value is None or -1.0 <= value <= 1.0 for value in sidecar["thresholds"].values())
    assert sidecar["split"] == "val" and "95%" in sidecar["method"]
    # the checksum is the original checkpoint's: evaluation never rewrites it
    assert sidecar["checkpoint_sha256"] == sha256(tiny_run["best"]) == report["checkpoint"]["sha256"]


def test_stored_thresholds_keep_95_percent_of_the_correct_val_predictions_at_inference(closed_report, checkpoint,
                                                                                      tiny_run):
    """The rule the sidecar states, checked where it is applied: inference, on the val photos, for each
    way it scores a photo (the classifier, and a gallery of the train photos by nearest photo and by
    prototype). An image on the threshold must not fall below it once stored and recomputed."""
    data = PreparedData.load(tiny_run["data_root"])
    embedder = Identifier.embedder(checkpoint)
    train = data.split("train")
    embedded = [item.embedding for batch in embedder.embed([data.raw_dir / path for path, _ in train])
                for item in batch]
    gallery = Gallery.new(embedder.info.checkpoint_sha256, len(embedded[0]))
    for name in sorted({name for _, name in train}):
        rows = [i for i, (_, row_name) in enumerate(train) if row_name == name]
        gallery.add(name, np.stack([embedded[i] for i in rows]), [train[i][0] for i in rows])
    val = data.split("val")
    checked = []
    for kind, scored_by in {"classifier": {}, "nearest": {"gallery": gallery, "match": "nearest"},
                            "prototype": {"gallery": gallery, "match": "prototype"}}.items():
        identifier = Identifier.from_checkpoint(checkpoint, **scored_by)
        predictions = identifier.identify([data.raw_dir / path for path, _ in val], top_k=1)
        accepted = [not p.unknown for p, (_, name) in zip(predictions, val) if p.names[0] == name]
        # tiny_run is near chance on val: which photos (if any) a kind gets right depends on the
        # weights, and so on the CPU type, thread count and the stand-ins' pixels. With none right
        # the rule has nothing to keep, and evaluation stores no threshold for that kind.
        if not accepted:
            assert identifier.threshold.value is None, (kind, identifier.threshold)
            continue
        assert identifier.threshold.value is not None, kind
        assert np.mean(accepted) >= 0.95, (kind, identifier.threshold, accepted)
        checked.append(kind)
    if not checked:
        pytest.skip("tiny_run predicted no val photo right by any way of scoring: nothing to keep")


def test_same_inputs_give_an_identical_report(closed_report, checkpoint, tmp_path, capsys):
    out, _ = closed_report
    assert run_main(capsys, "--checkpoint", checkpoint, "--out", tmp_path / "again")[0] == 0
    assert (tmp_path / "again" / "report.json").read_bytes() == (out / "report.json").read_bytes()


def test_batch_size_one_gives_the_same_numbers(closed_report, checkpoint, tmp_path, capsys):
    """Training needs batches of 2 (batch norm); evaluation runs in eval mode, where 1 works. Float
    rounding may move the 6th decimal, nothing more."""
    out, _ = closed_report
    assert run_main(capsys, "--checkpoint", checkpoint, "--out", tmp_path / "one", "--batch-size", 1)[0] == 0
    one, report = (json.loads((folder / "report.json").read_text()) for folder in (tmp_path / "one", out))
    assert list(unit_values(one)) == pytest.approx(list(unit_values(report)), abs=2e-6)
    assert one["threshold"]["thresholds"] == pytest.approx(report["threshold"]["thresholds"], abs=2e-6)


@pytest.fixture(scope="module")
def open_set_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """An untrained model in a checkpoint of an open-set run (the layout train.py saves); evaluation
    does not care whether it learned anything, and skipping training keeps the test fast."""
    folder = tmp_path_factory.mktemp("open_set")
    config = load_config(write_config(folder, tiny_data, name="open", **{"data.open_set": True,
                                                                         "data.num_classes": 4}))
    train_rows = PreparedData.load(tiny_data).split("train", open_set=True)
    classes = ClassIndex.from_rows(train_rows)
    torch.manual_seed(0)
    model = create_model(config.model, len(classes))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = folder / "open_best.pt"
    atomic_save(checkpoint_dict(model, optimizer, scheduler, scaler, RunState(), config, classes,
                                data_fingerprint(train_rows, classes), steps_per_epoch=1), path)
    return path


def test_open_set_evaluation(open_set_checkpoint, tiny_data, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(open_set_checkpoint), "--out", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    open_set, data = report["open_set"], PreparedData.load(tiny_data)
    assert capsys.readouterr().out.splitlines()[1] == (
        f"test + unknown_test: AUROC={open_set['auroc']:.4f} BAKS={open_set['baks']:.4f} BAUS={open_set['baus']:.4f} "
        f"(threshold {open_set['threshold']:.6f}, chosen on val + unknown_val)")
    assert open_set["evaluated"] is True
    assert all(0.0 <= value <= 1.0 for value in unit_values(report))
    assert open_set["measured_on"] == ["test", "unknown_test"]
    assert open_set["known_images"] == len(data.split("test", open_set=True))
    assert open_set["unknown_images"] == len(data.split("unknown_test", open_set=True))
    assert open_set["balanced_mean"] == pytest.approx((open_set["baks"] + open_set["baus"]) / 2, abs=1e-6)
    assert report["data"]["lists"] == "annotations/open_set"
    sidecar = json.loads(threshold_sidecar_path(open_set_checkpoint).read_text())
    thresholds = sidecar["thresholds"]
    assert thresholds["nearest"] == open_set["threshold"] == report["threshold"]["thresholds"]["nearest"]
    assert set(thresholds) == set(SCORE_KINDS)
    assert "BAKS" in sidecar["method"] and "unknown_val" in sidecar["split"]
    assert "| AUROC" in (tmp_path / "report.md").read_text()


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A prepared dataset whose lists can be edited; prepared.json still points at the same images."""
    shutil.copytree(tiny_data / "annotations", tmp_path / "data" / "annotations")
    return tmp_path / "data"


def test_a_changed_train_split_is_reported_and_leaves_the_stored_thresholds(checkpoint, data_copy, tmp_path, capsys):
    """Thresholds chosen on other data must not replace the ones inference reads for this checkpoint."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    copy = folder / checkpoint.name
    shutil.copy2(checkpoint, copy)
    sidecar = threshold_sidecar_path(copy)
    sidecar.write_text('{"stored": "earlier"}')
    train = data_copy / "annotations" / "train.txt"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[1:]))
    code, err = run_main(capsys, "--checkpoint", copy, "--data-root", data_copy, "--out", tmp_path / "out")
    assert code == 0
    assert any(line.startswith("warning: the train split differs") and f"{sidecar.name}, which inference reads, "
               "is left as it was" in line for line in err), err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["warnings"] and report["threshold"]["sidecar"] is None
    assert set(report["threshold"]["thresholds"]) == set(SCORE_KINDS)
    assert sidecar.read_text() == '{"stored": "earlier"}'
    assert "Not stored for inference" in (tmp_path / "out" / "report.md").read_text()


def test_data_prepared_without_an_open_set_split_says_so(checkpoint, data_copy, tmp_path, capsys):
    """Own photos of fewer than 12 individuals are prepared with --open-set-individuals 0. The note said
    that the open-set 'unknown' lists (there are none) were in the training data, and pointed to
    `data.open_set: true`, which such data refuses."""
    shutil.rmtree(data_copy / "annotations" / "open_set")
    code, _ = run_main(capsys, "--checkpoint", checkpoint, "--data-root", data_copy, "--out", tmp_path / "out")
    assert code == 0
    note = json.loads((tmp_path / "out" / "report.json").read_text())["open_set"]["note"]
    assert "prepared without an open-set split" in note and "'unknown' lists" not in note
    assert note in (tmp_path / "out" / "report.md").read_text()


def test_a_checkpoint_in_a_read_only_folder_is_evaluated_with_a_warning(checkpoint, tiny_data, tmp_path, capsys,
                                                                         monkeypatch):
    """A model folder shared read-only: the threshold file cannot be written beside the checkpoint.
    Before, evaluate failed with exit 2 after writing the whole report, which named that file."""
    access = os.access
    monkeypatch.setattr(evaluate.os, "access",
                        lambda path, mode: access(path, mode) and Path(path) != checkpoint.parent)
    sidecar = threshold_sidecar_path(checkpoint)
    before = sidecar.read_bytes() if sidecar.exists() else None
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--data-root", tiny_data, "--out", tmp_path / "out")
    assert code == 0
    assert f"warning: {checkpoint.parent} cannot be written: the thresholds are in the report only ({sidecar.name}, " \
           "which inference reads, is left as it was)" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["threshold"]["sidecar"] is None and set(report["threshold"]["thresholds"]) == set(SCORE_KINDS)
    assert "cannot be written" in (tmp_path / "out" / "report.md").read_text()
    assert (sidecar.read_bytes() if sidecar.exists() else None) == before


def test_evaluated_images_that_are_also_training_images_are_reported(checkpoint, data_copy, tmp_path, capsys):
    annotations = data_copy / "annotations"
    leaked = (annotations / "test.txt").read_text().splitlines(keepends=True)[:2]
    (annotations / "train.txt").write_text((annotations / "train.txt").read_text() + "".join(leaked))
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--data-root", data_copy, "--out", tmp_path / "out")
    assert code == 0
    images = len((annotations / 'test.txt').read_text().splitlines())
    expected = f"warning: 2 of the {images} images of the test split are also in the train split"
    assert any(line.startswith(expected) for line in err), err


def test_cache_dir_moves_the_decoded_image_cache(checkpoint, data_copy, closed_report, tmp_path, capsys):
    """E.g. a dataset on a read-only mount: the cache goes to a writable folder, the numbers stay."""
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--data-root", data_copy, "--cache-dir",
                         tmp_path / "my cache", "--out", tmp_path / "out")
    assert code == 0, err
    assert list((tmp_path / "my cache").glob("*.u8")) and not (data_copy / "cache").exists()
    expected = json.loads((closed_report[0] / "report.json").read_text())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["closed_set"], report["retrieval"]) == (expected["closed_set"], expected["retrieval"])


def test_a_metadata_file_saved_with_a_bom_is_read(checkpoint, data_copy, tmp_path, capsys):
    """E.g. metadata.csv opened and saved again by a spreadsheet: the sources still come out of it."""
    metadata = data_copy / "annotations" / "metadata.csv"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--data-root", data_copy, "--out", tmp_path / "out")
    assert code == 0, err
    assert set(json.loads((tmp_path / "out" / "report.json").read_text())["by_source"]) == {"CZoo", "CTai"}


def test_the_sources_are_read_with_the_lists(checkpoint, data_copy, tmp_path, capsys, monkeypatch):
    """metadata.csv was read after embedding every image, outside the prepare lock the lists are read
    under: a prepare of other images into the folder meanwhile left the evaluated ones of source `unknown`."""
    embed = evaluate.embed_split

    def prepare_meanwhile(*args, **kwargs):
        with locks.exclusive(data_copy / "annotations" / PREPARE_LOCK):
            (data_copy / "annotations" / "metadata.csv").write_text("path,source\nface_images/other.png,CZoo\n")
        return embed(*args, **kwargs)

    monkeypatch.setattr(evaluate, "embed_split", prepare_meanwhile)
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--data-root", data_copy, "--out", tmp_path / "out")
    assert code == 0, err
    assert set(json.loads((tmp_path / "out" / "report.json").read_text())["by_source"]) == {"CZoo", "CTai"}


def break_metadata(data_copy: Path) -> str:
    metadata = data_copy / "annotations" / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("source", "origin", 1))
    return "metadata.csv: not the metadata.csv prepare writes (no column source); re-run prepare"


def break_split(data_copy: Path) -> str:
    (data_copy / "annotations" / "test.txt").unlink()
    return "test.txt: split file not found"


def add_stranger(data_copy: Path) -> str:
    test = data_copy / "annotations" / "test.txt"
    test.write_text(test.read_text() + "face_images/stranger.png Stranger\n")
    return "unknown to the checkpoint (e.g. Stranger)"


@pytest.mark.parametrize("damage", [break_split, add_stranger, break_metadata])
def test_data_that_does_not_match_fails_in_one_line(damage, checkpoint, data_copy, tmp_path, capsys):
    expected = damage(data_copy)
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--data-root", data_copy, "--out", tmp_path / "out")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert not (tmp_path / "out").exists()


def newer_format(path: Path) -> str:
    torch.save({"format_version": 99, "model_state": {}, "epoch": 1, "config": {}, "classes": []}, path)
    return "newer"


def truncated(path: Path) -> str:
    torch.save({"weights": torch.zeros(10_000)}, path)
    path.write_bytes(path.read_bytes()[:20_000])
    return "truncated"


def missing(path: Path) -> str:
    return "checkpoint file not found"


def text_file(path: Path) -> str:
    path.write_text("- a list, not a checkpoint\n")
    return "not a PyTorch checkpoint"


def invalid_class_list(path: Path) -> str:
    torch.save({"format_version": 1, "model_state": {}, "epoch": 1, "config": {}, "classes": ["Mr Bean"]}, path)
    return "x_best.pt: the config or class list stored in the checkpoint is invalid (class name 'Mr Bean'"


@pytest.mark.parametrize("make", [newer_format, truncated, missing, text_file, invalid_class_list])
def test_unusable_checkpoints_fail_in_one_line(make, tmp_path, capsys):
    path = tmp_path / "x_best.pt"
    expected = make(path)
    code, err = run_main(capsys, "--checkpoint", path, "--out", tmp_path / "out")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_weights_that_do_not_fit_name_the_mismatch(checkpoint, tmp_path, capsys):
    """A class list edited by hand (or weights of another run pasted in): the one line must say what
    does not fit, not only torch's header "Error(s) in loading state_dict for IdentificationModel:"."""
    state = load_checkpoint(checkpoint)
    atomic_save({**state, "classes": state["classes"][:-1]}, tmp_path / "x_best.pt")
    code, err = run_main(capsys, "--checkpoint", tmp_path / "x_best.pt", "--out", tmp_path / "out")
    assert code == 2 and len(err) == 1, err
    assert "weights do not fit the model its config describes (size mismatch for head." in err[0]


@pytest.mark.parametrize("field, value, shown", [("best_val_top1", float("inf"), "inf"),
                                                  ("best_val_top1", torch.tensor(0.5), "tensor(0.5000)"),
                                                  ("step", torch.tensor(3), "tensor(3)"), ("step", -1, "-1")])
def test_report_fields_that_are_not_plain_numbers_fail_in_one_line(field, value, shown, checkpoint, tmp_path, capsys):
    """A checkpoint edited by hand or written by another program: report.json could not hold the value
    (a ValueError or TypeError traceback once every image had been through the model, nothing written)."""
    edited = tmp_path / "x_best.pt"
    atomic_save({**load_checkpoint(checkpoint), field: value}, edited)
    code, err = run_main(capsys, "--checkpoint", edited, "--out", tmp_path / "out")
    assert code == 2 and err == [f"error: {edited}: not a checkpoint of this project (malformed {field} {shown})"]
    assert not (tmp_path / "out").exists()


def test_outputs_that_are_not_finite_fail_in_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    real = IdentificationModel.embed_and_classify

    def overflowing(model, images):
        embeddings, logits = real(model, images)
        return embeddings, logits.index_fill(0, torch.tensor([0]), float("nan"))  # the batch's first image

    monkeypatch.setattr(IdentificationModel, "embed_and_classify", overflowing)
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--out", tmp_path / "run")
    assert code == 2 and len(err) == 1 and not (tmp_path / "run").exists()
    assert re.fullmatch(r"error: split '\w+': the model's outputs are not finite \(NaN or infinity\) for \d+ of \d+ "
                        r"images, first \S+\.png", err[0]), err[0]


def test_an_out_path_below_a_file_fails_before_evaluating(checkpoint, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--out", tmp_path / "a_file" / "run")
    assert code == 2
    assert err == [f"error: --out {tmp_path / 'a_file' / 'run'}: {tmp_path / 'a_file'} is a file, not a folder"]


def test_an_out_path_in_a_folder_that_cannot_be_searched_fails_in_one_line(checkpoint, tmp_path, capsys,
                                                                          unsearchable):
    """Path.exists raised PermissionError: a traceback."""
    locked = unsearchable(tmp_path / "locked")
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--out", locked / "run")
    assert code == 2 and err == [f"error: --out {locked / 'run'}: cannot write there ([Errno 13] Permission denied: "
                                 f"'{locked / 'run'}')"], err


def test_the_python_api_takes_str_paths_and_restores_the_torch_settings(closed_report, checkpoint, tmp_path,
                                                                          monkeypatch, training_arithmetic):
    """`evaluate()` from a script: str paths as the command line's, the default run folder, and the
    process's cuDNN/TF32 settings given back (a sweep trains again after evaluating)."""
    out, _ = closed_report
    report = evaluate.evaluate(str(checkpoint), str(tmp_path / "py"), device="cpu")
    assert arithmetic_flags() == training_arithmetic
    assert (tmp_path / "py" / "report.json").read_bytes() == (out / "report.json").read_bytes()
    assert report["closed_set"]["top1"] == json.loads((out / "report.json").read_text())["closed_set"]["top1"]
    monkeypatch.chdir(tmp_path)
    evaluate.evaluate(checkpoint, device="cpu")  # out defaults to the command line's run folder
    assert (tmp_path / "runs" / "eval" / f"{checkpoint.stem}_test" / "report.json").is_file()


@pytest.mark.parametrize("options, message", [
    ({"split": "train"}, "split must be one of val, test"),
    ({"batch_size": 0}, "batch_size must be a whole number of at least 1"),
    ({"device": "gpu"}, "device must be 'cpu' or 'cuda'"),
])
def test_bad_python_api_arguments_raise_evaluation_error(options, message, checkpoint, tmp_path):
    with pytest.raises(evaluate.EvaluationError, match=message):
        evaluate.evaluate(checkpoint, tmp_path / "out", **{"device": "cpu", **options})
    assert not (tmp_path / "out").exists()


def test_nan_metrics_become_null_so_report_json_can_be_written():
    report = rounded({"auroc": float("nan"), "scores": [np.float32(0.1234567), np.int64(3)]})
    assert report == {"auroc": None, "scores": [0.123457, 3]}
    json.dumps(report, allow_nan=False)  # what write_outputs does


def _report(per_individual, cmc):
    return {"checkpoint": {"path": "a/x_best.pt", "sha256": "0" * 64, "epoch": 1, "backbone": "resnet18",
                           "head": "arcface", "num_classes": 3, "open_set": False},
            "data": {"root": "d", "lists": "annotations", "split": "test", "images": {"test": 3, "train": 9},
                     "skipped": {}},
            "warnings": [], "by_source": {},
            "closed_set": {"top1": 0.5, "top5": 1.0, "balanced_accuracy": 0.5, "macro_f1": 0.5,
                           "per_individual": per_individual},
            "retrieval": {"one_nn_accuracy": cmc[0], "map_at_r": 0.5, "cmc": cmc},
            "open_set": {"evaluated": False, "note": "n/a"},
            "threshold": {"split": "val", "method": "m", "sidecar": None, "thresholds": {"classifier": 0.5}},
            "figures": {"training_curves": None}}


def test_markdown_lists_the_lowest_accuracy_first_and_the_cmc_ranks_it_names():
    rows = [{"individual": name, "support": 1, "accuracy": accuracy, "most_confused_with": None, "confused_count": 0}
            for name, accuracy in (("Alf", 0.9), ("Bea", 0.1), ("Cid", 0.5))]
    cmc = [0.11, 0.22, 0.33, 0.44, 0.55, 0.66, 0.77, 0.88, 0.99, 1.0]
    markdown = render_markdown(_report(rows, cmc))
    assert markdown.index("| Bea |") < markdown.index("| Cid |") < markdown.index("| Alf |")
    assert "| 0.1100 | 0.5500 | 1.0000 |" in markdown  # ranks 1, 5 and 10


def test_markdown_puts_each_number_in_its_column():
    report = _report([], [0.21, 0.22, 0.23, 0.24, 0.25, 0.26, 0.27, 0.28, 0.29, 0.30])
    report["closed_set"].update(top1=0.11, top5=0.12, balanced_accuracy=0.13, macro_f1=0.14)
    report["retrieval"]["map_at_r"] = 0.31
    report["by_source"] = {"CZoo": {"num_images": 3, "top1": 0.41, "top5": 0.42, "balanced_accuracy": 0.43,
                                    "macro_f1": 0.44, "one_nn_accuracy": 0.45, "map_at_r": 0.46}}
    report["open_set"] = {"evaluated": True, "threshold_chosen_on": ["val", "unknown_val"],
                          "measured_on": ["test", "unknown_test"], "known_images": 3, "known_individuals": 2,
                          "unknown_images": 4, "unknown_individuals": 1, "auroc": 0.51, "baks": 0.52, "baus": 0.53,
                          "balanced_mean": 0.525, "threshold": 0.54}
    report["threshold"]["thresholds"] = {"classifier": 0.61, "nearest": 0.62, "prototype": 0.63}
    lines = render_markdown(report).splitlines()
    for row in ("| 0.1100 | 0.1200 | 0.1300 | 0.1400 |",
                "| CZoo | 3 | 0.4100 | 0.4200 | 0.4300 | 0.4400 | 0.4500 | 0.4600 |",
                "| 0.2100 | 0.3100 | 0.2100 | 0.2500 | 0.3000 |", "| 0.5100 | 0.5200 | 0.5300 | 0.5250 | 0.5400 |",
                "| the classifier (predict without --gallery) | 0.6100 |",
                "| a gallery, most similar photo (--match nearest) | 0.6200 |",
                "| a gallery, prototypes (--match prototype) | 0.6300 |"):
        assert row in lines, row
    assert "evaluated: 3 images; gallery (train): 9 images" in lines[3]


def test_the_summary_lines_print_the_measured_figures(monkeypatch, capsys):
    """The two stdout lines people quote: the test side's numbers, not the validation side's."""
    report = _report([], [0.21] * 10)
    report["closed_set"].update(top1=0.11, top5=0.12, balanced_accuracy=0.13)
    report["retrieval"]["map_at_r"] = 0.31
    report["open_set"] = {"evaluated": True, "auroc": 0.51, "baks": 0.52, "baus": 0.53, "threshold": 0.54,
                          "validation": {"baks": 0.91, "baus": 0.92}}
    monkeypatch.setattr(evaluate, "evaluate", lambda *args: report)
    assert evaluate.main(["--checkpoint", "x_best.pt", "--out", "eval"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "test: top1=0.1100 top5=0.1200 balanced=0.1300 1-NN=0.2100 mAP@R=0.3100",
        "test + unknown_test: AUROC=0.5100 BAKS=0.5200 BAUS=0.5300 (threshold 0.540000, chosen on val + unknown_val)",
        f"report: {Path('eval') / 'report.md'}"]


def test_confusion_csv_rows_are_the_true_individuals():
    assert confusion_csv(np.array([[1, 2], [0, 3]]), ["A", "B"]) == "true \\ predicted,A,B\nA,1,2\nB,0,3\n"


def _embedded_split(names: list[str], scores=None) -> EmbeddedSplit:
    """A split whose embeddings do not matter: the scorers below score it by its names, or by `scores`,
    kept in the first embedding column (`_score_by_first_column`)."""
    embeddings = np.zeros((len(names), 2), np.float32)
    if scores is not None:
        embeddings[:, 0] = scores
    return EmbeddedSplit([(f"{name}/{i}.png", name) for i, name in enumerate(names)],
                         embeddings, np.zeros((len(names), 2), np.float32), 0)


def _score_by_first_column(split: EmbeddedSplit):
    """Every image identified right, with the score `_embedded_split` stored for it."""
    return split.names.copy(), split.embeddings[:, 0].astype(np.float64)


def test_open_set_section_counts_unknowns_below_the_threshold_as_rejected():
    """Known images score 0.9 and are right, unknown ones score 0.1: a perfect separation."""
    embedded = {"val": _embedded_split(["A", "A", "B", "B"]), "unknown_val": _embedded_split(["X", "Y"]),
                "test": _embedded_split(["A", "B"]), "unknown_test": _embedded_split(["Z", "W"])}

    def scorer(split: EmbeddedSplit):
        known = split.names[0] in ("A", "B")
        return split.names.copy(), np.full(len(split.names), 0.9 if known else 0.1)

    section = open_set_section(embedded, "test", scorer)
    assert 0.1 < section["threshold"] < 0.9
    assert (section["baks"], section["baus"], section["balanced_mean"]) == (1.0, 1.0, 1.0)
    assert section["validation"] == {"baks": 1.0, "baus": 1.0}


def test_open_set_figures_are_the_test_sides_at_the_threshold_chosen_on_val():
    """Val separates perfectly (known 0.9, unknown 0.1: threshold 0.5); on test, known A's second image
    (0.4) is rejected and unknown Z (0.6) accepted. Every figure must be the test side's."""
    embedded = {"val": _embedded_split(["A", "A", "B", "B"], [0.9] * 4),
                "unknown_val": _embedded_split(["X", "X"], [0.1, 0.1]),
                "test": _embedded_split(["A", "A"], [0.9, 0.4]),
                "unknown_test": _embedded_split(["Z", "W"], [0.6, 0.1])}
    section = open_set_section(embedded, "test", _score_by_first_column)
    assert section["threshold"] == 0.5
    assert (section["baks"], section["baus"], section["balanced_mean"]) == (0.5, 0.5, 0.5)
    assert section["auroc"] == 0.75  # unknown-vs-known pairs ordered right: (Z, A1), (W, A1), (W, A2), not (Z, A2)
    assert section["validation"] == {"baks": 1.0, "baus": 1.0}
    assert (section["known_images"], section["known_individuals"]) == (2, 1)
    assert (section["unknown_images"], section["unknown_individuals"]) == (2, 2)


def _unit_split(rows: list[tuple[str, str]], embeddings: list, logits: list) -> EmbeddedSplit:
    return EmbeddedSplit(rows, np.array(embeddings, np.float32), np.array(logits, np.float32), 0)


def test_closed_set_retrieval_and_source_sections_by_hand():
    """Gallery: A at (1, 0), B at (0, 1). Queries: a.png (CZoo, A) right by both the classifier and 1-NN;
    b.png (CTai, A) wrong by both; c.png (CTai, B) right by both."""
    classes = ClassIndex(["A", "B"])
    gallery = _unit_split([("g1.png", "A"), ("g2.png", "B")], [[1, 0], [0, 1]], [[0, 0], [0, 0]])
    query = _unit_split([("a.png", "A"), ("b.png", "A"), ("c.png", "B")], [[1, 0], [0, 1], [0, 1]],
                        [[2, 0], [0, 2], [0, 2]])
    closed, matrix = evaluate.closed_set_section(query, classes)
    assert matrix.tolist() == [[1, 1], [0, 1]] and closed["top1"] == pytest.approx(2 / 3)
    retrieval = evaluate.retrieval_section(query, gallery)
    assert retrieval["one_nn_accuracy"] == retrieval["map_at_r"] == pytest.approx(2 / 3)  # not 1: the query
    assert retrieval["gallery_images"] == 2                                              # is not in the gallery
    sources = {"a.png": "CZoo", "b.png": "CTai", "c.png": "CTai"}
    by_source = evaluate.by_source_section(query, gallery, classes, sources)
    keys = ("num_images", "top1", "one_nn_accuracy", "map_at_r")
    assert set(by_source) == {"CZoo", "CTai"}
    assert [by_source["CZoo"][key] for key in keys] == [1, 1.0, 1.0, 1.0]
    assert [by_source["CTai"][key] for key in keys] == [2, 0.5, 0.5, 0.5]


def test_closed_set_thresholds_are_chosen_on_the_correct_val_predictions_only():
    """20 correct predictions score 0.50-0.69, 20 wrong ones 0.00-0.19: keeping 95% of the correct ones
    must not lower the threshold into the wrong ones."""
    scores = np.r_[np.linspace(0.5, 0.69, 20), np.linspace(0.0, 0.19, 20)]
    predicted = np.array(["A"] * 20 + ["B"] * 20)
    embedded = {"val": _embedded_split(["A"] * 40)}
    section = threshold_section(embedded, False, {"nearest": lambda split: (predicted, scores)}, None)
    threshold = section["thresholds"]["nearest"]
    assert np.mean(scores[:20] >= threshold) >= 0.95
    assert (scores[20:] < threshold).all()


def test_the_val_split_is_warned_about_having_chosen_the_checkpoint_and_thresholds():
    splits = {"train": [("a.png", "A")], "val": [("b.png", "A")], "test": [("c.png", "A")]}
    sidecar = Path("x_best.pt.threshold.json")
    val = data_warnings(splits, "val", True, sidecar, True)
    assert len(val) == 1 and "chose this checkpoint" in val[0] and "report the test split" in val[0]
    assert data_warnings(splits, "test", True, sidecar, True) == []


def test_the_default_report_folder_keeps_evaluations_on_other_data_apart(tmp_path):
    checkpoint = Path("artifacts/demo_best.pt")
    assert evaluate.default_out(checkpoint, "test") == Path("runs/eval/demo_best_test")
    assert evaluate.default_out(checkpoint, "val", tmp_path / "mine") == Path("runs/eval/demo_best_mine_val")


def test_images_moved_since_prepare_are_named_as_the_likely_cause(checkpoint, data_copy, tmp_path, capsys):
    """The raw folder renamed after training: the error said only that no image could be read."""
    prepared = data_copy / "annotations" / "prepared.json"
    info = json.loads(prepared.read_text())
    info["raw_dir"] = str(tmp_path / "moved away")
    prepared.write_text(json.dumps(info))
    code, err = run_main(capsys, "--checkpoint", checkpoint, "--data-root", data_copy, "--out", tmp_path / "out")
    assert code == 2 and err[-1].startswith("error: split 'train': none of its"), err
    assert f"under {tmp_path / 'moved away'} (raw_dir of prepared.json): were they moved or deleted?" in err[-1]
    assert not (tmp_path / "out").exists()


def test_an_evaluation_stopped_while_writing_leaves_the_earlier_report_whole(checkpoint, closed_report, tmp_path,
                                                                             monkeypatch):
    """Ctrl-C while the figures were drawn left the new confusion matrix beside the earlier
    report.json (of another checkpoint): a report folder that contradicted itself."""
    out, _ = closed_report
    folder = tmp_path / "eval"
    shutil.copytree(out, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    retrained = tmp_path / "retrained" / checkpoint.name
    retrained.parent.mkdir()
    state = torch.load(checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(0)  # other weights: other predictions, another confusion matrix
    state["model_state"] = {key: value + torch.randn(value.shape, generator=generator) * value.std()
                            if key == "neck.1.weight" else value
                            for key, value in state["model_state"].items()}
    torch.save(state, retrained)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "plot_cmc", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(retrained, folder, device="cpu")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # no staged file left either


def test_training_curves_of_an_earlier_evaluation_go_when_this_one_has_none(checkpoint, closed_report, tmp_path):
    out, _ = closed_report
    folder = tmp_path / "eval"
    shutil.copytree(out, folder)
    assert (folder / "training_curves.png").is_file()
    alone = tmp_path / "alone" / checkpoint.name  # no metrics CSV beside it
    alone.parent.mkdir()
    shutil.copy(checkpoint, alone)
    report = evaluate.evaluate(alone, folder, device="cpu")
    assert report["figures"]["training_curves"] is None and not (folder / "training_curves.png").exists()


def test_a_metrics_csv_that_cannot_be_read_only_leaves_the_training_curves_out(checkpoint, tmp_path, monkeypatch):
    """Its PermissionError failed the whole evaluation: "could not write the results", no report."""
    metrics = checkpoint.with_name("tiny_metrics.csv")
    assert metrics.is_file()
    refuse_to_open(monkeypatch, metrics)
    report = evaluate.evaluate(checkpoint, tmp_path / "eval", device="cpu")
    assert report["figures"]["training_curves"] is None and (tmp_path / "eval" / "report.json").is_file()


def test_the_default_folder_is_not_taken_from_a_checkpoint_of_the_same_name(checkpoint, closed_report, tmp_path,
                                                                             monkeypatch, capsys):
    """`<name>_best.pt` of two runs in different output_dirs share `runs/eval/<name>_best_test`: the
    second evaluation replaced the first one's report without a word."""
    monkeypatch.chdir(tmp_path)
    folder = evaluate.default_out(checkpoint, "test")
    shutil.copytree(closed_report[0], folder)  # the evaluation of `checkpoint`
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    namesake = tmp_path / "other_run" / checkpoint.name
    namesake.parent.mkdir()
    state = torch.load(checkpoint, weights_only=True)
    state["epoch"] += 1  # another run's checkpoint: other bytes
    torch.save(state, namesake)
    code, err = run_main(capsys, "--checkpoint", namesake)
    assert code == 2
    assert err == [f"error: {folder} holds the evaluation of {checkpoint}, another checkpoint of the same name; "
                   "pass --out DIR to keep both"]
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    evaluate.check_default_out_is_free(folder, checkpoint)  # its own checkpoint evaluated again: replaced
    copy = tmp_path / "copy" / checkpoint.name
    copy.parent.mkdir()
    shutil.copy2(checkpoint, copy)
    evaluate.check_default_out_is_free(folder, copy)  # the same weights elsewhere: the same evaluation
    evaluate.check_default_out_is_free(folder, Path(os.path.relpath(checkpoint)))  # however the path is written
    report = json.loads((folder / "report.json").read_text())
    report["checkpoint"]["path"] = str(tmp_path / "gone" / checkpoint.name)
    (folder / "report.json").write_text(json.dumps(report))
    evaluate.check_default_out_is_free(folder, namesake)  # the earlier checkpoint gone: nothing to keep apart


def test_a_checkpoint_replaced_while_it_is_loaded_fails_in_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """Training saving a new best epoch between the read of the weights and that of the checksum: the
    report and the threshold file named the new file's checksum for thresholds of the old weights."""
    copy = tmp_path / "run" / checkpoint.name
    copy.parent.mkdir()
    shutil.copy2(checkpoint, copy)
    state = torch.load(checkpoint, weights_only=True)
    state["epoch"] += 1  # the next best epoch: other bytes
    newer = tmp_path / "newer.pt"
    torch.save(state, newer)
    real = trained.create_model

    def saved_meanwhile(*args, **kwargs):
        os.replace(newer, copy)  # how training saves: an atomic rename over the file
        return real(*args, **kwargs)

    monkeypatch.setattr(trained, "create_model", saved_meanwhile)
    code, err = run_main(capsys, "--checkpoint", copy, "--out", tmp_path / "out")
    assert code == 2 and err == [f"error: {copy}: replaced while it was being read (a training run saving it?); "
                                 "run again"]
    assert not (tmp_path / "out").exists() and not threshold_sidecar_path(copy).exists()


def test_a_threshold_file_that_cannot_be_written_leaves_the_earlier_report(checkpoint, closed_report, tmp_path,
                                                                          monkeypatch, capsys):
    """The sidecar was written after the report: when that failed (a full disk), the command said so but
    left a new report stating the thresholds were stored for inference, beside an earlier sidecar."""
    folder = tmp_path / "eval"
    shutil.copytree(closed_report[0], folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    alone = tmp_path / "alone" / checkpoint.name  # no metrics CSV beside it: a report that differs
    alone.parent.mkdir()
    shutil.copy(checkpoint, alone)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(threshold_sidecar_path(alone)))

    monkeypatch.setattr(evaluate, "write_threshold_sidecar", disk_full)
    code, err = run_main(capsys, "--checkpoint", alone, "--out", folder)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert not threshold_sidecar_path(alone).exists()


def test_open_set_thresholds_give_no_credit_for_a_misidentified_known_image():
    """Known A is right at 0.9, known B is taken for someone else at 0.6; unknowns score 0.7 and 0.5.
    Keeping B's wrong answer is worth nothing, so the threshold rejects both unknowns (0.8), where
    counting B as right would pick 0.55."""
    embedded = {"val": _embedded_split(["A", "B"]), "unknown_val": _embedded_split(["X", "Y"])}

    def scorer(split: EmbeddedSplit):
        if split.names[0] == "A":
            return np.array(["A", "C"]), np.array([0.9, 0.6])
        return np.array(["A", "A"]), np.array([0.7, 0.5])

    section = threshold_section(embedded, True, {"nearest": scorer}, None)
    assert section["thresholds"]["nearest"] == pytest.approx(0.8)


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_thresholds_are_chosen_on_the_score_inference_decides_with(kind):
    """`best_scores` (what evaluation thresholds) must be each photo's top-1 name and score as
    `Identifier.decide` gives them, for the classifier and for both gallery match modes."""
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    names = ["Bako", "Abeni", "Zuri"]
    train = EmbeddedSplit([(f"t{i}.png", names[i % 3]) for i in range(9)], unit(rng.normal(size=(9, 4))),
                          np.zeros((9, 3), np.float32), 0)
    query = EmbeddedSplit([(f"q{i}.png", names[i % 3]) for i in range(6)], unit(rng.normal(size=(6, 4))),
                          rng.normal(scale=10, size=(6, 3)).astype(np.float32), 0)
    config = Config.model_validate({"model": {"embedding_dim": 4}, "data": {"image_size": 32}})
    classes = ClassIndex(names)  # a class order other than sorted, as a checkpoint may store
    gallery = Gallery.new("0" * 64, 4)
    for name in names:  # enrolled in another order than sorted: columns follow gallery.names
        gallery.add(name, train.embeddings[train.names == name], list(train.names[train.names == name]))
    identifier = Identifier(None, ModelInfo(classes.names, config, "0" * 64), Threshold(None, "test"),
                            None if kind == "classifier" else gallery, "nearest" if kind == "classifier" else kind)
    predicted, scores = evaluate.best_scores(query, train, kind, classes, config.model)
    decided = identifier.decide([Embedded(s, e, l) for s, e, l in zip(query.names, query.embeddings, query.logits)], 1)
    assert list(predicted) == [p.names[0] for p in decided]
    np.testing.assert_allclose(scores, [p.scores[0] for p in decided], rtol=0, atol=1e-6)
    assert len(set(predicted)) > 1 and (np.abs(scores) <= 1).all()
