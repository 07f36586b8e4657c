"""A local Open Images: the `open-images-dataset` bucket on moto's S3 server and a CSV host.

FakeBucket runs moto's real S3 implementation (the app of `moto.server.ThreadedMotoServer`) on
127.0.0.1, behind a thin WSGI layer that records every request and can answer chosen keys with an
error status, so tests count what the client asked for and make downloads fail on purpose. The
code under test reaches it with the real boto3 client through CLASSMATRIX_OPENIMAGES_S3_ENDPOINT.

CsvHost serves files (the generated metadata CSVs, at the paths they have under
https://storage.googleapis.com/openimages/) over HTTP with Range support, recording requests.

OpenImagesWorld generates a small Open Images with the real file names and columns: class
descriptions, human-verified image-level labels (Confidence 0 and 1, several Source values),
the boxable image list with all its columns, and small real JPEGs in the bucket.
"""

from __future__ import annotations

import csv
import hashlib
import io
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

import boto3
import numpy as np
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from PIL import Image
from werkzeug.serving import make_server

BUCKET = "open-images-dataset"


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # keep pytest output clean
        pass


class FakeBucket:
    """moto's S3 on 127.0.0.1 with request counting and failure injection.

    requests: (method, path) of every request, path as `/<bucket>/<key>`.
    fail: path -> HTTP status to answer instead of moto (e.g. 500 for a server error).
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}
        self.lock = threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)
        self.server = make_server("127.0.0.1", 0, self._wrap(app), threaded=True, request_handler=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _wrap(self, app: Any) -> Any:
        def middleware(environ: dict, start_response: Any) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            with self.lock:
                self.requests.append((environ["REQUEST_METHOD"], path))
                status = self.fail.get(path)
            if status is not None:
                # S3's own codes: 503 is its throttling answer, SlowDown.
                code = "SlowDown" if status == 503 else "InternalError"
                body = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    "<Message>injected by the test</Message></Error>"
                ).encode()
                start_response(f"{status} Injected", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
                return [body]
            return app(environ, start_response)

        return middleware

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeBucket":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def admin(self) -> Any:
        """A signed client (fake keys) for setting the bucket up, as its owner would."""
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )

    def reset(self) -> None:
        """Forget every bucket and object (moto's state is per process) and the request log."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")).read()
        with self.lock:
            self.requests.clear()
            self.fail.clear()

    def gets(self, prefix: str = "") -> list[str]:
        """The object keys asked for with GET, in order (repeats included)."""
        start = f"/{BUCKET}/"
        with self.lock:
            return [path[len(start):] for method, path in self.requests
                    if method == "GET" and path.startswith(start + prefix)]


class CsvHost:
    """An HTTP server on 127.0.0.1 serving in-memory files, with Range, recording requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                with host.lock:
                    host.requests.append(self.path)
                data = host.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def start(self) -> "CsvHost":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------------------------
# A small Open Images.

CLASSES = {
    "/m/01yrx": "Cat",
    "/m/0bt9lr": "Dog",
    "/m/03k3r": "Horse",
    "/m/015p6": "Bird",
    "/m/0dbvp": "Dot",  # not a real Open Images class: a near neighbour of "Dog" for suggestions
    "/m/01g317": "Person",
}
SOURCES = ("verification", "crowdsource-verification", "human")
IMAGE_LIST_COLUMNS = (
    "ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author,Title,"
    "OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation"
).split(",")


def image_id(n: int) -> str:
    """A realistic ImageID: 16 lowercase hex digits."""
    return hashlib.sha256(f"image-{n}".encode()).hexdigest()[:16]


def jpeg(seed: int, size: int = 24) -> bytes:
    """A small real JPEG of seeded colour noise, different for every seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def to_csv(header: list[str] | None, rows: Iterable[Iterable[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


@dataclass
class OpenImagesWorld:
    """The images of a small Open Images split and their labels.

    positives: ImageID -> the LabelNames verified present (Confidence 1).
    negatives: ImageID -> LabelNames verified absent (Confidence 0).
    boxable: the ImageIDs in the boxable list (the bucket holds these, unless in `absent`).
    absent: boxable ImageIDs listed everywhere but not uploaded (they answer 404).
    """

    split: str = "train"
    positives: dict[str, set[str]] = field(default_factory=dict)
    negatives: dict[str, set[str]] = field(default_factory=dict)
    boxable: set[str] = field(default_factory=set)
    absent: set[str] = field(default_factory=set)
    header_in_classes: bool = True

    def ids(self, label: str, among: Iterable[str] = (), *, only_boxable: bool = True) -> set[str]:
        """Images with a Confidence-1 label `label`: boxable ones unless told otherwise, and
        none that also carry another of the labels `among`."""
        others = set(among) - {label}
        return {i for i, labels in self.positives.items()
                if label in labels and not labels & others and (not only_boxable or i in self.boxable)}

    def files(self) -> dict[str, bytes]:
        """Metadata path (under the host root) -> CSV bytes, with the real names and columns."""
        labels_name = {"train": "train", "validation": "val", "test": "test"}[self.split]
        image_list = {
            "train": "/openimages/2018_04/train/train-images-boxable-with-rotation.csv",
            "validation": "/openimages/v5/validation-images-with-rotation.csv",
            "test": "/openimages/v5/test-images-with-rotation.csv",
        }[self.split]
        rows = []
        for n, (image, labels) in enumerate(sorted(self.positives.items())):
            for label in sorted(labels):
                rows.append([image, SOURCES[n % len(SOURCES)], label, 1])
        for n, (image, labels) in enumerate(sorted(self.negatives.items())):
            for label in sorted(labels):
                rows.append([image, SOURCES[n % len(SOURCES)], label, 0])
        # Real files are sorted by ImageID; interleave positives and negatives the same way.
        rows.sort(key=lambda row: (row[0], row[2]))
        listed = [
            [image, self.split, f"https://farm.example/{image}.jpg", f"https://www.flickr.example/{image}",
             "https://creativecommons.org/licenses/by/2.0/", "https://www.flickr.example/people/x",
             "someone", "a title", "123456", "aGFzaA==", f"https://c1.example/{image}_z.jpg", "0.0"]
            for image in sorted(self.boxable)
        ]
        return {
            "/openimages/v7/oidv7-class-descriptions-boxable.csv": to_csv(
                ["LabelName", "DisplayName"] if self.header_in_classes else None, sorted(CLASSES.items())
            ),
            f"/openimages/v7/oidv7-{labels_name}-annotations-human-imagelabels.csv": to_csv(
                ["ImageID", "Source", "LabelName", "Confidence"], rows
            ),
            image_list: to_csv(IMAGE_LIST_COLUMNS, listed),
        }

    def publish(self, host: CsvHost, bucket: FakeBucket) -> None:
        """Serve the CSVs on `host` and upload every boxable image but the absent ones."""
        host.files.update(self.files())
        admin = bucket.admin()
        # Public like the real bucket: anyone may list it (an absent key answers 404) and read it.
        admin.create_bucket(Bucket=BUCKET, ACL="public-read")
        for image in sorted(self.boxable - self.absent):
            admin.put_object(Bucket=BUCKET, Key=f"{self.split}/{image}.jpg", Body=jpeg(int(image, 16) % 2**32),
                             ACL="public-read")
        with bucket.lock:
            bucket.requests.clear()
