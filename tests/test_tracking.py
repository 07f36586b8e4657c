"""One run per experiment, and never by deleting a run that another live process is training.

`start_fresh_run` retires earlier runs with the same run key. Two processes can train the same
key at once (two queued DVC experiments retraining the same stale experiment): the second must
not delete the first one's run, or the first fails at its next log. A run left RUNNING by a
process that is gone (killed, its checkpoint lost) is retired as before.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stages import tracking
from stages.errors import UserError

pytest_plugins = ["mlflow_registry"]
REPO = Path(__file__).resolve().parents[1]

# A process that makes the run for key "k", says its id, waits for a line on stdin, then logs an
# epoch's metric into it and ends it (or, given "die", exits leaving it RUNNING).
TRAINER = textwrap.dedent(
    """
    import sys
    from mlflow.entities import Metric
    from stages import tracking
    run_id = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    print(run_id, flush=True)
    if sys.stdin.readline().strip() == "die":
        sys.exit(0)
    client = tracking.mlflow_client().tracking.MlflowClient()
    client.log_batch(run_id, metrics=[Metric("loss", 0.5, 0, 0)])
    client.set_terminated(run_id)
    print("logged", flush=True)
    """
)


def trainer() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRAINER], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def run_left_running() -> tuple[str, int]:
    """A run whose process made it and exited without ending it (as a killed train leaves it)."""
    dead = trainer()
    run_id = dead.stdout.readline().strip()
    dead.communicate("die\n", timeout=120)
    assert run_id, "the trainer made no run"
    return run_id, dead.pid


def exited_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def stage(registry: MlflowClient, run_id: str) -> str:
    return registry.get_run(run_id).info.lifecycle_stage


def test_a_run_another_live_process_trains_is_kept_and_it_goes_on_logging(registry: MlflowClient) -> None:
    first = trainer()
    first_run = first.stdout.readline().strip()
    assert first_run, first.stderr.read()

    second_run = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    out, err = first.communicate("go\n", timeout=120)

    assert first.returncode == 0 and out.strip() == "logged", err[-2000:]
    assert stage(registry, first_run) == "active"
    assert registry.get_run(first_run).data.metrics == {"loss": 0.5}
    assert registry.get_run(first_run).info.status == "FINISHED"
    assert stage(registry, second_run) == "active"
    owner = json.loads(registry.get_run(second_run).data.tags[tracking.OWNER_TAG])
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()

    # Sequential retraining still replaces: both earlier runs are retired once neither is live
    # (the finished one, and this process's own once its owner tag names a process that is gone).
    registry.set_tag(second_run, tracking.OWNER_TAG, json.dumps({**owner, "pid": exited_pid(), "started": "1"}))
    third_run = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    assert [stage(registry, run) for run in (first_run, second_run, third_run)] == ["deleted", "deleted", "active"]


def test_a_run_left_running_by_a_process_that_is_gone_is_retired(registry: MlflowClient) -> None:
    left_run, _ = run_left_running()
    assert registry.get_run(left_run).info.status == "RUNNING"

    fresh_run = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})

    assert [stage(registry, left_run), stage(registry, fresh_run)] == ["deleted", "active"]


def test_reopening_a_run_makes_this_process_its_owner(registry: MlflowClient) -> None:
    run_id, pid = run_left_running()
    assert json.loads(registry.get_run(run_id).data.tags[tracking.OWNER_TAG])["pid"] == pid

    tracking.reopen_run(run_id)

    assert registry.get_run(run_id).data.tags[tracking.OWNER_TAG] == tracking.process_owner()
    assert registry.get_run(run_id).info.status == "RUNNING"
    tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    assert stage(registry, run_id) == "active", "a live owner's run is kept"


def owner(**changes: object) -> str:
    return json.dumps({**json.loads(tracking.process_owner()), **changes})


@pytest.mark.parametrize(
    ("tag", "may_run"),
    [
        pytest.param(lambda: tracking.process_owner(), True, id="this process"),
        pytest.param(lambda: owner(host="another-host.example"), True, id="another host: cannot tell"),
        pytest.param(lambda: owner(started="1"), False, id="same pid, another start time: pid reused"),
        pytest.param(lambda: owner(boot="another-boot"), False, id="rebooted since"),
        pytest.param(lambda: None, False, id="no tag: a run from before the tag"),
        pytest.param(lambda: "not json", False, id="unreadable tag"),
        pytest.param(lambda: json.dumps({"host": socket.gethostname()}), False, id="tag missing fields"),
    ],
)
def test_whether_an_owner_may_be_running(tag, may_run: bool) -> None:
    assert tracking.owner_may_be_running(tag()) is may_run


def test_an_exited_process_is_not_running() -> None:
    pid = exited_pid()
    assert tracking._process_start(pid) == ""
    assert tracking.owner_may_be_running(owner(pid=pid, started="12345")) is False  # /proc/<pid> is gone
    assert tracking.owner_may_be_running(owner(pid=pid, started="")) is False  # no /proc: kill(pid, 0)
    assert tracking.owner_may_be_running(owner(started="")) is True  # kill(pid, 0) finds this process


def test_a_retired_run_whose_training_comes_back_is_restored_in_place_of_its_successor(registry: MlflowClient) -> None:
    """DVC's run cache brings back an earlier training's outputs (a reverted change): its run,
    retired by the retrain with the same key, is restored, and the retrain's run retired."""
    first = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    registry.set_terminated(first)
    second = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    registry.set_terminated(second)
    assert registry.get_run(first).info.lifecycle_stage == "deleted"

    assert tracking.revive_run(first) is True
    assert registry.get_run(first).info.lifecycle_stage == "active"
    assert registry.get_run(second).info.lifecycle_stage == "deleted"
    assert tracking.revive_run(first) is False  # live already: nothing to do
    assert tracking.revive_run("0" * 32) is False  # not in the store at all


