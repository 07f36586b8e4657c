r"""evaluate@<dataset>-<backbone>: score a trained model on the test split, and register it.

    python -m stages.evaluate --experiment digits-small_cnn --data data/processed/digits \
        --model models/digits/small_cnn --metrics reports/metrics/demo/digits/small_cnn.json \
        --predictions reports/predictions/digits/small_cnn.csv --figures reports/figures/digits/small_cnn \
        --evaluation reports/evaluation/digits/small_cnn

Writes, all before MLflow is contacted:
- the test metrics (a DVC metrics file): accuracy with its 95% Wilson interval, balanced
  accuracy, macro and weighted F1, top-3 accuracy (5+ classes), one-vs-rest ROC AUC, expected
  calibration error, latency at batch 1 and 64, model size, the training cost, the course's
  figures, and the metric that picks this dataset's champion;
- one prediction per test image (CSV);
- figures (DVC plots): confusion matrix in counts and normalised, training curves, per-class F1,
  the most confident mistakes;
- in `--evaluation`: the classification report (JSON), per-class scores (CSV, a DVC plot) and the
  count of test images per actual and predicted class, every pair (confusion.csv, DVC's confusion plot).

Once the model is registered, the metrics file gains `model_version`.

Then it logs all of that into the MLflow run that training opened (one run per experiment,
however often evaluate is repeated) and logs the model with its signature and an input example,
registered as a version of the model named after the dataset. A model already registered from
this run with the same bytes is not registered again. If the tracking server does not answer,
the local outputs stay and the stage fails in one line; a re-run logs everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages import figures as draw
from stages import metrics as scoring
from stages import tracking
from stages.config import Experiment, load_params
from stages.errors import UserError, run_stage
from stages.files import atomic_path, write_json_atomic
from stages.loader import check_prepared, load_prepared

MISTAKES_SHOWN = 16
# Latency is timed at these batch sizes: one image (interactive use) and a serving batch.
LATENCY_BATCHES = (1, 64)
# Tags on each registered version: what the report stage compares when it picks a champion.
VERSION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
# Numbers of the metrics record that the test split did not measure: logged under their own names.
NOT_TEST_METRICS = frozenset({
    "train_imbalance_ratio", "parameters", "size_mb", "epochs_run", "train_seconds", "train_images_per_second",
    "reference_course", "reference_published",
})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What evaluate reads of training's record (`phases` may be absent: an older train wrote none).
TRAINING_KEYS = ("run_id", "data_version", "parameters", "epochs_run", "train_seconds", "train_images_per_second", "config")


def read_training_record(path: Path, experiment: str) -> dict[str, Any]:
    """train's `training.json`, with every key evaluate needs; else one line saying to retrain."""
    retrain = f"run train@{experiment} again (dvc repro train@{experiment})"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {retrain}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not readable JSON ({error}); {retrain}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a training record (a JSON object); {retrain}")
    missing = [key for key in TRAINING_KEYS if key not in record]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} (written by other code, or edited); {retrain}")
    return record


def read_history(path: Path, experiment: str) -> pd.DataFrame:
    """train's `history.csv` (one row per epoch, an `epoch` column); else one line saying to retrain."""
    retrain = f"run train@{experiment} again (dvc repro train@{experiment}), or dvc pull it with the model"
    try:
        history = pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {retrain}") from None
    except (OSError, ValueError) as error:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise UserError(f"{path}: not readable CSV ({str(error).strip()}); {retrain}") from None
    if "epoch" not in history:
        raise UserError(f"{path}: no epoch column (written by other code, or edited); {retrain}")
    return history


