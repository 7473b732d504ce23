"""Name the individual in new photos: the Python API behind `python -m src.inference.predict`.

    from src.inference.identify import Identifier
    identifier = Identifier.from_checkpoint("artifacts/chimp_best.pt")  # gallery=Gallery.load(...)
    for prediction in identifier.identify(["a.jpg", "b.png"], top_k=3):
        print(prediction.source, prediction.label, prediction.names, prediction.scores)

Stages, one function each:

1. `Preprocess.decode`: `decode_for_cache`, the very decoding training cached (format handling, EXIF
   orientation, the `MAX_PIXELS` decompression-bomb limit), so a photo reaches the model as the
   training images did;
2. `Preprocess.normalise`: `BatchAugment.eval`, training's validation transform;
3. a backend maps normalised images to (L2-normalised embeddings, logits): `TorchBackend` runs the
   checkpoint's model, `OnnxBackend` an exported file with ONNX Runtime (no model code needed);
4. `Identifier.scores`: each individual's score, from the classifier (`scoring.classifier_scores`) or, with a
   gallery, from the embeddings against the enrolled individuals (`Gallery.scores`);
5. `Identifier.decide`: the top k, and `unknown` when the best score is below the threshold.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime
import torch
from PIL import Image
from torch import nn

from src.config import Config, ConfigError, config_from_dict
from src.data.augment import BatchAugment
from src.data.dataset import ClassIndex, DatasetError
from src.data.decode import cache_size_for, decode_for_cache, square_resize
from src.data.io import ImageLoadError, as_rgb, file_problem
from src.data.lists import REJECTED_NAME
from src.devices import pick_device, reproducible_arithmetic
from src.errors import clipped, clipped_repr, first_line, missing, positive_int, unusable_path
from src.inference.inputs import Skipped
from src.models.scoring import MATCH_MODES, classifier_scores
from src.safe_load import CheckpointError, file_sha256
from src.tables import counted
from src.textfiles import read_utf8
from src.training.artifacts import threshold_sidecar_path

if TYPE_CHECKING:  # gallery.py builds on this module; at run time a gallery is used by its methods
    from src.inference.gallery import Gallery

DEFAULT_MATCH = "prototype"  # measured better for new individuals: docs/INFERENCE.md, Galleries
INPUT_NAME = "images"
OUTPUT_NAMES = ("embeddings", "logits")
EXPORT_FORMAT_VERSION = 1
# Metadata keys of an exported ONNX file: the sha256 of the checkpoint it was exported from, and that
# of the description (class names, config) written into its JSON (`description_sha256`).
CHECKPOINT_METADATA = "checkpoint_sha256"
DESCRIPTION_METADATA = "description_sha256"
DEFAULT_BATCH_SIZE = 32
DEFAULT_TOP_K = 5  # individuals listed per photo
# Decoding threads: PIL releases the GIL while it decompresses, so a few threads overlap the files.
DECODE_THREADS = min(4, os.cpu_count() or 1)

# Every score is a cosine similarity or a probability: -1..1, and evaluation's "reject all" and
# "accept all" values lie 1e-5 beyond.
THRESHOLD_LIMIT = 1.0 + 1e-5
# The most of a threshold origin read from an export's JSON that messages quote: the longest written
# is "stored in <file name, up to 255>: <method, clipped to 120>".
ORIGIN_SHOWN = 400
# What reading a damaged or hand-edited JSON file and its fields raises (a list where a mapping was,
# a missing key, a number too large for a float, nesting too deep for the parser).
MALFORMED_JSON = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)


@dataclass(frozen=True)
class PhotoBytes:
    """A photo file's bytes, read already (`gallery enroll` hashes them): decoded from memory, so
    the file is read once; named by its path."""

    path: Path
    data: bytes


ImageInput = str | Path | Image.Image | PhotoBytes
ONE_IMAGE = (str, os.PathLike, Image.Image, PhotoBytes)  # the types of one input


class InferenceError(RuntimeError):
    """A model, export or option that cannot be used; one line (the command line exits 2)."""


# What the command lines report as one line and exit 2 on (with gallery.GalleryError). OSError: a
# model, export or gallery path the system refuses to look up (a name over 255 bytes, a folder this
# user cannot search), where a missing file is named by the checks that raise the others.
USAGE_ERRORS = (InferenceError, CheckpointError, ConfigError, OSError)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Prediction:
    """The top-k individuals of one image, best first; `unknown` when the best is below threshold."""

    source: str
    names: tuple[str, ...]
    scores: tuple[float, ...]
    unknown: bool

    @property
    def label(self) -> str:
        return REJECTED_NAME if self.unknown else self.names[0]


@dataclass(frozen=True)
class Embedded:
    """One readable image through the network: unit-length embedding and the classifier's logits."""

    source: str
    embedding: np.ndarray
    logits: np.ndarray


