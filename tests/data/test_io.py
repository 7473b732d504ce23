"""Decoding any image file to RGB: the same picture gives the same pixels in every container."""
from __future__ import annotations

import struct
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from src.data import io as image_io
from src.data.io import ImageLoadError, as_rgb, load_rgb

GREYS = np.tile(np.arange(20, 220, 2, dtype=np.uint16), (10, 1))  # 8-bit grey levels, 10 x 100


@pytest.mark.parametrize("name, image", [
    ("16-bit PNG", Image.fromarray(GREYS * 257)),                            # opens as "I;16"
    ("16-bit values in a 32-bit TIFF", Image.fromarray((GREYS * 257).astype(np.int32), "I")),
    ("8-bit values in a 32-bit TIFF", Image.fromarray(GREYS.astype(np.int32), "I")),
    ("floats in [0, 1] in a TIFF", Image.fromarray((GREYS / 255).astype(np.float32), "F")),
])
def test_deep_greyscale_decodes_like_its_8_bit_twin(name, image, tmp_path):
    """Scaled by the format's white, not by the image's brightest pixel: its brightest grey here is
    218, which must stay 218, not be stretched to 255."""
    path = tmp_path / ("deep.png" if image.mode == "I;16" else "deep.tif")
    image.save(path)
    eight_bit = tmp_path / "eight.png"
    Image.fromarray(GREYS.astype(np.uint8)).save(eight_bit)
    decoded, expected = np.asarray(load_rgb(path)), np.asarray(load_rgb(eight_bit))
    assert decoded.shape == expected.shape == (10, 100, 3)
    assert np.abs(decoded.astype(int) - expected).max() <= 1, name


def test_values_beyond_16_bits_are_scaled_by_their_maximum(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((4, 4), 1 << 20, dtype=np.int32), "I").save(path)
    assert np.asarray(load_rgb(path)).min() == 255


@pytest.mark.parametrize("name, values, white", [
    ("every 16-bit value", np.arange(65536, dtype=np.uint16).reshape(256, 256), 65535),
    ("32-bit values beyond 16 bits", np.random.default_rng(1).integers(-1000, 3 << 20, (64, 64), dtype=np.int32), None),
    ("floats beyond [0, 1]", np.random.default_rng(2).normal(0.5, 2.0, (64, 64)).astype(np.float32), None),
])
def test_deep_greys_keep_the_pixels_of_scaling_in_float64(name, values, white, tmp_path):
    """Scaled a block of rows at a time, to the very pixels of scaling the whole image in float64."""
    path = tmp_path / ("deep.png" if values.dtype == np.uint16 else "deep.tif")
    Image.fromarray(values).save(path)
    white = white or max(float(values.max()), 1.0)
    expected = np.clip(values.astype(np.float64) / white * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(load_rgb(path)), np.repeat(expected[..., None], 3, axis=2)), name


