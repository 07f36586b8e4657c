"""evaluate's side of MLflow and of training's record: a rerun updates the run without duplicate
points; a missing, unreadable or incomplete training.json is one line; a tracking server that does
not answer (a connect timeout, a proxy's 5xx) is reported as such, without the URI's credentials."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from stages import evaluate as evaluate_stage
from stages import report as report_stage
from stages import tracking
from stages.config import load_params
from stages.errors import UserError

pytest_plugins = ["mlflow_registry"]

ROOT = Path(__file__).resolve().parents[1]


def test_rerunning_evaluate_does_not_duplicate_test_metrics(
    registry: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: "Re-running evaluate updates the same run". Before, each rerun logged every test
    metric again at step 0 with a new timestamp: a growing history of the same values."""
    experiment = load_params(ROOT / "params.yaml").experiment("digits-small_cnn")
    exp_id = registry.create_experiment("digits")
    run_id = registry.create_run(exp_id).info.run_id
    monkeypatch.setattr(evaluate_stage, "register_model", lambda *args, **kwargs: 1)
    training_record = {"run_id": run_id, "config": {"a": 1}, "data_version": "d1"}
    record = {"accuracy": 0.9, "macro_f1": 0.8, "selection_metric": "accuracy",
              "latency_measured_on": "tensorflow on cpu"}
    metrics_path = tmp_path / "m.json"
    for _ in range(2):
        evaluate_stage.log_evaluation(experiment, training_record, dict(record), None, tmp_path / "model.keras",
                                      np.zeros((1, 2)), 2, ["a", "b"], metrics_path, [])
    history = registry.get_metric_history(run_id, "test_accuracy")
    assert len(history) == 1, [(m.value, m.timestamp, m.step) for m in history]