@dataclass(frozen=True)
class Threshold:
    """Reject as unknown below `value` (None: never). `origin` is printed with every run, so that a
    reader knows what `unknown` means and where the number came from."""

    value: float | None
    origin: str

    def describe(self) -> str:
        if self.value is None:
            return f"no unknown rejection: {self.origin}"
        return f"unknown below {self.value:.6g} ({self.origin})"


# ---------------------------------------------------------------------------------------------
# What a model needs besides its weights


@dataclass(frozen=True)
class ModelInfo:
    """The individuals, the training config (preprocessing, head) and the checkpoint's sha256 that
    galleries are tied to. `export` writes it next to the .onnx file, so that an export predicts
    without the checkpoint."""

    classes: tuple[str, ...]
    config: Config
    checkpoint_sha256: str

    def to_json(self) -> dict:
        return {"classes": list(self.classes), "config": self.config.to_dict(),
                "checkpoint_sha256": self.checkpoint_sha256}

    @classmethod
    def from_json(cls, raw: dict) -> ModelInfo:
        """Raises ValueError for a class list a checkpoint could not hold (`ClassIndex`'s rule: a
        class named `unknown` would pass a rejected photo for a prediction), TypeError for a checksum
        that is no string (the messages about other weights quote its start)."""
        try:
            classes = ClassIndex(raw["classes"]).names
        except DatasetError as exc:
            raise ValueError(str(exc)) from None
        checkpoint_sha256 = raw["checkpoint_sha256"]
        if not isinstance(checkpoint_sha256, str):
            raise TypeError(f"checkpoint_sha256 is {clipped_repr(checkpoint_sha256)}, not a string")
        return cls(classes, config_from_dict(raw["config"]), checkpoint_sha256)


def description_sha256(model: dict) -> str:
    """Of an export JSON's `model` section (class names, config, checkpoint) as written, keys sorted:
    hashed as stored, so that a later code's new config defaults do not change it."""
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()


def export_info_path(onnx_path: Path) -> Path:
    """`out/x_best.onnx` -> `out/x_best.json`: what `export` writes and `predict --onnx` reads."""
    return Path(onnx_path).with_suffix(".json")


@dataclass(frozen=True)
class StoredThresholds:
    """The thresholds evaluation chose, one per way of scoring (`scoring.SCORE_KINDS`: the
    classifier, a gallery's nearest photo, a gallery's prototypes), and where they come from."""

    values: dict[str, float | None]
    origin: str

    def for_kind(self, kind: str) -> Threshold:
        value = self.values.get(kind)
        if value is None:
            return Threshold(None, self.origin if not self.values else f"{self.origin}, but none for {kind} scores")
        if not math.isfinite(value) or abs(value) > THRESHOLD_LIMIT:
            raise InferenceError(f"{self.origin}: the {kind} threshold {value} is not a number in -1..1, the range "
                                 "of the scores; re-run evaluation or pass --threshold")
        return Threshold(float(value), self.origin)


def score_kind(gallery: Gallery | None, match: str) -> str:
    """How a photo is scored: by the classifier without a gallery, else by the gallery's match rule."""
    return "classifier" if gallery is None else match


