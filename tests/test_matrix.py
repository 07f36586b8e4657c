"""stages.matrix: the CI job matrix from params.yaml, bundles of dvc.lock entries, and the diff summary.

These run without training: plans from the real params.yaml, lock merging on hand-made bundles,
and `summary` in a small git + DVC repository. The end-to-end fan-out against an S3 remote is in
the pipeline tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import S3_BUCKET, S3_KEYS

from stages import matrix
from stages.errors import UserError
from stages.matrix import gather, merge_locks, plan, run_pool, summary

REPO = Path(__file__).resolve().parents[1]
PARAMS = str(REPO / "params.yaml")


def test_plan_prepares_each_dataset_once_and_trains_each_experiment() -> None:
    """The demo: one prepare job for digits, one training job per experiment, then the report."""
    jobs = plan(PARAMS, "demo", [], per_job=1)
    assert jobs["prepare"] == {"include": [{"name": "digits", "targets": "split@digits"}]}
    assert [job["targets"] for job in jobs["train"]["include"]] == [
        "evaluate@digits-small_cnn", "evaluate@digits-mobilenetv2"
    ]
    assert jobs["report"] == "report@demo"
    json.dumps(jobs)  # what GitHub's fromJSON reads


def test_plan_groups_by_dataset_and_filters_by_pattern() -> None:
    """--per-job groups experiments of one dataset (never two datasets in a job); patterns select."""
    jobs = plan(PARAMS, "course", ["ham10000-efn_b*"], per_job=3)
    assert [job["name"] for job in jobs["prepare"]["include"]] == ["ham10000"]
    groups = [job["experiments"].split() for job in jobs["train"]["include"]]
    assert [len(group) for group in groups] == [3, 3, 2]
    assert sorted(sum(groups, [])) == [f"ham10000-efn_b{i}" for i in range(8)]
    mixed = plan(PARAMS, "course", ["ham10000-vgg16", "food11-*"], per_job=10)
    datasets = {job["experiments"].split()[0].split("-")[0] for job in mixed["train"]["include"]}
    assert datasets == {"ham10000", "food11"} and len(mixed["train"]["include"]) == 2


def test_plan_errors_name_what_to_fix() -> None:
    with pytest.raises(UserError, match=r"no experiment of suite 'demo' matches 'nope\*'; the suite has: digits-small_cnn"):
        plan(PARAMS, "demo", ["nope*"], per_job=1)
    with pytest.raises(UserError, match="per-job"):
        plan(PARAMS, "demo", [], per_job=0)


def test_plan_command_writes_github_outputs(tmp_path: Path) -> None:
    """`plan` prints the JSON and appends prepare/train/report to $GITHUB_OUTPUT."""
    output = tmp_path / "github_output"
    result = subprocess.run(
        [sys.executable, "-m", "stages.matrix", "plan", "--suite", "demo"],
        cwd=REPO, env={**_env(), "GITHUB_OUTPUT": str(output), "GITHUB_ACTIONS": ""}, capture_output=True, text=True,
        check=True,
    )
    assert json.loads(result.stdout)["suite"] == "demo"
    lines = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert json.loads(lines["train"])["include"][0]["targets"] == "evaluate@digits-small_cnn"
    assert lines["report"] == "report@demo"


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _lock(**stages: dict) -> dict:
    return {"schema": "2.0", "stages": stages}


def test_merge_lays_bundles_over_the_base_and_stops_on_a_conflict() -> None:
    split = {"cmd": "split", "outs": [{"path": "p", "md5": "a"}]}
    base = _lock(**{"split@digits": split, "train@digits-x": {"cmd": "old", "deps": [{"path": "p", "md5": "a"}]}})
    one = _lock(**{"split@digits": split, "train@digits-x": {"cmd": "new"}})
    two = _lock(**{"split@digits": split, "train@digits-y": {"cmd": "y", "deps": [{"path": "p", "md5": "a"}]}})
    merged = merge_locks(base, [("one", one), ("two", two)])
    assert merged["stages"]["train@digits-x"] == {"cmd": "new"}  # the job's record replaces the base's
    assert set(merged["stages"]) == {"split@digits", "train@digits-x", "train@digits-y"}
    assert base["stages"]["train@digits-x"]["cmd"] == "old"  # the base is not modified
    # Split's output, which training depends on, made differently by two jobs.
    clash = _lock(**{"split@digits": {"cmd": "split", "outs": [{"path": "p", "md5": "b"}]}})
    with pytest.raises(UserError, match="split@digits is recorded differently by one and clash"):
        merge_locks(base, [("one", one), ("clash", clash)])


def test_outputs_nothing_depends_on_may_differ_between_two_jobs_that_ran_a_stage() -> None:
    """A dataset whose prepare job failed is prepared again by each of its train jobs: their
    validate@ entries differ in the Data Docs (GX writes run times into them), which no stage
    depends on. Before, gather stopped the report job there ("from different inputs", which
    they were not), and no partial pull request was made. An output a stage depends on (the
    manifest) must still agree."""
    manifest = "data/interim/digits/manifest.parquet"

    def job(docs: str, table: str) -> dict:
        return _lock(**{
            "validate@digits": {"cmd": "validate", "deps": [{"path": "data/raw/digits", "md5": "r"}],
                                "outs": [{"path": manifest, "md5": table}, {"path": "reports/validation/digits/docs", "md5": docs}]},
            "split@digits": {"cmd": "split", "deps": [{"path": manifest, "md5": table}], "outs": [{"path": "p", "md5": "s"}]},
        })

    merged = merge_locks(_lock(), [("one", job("d1", "m")), ("two", job("d2", "m"))])
    assert merged["stages"]["validate@digits"]["outs"][1]["md5"] == "d1"  # the first job's, whose files it pushed
    with pytest.raises(UserError) as error:
        merge_locks(_lock(), [("one", job("d1", "m")), ("two", job("d1", "m2"))])
    assert str(error.value) == ("validate@digits is recorded differently by one and two: the same inputs made other "
                                f"outputs ({manifest}); rerun the matrix from one commit")


def test_gather_merges_locks_and_restores_uncached_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("dvc.lock").write_text(yaml.safe_dump(_lock(**{"split@digits": {"cmd": "split"}})))
    for name, stage in (("a", "evaluate@digits-a"), ("b", "evaluate@digits-b")):
        bundle = tmp_path / "bundles" / name
        (bundle / "files/reports/metrics/demo/digits").mkdir(parents=True)
        (bundle / "files/reports/metrics/demo/digits" / f"{name}.json").write_text(json.dumps({"accuracy": 0.9}))
        (bundle / "dvc.lock").write_text(yaml.safe_dump(_lock(**{stage: {"cmd": name}})))
    merged = gather([tmp_path / "bundles/a", tmp_path / "bundles/b"])
    assert merged == ["evaluate@digits-a", "evaluate@digits-b"]
    lock = yaml.safe_load(Path("dvc.lock").read_text())
    assert set(lock["stages"]) == {"split@digits", "evaluate@digits-a", "evaluate@digits-b"}
    assert json.loads(Path("reports/metrics/demo/digits/b.json").read_text()) == {"accuracy": 0.9}
    with pytest.raises(UserError, match="not a bundle"):
        gather([tmp_path / "bundles"])


def test_gather_of_no_bundles_leaves_the_workspace_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run where no dataset needed preparing (train jobs) or nothing trained (the report job):
    the workflow's `bundles/*` expands to nothing, and gather changes nothing, dvc.lock included."""
    monkeypatch.chdir(tmp_path)
    assert gather([]) == []
    assert not (tmp_path / "dvc.lock").exists()
    done = subprocess.run([sys.executable, "-m", "stages.matrix", "gather"], cwd=tmp_path, capture_output=True, text=True,
                          env={**_env(), "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "matrix: 0 stages from 0 bundles merged into dvc.lock"
    assert list(tmp_path.iterdir()) == []


def test_a_dvc_lock_that_is_not_yaml_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dvc.lock a git merge left conflict markers in (two retrain pull requests both change it),
    or a bundle's that is not YAML: `plan --changed` and `gather` stop in one line naming the file,
    and dvc.lock is left as it was. Both were DVC's YAMLFileCorruptedError traceback."""
    dvc_repository(tmp_path)
    monkeypatch.chdir(tmp_path)
    conflicted = "schema: '2.0'\nstages:\n<<<<<<< HEAD\n  split@digits:\n    cmd: a\n=======\n  split@digits:\n    cmd: b\n>>>>>>> retrain\n"
    (tmp_path / "bundles/a").mkdir(parents=True)
    (tmp_path / "bundles/a/dvc.lock").write_text(yaml.safe_dump(_lock(**{"evaluate@digits-a": {"cmd": "a"}})))
    Path("dvc.lock").write_text(conflicted)
    with pytest.raises(UserError, match=r"^dvc.lock: not valid YAML \(.*\); resolve it \(a git merge may have left conflict markers in it\)"):
        gather([tmp_path / "bundles/a"])
    assert Path("dvc.lock").read_text() == conflicted
    with pytest.raises(UserError, match=r"^dvc.lock: not valid YAML"):
        matrix.stale_stages(["evaluate@digits-a"])
    Path("dvc.lock").write_text(yaml.safe_dump(_lock()))
    (tmp_path / "bundles/a/dvc.lock").write_text("stages: [\n")
    with pytest.raises(UserError, match=r"^bundles/a/dvc.lock: not valid YAML"):
        gather([Path("bundles/a")])
    (tmp_path / "bundles/a/dvc.lock").write_text("- a list\n")
    with pytest.raises(UserError, match=r"^bundles/a/dvc.lock: not a dvc.lock file"):
        gather([Path("bundles/a")])


def test_gather_keeps_lock_values_as_dvc_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A param DVC recorded as `off` (a string to DVC's YAML 1.2) stays `off` through a merge:
    rewritten as `false` (YAML 1.1), DVC would see a changed param and retrain."""
    monkeypatch.chdir(tmp_path)
    recorded = "schema: '2.0'\nstages:\n  train@digits-a:\n    cmd: train\n    params:\n      params.yaml:\n" \
               "        training:\n          distribution: off\n          mixed_precision: auto\n"
    (tmp_path / "bundles/a").mkdir(parents=True)
    (tmp_path / "bundles/a/dvc.lock").write_text(recorded)
    gather([tmp_path / "bundles/a"])
    text = Path("dvc.lock").read_text()
    assert "distribution: off" in text and "false" not in text
    from dvc.utils.serialize import parse_yaml

    assert parse_yaml(text, "dvc.lock")["stages"]["train@digits-a"]["params"]["params.yaml"]["training"]["distribution"] == "off"


def summary_project(tmp_path: Path) -> dict[str, str]:
    """A git + DVC repository with one param and one metric, committed; the environment to run DVC in."""
    env = _env()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=env, check=True)
    (tmp_path / "params.yaml").write_text("training:\n  epochs: 5\n")
    (tmp_path / "metrics.json").write_text('{"accuracy": 0.9}')
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: 'true'\n    params: [training.epochs]\n    metrics:\n      - metrics.json:\n          cache: false\n"
    )
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=tmp_path, check=True)
    return env


def test_summary_reports_params_and_metrics_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`summary --base HEAD` in a git + DVC repository: the changed param and metric, as Markdown."""
    env = summary_project(tmp_path)
    (tmp_path / "params.yaml").write_text("training:\n  epochs: 8\n")
    (tmp_path / "metrics.json").write_text('{"accuracy": 0.95}')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    text = summary("HEAD")
    assert "### Params against `HEAD`" in text and "### Metrics against `HEAD`" in text
    params_part, metrics_part = text.split("### Metrics")
    assert "training.epochs" in params_part and "| 5 " in params_part and "| 8 " in params_part
    assert "accuracy" in metrics_part and "0.95" in metrics_part
    # A base git does not know: DVC's last line, as it is (before: a Python list around it).
    with pytest.raises(UserError) as error:
        summary("nonexist")
    assert str(error.value) == "`dvc params diff nonexist --md` failed: ERROR: unknown Git revision 'nonexist'", error.value


def test_summary_says_no_params_changed_rather_than_an_empty_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retrain that changed only metrics (a code change, the weekly run): `dvc params diff --md`
    prints a table header with no rows, and the summary (a pull request's body) showed that empty
    table instead of its "No params changed." line."""
    env = summary_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    assert summary("HEAD") == "### Params against `HEAD`\n\nNo params changed.\n\n### Metrics against `HEAD`\n\nNo metrics changed.\n"
    (tmp_path / "metrics.json").write_text('{"accuracy": 0.95}')
    params_part, metrics_part = summary("HEAD").split("### Metrics")
    assert params_part == "### Params against `HEAD`\n\nNo params changed.\n\n"
    assert "0.95" in metrics_part

ON_ONE_GPU = """
import os, sys, time
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
busy = os.path.join(sys.argv[1], f"busy-{gpu}")
try:
    os.close(os.open(busy, os.O_CREAT | os.O_EXCL))   # fails if another job holds this GPU
except FileExistsError:
    print(f"GPU {gpu} was already in use"); sys.exit(3)
time.sleep(0.3)
os.remove(busy)
with open(os.path.join(sys.argv[1], "ran.txt"), "a") as log:
    log.write(f"{sys.argv[2]} {gpu}\\n")
print(f"trained on GPU {gpu}")
sys.exit(5 if sys.argv[2] == "broken" else 0)
"""


def test_pool_pins_each_job_to_a_free_gpu_and_reports_each_exit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = ["a", "b", "c", "broken", "e"]
    jobs = [(name, [sys.executable, "-c", ON_ONE_GPU, str(tmp_path), name]) for name in names]
    results = run_pool(jobs, ["0", "1"])
    assert results == {"a": 0, "b": 0, "c": 0, "broken": 5, "e": 0}  # no job found its GPU busy (3)
    ran = dict(line.split() for line in (tmp_path / "ran.txt").read_text().splitlines())
    assert sorted(ran) == sorted(names) and set(ran.values()) == {"0", "1"}
    out = capsys.readouterr().out
    assert f"[c] trained on GPU {ran['c']}" in out
    assert "matrix: broken failed (exit status 5)" in out
    with pytest.raises(UserError, match="--gpus 0,1"):
        run_pool(jobs, [])


def test_a_queued_experiment_copy_logs_to_the_repository_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --queue` runs in <repo>/.dvc/tmp/exps/<tmp>/, deleted afterwards: the default
    tracking URI still names <repo>/mlflow.db."""
    from stages import tracking

    repo = Path("/srv/classmatrix")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "ROOT", repo / ".dvc" / "tmp" / "exps" / "tmpk2x9_1ab")
    assert tracking.tracking_uri() == "sqlite:////srv/classmatrix/mlflow.db"
    monkeypatch.setattr(tracking, "ROOT", repo)
    assert tracking.tracking_uri() == "sqlite:////srv/classmatrix/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.tracking_uri() == "http://mlflow.internal:5000"
    # A relative SQLite URI names a file in the copy, which DVC deletes with the runs in it: in a
    # copy it is the repository's file of that name (before: the copy's).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    assert tracking.tracking_uri() == "sqlite:///runs/mlflow.db"
    monkeypatch.setattr(tracking, "ROOT", repo / ".dvc" / "tmp" / "exps" / "tmpk2x9_1ab")
    assert tracking.tracking_uri() == "sqlite:////srv/classmatrix/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/mlflow.db")
    assert tracking.tracking_uri() == "sqlite:////data/mlflow.db"


def dvc_repository(folder: Path) -> dict[str, str]:
    """`folder` made a git and DVC repository; the environment that finds this venv's dvc."""
    import os

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=folder, check=True, env=env)
    return env


def test_in_ci_plan_stops_in_one_line_on_the_settings_the_jobs_need(tmp_path: Path) -> None:
    """On a runner, `plan` checks what every later job needs (a DVC remote, the shared MLflow URI,
    the training runners' labels), so a repository without them fails in one job: not in fifty,
    with GPU jobs queued for a day on a label no runner has, or runs logged to throwaway databases."""
    setup = dvc_repository(tmp_path)
    # As the workflow runs it: .venv/bin/python, with .venv/bin not on PATH (dvc is found beside it).
    env = {**setup, "PATH": "/usr/bin:/bin", "GITHUB_ACTIONS": "true", "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": "", "GPU_RUNNER_LABELS": ""}
    command = [sys.executable, "-m", "stages.matrix", "plan", "--suite", "demo", "--params", PARAMS]
    # A remote added without -d: `dvc pull` and `dvc push` use none ("No remote provided", exit 0).
    subprocess.run(["dvc", "remote", "add", "shared", str(tmp_path / "remote")], cwd=tmp_path, env=setup, check=True)

    bare = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert bare.returncode == 1 and bare.stdout == ""
    [line] = bare.stderr.strip().splitlines()
    assert line.startswith("error: matrix plan: this repository lacks what the retrain jobs need: a default DVC remote, ")
    assert "; the repository variable MLFLOW_TRACKING_URI (the shared MLflow server's URL" in line
    assert '; the repository variable GPU_RUNNER_LABELS: the training jobs\' runner labels as JSON, e.g. ["self-hosted", "gpu"]' in line

    subprocess.run(["dvc", "remote", "default", "shared"], cwd=tmp_path, env=setup, check=True)
    env.update(MLFLOW_TRACKING_URI="http://mlflow.internal:5000")
    for wrong in ("gpu", "[]", '[""]'):
        env.update(GPU_RUNNER_LABELS=wrong)
        labels = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

        assert labels.returncode == 1
        assert labels.stderr.strip() == (
            "error: matrix plan: this repository lacks what the retrain jobs need: the repository variable "
            f"GPU_RUNNER_LABELS (it is {wrong!r}, not a JSON list of runner labels): the training jobs' runner labels "
            'as JSON, e.g. ["self-hosted", "gpu"], or ["ubuntu-24.04"] to train on GitHub\'s CPU runners'
        )

    env.update(GPU_RUNNER_LABELS='["self-hosted", "gpu"]')
    ready = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert ready.returncode == 0, ready.stderr
    assert json.loads(ready.stdout)["suite"] == "demo"


def test_run_without_a_dvc_remote_says_it_pulls_and_pushes_nothing(tmp_path: Path) -> None:
    """`matrix run` in a repository with no DVC remote (a laptop) makes the targets and says in one
    line that nothing was pulled or pushed; it used to skip both without a word."""
    env = dvc_repository(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello > out.txt\n    outs: [out.txt]\n")

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", "hello"], cwd=tmp_path, env={
        **env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ("matrix: no default DVC remote (dvc remote add -d ...): nothing is pulled or pushed; "
                                          "the targets are made here")
    assert "$ dvc repro --keep-going hello" in done.stdout and "$ dvc push" not in done.stdout and "$ dvc pull" not in done.stdout
    assert (tmp_path / "out.txt").read_text().strip() == "hello"


@pytest.mark.parametrize("added", [False, True], ids=["none", "added without -d"])
def test_in_ci_run_without_a_dvc_remote_is_one_line(added: bool, tmp_path: Path) -> None:
    """On a CI runner (GITHUB_ACTIONS=true) the jobs share outputs through the remote: without one,
    `run` stops at once, saying what to add, before anything is made. A remote added without -d
    is none: `dvc pull` said "No remote provided", exited 0, and the job trained everything."""
    env = dvc_repository(tmp_path)
    if added:
        subprocess.run(["dvc", "remote", "add", "shared", str(tmp_path / "remote")], cwd=tmp_path, env=env, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello > out.txt\n    outs: [out.txt]\n")

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", "hello"], cwd=tmp_path, env={
        **env, "GITHUB_ACTIONS": "true", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True, text=True, timeout=300)

    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: matrix run: no default DVC remote, which CI's jobs share their outputs through; "
        "dvc remote add -d storage s3://<bucket>/classmatrix (or dvc remote default <name>) and commit .dvc/config"
    ]
    assert not (tmp_path / "out.txt").exists()


def test_inputs_added_with_dvc_add_are_pulled_with_the_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset downloaded by hand (`dvc add data/external/Food-11.zip`, the .dvc file committed)
    is no stage's output, so `dvc pull --with-deps <stage>` would leave it behind on a runner:
    `run` names the tracked .dvc files in its pull."""
    from stages.matrix import tracked_inputs

    env = dvc_repository(tmp_path)
    (tmp_path / "data" / "external").mkdir(parents=True)
    (tmp_path / "data" / "external" / "Food-11.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    subprocess.run(["dvc", "add", "-q", "data/external/Food-11.zip"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["git", "add", "data/external/Food-11.zip.dvc"], cwd=tmp_path, check=True, env=env)
    monkeypatch.chdir(tmp_path)

    assert tracked_inputs() == ["data/external/Food-11.zip.dvc"]


STALE_PIPELINE = """\
stages:
  prepare:
    cmd: grep "^n:" params.yaml > prepared.txt
    params: [n]
    outs: [prepared.txt]
  train:
    foreach: [a, b]
    do:
      cmd: test ! -e fail-${item} && (cat prepared.txt code.txt; echo ${item}) > model-${item}.txt && printf '{"%s":%s}' ${item} $(wc -c < model-${item}.txt) > metrics-${item}.json
      deps: [prepared.txt, code.txt]
      params:
        - lr.${item}
      outs:
        - model-${item}.txt
      metrics:
        # Not cached by DVC: in git, as the pipeline's metrics are.
        - metrics-${item}.json:
            cache: false
"""


def stale_origin(tmp_path: Path, ran: bool, s3: str | None = None, pipeline: str = STALE_PIPELINE) -> tuple[Path, dict[str, str]]:
    """STALE_PIPELINE (or `pipeline`) committed in tmp_path/origin, with a DVC remote in tmp_path/remote (or in
    the bucket of the S3 endpoint `s3`); with `ran`, reproduced and pushed first (dvc.lock and the
    metrics committed). Returns the origin and the environment, which finds this venv's dvc and
    this checkout's stages."""
    origin = tmp_path / "origin"
    origin.mkdir()
    env = {**dvc_repository(origin), "PYTHONPATH": str(REPO), **S3_KEYS}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    (origin / "dvc.yaml").write_text(pipeline)
    (origin / "params.yaml").write_text("n: 1\nlr: {a: 0.1, b: 0.2}\n")
    (origin / "code.txt").write_text("code 1\n")
    steps = [["dvc", "repro", "-q"], ["dvc", "push", "-q"]] if ran else []
    remote = [["dvc", "remote", "add", "-q", "-d", "shared", f"s3://{S3_BUCKET}/{tmp_path.name}"],
              ["dvc", "remote", "modify", "shared", "endpointurl", s3]] if s3 else [
              ["dvc", "remote", "add", "-q", "-d", "shared", str(tmp_path / "remote")]]
    for command in (*remote, *steps,
                    ["git", "add", "-A"], [*git, "commit", "-qm", "pipeline"]):
        subprocess.run(command, cwd=origin, env=env, check=True)
    return origin, env


def test_stale_stages_are_found_without_the_data_from_dvc_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan --changed` keeps what `dvc repro` would run, judged where the data is not (a CI
    runner's plan job): from dvc.lock, the params and the files git has. Each case is then checked
    against what the real `dvc repro` runs in the same clone once it has pulled the data."""
    from stages.matrix import stale_stages

    origin, env = stale_origin(tmp_path, ran=True)
    targets = ["train@a", "train@b"]

    def runner(name: str) -> Path:
        """A clone with no data and an empty cache, as a runner's checkout."""
        folder = tmp_path / name
        subprocess.run(["git", "clone", "-q", str(origin), str(folder)], env=env, check=True)
        assert not (folder / "prepared.txt").exists()
        monkeypatch.chdir(folder)
        return folder

    def repro_runs(folder: Path) -> list[str]:
        """The stages the real DVC runs there, after pulling the data."""
        subprocess.run(["dvc", "pull", "-q", "--allow-missing"], cwd=folder, env=env, check=True)
        done = subprocess.run(["dvc", "repro", *targets], cwd=folder, env=env, capture_output=True, text=True, check=True)
        return sorted(line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage"))

    clean = runner("clean")
    assert stale_stages(targets) == {}
    assert repro_runs(clean) == []

    one_param = runner("lr")
    (one_param / "params.yaml").write_text("n: 1\nlr: {a: 0.5, b: 0.2}\n")
    assert stale_stages(targets) == {"train@a": "params.yaml: lr.a modified"}
    assert repro_runs(one_param) == ["train@a"]

    code = runner("code")
    (code / "code.txt").write_text("code 2\n")
    assert stale_stages(targets) == {"train@a": "code.txt: modified", "train@b": "code.txt: modified"}
    assert repro_runs(code) == ["train@a", "train@b"]

    upstream = runner("n")
    (upstream / "params.yaml").write_text("n: 2\nlr: {a: 0.1, b: 0.2}\n")
    assert stale_stages(targets) == {"prepare": "params.yaml: n modified", "train@a": "prepare runs", "train@b": "prepare runs"}
    assert repro_runs(upstream) == ["prepare", "train@a", "train@b"]

    # An output DVC does not cache is only in git: gone from it, it must be made again.
    untracked = runner("untracked")
    subprocess.run(["git", "rm", "-q", "metrics-a.json"], cwd=untracked, env=env, check=True)
    assert stale_stages(targets) == {"train@a": "metrics-a.json: deleted (not cached by DVC, and not in git)"}
    assert repro_runs(untracked) == ["train@a"]

    # train@b's entry recorded from another prepared.txt than prepare's (two jobs' bundles, say).
    mixed = runner("mixed")
    text = (mixed / "dvc.lock").read_text()
    b = text.index("path: prepared.txt", text.index("train@b:"))
    recorded = text[b:].split("md5: ", 1)[1].split("\n", 1)[0]
    (mixed / "dvc.lock").write_text(text[:b] + text[b:].replace(recorded, "d41d8cd98f00b204e9800998ecf8427e", 1))
    assert stale_stages(targets) == {"train@b": "prepared.txt: modified"}
    assert repro_runs(mixed) == ["train@b"]

    # An output the remote lacks (the job that made it did not push it): the stage runs again.
    lock = yaml.safe_load((origin / "dvc.lock").read_text())["stages"]
    model_a = next(out["md5"] for out in lock["train@a"]["outs"] if out["path"] == "model-a.txt")
    stored, aside = tmp_path / "remote" / "files" / "md5" / model_a[:2] / model_a[2:], tmp_path / "model-a.object"
    stored.rename(aside)
    lacking = runner("lacking")
    assert stale_stages(targets) == {"train@a": "model-a.txt: not on the DVC remote"}
    assert repro_runs(lacking) == ["train@a"]
    aside.rename(stored)

    # Metrics that were in git (cache: false) and are now cached by DVC: dvc.lock records them,
    # but no job pushed them, so the remote lacks them.
    switched = runner("switched")
    (switched / "dvc.yaml").write_text(STALE_PIPELINE.replace("- metrics-${item}.json:\n            cache: false", "- metrics-${item}.json"))
    subprocess.run(["git", "rm", "-q", "metrics-a.json", "metrics-b.json"], cwd=switched, env=env, check=True)
    assert stale_stages(targets) == {"train@a": "metrics-a.json: not on the DVC remote",
                                     "train@b": "metrics-b.json: not on the DVC remote"}
    assert repro_runs(switched) == ["train@a", "train@b"]

    # Where the data is here, it is compared as DVC compares it; a stage never run has no entry.
    monkeypatch.chdir(origin)
    (origin / "model-a.txt").write_text("edited by hand\n")
    assert stale_stages(targets) == {"train@a": "model-a.txt: modified"}
    (origin / "dvc.yaml").write_text(STALE_PIPELINE.replace("foreach: [a, b]", "foreach: [a, b, c]"))
    (origin / "params.yaml").write_text("n: 1\nlr: {a: 0.1, b: 0.2, c: 0.3}\n")
    assert stale_stages([*targets, "train@c"]) == {"train@a": "model-a.txt: modified", "train@c": "no dvc.lock entry"}


def test_a_remote_that_cannot_be_read_or_holds_nothing_stops_a_ci_plan_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The plan asks the remote whether it holds the outputs dvc.lock records. An S3 endpoint
    nobody answers on: on a runner, one line saying what to check; on a workstation, one line
    saying the outputs are taken to be there, and the plan goes on. A remote holding no objects
    (a mistyped path): on a runner, one line; on a workstation, one line, and they are planned. A
    remote holding others but not these plans them: once it stopped a runner, judged from the
    outputs asked about. A cloud-versioned remote is not asked; with no default remote, a runner stops."""
    from stages.matrix import stale_stages

    origin, env = stale_origin(tmp_path, ran=True)
    runner = tmp_path / "runner"
    subprocess.run(["git", "clone", "-q", str(origin), str(runner)], env=env, check=True)
    for command in (["dvc", "remote", "add", "-f", "-d", "shared", "s3://nobody/dvc"],
                    ["dvc", "remote", "modify", "shared", "endpointurl", "http://127.0.0.1:9"]):
        subprocess.run(command, cwd=runner, env=env, check=True)
    monkeypatch.chdir(runner)
    for key, value in {**S3_KEYS, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)

    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    assert stale_stages(["train@a"]) == {}
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("matrix: the DVC remote could not be read (EndpointConnectionError: ")
    assert said[0].endswith("; the outputs dvc.lock records are taken to be on it")

    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    with pytest.raises(UserError, match=r"^matrix: the DVC remote could not be read \(EndpointConnectionError: .*\); check its "
                       r"URL in .dvc/config and its credentials \(the plan job gets the retrain environment's secrets "
                       r"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY\)$"):
        stale_stages(["train@a"])

    # A mistyped path (or bucket) reads as a remote that holds nothing: not a plan of everything.
    subprocess.run(["dvc", "remote", "add", "-f", "-d", "shared", str(tmp_path / "remote-typo")], cwd=runner, env=env, check=True)
    with pytest.raises(UserError, match=r"^matrix: the DVC remote holds no objects at all \(none of the 2 outputs dvc.lock "
                       r"records that are not here\); check its URL in .dvc/config \(a mistyped bucket or path reads as "
                       r"empty\), `dvc push` from the workstation that made them, or dispatch the workflow with everything$"):
        stale_stages(["train@a"])
    monkeypatch.delenv("GITHUB_ACTIONS")
    assert stale_stages(["train@a"]) == {"prepare": "prepared.txt: not on the DVC remote", "train@a": "prepare runs"}
    assert capsys.readouterr().err == ("matrix: the DVC remote holds no objects at all (none of the 2 outputs dvc.lock "
                                       "records that are not here); their stages are planned\n")

    # The remote holds train@b's model, not the two outputs train@a's chain needs (a lock committed
    # without a push): judged from the remote, not from the outputs asked about, they are planned.
    lock = yaml.safe_load((origin / "dvc.lock").read_text())["stages"]
    for stage, path in (("prepare", "prepared.txt"), ("train@a", "model-a.txt")):
        md5 = next(out["md5"] for out in lock[stage]["outs"] if out["path"] == path)
        (tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    subprocess.run(["dvc", "remote", "add", "-f", "-d", "shared", str(tmp_path / "remote")], cwd=runner, env=env, check=True)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert stale_stages(["train@a"]) == {"prepare": "prepared.txt: not on the DVC remote", "train@a": "prepare runs"}
    assert capsys.readouterr().err == ""

    # A cloud-versioned remote keeps files by path: nothing to ask by hash, and nothing stops.
    subprocess.run(["dvc", "remote", "modify", "shared", "version_aware", "true"], cwd=runner, env=env, check=True)
    assert stale_stages(["train@a"]) == {}
    assert capsys.readouterr().err == ("matrix: the DVC remote is cloud-versioned (worktree or version_aware), which keeps "
                                       "files by path, not by hash: the outputs dvc.lock records are taken to be on it\n")

    # No default remote (one added without -d): the plan cannot ask, and on a runner it says so.
    subprocess.run(["dvc", "remote", "default", "--unset"], cwd=runner, env=env, check=True)
    with pytest.raises(UserError, match=r"^matrix: no default DVC remote, which the plan asks what it holds; dvc remote "
                       r"default <name> \(or dvc remote add -d \.\.\.\) and commit .dvc/config$"):
        stale_stages(["train@a"])


@pytest.mark.parametrize("remote", ["folder", "s3"])
def test_a_job_whose_lock_was_never_merged_is_restored_from_the_run_cache_not_run_again(
    remote: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`matrix run` pushes DVC's run cache and reproduces with --pull: a later job from the same
    commit (the first job's dvc.lock went to a pull request nobody merged) restores the stages
    from the remote instead of training them again, and records the same dvc.lock entries. The
    remote is a folder, or a bucket of an S3 server (moto's) as the team's is."""
    origin, env = stale_origin(tmp_path, ran=False, s3=request.getfixturevalue("endpoint") if remote == "s3" else None)
    runs = {}
    for job in ("first", "second"):
        folder = tmp_path / job
        subprocess.run(["git", "clone", "-q", str(origin), str(folder)], env=env, check=True)
        done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", "train@a", "--bundle", "bundle"], cwd=folder,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[job] = done.stdout
    assert "Running stage 'train@a'" in runs["first"] and "Running stage 'prepare'" in runs["first"]
    assert "Running stage" not in runs["second"], runs["second"]
    # Its metrics, which DVC does not cache, came back too: their object went up with the entry.
    assert "Stage 'train@a' is cached - skipping run, checking out outputs" in runs["second"]
    for made in ("model-a.txt", "metrics-a.json"):
        assert (tmp_path / "second" / made).read_text() == (tmp_path / "first" / made).read_text()
    # Each job pushes the entries it made, not those it pulled.
    assert "matrix: 2 run-cache entries pushed" in runs["first"] and "matrix: 0 run-cache entries pushed" in runs["second"]
    first, second = ((tmp_path / job / "bundle" / "dvc.lock").read_text() for job in ("first", "second"))
    assert first == second


def test_behind_names_the_targets_a_repro_would_run_with_their_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `gather --suite` asks before it makes a suite's report: a run of some experiments (a
    dispatch with a pattern) must not make a report of the others' old results."""
    from stages.matrix import behind

    origin, _ = stale_origin(tmp_path, ran=True)
    monkeypatch.chdir(origin)
    assert behind(["train@a", "train@b"]) == []
    (origin / "params.yaml").write_text("n: 1\nlr: {a: 0.1, b: 0.3}\n")  # b's params changed, not trained since
    assert behind(["train@a", "train@b"]) == ["train@b (from train@b) params.yaml: lr.b modified"]


def test_a_job_whose_target_fails_still_pushes_and_bundles_the_others(tmp_path: Path) -> None:
    """A training job of several experiments in which one fails: the ones that finished are on the
    remote and in the bundle (the report job proposes them), and the job fails naming the one."""
    origin, env = stale_origin(tmp_path, ran=False)
    job = tmp_path / "job"
    subprocess.run(["git", "clone", "-q", str(origin), str(job)], env=env, check=True)
    (job / "fail-a").write_text("")  # train@a's command fails here

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", "train@a", "train@b", "--bundle", "bundle"],
                          cwd=job, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: matrix run: `dvc repro` failed for train@a (its output is above); train@b is made, pushed and bundled"
    )
    assert "$ dvc push --with-deps train@b" in done.stdout
    bundled = yaml.safe_load((job / "bundle" / "dvc.lock").read_text())["stages"]
    assert set(bundled) == {"prepare", "train@b"}
    later = tmp_path / "later"
    subprocess.run(["git", "clone", "-q", str(origin), str(later)], env=env, check=True)
    for command in (["-m", "stages.matrix", "gather", str(job / "bundle")], ["-m", "dvc", "pull", "-q", "--with-deps", "train@b"]):
        subprocess.run([sys.executable, *command], cwd=later, env=env, check=True, capture_output=True)
    assert (later / "model-b.txt").read_text() == "n: 1\ncode 1\nb\n"

def test_a_frozen_stage_cuts_off_what_it_depends_on_as_dvc_repro_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc repro` does not reproduce the dependencies of a frozen stage; the plan neither plans
    them nor, after a run, calls a target failed for them."""
    from stages.matrix import stale_stages, unfinished

    frozen = STALE_PIPELINE.replace("    do:\n      cmd: test", "    do:\n      frozen: true\n      cmd: test")
    assert frozen != STALE_PIPELINE
    origin, env = stale_origin(tmp_path, ran=True)
    monkeypatch.chdir(origin)
    (origin / "dvc.yaml").write_text(frozen)
    (origin / "params.yaml").write_text("n: 2\nlr: {a: 0.1, b: 0.2}\n")  # prepare's param
    assert stale_stages(["train@a"]) == {} and unfinished(["train@a"]) == []
    assert stale_stages(["prepare"]) == {"prepare": "params.yaml: n modified"} and unfinished(["prepare"]) == ["prepare"]
    done = subprocess.run(["dvc", "repro", "train@a"], cwd=origin, env=env, capture_output=True, text=True, check=True)
    assert "Running stage" not in done.stdout, done.stdout


def test_an_always_changed_stage_that_ran_leaves_its_targets_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage DVC runs every time (always_changed) is "changed" after it ran too: a repro that
    failed elsewhere does not count the targets below it as undone for that."""
    from stages.matrix import unfinished

    origin, env = stale_origin(tmp_path, ran=True)
    monkeypatch.chdir(origin)
    (origin / "dvc.yaml").write_text(STALE_PIPELINE.replace("    params: [n]\n", "    params: [n]\n    always_changed: true\n"))
    (origin / "fail-b").write_text("")
    (origin / "params.yaml").write_text("n: 1\nlr: {a: 0.1, b: 0.3}\n")
    done = subprocess.run(["dvc", "repro", "--keep-going", "train@a", "train@b"], cwd=origin, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "Running stage 'prepare'" in done.stdout, done.stdout + done.stderr
    assert unfinished(["train@a", "train@b"]) == ["train@b"]


def test_a_stage_whose_uncached_output_left_git_is_run_again_by_the_job(tmp_path: Path) -> None:
    """metrics-a.json (not cached by DVC) deleted from git: the plan runs train@a, and its job
    makes it again. `dvc repro --pull` alone took the stage as pulled, ran nothing, and the job
    failed bundling ("metrics-a.json: an output of train@a is missing")."""
    origin, env = stale_origin(tmp_path, ran=True)
    job = tmp_path / "job"
    subprocess.run(["git", "clone", "-q", str(origin), str(job)], env=env, check=True)
    subprocess.run(["git", "rm", "-q", "metrics-a.json"], cwd=job, env=env, check=True)

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", "train@a", "train@b", "--bundle", "bundle"],
                          cwd=job, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "matrix: train@a: an output kept in git is missing; made again" in done.stdout
    assert done.stdout.count("Running stage 'train@a'") == 1 and "Running stage 'train@b'" not in done.stdout
    assert (job / "metrics-a.json").read_text() == (origin / "metrics-a.json").read_text()
    assert (job / "bundle" / "files" / "metrics-a.json").read_text() == (origin / "metrics-a.json").read_text()


# As the course's pipeline is: training's outputs all cached by DVC, evaluation's metrics in git.
CHAIN_PIPELINE = STALE_PIPELINE.split("  train:")[0] + """\
  train:
    foreach: [a, b]
    do:
      cmd: test ! -e fail-${item} && cat prepared.txt code.txt > model-${item}.txt
      deps: [prepared.txt, code.txt]
      params:
        - lr.${item}
      outs:
        - model-${item}.txt
  evaluate:
    foreach: [a, b]
    do:
      cmd: wc -c < model-${item}.txt > metrics-${item}.json
      deps:
        - model-${item}.txt
      metrics:
        - metrics-${item}.json:
            cache: false
"""


# prepare with a metric DVC does not cache (in git), as validate's summary.json is; in
# PREP_METRIC_READ, train reads it.
PREP_METRIC_PIPELINE = STALE_PIPELINE.replace(
    "    outs: [prepared.txt]\n", "    outs: [prepared.txt]\n    metrics:\n      - prep.yaml:\n          cache: false\n").replace(
    "> prepared.txt\n", '> prepared.txt && grep "^n:" params.yaml > prep.yaml\n', 1)
PREP_METRIC_READ = PREP_METRIC_PIPELINE.replace("deps: [prepared.txt, code.txt]", "deps: [prepared.txt, code.txt, prep.yaml]")
FAILING_OTHER = "  other:\n    cmd: 'false'\n    outs: [other.txt]\n"

# Each case: (pipeline in the job, files removed from git, files that make a stage fail, params lr,
# targets, the stage counted, the target that fails, the target made, the removed files made again).
RUNS_ONCE = {
    # metrics-a.json left git (made again), and train@b, its param changed, fails.
    "beside a lost stage": (STALE_PIPELINE, ["metrics-a.json"], ["fail-b"], {"a": 0.1, "b": 0.3},
                            ["train@a", "train@b"], "train@b", "train@b", "train@a", ["metrics-a.json"]),
    # metrics-a.json and metrics-b.json left git, and train@a, run again for it, fails: train@b is made.
    "a lost stage itself": (STALE_PIPELINE, ["metrics-a.json", "metrics-b.json"], ["fail-a"], {"a": 0.1, "b": 0.2},
                            ["train@a", "train@b"], "train@a", "train@a", "train@b", ["metrics-b.json"]),
    # prepare's prep.yaml left git (made again); train@a below it, its param changed, fails.
    "below a lost stage": (PREP_METRIC_PIPELINE, ["prep.yaml"], ["fail-a"], {"a": 0.5, "b": 0.2},
                           ["train@a", "train@b"], "train@a", "train@a", "train@b", ["prep.yaml"]),
    # prep.yaml, which train reads, and metrics-a.json left git; another target fails on its own.
    "below a lost stage, beside a failure": (PREP_METRIC_READ + FAILING_OTHER, ["prep.yaml", "metrics-a.json"], [],
                                             {"a": 0.1, "b": 0.2}, ["train@a", "other"], "other", "other", "train@a",
                                             ["prep.yaml", "metrics-a.json"]),
    # A new experiment c (no dvc.lock entry, no metrics in git yet) whose training fails.
    "a new experiment": (CHAIN_PIPELINE.replace("foreach: [a, b]", "foreach: [a, b, c]"), [], ["fail-c"],
                         {"a": 0.1, "b": 0.2, "c": 0.3}, ["evaluate@c", "evaluate@a"], "train@c", "evaluate@c",
                         "evaluate@a", []),
}


@pytest.mark.parametrize("case", RUNS_ONCE)
def test_a_failing_stage_runs_once_in_a_job(case: str, tmp_path: Path) -> None:
    """A stage whose output in git (cache: false) is missing, though dvc.lock records it, is one
    `dvc repro --pull` takes as pulled: the job drops its dvc.lock entry, and the one repro makes
    it again with the rest. A failing stage runs once, and the others are made: before, the job
    ran the whole list again (a failing train@b a second time: hours on a GPU runner), took a
    stage that had failed, or was new, for one to make by name (and ran it again), stopped at the
    first of those that failed, or called failed a stage that had only to run below them."""
    pipeline, removed, failing, lr, targets, counted, failed, made, back = RUNS_ONCE[case]
    origin, env = stale_origin(tmp_path, ran=True, pipeline=pipeline.replace(FAILING_OTHER, "").replace("[a, b, c]", "[a, b]"))
    job = tmp_path / "job"
    subprocess.run(["git", "clone", "-q", str(origin), str(job)], env=env, check=True)
    (job / "dvc.yaml").write_text(pipeline)
    for path in removed:
        subprocess.run(["git", "rm", "-q", path], cwd=job, env=env, check=True)
    for path in failing:
        (job / path).write_text("")
    (job / "params.yaml").write_text(f"n: 1\nlr: {json.dumps(lr)}\n")

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", *targets, "--bundle", "bundle"],
                          cwd=job, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.count(f"Running stage '{counted}'") == 1, done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: matrix run: `dvc repro` failed for {failed} (its output is above); {made} is made, pushed and bundled")
    assert made in yaml.safe_load((job / "bundle" / "dvc.lock").read_text())["stages"]
    for path in removed:
        assert (job / path).read_text() == (origin / path).read_text() if path in back else not (job / path).exists()


def test_a_stage_below_one_whose_output_left_git_runs_after_it(tmp_path: Path) -> None:
    """prep.yaml (prepare's, in git), which train reads, left git, and lr.b changed: prepare is
    made again, then train@b retrains, in one repro. Before, `dvc repro --pull` failed train@b on
    the missing prep.yaml, and the job, counting that a failure of its own, never ran it again."""
    origin, env = stale_origin(tmp_path, ran=True, pipeline=PREP_METRIC_READ)
    job = tmp_path / "job"
    subprocess.run(["git", "clone", "-q", str(origin), str(job)], env=env, check=True)
    subprocess.run(["git", "rm", "-q", "prep.yaml"], cwd=job, env=env, check=True)
    (job / "params.yaml").write_text("n: 1\nlr: {a: 0.1, b: 0.3}\n")

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", "train@a", "train@b", "--bundle", "bundle"],
                          cwd=job, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")] == ["prepare", "train@b"]
    assert (job / "prep.yaml").read_text() == (origin / "prep.yaml").read_text()
    assert set(yaml.safe_load((job / "bundle" / "dvc.lock").read_text())["stages"]) == {"prepare", "train@a", "train@b"}


@pytest.mark.parametrize("b_fails", [False, True], ids=["b retrains", "b fails too"])
def test_a_stage_run_because_the_remote_lacks_its_output_that_fails_is_reported_failed(b_fails: bool, tmp_path: Path) -> None:
    """train@a's model is not on the remote, so `dvc repro --pull` runs it, and it fails; train@b
    retrains (a param changed), or fails too. The job names exactly what failed, and pushes and
    bundles what finished. Before, judging from dvc.lock alone, a failed stage whose outputs were
    missing looked "on the remote": the job failed naming nothing and pushed nothing (b's new
    model was lost), or called evaluate@a made and pushed."""
    origin, env = stale_origin(tmp_path, ran=True, pipeline=CHAIN_PIPELINE)
    model_a = yaml.safe_load((origin / "dvc.lock").read_text())["stages"]["train@a"]["outs"][0]["md5"]
    (tmp_path / "remote" / "files" / "md5" / model_a[:2] / model_a[2:]).unlink()
    job = tmp_path / "job"
    subprocess.run(["git", "clone", "-q", str(origin), str(job)], env=env, check=True)
    (job / "fail-a").write_text("")
    (job / "params.yaml").write_text("n: 1\nlr: {a: 0.1, b: 0.3}\n")
    if b_fails:
        (job / "fail-b").write_text("")

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", "evaluate@a", "evaluate@b", "--bundle", "bundle"],
                          cwd=job, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    if b_fails:
        assert last == "error: matrix run: `dvc repro` failed for evaluate@a, evaluate@b (its output is above)"
        assert "$ dvc push" not in done.stdout and not (job / "bundle").exists()
        return
    assert last == ("error: matrix run: `dvc repro` failed for evaluate@a (its output is above); "
                    "evaluate@b is made, pushed and bundled")
    assert set(yaml.safe_load((job / "bundle" / "dvc.lock").read_text())["stages"]) == {"prepare", "train@b", "evaluate@b"}
    later = tmp_path / "later"
    subprocess.run(["git", "clone", "-q", str(origin), str(later)], env=env, check=True)
    for command in (["-m", "stages.matrix", "gather", str(job / "bundle")], ["-m", "dvc", "pull", "-q", "train@b"]):
        subprocess.run([sys.executable, *command], cwd=later, env=env, check=True, capture_output=True)
    assert (later / "model-b.txt").read_text() == "n: 1\ncode 1\n"
    assert (later / "metrics-b.json").read_text().strip() == "12"


@pytest.mark.parametrize("where", [["--jobs", "0"], ["--gpus", ","]], ids=["--jobs 0", "--gpus ,"])
def test_local_without_a_slot_is_refused_before_anything_runs(monkeypatch, tmp_path, where):
    """`matrix local --jobs 0` first ran `dvc repro split@<every dataset> weights@<every experiment>`
    (the course: every download, for hours), then said there was no slot to run on."""
    ran: list[tuple] = []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # the unfixed code went on to make experiments
    monkeypatch.setattr(matrix, "dvc", lambda *args, **kwargs: ran.append(args))

    with pytest.raises(UserError, match="--jobs"):
        matrix.main(["local", "--suite", "demo", "--params", PARAMS, *where])

    assert ran == []


def test_local_with_a_gpu_named_twice_is_refused_before_anything_runs(monkeypatch, tmp_path):
    """`matrix local --gpus 0,0` (a typo for 0,1) ran two experiments at once on GPU 0, though
    docs/setups.md promises at most one per GPU (two models on one GPU can run it out of memory)."""
    ran: list[tuple] = []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(matrix, "dvc", lambda *args, **kwargs: ran.append(args))
    monkeypatch.setattr(matrix, "run_pool", lambda jobs, slots: ran.append(slots) or {name: 0 for name, _ in jobs})

    with pytest.raises(UserError, match=r"--gpus '0,1,0': GPU 0 is named twice"):
        matrix.main(["local", "--suite", "demo", "--params", PARAMS, "--gpus", "0,1,0"])

    assert ran == []


@pytest.mark.parametrize("remote", [False, True], ids=["no remote", "remote"])
def test_run_of_a_target_dvc_yaml_lacks_is_one_line(remote: bool, tmp_path: Path) -> None:
    """`matrix run evaluate@digits-nope` (a typo in a hand-run step): one line naming the target and
    where the stages are listed, before anything is pulled or run. It was a StageNotFound
    traceback (from the check of what the failed `dvc repro` left undone) where no remote is set."""
    env = dvc_repository(tmp_path)
    if remote:
        subprocess.run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], cwd=tmp_path, env=env, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello > out.txt\n    outs: [out.txt]\n")

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "run", "hello", "nope@x"], cwd=tmp_path, env={
        **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)

    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: matrix run: nope@x: no such stage in dvc.yaml; `dvc stage list` lists them (evaluate@<experiment>, split@<dataset>, ...)"]
    assert "$ dvc" not in done.stdout and not (tmp_path / "out.txt").exists()


