"""The one schema for every config key, its type and its default.

`load_config(path)` validates a YAML file before any work starts; anything wrong is a `ConfigError`
whose message is one line naming the key, which the command-line entry points print and exit 2 on.
"""
from __future__ import annotations

import difflib
import math
import unicodedata
from pathlib import Path
from typing import ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from src.errors import clipped, folder_or_file
from src.textfiles import parse_yaml, read_utf8


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# The torchvision networks `src.models.backbones` builds.
BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line and names the offending key."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored. allow_inf_nan=False: `.inf`
    # or `.nan` is a typo for every number here (an infinite warm-up or lr cannot train).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    RESUMABLE: ClassVar[frozenset[str]] = frozenset()
    """This section's keys that a resumed run may change (see `RESUMABLE_CHANGES`)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers_nor_empty_paths(cls, value, info: ValidationInfo):
        # YAML reads yes/no/on/off/true/false as booleans, which pydantic would turn into 1/0 for a
        # number (`max_epochs: yes` training one epoch); booleans only where a key accepts them.
        annotation = cls.model_fields[info.field_name].annotation
        types = {annotation, *get_args(annotation)}
        if isinstance(value, bool) and bool not in types and types & {int, float}:
            raise PydanticCustomError("bool_not_number", "Input should be a number, not true/false")
        # Path("") is the current folder: `output_dir: ""` (a templated config's unset variable) wrote
        # the run's checkpoints there, as the command line's empty paths did (errors.path_argument).
        if value == "" and Path in types:
            raise PydanticCustomError("empty_path", "an empty path (it would mean the current folder)")
        return value


class DataConfig(_Section):
    # Where the images are read from and how: the individuals and training images must stay the same
    # (the resume checks the class list and the split's fingerprint).
    RESUMABLE = frozenset({"root", "pipeline", "cache_dir", "cache_on_device", "workers"})

    root: Path = Path("data/chimpanzee_faces")
    """The `--out-dir` of `python -m src.data.prepare` (holds `annotations/prepared.json`)."""
    num_classes: int = Field(87, gt=1)
    """Must equal the number of individuals in the prepared training split."""
    open_set: bool = False
    """Train on the open-set split (held-out individuals excluded) instead of the closed set."""
    image_size: int = Field(224, ge=32, le=1024)
    pipeline: Literal["cached", "plain"] = "cached"
    """`cached`: decode once into a uint8 cache, augment whole batches on the device (fast).
    `plain`: decode every image every epoch in DataLoader workers (huge datasets); the same batch
    augmentation on the device follows."""
    cache_dir: Path | None = None
    """Where the decoded-image cache lives; default (None) `<root>/cache`: see `cache_folder`."""
    cache_on_device: bool = True
    """Keep the uint8 cache in GPU memory when training on CUDA (else, or where it does not fit, it stays
    memory-mapped in host memory and each batch goes to the GPU through a pinned buffer)."""
    workers: int = Field(4, ge=0)
    """DataLoader workers for the plain pipeline, and processes building the cache (at most one per core)."""

    @property
    def cache_folder(self) -> Path:
        """`cache_dir`, or `<root>/cache` when it is not set (worked out here, when it is used, so a
        `root` changed after loading takes its cache along)."""
        return self.cache_dir if self.cache_dir is not None else self.root / "cache"


class AugmentConfig(_Section):
    crop_scale_min: float = Field(0.7, gt=0, le=1)
    """Random resized crop: smallest fraction of the image area kept (area uniform from here to 1; the
    aspect, 3/4..4/3, narrows to what fits as the area nears 1)."""
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.2, ge=0, le=1)
    """Strength of brightness, contrast and saturation jitter."""
    rotation_degrees: float = Field(10.0, ge=0, le=180)
    random_erasing: float = Field(0.25, ge=0, le=1)
    """Probability of erasing one random rectangle of 2-20% of the image, aspect 0.3-3.3 (occlusion by
    branches, hands)."""


class ModelConfig(_Section):
    backbone: BackboneName = "resnet18"
    pretrained: bool | Path = False
    """`true`: torchvision's ImageNet weights (must be downloadable or cached); a path: a local
    weights file for the backbone; `false`: random initialisation."""
    embedding_dim: int = Field(512, gt=0, le=8192)
    """Size of the embedding the head classifies and galleries store (face-ID models use 128-1024;
    the bound turns a typo into a config error instead of a failed multi-GB allocation)."""
    head: Literal["arcface", "linear"] = "arcface"
    arcface_margin: float = Field(0.5, ge=0, lt=math.pi / 2)
    """Additive angular margin in radians."""
    arcface_scale: float = Field(30.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainerConfig(_Section):
    # max_epochs may grow (extending a finished run; the rest of the learning-rate schedule is re-drawn,
    # and the resume says so); amp changes numerics slightly but keeps the run meaningful.
    RESUMABLE = frozenset({"max_epochs", "device", "amp", "amp_dtype", "compile", "compile_mode", "progress",
                           "output_dir", "deterministic", "checkpoint_interval_s"})

    max_epochs: int = Field(50, gt=0)
    batch_size: int = Field(64, ge=2)
    """Global batch size: split evenly across processes under torchrun, at least 2 images each
    (BatchNorm cannot normalise a batch of one)."""
    lr: float = Field(4e-4, gt=0)
    """Peak learning rate for the global batch size (not scaled automatically with processes)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip_norm: float | None = Field(None, gt=0)
    device: Literal["cuda", "cpu"] = "cuda"
    amp: bool = True
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    channels_last: bool = True
    """Model weights and input batches in channels_last (NHWC) memory order, which GPU convolutions
    run fastest in; `false`: both in the default NCHW order."""
    compile: bool = False
    """torch.compile the model (CUDA; costs a minute of compilation, pays off on long runs)."""
    compile_mode: CompileMode = "default"
    """torch.compile's `mode` for the model when `compile` is on. `reduce-overhead` replays each
    step's kernels as CUDA graphs, which removes most of the host's per-step launch work (what
    limits small models on fast GPUs); under torchrun, whose DDP hooks do not mix with CUDA graphs, the
    same without them (`default`; `max-autotune-no-cudagraphs` for `max-autotune`), with a note.
    Measured on an H100: resnet18 trains at 12,505 img/s with it against 9,181 with `default`, in one
    run; on an H200 the guide's 200-epoch resnet50 run took 278.9 s with it and 314.2 s with `default`
    (docs/PERFORMANCE.md, "Measured speed")."""
    sync_batchnorm: bool = False
    """Under torchrun: convert BatchNorm layers to SyncBatchNorm."""
    seed: int = Field(0, ge=-(2**63), lt=2**64)
    """Any integer torch.manual_seed accepts."""
    deterministic: bool = False
    """Ask cuDNN/cuBLAS for deterministic kernels (slower; sets CUBLAS_WORKSPACE_CONFIG=:4096:8 unless
    set; an operation without a deterministic kernel warns). CPU runs are deterministic anyway."""
    checkpoint_interval_s: float = Field(0.0, ge=0, allow_inf_nan=True)
    """Write the checkpoints at most this often (seconds); the run's end and a stop signal always
    write, and the best epoch is kept in memory until then. 0: after every epoch. A crash loses at
    most this much training; on a fast GPU, writing a few hundred MB every second-long epoch costs
    more than the epoch. `.inf`: only at the end and on a stop."""
    output_dir: Path = Path("artifacts")
    progress: Literal["auto", "always", "never"] = "auto"
    """Progress bar within an epoch: `auto` shows it only on an interactive terminal."""

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_the_run(cls, value: float, info: ValidationInfo) -> float:
        max_epochs = info.data.get("max_epochs")  # absent when max_epochs itself was invalid
        if max_epochs is not None and value > max_epochs:
            raise PydanticCustomError("warmup_too_long", "must be at most trainer.max_epochs ({max_epochs}): the "
                                      "rate would never reach trainer.lr, nor decay", {"max_epochs": max_epochs})
        return value


