"""Export a checkpoint for deployment as ONNX and TorchScript, each checked against PyTorch.

    python -m src.inference.export --checkpoint artifacts/chimp_best.pt --out exported/ \
        [--format onnx torchscript] [--runs 30]

Writes into `--out`, named after the checkpoint:

- `<stem>.onnx` (opset 17): input `images`, float32 `N x 3 x S x S` normalised as training's eval
  path (`BatchAugment.eval`); outputs `embeddings` (`N x D`, L2-normalised) and `logits` (`N x C`);
  the batch axis is dynamic; in its metadata the checkpoint's sha256 and that of the JSON's model
  description. `predict --onnx` runs it with ONNX Runtime alone, after checking both against the JSON below.
- `<stem>.torchscript.pt`: the same module traced (`torch.jit.load`, no project code needed).
- `<stem>.json`: the class names, the training config (preprocessing, head), the checkpoint's sha256
  (galleries are tied to it), the thresholds evaluation stored and the checkpoint's path (`predict --onnx`
  notes when evaluation has since stored others beside it: export again after re-evaluating), the
  .onnx file's sha256 (`predict --onnx` refuses a damaged copy), the preprocessing spelled out (to
  run the .onnx file without this project), and the checks below.

Checks, on real inputs: stand-in face images (`src.data.standin`) decoded and normalised exactly as
`predict` does go through PyTorch and each export as a batch of 8, not the traced batch of 2, so the
dynamic batch axis is exercised too. The largest absolute differences are printed and stored; above
1e-4, or NaN, the command exits 1. Then the CPU latency per image: median over `--runs`
single-image calls, PyTorch eager included for comparison.

The ONNX file comes from PyTorch's TorchScript-based exporter (`dynamo=False`): the torch.export-based
one needs the onnxscript package, which this project does not depend on.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from src import atomic
from src.data.augment import IMAGENET_MEAN, IMAGENET_STD
from src.data.decode import cache_size_for
from src.data.standin import individual_name, render
from src.errors import command_main, command_parser, path_argument, positive_int
from src.inference.identify import (CHECKPOINT_METADATA, DESCRIPTION_METADATA, EXPORT_FORMAT_VERSION, INPUT_NAME,
                                    OUTPUT_NAMES, USAGE_ERRORS, Identifier, InferenceError, OnnxBackend, PhotoBytes,
                                    description_sha256, export_info_path, stored_thresholds)
from src.safe_load import file_sha256
from src.tables import format_rows, print_stdout

FORMATS = ("onnx", "torchscript")
OPSET = 17
TOLERANCE = 1e-4
CHECK_IMAGES = 8
TRACE_BATCH = 2
WARMUP_RUNS = 3
DEFAULT_RUNS = 30  # timed single-image runs per format

Runner = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command_parser("src.inference.export", __doc__)
    parser.add_argument("--checkpoint", required=True, type=path_argument,
                        help="training checkpoint, e.g. artifacts/<name>_best.pt")
    parser.add_argument("--out", required=True, type=path_argument, help="folder for the exported files")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), dest="formats",
                        help="one or both (default both)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed single-image runs per format (default {DEFAULT_RUNS})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def standin_batch(identifier: Identifier, count: int) -> torch.Tensor:
    """`count` stand-in face images as PNG bytes, through predict's own decoding and normalisation:
    real inputs, unlike random tensors, exercise the ranges a deployed model sees."""
    pixels = []
    for i in range(count):
        png = io.BytesIO()
        render(individual_name(i), f"export-check/{i}", identifier.preprocess.cache_size, seed=0)[0].save(png, "PNG")
        pixels.append(identifier.preprocess.decode(PhotoBytes(Path(f"standin{i}.png"), png.getvalue())))
    return identifier.preprocess.normalise(pixels, torch.device("cpu")).contiguous()


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> Runner:
    """Write the ONNX file, with `metadata` (what `predict --onnx` checks against the JSON beside
    it); returns a runner on it in ONNX Runtime (CPU)."""
    exported = io.BytesIO()  # in memory: the metadata is added before the one write to disk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # "legacy exporter" (see above)
        torch.onnx.export(module, (example,), exported, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)})
    model = onnx.load_from_string(exported.getvalue())
    onnx.helper.set_model_props(model, metadata)
    atomic.write_bytes(path, model.SerializeToString())
    return OnnxBackend(path, "cpu")


def export_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Runner:
    """Write the traced module; returns a runner on the file loaded back."""
    with warnings.catch_warnings():  # torch.jit is deprecated upstream, yet TorchScript is what is asked for
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        # Into memory first: writing to a file, torch's writer aborts the whole process when the
        # disk fills up (a C++ error thrown in a destructor); a Python write raises OSError instead.
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.trace(module, example), buffer)
        atomic.write_bytes(path, buffer.getvalue())
        loaded = torch.jit.load(str(path), map_location="cpu")

    @torch.inference_mode()
    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        embeddings, logits = loaded(images)
        return embeddings.numpy(), logits.numpy()

    return run


def max_differences(reference: tuple[np.ndarray, np.ndarray], outputs: tuple[np.ndarray, np.ndarray]) -> dict:
    return {name: float(np.abs(ref - out).max()) for name, ref, out in zip(OUTPUT_NAMES, reference, outputs)}


def out_of_tolerance(checks: dict) -> list[tuple[str, str, float]]:
    """(format, output, difference) of each output above TOLERANCE. Written as "not within" so that a
    NaN difference (NaN weights, or an export that yields NaN) fails: every comparison with NaN is False."""
    return [(name, output, diff) for name, diffs in checks["max_abs_diff"].items()
            for output, diff in diffs.items() if not diff <= TOLERANCE]


def median_latency_ms(runner: Runner, image: torch.Tensor, runs: int) -> float:
    """Median wall time of one single-image call, after a few untimed warm-up calls."""
    for _ in range(WARMUP_RUNS):
        runner(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def export(checkpoint: str | Path, out: str | Path, formats: Sequence[str] = FORMATS, runs: int = DEFAULT_RUNS) -> dict:
    """Export, check and time each format; write the JSON beside them. Returns the checks.
    Raises one of USAGE_ERRORS (InferenceError, CheckpointError, ...) with one line."""
    checkpoint, out = Path(checkpoint), Path(out)
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise InferenceError(f"formats must be one or more of {', '.join(FORMATS)}, not {formats!r}")
    runs = positive_int("runs", runs, InferenceError)
    identifier = Identifier.from_checkpoint(checkpoint, "cpu")
    module = identifier.backend.module
    batch = standin_batch(identifier, CHECK_IMAGES)
    stem = checkpoint.stem
    paths = {"onnx": out / f"{stem}.onnx", "torchscript": out / f"{stem}.torchscript.pt"}
    model_section = identifier.info.to_json()
    exporters = {"onnx": partial(export_onnx, metadata={CHECKPOINT_METADATA: identifier.info.checkpoint_sha256,
                                                        DESCRIPTION_METADATA: description_sha256(model_section)}),
                 "torchscript": export_torchscript}

    description_path = export_info_path(paths["onnx"])
    runners: dict[str, Runner] = {"pytorch": identifier.backend}
    try:
        # The files replace an earlier export together, once every check has run: an export stopped
        # midway (Ctrl-C during the timing, a full disk at the JSON) left a new .onnx beside the
        # earlier JSON, and predict --onnx refused both.
        with atomic.replaced_together() as stage:
            atomic.make_folder(out)
            for name in formats:
                runners[name] = exporters[name](module, batch[:TRACE_BATCH], stage(paths[name]))
            reference = identifier.backend(batch)
            checks = {"check_images": CHECK_IMAGES, "traced_batch": TRACE_BATCH, "tolerance": TOLERANCE,
                      "opset": OPSET, "files": {name: paths[name].name for name in formats},
                      "description": description_path.name,
                      "max_abs_diff": {name: max_differences(reference, runners[name](batch)) for name in formats},
                      "latency_ms_per_image": {name: median_latency_ms(runner, batch[:1], runs)
                                               for name, runner in runners.items()},
                      "latency": f"CPU, batch 1, median of {runs} runs, {torch.get_num_threads()} threads",
                      "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
            stored = stored_thresholds(checkpoint, identifier.info.checkpoint_sha256)
            description = {"format_version": EXPORT_FORMAT_VERSION, "model": model_section,
                           "preprocessing": preprocessing(identifier.info.config.data.image_size),
                           "thresholds": {"values": stored.values, "origin": stored.origin,
                                          # where predict --onnx looks for a later evaluation's thresholds
                                          "checkpoint": str(checkpoint.absolute())},
                           "checks": checks}
            if "onnx" in formats:  # the staged file holds the bytes that replace the .onnx
                description["onnx_sha256"] = file_sha256(runners["onnx"].path)
            # Last: it describes the rest.
            atomic.write_text(stage(description_path), json.dumps(description, indent=2) + "\n")
    except OSError as exc:  # a file where the folder should be, no permission, a full disk
        raise InferenceError(f"--out {out}: cannot write the export ({exc})") from None
    return checks


def preprocessing(image_size: int) -> dict:
    """How a photo becomes the `images` input, for running the .onnx file without this project (predict
    does it with `decode_for_cache` and `BatchAugment.eval`; a test follows this recipe with PIL and
    NumPy alone and gets predict's embeddings)."""
    cache_size = cache_size_for(image_size)
    offset = round((cache_size - image_size) / 2)
    return {"recipe": f"decode to RGB, turned upright by its EXIF orientation; resize its centre square to "
                      f"{cache_size} x {cache_size} with PIL's bicubic filter (antialiased) in one call, "
                      f"image.resize(({cache_size}, {cache_size}), Image.Resampling.BICUBIC, "
                      "box=(left, top, left + side, top + side)), where side is the shorter side, left = "
                      "(width - side) / 2 and top = (height - side) / 2, not rounded (cropping the square first "
                      "gives other pixels along its edges: the filter reads beyond the box); keep pixels "
                      f"{offset} to {offset + image_size - 1} in each direction ({image_size} x {image_size}); "
                      "divide by 255, subtract mean and divide by std per channel; stack as float32 "
                      "N x 3 x H x W (RGB)",
            "resize": cache_size, "crop": image_size, "crop_offset": offset,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def format_checks(checks: dict) -> str:
    rows = [("format", "file", "max|diff| embeddings", "max|diff| logits", "ms/image")]
    latency = checks["latency_ms_per_image"]
    rows.append(("pytorch", "(reference)", "-", "-", f"{latency['pytorch']:.2f}"))
    for name, diff in checks["max_abs_diff"].items():
        rows.append((name, checks["files"][name], f"{diff['embeddings']:.2e}", f"{diff['logits']:.2e}",
                     f"{latency[name]:.2f}"))
    return format_rows(rows, "<<<<") + f"\nlatency: {checks['latency']}"


@command_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        checks = export(args.checkpoint, args.out, args.formats, args.runs)
    except USAGE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_stdout(format_checks(checks))
    failed = out_of_tolerance(checks)
    if failed:  # the first one; the table above shows them all
        name, output, diff = failed[0]
        print(f"error: the {name} export's {output} differ from PyTorch's by {diff:.2e} (> {TOLERANCE:g}); "
              "do not use it", file=sys.stderr)
        return 1
    print_stdout(f"wrote {', '.join([*checks['files'].values(), checks['description']])} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
