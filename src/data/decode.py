"""One image as the image cache stores it: its centre square, resized, uint8.

Without torch: the cache's worker processes import only this module (see `src.parallel`), and a fork
server that imports torch took ~1.4 s to start on 2 cores, this module ~0.1 s.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from src.data.io import ImageLoadError, load_rgb, out_of_memory_while_decoding, read_image_bytes

# Part of the cache key (with Pillow's version, whose decoders and resampling change between
# releases): change this string whenever decode_for_cache changes its output.
DECODE_SETTINGS = "load_rgb(deep greys by their format's white);centre-square;PIL-bicubic-antialiased"


def cache_size_for(image_size: int) -> int:
    """Side of the cached square: image_size plus the ImageNet-style 8/7 margin (224 -> 256).

    The margin lets random-resized-crop zoom out to the whole face and gives eval its centre crop
    of image_size / cache_size (0.875) without decoding again.
    """
    return int(round(image_size * 8 / 7))


def decode_for_cache(path: str | Path, cache_size: int, data: bytes | None = None) -> np.ndarray:
    """`cache_size x cache_size x 3` uint8: the image's centre square resized with antialiasing.

    The plain pipeline calls it too, in its DataLoader workers every epoch (`ImageListDataset`), so
    both pipelines see the same pixels. `data`: the file's bytes, if read already (`load_rgb`).
    Raises ImageLoadError, or MemoryError naming the image.
    """
    image = load_rgb(path, data=data)
    try:
        return square_resize(image, cache_size)
    except MemoryError:
        # numpy's own kind (_ArrayMemoryError, from np.array) takes a shape and a dtype: a DataLoader worker's
        # copy of it could not be rebuilt in the main process, which got a RuntimeError and a traceback.
        raise out_of_memory_while_decoding(path) from None


def square_resize(image: Image.Image, cache_size: int) -> np.ndarray:
    """The centre square of an RGB image, resized to `cache_size` (what `decode_for_cache` stores)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    # Resizing the centre square in one call equals "shorter side to cache_size, then centre crop"
    # without rounding the longer side first. PIL widens its kernels by the downscale factor
    # (antialiased). On a ~300 px crop (~3.4 ms in all) BICUBIC costs ~0.25 ms more than BILINEAR
    # and keeps more detail; LANCZOS costs ~0.9 ms more again. reducing_gap measured no gain on
    # 150-500 px crops.
    square = image.resize((cache_size, cache_size), Image.Resampling.BICUBIC,
                          box=(left, top, left + side, top + side))
    # np.array, not asarray: a writable array (one 200 KB copy) lets the plain pipeline's workers
    # call torch.from_numpy without its warning about read-only memory.
    return np.array(square)


def content_digest(data: bytes) -> str:
    """What stands for a file's bytes in the cache key: their blake2b."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def unreadable_digest(error: ImageLoadError) -> str:
    """What stands for the bytes of a file that could not be read in the cache key: why, so that
    the key changes, and the cache is built again, once the file can be read."""
    return f"unreadable:{error.reason}"


def decode_into(job: tuple[int, Path], target: Path, cache_size: int) -> tuple[str | None, str]:
    """Worker body: decode image `job = (row, path)` into its row of `target`; the reason it could
    not be decoded (None when it was), and the digest of the bytes decoded, read once for both (a
    file edited between its hashing and its decoding would otherwise be cached under the old bytes'
    key), or, when its file could not be read at all (a passing I/O error, say, where bytes that do
    not decode are the image's own), `unreadable_digest`.

    Workers write their rows themselves. Sent back through a pipe, every 200 KB row had to be
    unpickled and written by the parent, which competed with the workers for the cores and, with
    many workers, would become the bottleneck (2 cores, 6,090 stand-ins at 256 px: 10.5-11.0 s, now
    9.1-9.3 s, against 8.3 s of decoding alone).
    """
    row, path = job
    try:
        data = read_image_bytes(path)
    except ImageLoadError as exc:
        return exc.reason, unreadable_digest(exc)
    digest = content_digest(data)
    try:
        pixels = decode_for_cache(path, cache_size, data)
    except ImageLoadError as exc:
        return exc.reason, digest
    with open(target, "r+b") as out:
        out.seek(row * pixels.nbytes)
        out.write(pixels.data)
    return None, digest
