"""A real MLflow tracking server on PostgreSQL for tests: the `mlflow_server` fixture.

    pytest_plugins = ["mlflow_server"]  # in a test module

gives a module's tests one `stages.server.Server` (its `.uri` for MlflowClient, `.postgres_uri`
for psycopg2, `.artifacts` for the files), started in a throwaway folder and stopped after the
module; `postgres_folder` is an empty folder for a test that starts a server of its own. Tests
are skipped, saying why, only where PostgreSQL is not installed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.errors import UserError
from stages.server import Server, postgres_bin, serve


def skip_without_postgres() -> None:
    try:
        postgres_bin()
    except UserError as error:
        pytest.skip(f"needs PostgreSQL: {error}")


@contextlib.contextmanager
def server_folder() -> Iterator[Path]:
    """An empty folder that PostgreSQL can reach, removed afterwards.

    Not pytest's tmp_path: for root that lies under /tmp/pytest-of-root, which only root may
    enter, and as root PostgreSQL runs as the `postgres` user.
    """
    folder = Path(tempfile.mkdtemp(prefix="classmatrix-mlflow-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server() -> Iterator[Server]:
    skip_without_postgres()
    with server_folder() as folder, serve(folder) as server:
        yield server


@pytest.fixture
def postgres_folder() -> Iterator[Path]:
    skip_without_postgres()
    with server_folder() as folder:
        yield folder
