"""Resumable, verified HTTP(S) downloads, and the `url` source kind built on them.

A download goes to `<target>.part` and is renamed onto `<target>` only once its sha256 matches,
so a file named `<target>` is always complete and verified. An interrupted download (killed
stage, dropped connection) resumes from the `.part` with an HTTP Range request; a server that
ignores Range (answers 200 instead of 206) makes it start again from zero. The ETag (or
Last-Modified) of the answer that began the `.part` waits beside it in `<target>.part.validator`:
a resume sends it as If-Range, and a 206 that carries another one (a file replaced upstream, on a
server that ignores If-Range) starts again from zero rather than splice two files; so does a
`.part` begun from another URL (the file's second line), whether the server sends validators or
not (a `download.php?id=3` corrected to `?id=4` saves under the same name). A body sent with
no length and no chunks ends when the connection closes, cut short or not: a zip, tar or
compressed stream is read to its own end first, and one cut short is resumed like any other.

Downloads are kept in `data/downloads/<dataset>/` (or `$CLASSMATRIX_DOWNLOADS/<dataset>/`), outside
the stage's DVC output folder: DVC deletes a stage's outputs before running it again, and a
multi-gigabyte archive should not be fetched twice because a later step failed.
"""

from __future__ import annotations

import datetime
import email.utils
import os
import re
import shutil
import socket
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
import urllib3
from tqdm.auto import tqdm

from stages import archives
from stages.errors import UserError

# urllib3 fills a whole chunk before handing it over, so a dropped connection loses the partial
# chunk; small chunks keep the loss (and the bytes to fetch again) small.
CHUNK = 1 << 16
# (connect, read) seconds: the read timeout is the longest silence between two chunks, not a
# bound on the whole download.
TIMEOUT = (15.0, 60.0)
RETRIES = 4
BACKOFF_S = 1.0

# Statuses worth another try; anything else in 4xx is the URL's fault and fails at once.
TRANSIENT_STATUSES = {408, 425, 429, 500, 502, 503, 504}
# A server's Retry-After (429, 503) is honoured up to this many seconds; a longer one stops the
# download with the wait it asks for.
MAX_RETRY_AFTER_S = 120.0


def download_cache(dataset: str) -> Path:
    """Where downloads for `dataset` are kept, read from the environment at each call."""
    return Path(os.environ.get("CLASSMATRIX_DOWNLOADS", "data/downloads")) / dataset


class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx); its message is the reason.
    `wait`: the seconds the server asked for (Retry-After), if it did."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