@dataclass(frozen=True)
class ExportDescription:
    """What `export` writes beside an ONNX file: the model info, the stored thresholds, and what
    `OnnxBackend` checks the file against (`onnx_sha256` is None after a `--format torchscript`
    export, which does not write the .onnx file). `checkpoint`: the file exported, whose threshold
    file the thresholds were read from (None in an export that did not record it)."""

    info: ModelInfo
    thresholds: StoredThresholds
    description_sha256: str
    onnx_sha256: str | None
    checkpoint: Path | None

    def threshold_for(self, kind: str) -> Threshold:
        """The threshold stored at export time, with a note in its origin where evaluation has stored
        another for these weights since, beside the checkpoint (if it is still there): the export keeps
        its copy, and used it without a word, while the checkpoint rejected photos by the new one."""
        chosen = self.thresholds.for_kind(kind)
        if self.checkpoint is None:
            return chosen
        try:
            now = stored_thresholds(self.checkpoint, self.info.checkpoint_sha256)
        except (InferenceError, OSError):  # a damaged or unreachable file there does not stop the export
            return chosen
        value = now.values.get(kind)
        if not now.values or value == self.thresholds.values.get(kind):  # none for these weights, or the same
            return chosen
        shown = "none" if value is None else f"{value:.6g}"
        return Threshold(chosen.value, f"{chosen.origin}; note: evaluation has since stored the {kind} threshold "
                                       f"{shown} in {threshold_sidecar_path(self.checkpoint)}: export again to use it")


def read_export_info(onnx_path: Path) -> ExportDescription:
    """The JSON that `export` wrote beside an ONNX file."""
    if onnx_path.suffix.lower() != ".onnx" or onnx_path.is_dir():
        what = "a folder" if onnx_path.is_dir() else "not an .onnx file"
        raise InferenceError(f"--onnx {onnx_path}: {what}; give the <name>.onnx that export wrote")
    path = export_info_path(onnx_path)
    if not path.is_file():
        raise InferenceError(f"{path} not found: predict --onnx needs the JSON that export writes "
                             "beside the .onnx file (class names, preprocessing, threshold)")
    try:
        raw = json.loads(read_utf8(path, ValueError))
        if raw.get("format_version") != EXPORT_FORMAT_VERSION:
            raise InferenceError(f"{path}: export format {clipped_repr(raw.get('format_version'))}, this code "
                                 f"reads {EXPORT_FORMAT_VERSION}; export again")
        thresholds = raw["thresholds"]
        checkpoint = thresholds.get("checkpoint")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise TypeError(f"the thresholds' checkpoint is {clipped_repr(checkpoint)}, not a path")
        return ExportDescription(ModelInfo.from_json(raw["model"]),
                                 StoredThresholds(threshold_values(thresholds["values"]),
                                                  clipped(str(thresholds["origin"]), ORIGIN_SHOWN)),
                                 description_sha256(raw["model"]), raw.get("onnx_sha256"),
                                 None if checkpoint is None else Path(checkpoint))
    except MALFORMED_JSON as exc:
        raise InferenceError(f"{path}: not a valid export description ({type(exc).__name__}: {exc})") from None


def threshold_values(raw: dict) -> dict[str, float | None]:
    """A stored `{score kind: threshold or null}`, each a number (a string such as "0.5" is refused:
    an edit that quoted it); OverflowError for an integer too large for a float."""
    values = {}
    for kind, value in raw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"the {clipped(str(kind))} threshold is {clipped_repr(value)}, not a number")
        values[str(kind)] = None if value is None else float(value)
    return values


def stored_thresholds(checkpoint: Path, checkpoint_sha256: str) -> StoredThresholds:
    """The thresholds evaluation stored in `<checkpoint>.threshold.json`.

    It is ignored (and the output says so) when absent, or when its checksum names other weights:
    training overwrites `_best.pt`, and a threshold chosen for the old weights would be arbitrary
    for the new ones.
    """
    path = threshold_sidecar_path(Path(checkpoint))
    if not path.is_file():
        return StoredThresholds({}, f"no stored threshold ({path.name} absent: run "
                                    "`python -m src.evaluation.evaluate`) and no --threshold given")
    try:
        raw = json.loads(read_utf8(path, ValueError))
        values = threshold_values(raw["thresholds"])
        method = clipped(str(raw.get("method", "method not recorded")))
    except MALFORMED_JSON as exc:
        raise InferenceError(f"{path}: not a valid threshold file ({type(exc).__name__}: {exc}); "
                             "re-run evaluation or pass --threshold") from None
    if raw.get("checkpoint_sha256", checkpoint_sha256) != checkpoint_sha256:
        return StoredThresholds({}, f"{path.name} was chosen for other weights of this file (re-run "
                                    "evaluation) and no --threshold given")
    return StoredThresholds(values, f"stored in {path.name}: {method}")


