"""Kaggle datasets and competitions, fetched through the `kaggle` package's own API client.

`fetch()` is the body of the `kaggle` source kind (registered in stages/sources.py):

1. Credentials are found by the kaggle client itself, in its own order: an access token
   (`KAGGLE_API_TOKEN`, or the file `~/.kaggle/access_token`), then a legacy API key (`kaggle.json`
   in `KAGGLE_CONFIG_DIR` or `~/.kaggle`, overridden by `KAGGLE_USERNAME`/`KAGGLE_KEY`), then the
   OAuth credentials of `kaggle auth login`. The client's help text and `exit()` become one
   UserError line; nothing secret is printed or recorded.
2. The archive goes to a download cache outside the dataset folder,
   `$CLASSMATRIX_DOWNLOADS/<dataset>/kaggle/...` (default `data/downloads`), because DVC deletes the
   dataset folder before each run. A dataset version is immutable, so a cached archive whose sha256
   matches the one recorded after its verified download is used without any request. Competitions
   (and datasets whose version the API does not tell) are re-validated against the size, ETag,
   Last-Modified and MD5 the server announces, and the body is read only when they differ.
3. An interrupted download resumes: the client's `download_file` retries in-process with HTTP Range
   requests, and across runs through its `.kaggle-partial` marker (same ETag and size).
4. A competition's file list (each file's name, size and creation date, as Kaggle lists them) goes
   into the provenance: a competition has no versions, and `fetch --check` compares that list
   with Kaggle's to see a file added, removed or re-uploaded.
5. Archives are extracted with `stages.archives` (unsafe entries refused and reported), including
   the zips Kaggle nests inside its bundles (`train.csv.zip`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from stages import archives
from stages.errors import UserError
from stages.files import write_json_atomic

TOKEN_PAGE = "https://www.kaggle.com/settings/api"
API_HOST = "api.kaggle.com"
# Seconds to connect and between two reads. The kaggle client sets no timeout on its API calls,
# so a stalled connection would hang the stage for ever; this is added to every call it makes.
TIMEOUT = (30, 300)
# In-process retries of an interrupted download (each resumes with a Range request); a later
# run resumes too, so this only saves a re-run on a flaky connection.
DOWNLOAD_RETRIES = 5
CACHE_RECORD = "cache.json"
# Files asked for on each page of a competition's file list (the client's own default is 20).
LIST_PAGE = 200
SLUG = r"[A-Za-z0-9][A-Za-z0-9._-]*"


@dataclass(frozen=True)
class _Target:
    """What is fetched: a dataset (pinned or resolved version, or None) or a competition."""

    kind: str  # "dataset" or "competition"
    ref: str  # owner/slug or the competition slug
    version: int | None = None

    @property
    def slug(self) -> str:
        return self.ref.split("/")[-1]

    def describe(self, file: str | None = None) -> str:
        what = f"{self.kind} {self.ref}"
        if self.version is not None:
            what += f" version {self.version}"
        if file:
            what = f"file {file!r} of {what}"
        return what

    @property
    def page(self) -> str:
        if self.kind == "competition":
            return f"https://www.kaggle.com/competitions/{self.ref}"
        page = f"https://www.kaggle.com/datasets/{self.ref}"
        return f"{page}/versions/{self.version}" if self.version is not None else page


# --------------------------------------------------------------------------------------------
# The entry point.


def fetch(options: Any, dest: Path, dataset: str) -> dict[str, Any]:
    """Fill the empty folder `dest` with the Kaggle dataset or competition `options` names."""
    target, files = check(options, f"datasets.{dataset}.source")
    session = _Session(dataset)
    if target.kind == "dataset" and target.version is None:
        target = _Target("dataset", target.ref, session.current_version(target))
    # A competition has no versions: its file list stands in for one, for `fetch --check`. Asked
    # before the download, so that a file re-uploaded meanwhile is seen as a change, not missed.
    listed = session.competition_files(target, files) if target.kind == "competition" else None
    # A dataset version never changes, so a verified archive of it needs no request at all.
    immutable = target.kind == "dataset" and target.version is not None
    folder = _cache_folder(dataset, target)
    record = _read_record(folder)

    obtained: list[tuple[str | None, Path, bool]] = []
    for file in files or [None]:
        path, downloaded = _obtain(session, target, file, folder, record, immutable)
        obtained.append((file, path, downloaded))

    refused: list[dict[str, str]] = []
    for file, path, _ in obtained:
        refused += _unpack(path, file, dest)
    # Each download unpacked whole (a zip's entries' CRCs are checked): a damaged archive inside is Kaggle's copy.
    refused += archives.unpack_nested(
        dest, source=f"kaggle {target.describe()}",
        remedy=f"tell the owner (on {target.page}); or unpack the download in {folder} yourself, replace or remove it, "
               "and fetch that folder as a `local` source")

    origin = f"kaggle {target.kind} {target.ref}"
    if target.kind == "dataset":
        origin += f" version {target.version}" if target.version is not None else " (latest version)"
    if files:
        origin += f", files {', '.join(files)}"
    return {
        "origin": origin,
        "version": target.version,
        "page": target.page,
        "archives": [
            {
                "name": path.relative_to(folder).as_posix(),
                "sha256": record["items"][_item_key(file)]["sha256"],
                "bytes": path.stat().st_size,
            }
            for file, path, _ in obtained
        ],
        "refused": refused,
        **({"competition_files": listed} if listed is not None else {}),
        "this_run": {"downloaded": any(downloaded for _, _, downloaded in obtained)},
    }


def check(options: Any, where: str) -> tuple[_Target, list[str]]:
    """The target and files `options` name, checked without asking Kaggle; `where` is their key."""
    ref, competition = options.dataset, options.competition
    if bool(ref) == bool(competition):
        raise UserError(
            f"{where}: a kaggle source needs exactly one of `dataset: <owner>/<slug>` and "
            f"`competition: <slug>` ({'both are' if ref else 'neither is'} set)"
        )
    version = options.version
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise UserError(f"{where}.version: {version!r} is not a dataset version number (1, 2, ...)")
    if competition:
        if version is not None:
            raise UserError(f"{where}.version: competitions have no versions; remove `version`")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", competition):
            raise UserError(
                f"{where}.competition: {competition!r} is not a competition slug; use the part after "
                f"kaggle.com/competitions/ (e.g. titanic)"
            )
        target = _Target("competition", competition)
    else:
        if not re.fullmatch(SLUG + "/" + SLUG, ref):
            # A dataset page's URL, or a version page's (kagglehub's handle owner/slug/versions/N
            # too): the part after kaggle.com/datasets/ would still hold /versions/N. Another page's
            # host (kaggle.com/competitions/titanic) is no owner.
            pasted = re.fullmatch(rf"(?:(?:https?://)?(?:www\.)?kaggle\.com/datasets/)?(?!(?:www\.)?kaggle\.com/)"
                                  rf"({SLUG}/{SLUG})(?:/versions/(\d+))?(?:[/?#].*)?", ref)
            contest = re.fullmatch(rf"(?:https?://)?(?:www\.)?kaggle\.com/competitions/({SLUG})(?:[/?#].*)?", ref)
            write = (f"; write `dataset: {pasted[1]}`" + (f" and `version: {pasted[2]}`" if pasted[2] else "")
                     if pasted and (pasted[2] or "kaggle.com" in ref)
                     else f"; it is a competition's page: write `competition: {contest[1]}`" if contest
                     else " (e.g. msambare/fer2013)")
            raise UserError(
                f"{where}.dataset: {ref!r} is not an <owner>/<slug> reference; use the part after "
                f"kaggle.com/datasets/{write}"
            )
        target = _Target("dataset", ref, version)
    files, seen = list(options.files or []), set()
    for file in files:
        path = archives.safe_member_path(file) if isinstance(file, str) else None
        if path is None or str(path) == ".":
            raise UserError(f"{where}.files: {file!r} is not a relative file path inside the {target.kind}")
        if str(path) in seen:  # compared as paths: "a.csv" and "./a.csv" are one file
            raise UserError(f"{where}.files: lists {path} twice ({file!r}); list each file once")
        seen.add(str(path))
    return target, files


# --------------------------------------------------------------------------------------------
# The kaggle client: created only when a request is needed, its output and exit() contained.


class _Session:
    """A KaggleApi authenticated on first use, with errors mapped to UserError lines."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self._api: Any = None

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = _authenticated_api(self.dataset)
        return self._api

    def current_version(self, target: _Target) -> int | None:
        """The dataset's current version number, as the API reports it (None if it does not)."""
        api = self.api
        with _kaggle_errors(target, None, self.dataset, api):
            return _asked_version(api, target)

    def competition_files(self, target: _Target, files: list[str]) -> list[dict[str, Any]]:
        api = self.api
        with _kaggle_errors(target, None, self.dataset, api):
            return _listed_files(api, target, files)


