"""The DVC graph templated from params.yaml: stage names, and what each target pulls in."""

from __future__ import annotations

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
