"""Fan the pipeline out over CI jobs (or shells), and gather what they made.

    python -m stages.matrix plan --suite course [--pattern 'ham10000-*'] [--per-job 4]
    python -m stages.matrix run split@digits --bundle out/prepare-digits
    python -m stages.matrix run evaluate@digits-small_cnn evaluate@digits-mobilenetv2 --bundle out/train-1
    python -m stages.matrix gather out/* --suite demo
    python -m stages.matrix summary --base origin/main

`plan` turns params.yaml into the jobs of a GitHub Actions matrix (JSON on stdout, and into
$GITHUB_OUTPUT when set): `prepare`, one job per dataset of the chosen experiments, running its
fetch, validate and split stages; `train`, the experiments in groups of `--per-job` (one dataset
per group, so a job never fetches data another job prepared), running weights, train and evaluate.

`run` is one job: `dvc pull` what the targets need from the DVC remote (what is missing there is
made), `dvc repro` the targets, `dvc push` everything they and their upstream stages made. With
`--bundle` it also writes the job's part of dvc.lock and the outputs DVC does not cache (metrics,
plot data) into a folder for the next job. `gather` merges such folders back into the workspace:
their dvc.lock entries (two jobs that recorded the same stage differently stop it), their files,
and with `--suite`, runs and pushes the suite's report. `summary` writes `dvc params diff` and
`dvc metrics diff` against a revision as Markdown, for a job summary or a pull-request comment.

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
from pathlib import Path
from typing import Any

import yaml

from stages.config import load_params
from stages.errors import UserError, run_stage

LOCK = "dvc.lock"
BUNDLE_LOCK = "dvc.lock"
BUNDLE_FILES = "files"
# Stages that make a dataset ready to train on; the rest of an experiment's chain follows them.
PREPARE = ("split",)


def plan(params_path: str, suite: str, patterns: list[str], per_job: int) -> dict[str, Any]:
    """The jobs for `suite`'s experiments that match any of `patterns` (all if none)."""
    if per_job < 1:
        raise UserError(f"--per-job must be at least 1, got {per_job}")
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
    prepare = [{"name": dataset, "targets": " ".join(f"{stage}@{dataset}" for stage in PREPARE)} for dataset in by_dataset]
    train = []
    for dataset, members in by_dataset.items():
        for start in range(0, len(members), per_job):
            group = members[start : start + per_job]
            name = group[0] if len(group) == 1 else f"{dataset} ({start // per_job + 1})"
            train.append({"name": name, "experiments": " ".join(group), "targets": " ".join(f"evaluate@{e}" for e in group)})
    return {"suite": suite, "prepare": {"include": prepare}, "train": {"include": train}, "report": f"report@{suite}"}


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the DVC command line, its output going to ours; a failure is one line naming the command."""
    command = ["dvc", *args]
    print(f"$ {' '.join(command)}", flush=True)
    result = subprocess.run(command)
    if check and result.returncode != 0:
        raise UserError(f"`{' '.join(command)}` failed with exit status {result.returncode} (its output is above)")
    return result


def has_remote() -> bool:
    result = subprocess.run(["dvc", "remote", "list"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def upstream_stages(targets: list[str]) -> list[Any]:
    """The stages of `targets` and every stage they depend on, dependencies first."""
    import networkx as nx
    from dvc.repo import Repo

    repo = Repo(".")
    graph = repo.index.graph
    seen: dict[str, Any] = {}
    for target in targets:
        for stage in repo.stage.collect(target):
            for node in nx.dfs_postorder_nodes(graph, stage):
                seen.setdefault(node.addressing, node)
    return list(seen.values())


def read_lock(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"schema": "2.0", "stages": {}}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data.get("stages", {}), dict):
        raise UserError(f"{path}: not a dvc.lock file (no `stages:` mapping)")
    data.setdefault("stages", {})
    return data


def write_lock(path: Path, data: dict[str, Any]) -> None:
    from stages.files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


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
    differently is an error: two jobs ran it from different inputs."""
    merged = {**base, "stages": dict(base.get("stages", {}))}
    origin: dict[str, str] = {}
    for name, lock in bundles:
        for stage, entry in lock.get("stages", {}).items():
            if stage in origin and merged["stages"][stage] != entry:
                raise UserError(
                    f"{stage} is recorded differently by {origin[stage]} and {name}: two jobs ran it from different "
                    "inputs; rerun the matrix from one commit"
                )
            merged["stages"][stage] = entry
            origin[stage] = name
    return merged