def given_threshold(value: float) -> Threshold:
    """A threshold given by the user. Every score is a cosine similarity or a probability, so one
    outside -1..1 would reject every photo, or accept every one, and is refused; but for evaluation's
    own "reject all" and "accept all" values, which lie 1e-5 outside the scores (a copy of one from a
    report is accepted). From the Python API a number of any type (NumPy's, a 0-d tensor) is taken as a
    float; a string or a bool is refused by name (math.isfinite raised a TypeError naming nothing, and
    True was taken for 1.0)."""
    try:
        if isinstance(value, (bool, str, bytes)):  # float() would take "0.5", and True for 1.0
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise InferenceError(f"--threshold {clipped_repr(value)} is not a number") from None
    if not math.isfinite(value):
        raise InferenceError(f"--threshold {value} is not a finite number")
    if abs(value) > THRESHOLD_LIMIT:
        raise InferenceError(f"--threshold {value} is outside -1..1, the range of the scores (cosine "
                             "similarities or probabilities): it would reject every photo or accept every one")
    return Threshold(value, "--threshold")


# ---------------------------------------------------------------------------------------------
# Stages 1-2: decode and normalise exactly as training's evaluation does


class Preprocess:
    """Training's eval path: `decode_for_cache` at the cache size, then `BatchAugment.eval`."""

    def __init__(self, config: Config):
        self.cache_size = cache_size_for(config.data.image_size)
        self.augment = BatchAugment(config.augment, config.data.image_size)

    def decode(self, image: ImageInput) -> np.ndarray:
        """uint8 `S x S x 3` at the cache size. Raises ImageLoadError."""
        if isinstance(image, Image.Image):
            return square_resize(as_rgb(image), self.cache_size)
        if isinstance(image, PhotoBytes):
            return decode_for_cache(image.path, self.cache_size, image.data)
        try:
            folder, problem = Path(image).is_dir(), file_problem(Path(image))
        except OSError as exc:
            raise ImageLoadError(image, unusable_path(exc)) from None
        if folder:
            raise ImageLoadError(image, "a folder, not an image (the Python API takes image files; "
                                        "`collect_images([folder]).files`, from src.inference.inputs, lists "
                                        "a folder's)")
        if problem is not None:
            raise ImageLoadError(image, problem)
        return decode_for_cache(image, self.cache_size)

    def normalise(self, pixels: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        """float32 `N x 3 x image_size x image_size`, ImageNet-normalised, on `device`."""
        return self.augment.eval(torch.from_numpy(np.stack(pixels)).to(device))


# ---------------------------------------------------------------------------------------------
# Stage 3: the network, in PyTorch or ONNX Runtime


class InferenceModule(nn.Module):
    """Normalised images -> (L2-normalised embeddings, logits): what export writes and what the
    PyTorch backend runs, so the parity check compares exactly the graph that predictions use."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.embed_and_classify(images)


class TorchBackend:
    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.module = InferenceModule(model).to(device).eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with reproducible_arithmetic():  # the arithmetic evaluation chose the stored thresholds with
            embeddings, logits = self.module(images)
        return embeddings.cpu().numpy(), logits.cpu().numpy()


class OnnxBackend:
    """An exported model in ONNX Runtime; preprocessing stays on the CPU (the session copies)."""

    def __init__(self, path: Path, device: str):
        providers = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
        if device not in providers:
            raise InferenceError(f"device must be 'cpu' or 'cuda' for an ONNX model, not {device!r}")
        provider = providers[device]
        if provider not in onnxruntime.get_available_providers():
            raise InferenceError(f"--device {device}: this onnxruntime has no {provider} "
                                 f"(it has {', '.join(onnxruntime.get_available_providers())})")
        if not Path(path).is_file():
            raise InferenceError(f"{path}: ONNX file {missing(path, folder=False)}")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=[provider])
        except Exception as exc:  # onnxruntime raises its own exception types, not exported by name
            raise InferenceError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None
        self.path, self.device = Path(path), torch.device("cpu")

    def check_exported_from(self, checkpoint_sha256: str, description: Path) -> None:
        """The file must come from the checkpoint its JSON describes: the JSON is rewritten by every
        export of a checkpoint with the same name, also one with `--format torchscript` only, and
        would then give another model's class names, threshold and gallery checksum to this one."""
        metadata = self.session.get_modelmeta().custom_metadata_map
        recorded = metadata.get(CHECKPOINT_METADATA)
        if recorded is None or DESCRIPTION_METADATA not in metadata:
            raise InferenceError(f"{self.path}: does not record the checkpoint and description it was exported "
                                 "with (an older export); export it again")
        if recorded != checkpoint_sha256:
            raise InferenceError(f"{self.path} was exported from checkpoint sha256 {recorded[:12]}..., but "
                                 f"{description.name} describes {checkpoint_sha256[:12]}... (a later export of "
                                 "another checkpoint of the same name?); export again")

    def check_shapes(self, info: ModelInfo, description: Path) -> None:
        """The graph must take and give what the JSON describes: a JSON edited by hand, or another
        model's, gave an IndexError (or silently wrong names) for a shorter class list, and an ONNX
        Runtime error for every batch for another image size. The batch axis is dynamic."""
        shapes = {arg.name: arg.shape for arg in [*self.session.get_inputs(), *self.session.get_outputs()]}
        missing = [name for name in (INPUT_NAME, *OUTPUT_NAMES) if name not in shapes]
        if missing:
            raise InferenceError(f"{self.path}: the graph has no {' or '.join(missing)} (not written by export); "
                                 "export again")
        size, dim, classes = info.config.data.image_size, info.config.model.embedding_dim, len(info.classes)
        # (name, per-image dims the JSON implies, what the graph holds, what the JSON says)
        expected = [(INPUT_NAME, [3, size, size], "takes {} images", f"says image_size {size}"),
                    ("embeddings", [dim], "gives {}-dimensional embeddings", f"says embedding_dim {dim}"),
                    ("logits", [classes], "gives {} logits per image", f"lists {classes} classes")]
        for name, dims, holds, says in expected:
            declared = shapes[name][1:]  # a named (symbolic) dim is not an int, and fits any size
            if len(declared) != len(dims) or any(isinstance(d, int) and d != e for d, e in zip(declared, dims)):
                raise InferenceError(f"{self.path}: {holds.format(' x '.join(map(str, declared)))}, but "
                                     f"{description.name} {says}; export again")

    def check_description(self, digest: str, description: Path) -> None:
        """The JSON's class names and config must be those exported with the file (after the shapes,
        whose messages say more): an edit that reordered or renamed the classes gave the same
        scores other names, silently."""
        if self.session.get_modelmeta().custom_metadata_map.get(DESCRIPTION_METADATA) != digest:
            raise InferenceError(f"{self.path}: {description.name} is not the description exported with it "
                                 "(its class names or config were edited); export again")

    def check_file(self, onnx_sha256: str | None, description: Path) -> None:
        """The file must hold the bytes export wrote, where the JSON records them: a damaged copy
        whose graph still loads gave wrong scores (weights of a corrupted file: embeddings of length
        1e-10) with exit 0."""
        if onnx_sha256 is not None and file_sha256(self.path) != onnx_sha256:
            raise InferenceError(f"{self.path}: not the file {description.name} was exported with (its sha256 "
                                 "differs: a damaged or altered copy); copy or export it again")

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        embeddings, logits = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.contiguous().numpy()})
        return embeddings, logits