MAX_NAME_BYTES = 200  # of a run name (UTF-8), see Config._file_name


class Config(_Section):
    RESUMABLE = frozenset({"name"})  # a run continued under new files (`--resume <its _last.pt>`)

    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    name: str | None = None
    """Run name for artifact files (`<output_dir>/<name>_best.pt`, ...); default: the config file's
    stem (`run` for a config built in Python)."""

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        # The name becomes part of file names inside output_dir: a separator or '..' would write elsewhere,
        # and a control character (a newline) would make names no listing or message shows as they are.
        if (not value.strip() or value in (".", "..")
                or any(c in "/\\" or unicodedata.category(c) == "Cc" for c in value)):
            raise PydanticCustomError("run_name", "must be usable as a file name: not empty, no '/', '\\', "
                                      "'..' or control characters")
        if len(value.encode()) > MAX_NAME_BYTES:
            # Found only when the first checkpoint was written, an epoch into the run.
            raise PydanticCustomError("run_name", f"is {len(value.encode())} bytes long; at most {MAX_NAME_BYTES}: "
                                      "file names hold 255 bytes, and the run's longest file adds 36 "
                                      "(.<name>_best.pt.threshold.json.tmp-<pid>)")
        return value

    def to_dict(self) -> dict:
        """Plain, JSON-safe dict (stored inside checkpoints, loadable with weights_only)."""
        return self.model_dump(mode="json")


