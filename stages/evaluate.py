"""evaluate@<dataset>-<backbone>: score a trained model on the test split.

    python -m stages.evaluate --experiment digits-cnn --data data/processed/digits \
        --model models/digits/cnn --metrics reports/metrics/demo/digits/cnn.json \
        --predictions reports/predictions/digits/cnn.csv --figures reports/figures/digits/cnn

Writes the test metrics (DVC metrics), one prediction per test image (a DVC confusion plot),
figures (confusion matrix in counts and normalised, training curves) and a classification report,
and logs the metrics and files into the MLflow run that training opened, so one experiment is one
run however often evaluate is repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages import tracking
from stages.config import load_params
from stages.errors import UserError, run_stage
from stages.files import atomic_path, write_json_atomic
from stages.train import load_prepared


def score(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> tuple[dict[str, float], dict]:
    """Headline metrics and the per-class report for predicted class probabilities."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, classification_report, f1_score

    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(classes)))
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "test_images": int(len(y_true)),
        "chance_accuracy": float(np.bincount(y_true, minlength=len(classes)).max() / max(len(y_true), 1)),
    }
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0
    )
    return metrics, report


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path, normalise: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.45 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_pred,
        labels=list(range(len(classes))),
        display_labels=classes,
        normalize="true" if normalise else None,
        values_format=".2f" if normalise else "d",
        cmap="Blues",
        colorbar=False,
        ax=axes,
        xticks_rotation=45 if len(classes) > 6 else "horizontal",
    )
    axes.set_title("Confusion matrix" + (" (normalised by true class)" if normalise else " (counts)"))
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def curves_figure(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for name, axes in (("loss", loss), ("accuracy", accuracy)):
        for prefix in ("", "val_"):
            if prefix + name in history:
                axes.plot(history["epoch"], history[prefix + name], label=(prefix or "train_").rstrip("_"))
        axes.set_xlabel("epoch")
        axes.set_title(name)
        axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def evaluate(
    experiment_name: str,
    params_path: str,
    data_dir: Path,
    model_dir: Path,
    metrics_path: Path,
    predictions_path: Path,
    figures: Path,
) -> dict[str, Any]:
    experiment = load_params(params_path).experiment(experiment_name)
    training_record = json.loads((model_dir / "training.json").read_text(encoding="utf-8"))
    data = load_prepared(data_dir, splits=("test",))
    if len(data.y["test"]) == 0:
        raise UserError(f"{data_dir}: the test split is empty; check split@{experiment.dataset_name}")

    import keras

    from stages import runtime
    from stages.backbones import custom_layers

    runtime.keep_tensorflow_out()
    model = keras.saving.load_model(model_dir / "model.keras", custom_objects=custom_layers(), safe_mode=True)
    x_test, y_test = np.asarray(data.x["test"]), data.y["test"]
    started = time.perf_counter()
    probabilities = np.asarray(model.predict(x_test, batch_size=256, verbose=0))
    predict_seconds = time.perf_counter() - started
    y_pred = probabilities.argmax(axis=1)
    metrics, report = score(y_test, probabilities, data.classes)

    splits = pd.read_parquet(data_dir / "splits.parquet")
    test_paths = splits.loc[splits["split"] == "test", "path"].to_list()
    predictions = pd.DataFrame(
        {
            "path": test_paths,
            "actual": [data.classes[i] for i in y_test],
            "predicted": [data.classes[i] for i in y_pred],
            "confidence": probabilities.max(axis=1).round(6),
        }
    )
    with atomic_path(predictions_path) as temporary:
        predictions.to_csv(temporary, index=False)

    figures.mkdir(parents=True, exist_ok=True)
    confusion_figure(y_test, y_pred, data.classes, figures / "confusion.png", normalise=False)
    confusion_figure(y_test, y_pred, data.classes, figures / "confusion_normalized.png", normalise=True)
    curves_figure(pd.read_csv(model_dir / "history.csv"), figures / "curves.png")
    write_json_atomic(figures / "classification_report.json", report)

    reference = dataclasses.asdict(experiment.dataset.reference)
    # Numbers only: this is a DVC metrics file, shown column by column by `dvc metrics show`.
    record = {
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
        "epochs_run": training_record["epochs_run"],
        "train_seconds": training_record["train_seconds"],
        "train_images_per_second": training_record["train_images_per_second"],
        "predict_ms_per_image": round(1000 * predict_seconds / len(y_test), 4),
        "parameters": training_record["parameters"],
        "reference_course": reference["course"],
        "reference_published": reference["published"],
    }
    write_json_atomic(metrics_path, record)

    client = tracking.mlflow_client().tracking.MlflowClient()
    run_id = training_record["run_id"]
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"test_{k}", float(v), now, 0) for k, v in metrics.items()])
    for path in sorted(figures.iterdir()):
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    client.log_artifact(run_id, str(metrics_path), artifact_path="evaluation")
    client.set_tag(run_id, "evaluated", "true")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="the train stage's output folder")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--figures", type=Path, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    record = evaluate(
        args.experiment, args.params, args.data, args.model, args.metrics, args.predictions, args.figures
    )
    print(
        f"evaluate@{args.experiment}: test accuracy {record['accuracy']:.4f}, balanced {record['balanced_accuracy']:.4f}, "
        f"macro F1 {record['macro_f1']:.4f} on {record['test_images']} images; metrics in {args.metrics}"
    )


if __name__ == "__main__":
    run_stage(main)
