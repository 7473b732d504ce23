"""`prepare --download`: fetch the public C-Zoo/C-Tai release, resumably, and verify it.

The release is the zip archive of the public repository `cvjena/chimpanzee_faces`, fetched over
HTTPS with urllib (no extra dependency). A download that is interrupted, within a run (retried) or by
killing the process (rerun), resumes from `<raw-dir>.zip.part` with an HTTP Range request; a server
that ignores Range (or answers with another range) makes it start over, which is slower but still
correct. The archive's own CRCs are checked before extracting, and after extracting every image the
two annotation files list must exist.

Terms of the data: non-commercial use (research, education), citing Freytag et al., "Chimpanzee Faces
in the Wild: Log-Euclidean CNNs for Predicting Identities and Attributes of Primates", GCPR 2016.
"""
from __future__ import annotations

import http.client
import logging
import re
import shutil
import socket
import time
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from src import atomic
from src.data.annotations import STANDIN_MARKER, AnnotationError, Record, holds_standins, read_cvjena
from src.errors import clipped_repr

DEFAULT_URL = "https://github.com/cvjena/chimpanzee_faces/archive/refs/heads/master.zip"
TERMS = ("C-Zoo/C-Tai (Freytag et al., GCPR 2016): non-commercial use only (research, education), "
         "citing the paper")
CHUNK_BYTES = 1 << 20
PROGRESS_BYTES = 64 << 20
RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}

log = logging.getLogger(__name__)


class DownloadError(Exception):
    """The release could not be fetched or is incomplete; one line, saying what to do."""


class _Interrupted(Exception):
    """A transfer that stopped early; the next attempt resumes it."""


def fetch_release(raw_dir: str | Path, url: str = DEFAULT_URL, *, attempts: int = 5,
                  wait_s: float = 2.0, timeout_s: float = 60.0) -> dict[str, int]:
    """Download, extract into `raw_dir` and verify; {source: images} of the verified release.

    Does nothing but verify when `raw_dir` already holds the complete release. The archive is deleted
    once the release is verified, and kept otherwise, so that a rerun does not download it again.
    """
    raw_dir = Path(raw_dir)
    if holds_standins(raw_dir):  # complete in the release's layout, so it would pass for the release
        raise DownloadError(f"{raw_dir} holds stand-in images (synthetic, not chimpanzees; see its "
                            f"{STANDIN_MARKER}), not the release: give --raw-dir another folder, or delete "
                            f"{raw_dir} to download the release there")
    try:
        counts = verify_release(raw_dir)
        log.info("release already in %s; nothing to download", raw_dir)
        return counts
    except DownloadError:
        pass
    log.info("data terms: %s", TERMS)
    archive = raw_dir.with_name(raw_dir.name + ".zip")
    if not archive.is_file():
        download(url, archive, attempts=attempts, wait_s=wait_s, timeout_s=timeout_s)
    extract(archive, raw_dir)
    try:
        counts = verify_release(raw_dir)
    except DownloadError as exc:  # a rerun would unpack the same archive again, whatever its --url
        raise DownloadError(f"{exc}, after unpacking {archive}; it lacks those images: delete it to "
                            f"download again (check --url)") from None
    archive.unlink()
    return counts


def download(url: str, dest: Path, *, attempts: int = 5, wait_s: float = 2.0,
             timeout_s: float = 60.0) -> Path:
    """Fetch `url` into `dest` through `dest.part`, resuming after interruptions; checks the zip."""
    atomic.make_folder(dest.parent)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, timeout_s)
            break
        except _Interrupted as exc:
            have = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                raise DownloadError(f"download of {url} failed {attempts} times ({exc}); run again to "
                                    f"resume from {have:,} bytes in {part}") from None
            log.info("interrupted at %s bytes (%s); resuming, attempt %d of %d", f"{have:,}", exc,
                     attempt + 1, attempts)
            time.sleep(wait_s * attempt)
    check_archive(part)
    part.replace(dest)
    return dest


