"""The `openimages` source kind: a class-balanced sample of Open Images, one folder per class.

What it does, in order:

1. Metadata. Three CSVs are downloaded once (resumable, `stages.downloads`) into a cache shared
   by every Open Images dataset, `$CLASSMATRIX_DOWNLOADS/openimages/metadata/` (default
   `data/downloads/openimages/`): the 600 boxable class descriptions (`LabelName,DisplayName`),
   the split's human-verified image-level labels (`ImageID,Source,LabelName,Confidence`; 2.7 GB
   for train) and the split's list of boxable images (the images the `open-images-dataset` bucket
   holds). Open Images publishes no checksums for them, so the sha256 observed is recorded.
2. Classes. Display names resolve through the class descriptions (a LabelName such as `/m/0bt9lr`
   is accepted too); a name that is not there fails with the closest valid names.
3. Selection. The labels CSV is filtered as a stream (pyarrow, one block at a time), keeping only
   Confidence-1 rows of the chosen classes, so memory follows the matching rows, not the file.
   The candidates are then restricted to the boxable list (streamed too); with `exclusive`,
   images that carry two or more of the chosen classes are dropped.
4. Sampling. Per class, candidates are ranked by sha256("<seed>:<ImageID>") and the first
   `per_class` taken: the same seed and candidates give the same sample, and new candidates never
   reorder the ones already ranked. A class with fewer candidates keeps them all, with a warning.
5. Images. `<split>/<ImageID>.jpg` from the bucket with unsigned S3 requests (boto3), in
   parallel, retried with backoff, into a persistent cache
   (`$CLASSMATRIX_DOWNLOADS/openimages/images/<split>/<ImageID>.jpg`, written whole or not at
   all); an image already there and intact is not requested again, so an interrupted fetch
   resumes where it stopped. An image the bucket does not have (404) is skipped and recorded.
6. Layout. Each image is hard-linked (or copied) to `<dest>/<DisplayName>/<ImageID>.jpg`, the
   `folders` layout.

The S3 endpoint is AWS's unless `CLASSMATRIX_OPENIMAGES_S3_ENDPOINT` names another (a mirror, or
the tests' fake bucket). Endpoints configured for AWS in general (`AWS_ENDPOINT_URL*`, the AWS
config file) are ignored on purpose: they usually point at a team's own storage (a DVC remote on
MinIO), where the Open Images bucket is not.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import heapq
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator
from urllib.parse import urljoin

from stages import downloads
from stages.errors import UserError
from stages.files import write_text_atomic

VERSION = "v7"
ENDPOINT_ENV = "CLASSMATRIX_OPENIMAGES_S3_ENDPOINT"
# The open-images-dataset bucket is in us-east-1; naming it keeps AWS_DEFAULT_REGION out of it.
REGION = "us-east-1"

# File names relative to `metadata_url` (default https://storage.googleapis.com/openimages/v7).
# The boxable image lists were published with V4/V5 and are still the ones V7's download page
# links; a mirror has to keep the layout of storage.googleapis.com/openimages/ for `..` to work.
CLASS_DESCRIPTIONS = "oidv7-class-descriptions-boxable.csv"
LABELS = {
    "train": "oidv7-train-annotations-human-imagelabels.csv",
    "validation": "oidv7-val-annotations-human-imagelabels.csv",
    "test": "oidv7-test-annotations-human-imagelabels.csv",
}
IMAGE_LISTS = {
    "train": "../2018_04/train/train-images-boxable-with-rotation.csv",
    "validation": "../v5/validation-images-with-rotation.csv",
    "test": "../v5/test-images-with-rotation.csv",
}
# An ImageID becomes a file name and an S3 key: real ones are 16 hex digits; anything that could
# climb out of a folder is refused.
SAFE_ID = re.compile(r"[0-9A-Za-z_-]+")

# Image downloads: tries after the first, and the first pause between tries (doubling). Read at
# call time, so tests can shorten them.
RETRIES = 4
BACKOFF_S = 1.0
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 60.0
CHUNK = 1 << 16
# Bytes of CSV parsed at a time. pyarrow's streaming reader holds a few dozen blocks in flight,
# so this sets the memory of a scan whatever the file's size: on 10 million rows the process
# peaked at 292 MiB with 1 MiB blocks (86 of them the imports), at 927 MiB with 16 MiB blocks,
# which were not faster (docs/benchmarks.md, benchmarks/openimages_labels.py).
CSV_BLOCK = 1 << 20
# Closest names offered for a class-name typo.
SUGGESTIONS = 5


def cache_root() -> Path:
    """The download cache every Open Images dataset shares (metadata and images)."""
    return downloads.download_cache("openimages")


# --------------------------------------------------------------------------------------------
# Metadata: download once, hash once.


# Where Open Images publishes its metadata; the default `metadata_url` is under it.
OPEN_IMAGES_HOST = "https://storage.googleapis.com/openimages/"


def metadata_urls(metadata_url: str, split: str) -> dict[str, str]:
    """The three metadata files for `split`: role -> URL."""
    base = metadata_url.rstrip("/") + "/"
    return {
        "classes": urljoin(base, CLASS_DESCRIPTIONS),
        "labels": urljoin(base, LABELS[split]),
        "images": urljoin(base, IMAGE_LISTS[split]),
    }


def fetch_metadata(url: str, what: str) -> dict[str, Any]:
    """Download `url` into the metadata cache unless it is there; return {name, url, path, sha256, bytes}.

    The sha256 of a cached file is remembered in `<file>.sha256.json` beside it (with the size and
    modification time it was computed for, and the URL it came from), so the 2.7 GB labels file is
    not hashed on every run. Files from Open Images' own host are kept under `metadata/`, those of
    another `metadata_url` (a mirror) under `metadata/mirrors/<hash of the URL>/`, so two datasets
    on two hosts never replace each other's files; the memo's URL guards the rest.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    folder = cache_root() / "metadata"
    if not url.startswith(OPEN_IMAGES_HOST):
        folder = folder / "mirrors" / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    target = folder / name
    memo = target.with_name(name + ".sha256.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(name + ".lock")):
        digest = _remembered_sha256(target, memo, url)
        if digest is None:
            if target.is_file() and _remembered_url(memo) not in (None, url):
                target.unlink()  # from another URL: the provenance must name the file it has
            fetched = downloads.download(url, target, sha256=None, what=what)
            digest = fetched["sha256"]
            stat = target.stat()
            write_text_atomic(memo, json.dumps(
                {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest, "url": url}
            ))
    return {"name": name, "url": url, "path": target, "sha256": digest, "bytes": target.stat().st_size}


def _remembered_sha256(target: Path, memo: Path, url: str) -> str | None:
    if not target.is_file() or not memo.is_file():
        return None
    try:
        recorded = json.loads(memo.read_text())
        stat = target.stat()
        # A memo written before URLs were remembered has none: its file is taken as this URL's.
        if recorded.get("url", url) != url:
            return None
        if recorded["bytes"] == stat.st_size and recorded["mtime_ns"] == stat.st_mtime_ns:
            return str(recorded["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _remembered_url(memo: Path) -> str | None:
    try:
        return str(json.loads(memo.read_text())["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (two datasets fetched at once share the metadata cache)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, as before this cache was shared
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Classes.


def read_class_descriptions(path: Path) -> list[tuple[str, str]]:
    """(LabelName, DisplayName) pairs, whether or not the file has a `LabelName,DisplayName`
    header (V7's boxable file has one; V5/V6's `class-descriptions-boxable.csv` has none)."""
    import csv

    rows: list[tuple[str, str]] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 2:
                raise UserError(
                    f"{path}: row {number} is not LabelName,DisplayName: {row!r}; delete the file to fetch it again"
                )
            label, name = row[0].strip(), row[1].strip()
            if number == 1 and (label, name) == ("LabelName", "DisplayName"):
                continue
            rows.append((label, name))
    if not rows:
        raise UserError(f"{path}: no classes in the class descriptions; delete the file to fetch it again")
    return rows


@dataclass(frozen=True)
class ChosenClass:
    name: str  # as written in params.yaml
    label: str  # Open Images LabelName, e.g. /m/0bt9lr
    display: str  # Open Images DisplayName
    folder: str  # the class folder under the raw dataset folder


def resolve_classes(names: list[str], descriptions: list[tuple[str, str]], key: str) -> list[ChosenClass]:
    """The chosen classes by display name (or LabelName); a typo fails with the closest names."""
    if not names:
        raise UserError(f"{key}: list at least one Open Images class, e.g. [Cat, Dog]")
    by_display: dict[str, list[str]] = {}
    display_of: dict[str, str] = {}
    for label, display in descriptions:
        by_display.setdefault(display, []).append(label)
        display_of[label] = display
    chosen: list[ChosenClass] = []
    for name in names:
        text = str(name).strip()
        if text in display_of:
            label, display = text, display_of[text]
        elif text in by_display:
            labels = sorted(set(by_display[text]))
            if len(labels) > 1:
                raise UserError(
                    f"{key}: {text!r} names several Open Images classes ({', '.join(labels)}); "
                    f"write the LabelName of the one you mean instead"
                )
            label, display = labels[0], text
        else:
            raise UserError(f"{key}: {text!r} is not an Open Images class; {_closest(text, list(by_display))}")
        chosen.append(ChosenClass(text, label, display, folder_name(display)))
    for attribute, what in (("label", "class"), ("folder", "folder name")):
        seen: dict[str, str] = {}
        for item in chosen:
            value = getattr(item, attribute)
            if value in seen:
                raise UserError(f"{key}: {seen[value]!r} and {item.name!r} are the same {what} ({value}); list it once")
            seen[value] = item.name
    return chosen


def _closest(text: str, valid: list[str]) -> str:
    """The valid names nearest `text`: difflib's candidates, ordered by edit distance (a swapped
    pair of letters counts as one edit, so 'Dgo' comes out as 'Dog' first), case ignored."""
    lowered: dict[str, str] = {}
    for name in valid:
        lowered.setdefault(name.lower(), name)
    wanted = text.lower()
    near = difflib.get_close_matches(wanted, list(lowered), n=SUGGESTIONS * 3, cutoff=0.5)
    near.sort(key=lambda name: _edits(wanted, name))  # stable: difflib's order breaks ties
    if not near:
        return f"no class name is close; the {len(valid)} valid names are in {CLASS_DESCRIPTIONS}"
    return "closest: " + ", ".join(repr(lowered[name]) for name in near[:SUGGESTIONS])


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, transpositions."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]


def folder_name(display: str) -> str:
    """A class folder name for a display name: the name itself, with path separators replaced."""
    name = display.replace("/", "_").replace("\\", "_").replace("\0", "").strip()
    return name if name not in ("", ".", "..") else f"class_{hashlib.sha256(display.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------------------------
# Selection: stream the big CSVs, keep what matters.


def _header(path: Path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [cell.strip() for cell in next(csv.reader(handle), [])]


def _stream(path: Path, columns: dict[str, Any], block_size: int) -> Iterator[Any]:
    """pyarrow record batches of `columns` (name -> type) from a CSV with a header row."""
    import pyarrow as pa
    from pyarrow import csv as pacsv

    header = _header(path)
    missing = [name for name in columns if name not in header]
    if missing:
        raise UserError(
            f"{path}: no column {', '.join(missing)} (the header is {','.join(header) or 'empty'}); "
            f"delete the file to fetch it again, or check metadata_url in params.yaml"
        )
    try:
        reader = pacsv.open_csv(
            path,
            # Our own names from the header, so a byte-order mark cannot rename the first column.
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1, block_size=block_size),
            # The image lists quote free text (Flickr titles); a quoted line break must not split a row.
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(columns), column_types=columns, strings_can_be_null=False
            ),
        )
        for batch in reader:
            yield batch
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"{path}: not a readable CSV ({detail}); delete the file to fetch it again") from None


def select_labelled(labels_csv: Path, label_ids: Collection[str], block_size: int | None = None) -> dict[str, set[str]]:
    """LabelName -> the ImageIDs with a human-verified Confidence-1 label of it, streamed.

    Only rows of `label_ids` with Confidence 1 are kept, so memory is bounded by those rows
    (Confidence is read as a number: "1" and "1.0" both count).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(label_ids)), type=pa.string())
    found: dict[str, set[str]] = {label: set() for label in label_ids}
    columns = {"ImageID": pa.string(), "LabelName": pa.string(), "Confidence": pa.float64()}
    for batch in _stream(labels_csv, columns, block_size or CSV_BLOCK):
        mask = pc.and_kleene(
            pc.is_in(batch.column("LabelName"), value_set=wanted),
            pc.equal(batch.column("Confidence"), 1.0),
        )
        kept = batch.filter(mask)
        if kept.num_rows:
            images, labels = kept.column("ImageID"), kept.column("LabelName")
            for label, images_of in found.items():
                images_of.update(images.filter(pc.equal(labels, label)).to_pylist())
    return found


def select_listed(images_csv: Path, image_ids: Collection[str], block_size: int | None = None) -> set[str]:
    """The ImageIDs of `image_ids` that the image list (e.g. the boxable subset) names, streamed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(image_ids)), type=pa.string())
    listed: set[str] = set()
    if len(wanted) == 0:
        return listed
    for batch in _stream(images_csv, {"ImageID": pa.string()}, block_size or CSV_BLOCK):
        ids = batch.column("ImageID")
        listed.update(ids.filter(pc.is_in(ids, value_set=wanted)).to_pylist())
    return listed


def rank_key(seed: int, image_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).digest()


def sample(candidates: Iterable[str], count: int, seed: int) -> list[str]:
    """The `count` candidates ranked first by sha256("<seed>:<ImageID>"), in rank order."""
    return heapq.nsmallest(count, set(candidates), key=lambda image_id: rank_key(seed, image_id))


@dataclass
class Selection:
    """What was chosen per class, and the counts that explain it."""

    chosen: dict[str, list[str]]  # LabelName -> sampled ImageIDs, in rank order
    # LabelName -> {labelled, unusable_image_id, boxable, multi_class, excluded_multi_class,
    # available, requested, selected}
    counts: dict[str, dict[str, int]]


def select(
    labelled: dict[str, set[str]], listed: set[str], per_class: int, seed: int, exclusive: bool
) -> Selection:
    """Restrict to listed images, drop multi-class images if `exclusive`, sample `per_class` each."""
    unsafe = {label: {image for image in images if not SAFE_ID.fullmatch(image)} for label, images in labelled.items()}
    boxable = {label: (images - unsafe[label]) & listed for label, images in labelled.items()}
    carried: dict[str, int] = {}
    for images in boxable.values():
        for image in images:
            carried[image] = carried.get(image, 0) + 1
    chosen: dict[str, list[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for label, images in boxable.items():
        shared = {image for image in images if carried[image] > 1}
        available = images - shared if exclusive else images
        chosen[label] = sample(available, per_class, seed)
        counts[label] = {
            "labelled": len(labelled[label]),
            "unusable_image_id": len(unsafe[label]),
            "boxable": len(images),
            "multi_class": len(shared),
            "excluded_multi_class": len(shared) if exclusive else 0,
            "available": len(available),
            "requested": per_class,
            "selected": len(chosen[label]),
        }
    return Selection(chosen, counts)


# --------------------------------------------------------------------------------------------
# Images from the bucket.


class _Transient(Exception):
    """Worth another try (connection dropped, timeout, 5xx); the message is the reason."""


class _Missing(Exception):
    """The bucket does not have the image (404, or 403 from a bucket that hides absent keys)."""


class _Aborted(Exception):
    """Another download failed or the run was interrupted: stop without finishing."""


def s3_client(workers: int) -> Any:
    import boto3
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ProfileNotFound

    config = Config(
        signature_version=UNSIGNED,
        region_name=REGION,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        # Retries are ours (with the body streaming included), so botocore tries once.
        retries={"total_max_attempts": 1},
        max_pool_connections=max(10, workers),
        ignore_configured_endpoint_urls=True,
    )
    endpoint = s3_endpoint()
    try:
        return boto3.session.Session().client("s3", config=config, endpoint_url=endpoint)
    except ProfileNotFound:
        # AWS_PROFILE names a profile the AWS config lacks (exported in a shell, a CI job): the
        # requests are unsigned and take nothing from a profile, so go on without it.
        core = botocore.session.get_session()
        core.get_component("config_store").set_config_variable("profile", None)  # not even AWS_PROFILE
        return boto3.session.Session(botocore_session=core).client("s3", config=config, endpoint_url=endpoint)


def s3_endpoint() -> str | None:
    """The S3 endpoint ENDPOINT_ENV names, or None for AWS's; one without its scheme (MinIO's
    `host:port`) is refused in one line, where botocore would raise a traceback."""
    endpoint = os.environ.get(ENDPOINT_ENV, "").strip() or None
    if endpoint is not None and not re.match(r"https?://[^/]", endpoint, re.IGNORECASE):
        example = "http://127.0.0.1:9000" if "://" in endpoint else f"http://{endpoint}"
        raise UserError(
            f"{ENDPOINT_ENV}: {endpoint!r} is not an http(s) URL; write the S3 endpoint with its scheme, "
            f"e.g. {example}, or unset it for AWS's"
        )
    return endpoint


def public_url(endpoint: str | None, bucket: str, key: str) -> str:
    """The URL an image came from: AWS's virtual-hosted URL, or path style on another endpoint."""
    if not endpoint:
        return f"https://{bucket}.s3.amazonaws.com/{key}"
    return f"{endpoint.rstrip('/')}/{bucket}/{key}"


def intact(path: Path) -> bool:
    """A cached image is whole: written by an atomic rename after its length matched, and
    Pillow can parse it."""
    from PIL import Image

    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - any failure to parse means fetch it again
        return False


def download_image(client: Any, bucket: str, key: str, target: Path, stop: threading.Event) -> str:
    """Fetch s3://bucket/key to `target` (atomically), retrying; return "downloaded" or "cached".

    Raises _Missing for an image the bucket does not have, UserError for a wrong bucket, _Aborted
    when `stop` is set, and _Transient when the tries run out.
    """
    if target.is_file():
        if intact(target):
            return "cached"
        target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    retries, backoff = RETRIES, BACKOFF_S
    failures = 0
    while True:
        if stop.is_set():
            raise _Aborted()
        try:
            _get_object(client, bucket, key, target, stop)
            return "downloaded"
        except _Transient:
            failures += 1
            if failures > retries:
                raise
            if stop.wait(backoff * 2 ** (failures - 1)):
                raise _Aborted() from None


def _get_object(client: Any, bucket: str, key: str, target: Path, stop: threading.Event) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    part = target.with_name(f"{target.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            _raise_for(error, bucket, key)
        except BotoCoreError as error:
            raise _Transient(_short(error)) from None
        expected = response.get("ContentLength")
        received = 0
        body = response["Body"]
        try:
            with open(part, "wb") as sink:
                while block := body.read(CHUNK):
                    if stop.is_set():
                        raise _Aborted()
                    sink.write(block)
                    received += len(block)
        except (BotoCoreError, ConnectionError, TimeoutError) as error:
            raise _Transient(_short(error)) from None
        except Exception as error:  # urllib3's ProtocolError and kin, without importing urllib3
            if type(error).__module__.startswith("urllib3"):
                raise _Transient(_short(error)) from None
            raise
        finally:
            body.close()
        if expected is not None and received != expected:
            raise _Transient(f"the connection closed after {received:,} of {expected:,} bytes")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def _raise_for(error: Any, bucket: str, key: str) -> None:
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code == "NoSuchBucket":
        raise UserError(
            f"the bucket {bucket!r} does not exist at the S3 endpoint; check `bucket` in params.yaml "
            f"(Open Images is in 'open-images-dataset') and {ENDPOINT_ENV}"
        ) from None
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        raise _Missing(f"HTTP 404 {code or 'Not Found'}") from None
    if code in ("AccessDenied", "403") or status == 403:
        # A public bucket that does not grant listing answers 403 for a key it does not have.
        raise _Missing(f"HTTP 403 {code or 'Forbidden'}") from None
    if status >= 500 or status in (408, 429) or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError"):
        raise _Transient(f"HTTP {status} {code}") from None
    raise UserError(
        f"s3://{bucket}/{key}: the bucket answered HTTP {status} {code}; check `bucket` in params.yaml"
    ) from None


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass
class Outcome:
    status: dict[str, str] = field(default_factory=dict)  # key -> downloaded | cached | missing
    reasons: dict[str, str] = field(default_factory=dict)  # key -> why it is missing


def download_images(
    client: Any, bucket: str, keys: list[str], cache: Path, workers: int, on_done: Any, key_name: str
) -> Outcome:
    """Download `keys` to `cache/<key>` over `workers` threads, calling on_done(key, status) in
    this thread as each finishes. On the first download that fails for good, or an interrupt, the
    others are stopped (finished ones stay in the cache) and the error is raised."""
    from tqdm.auto import tqdm

    outcome = Outcome()
    stop = threading.Event()
    failure: tuple[str, BaseException] | None = None
    queue = iter(keys)
    # A bounded window of submitted downloads: memory does not grow with the number of images,
    # and an interrupt has little to cancel.
    window = max(1, workers) * 4
    pending: dict[Future, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="openimages")
    bar = tqdm(total=len(keys), desc="open images", unit="image", disable=None, leave=False)
    try:
        while True:
            while failure is None and len(pending) < window and (key := next(queue, None)) is not None:
                pending[pool.submit(download_image, client, bucket, key, cache / key, stop)] = key
            if not pending:
                break
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                try:
                    status = future.result()
                except _Missing as missing:
                    status = "missing"
                    outcome.reasons[key] = str(missing)
                except _Aborted:
                    continue
                except (_Transient, UserError) as error:
                    if failure is None:
                        failure = (key, error)
                        stop.set()
                    continue
                outcome.status[key] = status
                on_done(key, status)
                bar.update(1)
    finally:
        # On an interrupt (or any error in on_done) the running downloads stop between two
        # chunks and delete their partial files; finished images stay in the cache.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if failure is not None:
        key, error = failure
        if isinstance(error, UserError):
            raise error
        kept = sum(1 for status in outcome.status.values() if status != "missing")
        throttled = any(word in str(error) for word in ("SlowDown", "Throttling", "HTTP 429", "HTTP 503"))
        advice = (f"S3 is limiting requests: lower {key_name}.workers (now {workers}) or wait a few minutes, and run "
                  "again" if throttled else "check the network connection and run again")
        raise UserError(
            f"{key_name}: downloading s3://{bucket}/{key} failed after {RETRIES + 1} tries ({error}); "
            f"{advice}: the {kept:,} images fetched so far are kept in {cache} and not downloaded again"
        )
    return outcome


def _remove_stale_parts(folder: Path, older_than_s: float = 24 * 3600) -> None:
    """Delete partial images a killed run left (a day old: a run going on beside us keeps its own)."""
    if not folder.is_dir():
        return
    cutoff = time.time() - older_than_s
    for part in folder.glob("*.part"):
        with contextlib.suppress(OSError):
            if part.stat().st_mtime < cutoff:
                part.unlink()


def place(source: Path, target: Path) -> None:
    """Hard-link `source` at `target` (no second copy on disk), or copy it across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# --------------------------------------------------------------------------------------------
# The source kind.


def check(options: Any, key: str) -> None:
    """The options that need no metadata to check; `key` is the source's key."""
    if not options.classes:
        raise UserError(f"{key}.classes: list at least one Open Images class, e.g. [Cat, Dog]")
    if options.per_class < 1:
        raise UserError(f"{key}.per_class: {options.per_class} images per class; ask for at least 1")
    if options.workers < 1:
        raise UserError(f"{key}.workers: {options.workers}; use at least 1")
    if not re.match(r"https?://[^/]", options.metadata_url, re.IGNORECASE):
        raise UserError(f"{key}.metadata_url: {options.metadata_url!r} is not an http(s) URL")
    if not options.bucket.strip():
        raise UserError(f"{key}.bucket: give the S3 bucket the images are in (open-images-dataset)")


def fetch(options: Any, dest: Path, dataset: str) -> dict[str, Any]:
    """Fill `dest` with `<class folder>/<ImageID>.jpg` and return the provenance details."""
    key = f"datasets.{dataset}.source"
    check(options, key)
    endpoint = s3_endpoint()  # before the metadata: a mistake here would show only after it
    split = options.split
    urls = metadata_urls(options.metadata_url, split)
    files = {role: fetch_metadata(url, f"{key}.metadata_url") for role, url in urls.items()}

    descriptions = read_class_descriptions(files["classes"]["path"])
    chosen = resolve_classes(list(options.classes), descriptions, f"{key}.classes")
    labelled = select_labelled(files["labels"]["path"], [item.label for item in chosen])
    listed = select_listed(files["images"]["path"], set().union(*labelled.values()))
    selection = select(labelled, listed, options.per_class, options.seed, options.exclusive)
    for item in chosen:
        _refuse_if_empty(item, selection.counts[item.label], options, key)
    for item in chosen:
        _warn_if_short(item, selection.counts[item.label], options, key)

    image_cache = cache_root() / "images"
    _remove_stale_parts(image_cache / split)
    placements: dict[str, list[ChosenClass]] = {}
    for item in chosen:
        for image_id in selection.chosen[item.label]:
            placements.setdefault(f"{split}/{image_id}.jpg", []).append(item)

    def on_done(image_key: str, status: str) -> None:
        if status != "missing":
            name = image_key.rsplit("/", 1)[-1]
            for item in placements[image_key]:
                place(image_cache / image_key, dest / item.folder / name)

    # Rank by rank across the classes, in the order given: the first images of every class come
    # first, so an interrupted run already holds some of each.
    order: dict[str, None] = {}
    for rank in range(options.per_class):
        for item in chosen:
            if rank < len(selection.chosen[item.label]):
                order.setdefault(f"{split}/{selection.chosen[item.label][rank]}.jpg")
    outcome = Outcome()
    if order:
        client = s3_client(options.workers)
        outcome = download_images(client, options.bucket, list(order), image_cache, options.workers, on_done, key)

    images: list[dict[str, str]] = []
    missing: list[dict[str, str]] = []
    classes: list[dict[str, Any]] = []
    for item in chosen:
        counts = dict(selection.counts[item.label], images=0, missing=0)
        for image_id in selection.chosen[item.label]:
            image_key = f"{split}/{image_id}.jpg"
            status = outcome.status[image_key]
            counts["missing" if status == "missing" else "images"] += 1
            entry = {"image_id": image_id, "class": item.folder, "url": public_url(endpoint, options.bucket, image_key)}
            if status == "missing":
                missing.append({**entry, "reason": outcome.reasons[image_key]})
            else:
                images.append(entry)
        classes.append({
            "name": item.name, "label_name": item.label, "display_name": item.display, "folder": item.folder, **counts,
        })

    if order and not images:
        raise UserError(
            f"{key}: none of the {len(order):,} selected images could be fetched from the bucket "
            f"{options.bucket!r} (first: {missing[0]['url']}, {missing[0]['reason']}); check `bucket` in params.yaml"
        )
    for item, entry in zip(chosen, classes):
        if entry["selected"] and not entry["images"]:
            first = next(m for m in missing if m["class"] == item.folder)
            raise UserError(
                f"{key}.classes: none of the {entry['selected']:,} images selected for {item.name!r} are in the bucket "
                f"(first: {first['url']}, {first['reason']}), so the dataset would lack the class; raise "
                f"{key}.per_class or change {key}.seed to draw others"
            )
    if missing:
        print(
            f"warning: {key}: {len(missing):,} selected images are not in the bucket; "
            f"skipped (listed under `missing` in the provenance)",
            file=sys.stderr,
        )
    return {
        "origin": (
            f"Open Images {VERSION}, {split} split, human-verified image-level labels; "
            f"images from s3://{options.bucket}"
        ),
        "version": VERSION,
        "split": split,
        "endpoint": endpoint or f"https://s3.amazonaws.com (region {REGION}, unsigned)",
        "selection": {
            "per_class": options.per_class,
            "seed": options.seed,
            "exclusive": options.exclusive,
            "rank": "sha256('<seed>:<ImageID>'), ascending",
        },
        "metadata": [
            {"role": role, "name": files[role]["name"], "url": files[role]["url"],
             "sha256": files[role]["sha256"], "bytes": files[role]["bytes"]}
            for role in ("classes", "labels", "images")
        ],
        "classes": classes,
        "counts": {
            "selected": sum(c["selected"] for c in classes),
            "images": len(images),
            "missing": len(missing),
            "unique_images": len({entry["image_id"] for entry in images}),
        },
        "images": images,
        "missing": missing,
        # How this run got the images (fetch prints it; the record is the same either way).
        "this_run": {status: sum(1 for s in outcome.status.values() if s == status) for status in ("downloaded", "cached")},
    }


def _refuse_if_empty(item: ChosenClass, counts: dict[str, int], options: Any, key: str) -> None:
    """One line for a class no image can stand for: the dataset would silently lack it, and
    train with fewer classes than params declare."""
    if counts["available"]:
        return
    why = f"{counts['labelled']:,} labelled with Confidence 1, {counts['boxable']:,} of them in the bucket's boxable images"
    advice = (f"check the name against {CLASS_DESCRIPTIONS}, pick another split ({key}.split), "
              f"or take it out of {key}.classes and {key.removesuffix('.source')}.classes")
    if counts["excluded_multi_class"]:
        why += f", all {counts['excluded_multi_class']:,} with several of the chosen classes"
        advice = f"set {key}.exclusive: false, or " + advice
    raise UserError(f"{key}.classes: {item.name!r} has no images in Open Images' {options.split} split ({why}); {advice}")


def _warn_if_short(item: ChosenClass, counts: dict[str, int], options: Any, key: str) -> None:
    """One line on stderr for a class with fewer candidates than per_class (all are taken)."""
    if counts["available"] >= options.per_class:
        return
    why = ""
    if counts["excluded_multi_class"]:
        why = f" after leaving out {counts['excluded_multi_class']:,} with several of the chosen classes"
    print(
        f"warning: {key}.classes: {item.name!r} has {counts['available']:,} images in Open Images' "
        f"{options.split} split{why}, fewer than per_class {options.per_class:,}; taking all {counts['available']:,}",
        file=sys.stderr,
    )
