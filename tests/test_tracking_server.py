"""The demo against a real `mlflow server` on PostgreSQL, read back through the REST API; and
what happens when that server stops answering in the middle of the pipeline.

The server is started by the `mlflow_server` fixture (Debian's PostgreSQL on 127.0.0.1, a local
artifact folder), the pipeline is pointed at it with MLFLOW_TRACKING_URI, exactly as the README
tells a user to.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from test_pipeline import copy_repository, run, shorten_demo, stages_run

from stages.server import Server

pytest_plugins = ["mlflow_server"]
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(mlflow_server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Server]:
    """`dvc repro report@demo` in a fresh copy of the repository, tracked by the server."""
    copy = tmp_path_factory.mktemp("served")
    env = copy_repository(copy)
    # The tests read what is logged and registered, not how good the models are (predict's test
    # classifies two digits the small CNN has trained on).
    shorten_demo(copy, small_cnn=10, mobilenetv2=3)
    env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    # One retry, not four, so the tests of a stopped server fail over quickly.
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    first = run(["dvc", "repro", "report@demo"], copy, env)
    (copy / "first_repro.log").write_text(first.stdout + first.stderr)
    return copy, env, mlflow_server


def api(server: Server, endpoint: str, **params: str) -> dict:
    response = requests.get(f"{server.uri}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    assert response.ok, f"{endpoint}: {response.status_code} {response.text[:500]}"
    return response.json()


def runs_by_name(server: Server) -> dict[str, dict]:
    experiment = api(server, "experiments/get-by-name", experiment_name="digits")["experiment"]
    found = requests.post(
        f"{server.uri}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment["experiment_id"]]}, timeout=30
    )
    found.raise_for_status()
    return {run["info"]["run_name"]: run for run in found.json()["runs"]}


def tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def test_demo_runs_are_on_the_server_with_tags_metrics_and_artifacts(served: tuple[Path, dict[str, str], Server]) -> None:
    """Both demo runs are read back over REST: provenance tags (git commit, DVC data hash,
    params hash), params, per-epoch and test metrics, evaluation artifacts; none went to SQLite."""
    copy, _, server = served
    assert not (copy / "mlflow.db").exists()
    runs = runs_by_name(server)
    assert set(runs) == {"small_cnn", "mobilenetv2"}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=copy, capture_output=True, text=True).stdout.strip()
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    (prepared,) = lock["stages"]["split@digits"]["outs"]
    for name, remote in runs.items():
        run_tags = tags(remote)
        training = json.loads((copy / f"models/digits/{name}/training.json").read_text())
        record = json.loads((copy / f"reports/metrics/demo/digits/{name}.json").read_text())
        assert remote["info"]["run_id"] == training["run_id"]
        assert remote["info"]["status"] == "FINISHED"
        assert run_tags["dataset"] == "digits" and run_tags["backbone"] == name and run_tags["suite"] == "demo"
        assert run_tags["mlflow.source.git.commit"] == commit
        assert run_tags["dvc.data_hash"] == prepared["md5"]
        assert run_tags["params_hash"] == training["params_hash"]
        params = {p["key"]: p["value"] for p in remote["data"]["params"]}
        assert params["backbone"] == name and "training.epochs" in params
        metrics = {m["key"]: m["value"] for m in remote["data"]["metrics"]}
        assert metrics["test_accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)
        assert metrics["test_accuracy_ci_low"] < metrics["test_accuracy"] < metrics["test_accuracy_ci_high"]
        for key in ("test_expected_calibration_error", "test_latency_ms_batch1", "size_mb", "test_top_3_accuracy"):
            assert key in metrics
        history = api(server, "metrics/get-history", run_id=training["run_id"], metric_key="val_accuracy")["metrics"]
        assert sorted(m["step"] for m in history) == list(range(training["epochs_run"]))
        listed = api(server, "artifacts/list", run_id=training["run_id"], path="evaluation")
        files = {Path(entry["path"]).name for entry in listed["files"]}
        assert {"confusion.png", "confusion_normalized.png", "curves.png", "f1.png", "mistakes.png",
                "classification_report.json", "per_class.csv", f"{name}.json"} <= files
        model = {Path(entry["path"]).name for entry in api(server, "artifacts/list", run_id=training["run_id"], path="model")["files"]}
        assert {"MLmodel", "input_example.json", "requirements.txt", "data"} <= model
    # On disk, the artifacts are in the server's artifact folder; the runs in PostgreSQL.
    assert list(server.artifacts.rglob("evaluation/mistakes.png"))


def test_models_are_registered_under_the_dataset_and_the_report_names_a_champion(
    served: tuple[Path, dict[str, str], Server],
) -> None:
    """One registered model, `digits`, with a version per experiment carrying its test scores;
    the alias `champion` is on the leaderboard's best row by the dataset's selection metric."""
    copy, _, server = served
    versions = api(server, "model-versions/search", filter="name='digits'")["model_versions"]
    by_experiment = {{t["key"]: t["value"] for t in v["tags"]}["experiment"]: v for v in versions}
    assert set(by_experiment) == {"digits-small_cnn", "digits-mobilenetv2"}
    rows = list(csv.DictReader((copy / "reports/leaderboard/demo.csv").read_text().splitlines()))
    champion_rows = [row for row in rows if row["champion"] == "True"]
    assert len(champion_rows) == 1
    best = max(rows, key=lambda row: float(row[row["selection_metric"]]))
    assert champion_rows[0]["backbone"] == best["backbone"]
    alias = api(server, "registered-models/alias", name="digits", alias="champion")["model_version"]
    assert alias["version"] == champion_rows[0]["model_version"]
    version_tags = {t["key"]: t["value"] for t in alias["tags"]}
    assert version_tags["backbone"] == best["backbone"]
    assert float(version_tags[f"test_{best['selection_metric']}"]) == pytest.approx(float(best[best["selection_metric"]]), abs=1e-6)
    assert (copy / "reports/leaderboard/demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_loads_the_champion_from_the_server(served: tuple[Path, dict[str, str], Server], tmp_path: Path) -> None:
    """predict classifies images with the registered champion; an unreadable file is reported and
    the others are still classified, with exit status 1."""
    copy, env, _ = served
    samples = []
    for label in ("3", "7"):
        source = sorted((copy / "data/raw/digits" / label).iterdir())[0]
        target = tmp_path / f"digit {label}.png"
        target.write_bytes(source.read_bytes())
        samples.append(target)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = subprocess.run(
        [sys.executable, "-m", "stages.predict", "--dataset", "digits", str(tmp_path)],
        cwd=copy, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [Path(path).name for path, _, _ in lines] == ["digit 3.png", "digit 7.png"]
    assert [label for _, label, _ in lines] == ["3", "7"]
    assert all(0 < float(confidence) <= 1 for _, _, confidence in lines)
    assert f"error: {tmp_path / 'broken.png'}: cannot read this image" in result.stderr
    assert "2 of 3 files classified with models:/digits@champion" in result.stderr


def test_a_stopped_server_fails_the_stage_clearly_and_a_rerun_logs_without_training(
    served: tuple[Path, dict[str, str], Server],
) -> None:
    """Server stopped: training finishes and writes its model, then the stage fails in one line.
    Server back: the re-run logs the run from the checkpoint without training again. The same
    for evaluate: its local outputs are written, and a re-run logs them."""
    copy, env, server = served
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["experiments"]["digits-small_cnn"]["train"]["epochs"] = 3
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    model_dir = copy / "models/digits/small_cnn"

    server.stop_mlflow()
    try:
        failed = subprocess.run(["dvc", "repro", "report@demo"], cwd=copy, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        server.start_mlflow()
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert f"MLflow tracking server {server.uri} did not answer 2 tries to open the run" in output
    assert "training goes on" in output
    errors = [line for line in output.splitlines() if line.startswith("error: MLflow tracking server")]
    assert len(errors) == 1 and "run the stage again when the server answers" in errors[0]
    assert "epoch 3 (phase 1)" in output
    assert json.loads((model_dir / "training.json").read_text())["epochs_run"] == 3
    assert (model_dir / "model.keras").exists() and (model_dir / "checkpoint.npz").exists()

    again = run(["dvc", "repro", "report@demo"], copy, env)
    assert stages_run(again.stdout) == ["train@digits-small_cnn", "evaluate@digits-small_cnn", "report@demo"]
    # Nothing was trained again: the finished state came from the checkpoint.
    assert "train@digits-small_cnn: training finished before (3 epochs, in the checkpoint)" in again.stdout
    assert not re.search(r"^epoch \d+ \(phase", again.stdout, re.MULTILINE)
    training = json.loads((model_dir / "training.json").read_text())
    assert training["epochs_run"] == 3 and not (model_dir / "checkpoint.npz").exists()
    history = api(server, "metrics/get-history", run_id=training["run_id"], metric_key="val_accuracy")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1, 2]
    logged = api(server, "runs/get", run_id=training["run_id"])["run"]
    assert logged["info"]["status"] == "FINISHED" and logged["info"]["run_name"] == "small_cnn"
    assert tags(logged)["params_hash"] == training["params_hash"]

    server.stop_mlflow()
    metrics_path = copy / "reports/metrics/demo/digits/small_cnn.json"
    metrics_path.unlink()
    try:
        failed = subprocess.run(
            ["dvc", "repro", "--force", "--single-item", "evaluate@digits-small_cnn"],
            cwd=copy, env=env, capture_output=True, text=True, timeout=1500,
        )
    finally:
        server.start_mlflow()
    assert failed.returncode != 0
    assert "did not answer 2 tries to log the evaluation" in failed.stdout + failed.stderr
    assert json.loads(metrics_path.read_text())["test_images"] > 200  # written before MLflow was asked
    versions = len(api(server, "model-versions/search", filter="name='digits'")["model_versions"])
    run(["dvc", "repro", "--force", "--single-item", "evaluate@digits-small_cnn"], copy, env)
    assert json.loads(metrics_path.read_text())["model_version"] > 0
    # The same model again: the registry gains no version.
    assert len(api(server, "model-versions/search", filter="name='digits'")["model_versions"]) == versions


class Doorway:
    """An HTTP proxy on 127.0.0.1 in front of the real server, through which the pipeline talks.

    With `cut_at`, the first request whose path matches is never answered: `on_cut` stops the
    real server (as an operator would, in the middle of a stage), and the doorway closes its
    own port, so that this request and every later one find nobody listening. With
    `cut_after`, that request first reaches the server and is carried out there; only its
    answer is lost. That puts the failure at one chosen point of a stage, every time, instead
    of wherever a timer lands.
    """

    def __init__(self, upstream: str, *, port: int = 0, cut_at: re.Pattern | None = None,
                 cut_after: bool = False, on_cut: Callable[[], None] = lambda: None) -> None:
        self.upstream = urlsplit(upstream)
        self.cut_at, self.cut_after, self.on_cut = cut_at, cut_after, on_cut
        self.cut_path: str | None = None
        self.paths: list[str] = []
        doorway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def forward(self) -> None:
                doorway.paths.append(f"{self.command} {self.path}")
                chosen = doorway.cut_path is None and doorway.cut_at and doorway.cut_at.search(self.path)
                if doorway.cut_path is not None or (chosen and not doorway.cut_after):
                    doorway.cut(self)
                    return
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raise AssertionError(f"chunked request body for {self.path}: not handled by this proxy")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upstream = http.client.HTTPConnection(doorway.upstream.hostname, doorway.upstream.port, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                if chosen:  # cut_after: carried out upstream; the answer never comes back
                    doorway.cut(self)
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        class Listener(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.listener = Listener(("127.0.0.1", port), Handler)
        self.port = self.listener.server_address[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.listener.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def cut(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        if self.cut_path is None:
            self.cut_path = handler.path
            self.on_cut()
            self.listener.shutdown()
            self.listener.server_close()
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.cut_path is None:
            self.listener.shutdown()
            self.listener.server_close()


@pytest.mark.parametrize(
    ("epochs", "cut_at", "cut_after"),
    [
        # While the model's files are being uploaded: nothing is registered yet.
        (2, r"/artifacts/model(-[0-9a-f]+)?/", False),
        # Right after the server has created the model version, before the client hears of it.
        (1, r"/model-versions/create$", True),
    ],
    ids=["during-the-model-upload", "after-the-version-is-created"],
)
def test_a_server_stopped_in_the_middle_of_evaluate_keeps_the_local_outputs_and_a_rerun_logs_them(
    served: tuple[Path, dict[str, str], Server], epochs: int, cut_at: str, cut_after: bool,
) -> None:
    """The server stops in the middle of evaluate's logging: metrics, evaluation files and tags
    are already on the run. The stage fails in one line, its local outputs stay, and DVC does
    not record it as done. With the server back at the same address, `dvc repro` runs evaluate
    alone again; it logs everything, and the run has exactly one registered version, even when
    the server had created one before it went down."""
    copy, env, server = served
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["experiments"]["digits-small_cnn"]["train"]["epochs"] = epochs  # a new model, not yet registered
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    metrics_path = copy / "reports/metrics/demo/digits/small_cnn.json"
    figures = copy / "reports/figures/digits/small_cnn"
    predictions = copy / "reports/predictions/digits/small_cnn.csv"
    evaluation = copy / "reports/evaluation/digits/small_cnn"

    doorway = Doorway(server.uri, cut_at=re.compile(cut_at), cut_after=cut_after, on_cut=server.stop_mlflow)
    try:
        failed = subprocess.run(
            ["dvc", "repro", "report@demo"], cwd=copy, env={**env, "MLFLOW_TRACKING_URI": doorway.uri},
            capture_output=True, text=True, timeout=1500,
        )
    finally:
        doorway.close()
        server.start_mlflow()
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output[-3000:]
    assert doorway.cut_path is not None, f"evaluate never sent {cut_at}"
    # Before the cut, evaluate had logged its metrics and files through the doorway.
    assert any("runs/log-batch" in path for path in doorway.paths)
    assert any("/artifacts/evaluation/" in path for path in doorway.paths)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in errors if "did not answer 2 tries to log the evaluation" in line]
    assert len(errors) == 1, errors
    assert "Connection refused" in errors[0] and "run the stage again when the server answers" in errors[0]
    assert "Traceback" not in output

    training = json.loads((copy / "models/digits/small_cnn/training.json").read_text())
    assert training["epochs_run"] <= epochs
    record = json.loads(metrics_path.read_text())  # written before MLflow was asked
    assert record["epochs_run"] == training["epochs_run"] and "model_version" not in record
    assert {"confusion.png", "curves.png", "mistakes.png"} <= {p.name for p in figures.iterdir()}
    assert predictions.exists() and (evaluation / "classification_report.json").exists()
    status = json.loads(run(["dvc", "status", "--json", "--with-deps", "report@demo"], copy, env).stdout)
    assert "evaluate@digits-small_cnn" in status and "train@digits-small_cnn" not in status
    created = api(server, "model-versions/search", filter=f"run_id='{training['run_id']}'").get("model_versions", [])
    assert len(created) == (1 if cut_after else 0)

    back = Doorway(server.uri, port=doorway.port)  # the server is back, at the same address
    try:
        again = run(["dvc", "repro", "report@demo"], copy, {**env, "MLFLOW_TRACKING_URI": back.uri})
    finally:
        back.close()
    assert stages_run(again.stdout) == ["evaluate@digits-small_cnn", "report@demo"]
    record = json.loads(metrics_path.read_text())
    versions = api(server, "model-versions/search", filter=f"run_id='{training['run_id']}'")["model_versions"]
    assert [int(v["version"]) for v in versions] == [record["model_version"]]
    assert [v["version"] for v in created] in ([], [versions[0]["version"]])  # the one created before the cut
    model_sha = hashlib.sha256((copy / "models/digits/small_cnn/model.keras").read_bytes()).hexdigest()
    assert {t["key"]: t["value"] for t in versions[0]["tags"]}["model_sha256"] == model_sha
    logged = api(server, "runs/get", run_id=training["run_id"])["run"]
    metrics = {m["key"]: m["value"] for m in logged["data"]["metrics"]}
    assert metrics["test_accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)
    assert tags(logged)["evaluated"] == "true"
    listed = api(server, "artifacts/list", run_id=training["run_id"], path="model")["files"]
    assert {"MLmodel", "data"} <= {Path(entry["path"]).name for entry in listed}
    assert json.loads(run(["dvc", "status", "--json", "--with-deps", "report@demo"], copy, env).stdout) == {}
