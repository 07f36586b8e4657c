"""A fake Kaggle API for tests, reached by the real `kaggle` client without changing it.

The kaggle client (kaggle 2.2.5, kagglesdk 0.1.38) always talks to https://api.kaggle.com: it has
no endpoint variable (KAGGLE_API_ENVIRONMENT only picks among fixed hosts, none with a free port).
So the fake is what a corporate proxy is: `HTTPS_PROXY` points requests at it, it answers the
CONNECT for api.kaggle.com and storage.googleapis.com itself, and terminates TLS with a
certificate from a throwaway CA that `REQUESTS_CA_BUNDLE` makes trusted. The client runs exactly
as in production: the same URLs, TLS, the redirect to a signed storage URL, Range resumes.

Endpoints (POST, JSON, https://api.kaggle.com/v1/<service>/<method>), as the client calls them:
    security.OAuthService/IntrospectToken            access-token check during authenticate()
    datasets.DatasetApiService/GetDataset            currentVersionNumber (dataset_status)
    datasets.DatasetApiService/DownloadDataset       302 to the archive (a version, a file)
    competitions.CompetitionApiService/DownloadDataFiles, DownloadDataFile
    competitions.CompetitionApiService/ListDataFiles  the files (name, totalBytes, creationDate), paged
and GET https://storage.googleapis.com/kaggle-fake/... for the archives (ETag, Last-Modified,
x-goog-hash md5, Accept-Ranges; Range and If-Range answered with 206/200/416). Errors use Kaggle's
JSON shape, {"code": 403, "message": "..."}.

    with FakeKaggle(tmp_path) as fake:
        fake.add_dataset("owner/slug", zip_bytes, version=1)
        fake.apply(monkeypatch)            # proxy, CA bundle, HOME, kaggle.json with fake keys
        ...                                # the real client now talks to the fake
        fake.count("GET", "/kaggle-fake/datasets/owner/slug/1/slug.zip")
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import io
import json
import os
import secrets
import socket
import ssl
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_HOST = "api.kaggle.com"
STORAGE_HOST = "storage.googleapis.com"
HOSTS = (API_HOST, STORAGE_HOST)
# The creationDate ListDataFiles gives a competition's files unless add_competition is told another.
CREATED = "2024-01-02T03:04:05.000Z"
RULES_MESSAGE = "You must accept this competition's rules before you'll be able to download files."
# Every variable through which a real credential or a real proxy could leak into a test.
CLEARED = (
    "KAGGLE_API_TOKEN",
    "KAGGLE_USERNAME",
    "KAGGLE_KEY",
    "KAGGLE_API_ENVIRONMENT",
    "KAGGLE_KERNEL_RUN_TYPE",
    "KAGGLE_API_V1_TOKEN",
    "VERBOSE",
    "VERBOSE_OUTPUT",
    "ALL_PROXY",
    "all_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "CURL_CA_BUNDLE",
)


@dataclass
class Blob:
    """An object in the fake storage bucket."""

    data: bytes
    etag: str = ""
    last_modified: str = ""

    def __post_init__(self) -> None:
        self.etag = self.etag or '"' + hashlib.md5(self.data).hexdigest() + '"'
        stamp = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
        self.last_modified = self.last_modified or email.utils.formatdate(stamp, usegmt=True)

    @property
    def md5(self) -> str:
        return base64.b64encode(hashlib.md5(self.data).digest()).decode("ascii")


@dataclass
class Seen:
    """One request the fake answered."""

    method: str
    host: str
    path: str
    headers: dict[str, str]
    body: Any = None
    status: int = 0


@dataclass
class _Dataset:
    versions: dict[int, bytes] = field(default_factory=dict)
    files: dict[tuple[int, str], tuple[str, bytes]] = field(default_factory=dict)
    private: bool = False


@dataclass
class _Competition:
    archive: bytes = b""
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    rules_accepted: bool = True
    # What ListDataFiles answers: name -> (totalBytes, creationDate); a test may change it.
    listed: dict[str, tuple[int, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Certificates: a CA the client trusts (through REQUESTS_CA_BUNDLE) and a server certificate.


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """Write ca.pem, server.pem and server.key into `folder`; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=7))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "classmatrix fake Kaggle CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, API_HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