def flatten(tree: dict, prefix: str = "") -> dict:
    """`{"trainer": {"lr": 0.1}}` -> `{"trainer.lr": 0.1}`: a config dict (`Config.to_dict`) by dotted key."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resumable(section: type[_Section], prefix: str = "") -> frozenset[str]:
    keys = {prefix + key for key in section.RESUMABLE}
    for key, field in section.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
            keys |= _resumable(field.annotation, f"{prefix}{key}.")
    return frozenset(keys)


# The dotted keys that change how fast or where a run goes, not what it computes: a resume may change
# them, every other key must match the checkpoint's (src/training/resume.py). Each section lists its own.
RESUMABLE_CHANGES = _resumable(Config)


def _key_suggestion(loc: tuple) -> str:
    """' (did you mean 'trainer.max_epochs'?)' for a misspelt key: the closest key of its section."""
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        section = section.model_fields[part].annotation
    close = difflib.get_close_matches(str(loc[-1]), section.model_fields, n=1, cutoff=0.8)
    return f" (did you mean '{'.'.join(map(str, (*loc[:-1], close[0])))}'?)" if close else ""


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = clipped(".".join(str(part) for part in first["loc"]) or "<root>")
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}'{_key_suggestion(first['loc'])}"
    return f"'{key}': {first['msg']} (got {clipped(repr(first.get('input')), 80)})"


def config_from_dict(raw: dict, name: str | None = None) -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if config.name is None:
        try:  # validated as a name written in the file would be: a file stem can hold a '\\' or a tab
            config.name = name or "run"
        except ValidationError as exc:
            raise ConfigError(f"{_describe(exc)}: the run is named after the config file; rename it or set "
                              "`name:` in it") from None
    return config


def _config_suggestion(path: Path) -> str:
    """' (did you mean X?)' for the closest config file beside `path` or in configs/: a missing config is
    most often a typo, a left-out folder or extension (`train_chimp_min10`, `.yml`)."""
    folders = dict.fromkeys((Path("configs"), path.parent))  # in order: a file beside `path` wins a name
    by_name = {p.name: p for folder in folders if folder.is_dir() for p in sorted(folder.glob("*.y*ml"))}
    close = difflib.get_close_matches(path.name, by_name, n=1, cutoff=0.8)
    return f" (did you mean {by_name[close[0]]}?)" if close else ""


def load_config(path: str | Path) -> Config:
    """Parse and validate a YAML config. Raises ConfigError (one line) on any problem."""
    path = Path(path)
    folder, regular_file = folder_or_file(path, ConfigError, "config")
    if folder:
        raise ConfigError(f"{path}: a folder, not a config file (e.g. configs/train_chimp_min10.yaml)")
    if not regular_file:
        raise ConfigError(f"config file not found: {path}{_config_suggestion(path)}" if not path.exists() else
                          f"{path}: not a regular file (a pipe or a device, as `<(...)` gives); the run is named "
                          "after its config file: save the config as a file")
    raw = parse_yaml(read_utf8(path, ConfigError), path, ConfigError)
    if raw is None:  # an empty file (or one of comments) is a mistake, not a request for every default
        raise ConfigError(f"{path}: empty config; expected sections (data, model, trainer, ...), "
                          "e.g. a copy of configs/train_chimp_min10.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, trainer, ...)")
    return config_from_dict(raw, name=path.stem)
