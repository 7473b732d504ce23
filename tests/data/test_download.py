"""`--download` against a loopback HTTP server with Range support that can drop a connection."""
from __future__ import annotations

import io
import re
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from src.data import standin
from src.data.download import DownloadError, download, extract, fetch_release
from src.data.prepare import main

TOP = "chimpanzee_faces-master/datasets_cropped_chimpanzee_faces"
SOURCES = (("data_CZoo", "annotations_czoo.txt", "Kofi"), ("data_CTai", "annotations_ctai.txt", "Fredy"))


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")  # noisy pixels: the archive cannot compress them away
    return buffer.getvalue()


def release_zip(images_per_source: int = 4, leave_out: str | None = None) -> bytes:
    """A stand-in of the public archive: top folder, both annotation files, their images, in the
    archive's order (the repository's paths sorted: each annotation file before its face_images/)."""
    members = {"chimpanzee_faces-master/README.md": b"stand-in\n"}
    seed = 0
    for folder, filename, name in SOURCES:
        lines = []
        for i in range(images_per_source):
            image = f"img-{name}-{i}.png"
            lines.append(f"face_images/{image} Name {name} Age 5 Age_group Adult Gender Male RightEye 1 2 "
                         f"LeftEye 3 4 MouthCenter 5 6 LeftEarlobe Inf Inf RightEarlobe Inf Inf \n")
            if image != leave_out:
                seed += 1
                members[f"{TOP}/{folder}/face_images/{image}"] = _png_bytes(seed)
        members[f"{TOP}/{folder}/{filename}"] = "".join(lines).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(members):
            zf.writestr(path, members[path])
    return buffer.getvalue()


class Server:
    """Serves one payload at /release.zip. `drop_after` bytes: the first response stops there and
    closes the connection; `ranges=False`: Range headers are ignored (200 with the whole file);
    `ranges="from 0"`: a Range request is answered 206 with the whole file, from byte 0."""

    def __init__(self, payload: bytes, drop_after: int | None = None, ranges: bool | str = True, status: int = 200):
        self.payload, self.drop_after, self.ranges, self.status = payload, drop_after, ranges, status
        self.requests: list[str | None] = []  # the Range header of each request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.headers.get("Range"))
                server.respond(self)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/release.zip"

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        if self.status != 200:
            handler.send_error(self.status)
            return
        total, start = len(self.payload), 0
        asked = handler.headers.get("Range")
        if asked and self.ranges:
            start = 0 if self.ranges == "from 0" else int(asked.removeprefix("bytes=").split("-")[0])
            if start >= total:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{total}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(total - start))
        handler.end_headers()
        body = self.payload[start:]
        if self.drop_after is not None and len(self.requests) == 1:
            handler.wfile.write(body[: self.drop_after])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(body)