def test_deep_greys_are_scaled_without_a_float64_copy_of_the_image(tmp_path):
    """A float64 copy of the whole image and its temporaries took over 1 GB at the 64-megapixel limit."""
    values = np.random.default_rng(0).integers(0, 65536, (1000, 2000), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    tracemalloc.start()
    try:
        load_rgb(tmp_path / "deep.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * values.size, f"{peak / values.size:.1f} bytes per pixel"


def test_transparent_pixels_decode_as_black_in_files_and_in_memory(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = 255          # white, but fully transparent on the left half
    rgba[:, 3:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    for image in (load_rgb(tmp_path / "alpha.png"), as_rgb(Image.fromarray(rgba, "RGBA"))):
        pixels = np.asarray(image)
        assert (pixels[:, :3] == 0).all() and (pixels[:, 3:] == 255).all()


def test_an_in_memory_image_gets_its_exif_orientation_like_a_file(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((4, 10, 3), np.uint8)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "rotated.jpg") as opened:
        assert as_rgb(opened).size == load_rgb(tmp_path / "rotated.jpg").size == (4, 10)


def exif_block(orientation: int, malformed: bool) -> bytes:
    """A little-endian EXIF block holding the orientation and, if `malformed`, an XResolution stored as
    text (its type is a fraction), as some cameras and editors write it."""
    entries = [struct.pack("<HHI4s", 0x0112, 3, 1, struct.pack("<HH", orientation, 0))]
    if malformed:
        entries.append(struct.pack("<HHI4s", 0x011A, 2, 3, b"72\0\0"))
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd


# What the EXIF standard says each orientation's stored pixels are, from the upright photo.
STORED_AS = {1: lambda up: up, 2: np.fliplr, 3: lambda up: np.rot90(up, 2), 4: np.flipud,
             5: lambda up: up.transpose(1, 0, 2), 6: lambda up: np.rot90(up, 1),
             7: lambda up: np.rot90(up, 2).transpose(1, 0, 2), 8: lambda up: np.rot90(up, -1)}


@pytest.mark.parametrize("malformed", [False, True])
@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_every_exif_orientation_decodes_upright_even_beside_a_malformed_tag(tmp_path, orientation, malformed):
    """A camera's EXIF block with a malformed tag made Pillow's exif_transpose raise TypeError while
    rewriting the block: a traceback that stopped predict, gallery enroll and prepare."""
    upright = np.arange(4 * 10 * 3, dtype=np.uint8).reshape(4, 10, 3)
    stored = Image.fromarray(np.ascontiguousarray(STORED_AS[orientation](upright)))
    stored.save(tmp_path / "photo.png", exif=exif_block(orientation, malformed))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "photo.png")), upright)
    with Image.open(tmp_path / "photo.png") as opened:
        assert np.array_equal(np.asarray(as_rgb(opened)), upright)


def test_an_exif_block_pillow_cannot_parse_is_an_image_load_error_in_memory_as_in_a_file(tmp_path):
    """An EXIF block whose TIFF header is garbage makes Pillow's getexif raise SyntaxError: load_rgb
    reported it as an ImageLoadError, as_rgb (a PIL image given to `identify`) let it out as a traceback."""
    block = b"Exif\0\0XX*\0" + struct.pack("<I", 8) + b"\0\0"
    Image.new("RGB", (10, 4)).save(tmp_path / "photo.png", exif=block)
    with pytest.raises(ImageLoadError, match="not a TIFF file"):
        load_rgb(tmp_path / "photo.png")
    with Image.open(tmp_path / "photo.png") as opened, pytest.raises(ImageLoadError, match="not a TIFF file"):
        as_rgb(opened)


def test_a_damaged_file_whose_decoder_raises_an_unexpected_type_is_an_image_load_error(tmp_path):
    """Pillow opens a file by its content: a DDS header with no pixel format (here named .png) raised
    NotImplementedError, a traceback that ended a whole predict run."""
    header = struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 0) + bytes(44)
    (tmp_path / "IMG_0001.png").write_bytes(b"DDS " + header + bytes(64))
    with pytest.raises(ImageLoadError, match="cannot be decoded \\(NotImplementedError: Unknown pixel format"):
        load_rgb(tmp_path / "IMG_0001.png")


def test_running_out_of_memory_while_decoding_is_not_taken_for_a_bad_image(tmp_path, monkeypatch):
    """The catch-all for decoders' odd exception types turned a MemoryError into "cannot be decoded":
    the machine's shortage reported as the image's fault, and the image left out (by the cache, for
    good). It passes through, naming the image."""
    Image.new("RGB", (10, 4)).save(tmp_path / "photo.png")

    def out_of_memory(image):
        raise MemoryError()

    monkeypatch.setattr(image_io, "_to_rgb", out_of_memory)
    with pytest.raises(MemoryError, match="photo.png: out of memory while decoding"):
        load_rgb(tmp_path / "photo.png")
    with pytest.raises(MemoryError, match="<in-memory image>: out of memory while decoding"):
        as_rgb(Image.new("RGB", (10, 4)))


def test_an_in_memory_image_over_the_pixel_limit_is_refused_like_a_file(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    def from_memory(limit):
        return as_rgb(Image.new("RGB", (30, 20)), limit)

    for load in (lambda limit: load_rgb(tmp_path / "big.png", limit), from_memory):
        assert load(600).size == (30, 20)
        with pytest.raises(ImageLoadError, match="30x20 exceeds the 599-pixel limit"):
            load(599)


def _png_header(path, width: int, height: int) -> None:
    """A PNG that declares `width x height` pixels (all a decoder reads before it refuses)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_images_too_large_for_pillow_are_refused_without_its_warning_in_any_thread(tmp_path):
    """Pillow warns in open() past ~89 megapixels; the warning filter that turns it into our refusal
    is the process's, so decoding threads (predict's, the cache's) let the warning through on stderr."""
    path = tmp_path / "huge.png"
    _png_header(path, 10_000, 10_000)

    def refusal(_) -> str:
        with pytest.raises(ImageLoadError) as info:
            load_rgb(path)
        return str(info.value)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(8) as pool:
            reasons = set(pool.map(refusal, range(200)))
    assert [reason.split(" (")[0] for reason in reasons] == [f"{path}: exceeds the 64,000,000-pixel limit"]
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