def check_inputs(inputs) -> list[ImageInput]:
    """Any iterable of paths and PIL images (a list, a tuple, a generator such as `Path.glob`), as a
    list; anything else is a TypeError naming what was given."""
    if isinstance(inputs, (bytes, *ONE_IMAGE)):
        raise TypeError(f"expected a list of images, got one {type(inputs).__name__}; "
                        "`identify` takes a single image too")
    items = list(inputs)
    for index, item in enumerate(items):
        if not isinstance(item, ONE_IMAGE):
            raise TypeError(f"image {index}: expected a path (str or pathlib.Path) or a PIL image, "
                            f"got {type(item).__name__}")
    return items


# ---------------------------------------------------------------------------------------------
# The identifier


def _checkpoint_backend(path: str | Path, device: str) -> tuple[TorchBackend, ModelInfo]:
    """A training checkpoint's model on `device`, and what it knows (classes, config, sha256)."""
    # Imported here: the ONNX path needs neither torchvision nor the model code.
    from src.models.backbones import ModelError
    from src.models.trained import load_trained

    torch_device = pick_device(device, InferenceError)
    try:
        run = load_trained(Path(path), torch_device)
    except ModelError as exc:
        raise InferenceError(str(exc)) from None
    return TorchBackend(run.model, torch_device), ModelInfo(tuple(run.classes.names), run.config, run.sha256)


