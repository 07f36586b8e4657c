"""MLflow: where runs go, and how a run is found again.

The tracking URI comes from `MLFLOW_TRACKING_URI`; without it, runs go to `mlflow.db`, a SQLite
file at the repository root, named by absolute path so stages run from any working folder write
to the same place. One MLflow experiment per dataset; one run per (dataset, backbone, resolved
params, data version, training code), found again by the `classmatrix.run_key` tag so that re-running a stage
never leaves two runs for the same thing; a run another live process is training (the
`classmatrix.owner` tag says which) is never deleted under it.

A tracking server that does not answer is retried (MLflow's own HTTP retries, bounded here to
about 15 seconds for a refused connection, 5 minutes for one that is never answered) and then
reported in one line by `unavailable`; the stages keep their local
outputs, so a re-run once the server is back logs what was missed without training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from stages.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RUN_KEY_TAG = "classmatrix.run_key"
# The process training the run (stages.tracking.process_owner).
OWNER_TAG = "classmatrix.owner"


def repository_root(code_root: Path | None = None) -> Path:
    """The repository the runs belong to. A queued or `--temp` DVC experiment runs in a copy under
    <repository>/.dvc/tmp/exps/<tmp>/; its runs go to the repository's database, not the copy's,
    which DVC deletes afterwards."""
    code_root = code_root or ROOT
    parts = code_root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return code_root


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and repository_root() != ROOT:
        # A relative file in a queued experiment's copy would go with the copy: the repository's.
        uri = f"sqlite:///{repository_root() / uri.removeprefix('sqlite:///')}"
    return uri


def redact(text: str) -> str:
    """`text` with the password of every URL in it (https://user:secret@host,
    postgresql://user:secret@host/db), or a token standing alone (https://token@host), as ***."""

    def mask(match: re.Match) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user + ':***' if colon else '***'}@"

    return re.sub(r"([a-z][a-z0-9+.-]*://)([^/@\s'\"]*)@", mask, text, flags=re.IGNORECASE)


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI as messages and records may show it: without its credentials."""
    return redact(tracking_uri() if uri is None else uri)


# MLflow's defaults retry a dead server 7 times with a doubling backoff (minutes); ours give
# up after 5 tries in about 15 s. Each can be overridden by setting it in the environment.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
# MLflow's words for a server that did not answer: a connection refused or reset, a timeout, a 5xx
# (from the server, or from a proxy before it: 502, 503, 521...).
_UNREACHABLE = re.compile(r"API request to (?:endpoint )?\S+ failed with (?:exception|timeout exception|error code 5\d\d)")


class TrackingUnavailable(UserError):
    """The tracking server did not answer, after MLflow's retries."""


def is_unreachable(error: BaseException) -> bool:
    """Whether an MlflowException says the tracking server did not answer (after retries)."""
    return bool(_UNREACHABLE.search(str(error)))


# A server that answered, but not MLflow's API to us: a 401 (no or wrong credentials: MLflow's
# basic-auth app, or a proxy's) or a 404 page that is not MLflow's JSON (another web server on
# that port, a proxy without the path to MLflow). MLflow's own 404s are JSON, and stay its errors.
_REFUSED = re.compile(r"failed with error code (401|404) != \d+\. Response body: ")


def refusal(error: BaseException) -> str | None:
    """What to do about an MlflowException that says the server is not MLflow's API to us, or None."""
    found = _REFUSED.search(str(error))
    if found is None:
        return None
    if found.group(1) == "401":
        return (
            "answered 401, not authenticated: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) to an account of that server"
        )
    return (
        "answered 404 with a page that is not MLflow's API: is MLFLOW_TRACKING_URI the address of an MLflow "
        "tracking server (its host, port and any path prefix; `make server` prints it)?"
    )


