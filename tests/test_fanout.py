"""The CI fan-out end to end, on the demo, against an S3-compatible DVC remote on 127.0.0.1.

moto's S3 server stands in for the team's bucket; the real DVC client (with dvc-s3) pushes and
pulls. Every job is a fresh git clone, as on a CI runner: a prepare job, one training job per
experiment, and a report job that gathers their bundles. Then a fresh clone pulls and `dvc repro`
runs nothing, and a params change retrains only what it affects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import S3_BUCKET, S3_KEYS
from test_pipeline import copy_repository, run, shorten_demo, stages_run

pytestmark = pytest.mark.slow
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def matrix(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "stages.matrix", *args], cwd, env)


def clone(origin: Path, folder: Path, env: dict[str, str]) -> Path:
    run(["git", "clone", "-q", str(origin), str(folder)], origin.parent, env)
    return folder


def test_jobs_share_one_remote_and_a_fresh_clone_reproduces_nothing(endpoint: str, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    env = copy_repository(origin)
    env.update(
        **S3_KEYS,
        # The team's shared tracking store (a server in real life): every job logs to it.
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'shared-mlflow.db'}",
        # As on a runner: `plan` checks the remote and the repository variables, `run` the remote.
        GITHUB_ACTIONS="true", GPU_RUNNER_LABELS='["ubuntu-24.04"]',
    )
    run(["dvc", "remote", "add", "-d", "shared", f"s3://{S3_BUCKET}/dvc"], origin, env)
    run(["dvc", "remote", "modify", "shared", "endpointurl", endpoint], origin, env)
    # The jobs' hand-offs are tested, not the models (the change below asks for 3 epochs).
    shorten_demo(origin, small_cnn=4, mobilenetv2=2)
    run([*GIT, "commit", "-qam", "the shared remote"], origin, env)

    jobs = json.loads(matrix("plan", "--suite", "demo", cwd=origin, env=env).stdout)
    bundles = tmp_path / "bundles"
    for job in jobs["prepare"]["include"]:
        workspace = clone(origin, tmp_path / f"prepare-{job['name']}", env)
        matrix("run", *job["targets"].split(), "--bundle", str(bundles / f"prepare-{job['name']}"), cwd=workspace, env=env)
    prepared = sorted(str(p) for p in bundles.glob("prepare-*"))
    for index, job in enumerate(jobs["train"]["include"]):
        workspace = clone(origin, tmp_path / f"train-{index}", env)
        matrix("gather", *prepared, cwd=workspace, env=env)
        ran = matrix("run", *job["targets"].split(), "--bundle", str(bundles / f"train-{index}"), cwd=workspace, env=env)
        # The data came from the remote: this job fetched and split nothing.
        assert not {"fetch@digits", "validate@digits", "split@digits"} & set(stages_run(ran.stdout)), ran.stdout[-3000:]
        assert f"train@{job['experiments']}" in stages_run(ran.stdout)

    final = clone(origin, tmp_path / "report", env)
    gathered = matrix("gather", *sorted(str(p) for p in bundles.iterdir()), "--suite", "demo", cwd=final, env=env)
    assert stages_run(gathered.stdout) == ["report@demo"]
    board = (final / "reports/leaderboard/demo.md").read_text()
    assert "| digits | small_cnn |" in board and "| digits | mobilenetv2 |" in board
    summary = matrix("summary", "--base", "HEAD", cwd=final, env=env).stdout
    assert "### Metrics against `HEAD`" in summary and "accuracy" in summary
    # What the report job proposes as a pull request: dvc.lock and the reports git tracks.
    run([*GIT, "add", "-A", "dvc.lock", "reports"], final, env)
    run([*GIT, "commit", "-qm", "retrain demo"], final, env)
    run(["git", "pull", "-q", str(final), "HEAD"], origin, env)

    # The next run's plan job, on a runner with no data: dvc.lock says nothing would run.
    planner = clone(origin, tmp_path / "planner", env)
    planned = matrix("plan", "--suite", "demo", "--changed", cwd=planner, env=env)
    assert json.loads(planned.stdout)["counts"] == {"prepare": 0, "train": 0, "report": 0}
    assert planned.stderr.splitlines()[0] == "matrix plan: 0 of 2 experiments to run", planned.stderr

    fresh = clone(origin, tmp_path / "fresh", env)
    run(["dvc", "pull", "--with-deps", "report@demo"], fresh, env)
    again = run(["dvc", "repro", "report@demo"], fresh, env)
    assert stages_run(again.stdout) == [], again.stdout[-3000:]

    params = yaml.safe_load((fresh / "params.yaml").read_text())
    params["experiments"]["digits-small_cnn"]["train"]["epochs"] = 3
    for workspace in (fresh, planner):
        (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    replanned = matrix("plan", "--suite", "demo", "--changed", cwd=planner, env=env)
    jobs = json.loads(replanned.stdout)
    assert [job["targets"] for job in jobs["train"]["include"]] == ["evaluate@digits-small_cnn"]
    assert jobs["counts"] == {"prepare": 0, "train": 1, "report": 1}
    assert replanned.stderr.splitlines()[:2] == [
        "matrix plan: 1 of 2 experiments to run", "  digits-small_cnn (from weights@digits-small_cnn) params.yaml: experiments.digits-small_cnn modified"
    ], replanned.stderr
    changed = run(["dvc", "repro", "report@demo"], fresh, env)
    assert sorted(stages_run(changed.stdout)) == [
        "evaluate@digits-small_cnn", "report@demo", "train@digits-small_cnn", "weights@digits-small_cnn"
    ]


def test_two_experiments_at_once_on_one_machine_are_both_recorded(tmp_path: Path) -> None:
    """`matrix local --jobs 2`: both demo experiments train at the same time (as they would on
    two GPUs), sharing the workspace, dvc.lock and the default SQLite tracking store."""
    import mlflow

    env = copy_repository(tmp_path)
    ran = matrix("local", "--suite", "demo", "--jobs", "2", cwd=tmp_path, env=env)
    for name in ("digits-small_cnn", "digits-mobilenetv2"):
        assert f"[{name}] Running stage 'train@{name}'" in ran.stdout, ran.stdout[-3000:]
        assert f"matrix: {name} finished" in ran.stdout
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert {"train@digits-small_cnn", "evaluate@digits-small_cnn", "train@digits-mobilenetv2",
            "evaluate@digits-mobilenetv2", "report@demo"} <= set(lock)
    status = run(["dvc", "status", "--json", "report@demo"], tmp_path, env)
    assert json.loads(status.stdout) == {}, status.stdout

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["mobilenetv2", "small_cnn"]
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in runs)
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    # The second started while the first was still running: they overlapped.
    assert second.info.start_time < first.info.end_time
    assert len(client.search_model_versions("name = 'digits'")) == 2
    board = (tmp_path / "reports/leaderboard/demo.md").read_text()
    assert "| digits | small_cnn |" in board and "| digits | mobilenetv2 |" in board


def test_two_bare_dvc_repro_at_once_the_second_is_refused_cleanly_or_runs_with_single_item(tmp_path: Path) -> None:
    """Two shells, two experiments, plain `dvc repro`: while the first trains, the second is
    refused at once by DVC, naming the shared split that the first is reading and the first's
    PID. It has changed nothing. The same experiment asked with `--single-item` (what
    `matrix local` runs) trains beside the first; both end recorded in dvc.lock and MLflow."""
    import time

    import mlflow

    env = copy_repository(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["experiments"]["digits-small_cnn"]["train"]["epochs"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "split@digits", "weights@digits-small_cnn"], tmp_path, env)

    first = subprocess.Popen(
        ["dvc", "repro", "evaluate@digits-mobilenetv2"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # Wait until the first is inside train@: DVC's rwlock then holds its model for writing
        # (and the shared split for reading) until training ends. Before that, a second repro
        # can slip past the split between two of the first's stages, and both simply run.
        model = str((tmp_path / "models/digits/mobilenetv2/model.keras").resolve())
        rwlock = tmp_path / ".dvc/tmp/rwlock"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            try:
                held = json.loads(rwlock.read_text())
            except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
                held = {}
            if held.get("write", {}).get(model, {}).get("pid") == first.pid:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the first repro never started training: {first.communicate()[0][-3000:]}")

        bare = subprocess.run(
            ["dvc", "repro", "evaluate@digits-small_cnn"], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600,
        )
        assert first.poll() is None, "the first repro ended before the second was refused"
        assert bare.returncode != 0
        refusal = bare.stdout + bare.stderr
        assert "failed to reproduce 'split@digits'" in refusal, refusal[-3000:]
        assert "data/processed/digits' is busy" in refusal
        assert f"(PID {first.pid})" in refusal
        assert "Running stage" not in refusal and not (tmp_path / "models/digits/small_cnn").exists()

        beside = run(
            ["dvc", "--wait-for-lock", "repro", "--single-item", "train@digits-small_cnn", "evaluate@digits-small_cnn"],
            tmp_path, env,
        )
        assert stages_run(beside.stdout) == ["train@digits-small_cnn", "evaluate@digits-small_cnn"]
        output, _ = first.communicate(timeout=1500)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output[-3000:]
    assert "train@digits-mobilenetv2" in " ".join(stages_run(output))

    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert {"train@digits-small_cnn", "evaluate@digits-small_cnn", "train@digits-mobilenetv2",
            "evaluate@digits-mobilenetv2"} <= set(lock)
    status = json.loads(run(["dvc", "status", "--json", "--with-deps", "evaluate@digits-small_cnn", "evaluate@digits-mobilenetv2"],
                            tmp_path, env).stdout)
    assert status == {}, status
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["mobilenetv2", "small_cnn"]
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in runs)