def _transfer(url: str, part: Path, timeout_s: float) -> None:
    """One request: appends to `part` from where it ends; raises _Interrupted when it stops early."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "chimp-faces-prepare"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout_s)
    except HTTPError as exc:
        _handle_http_error(exc, url, part, have)
        return
    except ValueError as exc:  # Request's refusal of something that is not a URL at all
        raise DownloadError(f"--url {url}: {exc}") from None
    except URLError as exc:
        if isinstance(exc.reason, socket.gaierror):
            raise DownloadError(f"{url}: cannot resolve the host ({exc.reason}); no internet?") from None
        raise _Interrupted(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(str(exc) or type(exc).__name__) from None
    with response:
        try:
            start, total = _resume_point(response, have)
        except _Interrupted:  # the part kept, each attempt would ask for the same range, never starting over
            part.unlink()
            raise
        if have and start == 0:
            log.info("the server ignored the range request; starting over")
        elif have:
            log.info("resuming at %s bytes", f"{start:,}")
        _copy_body(response, part, start, total)


def _handle_http_error(exc: HTTPError, url: str, part: Path, have: int) -> None:
    """416 after a complete transfer means done; transient codes retry; anything else is fatal."""
    if exc.code == 416 and have:
        total = _total_of(exc.headers.get("Content-Range", ""))
        if total == have:
            return
        part.unlink()
        raise _Interrupted("partial download does not match the file on the server; starting over")
    if exc.code in RETRYABLE_HTTP:
        raise _Interrupted(f"HTTP {exc.code}")
    raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None


def _resume_point(response, have: int) -> tuple[int, int | None]:
    """(offset the body starts at, total size or None) from the response headers."""
    if response.status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == have:
            return have, None if match.group(2) == "*" else int(match.group(2))
        raise _Interrupted("unexpected Content-Range; starting over")
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _total_of(content_range: str) -> int | None:
    match = re.search(r"/(\d+)$", content_range)
    return int(match.group(1)) if match else None


def _copy_body(response, part: Path, start: int, total: int | None) -> None:
    size = start
    next_report = start + PROGRESS_BYTES
    try:
        with part.open("ab" if start else "wb") as f:
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                size += len(chunk)
                if size >= next_report:
                    log.info("downloaded %s MiB%s", f"{size >> 20:,}",
                             f" of {total >> 20:,} MiB" if total else "")
                    next_report += PROGRESS_BYTES
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(f"{type(exc).__name__} at {size:,} bytes") from None
    if total is not None and size < total:
        raise _Interrupted(f"connection closed at {size:,} of {total:,} bytes")


def check_archive(archive: Path) -> None:
    """Every member's CRC; a corrupt archive is deleted so that a rerun fetches a fresh one."""
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        bad = str(exc)
    if bad:
        archive.unlink()
        raise DownloadError(f"downloaded archive is corrupt ({bad}); deleted it, run again")


def extract(archive: Path, raw_dir: Path) -> None:
    """Unpack into `raw_dir`, dropping the archive's single top folder (`chimpanzee_faces-master/`)
    so that `raw_dir` is the repository root, and refusing paths that would leave `raw_dir`."""
    log.info("extracting %s into %s", archive.name, raw_dir)
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        tops = {PurePosixPath(m.filename).parts[0] for m in members}
        strip = 1 if len(tops) == 1 and all(len(PurePosixPath(m.filename).parts) > 1 for m in members) else 0
        for member in members:
            parts = PurePosixPath(member.filename).parts[strip:]
            if member.filename.startswith("/") or ".." in parts:
                raise DownloadError(f"{archive}: unsafe path {clipped_repr(member.filename)} in the archive")
            target = raw_dir.joinpath(*parts)
            atomic.make_folder(target.parent)
            # Written beside and renamed when whole: a run stopped mid-file (Ctrl-C, kill, a full disk) leaves
            # the file absent, which verify_release sees, not truncated, which it would take for complete.
            # No fsync per file (atomic.write_bytes): it made unpacking 7,187 images 40 times slower.
            partial = target.with_name(f".{target.name}.part")
            try:
                with zf.open(member) as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)


def verify_release(raw_dir: Path) -> dict[str, int]:
    """{source: images} when every image of both annotation files exists, else DownloadError."""
    try:
        records = read_cvjena(raw_dir)
    except AnnotationError as exc:
        raise DownloadError(f"release in {raw_dir} is incomplete: {exc}") from None
    absent, summary = absent_images(records, raw_dir)
    if absent:
        raise DownloadError(f"release in {raw_dir} is incomplete: images present {summary}")
    log.info("verified   every annotated image is present: %s", summary)
    return dict(Counter(r.source for r in records))


def absent_images(records: Sequence[Record], raw_dir: Path) -> tuple[list[Record], str]:
    """(records whose image is not a file under `raw_dir`, 'CZoo 2,109 of 2,109, CTai 5,078 of 5,078'
    images present per source)."""
    absent = [r for r in records if not (raw_dir / r.path).is_file()]
    expected = Counter(r.source for r in records)
    missing_per_source = Counter(r.source for r in absent)
    summary = ", ".join(f"{source} {n - missing_per_source[source]:,} of {n:,}" for source, n in expected.items())
    return absent, summary