def _asked_version(api: Any, target: _Target) -> int | None:
    """The dataset's current version number, asked of Kaggle (None if the API does not tell); the
    client's errors go up as they are."""
    with _quiet():
        status = api.dataset_status(target.ref, format="json(current_version_number)")
    version = json.loads(status).get("current_version_number")
    return version if isinstance(version, int) and version > 0 else None


def _listed_files(api: Any, target: _Target, files: list[str]) -> list[dict[str, Any]]:
    """The competition's data files as Kaggle lists them, every page, by name: each one's name,
    size and creation date (only `files`, if given: a change elsewhere is not fetched). The
    client's errors go up as they are."""
    from kagglesdk.competitions.types.competition_api_service import ApiListDataFilesRequest

    wanted, listed, token = {str(archives.safe_member_path(file)) for file in files}, [], None
    with api.build_kaggle_client() as kaggle:
        while True:
            request = ApiListDataFilesRequest()
            request.competition_name = target.ref
            request.page_size = LIST_PAGE
            request.page_token = token
            response = kaggle.competitions.competition_api_client.list_data_files(request)
            listed += response.files
            if not response.next_page_token or response.next_page_token == token:
                break
            token = response.next_page_token
    return sorted(
        ({"name": file.name, "bytes": file.total_bytes,
          # As the client writes a date (it reads Kaggle's UTC dates without their zone).
          "created": file.creation_date.isoformat(timespec="milliseconds") + "Z" if file.creation_date else None}
         for file in listed if not wanted or file.name in wanted),
        key=lambda file: file["name"])


