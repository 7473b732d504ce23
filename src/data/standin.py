"""Synthetic stand-in images in the exact raw layout of the public C-Zoo / C-Tai release.

The real chimpanzee photos cannot be fetched where this project is developed and tested, yet every
stage (prepare, training, evaluation, benchmarks) needs images in the cvjena layout. This module draws
them. They are NOT chimpanzees: each "individual" is a drawn cartoon face with a stable identity (head
and face shape, skin tone, eye spacing, marking blobs and stripes) and every image adds nuisance
variation (pose, scale, lighting, colour cast, blur, occlusion, cluttered background) so that a model
has to generalise. Good for exercising the pipeline and measuring speed; meaningless for accuracy
claims about real chimpanzees.

    python -m src.data.standin --out data/chimpanzee_faces/raw \
        --from-annotations ../shared/chimpanzee_faces/annotations/raw
    python -m src.data.standin --out /tmp/raw --individuals 10 --images 40 --size 64
    python -m src.data.standin --calibrate      # trains resnet18 briefly on CPU, prints val accuracy

Every random draw comes from a generator seeded by (seed, individual name) or (seed, image key), never
from shared state, so the output is byte-identical for a seed whatever the worker count or order.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from src import atomic
from src.data.annotations import (CVJENA_SOURCES, FIELD_SPELLINGS, KEYPOINT_NAMES, RELEASE_FOLDER,
                                  STANDIN_MARKER, AnnotationError, parse_cvjena_line)
from src.errors import clipped_repr, command_main, command_parser, path_argument
from src.parallel import WorkerDied, map_in_processes
from src.tables import print_stdout
from src.textfiles import read_utf8

IMAGE_FOLDER = "face_images"

# Invented names (none is a real individual of the release, so a stand-in list is never mistaken for
# the real one); more individuals than names get a numeric suffix: Abeni, ..., Abeni2, ...
NAMES = (
    "Abeni", "Bako", "Chiku", "Dede", "Ekon", "Femi", "Gyasi", "Hasani", "Imani", "Jabari",
    "Kamau", "Lulu", "Makena", "Nuru", "Obi", "Pendo", "Quaye", "Rafiki", "Sefu", "Tatu",
    "Ubah", "Vuai", "Wambui", "Xola", "Yaro", "Zuri", "Amara", "Baraka", "Chausiku", "Dalila",
)

SUPERSAMPLE = 2  # shapes are drawn at twice the output size and box-filtered down, for smooth edges
MIN_SIZE, MAX_SIZE = 16, 2048  # --size; at 100,000 the drawing took 23 GB before the OOM killer came
MAX_IMAGES = 1_000_000  # --individuals x --images
CALIBRATE_DEFAULTS = {"individuals": 10, "images": 40, "size": 64, "epochs": 10}
CALIBRATE_MAX_GIB = 8
_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 33)[:-1]),
                    np.sin(np.linspace(0, 2 * np.pi, 33)[:-1])], axis=1)


class StandinError(Exception):
    """A problem with the user's input; main() prints it as one line and exits non-zero."""


