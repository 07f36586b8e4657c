"""The GitHub workflows, checked offline: GitHub's schema (check-jsonschema's vendored copy), zizmor's
security audits, and what the workflows must do (triggers, thin steps, secrets, no push to main)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
BIN = Path(sys.executable).parent


def load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def run_scripts(workflow: dict) -> list[str]:
    return [step["run"] for job in workflow["jobs"].values() for step in job.get("steps", []) if "run" in step]


def test_workflows_match_githubs_schema() -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, sorted(WORKFLOWS.glob("*.yml")))],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def test_zizmor_finds_nothing_offline() -> None:
    """No template injection, no unpinned actions, no persisted credentials, no excessive permissions."""
    result = subprocess.run([str(BIN / "zizmor"), "--offline", str(WORKFLOWS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout + result.stderr


def test_zizmor_would_catch_an_injection(tmp_path: Path) -> None:
    """The audit is real: a workflow interpolating an input into a script fails it."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "name: bad\non:\n  workflow_dispatch:\n    inputs:\n      suite: {type: string}\npermissions: {}\n"
        "jobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo ${{ inputs.suite }}\n"
    )
    result = subprocess.run([str(BIN / "zizmor"), "--offline", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "template-injection" in result.stdout + result.stderr


def test_tests_run_the_readme_command_on_every_pull_request() -> None:
    workflow = load("tests.yml")
    assert "pull_request" in workflow["on"]
    scripts = [script.strip() for script in run_scripts(workflow)]
    # PyTorch first: the other-backend tests are skipped where it is missing.
    assert scripts.index("make env-torch") < scripts.index("make test")
    assert "make test" in (REPO / "README.md").read_text()


def test_retraining_triggers_on_pipeline_changes_schedule_and_dispatch() -> None:
    triggers = load("retrain.yml")["on"]
    assert triggers["push"]["branches"] == ["main"]
    # Not dvc.lock: merging the retrain's own pull request changes only it, and must not start it again.
    assert set(triggers["push"]["paths"]) == {"params.yaml", "dvc.yaml", "**.dvc", "stages/**"}
    assert triggers["schedule"][0]["cron"]
    assert {"suite", "pattern"} <= set(triggers["workflow_dispatch"]["inputs"])


def test_retraining_steps_are_thin_calls_to_the_matrix_command() -> None:
    workflow = load("retrain.yml")
    scripts = run_scripts(workflow)
    calls = [line.strip() for script in scripts for line in script.splitlines() if "stages.matrix" in line]
    assert {re.search(r"stages\.matrix (\w+)", call).group(1) for call in calls} == {"plan", "run", "gather", "summary", "pin"}
    assert not any("pip install" in script or "uv " in script for script in scripts)
    # Every job installs the README's way; the GPU jobs with the CUDA builds of JAX and TensorFlow.
    assert sum(script.strip() == "make env" for script in scripts) == 4
    assert [step["run"].split("#")[0].strip() for step in workflow["jobs"]["train"]["steps"] if "make" in step.get("run", "")] == [
        "make env-gpu"]
    # The fan-out: matrices from the plan job; GPU runners configurable; two retrainings never race.
    assert workflow["jobs"]["train"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.train) }}"
    assert "vars.GPU_RUNNER_LABELS" in workflow["jobs"]["train"]["runs-on"]
    assert workflow["concurrency"]["cancel-in-progress"] is False and "retrain-" in workflow["concurrency"]["group"]


def test_secrets_reach_scripts_only_through_env_and_main_is_never_pushed() -> None:
    text = (WORKFLOWS / "retrain.yml").read_text()
    workflow = load("retrain.yml")
    for script in run_scripts(workflow):
        assert "${{" not in script, script  # values reach scripts as environment variables only
        assert not re.search(r"git push\S* .*\bmain\b", script)
    assert "gh pr create --base main" in text
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in workflow["jobs"].items():
        if any("secrets." in str(step.get("env", {})) for step in job.get("steps", [])):
            assert job.get("environment") == "retrain", name


