"""Evaluate a trained checkpoint in one command and write a report a reviewer can check.

    python -m src.evaluation.evaluate --checkpoint artifacts/<name>_best.pt [--split test]
        [--data-root DIR] [--cache-dir DIR] [--out DIR] [--device cpu|cuda|cuda:N] [--batch-size N]

Read top to bottom: `load_trained` and `check_reported_fields` (checkpoint -> model) -> `read_splits`
and `check_individuals` -> `embed_split` (every image of a split through the model once) ->
`closed_set_section` (the classifier), `retrieval_section` (embeddings against the train gallery),
`by_source_section`, `open_set_section`, `threshold_section` -> `write_outputs` (report.json,
report.md, figures and the threshold sidecar).

The run folder (default `runs/eval/<checkpoint stem>_<split>`) gets `report.json` with every number,
`report.md` with the tables and figures, `confusion_matrix.png/.csv`, `cmc.png` and, when the
training metrics CSV is beside the checkpoint, `training_curves.png`. The rejection threshold for
inference goes into the report and into `<checkpoint>.threshold.json`; the checkpoint itself is
never rewritten. Same inputs give the same report.json (floats rounded to 6 decimals, sorted keys).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import reprlib
import sys
from dataclasses import dataclass
from functools import partial
from numbers import Real
from pathlib import Path

import numpy as np
import torch

from src import atomic
from src.config import Config, ConfigError, ModelConfig
from src.data.dataset import ClassIndex, DatasetError, PreparedData, data_fingerprint
from src.data.loaders import build_source
from src.devices import pick_device, reproducible_arithmetic
from src.errors import command_main, command_parser, is_whole, path_argument, positive_int, show_warnings
from src.evaluation import metrics
from src.evaluation.curves import CurvesError, read_metrics_csv
from src.evaluation.plots import plot_cmc, plot_confusion_matrix, plot_training_curves
from src.evaluation.report import confusion_csv, render_markdown, rounded
from src.models.backbones import ModelError
from src.models.scoring import SCORE_KINDS, classifier_scores, gallery_scores
from src.models.trained import CheckpointError, TrainedModel, load_trained
from src.safe_load import file_sha256
from src.tables import print_stdout, progress_bar
from src.training.artifacts import RunPaths, threshold_sidecar_path

log = logging.getLogger(__name__)

REPORT_VERSION = 1
DEFAULT_BATCH_SIZE = 64  # images per forward pass
SPLITS = ("val", "test")
HEURISTIC_THRESHOLDS = "The thresholds below are a heuristic chosen on the closed val split."
CLOSED_MODEL_NOTE = (
    "Not evaluated: this model was trained on the closed set, so every individual of the open-set 'unknown' "
    "lists was in its training data. An honest open-set evaluation needs a model trained with "
    f"`data.open_set: true`. {HEURISTIC_THRESHOLDS}")
NO_OPEN_SET_NOTE = (
    "Not evaluated: the data were prepared without an open-set split (`--open-set-individuals 0`). To measure "
    "how well a model rejects individuals it never saw, prepare again with `--open-set-individuals K` (at least "
    f"2, leaving at least 2 known) and train with `data.open_set: true`. {HEURISTIC_THRESHOLDS}")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together; one line saying what does not match."""


@dataclass
class EmbeddedSplit:
    """One split through the model: the rows that could be read, with their embeddings and logits."""

    rows: list[tuple[str, str]]
    embeddings: np.ndarray  # N x D, L2-normalised
    logits: np.ndarray      # N x C
    skipped: int            # unreadable images left out

    @property
    def names(self) -> np.ndarray:
        return np.array([name for _, name in self.rows])

    def labels(self, classes: ClassIndex) -> np.ndarray:
        return np.array([classes.index(name) for name in self.names], dtype=np.int64)

    def subset(self, mask: np.ndarray) -> "EmbeddedSplit":
        return EmbeddedSplit([row for row, keep in zip(self.rows, mask) if keep], self.embeddings[mask],
                        self.logits[mask], 0)