def _rng(seed: int, stream: int, key: str) -> np.random.Generator:
    """Independent generator per (seed, stream, key): no draw depends on another image's draws."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, stream, digest])


# ---------------------------------------------------------------------------------------------------
# Identity: what stays the same across every image of one individual.


@dataclass(frozen=True)
class Identity:
    """Shape parameters in units of the face radius (x to the image right, y down) plus colours."""

    skin: np.ndarray
    hair: np.ndarray
    head: tuple[float, float]          # half-width, half-height of the fur outline
    face: tuple[float, float]          # half-width, half-height of the bare skin
    eye_dx: float
    eye_y: float
    eye_r: float
    brow: float                        # brow-ridge thickness
    muzzle: tuple[float, float, float]  # half-width, half-height, centre y
    ear: tuple[float, float]           # radius, centre y
    marks: tuple[tuple[float, ...], ...]    # (x, y, rx, ry, angle, brightness factor)
    stripes: tuple[tuple[float, ...], ...]  # (x0, y0, x1, y1, width, brightness factor)

    @property
    def ear_x(self) -> float:
        """Ears sit just inside the fur outline."""
        return self.head[0] * 0.92


@functools.lru_cache(maxsize=1024)
def make_identity(name: str, seed: int) -> Identity:
    """The stable look of one individual, drawn from (seed, name) alone (cached: drawn per image).

    Skin tones span a narrow range on purpose: per-image lighting and colour cast vary more than
    identities do, so mean colour alone cannot identify an individual and a model has to learn shape
    and markings.
    """
    rng = _rng(seed, 0, name)
    u = rng.uniform
    skin = np.array([150.0, 115.0, 95.0]) * u(0.8, 1.15) + rng.normal(0, 6, 3)
    hair = np.array([45.0, 36.0, 30.0]) * u(0.7, 1.3)
    face_w, face_h = u(0.6, 0.8), u(0.78, 0.98)
    marks = []
    for _ in range(rng.integers(3, 7)):
        radius, angle = 0.85 * math.sqrt(u()), u(0, 2 * math.pi)
        factor = u(0.35, 0.65) if u() < 0.6 else u(1.35, 1.7)  # dark freckle or pale patch
        marks.append((radius * face_w * math.cos(angle), 0.05 + radius * face_h * math.sin(angle),
                      u(0.06, 0.17), u(0.05, 0.13), u(0, math.pi), factor))
    stripes = []
    for _ in range(rng.integers(0, 3)):
        x0, y0 = u(-0.5, 0.5) * face_w, u(-0.5, 0.6) * face_h
        stripes.append((x0, y0, x0 + u(-0.4, 0.4), y0 + u(-0.4, 0.4), u(0.03, 0.07), u(0.4, 0.6)))
    return Identity(
        skin=skin, hair=hair,
        head=(u(1.0, 1.18), u(1.05, 1.22)), face=(face_w, face_h),
        eye_dx=u(0.18, 0.34), eye_y=u(-0.3, -0.12), eye_r=u(0.06, 0.1), brow=u(0.05, 0.14),
        muzzle=(u(0.32, 0.52), u(0.2, 0.3), u(0.42, 0.58)), ear=(u(0.17, 0.3), u(-0.2, 0.05)),
        marks=tuple(marks), stripes=tuple(stripes),
    )


# ---------------------------------------------------------------------------------------------------
# Pose: where the canonical face lands in one image.


@dataclass(frozen=True)
class Pose:
    """Canonical face coordinates -> canvas pixels: squash (yaw), scale, rotate, translate."""

    centre: tuple[float, float]
    radius: float
    angle: float
    yaw: float  # -1..1: positive turns the face toward the image right, hiding the right-hand ear

    def apply(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        x = p[:, 0] * (1 - abs(self.yaw) * 0.5) + self.yaw * 0.25 * (1 - p[:, 0] ** 2).clip(0)
        y = p[:, 1]
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.centre[0] + self.radius * (c * x - s * y),
                         self.centre[1] + self.radius * (s * x + c * y)], axis=1)


def _ellipse(pose: Pose, cx: float, cy: float, rx: float, ry: float,
             angle: float = 0.0) -> list[tuple[float, float]]:
    """Polygon of a rotated ellipse given in face coordinates (PIL cannot rotate ellipses)."""
    c, s = math.cos(angle), math.sin(angle)
    local = _CIRCLE * (rx, ry)
    pts = np.stack([cx + c * local[:, 0] - s * local[:, 1], cy + s * local[:, 0] + c * local[:, 1]], 1)
    return [tuple(p) for p in pose.apply(pts)]


def _colour(rgb: np.ndarray, factor: float = 1.0) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(rgb) * factor, 0, 255))


def _draw_face(draw: ImageDraw.ImageDraw, ident: Identity, pose: Pose, line_scale: float) -> None:
    """Fur, ears, bare face, markings, brow, eyes, muzzle, nostrils, mouth: back to front."""
    skin, fw, fh = ident.skin, *ident.face
    ear_r, ear_y = ident.ear
    for side in (-1, 1):
        draw.polygon(_ellipse(pose, side * ident.ear_x, ear_y, ear_r, ear_r * 1.25), fill=_colour(skin, 0.85))
    draw.polygon(_ellipse(pose, 0, 0, *ident.head), fill=_colour(ident.hair))
    draw.polygon(_ellipse(pose, 0, 0.08, fw, fh), fill=_colour(skin))
    for x, y, rx, ry, angle, factor in ident.marks:
        draw.polygon(_ellipse(pose, x, y, rx, ry, angle), fill=_colour(skin, factor))
    for x0, y0, x1, y1, width, factor in ident.stripes:
        ends = pose.apply([(x0, y0), (x1, y1)])
        draw.line([tuple(p) for p in ends], fill=_colour(skin, factor),
                  width=max(1, round(width * pose.radius)))
    draw.polygon(_ellipse(pose, 0, ident.eye_y - ident.eye_r * 1.4, ident.eye_dx + ident.eye_r * 2.2,
                          ident.brow), fill=_colour(skin, 0.7))
    for side in (-1, 1):
        draw.polygon(_ellipse(pose, side * ident.eye_dx, ident.eye_y, ident.eye_r * 1.3, ident.eye_r),
                     fill=(40, 24, 14))
    mw, mh, my = ident.muzzle
    draw.polygon(_ellipse(pose, 0, my, mw, mh), fill=_colour(skin, 1.18))
    for side in (-1, 1):
        draw.polygon(_ellipse(pose, side * 0.07, my - mh * 0.55, 0.035, 0.025), fill=_colour(skin, 0.35))
    mouth = pose.apply([(-mw * 0.7, my + mh * 0.3), (mw * 0.7, my + mh * 0.3)])
    draw.line([tuple(p) for p in mouth], fill=_colour(skin, 0.4), width=max(1, round(2 * line_scale)))


def _keypoints(ident: Identity, pose: Pose) -> np.ndarray:
    """Canvas positions of KEYPOINT_NAMES; the animal's right eye and ear are on the image left."""
    ear_r, ear_y = ident.ear
    ear_x = ident.ear_x
    canonical = [(-ident.eye_dx, ident.eye_y), (ident.eye_dx, ident.eye_y),
                 (0.0, ident.muzzle[2] + ident.muzzle[1] * 0.3),
                 (ear_x, ear_y + ear_r * 1.1), (-ear_x, ear_y + ear_r * 1.1)]
    return pose.apply(canonical)


