"""Resumable verified downloads and the `url` source kind, against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from stages import downloads
from stages.downloads import download, download_cache
from stages.errors import UserError
from stages.sources import UrlOptions, get_source


class FileServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving in-memory files, with knobs for failures.

    files: path -> bytes. cut_once: path -> N, send only N bytes of the next response for that path
    (with the full Content-Length) and drop the connection. ignore_range: paths answered 200 with the
    whole file whatever the Range header says. status: path -> an error status to answer.
    requests: (path, Range header or None) for every request received. chunked: paths sent with
    Transfer-Encoding: chunked, in 1,000-byte chunks, with no Content-Length. stall_once: path -> N, send
    N bytes of the next response for that path, then hold the connection open until `release` is
    set (a download caught mid-way, for a test to kill). headers: path -> extra response headers
    (Content-Encoding, Retry-After, ...). status_once: path -> [status, ...], answered (with the
    path's headers) before the file is served. status_after_cut: path -> a status that `status` takes
    on once a cut_once for that path has happened (a run that stops after the drop, with its .part).
    no_length: paths sent with neither Content-Length nor chunking, the body ending when the
    connection closes (HTTP/1.0's way): a cut_once there looks like the end of the file. cut_always:
    path -> N, as cut_once for every response for that path.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: dict[str, int] = {}
        self.ignore_range: set[str] = set()
        self.status: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.stall_once: dict[str, int] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.status_once: dict[str, list[int]] = {}
        self.chunked: set[str] = set()
        self.status_after_cut: dict[str, int] = {}
        self.no_length: set[str] = set()
        self.cut_always: dict[str, int] = {}
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                path = self.path
                with server.lock:
                    server.requests.append((path, self.headers.get("Range")))
                    status = server.status.get(path)
                    cut = server.cut_once.pop(path, server.cut_always.get(path))
                    if cut is not None and path in server.status_after_cut:
                        server.status[path] = server.status_after_cut.pop(path)
                    stall = server.stall_once.pop(path, None)
                    if status is None and server.status_once.get(path):
                        status = server.status_once[path].pop(0)
                extra = server.headers.get(path, {})
                if status is not None:
                    self.send_response(status)
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = 0
                wanted = self.headers.get("Range")
                if wanted and path not in server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/octet-stream")
                if path in server.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for at in range(0, len(body), 1000):
                        piece = body[at : at + 1000]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if path in server.no_length:
                    self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                    self.close_connection = True
                    if cut is not None:
                        self.wfile.write(body[:cut])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(body)
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if stall is not None:
                    self.wfile.write(body[:stall])
                    self.wfile.flush()
                    server.release.wait(60)
                    self.close_connection = True
                    return
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    # Drop the connection mid-body: the client sees fewer bytes than announced.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def ranges(self, path: str) -> list[str | None]:
        return [wanted for seen, wanted in self.requests if seen == path]


@pytest.fixture
def server():
    served = FileServer()
    served.thread.start()
    yield served
    served.release.set()
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """No real waiting between retries in tests."""
    monkeypatch.setattr(downloads, "BACKOFF_S", 0.01)


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------------------------
# download()


def test_full_download_is_verified_and_renamed_into_place(server, tmp_path):
    """A plain download lands at the target with the right sha256 and no .part left behind."""
    data = payload(300_000)
    server.files["/data.bin"] = data
    target = tmp_path / "cache" / "data.bin"

    result = download(server.url("/data.bin"), target, sha256=sha(data), what="test")

    assert target.read_bytes() == data
    assert result == {"name": "data.bin", "sha256": sha(data), "bytes": len(data), "downloaded": True}
    assert not target.with_name("data.bin.part").exists()
    assert server.ranges("/data.bin") == [None]


def test_a_target_already_there_with_the_right_sha256_makes_no_request(server, tmp_path):
    """A cached, verified file is reused without contacting the server."""
    data = payload(1000)
    target = tmp_path / "data.bin"
    target.write_bytes(data)

    result = download(server.url("/data.bin"), target, sha256=sha(data), what="test")

    assert result["downloaded"] is False and result["sha256"] == sha(data)
    assert server.requests == []


def test_a_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    """Cut off after 100,000 bytes, the download asks for the rest with Range and ends complete."""
    data = payload(250_000, seed=1)
    server.files["/big.bin"] = data
    server.cut_once["/big.bin"] = 100_000
    target = tmp_path / "big.bin"

    result = download(server.url("/big.bin"), target, sha256=sha(data), what="test")

    first, resumed = server.ranges("/big.bin")
    assert first is None
    # The bytes kept before the drop are whole chunks, at most the 100,000 that arrived.
    start = int(resumed.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 100_000
    assert target.read_bytes() == data and result["sha256"] == sha(data)
    assert not target.with_name("big.bin.part").exists()


def test_a_part_left_by_a_killed_run_is_resumed(server, tmp_path):
    """A .part from an earlier, killed run is continued rather than fetched again."""
    data = payload(50_000, seed=2)
    server.files["/f.bin"] = data
    target = tmp_path / "f.bin"
    target.with_name("f.bin.part").write_bytes(data[:12_345])

    download(server.url("/f.bin"), target, sha256=sha(data), what="test")

    assert server.ranges("/f.bin") == ["bytes=12345-"]
    assert target.read_bytes() == data


@pytest.mark.parametrize("validator", ["ETag", "Last-Modified"])
def test_a_part_of_a_file_since_changed_on_the_server_is_not_continued_with_the_new_file(server, tmp_path, validator):
    """A .part left by a run cut off, then the file replaced upstream (and its new sha256 pinned):
    the rerun must not append the new file's tail to the old file's head. The server here ignores
    If-Range, as many do; its ETag (or Last-Modified) tells the 206 is of another file, and the
    download starts again from zero instead of failing its checksum."""
    old, new = payload(60_000, seed=20), payload(60_000, seed=21)
    values = {"ETag": ('"v1"', '"v2"'), "Last-Modified": ("Mon, 01 Jan 2024 00:00:00 GMT",
                                                          "Tue, 02 Jan 2024 00:00:00 GMT")}[validator]
    server.files["/f.bin"] = old
    server.headers["/f.bin"] = {validator: values[0]}
    server.cut_once["/f.bin"] = 30_000
    server.status_after_cut["/f.bin"] = 404  # the run stops after the drop, keeping its .part
    target = tmp_path / "f.bin"
    with pytest.raises(UserError):
        download(server.url("/f.bin"), target, sha256=sha(old), what="test")
    assert target.with_name("f.bin.part").stat().st_size > 0

    del server.status["/f.bin"]
    server.files["/f.bin"] = new
    server.headers["/f.bin"] = {validator: values[1]}
    result = download(server.url("/f.bin"), target, sha256=sha(new), what="test")

    assert target.read_bytes() == new and result["downloaded"] is True
    assert server.ranges("/f.bin")[-1] is None  # the last request asked for the whole file
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_server_that_ignores_range_restarts_the_file_from_zero(server, tmp_path):
    """Answered 200 to a Range request, the download rewrites the .part instead of appending."""
    data = payload(40_000, seed=3)
    server.files["/f.bin"] = data
    server.ignore_range.add("/f.bin")
    target = tmp_path / "f.bin"
    # Junk, not a prefix of the file: appending to it would give a wrong checksum.
    target.with_name("f.bin.part").write_bytes(b"x" * 5000)

    result = download(server.url("/f.bin"), target, sha256=sha(data), what="test")

    assert server.ranges("/f.bin") == ["bytes=5000-"]
    assert target.read_bytes() == data and result["downloaded"] is True


def test_a_sha256_mismatch_is_one_line_and_keeps_the_file_for_a_corrected_pin(server, tmp_path):
    """No verified file appears, the message gives both checksums, the URL and what to do, and the
    bytes wait under their own checksum: pinning that checksum uses them, with no second download."""
    data = payload(2000, seed=4)
    server.files["/f.bin"] = data
    target = tmp_path / "f.bin"
    wrong = "0" * 64

    with pytest.raises(UserError) as caught:
        download(server.url("/f.bin"), target, sha256=wrong, what="datasets.x.source.url")

    message = str(caught.value)
    kept = tmp_path / f"f.bin.sha256-{sha(data)}"
    assert "\n" not in message
    assert wrong in message and sha(data) in message and server.url("/f.bin") in message
    assert f"The file is kept as {kept}: if it is the right one, pin sha256 {sha(data)} in params.yaml" in message
    assert not target.exists() and not target.with_name("f.bin.part").exists()
    assert kept.read_bytes() == data

    result = download(server.url("/f.bin"), target, sha256=sha(data), what="datasets.x.source.url")

    assert result["downloaded"] is False and target.read_bytes() == data and not kept.exists()
    assert len(server.ranges("/f.bin")) == 1


def test_404_is_one_line_naming_the_url_and_not_retried(server, tmp_path):
    with pytest.raises(UserError) as caught:
        download(server.url("/missing.zip"), tmp_path / "missing.zip", sha256=None, what="datasets.x.source.url")

    message = str(caught.value)
    assert "\n" not in message
    assert server.url("/missing.zip") in message and "404" in message and "params.yaml" in message
    assert len(server.requests) == 1


def test_500_is_retried_then_reported(server, tmp_path):
    """A server error is transient: retried `retries` more times, then one line naming the URL."""
    server.status["/f.bin"] = 500

    with pytest.raises(UserError) as caught:
        download(server.url("/f.bin"), tmp_path / "f.bin", sha256=None, what="test", retries=2)

    message = str(caught.value)
    assert "\n" not in message and "500" in message and server.url("/f.bin") in message
    assert len(server.requests) == 3


def test_connection_refused_is_one_line_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/f.bin"

    with pytest.raises(UserError) as caught:
        download(url, tmp_path / "f.bin", sha256=None, what="datasets.x.source.url", retries=1)

    message = str(caught.value)
    assert "\n" not in message
    assert url in message and "connection refused" in message and "network" in message


# --------------------------------------------------------------------------------------------
# The `url` source kind.


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "downloads"
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(folder))
    return folder


def test_fetch_url_extracts_a_zip_and_reports_refused_entries(server, cache, tmp_path):
    """The archive is cached under the download folder, extracted safely, and a `../x` entry is
    refused and reported; a second fetch reuses the cached archive."""
    data = zip_bytes({"cats/1.png": b"one", "dogs/2.png": b"two", "../x": b"escape"})
    server.files["/files/pets.zip"] = data
    options = UrlOptions(url=server.url("/files/pets.zip"), sha256=sha(data).upper())
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("url").fetch(options, dest, "pets")

    assert download_cache("pets") == cache / "pets"
    assert (cache / "pets" / "pets.zip").read_bytes() == data
    assert (dest / "cats" / "1.png").read_bytes() == b"one"
    assert (dest / "dogs" / "2.png").read_bytes() == b"two"
    assert not (tmp_path / "x").exists()
    assert details["refused"] == [{"entry": "../x", "reason": "path outside the dataset folder"}]
    assert details["archives"] == [{"name": "pets.zip", "sha256": sha(data), "bytes": len(data)}]
    assert details["origin"] == options.url and details["this_run"]["downloaded"] is True

    again = tmp_path / "raw2"
    again.mkdir()
    details = get_source("url").fetch(options, again, "pets")
    assert details["this_run"]["downloaded"] is False
    assert len(server.requests) == 1
    assert (again / "cats" / "1.png").exists()


def test_fetch_url_without_extract_copies_the_file(server, cache, tmp_path):
    data = zip_bytes({"a.txt": b"a"})
    server.files["/pets.zip"] = data
    options = UrlOptions(url=server.url("/pets.zip"), sha256=sha(data), extract=False)
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("url").fetch(options, dest, "pets")

    assert sorted(p.name for p in dest.iterdir()) == ["pets.zip"]
    assert (dest / "pets.zip").read_bytes() == data
    assert details["refused"] == []


@pytest.mark.parametrize("pinned", ["", "abc123", "g" * 64, "0" * 63])
def test_a_malformed_sha256_names_the_params_key(server, cache, tmp_path, pinned):
    options = UrlOptions(url=server.url("/pets.zip"), sha256=pinned)

    with pytest.raises(UserError) as caught:
        get_source("url").fetch(options, tmp_path, "pets")

    message = str(caught.value)
    assert "datasets.pets.source.sha256" in message and "\n" not in message
    assert server.requests == []


def test_download_cache_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("CLASSMATRIX_DOWNLOADS", raising=False)
    assert download_cache("d") == Path("data/downloads/d")
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path))
    assert download_cache("d") == tmp_path / "d"


def test_a_fetch_killed_mid_download_resumes_on_the_rerun_with_the_same_checksum(server, tmp_path):
    """The real fetch stage, SIGKILLed while its archive is half downloaded; run again, it asks
    only for the rest, and the dataset and its recorded checksum are those of a clean download."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.toy import toy_params

    data = zip_bytes({f"cats/{i}.png": payload(10_000, seed=i) for i in range(40)})
    sent = 3 * downloads.CHUNK  # whole chunks: the client writes each as it completes
    server.files["/pets.zip"] = data
    server.stall_once["/pets.zip"] = sent
    params = toy_params(["cats"], source={"kind": "url", "url": server.url("/pets.zip"), "sha256": sha(data)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "CLASSMATRIX_DOWNLOADS": str(tmp_path / "downloads")}
    command = [sys.executable, "-m", "stages.fetch", "--dataset", "toy", "--out", str(tmp_path / "raw"),
               "--provenance", str(tmp_path / "raw.provenance.json"), "--params", str(tmp_path / "params.yaml")]
    part = tmp_path / "downloads" / "toy" / "pets.zip.part"
    killed = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # until the bytes sent are on disk (the server then holds the rest back)
        if part.is_file() and part.stat().st_size >= sent:
            break
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    server.release.set()
    assert killed.returncode == -signal.SIGKILL
    assert part.stat().st_size == sent and not (tmp_path / "raw").exists()  # nothing looks complete

    rerun = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert server.ranges("/pets.zip") == [None, f"bytes={sent}-"]
    record = json.loads((tmp_path / "raw.provenance.json").read_text())
    assert record["archives"] == [{"name": "pets.zip", "sha256": sha(data), "bytes": len(data)}]
    assert sorted(p.name for p in (tmp_path / "raw" / "cats").iterdir()) == sorted(f"{i}.png" for i in range(40))


def test_fetching_the_same_file_again_writes_the_same_provenance(server, tmp_path, monkeypatch, capsys):
    """The record holds what was obtained, not when or how: the second fetch, from the download
    cache, writes the same bytes (DVC then sees validate's dependency unchanged), and only the
    printed line says which run downloaded."""
    import yaml

    from stages.fetch import fetch
    from tests.toy import toy_params

    data = zip_bytes({f"cats/{i}.png": payload(1_000, seed=i) for i in range(3)})
    server.files["/pets.zip"] = data
    params = toy_params(["cats"], source={"kind": "url", "url": server.url("/pets.zip"), "sha256": sha(data)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "downloads"))
    provenance = tmp_path / "raw.provenance.json"

    fetch("toy", str(tmp_path / "params.yaml"), tmp_path / "raw", provenance)
    first, said_first = provenance.read_bytes(), capsys.readouterr().out
    fetch("toy", str(tmp_path / "params.yaml"), tmp_path / "raw", provenance)
    second, said_second = provenance.read_bytes(), capsys.readouterr().out

    assert second == first
    assert len(server.ranges("/pets.zip")) == 1  # the second came from the cache
    assert "; downloaded: True" in said_first and "; downloaded: False" in said_second
    assert "this_run" not in json.loads(first) and "obtained_at" not in json.loads(first)


def test_a_tar_gz_labelled_content_encoding_gzip_is_kept_as_sent(server, tmp_path, monkeypatch):
    """Apache's `AddEncoding x-gzip .gz` (or nginx's gzip_static) labels a .tar.gz Content-Encoding:
    gzip, whatever the request accepts. The file is the bytes sent, as curl and wget save them: the
    pinned sha256 matches, and the archive extracts."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("cat/0.png", "dog/0.png"):
            content = name.encode() * 100
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    data = buffer.getvalue()
    server.files["/pets.tar.gz"] = data
    server.headers["/pets.tar.gz"] = {"Content-Encoding": "gzip"}
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "downloads"))
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("url").fetch(UrlOptions(url=server.url("/pets.tar.gz"), sha256=sha(data)), dest, "toy")

    assert details["archives"][0]["sha256"] == sha(data)
    assert (dest / "cat" / "0.png").read_bytes() == b"cat/0.png" * 100


def test_an_archive_behind_a_url_without_a_suffix_is_extracted(server, tmp_path, monkeypatch):
    """Figshare's /ndownloader/files/<id>, Google Drive's /uc?id=...: a name with no suffix is
    told by its content; a name with another suffix is kept as it is (an .xlsx is a zip too)."""
    data = zip_bytes({"cat/0.png": b"c" * 10, "dog/0.png": b"d" * 10})
    server.files["/ndownloader/files/12345"] = data
    server.files["/labels.xlsx"] = data
    # An ISO image starts with 32 KiB of zeros: tarfile.is_tarfile takes that for an empty tar.
    disk = bytes(32768) + b"CD001" + bytes(1000)
    server.files["/files/disk"] = disk
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "downloads"))
    fetch = get_source("url").fetch

    (tmp_path / "a").mkdir()
    fetch(UrlOptions(url=server.url("/ndownloader/files/12345"), sha256=sha(data)), tmp_path / "a", "toy")
    (tmp_path / "b").mkdir()
    fetch(UrlOptions(url=server.url("/labels.xlsx"), sha256=sha(data)), tmp_path / "b", "toy")

    assert sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.png")) == [
        "cat/0.png", "dog/0.png"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["labels.xlsx"]
    (tmp_path / "c").mkdir()
    fetch(UrlOptions(url=server.url("/files/disk"), sha256=sha(disk)), tmp_path / "c", "toy")
    assert [p.read_bytes() for p in (tmp_path / "c").iterdir()] == [disk]


def test_a_web_page_served_instead_of_the_file_is_named_as_such_not_offered_as_a_pin(server, tmp_path, monkeypatch):
    """Google Drive's "can't scan this file for viruses" page, a sign-in page, an expired link's
    page: the server answers 200 with HTML. That is no upstream change to pin, and nothing to keep."""
    data = zip_bytes({"cat/0.png": b"c" * 10})
    page = b"\n<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body></body></html>"
    server.files["/uc?export=download&id=abc"] = page
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "downloads"))
    url = server.url("/uc?export=download&id=abc")
    (tmp_path / "raw").mkdir()

    with pytest.raises(UserError) as caught:
        get_source("url").fetch(UrlOptions(url=url, sha256=sha(data)), tmp_path / "raw", "toy")

    message = str(caught.value)
    assert "\n" not in message and url in message
    assert "web page (HTML)" in message and "direct download link" in message
    assert "pin sha256" not in message
    assert list((tmp_path / "downloads" / "toy").iterdir()) == []


def test_retry_after_is_waited_for_and_a_long_one_stops_at_once(server, tmp_path, monkeypatch):
    """A 429 or 503 with Retry-After waits what the server asks, not the back-off; a wait beyond
    MAX_RETRY_AFTER_S stops the download with the wait in the message, after one request."""
    data = payload(3000, seed=7)
    server.files["/f.bin"] = data
    server.status_once["/f.bin"] = [429, 503]
    server.headers["/f.bin"] = {"Retry-After": "7"}
    waits: list[float] = []
    monkeypatch.setattr(downloads.time, "sleep", waits.append)

    result = download(server.url("/f.bin"), tmp_path / "f.bin", sha256=sha(data), what="datasets.x.source.url")

    assert waits == [7.0, 7.0] and result["downloaded"] is True

    server.files["/g.bin"] = data
    server.status["/g.bin"] = 429
    server.headers["/g.bin"] = {"Retry-After": "3600"}
    with pytest.raises(UserError) as caught:
        download(server.url("/g.bin"), tmp_path / "g.bin", sha256=sha(data), what="datasets.x.source.url")
    assert str(caught.value).startswith(
        f"datasets.x.source.url: {server.url('/g.bin')} asks to wait 3,600 s before the next request (HTTP 429 "
    )
    assert len(server.ranges("/g.bin")) == 1 and waits == [7.0, 7.0]


def test_a_rate_limit_that_outlasts_the_retries_says_so(server, tmp_path):
    server.status["/f.bin"] = 429

    with pytest.raises(UserError) as caught:
        download(server.url("/f.bin"), tmp_path / "f.bin", sha256=None, what="datasets.x.source.url", retries=1)

    assert "(HTTP 429 Too Many Requests); the server is limiting requests: wait a few minutes and run again" in str(
        caught.value)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_full_disk_names_the_partial_file_and_keeps_it(server, tmp_path, chunked):
    """The real fetch stage with a file-size limit (EFBIG, as a full disk gives ENOSPC): one line
    naming the file being written, and the bytes written so far kept for the rerun to resume.
    Chunked: small blocks wait in the file's buffer, and the error comes when it is closed."""
    import resource
    import signal
    import subprocess
    import sys

    import yaml

    from tests.toy import toy_params

    data = payload(1_000_000, seed=9)
    server.files["/big.zip"] = data
    if chunked:
        server.chunked.add("/big.zip")
    params = toy_params(["cats"], source={"kind": "url", "url": server.url("/big.zip"), "sha256": sha(data)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    part = tmp_path / "downloads" / "toy" / "big.zip.part"
    finished = subprocess.run(
        [sys.executable, "-m", "stages.fetch", "--dataset", "toy", "--out", str(tmp_path / "raw"),
         "--provenance", str(tmp_path / "raw.provenance.json"), "--params", str(tmp_path / "params.yaml")],
        cwd=Path(__file__).resolve().parents[1], env={**os.environ, "CLASSMATRIX_DOWNLOADS": str(tmp_path / "downloads")},
        capture_output=True, text=True, timeout=300, preexec_fn=limit,
    )

    assert finished.returncode != 0
    last = finished.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no room left writing {part} (File too large)"), finished.stderr[-2000:]
    assert 0 < part.stat().st_size <= 200_000


def test_a_signed_link_redirected_to_is_not_printed_when_it_fails(tmp_path: Path) -> None:
    """A release URL redirects to a signed storage link (GitHub's objects.githubusercontent.com,
    S3's X-Amz-Signature); a TLS failure there (a proxy intercepting TLS) put requests' words,
    the signed link's query string with them, in the one-line error."""

    class Redirects(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            # To https on this plain-HTTP port: the TLS handshake fails.
            signed = f"https://127.0.0.1:{port}/bucket/file.zip?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef5ecret"
            self.send_response(302)
            self.send_header("Location", signed)
            self.send_header("Content-Length", "0")
            self.end_headers()

    listener = ThreadingHTTPServer(("127.0.0.1", 0), Redirects)
    port = listener.server_address[1]
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError) as failed:
            download(f"http://127.0.0.1:{port}/releases/file.zip", tmp_path / "file.zip", sha256="0" * 64,
                     what="datasets.x.source.url", retries=0)
    finally:
        listener.shutdown()
    message = str(failed.value)
    assert "deadbeef5ecret" not in message and "AKIAEXAMPLE" not in message, message
    assert "/bucket/file.zip?..." in message and "\n" not in message


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_served_by_a_script_url_is_extracted(tmp_path, monkeypatch, capsys, kind):
    """`https://host/download.php?id=3` serving a zip or a tar.gz: the file name is the script's,
    `download.php`, whose suffix says nothing about what it sends. Told by its content and
    extracted, as a name with no suffix is (before: copied as `download.php`, without a word, and
    validate found no images)."""
    import tarfile

    from tests.local_http import FolderServer

    host = tmp_path / "host"
    host.mkdir()
    entries = {"cat/0.png": b"c" * 10, "dog/0.png": b"d" * 10}
    if kind == "zip":
        data = zip_bytes(entries)
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, content in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        data = buffer.getvalue()
    (host / "download.php").write_bytes(data)
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "downloads"))
    dest = tmp_path / "raw"
    dest.mkdir()
    server = FolderServer(host)
    try:
        details = get_source("url").fetch(UrlOptions(url=server.url("download.php?id=3"), sha256=sha(data)), dest, "toy")
    finally:
        server.stop()

    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["cat/0.png", "dog/0.png"]
    assert details["archives"][0]["sha256"] == sha(data)


def test_an_archive_kept_for_its_suffix_is_named_in_a_note(server, tmp_path, monkeypatch, capsys):
    """A zip whose name has another suffix (`pets.v2`, an `.xlsx`) is kept as it is, not
    extracted; a note names the file and the key, so a raw folder with no images is explained."""
    data = zip_bytes({"cat/0.png": b"c" * 10})
    server.files["/pets.v2"] = data
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "downloads"))
    for folder, extract in (("a", True), ("b", False)):
        (tmp_path / folder).mkdir()
        get_source("url").fetch(UrlOptions(url=server.url("/pets.v2"), sha256=sha(data), extract=extract),
                                tmp_path / folder, "toy")
        said = capsys.readouterr().out
        assert [p.name for p in (tmp_path / folder).iterdir()] == ["pets.v2"]
        if extract:
            assert said.count("\n") == 1 and said.startswith("fetch@toy: note: pets.v2 (from datasets.toy.source.url) "
                                                             "is a zip archive by its content"), said
            assert "datasets.toy.source.extract: false" in said
        else:
            assert said == ""


