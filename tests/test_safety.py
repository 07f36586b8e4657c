"""Nothing downloaded is deserialised unsafely, and credentials in a tracking URI are never shown.

The policy is checked on the code itself (every load call in stages/), and by behaviour: a model
file holding code is refused in one line, and a password in MLFLOW_TRACKING_URI reaches neither
a message nor a record.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stages import tracking
from stages.errors import UserError

STAGES = Path(__file__).resolve().parents[1] / "stages"
# Calls that run code found in the file they read.
UNSAFE = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("torch", "load"), ("joblib", "load"),
    ("yaml", "load"), ("yaml", "unsafe_load"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
    ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("marshal", "loads"),
}


def calls() -> list[tuple[str, int, ast.Call]]:
    found = []
    for path in sorted(STAGES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                found.append((path.name, node.lineno, node))
    return found


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def keyword(call: ast.Call, name: str) -> object:
    for item in call.keywords:
        if item.arg == name and isinstance(item.value, ast.Constant):
            return item.value.value
    return "missing"


def test_the_stages_never_unpickle_and_load_arrays_and_models_safely() -> None:
    problems = []
    checked = {"np.load": 0, "load_model": 0}
    for name, line, call in calls():
        target = dotted(call.func)
        parts = tuple(target.split("."))
        if parts[-2:] in UNSAFE:
            problems.append(f"{name}:{line}: {target} runs code from the file it reads")
        if target in ("np.load", "numpy.load"):
            checked["np.load"] += 1
            if keyword(call, "allow_pickle") is not False:
                problems.append(f"{name}:{line}: {target} without allow_pickle=False")
        if parts[-1] == "load_model":
            checked["load_model"] += 1
            if keyword(call, "safe_mode") is not True:
                problems.append(f"{name}:{line}: {target} without safe_mode=True")
    assert not problems, "\n".join(problems)
    # The scan saw the loads it is meant to guard (a rename would otherwise make it vacuous).
    assert checked["np.load"] >= 2 and checked["load_model"] == 1, checked


def test_a_model_file_holding_code_is_refused_in_one_line(tmp_path: Path) -> None:
    import keras

    from stages.backbones import load_saved_model

    marker = tmp_path / "ran"
    inputs = keras.Input((4,))
    # The function leaves a mark each time it runs: building the model runs it once.
    leaves_a_mark = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x * 2)[1]")  # the path inside its code
    outputs = keras.layers.Lambda(leaves_a_mark)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError) as refused:
        load_saved_model(tmp_path / "model.keras", "evaluate@toy-net")
    message = str(refused.value)
    assert message.startswith(f"evaluate@toy-net: {tmp_path / 'model.keras'} holds code") and "refused" in message
    assert "\n" not in message and not marker.exists()


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:s3cretpw@mlflow.internal:5000", "http://alice:***@mlflow.internal:5000"),
        ("https://ghp_tokenvalue@mlflow.internal", "https://***@mlflow.internal"),
        ("postgresql://mlflow:s3cretpw@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("sqlite:////srv/data@2026/mlflow.db", "sqlite:////srv/data@2026/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_a_tracking_uri_is_shown_without_its_credentials(uri: str, shown: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.tracking_uri() == uri  # MLflow itself gets the real one
    assert tracking.shown_uri() == shown


def test_an_unreachable_server_with_a_password_in_its_uri_is_reported_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cretpw@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(tracking.TrackingUnavailable) as unavailable:
        with tracking.unavailable("find the experiment", "start it and run again"):
            tracking.experiment_id("digits")
    message = str(unavailable.value)
    assert f"http://alice:***@127.0.0.1:{port} did not answer 1 tries" in message
    assert "s3cretpw" not in message


@pytest.mark.parametrize(("status", "words"), [(413, "413 Client Error: Request Entity Too Large"), (403, "403 Client Error: Forbidden"), (502, "did not answer")])
def test_an_artifact_upload_refused_by_a_proxy_is_one_line_without_the_password(
    status: int, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy in front of the server refusing a model upload (nginx's 413 for a body over
    client_max_body_size): MLflow raises requests' HTTPError, whose words and chained cause hold the
    artifact URL with the tracking URI's password. Before, it went up as a traceback printing it twice.
    A 5xx is retried and said not to answer, as before."""
    import http.server
    import threading

    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    from stages.errors import run_stage

    class Refuses(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    listener = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    port = listener.server_address[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cretpw@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "model.keras").write_bytes(b"weights")

    def main(argv: list[str] | None) -> None:
        with tracking.unavailable("log the model", "run the stage again"):
            repository = HttpArtifactRepository(f"http://alice:s3cretpw@127.0.0.1:{port}/api/2.0/mlflow-artifacts/artifacts/1/r")
            repository.log_artifact(str(tmp_path / "model.keras"))

    try:
        with pytest.raises(SystemExit):
            run_stage(main)
    finally:
        listener.shutdown()
    err = capsys.readouterr().err
    assert "s3cretpw" not in err
    assert err.count("\n") == 1 and err.startswith(f"error: MLflow tracking server http://alice:***@127.0.0.1:{port}")
    assert words in err and "log the model" in err, err
