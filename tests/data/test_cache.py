"""The decoded-image cache: same pixels as a fresh decode, reused, invalidated and repaired."""
from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from src import atomic, locks
from src.data import cache, decode
from src.data import io as image_io
from src.data.cache import load_or_build_cache
from src.data.decode import cache_size_for, decode_for_cache
from src.data.io import ImageLoadError
from src.parallel import WorkerDied

CACHE_SIZE = 24
REPO = Path(__file__).resolve().parents[2]


def _write_png(path, seed: int, size=(40, 30)) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def dataset(tmp_path):
    """Raw dir with five PNGs: landscape, portrait, square, smaller than the cache, larger."""
    raw = tmp_path / "raw"
    sizes = [(40, 30), (30, 50), (32, 32), (16, 20), (64, 48)]
    rows = []
    for i, size in enumerate(sizes):
        rel = f"face_images/img {i}.png"  # a space, as user folders often have
        _write_png(raw / rel, seed=i, size=size)
        rows.append((rel, f"chimp{i % 2}"))
    return raw, tmp_path / "cache", rows


def _build(dataset, cache_size=CACHE_SIZE, workers=0, rows=None):
    raw, cache_dir, default_rows = dataset
    return load_or_build_cache(rows or default_rows, raw, cache_dir, cache_size, workers)


def _assert_matches_fresh_decode(cached, raw, rows, cache_size=CACHE_SIZE):
    assert cached.images.dtype == torch.uint8
    assert tuple(cached.images.shape) == (len(cached.kept), cache_size, cache_size, 3)
    for row, index in enumerate(cached.kept):
        fresh = decode_for_cache(raw / rows[index][0], cache_size)
        np.testing.assert_array_equal(cached.images[row].numpy(), fresh)


def test_cache_size_adds_the_imagenet_margin():
    assert cache_size_for(224) == 256
    assert cache_size_for(112) == 128
    assert cache_size_for(32) == 37 and cache_size_for(48) == 55  # 36.57 and 54.86: rounded, not truncated