class Identifier:
    """Preprocessing, a backend, the individuals to score against and the threshold, together.

    Build it with `from_checkpoint` or `from_onnx`. `identify` is the simple call (raises on an
    unreadable image); `predict` streams `Prediction`s and `Skipped`s for many files; `embed` gives
    the embeddings that a gallery stores.
    """

    def __init__(self, backend: TorchBackend | OnnxBackend, info: ModelInfo, threshold: Threshold,
                 gallery: Gallery | None = None, match: str = DEFAULT_MATCH):
        if match not in MATCH_MODES:
            raise InferenceError(f"match must be one of {', '.join(MATCH_MODES)}, not {match!r}")
        if gallery is not None:
            gallery.check_checkpoint(info.checkpoint_sha256, info.config.model.embedding_dim)
            if not gallery.names:
                raise InferenceError("the gallery holds no individuals: enroll some first")
        self.backend, self.info, self.threshold = backend, info, threshold
        self.gallery, self.match = gallery, match
        self.preprocess = Preprocess(info.config)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", gallery: Gallery | None = None,
                        threshold: float | None = None, match: str = DEFAULT_MATCH) -> Identifier:
        """The model of a training checkpoint; with a gallery (`Gallery.load(path)`), predictions
        name its individuals. `threshold` overrides the one evaluation stored. Raises one of
        USAGE_ERRORS, or GalleryError for a gallery of other weights."""
        backend, info = _checkpoint_backend(path, device)
        chosen = (stored_thresholds(Path(path), info.checkpoint_sha256).for_kind(score_kind(gallery, match))
                  if threshold is None else given_threshold(threshold))
        return cls(backend, info, chosen, gallery, match)

    @classmethod
    def embedder(cls, path: str | Path, device: str = "cpu") -> Identifier:
        """The model of a training checkpoint, to embed photos only (`gallery enroll`): it reads no
        threshold, so a missing or damaged threshold file of evaluation does not stop an enrollment."""
        backend, info = _checkpoint_backend(path, device)
        return cls(backend, info, Threshold(None, "embedding only"), None, DEFAULT_MATCH)

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "cpu", gallery: Gallery | None = None,
                  threshold: float | None = None, match: str = DEFAULT_MATCH) -> Identifier:
        """An exported model; classes, preprocessing and threshold come from the JSON beside it."""
        exported = read_export_info(Path(path))
        info, json_path = exported.info, export_info_path(path)
        chosen = (exported.threshold_for(score_kind(gallery, match)) if threshold is None
                  else given_threshold(threshold))
        backend = OnnxBackend(Path(path), device)
        backend.check_exported_from(info.checkpoint_sha256, json_path)
        backend.check_shapes(info, json_path)
        backend.check_description(exported.description_sha256, json_path)
        backend.check_file(exported.onnx_sha256, json_path)
        return cls(backend, info, chosen, gallery, match)

    @property
    def names(self) -> tuple[str, ...]:
        """The individuals predictions choose from: the gallery's, else the checkpoint's."""
        return tuple(self.gallery.names) if self.gallery is not None else self.info.classes

    def describe(self) -> str:
        """One line: what predictions are scored against and when they are `unknown`."""
        if self.gallery is None:
            what = f"{len(self.names)} training individuals (classifier)"
        else:
            what = (f"gallery of {counted(len(self.names), 'individual')}, "
                    f"{counted(len(self.gallery.labels), 'image')} ({self.match} matching)")
        return f"{what}; {self.threshold.describe()}"

    # --- running --------------------------------------------------------------------------------

    def embed(self, inputs: Sequence[ImageInput], batch_size: int = DEFAULT_BATCH_SIZE,
              progress: Callable[[int], None] | None = None) -> Iterator[list[Embedded | Skipped]]:
        """Per batch, in input order: an Embedded for each readable input, a Skipped otherwise.
        `progress(n)` is called with the number of inputs each batch consumed. `inputs` may be any
        iterable (e.g. `Path("photos").glob("*.jpg")`)."""
        inputs = check_inputs(inputs)
        batch_size = positive_int("batch_size", batch_size, InferenceError)
        return self._embed(inputs, batch_size, progress)

    def _embed(self, inputs: list[ImageInput], batch_size: int,
               progress: Callable[[int], None] | None) -> Iterator[list[Embedded | Skipped]]:
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            for start in range(0, len(inputs), batch_size):
                chunk = inputs[start:start + batch_size]
                sources = [_source_name(item, start + i) for i, item in enumerate(chunk)]
                decoded = list(pool.map(self._decode_or_reason, chunk))
                readable = [pixels for pixels in decoded if isinstance(pixels, np.ndarray)]
                outputs = iter(zip(*self._forward(readable))) if readable else iter(())
                yield [Embedded(source, *next(outputs)) if isinstance(pixels, np.ndarray)
                       else Skipped(source, pixels) for source, pixels in zip(sources, decoded)]
                if progress is not None:
                    progress(len(chunk))

    def predict(self, inputs: Sequence[ImageInput], top_k: int = DEFAULT_TOP_K, batch_size: int = DEFAULT_BATCH_SIZE,
                progress: Callable[[int], None] | None = None) -> Iterator[Prediction | Skipped]:
        """A Prediction or a Skipped for every input, in input order."""
        top_k = positive_int("top_k", top_k, InferenceError)
        return self._predict(self.embed(inputs, batch_size, progress), top_k)

    def _predict(self, batches: Iterator[list[Embedded | Skipped]], top_k: int) -> Iterator[Prediction | Skipped]:
        for batch in batches:
            done = [item for item in batch if isinstance(item, Embedded)]
            predictions = iter(self.decide(done, top_k)) if done else iter(())
            yield from (next(predictions) if isinstance(item, Embedded) else item for item in batch)

    def identify(self, images: ImageInput | Sequence[ImageInput], top_k: int = DEFAULT_TOP_K,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> list[Prediction]:
        """Predictions for one image (a path or a PIL image) or a list of them.
        Raises ImageLoadError for the first unreadable one."""
        inputs = [images] if isinstance(images, ONE_IMAGE) else check_inputs(images)
        predictions = []
        for item in self.predict(inputs, top_k, batch_size):
            if isinstance(item, Skipped):
                raise ImageLoadError(item.source, item.reason)
            predictions.append(item)
        return predictions

    # --- stages ---------------------------------------------------------------------------------

    def _decode_or_reason(self, image: ImageInput) -> np.ndarray | str:
        try:
            return self.preprocess.decode(image)
        except ImageLoadError as exc:
            return exc.reason

    def _forward(self, pixels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.backend(self.preprocess.normalise(pixels, self.backend.device))

    def scores(self, embeddings: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """`N x len(self.names)`: similarity to each gallery individual, else the classifier's score."""
        if self.gallery is not None:
            return self.gallery.scores(embeddings, self.match)
        return classifier_scores(logits, self.info.config.model)

    def decide(self, embedded: Sequence[Embedded], top_k: int) -> list[Prediction]:
        """Top-k names and scores per image; `unknown` when the best score is below the threshold."""
        scores = self.scores(np.stack([e.embedding for e in embedded]), np.stack([e.logits for e in embedded]))
        k = min(top_k, scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        names, threshold = self.names, self.threshold.value
        return [Prediction(item.source, tuple(names[i] for i in row), tuple(float(s) for s in scores[n, row]),
                           threshold is not None and bool(scores[n, row[0]] < threshold))
                for n, (item, row) in enumerate(zip(embedded, order))]


def _source_name(image: ImageInput, index: int) -> str:
    if isinstance(image, PhotoBytes):
        return str(image.path)
    return f"<image {index}>" if isinstance(image, Image.Image) else str(image)