class Unreachable(UserError):
    """Kaggle cannot be asked at all (no usable credentials, no connection): asking again, for
    another dataset, would fail the same way."""


class VersionLookup:
    """For `fetch --check`: Kaggle datasets' current versions, and competitions' file lists (their
    stand-in for versions), asked with one client, the one fetch uses, authenticated on the first
    call. Once Kaggle cannot be asked, it is not asked again: each later call raises the same."""

    def __init__(self) -> None:
        self._session: _Session | None = None
        self._unreachable: Unreachable | None = None

    def __call__(self, options: Any, dataset: str) -> int | None:
        """The current version of the dataset `options` names (None if the API does not tell).
        Raises Unreachable when Kaggle cannot be asked, UserError for this dataset alone."""
        return self._ask(options, dataset, _asked_version)

    def competition_files(self, options: Any, dataset: str) -> list[dict[str, Any]]:
        """The files of the competition `options` names, as fetch records them; raises as above."""
        return self._ask(options, dataset, lambda api, target: _listed_files(api, target, options.files or []))

    def _ask(self, options: Any, dataset: str, question: Any) -> Any:
        target, _ = check(options, f"datasets.{dataset}.source")
        if self._unreachable is None:
            try:
                return self._asked(target, dataset, question)
            except Unreachable as error:
                self._unreachable = error
        raise self._unreachable

    def _asked(self, target: _Target, dataset: str, question: Any) -> Any:
        import requests

        self._session = self._session or _Session(dataset)
        try:
            api = self._session.api
        except UserError as error:
            raise Unreachable(str(error)) from None
        try:
            return question(api, target)
        except Exception as error:
            # No connection, or credentials rejected or rate-limited: no other dataset would do better,
            # so the line, said once for them all, names none of them.
            response = getattr(error, "response", None)
            everywhere = isinstance(error, requests.exceptions.RequestException) and (
                response is None or response.status_code in (401, 429))
            mapped = _map_error(error, None if everywhere else target, None, dataset, api)
            if mapped is None:
                raise
            raise (Unreachable if everywhere else UserError)(str(mapped)) from None


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Swallow what the kaggle package prints (help texts, warnings that may name files)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield sink


def _config_dir() -> Path:
    """Where the kaggle client looks for kaggle.json, decided as the client does it.

    The client decides this once, when it is imported; doing it again here makes the current
    environment count (a test, or a caller that changes KAGGLE_CONFIG_DIR, in the same process).
    """
    configured = os.environ.get("KAGGLE_CONFIG_DIR")
    if configured:
        return Path(configured)
    home = Path(os.path.expanduser("~"))
    legacy = home / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"
    return legacy