def _evaluate_cli(tmp_path: Path, model_dir: Path) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    return subprocess.run(
        [sys.executable, "-m", "stages.evaluate", "--experiment", "digits-small_cnn", "--params",
         str(ROOT / "params.yaml"), "--data", str(tmp_path / "data"), "--model", str(model_dir),
         "--metrics", str(out / "m.json"), "--predictions", str(out / "p.csv"), "--figures", str(out / "f"),
         "--evaluation", str(out / "e")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_missing_training_json_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """A model folder without training.json (train never finished, or run by hand with the wrong
    --model): one line naming the file and what to run, not a traceback."""
    model_dir = tmp_path / "models" / "digits" / "small_cnn"
    model_dir.mkdir(parents=True)
    done = _evaluate_cli(tmp_path, model_dir)
    assert done.returncode == 1, done.stderr[-600:]
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert "training.json" in done.stderr.strip().splitlines()[-1]


def test_unreadable_training_json_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """A truncated training.json (a merge conflict, an edit) likewise."""
    model_dir = tmp_path / "models" / "digits" / "small_cnn"
    model_dir.mkdir(parents=True)
    (model_dir / "training.json").write_text('{"run_id": "abc", ', encoding="utf-8")
    done = _evaluate_cli(tmp_path, model_dir)
    assert done.returncode == 1, done.stderr[-600:]
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert "training.json" in done.stderr.strip().splitlines()[-1]


def test_the_model_file_given_for_its_folder_is_one_line_saying_so(tmp_path: Path) -> None:
    """`--model models/digits/small_cnn/model.keras` (the file, where evaluate takes train's
    folder): before, "model.keras/training.json: missing; run train@digits-small_cnn again", which
    sent the user to retrain a model that was there. Now the line says to give the folder."""
    model_dir = tmp_path / "models" / "digits" / "small_cnn"
    model_dir.mkdir(parents=True)
    (model_dir / "model.keras").write_bytes(b"PK\5\6" + bytes(18))
    out = tmp_path / "out"
    with pytest.raises(UserError) as raised:
        evaluate_stage.evaluate("digits-small_cnn", str(ROOT / "params.yaml"), tmp_path / "data", model_dir / "model.keras",
                                out / "m.json", out / "p.csv", out / "f", out / "e")
    assert str(raised.value) == (f"--model {model_dir / 'model.keras'} is a file; give train's output folder, which "
                                 f"holds model.keras, training.json and history.csv: --model {model_dir}")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# A tracking server that does not answer, in two ways MLflow words differently from a refused
# connection (before, evaluate took them for a missing run and advised a retrain).


@pytest.fixture()
def fast_failing_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@pytest.fixture()
def blackholed_server(fast_failing_http: None, monkeypatch: pytest.MonkeyPatch):
    """A listening port whose accept queue is full: the kernel drops new SYNs, so connecting
    times out, as with a tracking server on a host that is down or firewalled."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    yield
    for s in [listener, *fillers]:
        s.close()
    import mlflow
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@contextlib.contextmanager
def answering(monkeypatch: pytest.MonkeyPatch, status: int, body: bytes, userinfo: str = "") -> Iterator[str]:
    """A local HTTP server answering every request with `status` and `body`, as the tracking URI
    (with `userinfo@` in it, if given) while the block runs; yields the URI."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        yield uri
    finally:
        server.shutdown()
        import mlflow

        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@pytest.fixture()
def origin_down_proxy(fast_failing_http: None, monkeypatch: pytest.MonkeyPatch):
    """A reverse proxy in front of a dead MLflow server answering 521 ("web server is down",
    Cloudflare), a 5xx that MLflow does not retry."""
    with answering(monkeypatch, 521, b"<html>origin web server is down</html>"):
        yield


def _log_into_unanswering_server(tmp_path: Path) -> None:
    experiment = load_params(ROOT / "params.yaml").experiment("digits-small_cnn")
    training_record = {"run_id": "0123456789abcdef", "config": {}, "data_version": "d1", "tracking_uri": "x"}
    with tracking.unavailable("log the evaluation", "run the stage again when the server answers"):
        evaluate_stage.log_evaluation(experiment, training_record, {"accuracy": 0.9}, None, tmp_path / "m.keras",
                                      np.zeros((1, 2)), 2, ["a", "b"], tmp_path / "m.json", [])


def test_a_server_that_times_out_connecting_is_reported_unavailable(blackholed_server: None, tmp_path: Path) -> None:
    """The documented "did not answer ... run the stage again" line, not "the run is not in the
    store ... retrain it"."""
    with pytest.raises(tracking.TrackingUnavailable):
        _log_into_unanswering_server(tmp_path)


def test_a_proxy_saying_the_server_is_down_is_reported_unavailable(origin_down_proxy: None, tmp_path: Path) -> None:
    with pytest.raises(tracking.TrackingUnavailable):
        _log_into_unanswering_server(tmp_path)


# --------------------------------------------------------------------------------------------
# A stale training.json (written by other code, or edited): evaluate refuses it in one line.


@pytest.fixture()
def trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tests.test_training import SMALL_CNN, train_toy

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    train_toy(tmp_path, "net", SMALL_CNN, {"epochs": 1})
    return tmp_path


def _evaluate(tmp_path: Path) -> dict:
    out = tmp_path / "reports"
    return evaluate_stage.evaluate("toy-net", str(tmp_path / "net.yaml"), tmp_path / "data", tmp_path / "net",
                                   out / "metrics.json", out / "predictions.csv", out / "figures", out / "evaluation")


def test_training_record_without_data_version_is_not_evaluated_on_other_data(trained: Path) -> None:
    """A record with no data_version cannot show which split the model trained on: before,
    evaluate checked nothing and registered the score, tagged data_version ''."""
    from stages.errors import UserError

    record_path = trained / "net" / "training.json"
    record = json.loads(record_path.read_text())
    del record["data_version"]
    record_path.write_text(json.dumps(record))
    meta = json.loads((trained / "data" / "meta.json").read_text())
    (trained / "data" / "meta.json").write_text(json.dumps({**meta, "sha256": "split again with another seed"}))
    with pytest.raises(UserError, match=r"training\.json: no data_version \(written by other code, or edited\); run train@toy-net again"):
        _evaluate(trained)


def test_training_record_missing_a_key_is_one_line(trained: Path) -> None:
    """A record without `parameters`: before, a bare KeyError after the whole prediction."""
    from stages.errors import UserError

    record_path = trained / "net" / "training.json"
    record = json.loads(record_path.read_text())
    del record["parameters"]
    record_path.write_text(json.dumps(record))
    with pytest.raises(UserError, match="training.json"):
        _evaluate(trained)


# --------------------------------------------------------------------------------------------
# The "server did not answer" line must not carry the credentials of the tracking URI.


def test_unavailable_line_does_not_leak_a_long_token(fast_failing_http: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server behind a proxy answering 503 (MLflow retries, then "too many 503 error responses"):
    before, the line quoted the first 160 characters of MLflow's message and only then redacted
    it, so a token longer than ~140 characters in https://TOKEN@host lost its '@' and was printed."""
    token = "s3cr3t" * 40  # 240 characters, like a JWT or a long access token
    with answering(monkeypatch, 503, b"", userinfo=token):
        with pytest.raises(tracking.TrackingUnavailable) as error:
            with tracking.unavailable("log the evaluation", "run the stage again"):
                tracking.run_exists("0123456789abcdef")
    assert "s3cr3ts3cr3t" not in str(error.value), str(error.value)


# --------------------------------------------------------------------------------------------
# What counts as a run that is gone, and MLflow's other errors.

PURGED = "0123456789abcdef0123456789abcdef"


@pytest.fixture()
def basic_auth_server(monkeypatch: pytest.MonkeyPatch):
    """What `mlflow server --app-name basic-auth` answers a non-admin's runs/get for a run that
    does not exist (purged): mlflow/server/auth/__init__.py `_run_requirement` -> None ->
    `make_forbidden_response()`: status 403, body "Permission denied" (not JSON). (The real app
    needs Flask-WTF, which the project does not install.)"""

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with answering(monkeypatch, 403, b"Permission denied") as uri:
        yield uri


def test_purged_run_on_a_basic_auth_server_is_no_live_run(basic_auth_server: str) -> None:
    """report: a version whose run `mlflow gc` purged is no candidate, on a basic-auth server too."""
    client = MlflowClient(basic_auth_server)
    assert report_stage._live_runs(client, {PURGED}) == set()


def test_purged_run_on_a_basic_auth_server_does_not_exist(basic_auth_server: str) -> None:
    """evaluate (and train's resume from a checkpoint) ask run_exists."""
    assert tracking.run_exists(PURGED) is False


@pytest.mark.parametrize(
    "body",
    [b"Invalid Host header - possible DNS rebinding attack detected", b"<html><h1>403 Forbidden</h1>nginx</html>"],
    ids=["mlflow host guard", "proxy page"],
)
def test_a_403_that_is_not_mlflows_auth_is_no_purged_run(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 403 from MLflow's DNS-rebinding guard (a client naming the server by a host it does not
    allow) or from a proxy says nothing of the run: before, it read as "purged", so report dropped
    live runs and evaluate called a live training's run gone. Now it is not gone, and the guard's
    answer is one line saying what to set on the server."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with answering(monkeypatch, 403, body) as uri:
        from mlflow.exceptions import MlflowException

        with pytest.raises(MlflowException):
            report_stage._live_runs(MlflowClient(uri), {PURGED})
        with pytest.raises((MlflowException, UserError)) as error:
            with tracking.unavailable("log the evaluation", "run the stage again"):
                tracking.run_exists(PURGED)
    if b"Host header" in body:
        assert isinstance(error.value, UserError)
        message = str(error.value)
        assert "\n" not in message and "MLFLOW_SERVER_ALLOWED_HOSTS" in message and "127.0.0.1" in message, message
    else:
        assert not isinstance(error.value, UserError)


@pytest.mark.parametrize("status", [401, 404])
def test_a_401_or_a_page_not_from_mlflow_is_one_line_for_every_stage(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train, evaluate and report ask through `unavailable`: a 401 or a proxy's 404 page was
    MLflow's exception as raised, a traceback. Now it is the stage's one line (train goes on
    without the server and logs when it ends, as for a server that does not answer)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with answering(monkeypatch, status, b"<html><body>no</body></html>") as uri:
        with pytest.raises(tracking.TrackingUnavailable) as error:
            with tracking.unavailable("log the evaluation", "run the stage again"):
                tracking.run_exists(PURGED)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"MLflow tracking server {uri} answered {status}"), message
    assert message.endswith("(asked to log the evaluation); run the stage again"), message


@pytest.mark.parametrize("status", [500, 503])
def test_a_server_answering_5xx_each_try_says_which(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 500 or 503 is retried by MLflow; the line ended "(API request to http://... failed with
    exception HTTPConnectionPool(host=..., port=...): Max retries)", cut before the status, so a
    user looked for a server that was down while it was up and failing. Now it says what it answered."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with answering(monkeypatch, status, b"<html><body>busy</body></html>", userinfo="team:s3cret") as uri:
        with pytest.raises(tracking.TrackingUnavailable) as error:
            with tracking.unavailable("log the evaluation", "run the stage again"):
                tracking.run_exists(PURGED)
    shown = uri.replace("s3cret", "***")
    assert str(error.value) == (f"MLflow tracking server {shown} did not answer 2 tries to log the evaluation "
                                f"(it answered {status} each time); run the stage again")


def test_an_edited_run_id_in_training_json_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run id MLflow's client refuses (INVALID_PARAMETER_VALUE, before any store is asked): the
    "run ... is not in <store>; retrain" line, not a traceback."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = load_params(ROOT / "params.yaml").experiment("digits-small_cnn")
    record = {"run_id": "run 1", "config": {}, "data_version": "d1", "tracking_uri": "x"}
    with pytest.raises(UserError, match=r"the MLflow run run 1 that training recorded is not in "):
        with tracking.unavailable("log the evaluation", "run the stage again"):
            evaluate_stage.log_evaluation(experiment, record, {"accuracy": 0.9}, None, tmp_path / "m.keras",
                                          np.zeros((1, 2)), 2, ["a", "b"], tmp_path / "m.json", [])


def _fails_deep_inside() -> None:
    raise RestException({"error_code": "INVALID_STATE", "message": "artifact root https://team:s3cret@host/x",
                         "sqlstate": "XX001", "error_class": "SOME_CLASS"})


def test_redacted_reraise_keeps_what_the_error_said() -> None:
    """An MLflow error other than an unanswering server goes up as it was raised (type, codes,
    traceback), with the credentials in its words redacted."""
    with pytest.raises(MlflowException) as caught:
        with tracking.unavailable("log the evaluation", "run the stage again"):
            _fails_deep_inside()
    error = caught.value
    assert "s3cret" not in str(error)
    assert error.error_code == "INVALID_STATE"
    text = "".join(traceback.format_exception(error))
    problems = []
    if not isinstance(error, RestException):
        problems.append(f"type {type(error).__name__}, not RestException")
    if getattr(error, "sqlstate", None) != "XX001" or getattr(error, "error_class", None) != "SOME_CLASS":
        problems.append(f"sqlstate/error_class {error.sqlstate}/{error.error_class}, not the server's XX001/SOME_CLASS")
    if "_fails_deep_inside" not in text:
        problems.append("traceback no longer shows where it was raised")
    assert not problems, "; ".join(problems)


class _NanOnSomeImages:
    """Wraps a model: its predictions for the first test image are NaN (a float16 overflow, say)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict(self, *args, **kwargs):
        probabilities = np.array(self._model.predict(*args, **kwargs))
        probabilities[0] = np.nan
        return probabilities


def test_a_model_predicting_nan_is_one_line_not_a_traceback(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose validation loss was finite can still overflow on some test images (float16):
    evaluate ended in scoring's ValueError traceback; it is one line, and nothing is written."""
    from stages import backbones

    load = backbones.load_saved_model
    monkeypatch.setattr(backbones, "load_saved_model", lambda *a, **k: _NanOnSomeImages(load(*a, **k)))
    with pytest.raises(UserError, match=r"not finite \(NaN or infinite\) or all zero for 1 of ") as raised:
        _evaluate(trained)
    assert "train@toy-net" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (trained / "reports" / "metrics.json").exists()


@pytest.mark.parametrize("history", [None, "", "loss,val_loss\n1.0,1.1\n"])
def test_a_missing_or_unreadable_history_csv_is_one_line_before_predicting(
    trained: Path, monkeypatch: pytest.MonkeyPatch, history: str | None
) -> None:
    """A model folder copied or pulled without train's history.csv (`dvc pull` of model.keras
    alone), an empty one or one without its epoch column: evaluate predicted the whole test split,
    then stopped drawing the curves with pandas' FileNotFoundError, EmptyDataError or KeyError
    traceback. Now one line naming the file and what to run, before the model is loaded."""
    from stages import backbones

    path = trained / "net" / "history.csv"
    if history is None:
        path.unlink()
    else:
        path.write_text(history, encoding="utf-8")
    monkeypatch.setattr(backbones, "load_saved_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(UserError, match=r"history\.csv: .*train@toy-net") as raised:
        _evaluate(trained)
    assert "\n" not in str(raised.value)


def test_only_the_figures_evaluate_draws_are_logged_not_a_killed_writes_leftover(trained: Path) -> None:
    """A figure's write killed by SIGKILL (evaluate run by hand) leaves its temporary file,
    `.confusion.png.<random>.tmp.png`, in the figures folder, with whatever else lies there (a
    figure an older version drew). Before, evaluate logged every PNG of the folder into the run's
    evaluation/: the half-written one too. Now the figures it drew, and those only."""
    figures = trained / "reports" / "figures"
    figures.mkdir(parents=True)
    (figures / ".confusion.png.k1ll3d.tmp.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (figures / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _evaluate(trained)
    run_id = json.loads((trained / "net" / "training.json").read_text())["run_id"]
    logged = {Path(a.path).name for a in MlflowClient().list_artifacts(run_id, "evaluation")}
    assert {name for name in logged if name.endswith(".png")} == {
        "confusion.png", "confusion_normalized.png", "curves.png", "f1.png", "mistakes.png"}


def test_confusion_csv_counts_every_pair_of_classes_from_the_predictions(trained: Path) -> None:
    """The DVC confusion plot's data: a row per actual and predicted class, every pair in the
    classes' order, 0 included, counting the predictions CSV's images (which stay one per image)."""
    import pandas as pd

    _evaluate(trained)
    out = trained / "reports"
    predictions = pd.read_csv(out / "predictions.csv", dtype={"actual": str, "predicted": str})
    confusion = pd.read_csv(out / "evaluation" / "confusion.csv", dtype={"actual": str, "predicted": str})
    from tests.test_training import CLASSES as classes

    n = len(classes)
    assert list(confusion.columns) == ["actual", "predicted", "count", "actual_index", "predicted_index"]
    pairs = list(zip(confusion["actual_index"], confusion["predicted_index"]))
    assert pairs == [(i, j) for i in range(n) for j in range(n)]
    assert list(confusion["actual"]) == [classes[i] for i in confusion["actual_index"]]
    assert list(confusion["predicted"]) == [classes[j] for j in confusion["predicted_index"]]
    counted = predictions.groupby(["actual_index", "predicted_index"]).size()
    for row in confusion.itertuples():
        assert row.count == counted.get((row.actual_index, row.predicted_index), 0)
    assert confusion["count"].sum() == len(predictions)
