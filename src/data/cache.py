"""Decode every image once into a uint8 cache at training resolution, memory-mapped from disk.

PNG decoding costs ~2.5 ms per face crop on one core, far more than the model step per image on a
GPU, so the fast pipeline pays it once: each image becomes a `cache_size x cache_size x 3` uint8 row
of one raw file, `<cache_dir>/<key>.u8`, described by `<key>.json`. The key hashes the file
contents and the preprocessing, so editing an image or changing the resolution builds a new cache
by itself; a cache that fails its checksum is rebuilt with a warning.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL
import torch

from src import atomic, locks
from src.data.decode import DECODE_SETTINGS, content_digest, decode_into, unreadable_digest
from src.data.io import ImageLoadError, read_image_bytes
from src.parallel import WorkerDied, map_in_processes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Checksums cover fixed-size chunks so verification runs on several cores (zlib releases the GIL).
CHECKSUM_CHUNK_BYTES = 64 << 20
# Several images per task: one image per inter-process message would cost more than it carries.
DECODE_CHUNKSIZE = 16
# Errors that say the cache folder can be read but not written.
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass
class CachedImages:
    """A loaded cache. `images[i]` is the decoded `rows[kept[i]]`."""

    images: torch.Tensor
    """uint8 `N x S x S x 3`, backed by a copy-on-write memory map of the cache file (zero-copy)."""
    kept: list[int]
    """Indices into the rows of the images present."""
    failed: list[tuple[str, str]]
    """`(relative path, reason)` of every image that could not be decoded."""
    key: str
    path: Path
    """The `.u8` file."""
    built: bool
    """True when this call decoded the images, False when an existing cache was reused."""


def load_or_build_cache(rows: Sequence[tuple[str, str]], raw_dir: str | Path,
                        cache_dir: str | Path, cache_size: int, workers: int) -> CachedImages:
    """The cache of `rows` (`(relative_path, individual)`), reused when valid, else (re)built.

    Hashes every image file (blake2b, ~1 GB/s per core) to find the key, so a changed image is
    never served stale; decodes with `workers` processes when building (0: in this process).
    """
    raw_dir, cache_dir = Path(raw_dir), Path(cache_dir)
    rel_paths = [rel for rel, _ in rows]
    digests = _content_digests([raw_dir / rel for rel in rel_paths], workers)
    key = _cache_key(rel_paths, digests, cache_size)
    atomic.make_folder(cache_dir)
    with ExitStack() as stack:
        # The lock makes torchrun ranks build a cache once, not each. Without locks (Windows)
        # concurrent builders still produce a valid cache, each renaming identical bytes into place.
        try:
            exclusive = stack.enter_context(locks.exclusive(cache_dir / ".lock"))
        except OSError as exc:
            # A cache shared read-only (built once on a cluster's dataset mount, say) is used as it
            # is. Reading needs no lock: cache files only ever appear whole, by rename.
            cached = (_open_verified(cache_dir, key, cache_size, rel_paths)
                      if exc.errno in READ_ONLY_ERRNOS else None)
            if cached is None:
                raise
        else:
            cached = _open_verified(cache_dir, key, cache_size, rel_paths)
        if cached is None:
            if exclusive:
                _remove_temporaries(cache_dir)
            started = time.perf_counter()
            key = _build(cache_dir, key, raw_dir, rel_paths, cache_size, workers)
            log.info("built image cache %s (%d images, %d px) in %.1f s", key, len(rel_paths),
                     cache_size, time.perf_counter() - started)
            superseded = {_slot(raw_dir, rel_paths, cache_size), _legacy_slot(rel_paths, cache_size)}
            _prune_superseded(cache_dir, key, superseded)
            cached = _open(cache_dir, key, _read_meta(cache_dir, key), built=True)
    if cached.failed:  # every run, not only the one that built the cache
        examples = "; ".join(f"{rel}: {reason}" for rel, reason in cached.failed[:5])
        log.warning("%d of %d images could not be read and are left out: %s%s",
                    len(cached.failed), len(rows), examples,
                    " ..." if len(cached.failed) > 5 else "")
    return cached


# --- keying -------------------------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    """The digest the build gives the file (`decode_into`): of its bytes, or, for a file that cannot
    be read, a marker, so that its return changes the key. A FIFO or a device is never opened: a FIFO
    waits for a writer, and /dev/zero never ends."""
    try:
        return content_digest(read_image_bytes(path))
    except ImageLoadError as exc:
        return unreadable_digest(exc)


def _content_digests(paths: Sequence[Path], workers: int) -> list[str]:
    # Threads suffice: hashlib releases the GIL while hashing, and reads are I/O.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(_file_digest, paths))


def _hash_json(value) -> str:
    return hashlib.blake2b(json.dumps(value).encode(), digest_size=16).hexdigest()


def _cache_key(rel_paths: Sequence[str], digests: Sequence[str], cache_size: int) -> str:
    """Identifies the pixels: format, preprocessing, and each row's path and file contents.

    Labels are not part of it: relabelling an image reuses the cache.
    """
    return _hash_json([FORMAT_VERSION, DECODE_SETTINGS, PIL.__version__, cache_size,
                       list(zip(rel_paths, digests))])


def _slot(raw_dir: Path, rel_paths: Sequence[str], cache_size: int) -> str:
    """Same images (folder and list) at the same size: a newer build in the slot supersedes the
    older. With the folder in it, two datasets with the same layout can share `cache_dir`."""
    return _hash_json([str(raw_dir.resolve()), cache_size, list(rel_paths)])


def _legacy_slot(rel_paths: Sequence[str], cache_size: int) -> str:
    """The slot of caches built before the folder was part of it: superseded all the same (their
    decode settings are older too, so no build of this code can use them)."""
    return _hash_json([cache_size, list(rel_paths)])


# --- loading and verification -------------------------------------------------------------------

def _data_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.u8"


def _meta_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.json"


def _read_meta(cache_dir: Path, key: str) -> dict:
    return json.loads(_meta_path(cache_dir, key).read_text(encoding="utf-8"))


def _chunk_checksums(path: Path) -> list[int]:
    """crc32 of each CHECKSUM_CHUNK_BYTES of the file, computed on several cores.

    crc32 runs at ~2.3 GB/s per core against ~1 GB/s for blake2b; it guards against torn writes
    and bit rot, not tampering, so the faster one is enough.
    """
    size = path.stat().st_size
    if size == 0:
        return []
    with (open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
          memoryview(mapped) as view, ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool):
        return list(pool.map(lambda start: zlib.crc32(view[start:start + CHECKSUM_CHUNK_BYTES]),
                             range(0, size, CHECKSUM_CHUNK_BYTES)))


def _problem(cache_dir: Path, key: str, meta: dict, cache_size: int,
             rel_paths: Sequence[str]) -> str | None:
    """Why the cache files on disk cannot be used as they are, or None when they can."""
    expected_shape = [len(meta["kept"]), cache_size, cache_size, 3]
    if meta.get("format_version") != FORMAT_VERSION or meta.get("key") != key:
        return "metadata belongs to another format or key"
    # The checksums cover the pixels, not the metadata: a damaged `kept` list that still parses
    # would give images the wrong labels. Kept and failed rows must split the list, in order.
    rows = range(len(rel_paths))
    kept = set(meta["kept"]) & set(rows)
    if (sorted(kept) != meta["kept"]
            or [rel_paths[i] for i in rows if i not in kept] != [rel for rel, _ in meta["failed"]]):
        return "metadata does not match the image list"
    if meta["shape"] != expected_shape:
        return f"shape {meta['shape']} does not match {expected_shape}"
    data = _data_path(cache_dir, key)
    if not data.is_file():
        return "data file missing"
    if data.stat().st_size != int(np.prod(expected_shape)):
        return f"data file has {data.stat().st_size} bytes, expected {int(np.prod(expected_shape))}"
    if _chunk_checksums(data) != meta["checksums"]:
        return "checksum mismatch"
    return None


def _open_verified(cache_dir: Path, key: str, cache_size: int,
                   rel_paths: Sequence[str]) -> CachedImages | None:
    """The existing cache for `key` after a full checksum, or None (with a warning if corrupt).

    Verifying reads the whole file, ~0.2 s per GB on 2 cores from the page cache; the first epoch
    reads those pages anyway, so the check costs little more than the crc itself.
    """
    if not _meta_path(cache_dir, key).exists() and not _data_path(cache_dir, key).exists():
        return None
    try:
        meta = _read_meta(cache_dir, key)
        problem = _problem(cache_dir, key, meta, cache_size, rel_paths)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"unreadable metadata ({type(exc).__name__}: {exc})"
    if problem is not None:
        log.warning("image cache %s is corrupt (%s); rebuilding", _data_path(cache_dir, key),
                    problem)
        return None
    return _open(cache_dir, key, meta, built=False)


def _open(cache_dir: Path, key: str, meta: dict, built: bool) -> CachedImages:
    shape = tuple(meta["shape"])
    if shape[0] == 0:  # mmap cannot map an empty file
        images = torch.empty(shape, dtype=torch.uint8)
    else:
        # mode "c": the file is opened read-only and mapped copy-on-write, so an accidental in-place
        # op on the tensor can neither crash (as on a read-only mapping) nor alter the cache file.
        array = np.memmap(_data_path(cache_dir, key), dtype=np.uint8, mode="c", shape=shape)
        images = torch.from_numpy(array)
    return CachedImages(images=images, kept=list(meta["kept"]),
                        failed=[tuple(item) for item in meta["failed"]], key=key,
                        path=_data_path(cache_dir, key), built=built)


# --- building -----------------------------------------------------------------------------------

def _decode_all_into(target: Path, paths: Sequence[Path], cache_size: int, workers: int
                     ) -> list[tuple[str | None, str]]:
    """Decode `paths[i]` into row i of `target` with `workers` processes (0: in this one); each
    path's failure reason and the digest of the bytes decoded (`decode_into`).

    Processes, not threads: PIL releases the GIL while decoding, but load_rgb's Python work does
    not, so threads stop scaling (16 cores, 7,150 PNGs: 4.6 s with processes, 8.0 s with threads,
    measured while rows still went back through a pipe; on 2 cores threads won by 15%).
    """
    decode = partial(decode_into, target=target, cache_size=cache_size)
    jobs = list(enumerate(paths))
    try:
        if workers == 0:
            return list(map(decode, jobs))
        return list(map_in_processes(decode, jobs, workers, decode_into.__module__, DECODE_CHUNKSIZE))
    except MemoryError as exc:  # as for a worker killed for lack of memory: the build stops, keeping nothing
        raise WorkerDied(f"{exc}; try fewer workers than {workers}" if workers > 1 else str(exc)) from None


def _drop_rows(path: Path, kept: Sequence[int], row_bytes: int) -> None:
    """Close the gaps of failed rows: each kept row moves to its position among the kept ones."""
    with open(path, "r+b") as data:
        for position, row in enumerate(kept):
            if position != row:  # position < row, so no row is overwritten before it is moved
                data.seek(row * row_bytes)
                pixels = data.read(row_bytes)
                data.seek(position * row_bytes)
                data.write(pixels)
        data.truncate(len(kept) * row_bytes)


def _build(cache_dir: Path, key: str, raw_dir: Path, rel_paths: Sequence[str], cache_size: int,
           workers: int) -> str:
    """Decode every row into a cache and describe it, both renamed into place; the key they were
    stored under: that of the bytes decoded, which differs from `key` (the files as hashed before)
    where a file changed in between, or was read by one and not the other. A file the build could
    not read is keyed by its marker, so the next start that can read it builds a cache with it rather
    than reuse this one, which would leave it out for as long as its bytes stay the same.

    The data file is renamed before the metadata: a crash in between leaves data without metadata,
    which the next start treats as corrupt and rebuilds. A metadata write that fails (disk full)
    removes the data file: under a key that may never recur, nothing else would.
    """
    temporary = _data_path(cache_dir, key).with_name(f"{key}.u8.{os.getpid()}.tmp")
    row_bytes = cache_size * cache_size * 3
    try:
        with open(temporary, "wb") as out:
            out.truncate(len(rel_paths) * row_bytes)  # every row's place, for the workers to fill
        decoded = _decode_all_into(temporary, [raw_dir / rel for rel in rel_paths], cache_size, workers)
        reasons = [reason for reason, _ in decoded]
        key = _cache_key(rel_paths, [digest for _, digest in decoded], cache_size)
        data = _data_path(cache_dir, key)
        kept = [row for row, reason in enumerate(reasons) if reason is None]
        failed = [(rel, reason) for rel, reason in zip(rel_paths, reasons) if reason is not None]
        if failed:
            _drop_rows(temporary, kept, row_bytes)
        checksums = _chunk_checksums(temporary)
        os.replace(temporary, data)
    finally:
        temporary.unlink(missing_ok=True)
    meta = {"format_version": FORMAT_VERSION, "key": key, "slot": _slot(raw_dir, rel_paths, cache_size),
            "decode": DECODE_SETTINGS, "pillow": PIL.__version__, "cache_size": cache_size,
            "shape": [len(kept), cache_size, cache_size, 3], "kept": kept, "failed": failed,
            "checksum": "crc32", "checksum_chunk_bytes": CHECKSUM_CHUNK_BYTES,
            "checksums": checksums, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        atomic.write_text(_meta_path(cache_dir, key), json.dumps(meta))
    except BaseException:
        data.unlink(missing_ok=True)
        raise
    return key


# --- housekeeping -------------------------------------------------------------------------------

def _remove_temporaries(cache_dir: Path) -> None:
    """Leftovers of builds that were killed; only safe while holding the directory lock.

    Only `_build`'s own names: cache_dir may be a folder shared with other programs' files.
    """
    for leftover in cache_dir.glob("*.u8.*.tmp"):
        log.info("removing %s, left by an interrupted cache build", leftover)
        leftover.unlink(missing_ok=True)


def _prune_superseded(cache_dir: Path, key: str, slots: set[str]) -> None:
    """Delete older caches in `slots` (the same images at the same size): their contents are gone.

    Caches of other folders, lists or sizes stay (runs at 112 and 224 px may alternate); deleting
    `cache_dir` by hand is always safe.
    """
    for meta_path in cache_dir.glob("*.json"):
        other = meta_path.stem
        if other == key:
            continue
        try:
            other_slot = json.loads(meta_path.read_text(encoding="utf-8")).get("slot")
        except (OSError, ValueError, AttributeError):
            continue
        if other_slot in slots:
            log.info("removing superseded image cache %s", _data_path(cache_dir, other))
            _data_path(cache_dir, other).unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