def _authenticated_api(dataset: str) -> Any:
    with _quiet():
        try:
            # Importing `kaggle` runs an authentication of its own, which prints a help text and
            # calls exit() (caught inside the package) when no credentials are found.
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError as error:  # pragma: no cover - a declared dependency
            raise UserError(f"the kaggle package is not importable ({error}); reinstall the project") from None
    from kagglesdk.kaggle_env import get_access_token_from_env

    api = KaggleApi()
    config_dir = _config_dir()
    api.config_dir = str(config_dir)
    api.config = str(config_dir / api.config_file)
    # Never "--verbose": the client then prints every request's headers, credentials included.
    api.args = ["--local"] if os.environ.get("KAGGLE_API_ENVIRONMENT") == "LOCALHOST" else []
    api.build_kaggle_client = _with_timeout(api.build_kaggle_client)
    _warn_if_readable(Path(api.config))

    raw = os.environ.get("KAGGLE_API_TOKEN")
    if raw and raw != raw.strip() and not Path(raw).exists():
        # Pasted with its line break (a CI secret): the client would put it in a header as it is,
        # which urllib3 refuses. Dropped, as the client drops it from ~/.kaggle/access_token.
        os.environ["KAGGLE_API_TOKEN"] = raw.strip()
    config_problem = _kaggle_json_problem(Path(api.config))
    if config_problem and "JSON object" in config_problem:  # the client fails on it with a TypeError
        raise UserError(f"datasets.{dataset}.source: {api.config} {config_problem}; download a new one at "
                        f"{TOKEN_PAGE}, or use an access token") from None
    token, token_source = get_access_token_from_env()
    try:
        with _quiet():
            api.authenticate()
    except SystemExit:
        where = f"datasets.{dataset}.source"
        if token:
            raise UserError(
                f"{where}: Kaggle rejected the access token from {_token_source(token_source)} "
                f"(invalid or expired) and no other credentials were found; create a new token at "
                f"{TOKEN_PAGE} and put it in KAGGLE_API_TOKEN or ~/.kaggle/access_token"
            ) from None
        if config_problem:
            # The client skips a kaggle.json it cannot use without a word: "none found" would
            # send the user looking for a file that is right there.
            raise UserError(
                f"{where}: {api.config} {config_problem}; download a new one at {TOKEN_PAGE}, "
                f"or create an API token there and put it in KAGGLE_API_TOKEN or ~/.kaggle/access_token"
            ) from None
        partial = ""
        if bool(os.environ.get("KAGGLE_USERNAME")) != bool(os.environ.get("KAGGLE_KEY")):
            partial = " (KAGGLE_USERNAME and KAGGLE_KEY must be set together)"
        raise UserError(
            f"{where}: no Kaggle credentials found{partial}: looked for the KAGGLE_API_TOKEN variable, "
            f"~/.kaggle/access_token, {api.config}, the KAGGLE_USERNAME and KAGGLE_KEY variables and "
            f"~/.kaggle/credentials.json (`kaggle auth login`); create an API token at {TOKEN_PAGE} "
            f"and put it in KAGGLE_API_TOKEN or ~/.kaggle/access_token"
        ) from None
    except Exception as error:
        # With an access token, authenticating asks the server whether the token is valid.
        mapped = _map_error(error, None, None, dataset, api)
        if mapped is None:
            raise
        raise mapped from None
    return api


def _kaggle_json_problem(config: Path) -> str | None:
    """What makes a kaggle.json that is there unusable (never its contents), or None."""
    try:
        text = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        return f"cannot be read ({getattr(error, 'strerror', None) or type(error).__name__})"
    try:
        values = json.loads(text)
    except ValueError as error:
        where = f" (line {error.lineno}, column {error.colno})" if isinstance(error, json.JSONDecodeError) else ""
        return f"is not valid JSON{where}"
    if not isinstance(values, dict):
        return 'is not a JSON object ({"username": "...", "key": "..."})'
    for name, variable in (("username", "KAGGLE_USERNAME"), ("key", "KAGGLE_KEY")):
        if not (isinstance(values.get(name), str) and values[name].strip()) and not os.environ.get(variable):
            return f'has no "{name}"'
    return None


def _token_source(source: str | None) -> str:
    return "KAGGLE_API_TOKEN" if source == "KAGGLE_API_TOKEN" else "~/.kaggle/access_token"