# The answers that mean a run is not there to use: it does not exist (purged); MLflow's basic-auth
# server answers a purged run with a 403 (so as not to say which run ids exist); and a run id the
# client refuses before asking (an edited training.json). A server that did not answer, a wrong
# password (401) or a proxy's 404 page is none of these.
GONE = {"RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "INVALID_PARAMETER_VALUE"}


def is_gone(error: BaseException) -> bool:
    """Whether an MlflowException says the run asked for is not there to use. A 403 counts only
    from MLflow itself (JSON) or its basic-auth app ("Permission denied"): one from its guard
    against DNS rebinding (a host name it does not allow) or from a proxy says nothing of the run."""
    code = getattr(error, "error_code", None)
    if code == "PERMISSION_DENIED" and "Response body:" in str(error):  # not JSON: not MLflow's API
        return str(error).rstrip().endswith("Response body: 'Permission denied'")
    return code in GONE


@contextmanager
def unavailable(what: str, consequence: str) -> Iterator[None]:
    """Turn "the tracking server does not answer" inside the block into one clear line."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        message = str(error)
        if "Invalid Host header" in message:  # MLflow server's answer to a host name it does not allow
            host = urllib.parse.urlsplit(tracking_uri()).hostname
            raise UserError(
                f"MLflow tracking server {shown_uri()} refused the host name {host!r} (its guard against DNS "
                f"rebinding) when asked to {what}: start it with MLFLOW_SERVER_ALLOWED_HOSTS naming {host}, "
                f"or use a name it allows; {consequence}"
            ) from None
        if advice := refusal(error):
            raise TrackingUnavailable(
                f"MLflow tracking server {shown_uri()} {advice} (asked to {what}); {consequence}"
            ) from None
        if not is_unreachable(error):
            # MLflow's messages hold the request's URL, with the tracking URI's credentials: the
            # error goes up as it is (its type, code and traceback), its words redacted.
            error.message = redact(message)
            error.args = (error.message, *error.args[1:])
            if isinstance(getattr(error, "json", None), dict) and "message" in error.json:
                error.json["message"] = redact(str(error.json["message"]))
            raise
        tries = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
        reason = re.search(r"\[Errno \d+\] [^\"')]+|error code \d+|Read timed out|timeout exception", message)
        # A 5xx MLflow retries (500, 503...) ends as urllib3's "Max retries exceeded ... (Caused by
        # ResponseError('too many 503 error responses'))", the status last, past the 160 characters.
        answered = re.search(r"too many (\d+) error responses", message)
        said = (f"it answered {answered.group(1)} each time" if answered
                else reason.group(0) if reason else redact(message)[:160])
        raise TrackingUnavailable(
            f"MLflow tracking server {shown_uri()} did not answer {tries} tries to {what} ({said}); {consequence}"
        ) from None
    except requests.exceptions.HTTPError as error:
        # An artifact transfer refused (a proxy's 413 for a large model, a 403, a 5xx after the
        # retries): requests' words, and the error it chains, hold the artifact URL with the
        # tracking URI's credentials, so it becomes one line, redacted.
        status = error.response.status_code if error.response is not None else 0
        kind = TrackingUnavailable if status >= 500 else UserError
        detail = redact(" ".join(str(error).split()))
        raise kind(
            f"MLflow tracking server {shown_uri()} refused to {what} "
            f"({detail if len(detail) <= 240 else detail[:237] + '...'}); {consequence}"
        ) from None


def mlflow_client() -> Any:
    """The mlflow module, pointed at our tracking URI, with its chatty loggers quietened."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
        # MLflow reads them as whole numbers, at its first request: a traceback from deep inside it.
        if not os.environ[key].strip().isdigit():
            raise UserError(
                f"{key}={os.environ[key]!r}: MLflow takes a whole number here (0, 1, 2...; ours is {value}); "
                f"set it to one, or unset it"
            )
    # Stage logs are read by people and CI: no progress bars for artifact transfers.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri()
    check_not_a_folder(uri)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _created:
        _create_database(mlflow, uri)
    return mlflow


def check_not_a_folder(uri: str) -> None:
    """MLflow 3 refuses a folder (`./mlruns`, file:///...) as the tracking store, deep inside its
    first call; here it is one line, unless MLflow's own opt-out MLFLOW_ALLOW_FILE_STORE is set."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if (scheme in ("", "file") or re.fullmatch(r"[a-zA-Z]", scheme)) and os.environ.get(
        "MLFLOW_ALLOW_FILE_STORE", ""
    ).lower() not in ("true", "1"):
        raise UserError(
            f"MLFLOW_TRACKING_URI={redact(uri)}: a folder, which MLflow 3 no longer tracks into; use a database, "
            f"e.g. sqlite:///{repository_root() / 'mlflow.db'} (unset it for that one; `mlflow migrate-filestore` "
            f"copies the runs a folder holds into one)"
        )


def require_store(what: str) -> None:
    """For a reader (predict): a SQLite tracking URI must name an existing database. Opening one
    that is not there would create an empty one, and then say only that the model is missing."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"cannot {what}: there is no MLflow database at {uri.removeprefix('sqlite:///')}, so nothing has been "
            "evaluated here; run dvc repro (evaluate logs and registers the models), or point "
            "MLFLOW_TRACKING_URI at the tracking server or database that holds them"
        )


