"""The evaluation report's text outputs: report.json's rounding, report.md, the confusion-matrix CSV."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

DECIMALS = 6
# How inference scores a photo, as report.md names each threshold.
SCORE_DESCRIPTIONS = {"classifier": "the classifier (predict without --gallery)",
                      "nearest": "a gallery, most similar photo (--match nearest)",
                      "prototype": "a gallery, prototypes (--match prototype)"}


def rounded(value):
    """JSON-ready copy with floats rounded (and NaN as null), so reruns give byte-identical files."""
    if isinstance(value, dict):
        return {str(key): rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else round(float(value), DECIMALS)
    if isinstance(value, np.integer):
        return int(value)
    return value


def confusion_csv(matrix: np.ndarray, names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *names])
    for name, counts in zip(names, matrix):
        writer.writerow([name, *counts.tolist()])
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def trained_for(checkpoint: dict) -> str:
    """'epoch 12', or for a run stopped mid-epoch 'epoch 2 and 23 steps of epoch 3' (its weights are
    neither epoch's)."""
    epoch, step = checkpoint["epoch"], checkpoint.get("step", 0)
    return f"epoch {epoch}" + (f" and {step} steps of epoch {epoch + 1}" if step else "")


def render_markdown(report: dict) -> str:
    """report.md: the same numbers as report.json, as tables a reviewer reads, figures linked."""
    ckpt, data, closed, retrieval = report["checkpoint"], report["data"], report["closed_set"], report["retrieval"]
    open_set, threshold = report["open_set"], report["threshold"]
    lines = [f"# Evaluation of `{Path(ckpt['path']).name}` on the {data['split']} split", "",
             f"- checkpoint: `{ckpt['path']}` (sha256 `{ckpt['sha256'][:16]}…`), {trained_for(ckpt)}, "
             f"{ckpt['backbone']} + {ckpt['head']}, {ckpt['num_classes']} individuals, trained on the "
             f"{'open-set' if ckpt['open_set'] else 'closed-set'} split",
             f"- data: `{data['root']}`, lists in `{data['lists']}`; evaluated: {data['images'][data['split']]} "
             f"images; gallery (train): {data['images']['train']} images; unreadable images skipped: "
             f"{sum(data['skipped'].values())}", ""]
    lines += [f"> **Warning:** {warning}" for warning in report["warnings"]] + ([""] if report["warnings"] else [])
    lines += ["## Closed set (classifier)", "", "| top-1 | top-5 | balanced accuracy | macro-F1 |", "|---|---|---|---|",
              f"| {_number(closed['top1'])} | {_number(closed['top5'])} | {_number(closed['balanced_accuracy'])} | "
              f"{_number(closed['macro_f1'])} |", "", "### By source", "",
              "| source | images | top-1 | top-5 | balanced acc. | macro-F1 | 1-NN | mAP@R |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {source} | {row['num_images']} | {_number(row['top1'])} | {_number(row['top5'])} | "
              f"{_number(row['balanced_accuracy'])} | {_number(row['macro_f1'])} | {_number(row['one_nn_accuracy'])} | "
              f"{_number(row['map_at_r'])} |" for source, row in report["by_source"].items()]
    lines += ["", "### Per individual (lowest accuracy first)", "",
              "| individual | support | accuracy | most confused with |", "|---|---|---|---|"]
    for row in sorted(closed["per_individual"], key=lambda r: (r["accuracy"], r["individual"])):
        confused = f"{row['most_confused_with']} ({row['confused_count']})" if row["most_confused_with"] else "–"
        lines.append(f"| {row['individual']} | {row['support']} | {_number(row['accuracy'])} | {confused} |")
    lines += ["", "![Confusion matrix](confusion_matrix.png)", "",
              "Counts: [confusion_matrix.csv](confusion_matrix.csv) (rows: true individual).", "",
              "## Retrieval (gallery = train split, cosine similarity of embeddings)", "",
              "| 1-NN accuracy | mAP@R | CMC rank 1 | rank 5 | rank 10 |", "|---|---|---|---|---|",
              f"| {_number(retrieval['one_nn_accuracy'])} | {_number(retrieval['map_at_r'])} | "
              f"{_number(retrieval['cmc'][0])} | {_number(retrieval['cmc'][4])} | {_number(retrieval['cmc'][9])} |", "",
              "![CMC curve](cmc.png)", "", "## Open set (individuals the model never saw)", ""]
    if open_set["evaluated"]:
        lines += [f"Threshold chosen on {' + '.join(open_set['threshold_chosen_on'])}, measured on "
                  f"{' + '.join(open_set['measured_on'])}: {open_set['known_images']} images of "
                  f"{open_set['known_individuals']} known and {open_set['unknown_images']} images of "
                  f"{open_set['unknown_individuals']} unknown individuals.", "",
                  "| AUROC (unknown detection) | BAKS | BAUS | mean | threshold |", "|---|---|---|---|---|",
                  f"| {_number(open_set['auroc'])} | {_number(open_set['baks'])} | {_number(open_set['baus'])} | "
                  f"{_number(open_set['balanced_mean'])} | {_number(open_set['threshold'])} |"]
    else:
        lines.append(open_set["note"])
    lines += ["", "## Thresholds for inference", "",
              f"A photo is accepted as a known individual when its best score is at least the threshold of the "
              f"way it is scored, chosen on {threshold['split']}: {threshold['method']}. "
              + (f"Stored for inference in `{threshold['sidecar']}`." if threshold["sidecar"] is not None else
                 "Not stored for inference (see the warning at the top)."),
              "", "| scored by | threshold |", "|---|---|"]
    lines += [f"| {SCORE_DESCRIPTIONS[kind]} | {_number(value)} |" for kind, value in threshold["thresholds"].items()]
    lines += ["", "## Training curves", ""]
    lines.append("![Training curves](training_curves.png)" if report["figures"]["training_curves"]
                 else "No metrics CSV beside the checkpoint: no training curves.")
    lines += ["", "## Definitions", "", *[f"- {text}" for text in DEFINITIONS], ""]
    return "\n".join(lines)


DEFINITIONS = (
    "top-1 / top-5: the true individual is the classifier's first / among its five highest logits.",
    "balanced accuracy: recall averaged over the individuals of the evaluated split (each counts the same "
    "whatever its number of photos); macro-F1: F1 averaged over the same individuals.",
    "1-NN accuracy: the most similar train image (cosine similarity) shows the same individual, as "
    "MegaDescriptor / wildlife-tools report CZoo and CTai (their splits differ from ours).",
    "mAP@R: mean average precision over the first R retrieved train images, R = the individual's number "
    "of train images (Musgrave et al. 2020).",
    "CMC rank k: the true individual is among the k individuals with the most similar train images "
    "(each individual scored by its best image; ties count against the model).",
    "AUROC: detecting an unknown individual with score 1 - best gallery similarity (unknown = positive).",
    "BAKS / BAUS (AnimalCLEF): per-individual mean, over known individuals, of images accepted and "
    "correctly identified by 1-NN / over unknown individuals, of images rejected.",
)