def evaluate(
    experiment_name: str,
    params_path: str,
    data_dir: Path,
    model_dir: Path,
    metrics_path: Path,
    predictions_path: Path,
    figures: Path,
    evaluation: Path,
) -> dict[str, Any]:
    experiment = load_params(params_path).experiment(experiment_name)
    if model_dir.is_file():
        # Else "model.keras/training.json: missing; run train again", a retrain of a model that is there.
        raise UserError(f"--model {model_dir} is a file; give train's output folder, which holds model.keras, "
                        f"training.json and history.csv: --model {model_dir.parent}")
    training_record = read_training_record(model_dir / "training.json", experiment.name)
    history = read_history(model_dir / "history.csv", experiment.name)
    data = load_prepared(data_dir, splits=("train", "test"))
    check_prepared(data, data_dir, experiment.dataset_name, experiment.dataset)
    trained_on = training_record["data_version"]
    if trained_on != data.version:
        # Split ran again since (evaluate run by hand, or with --single-item): the test split may
        # now hold images the model trained on, and its score would go to the registry.
        raise UserError(
            f"evaluate@{experiment.name}: the model was trained on prepared data {trained_on}, but {data_dir} is now "
            f"{data.version} (split@{experiment.dataset_name} ran again since); its test split may hold training "
            f"images: retrain it first, dvc repro train@{experiment.name}"
        )
    if len(data.y["test"]) == 0:
        raise UserError(f"{data_dir}: the test split is empty; check split@{experiment.dataset_name}")

    from stages import runtime
    from stages.backbones import load_saved_model
    from stages.loader import array_batches, keras_input

    runtime.import_keras_quietly()
    runtime.keep_tensorflow_out()
    import keras

    model_file = model_dir / "model.keras"
    model = load_saved_model(model_file, f"evaluate@{experiment.name}")
    # Loaded for inference, uncompiled, it would pick XLA by Keras's "auto" (on with JAX, and with
    # TensorFlow on a GPU); it predicts without XLA where training ran without it (jit_compile off).
    if (training_record.get("phases") or [{}])[-1].get("xla") is False:
        model.jit_compile = False
    x_test, y_test = np.asarray(data.x["test"]), data.y["test"]
    test_batches = array_batches(x_test, y_test, batch_size=256, seed=0, shuffle=False)
    probabilities = np.asarray(model.predict(keras_input(test_batches), verbose=0), dtype="float64")
    # A model that overflows (float16 logits, weights gone to inf) answers NaN for some images: a
    # model to retrain, not a bug to trace back; nothing is written or registered for it.
    unusable = ~np.isfinite(probabilities).all(axis=1) | ~(probabilities.sum(axis=1) > 0)
    if unusable.any():
        raise UserError(
            f"evaluate@{experiment.name}: the model's output is not finite (NaN or infinite) or all zero for "
            f"{int(unusable.sum())} of {len(unusable)} test images: its weights overflow or diverged; retrain it, "
            f"with a lower {experiment.training_key('learning_rate')} or {experiment.training_key('mixed_precision')}: "
            f"off (dvc repro --force train@{experiment.name})"
        )
    y_pred = probabilities.argmax(axis=1)
    headline, per_class = scoring.score(y_test, probabilities, data.classes)
    report = scoring.classification_report_dict(y_test, y_pred, data.classes)
    latency = {
        f"latency_ms_batch{size}": round(scoring.measure_latency(model.predict_on_batch, x_test, size), 4)
        for size in LATENCY_BATCHES
    }
    # Latency depends on the backend and device as much as on the model: say which timed it.
    device = runtime.accelerator()
    latency["latency_measured_on"] = f"{keras.backend.backend()} on {'cpu' if device.kind == 'cpu' else device.name}"
    size = scoring.model_size(model_file, training_record["parameters"])
    train_counts = np.bincount(data.y["train"], minlength=len(data.classes))
    chosen = scoring.selection_metric(train_counts, experiment.dataset.metric)

    # Local outputs first: they are written whether or not the tracking server answers.
    splits = pd.read_parquet(data_dir / "splits.parquet")
    test_paths = splits.loc[splits["split"] == "test", "path"].to_list()
    predictions = predictions_table(test_paths, data.classes, y_test, probabilities)
    with atomic_path(predictions_path) as temporary:
        predictions.to_csv(temporary, index=False)
    drawn = write_figures(figures, history, data.classes, x_test, y_test, probabilities, per_class)
    evaluation.mkdir(parents=True, exist_ok=True)
    write_json_atomic(evaluation / "classification_report.json", report)
    per_class_table = pd.DataFrame(
        [{"class": name, **{k: round(v, 6) if isinstance(v, float) else v for k, v in scores.items()}}
         for name, scores in per_class.items()]
    )
    with atomic_path(evaluation / "per_class.csv") as temporary:
        per_class_table.to_csv(temporary, index=False)
    with atomic_path(evaluation / "confusion.csv") as temporary:
        confusion_table(data.classes, y_test, y_pred).to_csv(temporary, index=False)

    reference = dataclasses.asdict(experiment.dataset.reference)
    record = {
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in headline.items()},
        "selection_metric": chosen,
        "selection_score": round(float(headline[chosen]), 6),
        "train_imbalance_ratio": round(float(train_counts.max() / max(train_counts.min(), 1)), 3),
        **latency,
        **size,
        "epochs_run": training_record["epochs_run"],
        "train_seconds": training_record["train_seconds"],
        "train_images_per_second": training_record["train_images_per_second"],
        "reference_course": reference["course"],
        "reference_published": reference["published"],
    }
    write_json_atomic(metrics_path, record)

    consequence = (
        f"the evaluation is written ({metrics_path}, {figures}, {evaluation}); run the stage again when the "
        "server answers to log it"
    )
    with tracking.unavailable("log the evaluation", consequence):
        log_evaluation(
            experiment, training_record, record, model, model_file, x_test[:1], probabilities.shape[1],
            data.classes, metrics_path, [predictions_path, *drawn,
                                         evaluation / "classification_report.json", evaluation / "per_class.csv",
                                         evaluation / "confusion.csv"],
        )
    return record