def test_decode_for_cache_takes_the_centre_square(tmp_path):
    # A wide image: red | green | blue thirds; the centre square is the green third.
    pixels = np.zeros((30, 90, 3), np.uint8)
    pixels[:, :30, 0] = pixels[:, 30:60, 1] = pixels[:, 60:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = decode_for_cache(tmp_path / "wide.png", 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8 and out.flags.writeable
    # Pure green away from the left and right edges, where the bicubic kernel reaches the sides.
    np.testing.assert_array_equal(out[:, 3:-3], np.broadcast_to([0, 255, 0], (20, 14, 3)))


def test_decode_for_cache_raises_image_load_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError):
        decode_for_cache(tmp_path / "bad.png", 16)


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_pixels_equal_fresh_decode(dataset, workers):
    cached = _build(dataset, workers=workers)
    assert cached.built and cached.kept == list(range(5)) and cached.failed == []
    _assert_matches_fresh_decode(cached, dataset[0], dataset[2])
    assert cached.path.name == f"{cached.key}.u8"
    assert (cached.path.parent / f"{cached.key}.json").is_file()


def test_cache_is_reused_when_nothing_changed(dataset):
    first = _build(dataset)
    mtime = first.path.stat().st_mtime_ns
    second = _build(dataset)
    assert not second.built and second.key == first.key
    assert second.path.stat().st_mtime_ns == mtime
    _assert_matches_fresh_decode(second, dataset[0], dataset[2])


def test_relabelling_reuses_the_cache(dataset):
    first = _build(dataset)
    relabelled = [(rel, "someone_else") for rel, _ in dataset[2]]
    second = _build(dataset, rows=relabelled)
    assert not second.built and second.key == first.key


def test_changed_image_bytes_rebuild_and_prune_the_old_cache(dataset):
    raw, cache_dir, rows = dataset
    first = _build(dataset)
    edited = raw / rows[2][0]
    before = edited.stat()
    _write_png(edited, seed=99, size=(32, 32))  # same name and dimensions, new pixels...
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...the old time (a copy that keeps it)
    assert (edited.stat().st_size, edited.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = _build(dataset)
    assert second.built and second.key != first.key
    _assert_matches_fresh_decode(second, raw, rows)
    # Same list at the same size: the stale cache can never be valid again, so it is removed.
    assert not first.path.exists()
    assert sorted(p.name for p in cache_dir.glob("*.u8")) == [second.path.name]


def test_an_image_edited_while_the_cache_is_built_is_keyed_by_the_bytes_decoded(dataset, monkeypatch):
    """The key hashed each file, the build read it again to decode it: an edit in between stored the
    edited pixels under the original bytes' key. Put back, the original was served the edited pixels;
    left as edited, the cache was built again at the next start."""
    raw, _, rows = dataset
    edited = raw / rows[2][0]
    original, decode_all = edited.read_bytes(), cache._decode_all_into

    def decode_after_an_edit(*args, **kwargs):  # the key's hashing done, the decoding to come
        _write_png(edited, seed=99, size=(32, 32))
        return decode_all(*args, **kwargs)

    monkeypatch.setattr(cache, "_decode_all_into", decode_after_an_edit)
    first = _build(dataset)
    monkeypatch.setattr(cache, "_decode_all_into", decode_all)
    _assert_matches_fresh_decode(first, raw, rows)
    assert not _build(dataset).built
    edited.write_bytes(original)
    _assert_matches_fresh_decode(_build(dataset), raw, rows)


def test_an_image_edited_between_its_read_and_its_decoding_is_keyed_by_the_bytes_decoded(dataset, monkeypatch):
    """The worker decodes the bytes it hashed, not the file read a second time: an edit in between would
    store the edited pixels under the original bytes' key, and the original, put back, be served them."""
    raw, _, rows = dataset
    edited = raw / rows[2][0]
    original, read = edited.read_bytes(), decode.read_image_bytes

    def read_then_edit(path):
        data = read(path)
        if path == edited:
            _write_png(edited, seed=99, size=(32, 32))
        return data

    monkeypatch.setattr(decode, "read_image_bytes", read_then_edit)
    _build(dataset)
    monkeypatch.setattr(decode, "read_image_bytes", read)
    edited.write_bytes(original)
    again = _build(dataset)
    assert not again.built
    _assert_matches_fresh_decode(again, raw, rows)


def test_two_datasets_of_the_same_layout_share_a_cache_folder(dataset, tmp_path):
    """Their lists read alike (the stand-ins' or the public release's layout), their images differ:
    building one's cache must not delete the other's, or alternating runs rebuild every time."""
    raw, cache_dir, rows = dataset
    other_raw = tmp_path / "other_raw"
    for i, (rel, _) in enumerate(rows):
        _write_png(other_raw / rel, seed=50 + i, size=(36, 28))
    first = _build(dataset)
    second = load_or_build_cache(rows, other_raw, cache_dir, CACHE_SIZE, 0)
    assert second.built and first.path.exists()
    assert not _build(dataset).built and not load_or_build_cache(rows, other_raw, cache_dir, CACHE_SIZE, 0).built


def test_a_cache_of_the_earlier_slot_format_is_superseded_too(dataset):
    """Caches built before the folder was part of the slot: a rebuild of the same list removes them."""
    raw, cache_dir, rows = dataset
    first = _build(dataset)
    meta_path = first.path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "slot": cache._legacy_slot([rel for rel, _ in rows], CACHE_SIZE)}))
    _write_png(raw / rows[0][0], seed=77, size=(40, 30))
    assert _build(dataset).built and not first.path.exists()


def test_changed_cache_size_rebuilds_and_keeps_the_other_size(dataset):
    first = _build(dataset, cache_size=CACHE_SIZE)
    second = _build(dataset, cache_size=CACHE_SIZE + 8)
    assert second.built and second.key != first.key
    _assert_matches_fresh_decode(second, dataset[0], dataset[2], cache_size=CACHE_SIZE + 8)
    assert first.path.exists()  # runs at two resolutions may alternate
    assert not _build(dataset, cache_size=CACHE_SIZE).built