def _credential_source(api: Any) -> str:
    """Where the credentials in use came from (never the credentials themselves)."""
    from kagglesdk.kaggle_env import get_access_token_from_env

    token, source = get_access_token_from_env()
    if token:
        # The client's HTTP layer sends an access token from the environment whenever there is
        # one, even when it authenticated with a kaggle.json key.
        return _token_source(source)
    method = str(api.config_values.get(api.CONFIG_NAME_AUTH_METHOD, "")) if api is not None else ""
    if "OAUTH" in method.upper():
        return "~/.kaggle/credentials.json (kaggle auth login)"
    if os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    return api.config if api is not None else "kaggle.json"


def _warn_if_readable(config: Path) -> None:
    try:
        mode = config.stat().st_mode
    except OSError:
        return
    if os.name != "nt" and mode & 0o044:
        print(
            f"warning: {config} (your Kaggle API key) is readable by other users; run: chmod 600 {config}",
            file=sys.stderr,
        )


def _with_timeout(build: Any) -> Any:
    """Wrap KaggleApi.build_kaggle_client so every request its client sends has a timeout."""

    def build_with_timeout() -> Any:
        client = build()
        http = client.http_client()
        try:
            http._init_session()  # the session the client would create on first use
            session = http._session
            send = session.send
        except AttributeError:  # pragma: no cover - a kagglesdk without these internals
            return client

        def send_with_timeout(request: Any, **kwargs: Any) -> Any:
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = TIMEOUT
            return send(request, **kwargs)

        session.send = send_with_timeout
        return client

    return build_with_timeout


# --------------------------------------------------------------------------------------------
# Errors: the client raises requests' exceptions; each becomes one line saying what to do.


@contextlib.contextmanager
def _kaggle_errors(target: _Target | None, file: str | None, dataset: str, api: Any = None) -> Iterator[None]:
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        mapped = _map_error(error, target, file, dataset, api)
        if mapped is None:
            raise
        raise mapped from None


def _map_error(error: Exception, target: _Target | None, file: str | None, dataset: str, api: Any) -> UserError | None:
    import requests

    where = f"datasets.{dataset}.source"
    what = target.describe(file) if target else "the Kaggle API"
    if isinstance(error, requests.exceptions.HTTPError):
        response = error.response
        status = response.status_code if response is not None else None
        detail = _server_message(error)
        if status == 401:
            return UserError(
                f"{where}: Kaggle rejected the credentials from {_credential_source(api)} (HTTP 401{detail}); "
                f"check the username and key or token there, or create a new token at {TOKEN_PAGE}"
            )
        if status == 403 and target is not None and target.kind == "competition":
            return UserError(
                f"{where}: Kaggle refused access to {what} (HTTP 403{detail}): you must accept this competition's "
                f"rules, which only the website can do: open https://www.kaggle.com/competitions/"
                f"{target.ref}/rules while logged in as the account whose credentials are used, accept "
                f"them, then run again"
            )
        if status == 403:
            return UserError(
                f"{where}: your Kaggle account has no access to {what} (HTTP 403{detail}); it may be "
                f"private or withdrawn: check that you can open {target.page if target else 'it'} "
                f"while logged in, or pick another dataset"
            )
        if status == 404:
            if target is None or target.kind == "dataset":
                checks = ["the <owner>/<slug> reference (as in the dataset's URL)"]
            else:
                checks = ["the competition's slug (as in its URL)"]
            if target is not None and target.version is not None:
                checks.append("the version number")
            if file:
                checks.append("the file name (as the Data tab lists it)")
            check = ", ".join(checks[:-1]) + " and " + checks[-1] if len(checks) > 1 else checks[0]
            return UserError(f"{where}: {what} was not found on Kaggle (HTTP 404{detail}); check {check}")
        if status == 429:
            return UserError(f"{where}: Kaggle rate-limited the request for {what} (HTTP 429{detail}); wait a while and "
                             "run again")
        if status is not None and status >= 500:
            return UserError(f"{where}: Kaggle failed to serve {what} (HTTP {status}); a problem on Kaggle's side, try again later")
        return UserError(f"{where}: Kaggle answered HTTP {status}{detail} for {what}")
    if isinstance(error, requests.exceptions.RequestException):
        url = getattr(getattr(error, "request", None), "url", None) or f"https://{API_HOST}/"
        host = urllib.parse.urlsplit(url).hostname or API_HOST
        if isinstance(error, requests.exceptions.ProxyError):
            proxy = _proxy_for(url)
            return UserError(
                f"{where}: cannot reach {host} through the proxy {proxy or '(from the environment)'} "
                f"({_reason(error)}) while fetching {what}; check that the proxy is up and that "
                f"HTTPS_PROXY/HTTP_PROXY are right"
            )
        if isinstance(error, requests.exceptions.SSLError):
            return UserError(
                f"{where}: the TLS connection to {host} failed ({_reason(error)}) while fetching {what}; "
                f"check the proxy's certificate and REQUESTS_CA_BUNDLE"
            )
        if isinstance(error, requests.exceptions.Timeout):
            return UserError(
                f"{where}: {host} did not answer in time while fetching {what}; check your network "
                f"connection or proxy (HTTPS_PROXY), then run again"
            )
        if isinstance(error, requests.exceptions.ConnectionError):
            return UserError(
                f"{where}: cannot connect to {host} ({_reason(error)}) while fetching {what}; check your "
                f"network connection or proxy settings (HTTPS_PROXY), then run again"
            )
        return UserError(f"{where}: the request to {host} for {what} failed ({_reason(error)})")
    if isinstance(error, ValueError) and str(error).startswith("Invalid header value"):
        # urllib3 quotes the header, the credential in it: never repeated.
        return UserError(
            f"{where}: the credentials from {_credential_source(api)} hold a line break or another character an "
            f"HTTP header cannot; copy the token (or key) again from {TOKEN_PAGE}"
        )
    if isinstance(error, ValueError) and target is not None:
        # The client validates references and paths with ValueError.
        return UserError(f"{where}: the kaggle client refused {what}: {' '.join(str(error).split())}")
    return None


