"""Decode any common image file to an RGB PIL image, or fail with a reason a user can act on."""
from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

# Decompression-bomb guard: 64 megapixels is ~8000x8000, far above any face crop or camera-trap frame
# we expect; anything larger is refused rather than allowed to exhaust memory.
MAX_PIXELS = 64_000_000
_OPENING = threading.Lock()  # see load_rgb
# Deep greys are scaled in float64, for its rounding, this many pixels at a time: the whole image at once
# took over 1 GB at the pixel limit (a float64 copy and its temporaries, 24 bytes a pixel).
SCALING_BLOCK_PIXELS = 1 << 16
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# EXIF orientation (2-8) -> the transposition that shows the photo upright, as the EXIF standard defines it.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


class ImageLoadError(Exception):
    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _white(img: Image.Image, values: np.ndarray) -> float:
    """The value that means white in a 16-bit, 32-bit or float grayscale image. A fixed scale, so that
    a photo decodes to the same pixels whatever container it came in (a 16-bit PNG opens as "I;16" or
    as "I" depending on Pillow's version; 8-bit values saved as 32-bit integers stay 8-bit); the
    image's own maximum only where its values fit no scale."""
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode == "I" and values.min() >= 0 and values.max() <= 65535:
        return 255.0 if values.max() <= 255 else 65535.0
    if img.mode == "F" and values.min() >= 0 and values.max() <= 1:
        return 1.0
    return max(float(values.max()), 1.0)


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Not `ImageOps.exif_transpose`: it also rewrites the
    EXIF block without the orientation tag, which raises (TypeError, struct.error) on the malformed
    blocks many cameras and editors write (Pillow issues #3973, #4037, #6882), for pixels that are fine."""
    method = UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation))
    return img if method is None else img.transpose(method)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("RGB") clips these instead of rescaling, so scale by hand.
        values = np.asarray(img)
        white = _white(img, values)
        grey = np.empty(values.shape, np.uint8)
        rows = max(1, SCALING_BLOCK_PIXELS // max(1, img.width))
        for top in range(0, img.height, rows):
            block = values[top:top + rows].astype(np.float64)
            block /= white
            block *= 255.0
            block += 0.5
            grey[top:top + rows] = np.clip(block, 0, 255, out=block)  # truncated, as astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def as_rgb(image: Image.Image, max_pixels: int = MAX_PIXELS, name: str = "<in-memory image>") -> Image.Image:
    """An already opened image as RGB, with the same pixel limit and EXIF handling as `load_rgb`."""
    if image.width * image.height > max_pixels:
        raise ImageLoadError(name, f"{image.width}x{image.height} exceeds the {max_pixels:,}-pixel limit")
    try:
        return _to_rgb(_upright(image))
    except MemoryError:
        raise out_of_memory_while_decoding(name) from None
    except Exception as exc:  # Pillow raises other types too (SyntaxError for an EXIF block it cannot parse)
        raise ImageLoadError(name, f"cannot be converted to RGB ({exc})") from None


def out_of_memory_while_decoding(name: str | Path) -> MemoryError:
    """The machine's shortage, not the image's fault: no ImageLoadError, which would leave the image
    out (and the cache remember it so) where the run should stop, or try again with more memory."""
    return MemoryError(f"{name}: out of memory while decoding")


def file_problem(path: Path) -> str | None:
    """None for a regular file (or a link to one), else why it is no image file: a link to nothing,
    or a FIFO, socket or device (opening a FIFO would wait for a writer forever)."""
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return "broken link"
    return "not a regular file" if path.exists() else "file not found"


def read_image_bytes(path: Path) -> bytes:
    """The whole file, for a caller that keys what it decodes by these very bytes (`load_rgb`'s
    `data`). Raises ImageLoadError when the file cannot be read, which says nothing of its bytes:
    a missing file, a FIFO or a device (never opened), a read the system refused."""
    problem = file_problem(path)
    if problem is not None:
        raise ImageLoadError(path, problem)
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise _read_refused(path, exc) from None


def _read_refused(path: Path, exc: OSError) -> ImageLoadError:
    return ImageLoadError(path, f"cannot be read ({exc.strerror or exc})")


def files_under(folder: Path, hidden: Callable[[str], bool]) -> list[Path]:
    """Every entry under `folder` that is no folder (broken links and FIFOs too, for the caller to
    report), following linked sub-folders (photos linked in from another disk are common; `rglob`
    skips them) and visiting each real folder once, so that a link to an ancestor cannot loop. Files
    and folders whose names `hidden` accepts are left out. In no particular order."""
    paths, seen = [], {os.path.realpath(folder)}
    for top, dirs, files in os.walk(folder, followlinks=True):
        unseen = []
        for name in dirs:
            real = os.path.realpath(Path(top, name))
            if not hidden(name) and real not in seen:
                seen.add(real)
                unseen.append(name)
        dirs[:] = unseen
        paths += [Path(top, name) for name in files if not hidden(name)]
    return paths


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> Image.Image:
    """Fully decoded RGB image with EXIF orientation applied. Raises ImageLoadError.

    `data`: the file's bytes when the caller has read them already (e.g. to hash them), decoded
    instead of reading the file again; `path` then only names the image in errors."""
    path = Path(path)
    if data is None:
        problem = file_problem(path)
        if problem is not None:
            raise ImageLoadError(path, problem)
    size = path.stat().st_size if data is None else len(data)
    if size == 0:  # e.g. an interrupted copy; Pillow would only say "unidentified"
        raise ImageLoadError(path, "empty file (0 bytes)")
    try:
        # Pillow warns of a huge image in open(): an error here, as the limit below. The warning
        # filters are the process's, not the thread's, so threads that decode take turns to open
        # (a header read), or one thread's filter ends while another opens and the warning is printed.
        with _OPENING, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path if data is None else io.BytesIO(data))
        with img:
            if img.width * img.height > max_pixels:
                raise ImageLoadError(path, f"{img.width}x{img.height} exceeds the {max_pixels:,}-pixel limit")
            img.load()  # decodes everything now, so truncation is caught here
            return _to_rgb(_upright(img))
    except ImageLoadError:
        raise
    except MemoryError:
        raise out_of_memory_while_decoding(path) from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image in a known format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own check, in open()
        raise ImageLoadError(path, f"exceeds the {max_pixels:,}-pixel limit ({exc})") from None
    except OSError as exc:
        if exc.errno is not None:  # the system refused the read (permissions, I/O error), not the decoder
            raise _read_refused(path, exc) from None
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from None
    except (SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from None
    except Exception as exc:  # Pillow's format parsers raise other types too on a damaged file
        raise ImageLoadError(path, f"cannot be decoded ({type(exc).__name__}: {exc})") from None
