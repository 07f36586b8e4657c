"""No credential reaches any output: the demo and a Kaggle fetch, run with secrets in the
environment, then every file they left searched for the secret values.

The Kaggle key is the one the fake Kaggle API (on 127.0.0.1, driven by the real client) checks;
the cloud keys and the MLflow password are set as a team's CI would set them. Searched: the
commands' output, every file of the project (dvc.lock, DVC's cache, reports, models, the MLflow
database and artifacts, git), and the MLflow runs' params and tags read back through its API.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import pytest
import yaml
from fake_kaggle import FakeKaggle
from miniatures import MINIATURES
from test_pipeline import copy_repository, run, shorten_demo, stages_run

pytestmark = pytest.mark.slow


def test_secrets_in_the_environment_reach_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    mini = MINIATURES["birds"]()
    with FakeKaggle(tmp_path) as fake:
        fake.apply(monkeypatch, credentials="env")  # KAGGLE_USERNAME / KAGGLE_KEY
        cloud = {
            "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": "aws-" + secrets.token_hex(16),
            "AWS_SESSION_TOKEN": "session-" + secrets.token_hex(16),
            "AZURE_STORAGE_KEY": "azure-" + secrets.token_hex(16),
        }
        for name, value in cloud.items():
            monkeypatch.setenv(name, value)
        env = copy_repository(project)
        shorten_demo(project, small_cnn=2, mobilenetv2=1)  # every stage's outputs, not good models
        password = "mlflow-" + secrets.token_hex(16)
        env.update(MLFLOW_TRACKING_USERNAME="team", MLFLOW_TRACKING_PASSWORD=password)
        source = yaml.safe_load((project / "params.yaml").read_text())["datasets"]["birds"]["source"]
        fake.add_dataset(mini.ref, mini.archive, version=source["version"])

        outputs = [run(["dvc", "repro", "report@demo"], project, env), run(["dvc", "repro", "fetch@birds"], project, env)]

        assert fake.count("GET", f"/kaggle-fake/datasets/{mini.ref}/{source['version']}/birds2.zip") == 1
        values = {"Kaggle key": fake.key, "MLflow password": password, **cloud}

    assert stages_run(outputs[1].stdout) == ["fetch@birds"] and (project / "data/raw/birds").is_dir()
    # The forms a secret could take in a file: as is, and inside HTTP basic authentication.
    forms = {name: [value.encode()] for name, value in values.items()}
    forms["Kaggle key"].append(base64.b64encode(f"{fake.username}:{fake.key}".encode()))
    forms["MLflow password"].append(base64.b64encode(f"team:{password}".encode()))

    found = []
    for result in outputs:
        for name, value in values.items():
            if value in result.stdout + result.stderr:
                found.append(f"{name} in the output of {' '.join(result.args)}")
    searched = 0
    for folder, _, files in os.walk(project):
        for file_name in files:
            path = Path(folder) / file_name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            searched += 1
            for name, variants in forms.items():
                if any(variant in data for variant in variants):
                    found.append(f"{name} in {path.relative_to(project)}")
    assert not found, found
    # What was searched holds the demo's outputs, its runs and the fetched data.
    for expected in ("dvc.lock", "mlflow.db", "reports/leaderboard/demo.md", "data/raw/birds.provenance.json"):
        assert (project / expected).is_file(), expected
    assert searched > 1000

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert len(runs) == 2
    for logged in runs:
        texts = [*logged.data.params.values(), *logged.data.tags.values()]
        assert not [name for name, value in values.items() if any(value in text for text in texts)]