# The SQLite databases this process has opened (and so created, if they were new).
_created: set[str] = set()


def _create_database(mlflow: Any, uri: str) -> None:
    """Open the SQLite store while holding a lock that every process of ours takes first.

    MLflow's tracking store makes a new database's tables the first time it opens it, without a
    lock: two stages starting together on a new mlflow.db (`matrix local`, two shells) both ran
    the schema migrations, and the later one failed ("table evaluation_datasets already exists").
    The lock is taken on the database's folder (flock on a directory: nothing is written, no lock
    file is left behind, and any user who can read the folder can take it).
    """
    import fcntl

    path = Path(uri.removeprefix("sqlite:///"))
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except FileNotFoundError:
        raise UserError(
            f"the MLflow database {path} is in a folder that does not exist; create {path.parent}"
            " or point MLFLOW_TRACKING_URI elsewhere"
        ) from None
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        # Any call opens the store, which makes the tables of a new database.
        mlflow.tracking.MlflowClient().search_experiments(max_results=1)
    finally:
        os.close(folder)  # releases the lock
    _created.add(uri)


def experiment_id(dataset: str) -> str:
    """The MLflow experiment for `dataset`, created on first use."""
    mlflow = mlflow_client()
    experiment = mlflow.get_experiment_by_name(dataset)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow.tracking.MlflowClient().restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        # Beside the database, not relative to whichever folder the stage ran in. (A server
        # chooses its own artifact root.) Decided by the URI, not by whether the variable is
        # set: mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI itself.
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / dataset).as_uri()
    try:
        return mlflow.create_experiment(dataset, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException as error:
        # Another stage, running at the same time, made it first.
        if error.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(error):
            raise
        return mlflow.get_experiment_by_name(dataset).experiment_id


def stable_hash(data: Any) -> str:
    """A short hash of JSON-able data, independent of key order."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def start_fresh_run(dataset: str, run_name: str, run_key: str, tags: dict[str, str]) -> str:
    """Create the run for `run_key`, retiring any earlier run with the same key; return its id.

    A retrain with identical params, data and training code (`dvc repro --force`) replaces the
    old run rather than adding a second one beside it; under other code the key differs, and the
    earlier run stays for DVC's run cache to bring its outputs back to. A run that another live process is still training
    (two queued DVC experiments retraining the same stale experiment at once) is left alone:
    deleting it would stop that process logging into it. The two then keep a run each, one per
    workspace that trained.
    """
    mlflow = mlflow_client()
    client = mlflow.tracking.MlflowClient()
    exp = experiment_id(dataset)
    _retire(client, exp, run_key, keep=None)
    run = client.create_run(exp, run_name=run_name, tags={RUN_KEY_TAG: run_key, OWNER_TAG: process_owner(), **tags})
    return run.info.run_id


def revive_run(run_id: str) -> bool:
    """Make `run_id` its key's run again if a later retrain retired it; whether it did.

    DVC's run cache (or a checkout) can bring back the outputs of an earlier training after a
    retrain with the same params, data and training code (`dvc repro --force`) deleted that
    training's run. Its outputs are the workspace's again, so is its run: restored, and the
    retrain's run retired in its place.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client().tracking.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if not is_gone(error):
            raise
        return False
    if run.info.lifecycle_stage != "deleted":
        return False
    client.restore_run(run_id)
    if run.data.tags.get(RUN_KEY_TAG):
        _retire(client, run.info.experiment_id, run.data.tags[RUN_KEY_TAG], keep=run_id)
    return True


def _retire(client: Any, experiment: str, run_key: str, keep: str | None) -> None:
    """Delete the runs of `run_key` but `keep`, except one that another live process is training."""
    for old in client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'"):
        if old.info.run_id == keep:
            continue
        if old.info.status == "RUNNING" and owner_may_be_running(old.data.tags.get(OWNER_TAG)):
            continue
        client.delete_run(old.info.run_id)


# --------------------------------------------------------------------------------------------
# Which process trains a run: enough to tell later, on the same machine, whether it still runs.


def process_owner() -> str:
    """This process as the owner tag records it: host, boot, process id and start time."""
    pid = os.getpid()
    return json.dumps({"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "started": _process_start(pid)})


def owner_may_be_running(owner: str | None) -> bool:
    """Whether the process an owner tag names may still be running: False only when this machine
    can tell it is gone (same host: exited, or a reboot since); True for another host's process.

    A run with no owner tag (made before the tag existed) counts as gone, as such runs always did.
    """
    try:
        who = json.loads(owner) if owner else None
        host, boot, pid, started = who["host"], who["boot"], int(who["pid"]), who["started"]
    except (ValueError, TypeError, KeyError):
        return False
    if host != socket.gethostname():
        return True
    if boot != _boot_id():
        return False
    if started:  # Linux: the same pid with another start time is another process
        return _process_start(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat, field 22), or ""."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as flat `a.b.c` MLflow params."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def run_exists(run_id: str) -> bool:
    """Whether `run_id` is a live run (not deleted) in the tracking store (a store that does not
    answer raises, for `unavailable` to report)."""
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow_client().tracking.MlflowClient().get_run(run_id)
    except MlflowException as error:
        if not is_gone(error):  # a server that did not answer, or refused: not a missing run
            raise
        return False
    return run.info.lifecycle_stage == "active"


def close_abandoned_run(run_id: str) -> str | None:
    """Mark a run a stopped training left RUNNING as KILLED, once its checkpoint is discarded,
    unless another process its owner tag names may still be training it. A run that is gone is
    left as it is; a store that does not answer too, and then the one line saying so is returned.

    One try, not MLflow's retries: this is housekeeping before training, whose run is opened (with
    the retries) right after, and a server refusing connections cost 15 s here for nothing."""
    from mlflow.exceptions import MlflowException

    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with unavailable(f"close the run {run_id} of the discarded checkpoint", "it stays RUNNING"):
            client = mlflow_client().tracking.MlflowClient()
            run = client.get_run(run_id)
            owner = run.data.tags.get(OWNER_TAG)
            # This process discarding the checkpoint is not training its run either.
            if run.info.status == "RUNNING" and (owner == process_owner() or not owner_may_be_running(owner)):
                client.set_terminated(run_id, status="KILLED")
    except TrackingUnavailable as error:
        return str(error)
    except MlflowException:
        pass
    finally:
        if retries is None:
            del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries
    return None


def reopen_run(run_id: str) -> None:
    """Mark a run that a killed stage left behind as running again, to be continued by this
    process (which the owner tag now names)."""
    client = mlflow_client().tracking.MlflowClient()
    client.set_tag(run_id, OWNER_TAG, process_owner())
    client.update_run(run_id, status="RUNNING")


# --------------------------------------------------------------------------------------------
# Provenance tags: which code and which data a run saw.


def git_commit(folder: Path = ROOT) -> tuple[str, bool] | None:
    """The commit checked out in `folder` and whether the work tree differs from it; None
    outside a git repository."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True,
            check=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, bool(status.strip())


def dvc_hash(path: Path) -> str:
    """The hash DVC gives `path` in dvc.lock (`<md5>.dir` for a folder), computed from the files
    themselves, so it is right whether or not dvc.lock has been written yet."""
    import tempfile

    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(LocalHashFileDB(fs, scratch), str(Path(path).resolve()), fs, "md5", dry_run=True)
    return str(obj.hash_info.value)


def provenance_tags(data_dir: Path) -> dict[str, str]:
    """Tags naming the code (git commit, and whether it had uncommitted changes), the DVC hash of
    the prepared data a run used and, under `dvc exp run`, the DVC experiment: its commit is the
    baseline's, with the params changed (git_dirty), so the name is what leads from a run in
    MLflow's UI to `dvc exp show`'s row."""
    tags = {"dvc.data_hash": dvc_hash(data_dir)}
    if os.environ.get("DVC_EXP_NAME"):  # set by DVC for the commands of an experiment it runs
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
        tags["dvc.experiment.baseline"] = os.environ.get("DVC_EXP_BASELINE_REV", "")
    commit = git_commit()
    if commit is not None:
        # mlflow.source.git.commit is the tag MLflow's UI shows as the run's source version.
        tags.update({"mlflow.source.git.commit": commit[0], "git_commit": commit[0], "git_dirty": str(commit[1]).lower()})
    return tags
