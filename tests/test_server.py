"""stages.server: a real MLflow server whose runs live in PostgreSQL and artifacts in a folder.

The end-to-end tests start PostgreSQL and `mlflow server` (tens of seconds on a small machine),
write through MlflowClient, and read back through the REST API, the database and the disk.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from stages import server as server_module
from stages.errors import UserError
from stages.server import Server, free_port

# The `mlflow_server` and `postgres_folder` fixtures.
pytest_plugins = ["mlflow_server"]
ROOT = Path(__file__).resolve().parents[1]


def client_for(server: Server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def query(server: Server, sql: str, *args: object) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(server.postgres_uri) as connection, connection.cursor() as cursor:
        cursor.execute(sql, args)
        rows = cursor.fetchall()
    connection.close()
    return rows


def test_missing_postgres_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(server_module, "DEBIAN_POSTGRES", tmp_path / "nowhere")
    monkeypatch.setattr(server_module.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="PostgreSQL is not installed.*apt-get install postgresql"):
        server_module.postgres_bin()


def test_busy_port_ends_in_one_line_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "stages.server", "--dir", str(tmp_path / "server"), "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        (
            f"error: The MLflow server cannot listen on 127.0.0.1:{port} (Address already in use): "
            "free it or pass another --port"
        )
    ]
    assert not (tmp_path / "server").exists()


@pytest.mark.slow
def test_runs_metrics_artifacts_and_registry_go_through_the_server(mlflow_server: Server) -> None:
    server = mlflow_server
    client = client_for(server)
    experiment_id = client.create_experiment("server-digits")
    run = client.create_run(experiment_id, run_name="mobilenet", tags={"classmatrix.run_key": "k1"})
    run_id = run.info.run_id
    client.log_param(run_id, "backbone", "mobilenet_v3_small")
    for step, accuracy in enumerate([0.5, 0.75, 0.9]):
        client.log_metric(run_id, "val_accuracy", accuracy, step=step)
    client.log_text(run_id, "three classes\n", "reports/summary.txt")
    client.set_terminated(run_id)
    client.create_registered_model("digits-classifier")
    version = client.create_model_version(
        "digits-classifier", source=f"{run.info.artifact_uri}/model", run_id=run_id
    )
    client.set_registered_model_alias("digits-classifier", "champion", version.version)

    # Read back over plain REST, as any other client would.
    api = f"{server.uri}/api/2.0/mlflow"
    found = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment_id]}, timeout=30)
    found.raise_for_status()
    (remote,) = found.json()["runs"]
    assert remote["info"]["run_id"] == run_id
    assert remote["info"]["status"] == "FINISHED"
    assert {"key": "backbone", "value": "mobilenet_v3_small"} in remote["data"]["params"]
    history = requests.get(
        f"{api}/metrics/get-history", params={"run_id": run_id, "metric_key": "val_accuracy"}, timeout=30
    )
    history.raise_for_status()
    assert [(m["step"], m["value"]) for m in history.json()["metrics"]] == [(0, 0.5), (1, 0.75), (2, 0.9)]
    alias = requests.get(
        f"{api}/registered-models/alias", params={"name": "digits-classifier", "alias": "champion"}, timeout=30
    )
    alias.raise_for_status()
    assert alias.json()["model_version"]["version"] == version.version
    assert alias.json()["model_version"]["run_id"] == run_id

    # The data is in PostgreSQL, and the artifact a file under the artifact folder.
    assert query(server, "SELECT name, status FROM runs WHERE run_uuid = %s", run_id) == [("mobilenet", "FINISHED")]
    assert query(server, "SELECT max(value) FROM metrics WHERE run_uuid = %s", run_id) == [(0.9,)]
    assert query(server, "SELECT version FROM registered_model_aliases WHERE alias = 'champion'") == [
        (int(version.version),)
    ]
    (summary,) = server.artifacts.rglob(f"{run_id}/artifacts/reports/summary.txt")
    assert summary.read_text() == "three classes\n"
    assert client.download_artifacts(run_id, "reports/summary.txt", str(server.folder / "download")).endswith(
        "summary.txt"
    )


@pytest.mark.slow
def test_clients_may_name_the_server_by_this_machines_name(mlflow_server: Server) -> None:
    """A client whose MLFLOW_TRACKING_URI names this machine (http://gpu-box:5000, as a team's
    does for `--host 0.0.0.0`) sends that name as its Host header. Before: MLflow's guard against
    DNS rebinding, which allows only localhost and private addresses, answered every API request
    403 "Invalid Host header". Another name is still refused."""
    api = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search"
    port = mlflow_server.port
    for name in {socket.gethostname(), socket.getfqdn()}:
        answer = requests.get(api, params={"max_results": 1}, headers={"Host": f"{name}:{port}"}, timeout=30)
        assert answer.status_code == 200, (name, answer.text)
    refused = requests.get(api, params={"max_results": 1}, headers={"Host": f"rebinding.example:{port}"}, timeout=30)
    assert refused.status_code == 403


@pytest.mark.slow
def test_data_survives_a_restart_of_the_mlflow_server(mlflow_server: Server) -> None:
    server = mlflow_server
    client = client_for(server)
    experiment_id = client.create_experiment("server-restart")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "loss", 1.25)

    server.stop_mlflow()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.uri}/health", timeout=5)
    server.start_mlflow()

    assert client.get_run(run_id).data.metrics == {"loss": 1.25}
    assert client.get_experiment_by_name("server-restart").experiment_id == experiment_id


@pytest.mark.slow
def test_command_line_starts_and_stops_cleanly_on_sigterm(postgres_folder: Path) -> None:
    folder = postgres_folder / "server"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.server", "--dir", str(folder), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        banner = process.stdout.readline()
        assert banner.startswith(f"MLflow server at http://127.0.0.1:{port} (PostgreSQL at postgresql://"), (
            banner + process.stderr.read()
        )
        assert banner.rstrip().endswith(f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}")
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).ok
        postmaster = folder / "postgres" / "postmaster.pid"
        assert postmaster.exists()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            # A failed assertion still stops PostgreSQL, through the command's own clean stop.
            process.terminate()
            process.wait(120)
    assert process.returncode == 0, err
    assert out.strip() == "MLflow server and PostgreSQL stopped"
    # PostgreSQL removes its pid file only on a clean shutdown; the port is free again.
    assert not postmaster.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert "database system is shut down" in (folder / "postgres.log").read_text()
    assert os.path.getsize(folder / "mlflow.log") > 0


def test_the_uri_to_export_names_this_machine_when_serving_every_interface() -> None:
    """With --host 0.0.0.0 the start-up line said `export MLFLOW_TRACKING_URI=http://0.0.0.0:5000`,
    which works on the server's machine only; a team's clients need its name."""
    from stages.server import allowed_hosts, client_uri

    name = socket.getfqdn() or socket.gethostname()
    assert client_uri("0.0.0.0", 5000) == f"http://{name}:5000"
    assert name in allowed_hosts()
    assert client_uri("127.0.0.1", 5000) == "http://127.0.0.1:5000"
    assert client_uri("::1", 5001) == "http://[::1]:5001"