def _server_message(error: Exception) -> str:
    """The message of Kaggle's JSON error body ({"code": 403, "message": "..."}), if any."""
    response = getattr(error, "response", None)
    message = None
    try:
        if response is not None and "json" in response.headers.get("Content-Type", ""):
            message = response.json().get("message")
    except Exception:
        message = None
    if not message:
        text = str(error)
        message = None if "for url:" in text or not text else text
    return f": {' '.join(str(message).split())}" if message else ""


def _reason(error: Exception) -> str:
    """A short cause without URLs (a signed download URL carries a short-lived credential)."""
    import requests

    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "connection broken mid-transfer"
    text = str(error)
    for pattern, reason in (
        (r"IncompleteRead|Connection broken", "connection broken mid-transfer"),
        (r"Connection refused|Errno 111|ECONNREFUSED", "connection refused"),
        (r"Name or service not known|nodename nor servname|getaddrinfo|Temporary failure in name resolution", "host name not resolved"),
        (r"timed out|Timeout", "timed out"),
        (r"Network is unreachable", "network unreachable"),
        (r"CERTIFICATE_VERIFY_FAILED", "certificate not trusted"),
        (r"Tunnel connection failed: (\d{3}[^'\"]*)", None),
    ):
        match = re.search(pattern, text)
        if match:
            return reason or f"tunnel refused: {match.group(1).strip()}"
    return type(error).__name__


def _proxy_for(url: str) -> str | None:
    """The proxy requests uses for `url`, without any user:password in it."""
    import requests

    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if not proxy:
        return None
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}"


# --------------------------------------------------------------------------------------------
# The download cache.


def _downloads_root() -> Path:
    return Path(os.environ.get("CLASSMATRIX_DOWNLOADS", "data/downloads"))


def _cache_folder(dataset: str, target: _Target) -> Path:
    root = _downloads_root() / dataset / "kaggle"
    if target.kind == "competition":
        return root / "competitions" / target.ref
    owner, slug = target.ref.split("/")
    version = f"v{target.version}" if target.version is not None else "latest"
    return root / "datasets" / owner / slug / version


def _item_key(file: str | None) -> str:
    return file or ""


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / CACHE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"items": {}}
    if not isinstance(record, dict) or not isinstance(record.get("items"), dict):
        return {"items": {}}
    return record


