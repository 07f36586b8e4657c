"""Fan the pipeline out over CI jobs (or shells), and gather what they made.

    python -m stages.matrix plan --suite course [--pattern 'ham10000-*'] [--per-job 4] [--changed]
    python -m stages.matrix run split@digits --bundle out/prepare-digits
    python -m stages.matrix run evaluate@digits-small_cnn evaluate@digits-mobilenetv2 --bundle out/train-1
    python -m stages.matrix gather out/* --suite demo
    python -m stages.matrix summary --base origin/main
    python -m stages.matrix local --suite course --gpus 0,1,2,3
    python -m stages.matrix pin --suite course

`plan` turns params.yaml into the jobs of a GitHub Actions matrix (JSON on stdout, and into
$GITHUB_OUTPUT when set): `prepare`, one job per dataset of the chosen experiments, running its
fetch, validate and split stages; `train`, the experiments in groups of `--per-job` (one dataset
per group, so a job never fetches data another job prepared), running weights, train and evaluate.
With `--changed` it keeps only what `dvc repro` would run, judged from dvc.lock without the data,
asking the remote whether it holds the outputs (stale_stages), and says on stderr why each kept
experiment runs.

`run` is one job: `dvc pull` what the targets need from the DVC remote (what is missing there is
made), `dvc repro --keep-going --pull` the targets (a stage run before from the same inputs,
whose dvc.lock entry never reached main, is restored from DVC's run cache on the remote), `dvc
push` everything they and their upstream stages made, and the run-cache entries the job made
with the objects of their outputs. With
`--bundle` it also writes the job's part of dvc.lock and the outputs DVC does not cache (metrics,
plot data) into a folder for the next job. `gather` merges such folders back into the workspace:
their dvc.lock entries (two jobs that recorded the same stage differently stop it), their files,
and with `--suite`, runs and pushes the suite's report. `summary` writes `dvc params diff` and
`dvc metrics diff` against a revision as Markdown, for a job summary or a pull-request comment.

`pin` is the weekly retrain's look at Kaggle: for the suite's Kaggle datasets, it pulls the
provenance records of the unpinned ones from the DVC remote (only those, not the data) and runs
`python -m stages.fetch --check --pin` on them all, which writes each new version into
params.yaml (an unpinned dataset's first pin, a pinned one's next); its exit status is the
check's (0: nothing new; 3: pinned; 2: Kaggle could not be asked; 1: a change left to a person,
such as the version fetched deleted on Kaggle), and into $GITHUB_OUTPUT it writes `title`, "Pin
<dataset> to Kaggle version N, ..." (empty: nothing pinned).

`local` runs the matrix on one machine with several GPUs: the shared stages once (split, weights),
then one `dvc --wait-for-lock repro --single-item train@<experiment> evaluate@<experiment>` per
experiment, each pinned to its own GPU with CUDA_VISIBLE_DEVICES, as many at once as there are
GPUs (or `--jobs` on CPUs), then the report (with `--pattern`, only if the rest of the suite is
up to date). DVC releases its repository lock while a stage's command runs, so the runs overlap
and each records its stages in dvc.lock when it finishes; the MLflow experiments are made before
the runs start, so they never race to create them.

Each step is a thin call to the real DVC command line; the same commands run a matrix by hand.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any


from stages.config import load_params
from stages.errors import UserError, run_stage

LOCK = "dvc.lock"
BUNDLE_LOCK = "dvc.lock"
BUNDLE_FILES = "files"
# Stages that make a dataset ready to train on; the rest of an experiment's chain follows them.
PREPARE = ("split",)


def select(params_path: str, suite: str, patterns: list[str]) -> dict[str, list[str]]:
    """`suite`'s experiments that match any of `patterns` (all if none), by dataset."""
    params = load_params(params_path)
    names = [n for n in params.suite_experiments(suite) if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise UserError(
            f"no experiment of suite {suite!r} matches {' or '.join(repr(p) for p in patterns)}; "
            f"the suite has: {', '.join(params.suite_experiments(suite)) or 'none'}"
        )
    by_dataset: dict[str, list[str]] = {}
    for name in names:
        by_dataset.setdefault(params.experiments[name].dataset, []).append(name)
    return by_dataset


def kaggle_datasets(params_path: str, suite: str) -> dict[str, int | None]:
    """`suite`'s datasets whose source is a Kaggle dataset (not a competition, which has no
    versions), each with its pinned version (None: unpinned), which `fetch --check --pin` moves on
    to a newer version Kaggle has."""
    params = load_params(params_path)
    return {name: source.options.version for name in select(params_path, suite, [])
            if (source := params.dataset(name).source).kind == "kaggle" and source.options.dataset}


def plan(params_path: str, suite: str, patterns: list[str], per_job: int, changed: bool = False) -> dict[str, Any]:
    """The jobs for `suite`'s experiments that match any of `patterns` (all if none); with
    `changed`, only those `dvc repro` would run (see stale_stages), and the report if it would."""
    if per_job < 1:
        raise UserError(f"--per-job must be at least 1, got {per_job}")
    by_dataset = select(params_path, suite, patterns)
    report = f"report@{suite}"
    stale = None
    if changed:
        names = [name for members in by_dataset.values() for name in members]
        stale = stale_stages([*(f"evaluate@{name}" for name in names), report])
        kept = {dataset: [n for n in members if f"evaluate@{n}" in stale] for dataset, members in by_dataset.items()}
        print(f"matrix plan: {sum(map(len, kept.values()))} of {len(names)} experiments to run"
              + "".join(f"\n  {n} {first_cause(stale, f'evaluate@{n}')}" for members in kept.values() for n in members)
              + f"\n  {report} {first_cause(stale, report) if report in stale else 'is up to date'}", file=sys.stderr)
        by_dataset = {dataset: members for dataset, members in kept.items() if members}
    prepare = [{"name": dataset, "targets": " ".join(f"{stage}@{dataset}" for stage in PREPARE)} for dataset in by_dataset
               if stale is None or any(f"{stage}@{dataset}" in stale for stage in PREPARE)]
    train = []
    for dataset, members in by_dataset.items():
        for start in range(0, len(members), per_job):
            group = members[start : start + per_job]
            name = group[0] if len(group) == 1 else f"{dataset} ({start // per_job + 1})"
            train.append({"name": name, "experiments": " ".join(group), "targets": " ".join(f"evaluate@{e}" for e in group)})
    return {
        "suite": suite, "prepare": {"include": prepare}, "train": {"include": train}, "report": report,
        # What the workflow's `if:`s read: GitHub refuses a matrix with nothing to include.
        # The report job also gathers the train jobs' dvc.lock entries, so it runs whenever they do.
        "counts": {"prepare": len(prepare), "train": len(train), "report": int(stale is None or bool(train) or report in stale)},
    }


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the DVC command line, its output going to ours; a failure is one line naming the command."""
    command = ["dvc", *args]
    print(f"$ {' '.join(command)}", flush=True)
    result = subprocess.run(command)
    if check and result.returncode != 0:
        raise UserError(f"`{' '.join(command)}` failed with exit status {result.returncode} (its output is above)")
    return result


NO_REMOTE = "matrix: no default DVC remote (dvc remote add -d ...):"


def tracked_inputs() -> list[str]:
    """The `.dvc` files git tracks: inputs put under DVC with `dvc add` (a dataset downloaded by
    hand), which no stage produces, so that `dvc pull --with-deps <stage>` alone would not fetch."""
    result = subprocess.run(["git", "ls-files", "*.dvc"], capture_output=True, text=True)
    return sorted(line for line in result.stdout.splitlines() if line.strip()) if result.returncode == 0 else []


def has_remote() -> bool:
    """Whether there is a default DVC remote, the one `dvc pull` and `dvc push` use: a remote added
    without -d is not one (`dvc pull` says "No remote provided" and exits 0, pulling nothing)."""
    result = subprocess.run(["dvc", "remote", "default"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def missing_ci_settings() -> list[str]:
    """What a CI run needs before it starts its jobs, and lacks: checked by `plan` on a runner,
    so that a repository without them fails in one job, not in fifty (or with GPU jobs queued for
    a day waiting for a runner label nobody has, or runs logged to each runner's own database)."""
    missing = []
    if not has_remote():
        missing.append("a default DVC remote, which the jobs share their outputs through (dvc remote add -d storage "
                       "s3://<bucket>/classmatrix, or dvc remote default <name> for one added without -d, and commit "
                       ".dvc/config)")
    if not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        missing.append("the repository variable MLFLOW_TRACKING_URI (the shared MLflow server's URL: without it "
                       "each job logs to a database on its own runner, which is thrown away)")
    labels = os.environ.get("GPU_RUNNER_LABELS", "").strip()
    try:
        parsed = json.loads(labels)
        valid = isinstance(parsed, list) and bool(parsed) and all(isinstance(x, str) and x.strip() for x in parsed)
    except ValueError:
        valid = False
    if not valid:
        shown = f" (it is {labels!r}, not a JSON list of runner labels)" if labels else ""
        missing.append(f"the repository variable GPU_RUNNER_LABELS{shown}: the training jobs' runner labels as JSON, "
                       "e.g. [\"self-hosted\", \"gpu\"], or [\"ubuntu-24.04\"] to train on GitHub's CPU runners")
    return missing


def upstream_stages(targets: list[str], repo: Any = None) -> list[Any]:
    """The stages of `targets` and every stage they depend on, dependencies first; as `dvc repro`
    walks them, a frozen stage's own dependencies left out."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.repo.reproduce import get_active_graph

    from dvc.stage.exceptions import StageNotFound

    repo = repo or Repo(".")
    graph = get_active_graph(repo.index.graph)
    seen: dict[str, Any] = {}
    for target in targets:
        try:
            collected = repo.stage.collect(target)
        except StageNotFound as error:
            raise UserError(f"matrix run: {target}: no such stage in dvc.yaml; `dvc stage list` lists them "
                            "(evaluate@<experiment>, split@<dataset>, ...)") from error
        for stage in collected:
            for node in nx.dfs_postorder_nodes(graph, stage):
                seen.setdefault(node.addressing, node)
    return list(seen.values())


def stale_stages(targets: list[str]) -> dict[str, str]:
    """The stages of `targets` and upstream that `dvc repro` would run, each with why, judged
    without the data, as a CI runner has none: from dvc.lock, params.yaml and the files git has.

    A stage runs when it has no dvc.lock entry, its command, a param or a file it depends on
    changed, an output is new, missing from the DVC remote or (not cached by DVC) from git, or a
    stage it depends on runs. That last is an over-estimate: DVC reruns a stage below one that ran
    only if what the upper one made differs, which cannot be known before it runs. Data that is
    not here counts as what dvc.lock records, as `dvc repro --allow-missing` counts it, unless the
    stage that makes it recorded other content; the remote is asked whether it holds the outputs
    (absent_from_remote). Data that is here is compared as DVC compares it."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    repo = Repo(".")
    recorded = read_lock(Path(LOCK))["stages"]
    stale: dict[str, str] = {}
    with repo.lock:
        stages = [stage for stage in upstream_stages(targets, repo) if isinstance(stage, PipelineStage)]
        absent = absent_from_remote(repo, stages)  # a .dvc file (`dvc add`) is an input, never run
        for stage in stages:
            upstream = list(repo.index.graph.successors(stage))
            why = _why_stale(stage, upstream, stale, recorded, absent)
            if why:
                stale[stage.addressing] = why
    return stale


def unfinished(targets: list[str]) -> list[str]:
    """The targets a failed `dvc repro` left undone, judged with the data it left here: it pulled
    or made the outputs of every stage of their chains, so a stage whose outputs are missing (DVC
    removed them before running it, and it failed) or whose deps are not what dvc.lock records
    (below one that failed) has not run. Not stale_stages, which counts missing outputs as on
    the remote, and would call done a stage that ran because the remote lacked them, then failed."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    def undone(stage: Any) -> bool:
        if not isinstance(stage, PipelineStage) or stage.frozen:
            return False  # DVC runs no frozen stage
        if stage.always_changed or stage.is_callback:
            return stage.changed_outs()  # it runs every time, and is "changed" after it has run too
        return stage.changed()

    repo = Repo(".")
    with repo.lock:
        return [target for target in targets if any(undone(stage) for stage in upstream_stages([target], repo))]


def uncached_missing(targets: list[str]) -> list[str]:
    """The stages of `targets` and upstream that dvc.lock records, with an output DVC does not
    cache (metrics, in git) missing here. `dvc repro --pull` takes such a stage, if nothing else
    of it changed, as pulled, and does not run it, though that output stays missing."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    recorded = read_lock(Path(LOCK))["stages"]
    repo = Repo(".")
    with repo.lock:
        return [stage.addressing for stage in upstream_stages(targets, repo)
                if isinstance(stage, PipelineStage) and not stage.frozen and stage.addressing in recorded
                and any(not out.use_cache and not out.exists for out in stage.outs)]


def first_cause(stale: dict[str, str], stage: str) -> str:
    """Why `stage` runs, from the first stage of its chain that runs for a reason of its own:
    "(from weights@x) params.yaml: experiments.x modified"."""
    why, origin = stale[stage], stage
    while why.endswith(RUNS) and why[: -len(RUNS)] in stale:
        origin = why[: -len(RUNS)]
        why = stale[origin]
    return f"(from {origin}) {why}"


RUNS = " runs"


def absent_from_remote(repo: Any, stages: list[Any]) -> set[str]:
    """The objects of the DVC-cached outputs dvc.lock records for `stages` that neither this cache
    nor the default DVC remote holds (for a folder, its listing): `dvc repro --pull` runs their
    stages again. A stage's job pushed them, unless it never ran in CI, or its output was in git
    then (`cache: false`, since changed). Without a remote nothing is asked (on a runner, `plan`
    stopped before), nor of a cloud-versioned one, which keeps files by path, not by hash.

    A remote that cannot be read, or that holds no objects at all (a mistyped bucket reads as an
    empty one), stops a CI runner in one line, rather than planning the whole suite; elsewhere
    one line says so, and the outputs are taken to be on a remote that cannot be read."""
    from dvc.config import NoRemoteError
    from dvc.fs import HTTPFileSystem

    ci = os.environ.get("GITHUB_ACTIONS") == "true"
    wanted: dict[str, set[str]] = {}
    for stage in stages:
        for out in stage.outs:
            info = out.hash_info
            if out.use_cache and info and info.value and not out.cache.exists(info.value):
                wanted.setdefault(info.name, set()).add(info.value)
    if not wanted:
        return set()
    absent: set[str] = set()
    try:
        remote = repo.cloud.get_remote(None, "plan --changed")
        if remote.worktree or remote.fs.version_aware:
            print("matrix: the DVC remote is cloud-versioned (worktree or version_aware), which keeps files by path, "
                  "not by hash: the outputs dvc.lock records are taken to be on it", file=sys.stderr)
            return set()
        odbs = {name: repo.cloud.get_remote_odb(None, "plan --changed", hash_name=name) for name in wanted}
        for name, values in wanted.items():
            absent |= values - set(odbs[name].list_oids_exists(sorted(values), jobs=16))
        # An http remote lists no folders: its emptiness is not judged.
        empty = len(absent) == sum(map(len, wanted.values())) and not any(
            isinstance(odb.fs, HTTPFileSystem) or odb.fs.exists(odb.path) for odb in odbs.values())
    except NoRemoteError as error:
        if ci:
            raise UserError("matrix: no default DVC remote, which the plan asks what it holds; dvc remote default <name> "
                            "(or dvc remote add -d ...) and commit .dvc/config") from error
        return set()
    except Exception as error:  # noqa: BLE001 - credentials, network: each its own type
        unread = f"the DVC remote could not be read ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"
        if ci:
            raise UserError(f"matrix: {unread}; check its URL in .dvc/config and its credentials (the plan job gets "
                            "the retrain environment's secrets AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from error
        print(f"matrix: {unread}; the outputs dvc.lock records are taken to be on it", file=sys.stderr)
        return set()
    if empty:
        # Judged from the remote itself, not from the outputs asked about: a remote that holds
        # others has simply not been sent these (a dvc.lock committed without `dvc push`).
        none = f"the DVC remote holds no objects at all (none of the {len(absent)} outputs dvc.lock records that are not here)"
        if ci:
            raise UserError(f"matrix: {none}; check its URL in .dvc/config (a mistyped bucket or path reads as empty), "
                            "`dvc push` from the workstation that made them, or dispatch the workflow with everything")
        print(f"matrix: {none}; their stages are planned", file=sys.stderr)
    return absent


def _why_stale(stage: Any, upstream: list[Any], stale: dict[str, str], recorded: dict[str, Any], absent: set[str]) -> str | None:
    if stage.frozen:
        return None
    rerun = [u.addressing for u in upstream if u.addressing in stale]
    if rerun:
        return f"{rerun[0]}{RUNS}"
    if stage.addressing not in recorded:
        return f"no {LOCK} entry"
    if stage.is_callback or stage.always_changed:
        return "always changed"
    if stage.changed_stage():
        return "its command changed"
    for dep in stage.deps:
        status = dep.status().get(str(dep))
        if status == "deleted":
            if not dep.hash_info:
                return f"{dep}: not in {LOCK}"  # a dependency new to dvc.yaml
            # As `dvc repro --allow-missing` judges it: only a path another stage makes is compared
            # (a file inside another stage's folder is taken as recorded).
            made = [out for u in upstream for out in u.outs if out.fs_path == dep.fs_path]
            if not any(out.hash_info != dep.hash_info for out in made):
                continue  # not here, and as recorded
            status = "modified"
        if status:
            detail = ", ".join(f"{key} {value}" for key, value in status.items()) if isinstance(status, dict) else status
            return f"{dep}: {detail}"
    for out in stage.outs:
        if not out.hash_info:
            return f"{out}: not in {LOCK}"  # an output new to dvc.yaml: the remote cannot have it
        status = out.status().get(str(out))
        if status in ("not in cache", "deleted") and out.use_cache:
            if out.hash_info.value in absent:
                return f"{out}: not on the DVC remote"
            continue  # on the remote
        if status:
            # An output DVC does not cache (metrics) lives in git only: missing there, it is remade.
            return f"{out}: {status}{'' if out.use_cache else ' (not cached by DVC, and not in git)'}"
    return None


# dvc.lock is read and written with DVC's own YAML (ruamel, YAML 1.2), never PyYAML's 1.1: a
# param recorded as `off` is the string "off" to DVC, and PyYAML would turn it into `false`, which
# DVC would then see as a changed param and retrain for.


def read_lock(path: Path) -> dict[str, Any]:
    from dvc.utils.serialize import YAMLFileCorruptedError, parse_yaml

    if not path.exists():
        return {"schema": "2.0", "stages": {}}
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except YAMLFileCorruptedError as error:
        cause, mark = error.__cause__, getattr(error.__cause__, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: not valid YAML ({where}{getattr(cause, 'problem', None) or cause}); resolve it (a git merge "
                        "may have left conflict markers in it)") from error
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise UserError(f"{path}: not a dvc.lock file (no `stages:` mapping)")
    data.setdefault("stages", {})
    return data


def write_lock(path: Path, data: dict[str, Any]) -> None:
    from dvc.utils.serialize import dumps_yaml

    from stages.files import write_text_atomic

    write_text_atomic(path, dumps_yaml(data))  # what DVC itself writes dvc.lock with


def bundle(targets: list[str], folder: Path) -> list[str]:
    """Write the lock entries of `targets` and their upstream stages, and those stages' uncached
    outputs, into `folder`; returns the stage names."""
    stages = upstream_stages(targets)
    lock = read_lock(Path(LOCK))
    entries = {s.addressing: lock["stages"][s.addressing] for s in stages if s.addressing in lock["stages"]}
    missing = [s.addressing for s in stages if s.addressing not in lock["stages"]]
    if missing:
        raise UserError(f"{LOCK} has no entry for {', '.join(missing)}: run `dvc repro {' '.join(targets)}` first")
    folder.mkdir(parents=True, exist_ok=True)
    # A folder bundled into before holds only this run's files: gather would lay old ones over newer.
    if (folder / BUNDLE_FILES).is_dir():
        shutil.rmtree(folder / BUNDLE_FILES)
    write_lock(folder / BUNDLE_LOCK, {"schema": lock.get("schema", "2.0"), "stages": entries})
    for stage in stages:
        for out in stage.outs:
            if out.use_cache:
                continue
            source = Path(out.def_path)
            if not source.exists():
                raise UserError(f"{source}: an output of {stage.addressing} is missing; run `dvc repro {stage.addressing}`")
            target = folder / BUNDLE_FILES / source
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)
    return list(entries)


def merge_locks(base: dict[str, Any], bundles: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """`base` with every bundle's stage entries laid over it. A stage two bundles recorded
    differently is an error (two jobs ran it from different inputs, or made other outputs that a
    stage depends on), unless only outputs no stage depends on differ (validate's Data Docs, which
    hold their run time): the first job's entry is kept, its files being on the remote too."""
    merged = {**base, "stages": dict(base.get("stages", {}))}
    entries = [entry for lock in (base, *(lock for _, lock in bundles)) for entry in lock.get("stages", {}).values()]
    needed = {dep.get("path") for entry in entries for dep in entry.get("deps", [])}
    origin: dict[str, str] = {}
    for name, lock in bundles:
        for stage, entry in lock.get("stages", {}).items():
            if stage in origin and merged["stages"][stage] != entry:
                first = merged["stages"][stage]
                if {k: v for k, v in first.items() if k != "outs"} != {k: v for k, v in entry.items() if k != "outs"}:
                    raise UserError(
                        f"{stage} is recorded differently by {origin[stage]} and {name}: two jobs ran it from "
                        "different inputs; rerun the matrix from one commit"
                    )
                outs = [{out.get("path"): out for out in e.get("outs", [])} for e in (first, entry)]
                differ = sorted(str(path) for path in outs[0].keys() | outs[1].keys() if outs[0].get(path) != outs[1].get(path))
                if any(path in needed for path in differ):
                    raise UserError(
                        f"{stage} is recorded differently by {origin[stage]} and {name}: the same inputs made other "
                        f"outputs ({', '.join(p for p in differ if p in needed)}); rerun the matrix from one commit"
                    )
                continue  # only outputs nothing depends on differ: the first job's entry stands
            merged["stages"][stage] = entry
            origin[stage] = name
    return merged


def gather(folders: list[Path]) -> list[str]:
    """Merge the bundles in `folders` into dvc.lock and the workspace; returns the stages merged."""
    if not folders:
        return []  # nothing ran before (a report-only run): dvc.lock stays as git has it
    bundles = []
    for folder in folders:
        lock_path = folder / BUNDLE_LOCK
        if not lock_path.is_file():
            raise UserError(f"{folder}: not a bundle (no {BUNDLE_LOCK}); make one with `python -m stages.matrix run ... --bundle {folder}`")
        bundles.append((str(folder), read_lock(lock_path)))
    merged = merge_locks(read_lock(Path(LOCK)), bundles)
    for folder in folders:
        files = folder / BUNDLE_FILES
        if files.is_dir():
            shutil.copytree(files, Path("."), dirs_exist_ok=True)
    write_lock(Path(LOCK), merged)
    return sorted({stage for _, lock in bundles for stage in lock["stages"]})


def behind(targets: list[str]) -> list[str]:
    """Of `targets`, those `dvc repro` would run (stale_stages), each with its first cause."""
    stale = stale_stages(targets)
    return [f"{target} {first_cause(stale, target)}" for target in targets if target in stale]


def summary(base: str) -> str:
    """`dvc params diff` and `dvc metrics diff` against `base`, as Markdown."""
    sections = []
    for what in ("params", "metrics"):
        result = subprocess.run(["dvc", what, "diff", base, "--md"], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"`dvc {what} diff {base} --md` failed: {last}")
        body = result.stdout.strip()
        if len(body.splitlines()) <= 2:  # nothing, or a table's header and rule with no rows
            body = f"No {what} changed."
        sections.append(f"### {what.capitalize()} against `{base}`\n\n{body}\n")
    return "\n".join(sections)


def run_pool(jobs: list[tuple[str, list[str]]], slots: list[str | None]) -> dict[str, int]:
    """Run the commands of `jobs` (name, argv), one per slot at a time: a slot is a GPU index
    (the job sees only that GPU, through CUDA_VISIBLE_DEVICES) or None (no pinning). Each output
    line is printed prefixed with its job's name. Returns each job's exit status."""
    if not slots:
        raise UserError("no GPU or job slot to run on: give --gpus 0,1,... or --jobs N (N >= 1)")
    waiting = deque(jobs)
    free = list(slots)
    running: dict[str, tuple[subprocess.Popen, str | None, threading.Thread]] = {}
    results: dict[str, int] = {}
    done = threading.Condition()
    finished: list[str] = []
    print_lock = threading.Lock()

    def relay(name: str, process: subprocess.Popen) -> None:
        for line in process.stdout:
            with print_lock:
                print(f"[{name}] {line}", end="", flush=True)
        process.wait()
        with done:
            finished.append(name)
            done.notify()

    while waiting or running:
        while waiting and free:
            name, argv = waiting.popleft()
            slot = free.pop(0)
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            print(f"matrix: {name} starts{f' on GPU {slot}' if slot is not None else ''}: {' '.join(argv)}", flush=True)
            process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            thread = threading.Thread(target=relay, args=(name, process), daemon=True)
            thread.start()
            running[name] = (process, slot, thread)
        with done:
            while not finished:
                done.wait()
            name = finished.pop(0)
        process, slot, thread = running.pop(name)
        thread.join()
        results[name] = process.returncode
        print(f"matrix: {name} {'finished' if process.returncode == 0 else f'failed (exit status {process.returncode})'}", flush=True)
        free.append(slot)
    return results


def local(params_path: str, suite: str, patterns: list[str], slots: list[str | None], report: bool) -> dict[str, int]:
    """The chosen experiments on this machine, as many at once as there are slots."""
    from stages import tracking

    if not slots:  # before the shared stages run: for the course, every download
        raise UserError("no GPU or job slot to run on: give --gpus 0,1,... or --jobs N (N >= 1)")
    by_dataset = select(params_path, suite, patterns)
    names = [name for members in by_dataset.values() for name in members]
    # What the experiments share runs once, before they start: two runs must not both decide
    # to make the same split.
    dvc("--wait-for-lock", "repro", *(f"split@{d}" for d in by_dataset), *(f"weights@{n}" for n in names))
    with tracking.unavailable("create the MLflow experiments", "start the server (or unset MLFLOW_TRACKING_URI) and run again"):
        for dataset in by_dataset:
            tracking.experiment_id(dataset)
    # --single-item: a job takes only its own stages. A repro that walks up to split@ takes a
    # write lock on the split's outputs even to skip it, and the other runs are reading them.
    jobs = [(n, ["dvc", "--wait-for-lock", "repro", "--single-item", f"train@{n}", f"evaluate@{n}"]) for n in names]
    results = run_pool(jobs, slots)
    failed = {name: code for name, code in results.items() if code}
    if failed:
        raise UserError(
            f"{len(failed)} of {len(names)} experiments failed: "
            + ", ".join(f"{name} (exit status {code})" for name, code in failed.items())
            + "; their output is above, prefixed with their names; the others are recorded in dvc.lock"
        )
    if report:
        # The report reproduces every experiment of the suite: with a pattern, the others would be
        # trained here, one after another outside the pool. As `gather --suite`, only if they are up to date.
        members = load_params(params_path).suite_experiments(suite)
        others = [name for name in members if name not in names]
        late = behind([f"evaluate@{name}" for name in others]) if others else []
        if late:
            print(f"matrix: report@{suite} not made: {len(late)} of the suite's {len(members)} experiments "
                  f"{'is' if len(late) == 1 else 'are'} not up to date ({'; '.join(late[:3])}"
                  f"{f' and {len(late) - 3} more' if len(late) > 3 else ''}); `dvc repro report@{suite}` makes it, "
                  "training them", flush=True)
        else:
            dvc("--wait-for-lock", "repro", f"report@{suite}")
    return results


def run_cache_files() -> set[str]:
    """The files of DVC's run cache here (one per stage run: its command, deps, params and outputs)."""
    from dvc.repo import Repo

    runs = Path(Repo(".").stage_cache.cache_dir)
    return {str(path) for path in runs.rglob("*") if path.is_file()} if runs.is_dir() else set()


def push_run_cache(before: set[str]) -> int:
    """Push the run-cache entries made since `before` (run_cache_files()) that the remote lacks,
    after the objects of their outputs; returns how many entries.

    Not `dvc push --run-cache`, which sends every entry of the local cache on each call (those
    `dvc repro --pull` brought from the remote too, one file at a time) and none of the objects of
    the outputs DVC does not cache (metrics, which the entry holds in the cache): no other runner
    could restore a stage with such an output."""
    from dvc import fs
    from dvc.config import RemoteConfigError
    from dvc.fs import HTTPFileSystem
    from dvc.repo import Repo

    repo = Repo(".")
    local = repo.cache.legacy
    made = run_cache_files() - before
    if not made:
        return 0
    try:
        remote = repo.cloud.get_remote_odb(None, "push --run-cache", hash_name="md5-dos2unix")
    except RemoteConfigError as error:  # a cloud-versioned or worktree remote
        print(f"matrix: run-cache entries are not pushed: {error}")
        return 0
    if isinstance(remote.fs, HTTPFileSystem):
        print("matrix: run-cache entries are not pushed: an http remote cannot hold them")
        return 0

    def relative(path: str) -> str:
        return local.fs.as_posix(local.fs.relpath(path, local.path))

    runs = remote.fs.join(remote.path, "runs")
    # `dvc repro --pull` brought the remote's entries here: made since `before` too, not new.
    there = {remote.fs.as_posix(remote.fs.relpath(path, remote.path)) for path in remote.fs.find(runs)} if remote.fs.exists(runs) else set()
    new = sorted(path for path in made if relative(path) not in there)
    if not new:
        return 0
    with repo.lock:
        used = [(Path(path).parent.name, Path(path).name) for path in new]
        objects = set().union(*repo.stage_cache.get_used_objs(used).values())
        result = repo.cloud.push(objects)
        if result.failed:
            raise UserError(f"matrix: {len(result.failed)} objects of the run cache's outputs could not be pushed; run again")
        for path in new:
            fs.generic.copy(local.fs, path, remote.fs, remote.fs.join(remote.path, relative(path)))
    return len(new)


def to_github_output(values: dict[str, str]) -> None:
    """Append `name=value` lines to the file GitHub Actions names in GITHUB_OUTPUT, if any."""
    path = os.environ.get("GITHUB_OUTPUT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            for key, value in values.items():
                handle.write(f"{key}={value}\n")


def main(argv: list[str] | None = None) -> None:
    # The DVC beside this Python (the workflow runs .venv/bin/python without .venv/bin on PATH).
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="the jobs, as JSON for a GitHub Actions matrix")
    p.add_argument("--suite", required=True)
    p.add_argument("--pattern", action="append", default=[], help="experiment name glob (repeatable); default all")
    p.add_argument("--per-job", type=int, default=1, help="experiments per training job (default 1)")
    p.add_argument("--changed", action="store_true",
                   help="only the experiments (and datasets) that dvc.lock says `dvc repro` would run; needs no data")
    p.add_argument("--params", default="params.yaml")
    r = commands.add_parser("run", help="pull, reproduce and push some targets")
    r.add_argument("targets", nargs="+")
    r.add_argument("--bundle", type=Path, help="write the job's dvc.lock entries and uncached outputs here")
    r.add_argument("--no-pull", action="store_true")
    r.add_argument("--no-push", action="store_true")
    g = commands.add_parser("gather", help="merge bundles into dvc.lock and the workspace")
    g.add_argument("bundles", nargs="*", type=Path, help="bundle folders (none: dvc.lock stays as it is)")
    g.add_argument("--suite", help="then reproduce and push this suite's report, if all its experiments are up to date")
    g.add_argument("--params", default="params.yaml")
    g.add_argument("--no-push", action="store_true")
    local_ = commands.add_parser("local", help="run experiments at once on this machine, one per GPU")
    local_.add_argument("--suite", required=True)
    local_.add_argument("--pattern", action="append", default=[], help="experiment name glob (repeatable); default all")
    where = local_.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpus", help="GPU indices, comma-separated: one experiment at a time on each")
    where.add_argument("--jobs", type=int, help="experiments at once, not pinned to GPUs (CPU-only machines)")
    local_.add_argument("--no-report", action="store_true", help="skip the suite's report")
    local_.add_argument("--params", default="params.yaml")
    s = commands.add_parser("summary", help="params and metrics diff against a revision, as Markdown")
    s.add_argument("--base", default="HEAD")
    pin = commands.add_parser("pin", help="pull the provenance records of the suite's unpinned Kaggle datasets, then "
                                          "`fetch --check --pin` its Kaggle datasets (exit status: the check's)")
    pin.add_argument("--suite", required=True)
    pin.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    if args.command == "plan":
        if os.environ.get("GITHUB_ACTIONS") == "true" and (missing := missing_ci_settings()):
            raise UserError("matrix plan: this repository lacks what the retrain jobs need: " + "; ".join(missing))
        jobs = plan(args.params, args.suite, args.pattern, args.per_job, changed=args.changed)
        print(json.dumps(jobs, indent=2))
        to_github_output({key: json.dumps(jobs[key]) for key in ("prepare", "train")} | {"report": jobs["report"]}
                         | {f"{key}_jobs": str(count) for key, count in jobs["counts"].items()})
    elif args.command == "run":
        remote = has_remote()
        if not remote and os.environ.get("GITHUB_ACTIONS") == "true":
            # CI's jobs hand each other their outputs through the remote; without one, each job
            # would fetch again and the bundles would disagree when gathered.
            raise UserError("matrix run: no default DVC remote, which CI's jobs share their outputs through; "
                            "dvc remote add -d storage s3://<bucket>/classmatrix (or dvc remote default <name>) "
                            "and commit .dvc/config")
        upstream_stages(args.targets)  # a target dvc.yaml lacks stops here, in one line, before anything runs
        if not remote and not (args.no_pull and args.no_push):
            print(f"{NO_REMOTE} nothing is pulled or pushed; the targets are made here")
        if remote and not args.no_pull:
            # What the remote lacks is simply made by repro; --allow-missing keeps pull from failing on it.
            # Inputs tracked with `dvc add` (a manual download under data/external) come too.
            dvc("pull", "--allow-missing", "--with-deps", *args.targets, *tracked_inputs())
        pull, push = remote and not args.no_pull, remote and not args.no_push
        before = run_cache_files()
        # --keep-going: a target that fails (one experiment of a job's group diverging, say) leaves
        # the others made, pushed and bundled. --pull: a stage already run from the same command,
        # deps and params (by a job whose dvc.lock was never merged, say) is restored from DVC's
        # run cache on the remote, not run again.
        if pull and (lost := uncached_missing(args.targets)):
            # `dvc repro --pull` would take these as pulled (their other outputs are here or on the
            # remote) and leave what they keep in git missing: without their dvc.lock entries it
            # restores them from the run cache or runs them, in order, with the rest, once.
            lock = read_lock(Path(LOCK))
            for stage in lost:
                del lock["stages"][stage]
            write_lock(Path(LOCK), lock)
            print(f"matrix: {', '.join(lost)}: an output kept in git is missing; made again")
        status = dvc("repro", "--keep-going", *(["--pull"] if pull else []), *args.targets, check=False).returncode
        failed = unfinished(args.targets) if status else []
        if status and not failed:
            raise UserError(f"`dvc repro {' '.join(args.targets)}` failed with exit status {status} (its output is above)")
        done = [target for target in args.targets if target not in failed]
        if push and done:
            dvc("push", "--with-deps", *done)
            print(f"matrix: {push_run_cache(before)} run-cache entries pushed")
        if args.bundle and done:
            stages = bundle(done, args.bundle)
            print(f"matrix: {len(stages)} stages bundled in {args.bundle}")
        if failed:
            kept = ""
            if done:
                what = ["made", *(["pushed"] if remote and not args.no_push else []), *(["bundled"] if args.bundle else [])]
                what_text = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
                kept = f"; {', '.join(done)} {'are' if len(done) > 1 else 'is'} {what_text}"
            raise UserError(f"matrix run: `dvc repro` failed for {', '.join(failed)} (its output is above){kept}")
    elif args.command == "gather":
        stages = gather(args.bundles)
        print(f"matrix: {len(stages)} stages from {len(args.bundles)} bundles merged into {LOCK}")
        if args.suite:
            # Every experiment of the suite must be up to date: a run of some (a dispatch with a
            # pattern) would otherwise make a report of the others' old results, recorded as current.
            names = load_params(args.params).suite_experiments(args.suite)
            late = behind([f"evaluate@{name}" for name in names])
            if late:
                print(f"matrix: report@{args.suite} not made: {len(late)} of the suite's {len(names)} experiments are "
                      f"not up to date ({'; '.join(late[:3])}{f' and {len(late) - 3} more' if len(late) > 3 else ''}); "
                      "a run of the whole suite makes it")
                to_github_output({"report": "not made"})
            else:
                # --single-item: the upstream stages are recorded in dvc.lock and their outputs are
                # on the remote; only the report itself needs its inputs here.
                dvc("repro", "--single-item", f"report@{args.suite}")
                if not args.no_push:
                    if has_remote():
                        dvc("push", f"report@{args.suite}")
                    else:
                        print(f"{NO_REMOTE} the report is not pushed")
                to_github_output({"report": "made"})
    elif args.command == "local":
        if args.gpus is not None:
            slots = [gpu.strip() for gpu in args.gpus.split(",") if gpu.strip()]
            if not all(gpu.isdigit() for gpu in slots):
                raise UserError(f"--gpus {args.gpus!r}: give GPU indices separated by commas, like 0,1,2")
            twice = next((gpu for i, gpu in enumerate(slots) if gpu in slots[:i]), None)
            if twice is not None:
                raise UserError(f"--gpus {args.gpus!r}: GPU {twice} is named twice; each GPU runs one experiment at a time, so name each once")
        else:
            slots = [None] * max(args.jobs, 0)
        results = local(args.params, args.suite, args.pattern, slots, report=not args.no_report)
        print(f"matrix: {len(results)} experiments reproduced")
    elif args.command == "pin":
        pins = kaggle_datasets(args.params, args.suite)
        if not pins:
            print(f"matrix: suite {args.suite} has no Kaggle dataset; nothing to check")
            return
        # The records are pulled where the check reads them, from the params file's folder (the
        # repository root, where DVC runs fetch@), whatever folder this runs from.
        params = str(Path(args.params).resolve())
        os.chdir(Path(params).parent)
        # An unpinned dataset's new version is one newer than fetch@ took, in its provenance record;
        # a pinned one's, one newer than its pin, which needs no record.
        records = [f"data/raw/{name}.provenance.json" for name, version in pins.items() if version is None]
        if records and has_remote():
            # The records alone, each one output of its fetch@ stage: the data beside them may be
            # gigabytes, and the check compares only the versions. --allow-missing: a dataset never
            # fetched has no record, which the check says.
            dvc("pull", "--allow-missing", *records)
        elif records and os.environ.get("GITHUB_ACTIONS") == "true":
            raise UserError("matrix pin: no default DVC remote, which holds the provenance records the check compares "
                            "Kaggle's versions with; dvc remote add -d storage s3://<bucket>/classmatrix and commit .dvc/config")
        elif records:
            print(f"{NO_REMOTE} the provenance records here are compared")
        from stages import fetch

        sys.stdout.flush()
        try:
            fetch.main(["--check", "--pin", "--params", params, *(arg for name in pins for arg in ("--dataset", name))])
        finally:
            # The pull request's title: what it pinned, whatever else the check saw (its exit status).
            now = {name: load_params(params).dataset(name).source.options.version for name in pins}
            pinned = [f"{name} to Kaggle version {now[name]}" for name in pins if now[name] != pins[name]]
            to_github_output({"title": f"Pin {', '.join(pinned)}" if pinned else ""})
    elif args.command == "summary":
        text = summary(args.base)
        print(text)
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:
            with open(step_summary, "a", encoding="utf-8") as handle:
                handle.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    run_stage(main)
