"""What `decode_for_cache` stores is keyed by `DECODE_SETTINGS` and Pillow's version (src/data/cache.py):
a change to its pixels that comes without a new `DECODE_SETTINGS` would let every cache built before it
pass for current, serving other pixels than a fresh decode (the plain pipeline, inference) gives."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import PIL
import pytest
from PIL import Image

from src.data.decode import DECODE_SETTINGS, decode_for_cache
from src.data.io import load_rgb

# (DECODE_SETTINGS, Pillow version) -> sha256 of the decoded samples below. A new Pillow release is a new
# cache key anyway: record its digest here. A new digest under the same key means DECODE_SETTINGS must change.
DECODED_DIGESTS = {
    (DECODE_SETTINGS, "13.0.0"): "07f858fd04ab9ec49293a9e1078ba7335d8db12e4ae7d502186f4b8864da56e9",
}


def _samples() -> dict[str, bytes]:
    """One file of each kind the decoder treats apart: colour and grey, 8 and 16 bits, palette with
    transparency, CMYK, lossy, and a photo turned by its EXIF orientation; non-square, so that the
    centre square and the resampling both matter."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 4096, (50, 33), dtype=np.uint16))
    palette = rgb.quantize(16)
    images = {"rgb.png": (rgb, "PNG", {}), "grey16.png": (grey16, "PNG", {}),
              "palette.png": (palette, "PNG", {"transparency": 3}), "cmyk.jpg": (rgb.convert("CMYK"), "JPEG", {}),
              "grey.jpg": (rgb.convert("L"), "JPEG", {}), "exif6.jpg": (rgb, "JPEG", {"exif": _orientation(6)})}
    files = {}
    for name, (image, kind, options) in images.items():
        buffer = io.BytesIO()
        image.save(buffer, kind, **options)
        files[name] = buffer.getvalue()
    return files


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation
    return exif.tobytes()


def test_decoded_pixels_change_only_with_the_cache_key(tmp_path):
    digest = hashlib.sha256()
    for name, data in _samples().items():
        path = tmp_path / name
        path.write_bytes(data)
        pixels = decode_for_cache(path, 37)
        assert pixels.shape == (37, 37, 3) and pixels.dtype == np.uint8
        digest.update(pixels.tobytes())
    assert load_rgb(tmp_path / "exif6.jpg").size == (45, 61)  # turned upright: the orientation is exercised
    key = (DECODE_SETTINGS, PIL.__version__)
    if key not in DECODED_DIGESTS:
        pytest.skip(f"no digest recorded for {key} (this Pillow is not the one constraints.txt pins): "
                    f"{digest.hexdigest()}")
    assert digest.hexdigest() == DECODED_DIGESTS[key], \
        "decode_for_cache gives other pixels under the same cache key: change DECODE_SETTINGS, then record the digest"


def test_numpy_running_out_of_memory_in_a_dataloader_worker_is_one_line_naming_the_image(tmp_path, monkeypatch):
    """numpy's MemoryError (_ArrayMemoryError, raised when np.array cannot allocate) takes a shape and a
    dtype: torch could not rebuild it in the main process and raised a RuntimeError instead, a traceback
    (exit 1) where the commands say `error: ... out of memory` (exit 2)."""
    import torch
    from numpy._core._exceptions import _ArrayMemoryError

    from src.data import decode
    from src.data.dataset import ClassIndex, ImageListDataset
    from src.errors import out_of_memory

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")

    def no_memory(image, cache_size):
        raise _ArrayMemoryError((cache_size, cache_size, 3), np.dtype(np.uint8))

    monkeypatch.setattr(decode, "square_resize", no_memory)
    dataset = ImageListDataset([("a.png", "Abeni")], tmp_path, ClassIndex(["Abeni"]), cache_size=12)
    with pytest.raises(MemoryError) as raised:
        next(iter(torch.utils.data.DataLoader(dataset, num_workers=1)))
    assert out_of_memory(raised.value) == f"error: {tmp_path / 'a.png'}: out of memory while decoding"