@pytest.mark.parametrize("name", ["tests.yml", "retrain.yml"])
def test_checkouts_do_not_persist_credentials(name: str) -> None:
    for job in load(name)["jobs"].values():
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False


def retrained_repository(folder: Path) -> list[str]:
    """A git repository on main with one commit, where a retrain has left dvc.lock and a report
    untracked, as the report job's checkout has them; returns the git command to commit with."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(folder)], check=True)
    (folder / "README.md").write_text("x\n")
    subprocess.run([*git, "add", "README.md"], cwd=folder, check=True)
    subprocess.run([*git, "commit", "-qm", "start"], cwd=folder, check=True)
    (folder / "dvc.lock").write_text("schema: '2.0'\n")
    (folder / "reports" / "metrics").mkdir(parents=True)
    (folder / "reports" / "metrics" / "a.json").write_text("{}\n")
    return git


def test_the_pull_request_step_sees_a_new_dvc_lock_and_new_reports(tmp_path: Path) -> None:
    """The step's own check, run in a repository where the retrain left dvc.lock and reports/
    untracked (as in a fresh checkout, where neither is committed yet): it goes on to propose them.
    `git diff --quiet`, which ignores untracked files, said "Nothing changed" there."""
    [step] = [step for step in load("retrain.yml")["jobs"]["report"]["steps"] if "gh pr create" in step.get("run", "")]
    script = step["run"].split('branch="')[0] + "echo CHANGED\n"  # up to where it would branch and push

    def check(repo: Path) -> str:
        return subprocess.run(["bash", "-e", "-c", script], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    git = retrained_repository(tmp_path)
    assert check(tmp_path) == "CHANGED"
    subprocess.run([*git, "commit", "-qm", "results"], cwd=tmp_path, check=True)  # what the step staged
    assert check(tmp_path) == "Nothing changed: no pull request."


@pytest.mark.parametrize("complete", ["true", "false"])
def test_the_pull_request_step_proposes_a_whole_or_a_partial_retrain(tmp_path: Path, complete: str) -> None:
    """The whole step, with `git push` and `gh` stood in for (they would reach GitHub): one commit
    on a branch of its own, pushed there, never to main, and a pull request whose title and body
    say whether every train job succeeded."""
    import shutil

    [step] = [step for step in load("retrain.yml")["jobs"]["report"]["steps"] if "gh pr create" in step.get("run", "")]
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_git = shutil.which("git")
    (bin_dir / "git").write_text(
        f'#!/bin/bash\nif [ "$1" = push ]; then echo "git $*" >> {calls}; exit 0; fi\nexec {real_git} "$@"\n')
    (bin_dir / "gh").write_text(
        f'#!/bin/bash\necho "gh $*" >> {calls}\nwhile [ $# -gt 0 ]; do [ "$1" = --body-file ] && cp "$2" {tmp_path}/body.md; shift; done\n')
    for tool in ("git", "gh"):
        (bin_dir / tool).chmod(0o755)
    repo = tmp_path / "repo"
    retrained_repository(repo)
    (repo / "summary.md").write_text("### Metrics against `abc`\n\n| accuracy |\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SUITE": "course", "RUN_ID": "42",
           "RUN_URL": "https://github.com/o/r/actions/runs/42", "GH_TOKEN": "token", "GITHUB_REPOSITORY": "o/r",
           "COMPLETE": complete}

    subprocess.run(["bash", "-e", "-c", step["run"]], cwd=repo, env=env, check=True, capture_output=True, text=True)

    title = "Retrain course (run 42)" if complete == "true" else "Retrain course, partial (run 42)"
    assert calls.read_text().splitlines() == [
        "git push https://x-access-token:token@github.com/o/r.git retrain/course-42",
        f"gh pr create --base main --head retrain/course-42 --title {title} --body-file summary.md",
    ]
    log = subprocess.run([real_git, "log", "--format=%s", "retrain/course-42"], cwd=repo, capture_output=True, text=True)
    assert log.stdout.splitlines() == [title, "start"]
    files = subprocess.run([real_git, "show", "--name-only", "--format=", "retrain/course-42"], cwd=repo,
                           capture_output=True, text=True)
    assert files.stdout.split() == ["dvc.lock", "reports/metrics/a.json"]
    body = (tmp_path / "body.md").read_text()
    assert body.endswith("### Metrics against `abc`\n\n| accuracy |\n")
    partial = body.startswith("Some train jobs failed (https://github.com/o/r/actions/runs/42): this records the stages")
    assert partial == (complete == "false")


def test_make_env_gpu_installs_the_cuda_builds_at_the_locked_versions() -> None:
    """`make env-gpu` (the GPU runners' install) asks for jax[cuda12] and tensorflow[and-cuda] at
    the very versions uv.lock installed: a CUDA build of another version would replace the tested one."""
    import importlib.metadata

    dry = subprocess.run(["make", "-n", "env-gpu"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert (f'"jax[cuda12]=={importlib.metadata.version("jax")}" '
            f'"tensorflow[and-cuda]=={importlib.metadata.version("tensorflow")}"') in dry
    lock = (REPO / "uv.lock").read_text()
    for name in ("jax", "tensorflow"):
        assert f'name = "{name}"\nversion = "{importlib.metadata.version(name)}"' in lock


def test_retrain_wiring_is_consistent() -> None:
    """What GitHub checks only when a run starts, and the schema cannot: each `needs.<job>.outputs.<x>`
    names a job the job needs and an output that job declares; each job output names a step of
    that job by its id; each artifact download matches an upload; each secret is one the header
    documents; and the jobs wait for the ones whose work they use."""
    import fnmatch

    text = (WORKFLOWS / "retrain.yml").read_text()
    workflow = load("retrain.yml")
    jobs = workflow["jobs"]
    for name, job in jobs.items():
        needs = job.get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        body = yaml.safe_dump(job)
        for needed, output in re.findall(r"needs\.(\w+)\.outputs\.(\w+)", body):
            assert needed in needs, f"{name} reads needs.{needed} without needing it"
            assert output in jobs[needed].get("outputs", {}), f"{name} reads {needed}'s undeclared output {output}"
        for needed in re.findall(r"needs\.(\w+)\.result", body):
            assert needed in needs, f"{name} reads needs.{needed}.result without needing it"
        ids = {step.get("id") for step in job.get("steps", [])}
        for output, value in job.get("outputs", {}).items():
            step = re.search(r"steps\.([\w-]+)\.outputs\.", value).group(1)
            assert step in ids, f"{name}'s output {output} reads step {step!r}, which it does not have"
    assert set(jobs["train"]["needs"]) >= {"plan", "prepare"} and "train" in jobs["report"]["needs"]
    # A failed job must not stop the others (train after a failed prepare; report after a failed
    # train); a job with nothing planned is skipped (GitHub refuses an empty matrix), and the jobs
    # after it still run.
    assert jobs["prepare"]["if"] == "${{ needs.plan.outputs.prepare_jobs != '0' }}"
    for name, count in (("train", "train_jobs"), ("report", "report_jobs")):
        assert jobs[name]["if"] == f"${{{{ !cancelled() && needs.plan.result == 'success' && needs.plan.outputs.{count} != '0' }}}}", name
    assert set(jobs["plan"]["outputs"]) == {"prepare", "train", "prepare_jobs", "train_jobs", "report_jobs"}
    plan_script = next(step for step in jobs["plan"]["steps"] if step.get("id") == "plan")["run"]
    assert 'if [ "$EVERYTHING" != true ]; then args+=(--changed); fi' in plan_script
    assert workflow["on"]["workflow_dispatch"]["inputs"]["everything"]["default"] is False
    # Where no bundle came, `bundles/*` must expand to nothing, not to itself.
    for name in ("train", "report"):
        gathers = [script for script in run_scripts({"jobs": {name: jobs[name]}}) if "matrix gather" in script]
        assert gathers and all(script.lstrip().startswith("shopt -s nullglob") for script in gathers), name
    # A train job in which one experiment failed still hands on the bundle of those that finished.
    [upload] = [step for step in jobs["train"]["steps"] if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["if"] == "${{ !cancelled() && hashFiles('bundle/dvc.lock') != '' }}"
    # No run without train jobs counts as partial: its report is whole.
    for step in jobs["report"]["steps"]:
        if "COMPLETE" in step.get("env", {}):
            assert step["env"]["COMPLETE"] == "${{ needs.train.result == 'success' || needs.train.result == 'skipped' }}"

    uploads = [re.sub(r"\$\{\{[^}]*\}\}", "*", step["with"]["name"]) for job in jobs.values()
               for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact@")]
    for name, job in jobs.items():
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/download-artifact@"):
                pattern = step["with"]["pattern"]
                assert any(fnmatch.fnmatch(upload.replace("*", "x"), pattern) for upload in uploads), (name, pattern)
                assert "merge-multiple" not in step["with"]  # gather wants one folder per bundle

    header = text.split("\nname:", 1)[0]
    for secret in set(re.findall(r"secrets\.(\w+)", text)):
        assert secret in header, f"secret {secret} is not one the header documents"
    # The plan checks the variables the later jobs rely on, and asks the DVC remote what it holds;
    # the report gathers the suite's report.
    plan_env = next(step for step in jobs["plan"]["steps"] if step.get("id") == "plan")["env"]
    assert plan_env == {"GPU_RUNNER_LABELS": "${{ vars.GPU_RUNNER_LABELS }}", **{
        key: f"${{{{ secrets.{key} }}}}" for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    assert "MLFLOW_TRACKING_URI" in workflow["env"]
    assert any('gather bundles/* --suite "$SUITE"' in script for script in run_scripts({"jobs": {"r": jobs["report"]}}))
    # A report gather did not make (experiments of the suite outside the run are stale) makes the
    # pull request partial, as a failed train job does.
    [gather] = [step for step in jobs["report"]["steps"] if step.get("id") == "gather"]
    assert '--suite "$SUITE"' in gather["run"]
    [propose] = [step for step in jobs["report"]["steps"] if "REPORT" in step.get("env", {})]
    assert propose["env"]["REPORT"] == "${{ steps.gather.outputs.report }}"
    assert 'elif [ "$REPORT" = "not made" ]; then\n  title="Retrain $SUITE, partial' in propose["run"]


def test_the_pin_job_asks_kaggle_weekly_and_proposes_new_versions_as_a_pull_request() -> None:
    """A new version of an unpinned Kaggle dataset changes nothing in git, so neither a push nor
    `plan --changed` can see it: the `pin` job, on the schedule and by hand (not on a push), runs
    `matrix pin` (README), opens a pull request for what it pinned, whose merge is a push to
    params.yaml that retrains, and fails when the check could not settle (Kaggle not asked, exit 2)."""
    workflow = load("retrain.yml")
    job = workflow["jobs"]["pin"]
    assert job["if"] == "${{ github.event_name == 'schedule' || github.event_name == 'workflow_dispatch' }}"
    assert job["environment"] == "retrain" and "needs" not in job
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}
    scripts = run_scripts({"jobs": {"pin": job}})
    assert scripts[0].strip() == "make env"
    [ask] = [step for step in job["steps"] if "stages.matrix pin --suite" in step.get("run", "")]
    assert ask["id"] == "pin" and '.venv/bin/python -m stages.matrix pin --suite "$SUITE" || status=$?' in ask["run"]
    assert set(ask["env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "KAGGLE_API_TOKEN"}
    assert "python -m stages.matrix pin --suite" in (REPO / "README.md").read_text()
    [propose] = [step for step in job["steps"] if "gh pr create" in step.get("run", "")]
    assert propose["if"] == "${{ steps.pin.outputs.title != '' }}"
    assert propose["env"]["TITLE"] == "${{ steps.pin.outputs.title }}"
    assert 'gh pr create --base main --head "$branch" --title "$TITLE"' in propose["run"]
    # Merging the pull request is a push to params.yaml, which the push trigger retrains.
    assert "params.yaml" in workflow["on"]["push"]["paths"]
    # The check's status decides last: exit 2 (or 1) fails the job, after any pull request.
    assert job["steps"][-1]["env"] == {"STATUS": "${{ steps.pin.outputs.status }}"}
    for status, fails in (("0", False), ("3", False), ("1", True), ("2", True)):
        done = subprocess.run(["bash", "-e", "-c", job["steps"][-1]["run"]], env={"STATUS": status, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True)
        assert (done.returncode != 0) == fails, status


def test_the_pin_pull_request_commits_only_params_yaml_on_a_branch_of_its_own(tmp_path: Path) -> None:
    """The pin job's pull request step, `git push` and `gh` stood in for: one commit by
    github-actions[bot] of params.yaml alone (not pin.log or anything else in the checkout), on its
    own branch, never main, titled with what was pinned; and none where a pull request of that
    title exists (Dependabot's way: closing one skips those versions)."""
    import shutil

    [step] = [step for step in load("retrain.yml")["jobs"]["pin"]["steps"] if "gh pr create" in step.get("run", "")]
    calls, bin_dir = tmp_path / "calls", tmp_path / "bin"
    bin_dir.mkdir()
    real_git = shutil.which("git")
    (bin_dir / "git").write_text(f'#!/bin/bash\nif [ "$1" = push ]; then echo "git $*" >> {calls}; exit 0; fi\nexec {real_git} "$@"\n')
    # `gh pr list` answers the titles in $PROPOSED (the pull requests there are, open or closed).
    (bin_dir / "gh").write_text(f'#!/bin/bash\necho "gh $*" >> {calls}\n'
                                'if [ "$1 $2" = "pr list" ]; then printf "%s" "$PROPOSED"; fi\n')
    for tool in ("git", "gh"):
        (bin_dir / tool).chmod(0o755)
    repo = tmp_path / "repo"
    retrained_repository(repo)
    (repo / "params.yaml").write_text("datasets: {}\n")
    subprocess.run([real_git, "add", "params.yaml"], cwd=repo, check=True)
    subprocess.run([real_git, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "params"], cwd=repo, check=True)
    (repo / "params.yaml").write_text("datasets: {pets: {source: {version: 2}}}\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SUITE": "course", "RUN_ID": "42", "GH_TOKEN": "token",
           "GITHUB_REPOSITORY": "o/r", "RUN_URL": "https://github.com/o/r/actions/runs/42", "TITLE": "Pin pets to Kaggle version 2",
           "PROPOSED": "Retrain course (run 41)\nPin pets to Kaggle version 1\nPin pets to Kaggle version 2, zoo to Kaggle version 5\n"}

    subprocess.run(["bash", "-e", "-c", step["run"]], cwd=repo, env=env, check=True, capture_output=True, text=True)

    lines = calls.read_text().splitlines()
    assert lines[0].startswith("gh pr list --state all ")
    assert lines[1] == "git push https://x-access-token:token@github.com/o/r.git pin/course-42"
    assert lines[2].startswith("gh pr create --base main --head pin/course-42 --title Pin pets to Kaggle version 2 --body ")
    show = subprocess.run([real_git, "show", "--name-only", "--format=%an%n%s", "pin/course-42"], cwd=repo,
                          capture_output=True, text=True, check=True)
    assert show.stdout.split("\n")[:4] == ["github-actions[bot]", "Pin pets to Kaggle version 2", "", "params.yaml"]

    # A pull request of that title exists (open, or closed to skip those versions): not proposed again.
    calls.unlink()
    subprocess.run([real_git, "switch", "-q", "-"], cwd=repo, check=True)
    done = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=repo, check=True, capture_output=True, text=True,
                          env=env | {"PROPOSED": env["PROPOSED"] + "Pin pets to Kaggle version 2\n", "RUN_ID": "43"})
    assert [line.split()[:3] for line in calls.read_text().splitlines()] == [["gh", "pr", "list"]]
    assert "not proposed again" in done.stdout
