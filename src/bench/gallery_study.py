"""The measurement behind the gallery tables of docs/INFERENCE.md: nearest-neighbour against prototype
matching for individuals enrolled after training, and the stored open-set thresholds at work.

    python -m src.bench.gallery_study --out /tmp/study --device cuda       # a few minutes on one GPU
    python -m src.bench.gallery_study --out /tmp/smoke --device cpu \
        --individuals 12 --images 12 --held-out 4 --epochs 2 --image-size 32 --size 48   # smoke run

Stages: stand-in images (`src.data.standin`) -> `prepare` with held-out individuals -> training on
the known ones only (`data.open_set: true`) -> `evaluate` (stores the threshold) -> three studies on
the embeddings of every image, each decided by `Identifier.decide` as `predict` decides:

1. new individuals: each held-out individual enrolled from k photos (k = 1, 3, 5; three draws), its
   other photos identified among all held-out individuals, with each matching rule;
2. one gallery for known and new: the training split enrolled with `gallery enroll --from-split`,
   plus the held-out individuals from 5 photos; queries: the known test photos and the other photos
   of the new individuals;
3. open set: the gallery holds the training split only, each kind of score is cut at the threshold
   evaluation stored for it (chosen on val + unknown_val); known test photos should be accepted and
   named correctly, photos of the unknown_test individuals rejected. The classifier (no gallery) is shown for
   comparison.

Prints markdown tables and writes `<out>/study.json`. Stand-ins are not chimpanzees: the numbers
compare the rules with each other, they say nothing about accuracy on real faces.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from src.config import DataConfig, config_from_dict
from src.bench.data import MIN_IMAGES, prepared_standin, train
from src.data import standin
from src.data.dataset import PreparedData
from src.errors import command_main, command_parser, path_argument
from src.evaluation.evaluate import evaluate
from src.inference import gallery as gallery_cli
from src.inference.gallery import Gallery
from src.inference.identify import Embedded, Identifier, Prediction, Threshold, stored_thresholds
from src.models.scoring import MATCH_MODES, SCORE_KINDS
from src.training.artifacts import RunPaths

SHOTS = (1, 3, 5)
DRAWS = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("src.bench.gallery_study", __doc__)
    parser.add_argument("--out", type=path_argument, required=True, help="folder for the data, model and results")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="default cuda")
    parser.add_argument("--individuals", type=int, default=100, help="stand-in individuals (default 100)")
    parser.add_argument("--images", type=int, default=30, help="per individual (default 30)")
    parser.add_argument("--held-out", type=int, default=30, help="individuals never trained on (default 30)")
    parser.add_argument("--size", type=int, default=128, help="stand-in image side (default 128)")
    parser.add_argument("--image-size", type=int, default=112, help="training image size (default 112)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    parser.add_argument("--workers", type=int, default=8, help="processes making the data (default 8)")
    args = parser.parse_args(argv)
    # What the stand-in generator, prepare and training would each refuse later, after the data were
    # made (training with a traceback), checked before any work.
    try:
        DataConfig(image_size=args.image_size)
    except ValidationError as exc:
        parser.error(f"--image-size {args.image_size}: {exc.errors()[0]['msg']}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda (the default) requested but no CUDA GPU is available; use --device cpu")
    problems = {"--held-out must be at least 2 (the open-set split divides them into unknown_val and "
                "unknown_test)": args.held_out < 2,
                "--individuals must leave at least 2 known individuals besides --held-out":
                    args.individuals - args.held_out < 2,
                f"--images must be at least {MIN_IMAGES} (prepare keeps individuals with that many)":
                    args.images < MIN_IMAGES,
                f"--size must be from {standin.MIN_SIZE} to {standin.MAX_SIZE}":
                    not standin.MIN_SIZE <= args.size <= standin.MAX_SIZE,
                "--epochs must be at least 1": args.epochs < 1,
                "--workers must be at least 0": args.workers < 0}
    for problem, found in problems.items():
        if found:
            parser.error(problem)
    return args


def train_model(args: argparse.Namespace, root: Path) -> Path:
    config = config_from_dict({
        "name": "study",
        "data": {"root": str(root), "num_classes": args.individuals - args.held_out, "open_set": True,
                 "image_size": args.image_size, "workers": args.workers},
        "model": {"backbone": "resnet18", "pretrained": False, "head": "arcface"},
        "trainer": {"max_epochs": args.epochs, "batch_size": 64, "lr": 0.002, "warmup_epochs": min(2, args.epochs),
                    "device": args.device, "amp": args.device == "cuda", "output_dir": str(args.out / "artifacts"),
                    "progress": "never"}})
    train(config)
    return RunPaths(config.trainer.output_dir, config.name).best


def embed_split(identifier: Identifier, data: PreparedData, split: str) -> tuple[list[Embedded], np.ndarray]:
    rows = data.split(split, open_set=True)
    items = [item for batch in identifier.embed([data.raw_dir / rel for rel, _ in rows], batch_size=128)
             for item in batch]
    unreadable = [item.source for item in items if not isinstance(item, Embedded)]
    if unreadable:  # a study with images missing would compare different sets
        raise SystemExit(f"error: {len(unreadable)} stand-in image(s) could not be read, e.g. {unreadable[0]}")
    return items, np.array([name for _, name in rows])


def enrolled_into(gallery: Gallery, items: list[Embedded], names: np.ndarray) -> Gallery:
    """`gallery` with the photos `items` added, each under its individual in `names`."""
    for name in dict.fromkeys(names):
        chosen = [item for item, n in zip(items, names) if n == name]
        gallery.add(name, np.stack([item.embedding for item in chosen]), [item.source for item in chosen])
    return gallery


def accuracy(predictions: list[Prediction], names: np.ndarray) -> float:
    """The share of `predictions` (`Identifier.decide`'s) that name the right individual."""
    return float(np.mean([p.label == n for p, n in zip(predictions, names)]))


def chosen(items: list[Embedded], mask: np.ndarray) -> list[Embedded]:
    return [item for item, keep in zip(items, mask) if keep]


def split_shots(names: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Boolean mask of `shots` randomly drawn photos per individual (the enrolled ones)."""
    rng = np.random.default_rng(seed)
    enrolled = np.zeros(len(names), bool)
    for name in np.unique(names):
        enrolled[rng.choice(np.flatnonzero(names == name), shots, replace=False)] = True
    return enrolled


def study_new_individuals(base: Identifier, items, names) -> dict:
    """Accuracy per matching rule and k, mean over DRAWS random choices of the enrolled photos."""
    result = {}
    for shots in SHOTS:
        for match in MATCH_MODES:
            values = []
            for seed in range(DRAWS):
                enrolled = split_shots(names, shots, seed)
                gallery = enrolled_into(Gallery.new(base.info.checkpoint_sha256, len(items[0].embedding)),
                                        chosen(items, enrolled), names[enrolled])
                identifier = Identifier(base.backend, base.info, Threshold(None, "study"), gallery, match)
                values.append(accuracy(identifier.decide(chosen(items, ~enrolled), 1), names[~enrolled]))
            result[f"{match}@{shots}"] = float(np.mean(values))
    return result


def study_known_and_new(base: Identifier, train_gallery: Path, new_items, new_names, test_items, test_names) -> dict:
    enrolled = split_shots(new_names, 5, 0)
    result = {}
    for match in MATCH_MODES:
        gallery = enrolled_into(Gallery.load(train_gallery), chosen(new_items, enrolled), new_names[enrolled])
        identifier = Identifier(base.backend, base.info, Threshold(None, "study"), gallery, match)
        result[match] = {"known": accuracy(identifier.decide(test_items, 1), test_names),
                         "new": accuracy(identifier.decide(chosen(new_items, ~enrolled), 1), new_names[~enrolled]),
                         "individuals": len(gallery.names)}
    return result


def study_open_set(base: Identifier, checkpoint: Path, train_gallery: Path, test_items, test_names,
                   unknown_items) -> dict:
    """With the stored thresholds: known photos accepted and right, unknown individuals' photos rejected.
    Each kind of score has its own scale, so each is cut at its own threshold (`SCORE_KINDS`)."""
    stored = stored_thresholds(checkpoint, base.info.checkpoint_sha256)
    result = {"origin": stored.origin}
    for kind in SCORE_KINDS:
        gallery = None if kind == "classifier" else Gallery.load(train_gallery)
        threshold = stored.for_kind(kind)
        identifier = Identifier(base.backend, base.info, threshold, gallery, kind if gallery else MATCH_MODES[0])
        known = identifier.decide(test_items, 1)
        unknown = identifier.decide(unknown_items, 1)
        result[kind] = {"threshold": threshold.value, "known_accepted_and_right": accuracy(known, test_names),
                        "known_accuracy_without_threshold":
                            float(np.mean([p.names[0] == n for p, n in zip(known, test_names)])),
                        "unknown_rejected": float(np.mean([p.unknown for p in unknown]))}
    return result


def markdown(report: dict) -> str:
    new = report["new_individuals"]
    lines = ["| rule | " + " | ".join(f"{k} photo{'s' * (k > 1)}" for k in SHOTS) + " |", "|---|" + "---|" * len(SHOTS)]
    for match in MATCH_MODES:
        lines.append(f"| {match} | " + " | ".join(f"{new[f'{match}@{k}']:.3f}" for k in SHOTS) + " |")
    lines += ["", "| rule | known test photos | new individuals' photos | individuals |", "|---|---|---|---|"]
    for match, row in report["known_and_new"].items():
        lines.append(f"| {match} | {row['known']:.3f} | {row['new']:.3f} | {row['individuals']} |")
    open_set = report["open_set"]
    lines += ["", f"thresholds: {open_set['origin']}", "",
              "| scored against | threshold | known: right without threshold | known: accepted and right "
              "| unknown: rejected |", "|---|---|---|---|---|"]
    for kind in SCORE_KINDS:
        row = open_set[kind]
        lines.append(f"| {kind} | {row['threshold']} | {row['known_accuracy_without_threshold']:.3f} "
                     f"| {row['known_accepted_and_right']:.3f} | {row['unknown_rejected']:.3f} |")
    return "\n".join(lines)


@command_main
def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    root = prepared_standin(args.out, args.individuals, args.images, args.size, held_out=args.held_out,
                            workers=args.workers)
    checkpoint = train_model(args, root)
    evaluation = evaluate(checkpoint, args.out / "eval", "test", device=args.device)
    base = Identifier.from_checkpoint(checkpoint, args.device)
    data = PreparedData.load(root)
    train_gallery = args.out / "train_gallery.npz"
    if gallery_cli.main(["enroll", "--gallery", str(train_gallery), "--checkpoint", str(checkpoint),
                         "--from-split", str(root), "train", "--open-set", "--device", args.device]):
        raise SystemExit("error: enrolling the training split failed (see above)")
    test_items, test_names = embed_split(base, data, "test")
    unknown = {split: embed_split(base, data, split) for split in ("unknown_val", "unknown_test")}
    new_items = unknown["unknown_val"][0] + unknown["unknown_test"][0]
    new_names = np.concatenate([unknown["unknown_val"][1], unknown["unknown_test"][1]])
    report = {
        "setup": {**vars(args), "out": str(args.out), "known_individuals": len(base.info.classes),
                  "new_individuals": len(set(new_names))},
        "evaluation": {"top1": evaluation["closed_set"]["top1"], "one_nn": evaluation["retrieval"]["one_nn_accuracy"],
                       "open_set": {k: evaluation["open_set"].get(k) for k in ("auroc", "baks", "baus", "threshold")}},
        "new_individuals": study_new_individuals(base, new_items, new_names),
        "known_and_new": study_known_and_new(base, train_gallery, new_items, new_names, test_items, test_names),
        "open_set": study_open_set(base, checkpoint, train_gallery, test_items, test_names,
                                   unknown["unknown_test"][0]),
        "seconds": time.perf_counter() - started,
    }
    (args.out / "study.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["evaluation"]))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