# --------------------------------------------------------------------------------------------
# The server.


class FakeKaggle:
    """The fake API and storage, behind a CONNECT proxy on 127.0.0.1 (a free port)."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = Path(tmp_path) / "fake-kaggle"
        self.username = "fakeuser"
        # Recognisable, random secrets: a test can search any output for them.
        self.key = "fakekey" + secrets.token_hex(16)
        self.token = "KGAT_fake" + secrets.token_hex(16)
        self.datasets: dict[str, _Dataset] = {}
        self.competitions: dict[str, _Competition] = {}
        self.blobs: dict[str, Blob] = {}
        self.seen: list[Seen] = []
        self._cuts: dict[str, int] = {}
        self._stalls: dict[str, float] = {}
        # True: the signed link of a download that `cut_once` cuts has expired by the time the
        # client retries with it (a long download outliving the link's lifetime), and answers as
        # an expired V4 signed URL does on Google Cloud Storage (400, ExpiredToken). Links the
        # API hands out later work.
        self.links_expire_on_cut = False
        self._expired_links: set[str] = set()
        # The most files one ListDataFiles page holds, whatever pageSize asks for.
        self.list_page_limit = 20
        self._lock = threading.Lock()
        self.ca, cert, key = _certificates(self.root / "tls")
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert, key)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FakeKaggle":
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-kaggle", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the port (a later connection is refused)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "FakeKaggle":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it serves ----------------------------------------------------------------------

    def add_dataset(
        self, ref: str, archive: bytes, version: int = 1, files: dict[str, bytes] | None = None,
        zipped_files: dict[str, bytes] | None = None, private: bool = False,
    ) -> None:
        """Serve `archive` as version `version` of dataset `ref`.

        `files` are served one by one as they are; `zipped_files` maps a file name to the zip
        Kaggle serves for it (as `<name>.zip`, the way it serves large files).
        """
        entry = self.datasets.setdefault(ref, _Dataset())
        entry.private = private
        entry.versions[version] = archive
        self._put(f"/kaggle-fake/datasets/{ref}/{version}/{ref.split('/')[1]}.zip", archive)
        for name, data in (files or {}).items():
            entry.files[(version, name)] = self._put(f"/kaggle-fake/datasets/{ref}/{version}/files/{name}", data)
        for name, data in (zipped_files or {}).items():
            entry.files[(version, name)] = self._put(f"/kaggle-fake/datasets/{ref}/{version}/files/{name}.zip", data)

    def add_competition(
        self, slug: str, archive: bytes, files: dict[str, bytes] | None = None, rules_accepted: bool = True,
        created: str = CREATED,
    ) -> None:
        """Serve `archive` as the competition's bundle, and `files` one by one. ListDataFiles lists
        the bundle's files and `files` (as Kaggle lists the files the bundle zips), each with its
        size and the creation date `created`; adding it again is a re-upload."""
        entry = self.competitions.setdefault(slug, _Competition())
        entry.archive = archive
        entry.rules_accepted = rules_accepted
        self._put(f"/kaggle-fake/competitions/{slug}/{slug}.zip", archive)
        with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
            entry.listed = {i.filename: (i.file_size, created) for i in bundle.infolist() if not i.is_dir()}
        for name, data in (files or {}).items():
            entry.files[name] = self._put(f"/kaggle-fake/competitions/{slug}/files/{name}", data)
            entry.listed[name] = (len(data), created)

    def _put(self, path: str, data: bytes) -> tuple[str, bytes]:
        self.blobs[path] = Blob(data)
        return path, data

    def cut_once(self, path: str, after: int) -> None:
        """The next full (not Range) GET of `path` sends `after` bytes of the body, then hangs up."""
        self._cuts[path] = after

    def stall_once(self, method: str, seconds: float) -> None:
        """The next call of API method `method` (e.g. "DownloadDataset") waits before answering."""
        self._stalls[method] = seconds

    # -- what it saw -------------------------------------------------------------------------

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [
                s for s in self.seen
                if (method is None or s.method == method) and (path is None or s.path == path)
            ]

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return len(self.requests(method, path))

    def rpc(self, name: str) -> list[Seen]:
        """The API calls of one method, e.g. rpc("DownloadDataset")."""
        return [s for s in self.requests("POST") if s.path.rsplit("/", 1)[-1] == name]

    # -- pointing the real client at it --------------------------------------------------------

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that route the kaggle client's HTTPS through this fake and trust it."""
        return {
            "HTTPS_PROXY": self.proxy,
            "https_proxy": self.proxy,
            "NO_PROXY": "",
            "no_proxy": "",
            "REQUESTS_CA_BUNDLE": str(self.ca),
        }

    def write_kaggle_json(self, folder: Path, key: str | None = None, mode: int = 0o600) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "kaggle.json"
        path.write_text(json.dumps({"username": self.username, "key": key or self.key}), encoding="utf-8")
        os.chmod(path, mode)
        return path

    def apply(self, monkeypatch: Any, credentials: str = "kaggle.json", home: Path | None = None) -> Path:
        """Point the real client at the fake, with a private HOME and downloads folder.

        `credentials`: "kaggle.json" (in KAGGLE_CONFIG_DIR), "env" (KAGGLE_USERNAME/KAGGLE_KEY),
        "token" (KAGGLE_API_TOKEN), "token-file" (~/.kaggle/access_token) or "none".
        Returns the HOME folder.
        """
        home = Path(home or self.root / "home")
        home.mkdir(parents=True, exist_ok=True)
        for name in CLEARED:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
        config = self.root / "kaggle-config"
        config.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
        monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(self.root / "downloads"))
        (config / "kaggle.json").unlink(missing_ok=True)
        (home / ".kaggle" / "access_token").unlink(missing_ok=True)
        if credentials == "kaggle.json":
            self.write_kaggle_json(config)
        elif credentials == "env":
            monkeypatch.setenv("KAGGLE_USERNAME", self.username)
            monkeypatch.setenv("KAGGLE_KEY", self.key)
        elif credentials == "token":
            monkeypatch.setenv("KAGGLE_API_TOKEN", self.token)
        elif credentials == "token-file":
            (home / ".kaggle").mkdir(exist_ok=True)
            (home / ".kaggle" / "access_token").write_text(self.token + "\n", encoding="utf-8")
        elif credentials != "none":
            raise ValueError(f"unknown credentials kind {credentials!r}")
        return home

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    # -- the API -------------------------------------------------------------------------------

    def _authorized(self, headers: dict[str, str]) -> bool:
        value = headers.get("authorization", "")
        scheme, _, credential = value.partition(" ")
        if scheme == "Bearer":
            return secrets.compare_digest(credential, self.token)
        if scheme == "Basic":
            try:
                user, _, key = base64.b64decode(credential).decode().partition(":")
            except ValueError:
                return False
            return user == self.username and secrets.compare_digest(key, self.key)
        return False

    def _api(self, method: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        """(status, JSON body) or (302, storage path) for one API call."""
        if method == "IntrospectToken":
            active = secrets.compare_digest(str(body.get("token", "")), self.token)
            return 200, {"active": active, "username": self.username if active else ""}
        if not self._authorized(headers):
            return 401, {"code": 401, "message": "Unauthenticated"}
        if method in ("GetDataset", "DownloadDataset"):
            ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
            dataset = self.datasets.get(ref)
            if dataset is None:
                return 404, {"code": 404, "message": f"Dataset {ref} not found"}
            if dataset.private:
                return 403, {"code": 403, "message": "Permission 'datasets.get' was denied"}
            current = max(dataset.versions)
            if method == "GetDataset":
                return 200, {"id": 1, "ref": ref, "currentVersionNumber": current, "title": ref}
            version = body.get("datasetVersionNumber") or current
            if version not in dataset.versions:
                return 404, {"code": 404, "message": f"Version {version} of {ref} not found"}
            name = body.get("fileName")
            if name is None:
                return 302, f"/kaggle-fake/datasets/{ref}/{version}/{ref.split('/')[1]}.zip"
            if (version, name) not in dataset.files:
                return 404, {"code": 404, "message": f"File {name} not found"}
            return 302, dataset.files[(version, name)][0]
        if method in ("DownloadDataFiles", "DownloadDataFile", "ListDataFiles"):
            slug = body.get("competitionName", "")
            competition = self.competitions.get(slug)
            if competition is None:
                return 404, {"code": 404, "message": f"Competition {slug} not found"}
            if not competition.rules_accepted:
                return 403, {"code": 403, "message": RULES_MESSAGE}
            if method == "ListDataFiles":
                # Pages in name order; the token is the offset of the next page.
                names, start = sorted(competition.listed), int(body.get("pageToken") or 0)
                end = start + min(int(body.get("pageSize") or 20), self.list_page_limit)
                files = [{"ref": "", "name": name, "totalBytes": competition.listed[name][0],
                          "creationDate": competition.listed[name][1]} for name in names[start:end]]
                return 200, {"files": files, **({"nextPageToken": str(end)} if end < len(names) else {})}
            if method == "DownloadDataFiles":
                return 302, f"/kaggle-fake/competitions/{slug}/{slug}.zip"
            name = body.get("fileName", "")
            if name not in competition.files:
                return 404, {"code": 404, "message": f"File {name} not found"}
            return 302, competition.files[name][0]
        return 404, {"code": 404, "message": f"Unknown method {method}"}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up on a body it no longer wants (a resume, a cache hit) is normal.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kaggle"
    tunnel_host = ""

    @property
    def fake(self) -> FakeKaggle:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _seen(self, body: Any = None) -> Seen:
        host = self.tunnel_host or self.headers.get("Host", "")
        seen = Seen(self.command, host, self.path.split("?")[0], {k.lower(): v for k, v in self.headers.items()}, body)
        with self.fake._lock:
            self.fake.seen.append(seen)
        return seen

    def do_CONNECT(self) -> None:
        host, _, port = self.path.partition(":")
        seen = self._seen()
        if host not in HOSTS or port != "443":
            # Nothing else is reachable from a test.
            seen.status = 403
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True
            return
        seen.status = 200
        self.send_response(200, "Connection established")
        self.end_headers()
        try:
            tls = self.fake._tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            self.close_connection = True
            return
        self.connection = tls
        self.rfile = tls.makefile("rb")
        self.wfile = tls.makefile("wb")
        self.tunnel_host = host
        self.close_connection = False

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass

    def _send_json(self, status: int, body: Any, seen: Seen) -> None:
        data = json.dumps(body).encode()
        seen.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        seen = self._seen(body)
        if self.tunnel_host != API_HOST or not self.path.startswith("/v1/"):
            self._send_json(404, {"code": 404, "message": "Not found"}, seen)
            return
        method = self.path.rsplit("/", 1)[-1]
        stall = self.fake._stalls.pop(method, None)
        if stall:
            time.sleep(stall)
        status, answer = self.fake._api(method, body, seen.headers)
        if status == 302:
            seen.status = 302
            self.send_response(302)
            self.send_header("Location", f"https://{STORAGE_HOST}{answer}?X-Goog-Signature=fake{secrets.token_hex(4)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_json(status, answer, seen)

    def do_GET(self) -> None:
        seen = self._seen()
        blob = self.fake.blobs.get(seen.path) if self.tunnel_host == STORAGE_HOST else None
        if blob is None:
            self._send_json(404, {"code": 404, "message": "No such object"}, seen)
            return
        signature = self.path.partition("?")[2]
        if signature in self.fake._expired_links:
            body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code>"
                    b"<Message>Invalid argument.</Message></Error>")
            seen.status = 400
            self.send_response(400)
            self.send_header("Content-Type", "application/xml; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data, start = blob.data, 0
        status = 200
        wanted = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if wanted.startswith("bytes=") and (if_range is None or if_range in (blob.etag, blob.last_modified)):
            first, _, last = wanted[len("bytes="):].partition("-")
            start = int(first or 0)
            if start >= len(data):
                seen.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = min(int(last), len(data) - 1) if last else len(data) - 1
            data, status = data[start : end + 1], 206
        seen.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", blob.etag)
        self.send_header("Last-Modified", blob.last_modified)
        self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={blob.md5}")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{len(blob.data)}")
        self.end_headers()
        cut = self.fake._cuts.pop(seen.path, None) if status == 200 else None
        if cut is None:
            self.wfile.write(data)
            return
        if self.fake.links_expire_on_cut:
            self.fake._expired_links.add(signature)
        self.wfile.write(data[:cut])
        self.wfile.flush()
        # Hang up mid-body, as a dropped connection does.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
