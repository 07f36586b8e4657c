"""The DVC graph templated from params.yaml: stage names, what each target pulls in, and the code
each stage depends on."""

from __future__ import annotations

import ast
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def project_with_two_suites(tmp_path: Path) -> Path:
    """The repository's pipeline plus a second dataset and suite that the demo must not touch."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    other = copy.deepcopy(params["datasets"]["digits"])
    other["source"] = {"kind": "local", "path": "elsewhere"}
    params["datasets"]["other"] = other
    params["experiments"]["other-small_cnn"] = {"suite": "extra", "dataset": "other", "backbone": "small_cnn"}
    params["suites"]["extra"] = {"description": "not the demo"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([dvc(), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def stages_of(target: str, cwd: Path) -> set[str]:
    """The stages `dvc repro <target>` would consider, from `dvc dag --dot`."""
    result = subprocess.run(
        [dvc(), "dag", "--dot", target], cwd=cwd, capture_output=True, text=True, check=True,
    )
    names = set()
    for line in result.stdout.splitlines():
        line = line.strip().rstrip(";")
        if line.startswith('"') and "->" not in line:
            names.add(line.split('"')[1])
    return names


def test_demo_target_pulls_in_only_the_demo_stages(project_with_two_suites: Path) -> None:
    """`dvc repro report@demo` reaches the digits stages and both demo experiments, nothing of `extra`."""
    assert stages_of("report@demo", project_with_two_suites) == {
        "fetch@digits",
        "validate@digits",
        "split@digits",
        "weights@digits-small_cnn",
        "weights@digits-mobilenetv2",
        "train@digits-small_cnn",
        "train@digits-mobilenetv2",
        "evaluate@digits-small_cnn",
        "evaluate@digits-mobilenetv2",
        "report@demo",
    }


def test_other_suite_target_pulls_in_only_its_own_stages(project_with_two_suites: Path) -> None:
    """The second suite's report depends on its own dataset and experiment alone."""
    assert stages_of("report@extra", project_with_two_suites) == {
        "fetch@other",
        "validate@other",
        "split@other",
        "weights@other-small_cnn",
        "train@other-small_cnn",
        "evaluate@other-small_cnn",
        "report@extra",
    }


# Modules whose changes cannot change what a stage writes: error reporting, atomic writes,
# progress bars, the registry's lookup. Listing them would rerun the whole matrix for nothing.
PLUMBING = {"errors", "files", "progress", "registry"}


def imported_stage_modules(module: str) -> set[str]:
    """The `stages` modules that `stages/<module>.py` imports, at module level or in a function."""
    tree = ast.parse((REPO / "stages" / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "stages":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("stages.")}
    return found


def code_a_stage_runs(module: str, stage_modules: set[str]) -> set[str]:
    """Every module the stage's code reaches through imports, less the plumbing. Two kinds of
    module are listed but not followed: config.py (its defaults are parameters, but it imports the
    registries only to check names) and another stage's module (a stage uses only that stage's
    reader of its own outputs, whose content reaches it as a data dependency)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == "config" or (name in stage_modules and name != module):
            continue
        todo.extend(imported_stage_modules(name))
    return seen - PLUMBING


def test_every_stage_depends_on_the_code_that_decides_its_outputs() -> None:
    """A code change reruns each stage whose outputs it can change, and only those: a stage's
    `stages/` deps are exactly the modules its command runs (schema defaults in config.py
    included), so `dvc repro` and CI's retrain never keep an output the current code would not
    make."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    modules = {name: stage["do"]["cmd"].split("python -m stages.")[1].split()[0] for name, stage in stages.items()}
    assert set(modules.values()) <= {path.stem for path in (REPO / "stages").glob("*.py")}
    wrong = {}
    for name, module in modules.items():
        listed = {dep for dep in stages[name]["do"]["deps"] if dep.startswith("stages/")}
        needed = {f"stages/{each}.py" for each in code_a_stage_runs(module, set(modules.values()))}
        if listed != needed:
            wrong[name] = {"missing": sorted(needed - listed), "not run": sorted(listed - needed)}
    assert wrong == {}


def test_the_code_a_train_checkpoint_is_bound_to_is_the_code_dvc_reruns_train_for() -> None:
    """train resumes a checkpoint only under the same CODE_MODULES: exactly train's `stages/` deps,
    so that a change that reruns train@ in DVC never goes on from the old code's epochs."""
    from stages.train import CODE_MODULES

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    deps = {dep for dep in stages["train"]["do"]["deps"] if dep.startswith("stages/")}
    assert deps == {f"stages/{name}.py" for name in CODE_MODULES}


def test_every_cached_output_is_ignored_by_the_root_gitignore() -> None:
    """DVC writes a .gitignore beside each cached output as it commits it, but CI's bundles carry
    dvc.lock and uncached files only: a cached output the root .gitignore misses turns up
    untracked after `dvc pull` in a clone, and `git add reports` then commits it (after which DVC
    refuses to commit the stage: "already tracked by SCM")."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    missed = []
    for name, stage in pipeline["stages"].items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage["do"].get(kind) or []:
                path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
                if (options or {}).get("cache", True) is False:
                    continue
                concrete = (path.replace("${key}", "digits").replace("${item.dataset}", "digits")
                            .replace("${item.backbone}", "small_cnn").replace("${item.suite}", "demo"))
                # A path with no suffix is a folder, which a pattern ending in / matches only as one.
                probe = concrete if Path(concrete).suffix else concrete + "/"
                ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=REPO)
                if ignored.returncode != 0:
                    missed.append(f"{name}: {path}")
    assert not missed, missed