def test_a_bundle_folder_used_again_holds_only_this_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`matrix run ... --bundle out/train-1` a second time, for other targets (the README's name, used
    again on a workstation): the bundle holds only this run's files. It kept the first run's
    uncached outputs beside the new dvc.lock entries, and `gather` then laid those old metrics
    over the workspace's newer ones, against what dvc.lock records."""
    from stages.matrix import bundle

    origin, _ = stale_origin(tmp_path, ran=True)
    monkeypatch.chdir(origin)
    folder = tmp_path / "out" / "train-1"
    bundle(["train@a"], folder)
    assert (folder / "files" / "metrics-a.json").exists()

    assert bundle(["train@b"], folder) == ["prepare", "train@b"]

    assert sorted(path.name for path in (folder / "files").iterdir()) == ["metrics-b.json"]
    (origin / "metrics-a.json").write_text('{"a": 99}')  # retrained since: gather must leave it
    gather([folder])
    assert (origin / "metrics-a.json").read_text() == '{"a": 99}'


@pytest.mark.parametrize("late", [True, False], ids=["others behind", "others up to date"])
def test_local_with_a_pattern_does_not_train_the_rest_of_the_suite_for_its_report(monkeypatch, capsys, late):
    """`matrix local --suite demo --pattern digits-small_cnn --jobs 1` (docs/setups.md's
    `--pattern 'ham10000-*'`): its closing `dvc repro report@demo` trained every other experiment
    of the suite that was not up to date, one after another outside the pool (seen: it retrained
    digits-mobilenetv2, whose params had changed; for the course, every other dataset's download
    and model). The report is made only when the rest of the suite is up to date, as `gather
    --suite` does; else one line says which are behind and how to make it."""
    from stages import tracking

    ran: list[tuple] = []
    asked: list[list[str]] = []
    monkeypatch.setattr(matrix, "dvc", lambda *args, **kwargs: ran.append(args))
    monkeypatch.setattr(matrix, "run_pool", lambda jobs, slots: {name: 0 for name, _ in jobs})
    monkeypatch.setattr(tracking, "experiment_id", lambda dataset: "1")
    reason = "evaluate@digits-mobilenetv2 (from weights@digits-mobilenetv2) params.yaml: experiments.digits-mobilenetv2 modified"
    monkeypatch.setattr(matrix, "behind", lambda targets: asked.append(targets) or ([reason] if late else []))

    matrix.main(["local", "--suite", "demo", "--pattern", "digits-small_cnn", "--params", PARAMS, "--jobs", "1"])

    assert asked == [["evaluate@digits-mobilenetv2"]]
    made = ("--wait-for-lock", "repro", "report@demo") in ran
    assert made is not late
    if late:
        assert (f"matrix: report@demo not made: 1 of the suite's 2 experiments is not up to date ({reason}); "
                "`dvc repro report@demo` makes it, training them") in capsys.readouterr().out