def download(
    url: str,
    target: Path,
    *,
    sha256: str | None,
    what: str,
    timeout: tuple[float, float] | None = None,
    retries: int | None = None,
    backoff: float | None = None,
) -> dict[str, Any]:
    """Download `url` to `target` (resuming a `.part`), verify `sha256`, and say what happened.

    Returns {"name", "sha256", "bytes", "downloaded"}; `downloaded` is False when `target` was
    already there with the right checksum. `what` names the download in messages (e.g. the
    params.yaml key the URL came from). Raises UserError on a checksum mismatch, an
    HTTP error, or a network failure that outlasts `retries` further tries. `timeout`, `retries`
    and `backoff` default to the module's TIMEOUT, RETRIES and BACKOFF_S, read at call time.
    """
    timeout = TIMEOUT if timeout is None else timeout
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF_S if backoff is None else backoff
    target = Path(target)
    expected = sha256.lower() if sha256 else None
    if target.is_file():
        actual = archives.sha256_file(target)
        if expected is None or actual == expected:
            return _result(target, actual, downloaded=False)
        # A stale file from an earlier pin: fetch the file the pin names.
        target.unlink()
    kept = _mismatched(target, expected) if expected else None
    if kept is not None and kept.is_file() and archives.sha256_file(kept) == expected:
        # An earlier download that failed its old pin, and the pin now names it: no download.
        os.replace(kept, target)
        part = target.with_name(target.name + ".part")
        part.unlink(missing_ok=True)  # a download of the same file begun since: not needed now
        _validator_file(part).unlink(missing_ok=True)
        return _result(target, expected, downloaded=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")

    failures = 0
    with requests.Session() as session:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _attempt(session, url, part, what, timeout, target, expected)
                break
            except _Transient as error:
                progressed = (part.stat().st_size if part.exists() else 0) > before
                # A connection that keeps delivering bytes between drops is allowed to go on.
                failures = 0 if progressed else failures + 1
                have = part.stat().st_size if part.exists() else 0
                again = f"run again (it resumes from the {have:,} bytes in {part})" if have else "run again"
                if error.wait is not None and error.wait > MAX_RETRY_AFTER_S:
                    raise UserError(
                        f"{what}: {url} asks to wait {error.wait:,.0f} s before the next request ({error}); "
                        f"{again} after that, or download the file yourself to {target}"
                    ) from None
                if failures > retries:
                    advice = ("the server is limiting requests: wait a few minutes and " if error.wait is not None
                              or str(error).startswith("HTTP 429") else "check the network connection (or proxy) and ")
                    raise UserError(
                        f"{what}: downloading {url} failed after {retries + 1} tries ({error}); "
                        f"{advice}{again}, or download the file yourself to {target}"
                    ) from None
                time.sleep(error.wait if error.wait is not None else backoff * 2 ** max(failures - 1, 0))

    actual = archives.sha256_file(part)
    if expected is not None and actual != expected and _is_web_page(part):
        # A sign-in, "download anyway" or expired-link page: not a file worth keeping or pinning.
        part.unlink()
        _validator_file(part).unlink(missing_ok=True)
        raise UserError(
            f"{what}: {url} answered a web page (HTML) instead of the file (sha256 {actual}, expected "
            f"{expected}): a sign-in, virus-scan or expired-link page, or the link to the file's page rather "
            f"than to the file; put the direct download link in params.yaml, or download the file "
            f"yourself to {target}"
        )
    if expected is not None and actual != expected:
        # Kept under its own checksum: if it is the right file after all (the pin was mistyped,
        # or upstream changed it on purpose), pinning `actual` uses it with no second download.
        kept = _mismatched(target, actual)
        os.replace(part, kept)
        _validator_file(part).unlink(missing_ok=True)
        raise UserError(
            f"{what}: sha256 mismatch for {url}: expected {expected}, got {actual}; "
            f"the upstream file changed or the download is corrupt. The file is kept as {kept}: if it is "
            f"the right one, pin sha256 {actual} in params.yaml and run again (no second download); "
            f"otherwise run again to download it afresh"
        )
    os.replace(part, target)
    _validator_file(part).unlink(missing_ok=True)
    for stale in target.parent.glob(f"{glob_escape(target.name)}.sha256-*"):
        stale.unlink(missing_ok=True)  # earlier downloads that failed a pin: this one is the file
    return _result(target, actual, downloaded=True)


def _is_web_page(path: Path) -> bool:
    """Whether a download is an HTML page (no archive or image starts like one)."""
    with open(path, "rb") as handle:
        head = handle.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _mismatched(target: Path, digest: str) -> Path:
    """Where a download whose sha256 is `digest` waits when it failed its pin."""
    return target.with_name(f"{target.name}.sha256-{digest}")


def _validator_file(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _validator(headers: Any) -> str | None:
    """What names this version of the file: a strong ETag, else Last-Modified (If-Range takes either)."""
    etag = (headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return (headers.get("Last-Modified") or "").strip() or None


def _result(target: Path, digest: str, downloaded: bool) -> dict[str, Any]:
    return {"name": target.name, "sha256": digest, "bytes": target.stat().st_size, "downloaded": downloaded}


def _attempt(session: Any, url: str, part: Path, what: str, timeout: tuple[float, float], target: Path,
             expected: str | None = None) -> None:
    """One request: append to (206) or restart (200) `part` until the body ends; raise _Transient
    for what a retry may cure and UserError for what it cannot."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: the bytes on disk must be the file itself, and Range counts those bytes.
    headers = {"Accept-Encoding": "identity"}
    recorded = None
    if offset:
        try:
            lines = _validator_file(part).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []  # a .part from before validators were kept: resumed on trust, as then
        recorded = (lines[0].strip() or None) if lines else None
        if len(lines) > 1 and lines[1] != url:
            # Begun from another URL: its bytes are another file's, whatever the server says.
            part.unlink()
            offset, recorded = 0, None
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if recorded:
            headers["If-Range"] = recorded  # a server that honours it answers 200 if the file changed
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema) as error:
        raise UserError(f"{what}: {url} is not a valid URL ({_reason(error)}); fix it in params.yaml") from None
    except requests.exceptions.TooManyRedirects:
        raise UserError(f"{what}: {url} redirects in a loop; check the URL in params.yaml") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
        raise _Transient(_reason(error)) from None

    with response:
        status = response.status_code
        if status == 416 and offset:
            # The .part already holds the whole file (or more): verify it rather than refetch.
            total = _content_range_total(response.headers.get("Content-Range", ""))
            if total is not None and total == offset:
                return
            part.unlink()
            raise _Transient("the server refused to resume the partial download; starting again")
        if status in TRANSIENT_STATUSES:
            raise _Transient(f"HTTP {status} {response.reason}", _retry_after(response.headers.get("Retry-After")))
        if status >= 400:
            raise UserError(_http_error(what, url, status, response.reason, target))
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"the server resumed at byte {start} instead of {offset}; starting again")
            now = _validator(response.headers)
            if recorded and now and now != recorded:
                part.unlink(missing_ok=True)
                raise _Transient("the file changed on the server since the partial download began; starting again")
            mode = "ab"
        else:  # 200 (or another 2xx): the whole file, whatever was asked for.
            offset = 0
            mode = "wb"
            now = _validator(response.headers)
            # The validator (or an empty line), then the URL the .part is begun from.
            _validator_file(part).write_text(f"{now or ''}\n{url}\n", encoding="utf-8")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = 0
        bar = tqdm(
            total=total, initial=offset, desc=f"downloading {target.name}", unit="B", unit_scale=True,
            unit_divisor=1024, disable=None, leave=False,
        )
        try:
            sink = open(part, mode)
            try:
                # The bytes as sent, never decoded: a .tar.gz that a server labels Content-Encoding:
                # gzip (Apache's AddEncoding, nginx's gzip_static) is the file whose sha256 is pinned,
                # as curl and wget save it, and Range offsets count these bytes.
                for block in response.raw.stream(CHUNK, decode_content=False):
                    sink.write(block)
                    received += len(block)
                    bar.update(len(block))
            finally:
                sink.close()  # flushes what is buffered: a full disk can show here too
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.Timeout, urllib3.exceptions.HTTPError) as error:
            raise _Transient(_reason(error)) from None
        except OSError as error:
            if error.filename is None and error.errno is not None:  # a full disk: name the file; what is written stays
                raise OSError(error.errno, error.strerror, str(part)) from None
            raise
        finally:
            bar.close()
        if total is not None and offset + received < total:
            raise _Transient(f"the connection closed after {offset + received:,} of {total:,} bytes")
        if total is None and "chunked" not in response.headers.get("Transfer-Encoding", "").lower():
            # No length and no chunks: the body ends when the connection closes, cut short or not.
            # An archive tells by its own end; urllib3 catches a chunked body cut short.
            # The pinned file itself is whole, whatever its content (an upstream archive that ends early).
            if (kind := archives.cut_short(part)) and not (expected and archives.sha256_file(part) == expected):
                raise _Transient(f"the download was cut short at {part.stat().st_size:,} bytes, before the {kind}'s "
                                 "end; the server sent no length to check it by")


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header's wait in seconds (it is a number of seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _content_range_start(value: str) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value)
    return int(match.group(1)) if match else None


def _content_range_total(value: str) -> int | None:
    match = re.match(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)", value)
    return int(match.group(1)) if match else None


def _http_error(what: str, url: str, status: int, reason: str, target: Path) -> str:
    if status == 404 or status == 410:
        advice = "the file is not there (any more); check the URL in params.yaml"
    elif status in (401, 403):
        advice = (
            "the server refuses access (login needed or the link expired); download the file yourself "
            f"to {target}, or use a `local` source"
        )
    else:
        advice = "check the URL in params.yaml"
    return f"{what}: {url} answered HTTP {status} {reason}; {advice}"


def _reason(error: BaseException) -> str:
    """A short human reason for a requests/urllib3 exception, from the root cause if there is one."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return "timed out connecting"
    if isinstance(error, (requests.exceptions.ReadTimeout, socket.timeout, TimeoutError)):
        return "timed out waiting for data"
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, socket.gaierror):
            return "host name not found (no network, or a typo in the host)"
        if isinstance(current, ConnectionResetError):
            return "connection reset"
        if isinstance(current, (socket.timeout, TimeoutError)):
            return "timed out"
        pending.extend([current.__cause__, current.__context__, getattr(current, "reason", None), *current.args])
    # requests' words name the URL it was at, after redirects: a signed link's query string
    # (X-Amz-Signature=..., token=...) is a credential, and is not shown.
    text = re.sub(r"((?:url: |://)[^\s?'\"]*)\?[^\s'\")]*", r"\1?...", " ".join(str(error).split()))
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------
# The `url` source kind.


def check_url(options: Any, key: str) -> None:
    """The URL and its pinned sha256, checked without downloading; `key` is the source's key."""
    if not archives.SHA256.fullmatch((options.sha256 or "").strip()):
        raise UserError(
            f"{key}.sha256: {options.sha256!r} is not a sha256 (64 hexadecimal characters); "
            f"pin the file's checksum (`sha256sum <file>`) in params.yaml"
        )
    parts = urlsplit(options.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"{key}.url: {options.url!r} is not an http(s) URL")


def fetch_url(options: Any, dest: Path, dataset: str) -> dict[str, Any]:
    """Download `options.url` into the download cache, verify it, and extract or copy it to `dest`."""
    key = f"datasets.{dataset}.source"
    check_url(options, key)
    pinned = options.sha256.strip()
    parts = urlsplit(options.url)
    name = unquote(parts.path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        name = f"{dataset}-download"  # no suffix: extract tells an archive by its content

    target = download_cache(dataset) / name
    fetched = download(options.url, target, sha256=pinned, what=f"{key}.url")
    refused: list[dict[str, str]] = []
    if options.extract and archives.is_archive(target):
        try:
            extraction = archives.extract(target, dest)
        except archives.DamagedArchive as error:
            raise UserError(f"{target}: not a readable archive ({error.detail}); it matches {key}.sha256, so "
                            "downloading it again gives the same bytes: ask the publisher for a whole copy (or, if "
                            "the pin was taken from a damaged copy, pin the whole file's sha256)") from None
        refused = extraction.refused + archives.unpack_nested(
            dest, extraction.bytes, source=f"{name} from {key}.url",
            remedy=f"the download matches its pinned sha256; ask the publisher for a whole copy, or unpack {target} "
                   "yourself, replace or remove it, and fetch that folder as a `local` source")
    else:
        if options.extract and (held := archives.content_format(target)):
            # Kept by its name's suffix (an .xlsx is a zip too); said, so that a dataset archive
            # behind an odd name does not leave the raw folder without images unexplained.
            print(f"fetch@{dataset}: note: {name} (from {key}.url) is a {held} archive by its content, kept as it is "
                  f"since its name ends '{Path(name).suffix}', not an archive's suffix; set {key}.extract: false to "
                  "keep it without this note, or to extract it, download it, name it .zip or .tar.gz and use a "
                  "`local` source")
        shutil.copyfile(target, dest / name)
    return {
        "origin": options.url,
        "archives": [{"name": fetched["name"], "sha256": fetched["sha256"], "bytes": fetched["bytes"]}],
        "refused": refused,
        "this_run": {"downloaded": fetched["downloaded"]},
    }