def _hashes(path: Path) -> tuple[str, str]:
    """The file's sha256 (hex) and md5 (base64, as GCS's x-goog-hash gives it)."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), base64.b64encode(md5.digest()).decode("ascii")


def _announced(response: Any) -> dict[str, Any]:
    """What the server says about the object: size, ETag, Last-Modified, MD5."""
    headers = response.headers
    length = headers.get("Content-Length")
    md5 = None
    for part in headers.get("x-goog-hash", "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "md5" and value:
            md5 = value
    return {
        "bytes": int(length) if length and length.isdigit() else None,
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
        "md5": md5,
    }


def _cached_intact(folder: Path, entry: dict[str, Any] | None) -> Path | None:
    """The cached archive an entry records, if it is there with the recorded size and sha256."""
    if not entry or not isinstance(entry.get("path"), str):
        return None
    path = folder / entry["path"]
    try:
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return None
    except OSError:
        return None
    return path if archives.sha256_file(path) == entry.get("sha256") else None


def _matches(entry: dict[str, Any], announced: dict[str, Any]) -> bool:
    """Whether what the server announces now is what was recorded when the archive was downloaded."""
    if announced["bytes"] is None or announced["bytes"] != entry.get("bytes"):
        return False
    return all(entry.get(key) == value for key, value in announced.items() if value is not None)


def _local_name(target: _Target, file: str | None, url: str) -> str:
    """The archive's path inside the cache folder, named as the kaggle client names it."""
    base = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if file is None:
        if target.kind == "dataset":
            return f"{target.slug}.zip"
        extension = base.rsplit(".", 1)[-1] if "." in base else "zip"
        return f"{target.slug}.{extension}"
    requested = PurePosixPath(str(archives.safe_member_path(file)))
    # Kaggle serves a large file zipped: a request for foo.csv arrives as foo.csv.zip.
    name = requested.name + ".zip" if base == requested.name + ".zip" else requested.name
    return (PurePosixPath("files") / requested.parent / name).as_posix()


def _request_download(kaggle: Any, target: _Target, file: str | None) -> Any:
    """Ask the API for the archive; the client follows the redirect and opens the stream."""
    if target.kind == "dataset":
        from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest

        owner, slug = target.ref.split("/")
        request = ApiDownloadDatasetRequest()
        request.owner_slug = owner
        request.dataset_slug = slug
        request.dataset_version_number = target.version
        if file is not None:
            request.file_name = file
        return kaggle.datasets.dataset_api_client.download_dataset(request)
    from kagglesdk.competitions.types.competition_api_service import (
        ApiDownloadDataFileRequest,
        ApiDownloadDataFilesRequest,
    )

    if file is None:
        request = ApiDownloadDataFilesRequest()
        request.competition_name = target.ref
        return kaggle.competitions.competition_api_client.download_data_files(request)
    request = ApiDownloadDataFileRequest()
    request.competition_name = target.ref
    request.file_name = file
    return kaggle.competitions.competition_api_client.download_data_file(request)


def _obtain(
    session: _Session,
    target: _Target,
    file: str | None,
    folder: Path,
    record: dict[str, Any],
    immutable: bool,
) -> tuple[Path, bool]:
    """The cached archive for one request (the whole bundle or one file), downloading if needed."""
    key = _item_key(file)
    entry = record["items"].get(key)
    if immutable:
        cached = _cached_intact(folder, entry)
        if cached is not None:
            print(f"kaggle: using the cached {cached} ({target.describe(file)})", file=sys.stderr)
            return cached, False

    api = session.api
    with _kaggle_errors(target, file, session.dataset, api):
        with api.build_kaggle_client() as kaggle:
            response = _request_download(kaggle, target, file)
            try:
                announced = _announced(response)
                path = folder / _local_name(target, file, response.url)
                if entry and not immutable and _matches(entry, announced):
                    cached = _cached_intact(folder, entry)
                    if cached is not None:
                        print(f"kaggle: {cached} is up to date ({target.describe(file)})", file=sys.stderr)
                        return cached, False
                # The entry describes a complete archive; until the new one is verified, none is.
                if record["items"].pop(key, None) is not None:
                    write_json_atomic(folder / CACHE_RECORD, record)
                path.parent.mkdir(parents=True, exist_ok=True)
                _check_room(path, announced["bytes"], target, file)
                size = f" ({announced['bytes']:,} bytes)" if announced["bytes"] is not None else ""
                print(f"kaggle: downloading {target.describe(file)}{size} to {path}", file=sys.stderr)
                _download(api, kaggle, response, path, target, file)
            finally:
                response.close()

    sha256, md5 = _hashes(path)
    if announced["md5"] is not None and md5 != announced["md5"]:
        path.unlink()
        raise UserError(
            f"datasets.{session.dataset}.source: the download of {target.describe(file)} is corrupt "
            f"(its MD5 differs from the one Kaggle announced); run again to download it afresh"
        )
    record["items"][key] = {
        "path": path.relative_to(folder).as_posix(),
        "sha256": sha256,
        **announced,
        "bytes": path.stat().st_size,
        "md5": md5,
        # Where it came from, without the query string (a signed URL's signature is a credential).
        "url": urllib.parse.urlsplit(response.url)._replace(query="", fragment="").geturl(),
    }
    record["source"] = target.describe()
    write_json_atomic(folder / CACHE_RECORD, record)
    return path, True


