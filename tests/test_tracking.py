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


def test_a_run_another_live_process_trains_is_kept_and_it_goes_on_logging(registry: MlflowClient) -> None:
    first = trainer()
    first_run = first.stdout.readline().strip()
    assert first_run, first.stderr.read()

    second_run = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    out, err = first.communicate("go\n", timeout=120)

    assert first.returncode == 0 and out.strip() == "logged", err[-2000:]
    assert registry.get_run(first_run).info.lifecycle_stage == "active"
    assert registry.get_run(first_run).data.metrics == {"loss": 0.5}
    assert registry.get_run(first_run).info.status == "FINISHED"
    assert registry.get_run(second_run).info.lifecycle_stage == "active"
    owner = json.loads(registry.get_run(second_run).data.tags[tracking.OWNER_TAG])
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()

    # Sequential retraining still replaces: both earlier runs are retired once neither is live
    # (the finished one, and this process's own once its owner tag names a process that is gone).
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    registry.set_tag(second_run, tracking.OWNER_TAG, json.dumps({**owner, "pid": int(gone.stdout), "started": "1"}))
    third_run = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    assert registry.get_run(first_run).info.lifecycle_stage == "deleted"
    assert registry.get_run(second_run).info.lifecycle_stage == "deleted"
    assert registry.get_run(third_run).info.lifecycle_stage == "active"


def test_a_run_left_running_by_a_process_that_is_gone_is_retired(registry: MlflowClient) -> None:
    dead = trainer()
    left_run = dead.stdout.readline().strip()
    dead.communicate("die\n", timeout=120)
    assert registry.get_run(left_run).info.status == "RUNNING"

    fresh_run = tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})

    assert registry.get_run(left_run).info.lifecycle_stage == "deleted"
    assert registry.get_run(fresh_run).info.lifecycle_stage == "active"


def test_reopening_a_run_makes_this_process_its_owner(registry: MlflowClient) -> None:
    dead = trainer()
    run_id = dead.stdout.readline().strip()
    dead.communicate("die\n", timeout=120)
    assert json.loads(registry.get_run(run_id).data.tags[tracking.OWNER_TAG])["pid"] == dead.pid

    tracking.reopen_run(run_id)

    assert registry.get_run(run_id).data.tags[tracking.OWNER_TAG] == tracking.process_owner()
    assert registry.get_run(run_id).info.status == "RUNNING"
    tracking.start_fresh_run("digits", run_name="bb", run_key="k", tags={})
    assert registry.get_run(run_id).info.lifecycle_stage == "active", "a live owner's run is kept"


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
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(child.stdout)
    assert tracking._process_start(pid) == ""
    assert tracking.owner_may_be_running(owner(pid=pid, started="12345")) is False  # /proc/<pid> is gone
    assert tracking.owner_may_be_running(owner(pid=pid, started="")) is False  # no /proc: kill(pid, 0)
    assert tracking.owner_may_be_running(owner(started="")) is True  # kill(pid, 0) finds this process