def predictions_table(
    paths: list[str], classes: list[str], y_test: np.ndarray, probabilities: np.ndarray
) -> pd.DataFrame:
    """One row per test image: its path, actual and predicted class, the confidence, and each class's
    index in params.yaml."""
    y_pred = probabilities.argmax(axis=1)
    return pd.DataFrame(
        {
            "path": paths,
            "actual": [classes[i] for i in y_test],
            "predicted": [classes[i] for i in y_pred],
            "confidence": probabilities.max(axis=1).round(6),
            "actual_index": np.asarray(y_test, dtype=int),
            "predicted_index": y_pred,
        }
    )


def confusion_table(classes: list[str], y_test: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """The DVC confusion plot's data (.dvc/plots/confusion_ordered.json): the count of test images
    of each actual and predicted class, every pair of classes in params.yaml's order, 0 included,
    so that the plot has a row and a column for each class as confusion.png does, also one never
    predicted or with no test image; with each class's index, by which it orders its axes (not by
    name: "10" before "9")."""
    n = len(classes)
    counts = np.bincount(np.asarray(y_test, dtype=int) * n + np.asarray(y_pred, dtype=int), minlength=n * n)
    actual, predicted = np.divmod(np.arange(n * n), n)
    return pd.DataFrame(
        {
            "actual": [classes[i] for i in actual],
            "predicted": [classes[j] for j in predicted],
            "count": counts,
            "actual_index": actual,
            "predicted_index": predicted,
        }
    )


def write_figures(
    figures: Path, history: pd.DataFrame, classes: list[str], x_test: np.ndarray, y_test: np.ndarray,
    probabilities: np.ndarray, per_class: dict[str, dict[str, Any]],
) -> list[Path]:
    """Draw the figures and return their paths: what is logged to MLflow, not every PNG of the
    folder, where a write killed by hand leaves its temporary file (.confusion.png.*.tmp.png)."""
    y_pred = probabilities.argmax(axis=1)
    figures.mkdir(parents=True, exist_ok=True)
    draw.confusion_figure(y_test, y_pred, classes, figures / "confusion.png", normalise=False)
    draw.confusion_figure(y_test, y_pred, classes, figures / "confusion_normalized.png", normalise=True)
    draw.curves_figure(history, figures / "curves.png")
    draw.f1_bars_figure(per_class, figures / "f1.png")
    shown = scoring.most_confident_mistakes(y_test, probabilities, n=MISTAKES_SHOWN)
    draw.mistakes_figure(
        x_test[shown],
        [classes[i] for i in y_test[shown]],
        [classes[i] for i in y_pred[shown]],
        [float(probabilities[i].max() / probabilities[i].sum()) for i in shown],
        figures / "mistakes.png",
    )
    return [figures / name for name in ("confusion.png", "confusion_normalized.png", "curves.png", "f1.png", "mistakes.png")]


def log_evaluation(
    experiment: Experiment, training_record: dict, record: dict, model: Any, model_file: Path,
    example: np.ndarray, num_classes: int, classes: list[str], metrics_path: Path, files: list[Path],
) -> int:
    """Log the test metrics, files and model into training's run and register the model; the
    version goes into `record` and the metrics file, which is logged last, with it. Returns it."""
    from mlflow.entities import Metric

    mlflow = tracking.mlflow_client()
    client = mlflow.tracking.MlflowClient()
    run_id = training_record.get("run_id") or ""
    if run_id and tracking.revive_run(run_id):
        print(
            f"evaluate@{experiment.name}: restored MLflow run {run_id}, which a retrain with the same params, "
            "data and code had replaced: DVC brought back its training's outputs"
        )
    if not run_id or not tracking.run_exists(run_id):
        raise UserError(
            f"evaluate@{experiment.name}: the MLflow run {run_id or '(none)'} that training recorded is not in "
            f"{tracking.shown_uri()} (training logged to {training_record.get('tracking_uri')}); point "
            f"MLFLOW_TRACKING_URI there, or retrain: dvc repro --force --single-item train@{experiment.name}"
        )
    timestamp = int(pd.Timestamp.now("UTC").timestamp() * 1000)
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    # What the test split measured is test_<name> (test_images, not test_test_images); what
    # describes the model, its training or the references keeps its own name.
    names = {k: k if k.startswith("test_") or k in NOT_TEST_METRICS else f"test_{k}" for k in numbers}
    # A rerun (dvc repro --force, a code change) updates the run: a value the run already holds is
    # not logged again, as a second point of the same metric.
    latest = client.get_run(run_id).data.metrics
    changed = [Metric(names[k], float(v), timestamp, 0) for k, v in numbers.items() if latest.get(names[k]) != float(v)]
    if changed:
        client.log_batch(run_id, metrics=changed)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    client.log_dict(run_id, training_record["config"], "config.json")
    client.set_tag(run_id, "selection_metric", record["selection_metric"])
    client.set_tag(run_id, "latency_measured_on", record["latency_measured_on"])
    client.set_tag(run_id, "evaluated", "true")
    version = register_model(
        experiment, run_id, record, model, model_file, example, num_classes, classes,
        str(training_record.get("data_version", "")),
    )
    # The registry version this evaluation describes, for the report stage's champion.
    record["model_version"] = version
    write_json_atomic(metrics_path, record)
    client.log_artifact(run_id, str(metrics_path), artifact_path="evaluation")
    return version


def register_model(
    experiment: Experiment, run_id: str, record: dict, model: Any, model_file: Path,
    example: np.ndarray, num_classes: int, classes: list[str], data_version: str,
) -> int:
    """The registered version of this run's model: the existing one if its bytes are the same,
    else a new one logged with signature, input example and the metadata predict needs."""
    mlflow = tracking.mlflow_client()
    client = mlflow.tracking.MlflowClient()
    name = experiment.dataset_name
    digest = file_sha256(model_file)
    of_run = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    same = [version for version in of_run if version.tags.get("model_sha256") == digest]
    if same:
        version = max(same, key=lambda v: int(v.version))
    else:
        version = _log_model(
            mlflow, experiment, run_id, model, example, num_classes, classes, name, digest, taken=bool(of_run)
        )
    tags = {
        "experiment": experiment.name,
        "backbone": experiment.backbone_name,
        "suite": experiment.suite,
        "model_sha256": digest,
        "selection_metric": record["selection_metric"],
        "data_version": data_version,
        **{f"test_{key}": f"{record[key]:.6f}" for key in VERSION_METRICS},
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return int(version.version)


def _log_model(
    mlflow: Any, experiment: Experiment, run_id: str, model: Any, example: np.ndarray, num_classes: int,
    classes: list[str], name: str, digest: str, taken: bool,
) -> Any:
    import importlib.metadata
    import tempfile

    import keras
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, *example.shape[1:]), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, num_classes), "probabilities")]),
    )
    backend = keras.backend.backend()
    packages = ["keras", "numpy", {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend, backend)]
    requirements = [f"{package}=={importlib.metadata.version(package)}" for package in packages]
    metadata = {
        "classes": classes,
        "image_size": int(experiment.dataset.image_size),
        "channels": int(experiment.dataset.channels),
        "keras_backend": backend,
        "experiment": experiment.name,
        "custom_objects": "stages.backbones.custom_layers",
    }
    client = mlflow.tracking.MlflowClient()
    # mlflow.keras.log_model fails with an input example (mlflow/mlflow#16183: it writes the
    # example before creating the folder), so the model is saved here and logged as artifacts.
    # A later model of the same run (a forced retrain) goes beside it, so versions never change.
    artifact_path = "model" if not taken else f"model-{digest[:12]}"
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "model"
        local.mkdir()
        mlflow.keras.save_model(
            model, str(local), signature=signature, input_example=np.ascontiguousarray(example),
            pip_requirements=requirements, metadata=metadata,
        )
        client.log_artifacts(run_id, str(local), artifact_path=artifact_path)
    # The sha256 tag is created with the version, in the same request: a server that stops
    # between two requests cannot leave a version that a re-run would not recognise as this model.
    version = mlflow.register_model(
        f"runs:/{run_id}/{artifact_path}", name, await_registration_for=0, tags={"model_sha256": digest}
    )
    return client.get_model_version(name, str(version.version))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="the train stage's output folder")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--figures", type=Path, required=True, help="folder for the PNG figures")
    parser.add_argument("--evaluation", type=Path, required=True, help="folder for the report and per-class CSV")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    record = evaluate(
        args.experiment, args.params, args.data, args.model, args.metrics, args.predictions, args.figures,
        args.evaluation,
    )
    low, high = record["accuracy_ci_low"], record["accuracy_ci_high"]
    print(
        f"evaluate@{args.experiment}: test accuracy {record['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
        f"balanced {record['balanced_accuracy']:.4f}, macro F1 {record['macro_f1']:.4f} on "
        f"{record['test_images']} images; {record['latency_ms_batch1']:.2f} ms/image at batch 1; "
        f"registered as {load_params(args.params).experiment(args.experiment).dataset_name} "
        f"version {record['model_version']}; metrics in {args.metrics}"
    )


if __name__ == "__main__":
    run_stage(main)