def gather(folders: list[Path]) -> list[str]:
    """Merge the bundles in `folders` into dvc.lock and the workspace; returns the stages merged."""
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


def summary(base: str) -> str:
    """`dvc params diff` and `dvc metrics diff` against `base`, as Markdown."""
    sections = []
    for what in ("params", "metrics"):
        result = subprocess.run(["dvc", what, "diff", base, "--md"], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"`dvc {what} diff {base} --md` failed: {result.stderr.strip().splitlines()[-1:] or ['?']}")
        body = result.stdout.strip() or f"No {what} changed."
        sections.append(f"### {what.capitalize()} against `{base}`\n\n{body}\n")
    return "\n".join(sections)


def to_github_output(values: dict[str, str]) -> None:
    """Append `name=value` lines to the file GitHub Actions names in GITHUB_OUTPUT, if any."""
    path = os.environ.get("GITHUB_OUTPUT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            for key, value in values.items():
                handle.write(f"{key}={value}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="the jobs, as JSON for a GitHub Actions matrix")
    p.add_argument("--suite", required=True)
    p.add_argument("--pattern", action="append", default=[], help="experiment name glob (repeatable); default all")
    p.add_argument("--per-job", type=int, default=1, help="experiments per training job (default 1)")
    p.add_argument("--params", default="params.yaml")
    r = commands.add_parser("run", help="pull, reproduce and push some targets")
    r.add_argument("targets", nargs="+")
    r.add_argument("--bundle", type=Path, help="write the job's dvc.lock entries and uncached outputs here")
    r.add_argument("--no-pull", action="store_true")
    r.add_argument("--no-push", action="store_true")
    g = commands.add_parser("gather", help="merge bundles into dvc.lock and the workspace")
    g.add_argument("bundles", nargs="+", type=Path)
    g.add_argument("--suite", help="then reproduce and push this suite's report")
    g.add_argument("--no-push", action="store_true")
    s = commands.add_parser("summary", help="params and metrics diff against a revision, as Markdown")
    s.add_argument("--base", default="HEAD")
    args = parser.parse_args(argv)

    if args.command == "plan":
        jobs = plan(args.params, args.suite, args.pattern, args.per_job)
        print(json.dumps(jobs, indent=2))
        to_github_output({key: json.dumps(jobs[key]) for key in ("prepare", "train")} | {"report": jobs["report"]})
    elif args.command == "run":
        remote = has_remote()
        if remote and not args.no_pull:
            # What the remote lacks is simply made by repro; --allow-missing keeps pull from failing on it.
            dvc("pull", "--allow-missing", "--with-deps", *args.targets)
        dvc("repro", *args.targets)
        if remote and not args.no_push:
            dvc("push", "--with-deps", *args.targets)
        if args.bundle:
            stages = bundle(args.targets, args.bundle)
            print(f"matrix: {len(stages)} stages bundled in {args.bundle}")
    elif args.command == "gather":
        stages = gather(args.bundles)
        print(f"matrix: {len(stages)} stages from {len(args.bundles)} bundles merged into {LOCK}")
        if args.suite:
            # --single-item: the upstream stages are recorded in dvc.lock and their outputs are
            # on the remote; only the report itself needs its inputs here.
            dvc("repro", "--single-item", f"report@{args.suite}")
            if has_remote() and not args.no_push:
                dvc("push", f"report@{args.suite}")
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