# ---------------------------------------------------------------------------------------------
# Inputs


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("src.evaluation.evaluate", __doc__)
    parser.add_argument("--checkpoint", required=True, type=path_argument, help="artifacts/<name>_best.pt")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to evaluate (default: test)")
    parser.add_argument("--data-root", type=path_argument, default=None,
                        help="prepared dataset (default: data.root of the checkpoint's config)")
    parser.add_argument("--cache-dir", type=path_argument, default=None,
                        help="decoded-image cache folder (default: data.cache_dir of the checkpoint's config; "
                             "<data-root>/cache with --data-root)")
    parser.add_argument("--out", type=path_argument, default=None,
                        help="run folder (default: runs/eval/<checkpoint stem>_<split>)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def check_reported_fields(run: TrainedModel, path: Path) -> None:
    """The optional fields of the checkpoint that the report copies must be plain numbers: a step
    count and a finite best val top-1. A tensor or infinity there (a checkpoint edited by hand or
    written by another program) failed as report.json was written, after the whole evaluation."""
    step, best = run.checkpoint.get("step", 0), run.checkpoint.get("best_val_top1")
    malformed = []
    if not is_whole(step) or step < 0:
        malformed.append(f"step {reprlib.repr(step)}")
    if best is not None and not (isinstance(best, Real) and math.isfinite(best)):
        malformed.append(f"best_val_top1 {reprlib.repr(best)}")
    if malformed:
        raise CheckpointError(f"{path}: not a checkpoint of this project (malformed {'; '.join(malformed)})")


def evaluation_config(config: Config, data_root: Path | None, cache_dir: Path | None) -> Config:
    """The checkpoint's config with the command line's changes: the cache folder and, for `--data-root`,
    the data root (and its default cache folder). Everything that shapes the pixels stays as trained."""
    config = config.model_copy(deep=True)
    if data_root is not None:
        config.data.root, config.data.cache_dir = data_root, None  # None: the root's own (DataConfig.cache_folder)
    if cache_dir is not None:
        config.data.cache_dir = cache_dir
    return config


def read_splits(data: PreparedData, split: str, open_set: bool
                ) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    """The lists the evaluation needs, keyed by how the report names them, and each image's source.

    Closed set: `train` (gallery), `val` (threshold), the evaluated split. Open set: the same over the
    known individuals, plus `unknown_val` (threshold) and `unknown_<split>` (measured).
    """
    names = ["train", "val", split]
    if open_set:
        names += ["unknown_val", f"unknown_{split}"]
    return data.splits_and_sources(list(dict.fromkeys(names)), open_set=open_set)


def check_individuals(splits: dict[str, list[tuple[str, str]]], classes: ClassIndex) -> None:
    """Known splits must hold only individuals the checkpoint knows; unknown splits none of them.

    A mismatch means a checkpoint evaluated on another prepared dataset (or one re-prepared since),
    where the numbers would be meaningless."""
    known = set(classes.names)
    for name, rows in splits.items():
        individuals = {individual for _, individual in rows}
        wrong = sorted(individuals & known if name.startswith("unknown_") else individuals - known)
        if wrong:
            what = "seen in training" if name.startswith("unknown_") else "unknown to the checkpoint"
            raise EvaluationError(f"split '{name}' has {len(wrong)} individuals {what} (e.g. "
                                  f"{', '.join(wrong[:3])}): checkpoint and prepared dataset do not match")


# ---------------------------------------------------------------------------------------------
# Embedding


@torch.no_grad()
def embed_split(run: TrainedModel, config: Config, rows: list[tuple[str, str]], raw_dir: Path, batch_size: int,
                desc: str) -> EmbeddedSplit:
    """Every readable image of `rows` through the model, with exactly training's validation pipeline
    (`build_source(train=False)`: the same cache, decoding and `BatchAugment.eval`).

    The source is given each row's index as its "individual", so the labels it yields say which rows
    were read (unreadable images are skipped inside it) and any individual can be embedded, also one
    the checkpoint never saw. The image cache ignores labels, so training's caches are reused. One
    forward gives both outputs (`model.embed_and_classify`): the L2-normalised embedding and the logits.
    A split without any readable image is an EvaluationError: every split has a role in the report.
    """
    row_ids = ClassIndex([str(i) for i in range(len(rows))])
    source = build_source(config, [(path, str(i)) for i, (path, _) in enumerate(rows)], raw_dir, row_ids,
                          train=False, device=run.device, batch_size=batch_size)
    kept, embeddings, logits = [], [], []
    bar = progress_bar(len(source), desc, sys.stderr.isatty())
    for images, labels in source.batches(0):
        batch_embeddings, batch_logits = run.model.embed_and_classify(images)
        embeddings.append(batch_embeddings.cpu().numpy())
        logits.append(batch_logits.cpu().numpy())
        kept += [rows[i] for i in labels.tolist()]
        bar.update()
    bar.close()
    if not kept:
        raise EvaluationError(f"{desc}: none of its {len(rows)} images could be read under {raw_dir} (raw_dir of "
                              "prepared.json): were they moved or deleted? (moved: prepare again with --raw-dir "
                              "at their new place)")
    embeddings, logits = np.concatenate(embeddings), np.concatenate(logits)
    # A NaN would count differently in each metric (argsort puts it last, argmax first): none is reported.
    broken = np.flatnonzero(~(np.isfinite(embeddings).all(axis=1) & np.isfinite(logits).all(axis=1)))
    if len(broken):
        raise EvaluationError(f"{desc}: the model's outputs are not finite (NaN or infinity) for {len(broken)} of "
                              f"{len(kept)} images, first {kept[broken[0]][0]}")
    return EmbeddedSplit(kept, embeddings, logits, len(rows) - len(kept))


def similarity(queries: EmbeddedSplit, gallery: EmbeddedSplit) -> np.ndarray:
    """Cosine similarity (embeddings are unit vectors), in float64 so that ties are real ties."""
    return queries.embeddings.astype(np.float64) @ gallery.embeddings.astype(np.float64).T


def check_gallery(embedded: dict[str, EmbeddedSplit], split: str) -> None:
    """Every known query individual needs a readable gallery image, or retrieval could not find it."""
    in_gallery = set(embedded["train"].names)
    for name in dict.fromkeys(["val", split]):
        missing = sorted(set(embedded[name].names) - in_gallery)
        if missing:
            raise EvaluationError(f"split '{name}': individuals with no readable train image to retrieve "
                                  f"(e.g. {', '.join(missing[:3])})")


# ---------------------------------------------------------------------------------------------
# Sections of the report


def closed_set_section(query: EmbeddedSplit, classes: ClassIndex) -> tuple[dict, np.ndarray]:
    """Classifier metrics on the evaluated split, the per-individual table and the confusion matrix."""
    labels = query.labels(classes)
    matrix = metrics.confusion(labels, query.logits.argmax(axis=1), len(classes))
    section = metrics.classification_metrics(labels, query.logits)
    section["per_individual"] = metrics.per_individual(matrix, list(classes.names))
    return section, matrix


def retrieval_section(query: EmbeddedSplit, gallery: EmbeddedSplit) -> dict:
    """1-NN accuracy, mAP@R and CMC of the evaluated split against the train gallery."""
    section = metrics.retrieval_metrics(similarity(query, gallery), query.names, gallery.names)
    section["gallery_images"] = len(gallery.rows)
    return section


def by_source_section(query: EmbeddedSplit, gallery: EmbeddedSplit, classes: ClassIndex,
                      sources: dict[str, str]) -> dict:
    """The closed-set and retrieval headline numbers per image source: published results differ a lot
    between CZoo (zoo, good light) and CTai (wild, Taï forest), so one average can hide either."""
    per_image = np.array([sources.get(path, "unknown") for path, _ in query.rows])
    section = {}
    for source in sorted(set(per_image)):
        subset = query.subset(per_image == source)
        scores = similarity(subset, gallery)
        section[source] = {**metrics.classification_metrics(subset.labels(classes), subset.logits),
                           "one_nn_accuracy": metrics.one_nn_accuracy(scores, subset.names, gallery.names),
                           "map_at_r": metrics.map_at_r(scores, subset.names, gallery.names)}
    return section


def best_scores(query: EmbeddedSplit, gallery: EmbeddedSplit, kind: str, classes: ClassIndex,
                model: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each query's predicted individual and its score, by inference's rule for `kind` (SCORE_KINDS):
    the classifier, the most similar gallery image, or the gallery prototypes."""
    if kind == "classifier":
        individuals, scores = np.array(classes.names), classifier_scores(query.logits, model)
    else:
        individuals, labels = np.unique(gallery.names, return_inverse=True)
        scores = gallery_scores(kind, query.embeddings, gallery.embeddings, labels)
    best = scores.argmax(axis=1)
    return individuals[best], scores[np.arange(len(scores)), best]


@dataclass
class OpenSetSide:
    """Known and unknown images of one side (threshold choice or measurement), scored by one of
    `best_scores`' kinds (the 1-NN similarity for the open-set section, each kind for the thresholds)."""

    known_labels: np.ndarray
    known_correct: np.ndarray  # the predicted individual is the true one
    known_scores: np.ndarray   # the predicted individual's score
    unknown_labels: np.ndarray
    unknown_scores: np.ndarray

    @classmethod
    def score(cls, known: EmbeddedSplit, unknown: EmbeddedSplit, scorer) -> "OpenSetSide":
        """`scorer(embedded) -> (predicted individuals, best scores)`, one of `best_scores`' kinds."""
        predicted, known_scores = scorer(known)
        return cls(known.names, predicted == known.names, known_scores, unknown.names, scorer(unknown)[1])

    def choose_threshold(self) -> float:
        return metrics.choose_open_set_threshold(self.known_labels, self.known_correct, self.known_scores,
                                                 self.unknown_labels, self.unknown_scores)

    def at(self, threshold: float) -> dict:
        return {"baks": metrics.baks(self.known_labels, self.known_correct, self.known_scores >= threshold),
                "baus": metrics.baus(self.unknown_labels, self.unknown_scores >= threshold)}

    def auroc(self) -> float:
        is_unknown = np.r_[np.zeros(len(self.known_scores), bool), np.ones(len(self.unknown_scores), bool)]
        return metrics.unknown_auroc(np.r_[self.known_scores, self.unknown_scores], is_unknown)


def open_set_section(embedded: dict[str, EmbeddedSplit], split: str, scorer) -> dict:
    """Unknown-individual detection for a model trained without the held-out individuals, on the
    1-NN similarity to the train gallery (`scorer`), as retrieval papers report it.

    The threshold is chosen on `val` + `unknown_val` (maximising the mean of BAKS and BAUS) and then
    measured on `<split>` + `unknown_<split>`, whose unknown individuals the threshold never saw.
    """
    validation = OpenSetSide.score(embedded["val"], embedded["unknown_val"], scorer)
    measured = OpenSetSide.score(embedded[split], embedded[f"unknown_{split}"], scorer)
    threshold = validation.choose_threshold()
    result = measured.at(threshold)
    return {**result, "evaluated": True, "auroc": measured.auroc(),
            "balanced_mean": (result["baks"] + result["baus"]) / 2, "threshold": threshold,
            "known_images": len(measured.known_scores), "unknown_images": len(measured.unknown_scores),
            "known_individuals": len(set(measured.known_labels)),
            "unknown_individuals": len(set(measured.unknown_labels)),
            "validation": validation.at(threshold),
            "threshold_chosen_on": ["val", "unknown_val"], "measured_on": [split, f"unknown_{split}"]}


def threshold_section(embedded: dict[str, EmbeddedSplit], open_set: bool, scorers: dict, sidecar: Path | None) -> dict:
    """The thresholds inference applies, one per way it scores a photo (SCORE_KINDS: the scales
    differ, a classifier cosine is not a gallery similarity), and how they were chosen.

    Open-set model: each maximises (BAKS + BAUS) / 2 on `val` + `unknown_val`. Closed-set model: each
    keeps 95% of the val split's correct predictions; nothing tells how unknown animals would score,
    so this heuristic only bounds what rejection costs on known ones. `sidecar`: where inference
    will read them, None when they are for the report only.
    """
    val = embedded["val"]
    if open_set:
        thresholds = {kind: OpenSetSide.score(val, embedded["unknown_val"], scorer).choose_threshold()
                      for kind, scorer in scorers.items()}
        split, method = "open_set/val + open_set/unknown_val", "maximises (BAKS + BAUS) / 2 on the validation side"
    else:
        thresholds = {}
        for kind, scorer in scorers.items():
            predicted, scores = scorer(val)
            thresholds[kind] = metrics.keep_fraction_threshold(scores[predicted == val.names])
        split, method = "val", "keeps 95% of the correct predictions of the val split (closed-set heuristic)"
    return {"thresholds": thresholds, "split": split, "method": method,
            "sidecar": None if sidecar is None else str(sidecar)}


def trained_on(splits: dict[str, list[tuple[str, str]]], run: TrainedModel) -> bool:
    """Whether the train split is the one the checkpoint was trained on."""
    return data_fingerprint(splits["train"], run.classes) == run.checkpoint.get("data_fingerprint")


def data_warnings(splits: dict[str, list[tuple[str, str]]], split: str, trained_here: bool, sidecar: Path,
                  writable: bool) -> list[str]:
    """What makes the numbers less trustworthy without making them wrong to compute, or keeps the
    thresholds from inference. `trained_here`: whether the train split is the checkpoint's
    (`trained_on`); `writable`: whether the sidecar's folder can be written."""
    warnings = []
    kept = f"the thresholds are in the report only ({sidecar.name}, which inference reads, is left as it was)"
    if not trained_here:
        warnings.append(f"the train split differs from the one this checkpoint was trained on (its image "
                        f"paths or labels: re-prepared, from another --raw-dir form, or another dataset): "
                        f"evaluated images may have been training images, and {kept}")
    elif not writable:  # a model folder shared read-only, say
        warnings.append(f"{sidecar.parent} cannot be written: {kept}")
    shared = {path for path, _ in splits[split]} & {path for path, _ in splits["train"]}
    if shared:
        warnings.append(f"{len(shared)} of the {len(splits[split])} images of the {split} split are also in the "
                        f"train split (e.g. {min(shared)}): the model and the gallery have seen them, so the "
                        "numbers are optimistic")
    if split == "val":  # training kept its best val epoch, and evaluation chooses thresholds on val
        warnings.append("the val split chose this checkpoint (its best val top-1) and the thresholds: its numbers "
                        "are optimistic; report the test split")
    return warnings


# ---------------------------------------------------------------------------------------------
# Outputs


def write_outputs(report: dict, matrix: np.ndarray, names: list[str], metrics_csv: Path, out: Path,
                  checkpoint_sha256: str) -> dict:
    """Figures, CSV, report.json and report.md in `out`, and the threshold sidecar when the report
    names one; returns the report as written. They replace an earlier evaluation's files together
    (stopped while drawing, the folder held a new confusion matrix beside a report.json naming another
    checkpoint; a sidecar that failed to write left a report saying it was stored), and its training
    curves go when this evaluation has none."""
    atomic.make_folder(out)
    with atomic.replaced_together() as stage:
        plot_confusion_matrix(matrix, names, stage(out / "confusion_matrix.png"))
        atomic.write_text(stage(out / "confusion_matrix.csv"), confusion_csv(matrix, names))
        plot_cmc(report["retrieval"]["cmc"], stage(out / "cmc.png"))
        report["figures"] = {"confusion_matrix": "confusion_matrix.png", "cmc": "cmc.png", "training_curves": None}
        try:
            plot_training_curves(read_metrics_csv(metrics_csv), stage(out / "training_curves.png"),
                                 title=metrics_csv.name)
            report["figures"]["training_curves"] = "training_curves.png"
        except CurvesError as exc:
            log.info("no training curves: %s", exc)
        report = rounded(report)
        if report["threshold"]["sidecar"] is not None:
            write_threshold_sidecar(report["threshold"], checkpoint_sha256, stage(report["threshold"]["sidecar"]))
        atomic.write_text(stage(out / "report.json"),
                          json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
        atomic.write_text(stage(out / "report.md"), render_markdown(report))
    if report["figures"]["training_curves"] is None:
        (out / "training_curves.png").unlink(missing_ok=True)
    return report


def write_threshold_sidecar(threshold: dict, checkpoint_sha256: str, path: Path) -> None:
    """`<checkpoint>.threshold.json` for inference; the checksum ties it to these exact weights."""
    payload = {"thresholds": threshold["thresholds"], "method": threshold["method"], "split": threshold["split"],
               "checkpoint_sha256": checkpoint_sha256}
    atomic.write_text(path, json.dumps(rounded(payload), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Main


def default_out(checkpoint: Path, split: str, data_root: str | Path | None = None) -> Path:
    """`runs/eval/<checkpoint stem>_<split>`: the stem keeps `_best` and `_last` evaluations apart.
    With a `data_root` (another dataset), `<stem>_<its folder name>_<split>`: it must not replace the
    evaluation on the checkpoint's own data."""
    on = "" if data_root is None else f"_{Path(data_root).resolve().name}"
    return Path("runs") / "eval" / f"{Path(checkpoint).stem}{on}_{split}"


def check_default_out_is_free(out: Path, checkpoint: Path) -> None:
    """The default folder is named after the checkpoint's file name alone, so the `<name>_best.pt` of
    two runs in different output_dirs share it: refuse to replace the other's evaluation while that
    checkpoint is still there, unless it holds the same weights (an explicit --out replaces whatever
    it names)."""
    try:
        evaluated = json.loads((out / "report.json").read_text(encoding="utf-8"))["checkpoint"]
        earlier = Path(evaluated["path"])
        if os.path.samefile(earlier, checkpoint) or evaluated["sha256"] == file_sha256(checkpoint):
            return
    except (OSError, ValueError, KeyError, TypeError):  # no report, an unreadable one, or its checkpoint gone
        return
    raise EvaluationError(f"{out} holds the evaluation of {earlier}, another checkpoint of the same name; "
                          "pass --out DIR to keep both")


def evaluate(checkpoint: str | Path, out: str | Path | None = None, split: str = "test",
             data_root: str | Path | None = None, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             cache_dir: str | Path | None = None) -> dict:
    """Evaluate as described at the top of this module; returns the report as written. `out`
    defaults to `default_out` (as on the command line), not taken from another checkpoint. Raises
    EvaluationError, CheckpointError, DatasetError, ConfigError or ModelError on unusable input."""
    if split not in SPLITS:
        raise EvaluationError(f"split must be one of {', '.join(SPLITS)}, not {split!r} (the train split is "
                              "the retrieval gallery: evaluated against itself every image would find itself)")
    batch_size = positive_int("batch_size", batch_size, EvaluationError)
    checkpoint = Path(checkpoint)
    if out is None:
        out = default_out(checkpoint, split, data_root)
        check_default_out_is_free(out, checkpoint)
    out = Path(out)
    data_root = None if data_root is None else Path(data_root)
    cache_dir = None if cache_dir is None else Path(cache_dir)
    torch_device = pick_device(device, EvaluationError)
    with reproducible_arithmetic():
        return _evaluate(checkpoint, out, split, data_root, cache_dir, torch_device, batch_size)


def _evaluate(checkpoint: Path, out: Path, split: str, data_root: Path | None, cache_dir: Path | None,
              device: torch.device, batch_size: int) -> dict:
    run = load_trained(checkpoint, device)
    check_reported_fields(run, checkpoint)
    try:
        atomic.check_folder_possible(out)  # found now, not after the whole evaluation
    except NotADirectoryError as exc:
        raise EvaluationError(f"--out {out}: {exc.filename} is a file, not a folder") from None
    except OSError as exc:  # a folder this user cannot search (Path.exists raises it on Python 3.11)
        raise EvaluationError(f"--out {out}: cannot write there ({exc})") from None
    config = evaluation_config(run.config, data_root, cache_dir)
    open_set, root = config.data.open_set, config.data.root
    data = PreparedData.load(root)
    splits, sources = read_splits(data, split, open_set)
    check_individuals(splits, run.classes)
    embedded = {name: embed_split(run, config, rows, data.raw_dir, batch_size, f"split '{name}'")
                for name, rows in splits.items()}
    check_gallery(embedded, split)

    closed, matrix = closed_set_section(embedded[split], run.classes)
    scorers = {kind: partial(best_scores, gallery=embedded["train"], kind=kind, classes=run.classes,
                             model=config.model) for kind in SCORE_KINDS}
    open_section = (open_set_section(embedded, split, scorers["nearest"]) if open_set
                    else {"evaluated": False, "note": CLOSED_MODEL_NOTE if data.has_open_set() else NO_OPEN_SET_NOTE})
    sidecar, trained_here = threshold_sidecar_path(checkpoint), trained_on(splits, run)
    writable = os.access(sidecar.parent, os.W_OK)
    warnings = data_warnings(splits, split, trained_here, sidecar, writable)

    report = {
        "report_version": REPORT_VERSION,
        "checkpoint": {"path": str(checkpoint), "sha256": run.sha256, "epoch": run.checkpoint["epoch"],
                       "step": run.checkpoint.get("step", 0),
                       "name": config.name, "backbone": config.model.backbone, "head": config.model.head,
                       "num_classes": len(run.classes), "open_set": open_set,
                       "best_val_top1": run.checkpoint.get("best_val_top1")},
        "data": {"root": str(root), "split": split,
                 "lists": "annotations/open_set" if open_set else "annotations",
                 "images": {name: len(e.rows) for name, e in embedded.items()},
                 "skipped": {name: e.skipped for name, e in embedded.items()}},
        "closed_set": closed,
        "retrieval": retrieval_section(embedded[split], embedded["train"]),
        "by_source": by_source_section(embedded[split], embedded["train"], run.classes, sources),
        "open_set": open_section,
        "threshold": threshold_section(embedded, open_set, scorers, sidecar if trained_here and writable else None),
        "warnings": warnings,
    }
    metrics_csv = RunPaths(checkpoint.parent, config.name).metrics
    try:
        report = write_outputs(report, matrix, list(run.classes.names), metrics_csv, out, run.sha256)
    except OSError as exc:
        raise EvaluationError(f"could not write the results ({exc})") from None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return report


@command_main
def main(argv=None) -> int:
    args = parse_args(argv)
    show_warnings()
    out = args.out or default_out(args.checkpoint, args.split, args.data_root)
    try:
        report = evaluate(args.checkpoint, args.out, args.split, args.data_root, args.device, args.batch_size,
                          args.cache_dir)
    except (EvaluationError, CheckpointError, DatasetError, ConfigError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    closed, retrieval = report["closed_set"], report["retrieval"]
    print_stdout(f"{args.split}: top1={closed['top1']:.4f} top5={closed['top5']:.4f} "
                 f"balanced={closed['balanced_accuracy']:.4f} 1-NN={retrieval['one_nn_accuracy']:.4f} "
                 f"mAP@R={retrieval['map_at_r']:.4f}")
    open_set = report["open_set"]
    if open_set["evaluated"]:
        print_stdout(f"{args.split} + unknown_{args.split}: AUROC={open_set['auroc']:.4f} "
                     f"BAKS={open_set['baks']:.4f} BAUS={open_set['baus']:.4f} "
                     f"(threshold {open_set['threshold']:.6f}, chosen on val + unknown_val)")
    print_stdout(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