@pytest.fixture
def serve(monkeypatch) -> Iterator:
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers: list[Server] = []

    def start(*args, **kwargs) -> Server:
        server = Server(*args, **kwargs)
        threading.Thread(target=server.httpd.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_interrupted_download_resumes_and_verifies(tmp_path, serve):
    payload = release_zip()
    server = serve(payload, drop_after=5000)
    raw = tmp_path / "raw"
    counts = fetch_release(raw, server.url, wait_s=0)
    assert counts == {"CZoo": 4, "CTai": 4}
    assert server.requests == [None, "bytes=5000-"]
    faces = raw / "datasets_cropped_chimpanzee_faces" / "data_CTai" / "face_images"
    assert (faces / "img-Fredy-3.png").is_file()
    assert (raw / "README.md").is_file()
    assert not (tmp_path / "raw.zip").exists() and not (tmp_path / "raw.zip.part").exists()
    assert fetch_release(raw, server.url) == counts and len(server.requests) == 2  # nothing fetched again


def test_download_resumes_a_part_left_by_a_killed_run(tmp_path, serve):
    payload = release_zip()
    server = serve(payload)
    (tmp_path / "release.zip.part").write_bytes(payload[:3000])
    download(server.url, tmp_path / "release.zip", wait_s=0)
    assert server.requests == ["bytes=3000-"]
    assert (tmp_path / "release.zip").read_bytes() == payload


def test_server_without_range_support_starts_over(tmp_path, serve):
    payload = release_zip()
    server = serve(payload, drop_after=4000, ranges=False)
    download(server.url, tmp_path / "release.zip", wait_s=0)
    assert server.requests == [None, "bytes=4000-"]
    assert (tmp_path / "release.zip").read_bytes() == payload


def test_a_range_answered_from_another_offset_starts_over(tmp_path, serve):
    """The body was appended to the part as if it began where the part ends (a corrupt archive); then
    the part was kept, so every attempt asked for the same range, "starting over" never."""
    payload = release_zip()
    server = serve(payload, ranges="from 0")
    (tmp_path / "release.zip.part").write_bytes(payload[:3000])
    download(server.url, tmp_path / "release.zip", wait_s=0)
    assert server.requests == ["bytes=3000-", None]
    assert (tmp_path / "release.zip").read_bytes() == payload


def test_complete_part_is_recognised_by_416(tmp_path, serve):
    payload = release_zip()
    server = serve(payload)
    (tmp_path / "release.zip.part").write_bytes(payload)
    download(server.url, tmp_path / "release.zip", wait_s=0)
    assert server.requests == [f"bytes={len(payload)}-"]
    assert (tmp_path / "release.zip").read_bytes() == payload


def test_incomplete_release_fails_verification_and_keeps_the_archive(tmp_path, serve):
    server = serve(release_zip(leave_out="img-Kofi-2.png"))
    with pytest.raises(DownloadError, match="incomplete: images present CZoo 3 of 4, CTai 4 of 4"):
        fetch_release(tmp_path / "raw", server.url, wait_s=0)
    assert (tmp_path / "raw.zip").is_file()
    # A rerun unpacks the kept archive, not a corrected --url: the message says how to get out of that.
    with pytest.raises(DownloadError, match=r"after unpacking .*raw.zip; it lacks those images: delete it"):
        fetch_release(tmp_path / "raw", "http://127.0.0.1:9/other.zip", wait_s=0)


def test_unpacking_stopped_mid_file_leaves_no_truncated_image(tmp_path, serve, monkeypatch):
    """Stopped while writing the archive's last image, unpacking left it truncated beside every other
    file: the rerun found the release complete and prepare dropped that image as unreadable (exit 0,
    one image fewer). Now the file is absent until whole, so the rerun unpacks the kept archive again."""
    server = serve(release_zip())
    copy = shutil.copyfileobj

    def stopped_on_the_last_image(src, dst):
        if "img-Kofi-3.png" in Path(dst.name).name:
            dst.write(src.read(100))
            raise KeyboardInterrupt
        copy(src, dst)

    monkeypatch.setattr("src.data.download.shutil.copyfileobj", stopped_on_the_last_image)
    raw = tmp_path / "raw"
    with pytest.raises(KeyboardInterrupt):
        fetch_release(raw, server.url, wait_s=0)
    monkeypatch.undo()
    assert fetch_release(raw, server.url, wait_s=0) == {"CZoo": 4, "CTai": 4}
    faces = raw / "datasets_cropped_chimpanzee_faces" / "data_CZoo" / "face_images"
    assert Image.open(faces / "img-Kofi-3.png").load() is not None  # whole: it decodes
    assert len(server.requests) == 1 and not (tmp_path / "raw.zip").exists()  # unpacked from the kept archive
    assert sorted(p.name for p in faces.iterdir()) == [f"img-Kofi-{i}.png" for i in range(4)]  # no .part left


def test_an_emptied_annotation_file_is_fetched_again(tmp_path, serve):
    """The release check took a release with an empty annotations_ctai.txt for complete (C-Zoo alone)."""
    server = serve(release_zip())
    raw = tmp_path / "raw"
    fetch_release(raw, server.url, wait_s=0)
    annotations = raw / "datasets_cropped_chimpanzee_faces" / "data_CTai" / "annotations_ctai.txt"
    annotations.write_text("")
    assert fetch_release(raw, server.url, wait_s=0) == {"CZoo": 4, "CTai": 4}
    assert len(server.requests) == 2 and annotations.read_text().count("\n") == 4


def test_corrupt_archive_is_deleted(tmp_path, serve):
    payload = bytearray(release_zip())
    payload[len(payload) // 2] ^= 0xFF  # inside some member's data: its CRC no longer matches
    server = serve(bytes(payload))
    with pytest.raises(DownloadError, match="corrupt"):
        download(server.url, tmp_path / "release.zip", wait_s=0)
    assert not (tmp_path / "release.zip").exists() and not (tmp_path / "release.zip.part").exists()


@pytest.mark.parametrize("unsafe", ["{tmp}/outside.txt", "top/../../outside.txt"], ids=["absolute", "dot-dot"])
def test_an_archive_member_outside_the_raw_dir_is_refused(tmp_path, unsafe):
    """A crafted archive must not write beside the raw folder ("zip slip")."""
    member = unsafe.format(tmp=tmp_path)
    with zipfile.ZipFile(tmp_path / "release.zip", "w") as zf:
        zf.writestr(member, b"x")
        zf.writestr("top/a.txt", b"y")
    with pytest.raises(DownloadError, match=re.escape(f"unsafe path '{member}' in the archive")):
        extract(tmp_path / "release.zip", tmp_path / "raw")
    assert not (tmp_path / "outside.txt").exists()


def test_http_errors(tmp_path, serve):
    missing = serve(b"", status=404)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(missing.url, tmp_path / "release.zip", wait_s=0)
    assert len(missing.requests) == 1
    failing = serve(b"", status=503)
    with pytest.raises(DownloadError, match="failed 2 times .*HTTP 503"):
        download(failing.url, tmp_path / "release.zip", attempts=2, wait_s=0)
    assert len(failing.requests) == 2


def test_prepare_download_cli(tmp_path, serve, capsys, monkeypatch):
    monkeypatch.setattr("src.data.download.time.sleep", lambda seconds: None)
    server = serve(release_zip(images_per_source=3), drop_after=2000)
    raw, out = tmp_path / "raw", tmp_path / "out"
    code = main(["--download", "--url", server.url, "--raw-dir", str(raw), "--out-dir", str(out),
                 "--min-images", "3", "--open-set-individuals", "0"])
    assert code == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "non-commercial" in stdout and "verified" in stdout
    assert (out / "annotations" / "train.txt").read_text().count("\n") == 2
    assert main(["--download", "--folder", str(raw)]) == 2


def test_a_url_that_is_not_a_url_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--download", "--url", "mirror.example.org/chimps.zip", "--raw-dir", str(tmp_path / "raw"),
                 "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --url mirror.example.org/chimps.zip: unknown url type: 'mirror.example.org/chimps.zip'\n"


def test_stand_in_images_are_not_taken_for_the_release(tmp_path, serve, capsys):
    """A complete stand-in tree in the release's layout would pass its check: a later --download into
    the same folder would "find the release" and prepare cartoons as chimpanzees."""
    raw = tmp_path / "raw"
    standin.generate_small(raw, individuals=2, images=3, size=32, seed=0, workers=1)
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))
    server = serve(release_zip())
    assert main(["--download", "--url", server.url, "--raw-dir", str(raw), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {raw} holds stand-in images (synthetic, not chimpanzees") and err.count("\n") == 1
    assert server.requests == [] and sorted(p.relative_to(raw) for p in raw.rglob("*")) == before