# ---------------------------------------------------------------------------------------------------
# Nuisance: background, occlusion, photometric changes.


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth foliage-coloured blotches with leaves and twigs: clutter a model must learn to ignore."""
    base = np.array([70.0, 85.0, 45.0]) * rng.uniform(0.5, 1.6) + rng.normal(0, 15, 3)
    coarse = np.clip(base + rng.normal(0, 30, (4, 4, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(4, 12)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.12) * w
        fill = _colour(base, rng.uniform(0.5, 1.6))
        if rng.uniform() < 0.7:
            draw.ellipse([x - r, y - r * 0.5, x + r, y + r * 0.5], fill=fill)
        else:
            draw.line([(x, y), (x + rng.uniform(-3, 3) * r, y + rng.uniform(-3, 3) * r)], fill=fill,
                      width=max(1, int(r * 0.25)))
    return img


def _occlude(rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int,
             h: int) -> list[tuple[float, float]]:
    """Sometimes cover part of the face with a patch or a branch; returns its polygon (or [])."""
    kind = rng.uniform()
    if kind < 0.5:
        return []
    fill = _colour(np.array([60.0, 70.0, 40.0]), rng.uniform(0.5, 2.0))
    if kind < 0.75:  # a leaf or rock patch over one side
        pw, ph = rng.uniform(0.15, 0.35) * w, rng.uniform(0.15, 0.35) * h
        x, y = rng.uniform(0, w - pw), rng.uniform(0, h - ph)
        poly = [(x, y), (x + pw, y), (x + pw, y + ph), (x, y + ph)]
    else:  # a branch across the image
        y0, y1, half = rng.uniform(0, h), rng.uniform(0, h), rng.uniform(0.03, 0.07) * h
        poly = [(0, y0 - half), (w, y1 - half), (w, y1 + half), (0, y0 + half)]
    draw.polygon(poly, fill=fill)
    return poly


def _inside(poly: list[tuple[float, float]], x: float, y: float) -> bool:
    """Even-odd point-in-polygon test, for keypoints hidden by an occluder."""
    inside = False
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def _photometric(rng: np.random.Generator, img: Image.Image, size: int) -> Image.Image:
    """Blur, then gain, contrast, colour cast, an illumination gradient and sensor noise."""
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.3) * size / 128))
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape[:2]
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.65, 1.25) + mean
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(direction) * np.linspace(-1, 1, w)[None, :]
            + np.sin(direction) * np.linspace(-1, 1, h)[:, None])
    gain = rng.uniform(0.6, 1.35) * (1 + rng.uniform(0, 0.3) * ramp)
    a = a * gain[:, :, None].astype(np.float32) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    a += rng.normal(0, rng.uniform(1, 8), a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------
# One image.


def render(name: str, key: str, size: int, seed: int) -> tuple[Image.Image, list[tuple[int, int] | None]]:
    """Draw one image of individual `name`; `key` (unique per image) seeds its nuisance.

    Returns the RGB image (each side within about 10% of `size`, as real crops vary) and the keypoints
    in KEYPOINT_NAMES order, None where the point is outside the image, occluded or on the far side.
    """
    ident = make_identity(name, seed)
    rng = _rng(seed, 1, key)
    w, h = (round(size * rng.uniform(0.9, 1.1)) for _ in range(2))
    cw, ch = w * SUPERSAMPLE, h * SUPERSAMPLE
    canvas = _background(rng, cw, ch)
    draw = ImageDraw.Draw(canvas)
    pose = Pose(centre=(cw / 2 + rng.uniform(-0.08, 0.08) * cw, ch / 2 + rng.uniform(-0.08, 0.08) * ch),
                radius=min(cw, ch) * 0.36 * rng.uniform(0.8, 1.12),
                angle=math.radians(rng.uniform(-22, 22)), yaw=rng.uniform(-0.35, 0.35))
    _draw_face(draw, ident, pose, line_scale=SUPERSAMPLE * size / 128)
    occluder = _occlude(rng, draw, cw, ch)
    img = _photometric(rng, canvas.reduce(SUPERSAMPLE), size)
    far_ear = "LeftEarlobe" if pose.yaw > 0.15 else "RightEarlobe" if pose.yaw < -0.15 else None
    points: list[tuple[int, int] | None] = []
    for label, (x, y) in zip(KEYPOINT_NAMES, _keypoints(ident, pose)):
        hidden = label == far_ear or (occluder and _inside(occluder, x, y))
        visible = 0 <= x < cw and 0 <= y < ch and not hidden
        points.append((round(x / SUPERSAMPLE), round(y / SUPERSAMPLE)) if visible else None)
    return img, points


@dataclass(frozen=True)
class ImageJob:
    """One PNG to write: picklable, so a worker process needs nothing else."""

    path: Path
    name: str
    key: str
    size: int
    seed: int


def _write_one(job: ImageJob) -> list[tuple[int, int] | None]:
    img, points = render(job.name, job.key, job.size, job.seed)
    try:
        with atomic.naming(job.path):
            img.save(job.path, format="PNG", compress_level=1)  # level 6 costs 1.7x the time for 10% less disk
    except BaseException:  # a full disk: no half-written image left to pass for a stand-in
        job.path.unlink(missing_ok=True)
        raise
    return points


def _run_jobs(jobs: Sequence[ImageJob], workers: int) -> list[list[tuple[int, int] | None]]:
    """Write every image, in worker processes when workers > 1; results come back in job order."""
    for folder in {job.path.parent for job in jobs}:
        atomic.make_folder(folder)
    if workers <= 1 or len(jobs) < 2:
        return [_write_one(job) for job in jobs]
    chunk = max(1, min(64, len(jobs) // (workers * 4)))
    return list(map_in_processes(_write_one, jobs, workers, __name__, chunk))


# ---------------------------------------------------------------------------------------------------
# Annotation files.


@dataclass(frozen=True)
class Member:
    """Metadata of one generated individual: written into every annotation line of its images."""

    name: str
    source: str
    age: str
    age_group: str
    gender: str


def individual_name(i: int) -> str:
    """Deterministic, whitespace-free, unique: NAMES in order, then NAMES with a numeric suffix."""
    base = NAMES[i % len(NAMES)]
    return base if i < len(NAMES) else f"{base}{i // len(NAMES) + 1}"


def _age_group(age: int) -> str:
    for limit, group in ((5, "Infant"), (9, "Juvenile"), (13, "SubAdult"), (35, "Adult")):
        if age < limit:
            return group
    return "Elderly"


def make_members(individuals: int, seed: int) -> list[Member]:
    """Individuals alternate between CZoo and CTai; CTai, like the real file, has some unknowns."""
    members = []
    for i in range(individuals):
        name = individual_name(i)
        source = CVJENA_SOURCES[i % 2][0]
        rng = _rng(seed, 2, name)
        age = int(rng.integers(1, 45))
        gender = "Female" if rng.uniform() < 0.6 else "Male"
        wild = source == "CTai"
        members.append(Member(
            name=name, source=source,
            age="NaN" if wild and rng.uniform() < 0.15 else str(age), age_group=_age_group(age),
            gender="Unknown" if wild and rng.uniform() < 0.1 else gender))
    return members


def annotation_line(filename: str, member: Member, points: Sequence[tuple[int, int] | None]) -> str:
    """One line in the older release format, trailing space included as in the real files."""
    fields = [f"{IMAGE_FOLDER}/{filename}", "Name", member.name, "Age", member.age,
              "Age_group", member.age_group, "Gender", member.gender]
    for label, point in zip(KEYPOINT_NAMES, points):
        fields += [label, *(("Inf", "Inf") if point is None else (str(point[0]), str(point[1])))]
    return " ".join(fields) + " \n"


def to_older_format(line: str, where: str) -> tuple[str, str, str]:
    """(normalised line, image path, name) of a real annotation line in either release format.

    The current release prefixes `Filename ` and spells `Age_Group`; the stand-in always writes the
    older revision's spelling, which is what the copy in ../shared holds, so that copy comes out
    byte-identical. Raises AnnotationError (with `where`) for a line the real parser refuses.
    """
    fields = parse_cvjena_line(line, where)
    tokens = line.split()
    if tokens[0] == "Filename":
        tokens = tokens[1:]
    path = fields["path"]
    if not path.startswith(f"{IMAGE_FOLDER}/") or ".." in path.split("/") or not path.endswith(".png"):
        raise StandinError(f"{where}: image path {clipped_repr(path)} is not {IMAGE_FOLDER}/<file>.png")
    return " ".join(FIELD_SPELLINGS.get(t, t) for t in tokens) + " \n", path, fields["name"]


def _source_dir(out: Path, folder: str) -> Path:
    return out / RELEASE_FOLDER / folder


def _mark(out: Path) -> None:
    """Written first, so that a partly drawn tree is marked too."""
    atomic.write_text(out / RELEASE_FOLDER / STANDIN_MARKER,
                      "Synthetic stand-in images drawn by `python -m src.data.standin`: not chimpanzees, not "
                      "the C-Zoo/C-Tai release.\nprepare says so, and `prepare --download` will not take this "
                      "folder for the release.\n")


# ---------------------------------------------------------------------------------------------------
# The two ways to build a raw folder.


def generate_from_annotations(out: Path, annotations: Path, size: int, seed: int, workers: int) -> int:
    """One image per line of the real annotation files, their metadata copied; returns image count.

    The copied keypoints refer to the real crops, not to the drawn face: real crop sizes are not known.
    The annotation files are read in full first, so that a wrong or malformed one writes nothing.
    """
    jobs, texts = [], {}
    for source, folder, filename in CVJENA_SOURCES:
        src = annotations / filename
        if not src.is_file():
            raise StandinError(f"{src}: annotation file not found")
        lines = []
        for lineno, raw in enumerate(read_utf8(src, StandinError).splitlines(), 1):
            if not raw.strip():
                continue
            line, path, name = to_older_format(raw, f"{src}:{lineno}")
            lines.append(line)
            jobs.append(ImageJob(_source_dir(out, folder) / path, name, f"{source}/{path}", size, seed))
        texts[folder, filename] = lines
    _mark(out)
    _run_jobs(jobs, workers)
    for (folder, filename), lines in texts.items():
        atomic.write_text(_source_dir(out, folder) / filename, "".join(lines))
    return len(jobs)


def generate_small(out: Path, individuals: int, images: int, size: int, seed: int, workers: int) -> int:
    """`individuals` x `images` new images, keypoints matching the drawn faces; returns image count."""
    _mark(out)
    members = make_members(individuals, seed)
    folders = {source: folder for source, folder, _ in CVJENA_SOURCES}
    entries: dict[str, list[tuple[str, Member]]] = {source: [] for source in folders}
    jobs = []
    for member in members:
        for _ in range(images):
            filename = f"img-id{len(entries[member.source]) + 1}-object-1.png"
            entries[member.source].append((filename, member))
            jobs.append(ImageJob(_source_dir(out, folders[member.source]) / IMAGE_FOLDER / filename,
                                 member.name, f"{member.source}/{filename}", size, seed))
    points = dict(zip((job.key for job in jobs), _run_jobs(jobs, workers)))
    for source, folder, filename in CVJENA_SOURCES:
        lines = [annotation_line(f, m, points[f"{source}/{f}"]) for f, m in entries[source]]
        atomic.write_text(_source_dir(out, folder) / filename, "".join(lines))
    return len(jobs)


# ---------------------------------------------------------------------------------------------------
# Calibration: how hard is the stand-in for a small CNN trained from scratch?


def calibrate(individuals: int, images: int, size: int, seed: int, epochs: int) -> float:
    """Train torchvision resnet18 (random init) on CPU, print per-epoch val accuracy, return the last.

    The first 3/4 of each individual's images train, the rest validate. This is the number docs/STANDIN.md
    quotes: it says how hard the nuisance makes the task, so retune the ranges above if it drifts.
    """
    import torch
    import torchvision

    from src.data.augment import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    xs, ys, is_train = [], [], []
    for label in range(individuals):
        name = individual_name(label)
        for j in range(images):
            img, _ = render(name, f"calibrate/{name}/{j}", size, seed)
            xs.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
            ys.append(label)
            is_train.append(j < images * 3 // 4)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div(255)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    x = (x - mean[:, None, None]) / std[:, None, None]
    y, mask = torch.tensor(ys), torch.tensor(is_train)
    x_train, y_train, x_val, y_val = x[mask], y[mask], x[~mask], y[~mask]

    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, individuals)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    start, accuracy = time.perf_counter(), 0.0
    print_stdout(f"calibrate: {individuals} individuals x {images} images at {size} px, "
                 f"{len(y_train)} train / {len(y_val)} val, chance {1 / individuals:.1%}")
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y_train))
        for i in range(0, len(order), 32):
            batch = order[i:i + 32]
            if len(batch) < 2:  # BatchNorm cannot train on one image (a crash at small --size)
                continue
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
        print_stdout(f"epoch {epoch}: last loss {loss.item():.3f}  val acc {accuracy:.1%}  "
                     f"{time.perf_counter() - start:.0f} s")
    return accuracy


# ---------------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = command_parser("src.data.standin",
                       "Write synthetic stand-in face images (NOT chimpanzees) in the cvjena raw layout.")
    p.add_argument("--out", type=path_argument, help="raw folder to write (holds datasets_cropped_chimpanzee_faces/)")
    p.add_argument("--from-annotations", type=path_argument, metavar="DIR",
                   help="folder with annotations_czoo.txt and annotations_ctai.txt: one image per line")
    p.add_argument("--individuals", type=int, help="small set: number of individuals (--calibrate: default 10)")
    p.add_argument("--images", type=int, help="small set: images per individual (--calibrate: default 40)")
    p.add_argument("--size", type=int, help="nominal image side in pixels (default 128; 64 with --calibrate)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    p.add_argument("--calibrate", action="store_true",
                   help="train resnet18 on CPU on an in-memory set and print val accuracy; writes nothing")
    p.add_argument("--epochs", type=int, help="with --calibrate only (default 10)")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.seed < 0:
        p.error("--seed must be at least 0")
    requested = (args.individuals or 1) * (args.images or 1)
    if requested > MAX_IMAGES:  # 10^11 x 10^11 ran silently for minutes
        p.error(f"--individuals x --images must be at most {MAX_IMAGES:,} (the real release has 7,187 images), "
                f"not {requested:,}")
    if args.size is not None and not MIN_SIZE <= args.size <= MAX_SIZE:  # with --calibrate too (-5 crashed in Pillow)
        p.error(f"--size must be from {MIN_SIZE} to {MAX_SIZE} (real face crops are a few hundred pixels; "
                f"an image is drawn at {SUPERSAMPLE}x its size, so a large one only costs memory)")
    if args.calibrate:
        if args.out or args.from_annotations:
            p.error("--calibrate writes nothing: drop --out and --from-annotations")
        for flag in ("individuals", "images"):  # at least one training and one validation image each
            if getattr(args, flag) is not None and getattr(args, flag) < 2:
                p.error(f"--calibrate needs --{flag} of at least 2")
        if args.epochs is not None and args.epochs < 1:
            p.error("--epochs must be at least 1")
        for flag, default in CALIBRATE_DEFAULTS.items():
            setattr(args, flag, default if getattr(args, flag) is None else getattr(args, flag))
        gib = args.individuals * args.images * 3 * args.size**2 * 4 / 2**30  # the float32 tensor it trains from
        if gib > CALIBRATE_MAX_GIB:  # 100000 individuals passed the check above and filled the memory
            p.error(f"--calibrate holds its images in memory: {args.individuals:,} x {args.images:,} at {args.size} "
                    f"px take {gib:,.1f} GiB, more than {CALIBRATE_MAX_GIB}; use fewer or smaller images")
        return
    if args.epochs is not None:
        p.error("--epochs goes with --calibrate (writing stand-ins trains nothing)")
    if args.out is None:
        p.error("--out is required")
    small = args.individuals is not None or args.images is not None
    if (args.from_annotations is not None) == small:
        p.error("give either --from-annotations DIR or --individuals N --images M")
    if small and (args.individuals is None or args.images is None):
        p.error("--individuals and --images go together")
    for flag in ("individuals", "images", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.individuals == 1:  # its only individual lands in one zoo's file, the other's stays empty
        p.error("--individuals must be at least 2: one individual cannot be prepared (nothing to tell apart)")


@command_main
def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    if args.calibrate:
        calibrate(args.individuals, args.images, args.size, args.seed, args.epochs)
        return 0
    size, start = args.size or 128, time.perf_counter()
    try:
        if args.from_annotations is not None:
            count = generate_from_annotations(args.out, args.from_annotations, size, args.seed, args.workers)
        else:
            count = generate_small(args.out, args.individuals, args.images, size, args.seed, args.workers)
    except (StandinError, AnnotationError, OSError, WorkerDied) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2  # a one-line error exits 2, as in every command of the project
    print_stdout(f"wrote {count} stand-in images (synthetic, not chimpanzees) under {args.out / RELEASE_FOLDER} "
                 f"in {time.perf_counter() - start:.1f} s with {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