PIN_PIPELINE = """\
stages:
  fetch:
    foreach: [pets, held, titanic, zoo]
    do:
      cmd: python make.py ${item}
      outs:
        - data/raw/${item}
        - data/raw/${item}.provenance.json
"""
# fetch@'s outputs in miniature: the raw folder and a provenance record as fetch writes it.
PIN_MAKE = """\
import dataclasses, json, sys
from pathlib import Path
import yaml
from stages.sources import KaggleOptions
name = sys.argv[1]
source = {k: v for k, v in yaml.safe_load(open("params.yaml"))["datasets"][name]["source"].items() if k != "kind"}
Path(f"data/raw/{name}").mkdir(parents=True, exist_ok=True)
Path(f"data/raw/{name}/image.png").write_text("pixels of " + name)
record = {"source": {"kind": "kaggle", **dataclasses.asdict(KaggleOptions(**source))}, "version": 1}
Path(f"data/raw/{name}.provenance.json").write_text(json.dumps(record))
"""


def test_pin_pulls_only_the_records_of_the_suites_unpinned_kaggle_datasets_then_checks_them(tmp_path: Path) -> None:
    """`matrix pin` (the weekly retrain's pin job) pulls from the DVC remote the provenance record of
    each unpinned Kaggle dataset of the suite, and nothing else (`dvc pull <record>` is one output of
    fetch@, not the raw folder beside it), then runs `fetch --check --pin` on the suite's Kaggle
    datasets, pinned ones too: here Kaggle
    cannot be asked (no credentials), and its one line and exit status 2 come through, for the job to fail."""
    from fake_kaggle import CLEARED
    from tests.toy import toy_params

    params = toy_params(["cat", "dog"])
    toy = params["datasets"].pop("toy")
    sources = {"pets": {"dataset": "own/pets"}, "held": {"dataset": "own/held", "version": 1},
               "titanic": {"competition": "titanic"}, "zoo": {"dataset": "own/zoo"}}
    for name, source in sources.items():
        params["datasets"][name] = {**toy, "source": {"kind": "kaggle", **source}}
        params["experiments"][f"{name}-small_cnn"] = {"suite": "other" if name == "zoo" else "weekly",
                                                      "dataset": name, "backbone": "small_cnn"}
    params["backbones"] = {"small_cnn": yaml.safe_load((REPO / "params.yaml").read_text())["backbones"]["small_cnn"]}
    params["suites"] = {"weekly": {}, "other": {}}
    origin, env = stale_origin(tmp_path, ran=False, pipeline=PIN_PIPELINE)
    (origin / "params.yaml").write_text(yaml.safe_dump(params))
    (origin / "make.py").write_text(PIN_MAKE)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for command in (["dvc", "repro", "-q"], ["dvc", "push", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "fetched"]):
        subprocess.run(command, cwd=origin, env=env, check=True)
    runner = tmp_path / "runner"
    subprocess.run(["git", "clone", "-q", str(origin), str(runner)], env=env, check=True)
    (tmp_path / "home").mkdir()
    env = {key: value for key, value in env.items() if key not in CLEARED} | {
        "HOME": str(tmp_path / "home"), "KAGGLE_CONFIG_DIR": str(tmp_path / "home"), "GITHUB_ACTIONS": "true",
        "GITHUB_OUTPUT": str(tmp_path / "github_output")}

    done = subprocess.run([sys.executable, "-m", "stages.matrix", "pin", "--suite", "weekly"], cwd=runner, env=env,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "$ dvc pull --allow-missing data/raw/pets.provenance.json"
    # held, pinned, is asked about too (a newer version than its pin), with no record to pull.
    assert lines[-1].startswith("fetch: cannot ask Kaggle whether held, pets have a newer version: no Kaggle credentials found")
    assert json.loads((runner / "data/raw/pets.provenance.json").read_text())["version"] == 1
    assert sorted(p.name for p in (runner / "data/raw").iterdir()) == [".gitignore", "pets.provenance.json"]  # not the raw folder
    cached = [p for p in (runner / ".dvc/cache").rglob("*") if p.is_file() and not p.is_relative_to(runner / ".dvc/cache/runs")]
    assert len(cached) == 1  # the record's object: the raw folder's listing and files were not downloaded
    assert (runner / "params.yaml").read_text() == (origin / "params.yaml").read_text()
    assert (tmp_path / "github_output").read_text() == "title=\n"  # nothing pinned: no pull request

    # From a sub-folder, given --params: the record is pulled where the check reads it, the params
    # file's folder (before: `dvc pull` took the path from the sub-folder, and failed).
    (runner / "data/raw/pets.provenance.json").unlink()
    (runner / "notebooks").mkdir()
    done = subprocess.run([sys.executable, "-m", "stages.matrix", "pin", "--suite", "weekly", "--params", "../params.yaml"],
                          cwd=runner / "notebooks", env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "$ dvc pull --allow-missing data/raw/pets.provenance.json"
    assert done.stdout.splitlines()[-1].startswith("fetch: cannot ask Kaggle whether held, pets have a newer version: ")
    assert json.loads((runner / "data/raw/pets.provenance.json").read_text())["version"] == 1
