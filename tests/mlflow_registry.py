"""An empty MLflow registry in SQLite for each test: the `registry` fixture.

    pytest_plugins = ["mlflow_registry"]  # in a test module

`registry` is an MlflowClient on a fresh SQLite database in the test's tmp_path, with
MLFLOW_TRACKING_URI pointing the stages at it. Creating MLflow's tables takes seconds, so one
empty database is made per session and copied for each test.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its tables made."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture()
def registry(empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """A client of a fresh, empty registry, with MLFLOW_TRACKING_URI pointing the stages at it."""
    import mlflow

    database = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, database)
    uri = f"sqlite:///{database}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield MlflowClient(tracking_uri=uri)
    # The stages set mlflow's global URI; leave no pointer to this test's deleted database.
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
