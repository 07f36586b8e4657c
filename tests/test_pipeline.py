"""End to end: `dvc repro report@demo` in a fresh copy of the repository, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def copy_repository(copy: Path) -> dict[str, str]:
    """The repository's tracked files in `copy`, committed to a new git repository, as a fresh
    clone would have them; returns the environment to run the pipeline in."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_", "KERAS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q"], copy, env)
    run([*git, "add", "-A"], copy, env)
    run([*git, "commit", "-qm", "clone"], copy, env)
    return env


def shorten_demo(copy: Path, small_cnn: int, mobilenetv2: int) -> None:
    """Fewer epochs for the demo's two experiments in `copy`, for tests that need the demo's
    outputs but not its accuracy: the full demo is run once, by `project`."""
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["experiments"]["digits-small_cnn"]["train"].update(epochs=small_cnn)
    params["experiments"]["digits-mobilenetv2"]["train"].update(epochs=mobilenetv2)
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the repository's tracked files, as a fresh clone would have them."""
    copy = tmp_path_factory.mktemp("clone")
    env = copy_repository(copy)
    first = run(["dvc", "repro", "report@demo"], copy, env)
    (copy / "first_repro.log").write_text(first.stdout + first.stderr)
    return copy, env


def mlflow_runs(copy: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    assert experiment is not None, "no MLflow experiment named after the dataset"
    return client.search_runs([experiment.experiment_id])


def test_demo_runs_every_stage_of_the_demo(project: tuple[Path, dict[str, str]]) -> None:
    """The first repro runs fetch, validate, split, both trains, both evaluates and the report."""
    copy, _ = project
    ran = stages_run((copy / "first_repro.log").read_text())
    assert sorted(ran) == sorted(
        [
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
        ]
    )


def test_demo_models_beat_chance_by_far(project: tuple[Path, dict[str, str]]) -> None:
    """The CNN reaches 95% on digits; MobileNetV2 from scratch is far above the 10% of chance."""
    copy, _ = project
    cnn = json.loads((copy / "reports/metrics/demo/digits/small_cnn.json").read_text())
    mobilenet = json.loads((copy / "reports/metrics/demo/digits/mobilenetv2.json").read_text())
    assert cnn["accuracy"] >= 0.95
    assert mobilenet["accuracy"] >= 0.6
    assert cnn["test_images"] == mobilenet["test_images"] > 200
    assert cnn["chance_accuracy"] < 0.15


def test_demo_outputs_are_where_the_readme_says(project: tuple[Path, dict[str, str]]) -> None:
    """Leaderboard, figures, predictions, validation docs and the manifest all exist."""
    copy, _ = project
    board = (copy / "reports/leaderboard/demo.md").read_text()
    assert "| digits | small_cnn |" in board and "| digits | mobilenetv2 |" in board
    for backbone in ("small_cnn", "mobilenetv2"):
        figures = copy / "reports/figures/digits" / backbone
        for name in ("confusion.png", "confusion_normalized.png", "curves.png", "f1.png", "mistakes.png"):
            assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        predictions = (copy / f"reports/predictions/digits/{backbone}.csv").read_text().splitlines()
        assert predictions[0] == "path,actual,predicted,confidence,actual_index,predicted_index"
        evaluation = copy / "reports/evaluation/digits" / backbone
        per_class = (evaluation / "per_class.csv").read_text().splitlines()
        assert per_class[0] == "class,precision,recall,f1,support" and len(per_class) == 11
        confusion = (evaluation / "confusion.csv").read_text().splitlines()
        assert confusion[0] == "actual,predicted,count,actual_index,predicted_index" and len(confusion) == 1 + 10 * 10
        report = json.loads((evaluation / "classification_report.json").read_text())
        assert set(report) >= {"0", "9", "accuracy", "macro avg", "weighted avg"}
        metrics = json.loads((copy / f"reports/metrics/demo/digits/{backbone}.json").read_text())
        assert metrics["accuracy_ci_low"] < metrics["accuracy"] < metrics["accuracy_ci_high"]
        assert metrics["selection_metric"] == "accuracy"  # digits' classes are balanced
        assert metrics["latency_ms_batch1"] > 0 and metrics["latency_ms_batch64"] > 0 and metrics["size_mb"] > 0
        assert metrics["latency_measured_on"] == "tensorflow on cpu"
        assert 0 <= metrics["expected_calibration_error"] <= 1 and metrics["top_3_accuracy"] >= metrics["accuracy"]
    assert (copy / "reports/leaderboard/demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((copy / "reports/validation/digits/summary.json").read_text())
    assert summary["files"] == summary["accepted"] + summary["set_aside"] == 1797
    assert (copy / "reports/validation/digits/docs/index.html").exists()
    assert (copy / "data/interim/digits/manifest.parquet").exists()


def test_demo_runs_are_in_mlflow_with_params_and_metrics(project: tuple[Path, dict[str, str]]) -> None:
    """One run per experiment in the dataset's MLflow experiment, with params, epochs and test metrics."""
    copy, _ = project
    runs = {run.info.run_name: run for run in mlflow_runs(copy)}
    assert set(runs) == {"small_cnn", "mobilenetv2"}
    for name, run in runs.items():
        record = json.loads((copy / f"reports/metrics/demo/digits/{name}.json").read_text())
        assert run.data.params["dataset"] == "digits"
        assert run.data.params["backbone"] == name
        assert "training.epochs" in run.data.params
        assert run.data.tags["suite"] == "demo"
        assert run.data.tags["latency_measured_on"] == record["latency_measured_on"]
        assert run.data.metrics["test_accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)
        assert "val_accuracy" in run.data.metrics
        assert run.data.metrics["test_images"] == record["test_images"] and not any(
            key.startswith("test_test_") for key in run.data.metrics)
        # What the test split did not measure keeps its own name.
        assert run.data.metrics["train_seconds"] == record["train_seconds"]
        assert run.data.metrics["parameters"] == record["parameters"]
        assert not {"test_train_seconds", "test_parameters", "test_size_mb", "test_epochs_run"} & set(run.data.metrics)
        # The metrics file logged with the run is the final one, with the registered version.
        logged = copy / "mlartifacts/digits" / run.info.run_id / f"artifacts/evaluation/{name}.json"
        assert json.loads(logged.read_text()) == record and "model_version" in record
        assert {"mlflow.source.git.commit", "dvc.data_hash", "params_hash"} <= set(run.data.tags)
        # Artifacts beside the database, as the README says, not in a folder named by MLflow's default.
        assert run.info.artifact_uri == (copy / "mlartifacts/digits" / run.info.run_id / "artifacts").as_uri()
        assert (copy / "mlartifacts/digits" / run.info.run_id / "artifacts/evaluation/mistakes.png").exists()
    assert not (copy / "mlruns").exists()


def test_models_are_registered_and_the_report_names_the_champion(project: tuple[Path, dict[str, str]]) -> None:
    """Each evaluation registers a version of the model `digits`; the champion alias is on the
    best by accuracy, marked in the leaderboard; predict classifies images with it."""
    from mlflow.tracking import MlflowClient

    copy, env = project
    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'digits'")
    assert sorted(v.tags["backbone"] for v in versions) == ["mobilenetv2", "small_cnn"]
    records = {b: json.loads((copy / f"reports/metrics/demo/digits/{b}.json").read_text()) for b in ("small_cnn", "mobilenetv2")}
    best = max(records, key=lambda b: records[b]["accuracy"])
    champion = client.get_model_version_by_alias("digits", "champion")
    assert champion.tags["backbone"] == best and int(champion.version) == records[best]["model_version"]
    assert f"| digits | {best} |" in next(line for line in (copy / "reports/leaderboard/demo.md").read_text().splitlines() if "yes (v" in line)

    image = sorted((copy / "data/raw/digits/4").iterdir())[0]
    predicted = run([sys.executable, "-m", "stages.predict", "--dataset", "digits", str(image)], copy, env)
    path, label, confidence = predicted.stdout.strip().split("\t")
    assert (path, label) == (str(image), "4") and 0 < float(confidence) <= 1

    # MLflow's own loader, as README shows it: the champion's probabilities are the model file's.
    script = (
        "import sys, json, numpy as np, mlflow\n"
        "from stages.backbones import custom_layers, load_saved_model\n"
        "custom_layers()\n"
        "x = np.load('data/processed/digits/test_x.npy')[:8]\n"
        "ours = np.asarray(load_saved_model(sys.argv[1], 'test').predict(x, verbose=0))\n"
        "theirs = np.asarray(mlflow.pyfunc.load_model('models:/digits@champion').predict(x))\n"
        "print(json.dumps({'shape': list(theirs.shape), 'difference': float(np.abs(ours - theirs).max())}))\n"
    )
    loaded = run([sys.executable, "-c", script, str(copy / f"models/digits/{best}/model.keras")], copy, env)
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["shape"] == [8, 10] and result["difference"] < 1e-5


def test_dvc_plots_render_the_evaluation_offline(project: tuple[Path, dict[str, str]]) -> None:
    """`python -m stages.plots show` (dvc plots show with an offline page) includes every figure
    of both experiments, the per-class F1 bars and the confusion plot."""
    copy, env = project
    run([sys.executable, "-m", "stages.plots", "show"], copy, env)
    page = (copy / "dvc_plots/index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    for backbone in ("small_cnn", "mobilenetv2"):
        for name in ("confusion", "confusion_normalized", "curves", "f1", "mistakes"):
            assert f"static/workspace_reports_figures_digits_{backbone}_{name}.png" in images
        assert f"vegaEmbed('#reports_evaluation_digits_{backbone}_per_class_csv'" in page
        assert f"vegaEmbed('#reports_evaluation_digits_{backbone}_confusion_csv'" in page
    assert "static/workspace_reports_leaderboard_demo.png" in images
    assert '<script src="vega-bundle.js"></script>' in page and "https://" not in page.split("<body")[0]
    for backbone in ("small_cnn", "mobilenetv2"):  # the history plot draws a learning curve, not seconds
        history = f"models/digits/{backbone}/history.csv"
        shown = json.loads(run(["dvc", "plots", "show", "--json", history], copy, env).stdout)
        spec = json.dumps(shown["data"][history][0]["content"]["layer"])
        assert '"field": "val_accuracy"' in spec and '"field": "seconds"' not in spec


def test_second_repro_runs_nothing_and_evaluate_reuses_its_run(project: tuple[Path, dict[str, str]]) -> None:
    """Nothing changed: nothing runs. A forced evaluate logs into the same run, not a new one."""
    copy, env = project
    again = run(["dvc", "repro", "report@demo"], copy, env)
    assert stages_run(again.stdout) == []
    assert "Data and pipelines are up to date." in again.stdout
    before = {run.info.run_id for run in mlflow_runs(copy)}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    versions = len(client.search_model_versions("name = 'digits'"))
    run(["dvc", "repro", "--force", "--single-item", "evaluate@digits-small_cnn"], copy, env)
    assert {run.info.run_id for run in mlflow_runs(copy)} == before
    assert len(client.search_model_versions("name = 'digits'")) == versions  # the same model is not registered twice


def test_changing_one_experiments_training_param_reruns_only_it(project: tuple[Path, dict[str, str]]) -> None:
    """A new epoch count for the CNN reruns its train and evaluate and the report, nothing else."""
    copy, env = project
    params_path = copy / "params.yaml"
    text = params_path.read_text()
    params = yaml.safe_load(text)
    params["experiments"]["digits-small_cnn"]["train"]["epochs"] = 3
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = run(["dvc", "repro", "report@demo"], copy, env)
    # weights@ reads the experiment's entry too; it reruns in a moment and writes the same record.
    assert sorted(stages_run(rerun.stdout)) == [
        "evaluate@digits-small_cnn", "report@demo", "train@digits-small_cnn", "weights@digits-small_cnn"
    ]
    record = json.loads((copy / "reports/metrics/demo/digits/small_cnn.json").read_text())
    assert record["epochs_run"] == 3


def test_the_demo_runs_end_to_end_on_the_jax_backend(tmp_path: Path) -> None:
    """`KERAS_BACKEND=jax dvc repro report@demo`: every stage runs on JAX (fewer epochs: Keras on
    JAX compiles slowly on a CPU), the models are good, and they load on TensorFlow too, where they
    predict the test split as evaluate on JAX did."""
    env = copy_repository(tmp_path)
    env["KERAS_BACKEND"] = "jax"
    shorten_demo(tmp_path, small_cnn=8, mobilenetv2=4)
    first = run(["dvc", "repro", "report@demo"], tmp_path, env)
    assert "report@demo" in stages_run(first.stdout)
    for backbone in ("small_cnn", "mobilenetv2"):
        record = json.loads((tmp_path / f"models/digits/{backbone}/training.json").read_text())
        assert record["keras_backend"] == "jax" and record["dtype_policy"] == "float32"
    cnn = json.loads((tmp_path / "reports/metrics/demo/digits/small_cnn.json").read_text())
    assert cnn["accuracy"] >= 0.9 and cnn["epochs_run"] == 8 and cnn["latency_measured_on"] == "jax on cpu"
    board = (tmp_path / "reports/leaderboard/demo.md").read_text()
    assert "| digits | small_cnn |" in board and "| digits | mobilenetv2 |" in board
    # On TensorFlow, each model predicts the test split as evaluate did on JAX (its predictions CSV).
    load = (
        "import json, sys, keras, numpy as np, pandas as pd; from stages.backbones import custom_layers; "
        "root, backbone = sys.argv[1:]; "
        "m = keras.saving.load_model(f'{root}/models/digits/{backbone}/model.keras', custom_objects=custom_layers(), "
        "safe_mode=True); classes = json.load(open(f'{root}/data/processed/digits/classes.json')); "
        "x = np.load(f'{root}/data/processed/digits/test_x.npy'); "
        "ours = [str(classes[i]) for i in np.argmax(m.predict(x, verbose=0), axis=1)]; "
        "theirs = pd.read_csv(f'{root}/reports/predictions/digits/{backbone}.csv', dtype=str)['predicted'].tolist(); "
        "print(keras.backend.backend(), len(ours) == len(theirs), np.mean([a == b for a, b in zip(ours, theirs)]))"
    )
    tf_env = {**env, "KERAS_BACKEND": "tensorflow"}
    for backbone in ("small_cnn", "mobilenetv2"):
        backend, same_length, agreement = run([sys.executable, "-c", load, str(tmp_path), backbone], REPO, tf_env).stdout.split()[-3:]
        assert backend == "tensorflow" and same_length == "True" and float(agreement) >= 0.99, (backbone, agreement)


def test_a_reverted_code_change_brings_back_outputs_whose_run_is_live(tmp_path: Path) -> None:
    """Edit a module train@ depends on, repro, revert it, repro: DVC restores train@ and evaluate@
    from its run cache (no stage runs), so the run the restored training.json names must still be
    a live MLflow run (before, the retrain under the edited code had deleted it)."""
    from mlflow.tracking import MlflowClient

    env = copy_repository(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["experiments"]["digits-small_cnn"]["train"].update(epochs=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    target = ["dvc", "repro", "evaluate@digits-small_cnn"]
    run(target, tmp_path, env)
    record = tmp_path / "models/digits/small_cnn/training.json"
    first = json.loads(record.read_text())["run_id"]
    code = tmp_path / "stages/train.py"
    original = code.read_text()
    code.write_text(original + "# an edit\n")
    assert "train@digits-small_cnn" in stages_run(run(target, tmp_path, env).stdout)
    code.write_text(original)
    restored = run(target, tmp_path, env)
    assert stages_run(restored.stdout) == [] and "is cached - skipping run" in restored.stdout
    assert json.loads(record.read_text())["run_id"] == first
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(first).info.lifecycle_stage == "active", "the workspace's model names a deleted run"