def _check_room(path: Path, size: int | None, target: _Target, file: str | None) -> None:
    """Refuse a download the disk cannot hold (the client would retry a full disk for a minute)."""
    if size is None:
        return
    have = path.stat().st_size if path.is_file() else 0  # a partial download resumes
    free = shutil.disk_usage(path.parent).free
    if size - have > free:
        raise UserError(
            f"{path.parent}: no room for {target.describe(file)} ({size - have:,} bytes to download, {free:,} "
            f"free); free some space, or set CLASSMATRIX_DOWNLOADS to a folder on a bigger disk, and run again"
        )


def _download(api: Any, kaggle: Any, response: Any, path: Path, target: _Target, file: str | None) -> None:
    """Stream the response into `path` with the client's resumable download_file."""
    import requests
    import urllib3

    # tqdm's own rule (disable=None): a progress bar only when stderr is a terminal.
    quiet = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    try:
        api.download_file(
            response,
            str(path),
            kaggle.http_client(),
            quiet=quiet,
            resume=True,
            max_retries=DOWNLOAD_RETRIES,
            timeout=TIMEOUT[1],
        )
    except requests.exceptions.HTTPError as error:
        failed = error.response
        host = urllib.parse.urlsplit(getattr(failed, "url", "") or "").hostname
        if failed is None or host in (None, API_HOST) or failed.status_code not in (400, 401, 403):
            raise  # the API's own answer, or a storage error no new link cures: mapped like any other
        # The storage host refused the signed link the API gave (it expires, and the client
        # retries a dropped download with the same link): a new run asks for a new link.
        have = path.stat().st_size if path.exists() else 0
        raise UserError(
            f"the download link for {target.describe(file)} stopped working after {have:,} bytes (HTTP "
            f"{failed.status_code} from {host}; Kaggle's signed links expire); run again: it asks Kaggle for a "
            f"new link and resumes from the partial file in {path.parent}"
        ) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ConnectionError, ValueError) as error:
        # Cut off, and still cut off after the client's own retries (or a size mismatch).
        have = path.stat().st_size if path.exists() else 0
        total = response.headers.get("Content-Length")
        of = f" of {int(total):,}" if total and total.isdigit() else ""
        raise UserError(
            f"the download of {target.describe(file)} was interrupted after {have:,}{of} bytes "
            f"({_reason(error)}); run again to resume it (the partial file is kept in {path.parent})"
        ) from None


# --------------------------------------------------------------------------------------------
# Extraction into the dataset folder.


def _unpack(path: Path, file: str | None, dest: Path) -> list[dict[str, str]]:
    """Put one cached download into `dest`: archives extracted safely, other files copied."""
    name = path.name
    if file is None:
        if archives.is_archive(path):
            return _tagged(archives.extract(path, dest).refused, name)
        shutil.copyfile(path, dest / name)
        return []
    requested = PurePosixPath(str(archives.safe_member_path(file)))
    target_dir = dest / requested.parent
    target_dir.mkdir(parents=True, exist_ok=True)
    if not name.lower().endswith(".zip"):
        shutil.copyfile(path, dest / requested)
        return []
    if name == requested.name + ".zip":
        # Kaggle zipped the one file it was asked for; the file goes where it was asked for,
        # whatever path it has inside the zip (the client does the same).
        with tempfile.TemporaryDirectory(dir=dest, prefix=".unwrap-") as scratch:
            extraction = archives.extract(path, Path(scratch))
            inside = [p for p in Path(scratch).rglob("*") if p.is_file()]
            if len(inside) == 1 and not extraction.refused:
                shutil.move(str(inside[0]), dest / requested)
                return []
        # Several files (or refused entries): a bundle after all.
    return _tagged(archives.extract(path, target_dir).refused, name)


def _tagged(refused: list[dict[str, str]], archive: str) -> list[dict[str, str]]:
    return [{"archive": archive, **item} for item in refused]