def test_a_damaged_archive_inside_a_verified_download_says_the_publisher_ships_it_so(server, cache, tmp_path):
    """A download that matches its pinned sha256 but holds a damaged `data/test.tar.gz`: one line
    naming the inner archive by its path in the download, saying downloading again gives the same
    bytes and what to do instead (before: '<raw>.partial/data/test.tar.gz: not a readable archive
    (...); download it again', naming a folder the failed fetch deletes)."""
    damaged = bytearray(tar_bytes({"test/cat/1.png": np.random.default_rng(0).bytes(20_000)}, "w:gz"))
    damaged[len(damaged) // 2] ^= 0xFF
    data = zip_bytes({"data/train.zip": zip_bytes({"train/cat/0.png": b"c0"}), "data/test.tar.gz": bytes(damaged)})
    server.files["/pets.zip"] = data
    dest = tmp_path / "raw"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        get_source("url").fetch(UrlOptions(url=server.url("/pets.zip"), sha256=sha(data)), dest, "pets")

    message = str(caught.value)
    assert message.startswith("data/test.tar.gz inside pets.zip from datasets.pets.source.url: not a readable "
                              "archive (gzip stream: "), message
    assert "the download matches its pinned sha256" in message and str(cache / "pets" / "pets.zip") in message
    assert "download it again" not in message and str(dest) not in message and "\n" not in message


def test_a_verified_download_that_is_a_damaged_archive_says_the_publisher_ships_it_so(server, cache, tmp_path):
    """The download itself matches its pinned sha256 but is no whole archive: downloading it again
    gives the same bytes, so the line says so (before: 'download it again')."""
    damaged = bytearray(tar_bytes({"cat/1.png": np.random.default_rng(0).bytes(20_000)}, "w:gz"))
    damaged[len(damaged) // 2] ^= 0xFF
    server.files["/pets.tar.gz"] = bytes(damaged)
    dest = tmp_path / "raw"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        get_source("url").fetch(UrlOptions(url=server.url("/pets.tar.gz"), sha256=sha(bytes(damaged))), dest, "pets")

    message = str(caught.value)
    assert message.startswith(f"{cache / 'pets' / 'pets.tar.gz'}: not a readable archive (gzip stream: "), message
    assert "it matches datasets.pets.source.sha256, so downloading it again gives the same bytes" in message
    assert "\n" not in message


def tar_bytes(entries: dict[str, bytes], mode: str) -> bytes:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def pe_stub(size: int = 4096) -> bytes:
    """A Windows executable's bytes (MZ header, PE header, one section ending at `size`), as a
    self-extracting zip's stub: the zip is appended after its last section."""
    stub = bytearray(size)
    stub[:2] = b"MZ"
    stub[0x3C:0x40] = (0x80).to_bytes(4, "little")
    stub[0x80:0x84] = b"PE\0\0"
    stub[0x86:0x88] = (1).to_bytes(2, "little")  # one section
    stub[0x94:0x96] = (0xE0).to_bytes(2, "little")  # the optional header's size
    section = 0x80 + 24 + 0xE0
    stub[section:section + 5] = b".text"
    stub[section + 16:section + 20] = (size - 0x400).to_bytes(4, "little")  # its size in the file
    stub[section + 20:section + 24] = (0x400).to_bytes(4, "little")  # where it starts
    return bytes(stub)


CUT_ARCHIVES = {
    "zip": ("/pets.zip", lambda entries: zip_bytes(entries)),
    "tar.gz": ("/pets.tar.gz", lambda entries: tar_bytes(entries, "w:gz")),
    "tar": ("/pets.tar", lambda entries: tar_bytes(entries, "w")),
    "suffixless-zip": ("/files/123", lambda entries: zip_bytes(entries)),
    "unpinned-tar.xz": ("/pets.tar.xz", lambda entries: tar_bytes(entries, "w:xz")),
    "self-extracting-zip": ("/pets.exe", lambda entries: pe_stub() + zip_bytes(entries)),
}


@pytest.mark.parametrize("kind", CUT_ARCHIVES)
def test_an_archive_cut_short_without_a_content_length_is_resumed_not_taken_as_whole(server, tmp_path, kind):
    """A server that sends no Content-Length (HTTP/1.0's read-until-close) and drops the
    connection mid-way: the bytes received look like the whole file. The archive is read to its
    end (zip's central directory, gzip's end marker, the tar's last member) before it is taken;
    cut short, it is resumed with Range like a cut with a known length (before: taken as
    complete, and a sha256 mismatch offered to pin the truncated file)."""
    path, build = CUT_ARCHIVES[kind]
    data = build({f"cats/{i}.png": payload(20_000, seed=i) for i in range(10)})
    server.files[path] = data
    server.no_length.add(path)
    server.cut_once[path] = len(data) // 2
    target = tmp_path / path.rsplit("/", 1)[-1]

    # Unpinned, as weights and Open Images' metadata are downloaded: nothing else would notice.
    pinned = None if kind.startswith("unpinned") else sha(data)

    result = download(server.url(path), target, sha256=pinned, what="datasets.x.source.url")

    assert target.read_bytes() == data and result["downloaded"] is True
    assert server.ranges(path) == [None, f"bytes={len(data) // 2}-"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_pinned_file_that_is_itself_a_short_archive_is_taken_as_pinned(server, tmp_path):
    """The cut-short check guards against a truncated download, not against the file pinned: an
    upstream zip that itself ends early, sent with no length, whose sha256 is the pin, is the file
    asked for (before: retried as cut short until the tries ran out)."""
    data = zip_bytes({f"cats/{i}.png": payload(20_000, seed=i) for i in range(3)})[:-40_000]
    server.files["/short.zip"] = data
    server.no_length.add("/short.zip")
    target = tmp_path / "short.zip"

    result = download(server.url("/short.zip"), target, sha256=sha(data), what="datasets.x.source.url", retries=0)

    assert target.read_bytes() == data and result["downloaded"] is True
    assert server.ranges("/short.zip") == [None]


def test_an_archive_cut_short_without_a_content_length_says_so_and_keeps_the_part(server, tmp_path):
    """Retries spent (a server that ignores Range and drops at the same byte each time), the one
    line says the download was cut short at N bytes and to run again; the .part is kept for the
    rerun to resume, and no file is offered as a pin."""
    data = zip_bytes({f"cats/{i}.png": payload(20_000, seed=i) for i in range(10)})
    server.files["/pets.zip"] = data
    server.no_length.add("/pets.zip")
    server.ignore_range.add("/pets.zip")
    server.cut_always["/pets.zip"] = 123_456
    target = tmp_path / "pets.zip"
    url = server.url("/pets.zip")

    with pytest.raises(UserError) as caught:
        download(url, target, sha256=sha(data), what="datasets.x.source.url", retries=0)

    message = str(caught.value)
    part = tmp_path / "pets.zip.part"
    assert "\n" not in message and url in message, message
    assert "cut short at 123,456 bytes" in message and f"run again (it resumes from the 123,456 bytes in {part})" in message
    assert "pin sha256" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets.zip.part", "pets.zip.part.validator"]
    assert part.stat().st_size == 123_456

    assert len(server.ranges("/pets.zip")) == 2  # a try that brings no further byte counts against the retries

    del server.cut_always["/pets.zip"]
    server.ignore_range.discard("/pets.zip")
    download(url, target, sha256=sha(data), what="datasets.x.source.url")
    assert target.read_bytes() == data and server.ranges("/pets.zip")[-1] == "bytes=123456-"


def test_a_part_begun_from_another_url_is_not_continued_from_the_new_one(server, tmp_path):
    """A download begun from the wrong URL (`download.php?id=3` for `?id=4`, a v1 for a v2, both
    saved under one name), stopped, the URL and its sha256 corrected: the rerun must not append
    the new file's tail to the other file's head. A server without ETag or Last-Modified (a
    script's answer) gives If-Range nothing to compare; the URL the .part came from does."""
    old, new = payload(60_000, seed=30), payload(60_000, seed=31)
    server.files["/download.php?id=3"] = old
    server.files["/download.php?id=4"] = new
    server.cut_once["/download.php?id=3"] = 30_000
    server.status_after_cut["/download.php?id=3"] = 404  # the run stops after the drop, keeping its .part
    target = tmp_path / "download.php"
    with pytest.raises(UserError):
        download(server.url("/download.php?id=3"), target, sha256=sha(old), what="test")
    assert target.with_name("download.php.part").stat().st_size > 0

    result = download(server.url("/download.php?id=4"), target, sha256=sha(new), what="test")

    assert target.read_bytes() == new and result["downloaded"] is True
    assert server.ranges("/download.php?id=4") == [None]
    assert [p.name for p in tmp_path.iterdir()] == ["download.php"]


def test_archives_inside_a_downloaded_archive_are_unpacked_as_kaggle_does(server, cache, tmp_path):
    """A `url` archive holding `train.zip` and `test.tar.gz` (a common packing): the inner
    archives are unpacked in place, as a Kaggle source's are, and an entry refused inside one is
    listed with that archive's path (before: left packed, so validate set them aside as 'not an
    image file' and the dataset had no images)."""
    train = zip_bytes({"train/cat/0.png": b"c0", "train/dog/0.png": b"d0", "../escape": b"x"})
    test = tar_bytes({"test/cat/1.png": b"c1", "test/dog/1.png": b"d1"}, "w:gz")
    data = zip_bytes({"data/train.zip": train, "data/test.tar.gz": test, "README.txt": b"hi"})
    server.files["/pets.zip"] = data
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("url").fetch(UrlOptions(url=server.url("/pets.zip"), sha256=sha(data)), dest, "pets")

    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "README.txt", "data/test/cat/1.png", "data/test/dog/1.png", "data/train/cat/0.png", "data/train/dog/0.png"]
    assert details["refused"] == [
        {"archive": "data/train.zip", "entry": "../escape", "reason": "path outside the dataset folder"}]
    assert not (tmp_path / "escape").exists() and not (dest / "escape").exists()