def _flip_bytes(data_path, meta_path):
    with open(data_path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(data_path, meta_path):
    with open(data_path, "r+b") as f:
        f.truncate(data_path.stat().st_size - 7)


def _garble_meta(data_path, meta_path):
    meta_path.write_text("{not json", encoding="utf-8")


def _wrong_shape_meta(data_path, meta_path):
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["shape"][1] += 1
    meta_path.write_text(json.dumps(meta), encoding="utf-8")


def _remove_meta(data_path, meta_path):
    meta_path.unlink()


@pytest.mark.parametrize("damage, reason", [
    (_flip_bytes, "checksum mismatch"), (_truncate, r"data file has \d+ bytes, expected \d+"),
    (_garble_meta, "unreadable metadata .JSONDecodeError"), (_wrong_shape_meta, "shape .* does not match"),
    (_remove_meta, "unreadable metadata .FileNotFoundError")],
    ids=["flipped byte", "truncated", "garbled metadata", "wrong shape", "no metadata"])
def test_corrupt_cache_is_detected_and_rebuilt(dataset, damage, reason, caplog):
    first = _build(dataset)
    damage(first.path, first.path.with_suffix(".json"))
    del first  # release the memory map before the file is replaced
    with caplog.at_level(logging.WARNING, logger="src.data.cache"):
        second = _build(dataset)
    assert second.built
    assert re.search(rf"is corrupt \({reason}", caplog.text), caplog.text  # the warning names what is wrong
    _assert_matches_fresh_decode(second, dataset[0], dataset[2])
    assert not _build(dataset).built


def test_unreadable_images_are_excluded_and_reported(dataset, caplog):
    raw, _, rows = dataset
    (raw / "face_images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = rows[:2] + [("face_images/broken.png", "x"), ("face_images/missing.png", "y")] + rows[2:]
    with caplog.at_level(logging.WARNING, logger="src.data.cache"):
        cached = _build(dataset, rows=rows, workers=2)
    assert cached.kept == [0, 1, 4, 5, 6]
    assert [path for path, _ in cached.failed] == ["face_images/broken.png",
                                                   "face_images/missing.png"]
    assert all(reason for _, reason in cached.failed)
    assert "2 of 7 images could not be read" in caplog.text
    _assert_matches_fresh_decode(cached, raw, rows)
    # The failures are remembered with the cache (and warned about again), and a file that
    # appears changes the key.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="src.data.cache"):
        reused = _build(dataset, rows=rows)
    assert not reused.built and reused.failed == cached.failed
    assert "2 of 7 images could not be read" in caplog.text
    _write_png(raw / "face_images/missing.png", seed=7)
    assert _build(dataset, rows=rows).kept == [0, 1, 3, 4, 5, 6]


def test_an_image_the_build_could_not_read_is_decoded_once_it_can_be(dataset, monkeypatch):
    """A read refused while the cache was built (an I/O error on a network share, a file briefly
    locked) says nothing of the image: it was remembered with the cache, keyed by the file's unchanged
    bytes, and the image was left out of every later run. Bytes that do not decode stay remembered."""
    raw, _, rows = dataset
    (raw / "face_images/broken.png").write_bytes(b"not a png")
    rows = rows + [("face_images/broken.png", "x")]
    flaky = raw / rows[1][0]
    real_open, decode_all = open, cache._decode_all_into

    def refused(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == flaky:
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_open(file, mode, *args, **kwargs)

    def decode_with_reads_refused(*args, **kwargs):  # the key's hashing before it reads the file
        with monkeypatch.context() as patch:
            patch.setattr(builtins, "open", refused)
            return decode_all(*args, **kwargs)

    monkeypatch.setattr(cache, "_decode_all_into", decode_with_reads_refused)
    first = _build(dataset, rows=rows)
    assert first.failed == [(rows[1][0], "cannot be read (Input/output error)"),
                            ("face_images/broken.png", "not an image in a known format")]
    monkeypatch.setattr(cache, "_decode_all_into", decode_all)
    second = _build(dataset, rows=rows)
    assert second.built and second.failed == first.failed[1:]
    _assert_matches_fresh_decode(second, raw, rows)
    assert not _build(dataset, rows=rows).built


def test_running_out_of_memory_while_decoding_stops_the_build_naming_the_image(dataset, monkeypatch):
    """A MemoryError was taken for a bad image: the image was left out and remembered so with the
    cache. The build stops as when the system kills a worker for lack of memory, and keeps nothing."""
    def out_of_memory(image):
        raise MemoryError()

    monkeypatch.setattr(image_io, "_to_rgb", out_of_memory)
    with pytest.raises(WorkerDied, match="img 0.png: out of memory while decoding"):
        _build(dataset)
    assert sorted(p.name for p in dataset[1].iterdir()) == [".lock"]


@pytest.mark.parametrize("workers", [0, 2])
def test_rows_after_unreadable_images_move_up_in_order(dataset, workers):
    """Workers write each image into its own row; the rows of unreadable images (first, in a run,
    last) are closed up afterwards, every later row moving to its place among the kept ones."""
    raw, _, rows = dataset
    (raw / "face_images/broken.png").write_bytes(b"not a png")
    broken = ("face_images/broken.png", "x")
    rows = [broken, rows[0], broken, broken, rows[1], rows[2], broken, rows[3], rows[4], broken]
    cached = _build(dataset, rows=rows, workers=workers)
    assert cached.kept == [1, 4, 5, 7, 8]
    assert cached.path.stat().st_size == 5 * CACHE_SIZE * CACHE_SIZE * 3
    _assert_matches_fresh_decode(cached, raw, rows)
    assert not _build(dataset, rows=rows).built  # its checksums cover the closed-up file


def test_writing_to_the_tensor_leaves_the_cache_file_intact(dataset):
    cached = _build(dataset)
    cached.images[0].fill_(7)  # copy-on-write mapping: only this process's view changes
    reloaded = _build(dataset)
    assert not reloaded.built
    _assert_matches_fresh_decode(reloaded, dataset[0], dataset[2])


def test_interrupted_build_leftovers_are_removed(dataset):
    raw, cache_dir, rows = dataset
    cache_dir.mkdir(parents=True)
    leftover = cache_dir / "0123.u8.999.tmp"
    leftover.write_bytes(b"partial")
    _build(dataset)
    assert not leftover.exists()


def _swap_kept(data_path, meta_path):
    """Valid JSON, right shape and checksums, but rows 3 and 4 would get each other's labels."""
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["kept"][3], meta["kept"][4] = meta["kept"][4], meta["kept"][3]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")


def _kept_out_of_range(data_path, meta_path):
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["kept"][-1] = len(meta["kept"])  # no such row: indexing the labels would fail later
    meta_path.write_text(json.dumps(meta), encoding="utf-8")


def _other_key(data_path, meta_path):
    """Another cache's metadata (a file copied or renamed by hand) with this one's name."""
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["key"] = "0" * len(meta["key"])
    meta_path.write_text(json.dumps(meta), encoding="utf-8")


@pytest.mark.parametrize("damage", [_swap_kept, _kept_out_of_range, _other_key])
def test_metadata_that_does_not_match_the_image_list_is_rebuilt(dataset, damage, caplog):
    first = _build(dataset)
    damage(first.path, first.path.with_suffix(".json"))
    del first
    with caplog.at_level(logging.WARNING, logger="src.data.cache"):
        second = _build(dataset)
    assert second.built and second.kept == list(range(5))
    assert "corrupt" in caplog.text


def test_other_tmp_files_in_the_cache_dir_are_left_alone(dataset):
    """cache_dir may be a shared folder: only this module's own leftovers are removed."""
    cache_dir = dataset[1]
    cache_dir.mkdir(parents=True)
    others = [cache_dir / "notes.tmp", cache_dir / "download.part.tmp"]
    for other in others:
        other.write_bytes(b"someone else's")
    _build(dataset)
    assert all(other.exists() for other in others)


@pytest.mark.parametrize("module, name", [(PIL, "__version__"), (cache, "DECODE_SETTINGS"),
                                          (cache, "FORMAT_VERSION")])
def test_another_pillow_version_decoding_or_format_rebuilds(dataset, monkeypatch, module, name):
    """Pillow's decoders and resampling change between releases, and this project's decoding and
    file format between its versions: cached pixels must equal what this code decodes."""
    first = _build(dataset)
    monkeypatch.setattr(module, name, "changed")
    second = _build(dataset)
    assert second.built and second.key != first.key
    assert not first.path.exists()  # same list and size: superseded


def _read_only(monkeypatch):
    """Writing anything in a folder fails as on a read-only mount (root ignores chmod)."""
    def refuse(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *args, **kwargs)
    for module in (locks, cache, atomic):
        monkeypatch.setattr(module, "open", refuse, raising=False)


def test_a_read_only_cache_dir_with_a_valid_cache_is_used(dataset, monkeypatch):
    """A cache built once and shared read-only (a cluster's dataset mount) needs no lock."""
    _build(dataset)
    _read_only(monkeypatch)
    cached = _build(dataset)
    assert not cached.built
    _assert_matches_fresh_decode(cached, dataset[0], dataset[2])


def test_a_read_only_cache_dir_without_a_valid_cache_is_an_error(dataset, monkeypatch):
    dataset[1].mkdir(parents=True)
    _read_only(monkeypatch)
    with pytest.raises(OSError, match="Read-only"):
        _build(dataset)


def test_a_failed_metadata_write_leaves_no_data_file(dataset, monkeypatch):
    """Disk full after the data file: the build fails and leaves no data file without metadata
    (which no later build of other images would ever remove)."""
    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(cache.atomic, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        _build(dataset)
    assert sorted(p.name for p in dataset[1].iterdir()) == [".lock"]


def test_a_row_write_that_fails_leaves_nothing_behind(dataset, monkeypatch):
    """Disk full while the rows are written into the temporary file: the build fails with the
    system's error and leaves neither the temporary nor a data file."""
    def full_disk(path, mode="r", *args, **kwargs):
        if mode == "r+b":  # a row's write into the temporary file
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(decode, "open", full_disk, raising=False)
    with pytest.raises(OSError, match="No space"):
        _build(dataset)
    assert sorted(p.name for p in dataset[1].iterdir()) == [".lock"]


def test_the_cache_workers_module_does_not_import_torch():
    """The fork server behind the cache's workers imports `src.data.decode`: importing torch there
    cost every process's first cache build about a second."""
    check = "import sys, src.data.decode; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=REPO).returncode == 0


ORDER_CACHE_SIZE = 24


def _dataset(tmp_path, n=5):
    raw = tmp_path / "raw"
    rows = []
    for i in range(n):
        rel = f"face_images/img{i}.png"
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(raw / rel)
        rows.append((rel, f"chimp{i}"))
    return raw, tmp_path / "cache", rows


def _assert_rows_match(cached, raw, rows):
    assert len(cached.kept) == len(cached.images) > 0
    for position, index in enumerate(cached.kept):
        expected = decode_for_cache(raw / rows[index][0], ORDER_CACHE_SIZE)
        np.testing.assert_array_equal(cached.images[position].numpy(), expected)


def test_the_same_images_in_another_order_are_not_served_in_the_old_order(tmp_path):
    """ca1: `images[i]` must be the decoded `rows[kept[i]]`. A key that ignores the row order (e.g. a
    sorted list of (path, digest)) reuses a cache built for another order: every image then carries
    another image's label, silently."""
    raw, cache_dir, rows = _dataset(tmp_path)
    load_or_build_cache(rows, raw, cache_dir, ORDER_CACHE_SIZE, 0)
    reordered = rows[::-1]
    cached = load_or_build_cache(reordered, raw, cache_dir, ORDER_CACHE_SIZE, 0)
    _assert_rows_match(cached, raw, reordered)


def test_damage_beyond_the_first_checksum_chunk_is_detected(tmp_path, monkeypatch, caplog):
    """ca2: the corruption test flips byte 1000, always inside the first 64 MB chunk; a real cache
    (7,150 images at 256 px, 1.4 GB) has ~22 chunks. With small chunks, damage the *last* byte."""
    monkeypatch.setattr(cache, "CHECKSUM_CHUNK_BYTES", 1000)
    raw, cache_dir, rows = _dataset(tmp_path)
    first = load_or_build_cache(rows, raw, cache_dir, ORDER_CACHE_SIZE, 0)
    path = first.path
    del first
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    second = load_or_build_cache(rows, raw, cache_dir, ORDER_CACHE_SIZE, 0)
    assert second.built and "checksum mismatch" in caplog.text
    _assert_rows_match(second, raw, rows)


def test_decode_for_cache_takes_the_centre_square_of_a_tall_image_too(tmp_path):
    # A tall image: red / green / blue thirds from top to bottom; the centre square is the green third.
    pixels = np.zeros((90, 30, 3), np.uint8)
    pixels[:30, :, 0] = pixels[30:60, :, 1] = pixels[60:, :, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "tall.png")
    out = decode_for_cache(tmp_path / "tall.png", 20)
    np.testing.assert_array_equal(out[3:-3], np.broadcast_to([0, 255, 0], (14, 20, 3)))


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX FIFOs and devices")
def test_a_fifo_or_a_device_in_the_list_is_left_out_unopened(dataset):
    """Hashing the files for the cache's key opened them: a FIFO waits for a writer for ever, and
    /dev/zero never ends (training hung before its first step, and ignored SIGTERM)."""
    raw, _, rows = dataset
    os.mkfifo(raw / "face_images/fifo.png")
    (raw / "face_images/zero.png").symlink_to("/dev/zero")
    rows = rows + [("face_images/fifo.png", "x"), ("face_images/zero.png", "y")]
    cached = _build(dataset, rows=rows, workers=2)
    assert cached.kept == list(range(5))
    assert cached.failed == [("face_images/fifo.png", "not a regular file"),
                             ("face_images/zero.png", "not a regular file")]