# A stage's first step with MLflow, started in several processes at once on a database that does
# not exist yet: each imports MLflow, says so, waits for the file "go", then opens the store.
OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from stages import tracking
    print("ready", flush=True)
    while not Path(sys.argv[1]).exists():
        time.sleep(0.01)
    print(tracking.experiment_id("digits"), flush=True)
    """
)


def test_stages_starting_together_on_a_new_database_all_open_it(tmp_path: Path) -> None:
    """MLflow makes a new SQLite database's tables without a lock; two stages starting together
    (`matrix local`) both ran its migrations and the later one failed ("table evaluation_datasets
    already exists"). Each process now opens the store under a lock."""
    database, go = tmp_path / "mlflow.db", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{database}"}
    openers = [
        subprocess.Popen([sys.executable, "-c", OPENER, str(go)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for opener in openers:
        assert opener.stdout.readline().strip() == "ready", opener.communicate(timeout=60)[1][-2000:]
    go.touch()
    results = [opener.communicate(timeout=300) for opener in openers]

    for opener, (out, err) in zip(openers, results):
        assert opener.returncode == 0, err[-3000:]
    assert len({out.strip() for out, _ in results}) == 1, "all four found the same experiment"
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "digits"]


def test_a_database_in_a_folder_that_does_not_exist_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    with pytest.raises(UserError, match=f"database {missing} is in a folder that does not exist; create"):
        tracking.mlflow_client()
    assert not missing.parent.exists()


@pytest.mark.parametrize("uri", ["file:///tmp/somewhere/mlruns", "./mlruns", "mlruns"])
def test_a_folder_as_the_tracking_store_is_one_line(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3 refuses a file store with a paragraph-long exception, raised from deep inside the
    first call (a traceback from train, evaluate or report); before that, nothing said so."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError) as error:
        tracking.mlflow_client()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"MLFLOW_TRACKING_URI={uri}: a folder") and "sqlite:///" in message, message
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out is the user's to take
    tracking.check_not_a_folder(uri)


def test_a_run_made_by_dvc_exp_run_names_the_dvc_experiment(tmp_path: Path) -> None:
    """Under `dvc exp run` the run's commit is the baseline's (params changed: git_dirty), so
    nothing led from a run in MLflow's UI to its DVC experiment; DVC gives the stage commands the
    experiment's name, and the run's tags carry it. A plain `dvc repro` adds no such tag."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DVC_EXP_NAME", None)

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    (tmp_path / "data").mkdir()
    (tmp_path / "data/x.txt").write_text("x")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    script = ("import json, pathlib; from stages.tracking import provenance_tags; "
              "pathlib.Path('tags.json').write_text(json.dumps(provenance_tags(pathlib.Path('data'))))")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  tag:\n    cmd: python -c \"{script}\"\n    deps: [data]\n    params: [seed]\n    outs: [tags.json]\n")
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    (tmp_path / ".gitignore").write_text("/tags.json\n")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "base")
    base = run("git", "rev-parse", "HEAD").strip()

    run("dvc", "repro")
    assert "dvc.experiment" not in json.loads((tmp_path / "tags.json").read_text())
    run("dvc", "exp", "run", "-n", "seed-two", "-S", "seed=2")
    tags = json.loads((tmp_path / "tags.json").read_text())
    assert tags["dvc.experiment"] == "seed-two" and tags["dvc.experiment.baseline"] == base
def test_closing_an_abandoned_run_on_a_server_that_refuses_connections_tries_once_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A discarded checkpoint's run is closed before training starts. With the tracking server
    down, that housekeeping took MLflow's 5 tries (about 15 s) and then said nothing; the run was
    opened, with its own tries, right after. Now it is one try, and one line naming the run and
    the refusal; the retry setting is left as it was."""
    import urllib3.util.connection

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    attempts = []
    connect = urllib3.util.connection.create_connection

    def counted(address, *args, **kwargs):
        attempts.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counted)
    problem = tracking.close_abandoned_run("0123abcd")
    assert len(attempts) == 1, attempts
    assert problem is not None and len(problem.splitlines()) == 1
    assert f"127.0.0.1:{port}" in problem and "0123abcd" in problem and "Connection refused" in problem, problem
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


@pytest.mark.parametrize("key", ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                 "MLFLOW_HTTP_REQUEST_TIMEOUT"])
def test_a_retry_setting_mlflow_cannot_read_is_one_line(key: str, tmp_path: Path) -> None:
    """The README invites setting MLflow's retry variables; a backoff factor of 0.5 (urllib3
    takes fractions) was MLflow's `ValueError: Failed to convert '0.5'` traceback at the stage's
    first request to the server. Now one line naming the variable; in a real process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", key: "0.5", "PYTHONPATH": str(REPO)}
    (tmp_path / "a.png").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "stages.predict", "--dataset", "digits", "--run", "0" * 32, str(tmp_path / "a.png")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(f"error: {key}='0.5': MLflow takes a whole number here"), done.stderr


def test_the_readme_gives_the_retry_settings_a_hung_server_waits_for() -> None:
    """The README said "5 tries over about 15 s", true of a refused connection only: a server that
    takes the connection and never answers is waited for MLFLOW_HTTP_REQUEST_TIMEOUT each try."""
    readme = " ".join((REPO / "README.md").read_text().split())
    tries = int(tracking.HTTP_RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
    timeout = int(tracking.HTTP_RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    assert f"here {tries} tries over about 15 s when the connection is refused" in readme
    assert f"`MLFLOW_HTTP_REQUEST_TIMEOUT`, {timeout} s, each try, so about {tries * timeout // 60} minutes" in readme
