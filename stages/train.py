"""train@<dataset>-<backbone>: fit one experiment's model on the prepared arrays.

    python -m stages.train --experiment digits-cnn --data data/processed/digits --out models/digits/cnn

Reads the uint8 arrays written by split (memory-mapped, no decoding), builds the classifier from
the backbone registry, trains it with Keras 3 `model.fit` and early stopping on validation loss,
and writes into `--out`: `model.keras`, `history.csv` (one row per epoch, a DVC plot) and
`training.json` (the resolved configuration, the MLflow run id, timings). Params and per-epoch
metrics go to MLflow as the run trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages import tracking
from stages.config import Experiment, load_params
from stages.errors import UserError, run_stage
from stages.files import atomic_path, write_json_atomic, write_text_atomic


@dataclasses.dataclass(frozen=True)
class PreparedData:
    classes: list[str]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    version: str  # a hash of what decides the arrays' content


def load_prepared(data: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> PreparedData:
    """Memory-map the arrays written by the split stage."""
    if not (data / "classes.json").exists():
        raise UserError(f"{data}: no prepared data; run the split stage for this dataset first")
    classes = json.loads((data / "classes.json").read_text(encoding="utf-8"))
    digest = hashlib.sha256()
    for name in ("splits.parquet", "meta.json", "classes.json"):
        digest.update((data / name).read_bytes())
    x = {s: np.load(data / f"{s}_x.npy", mmap_mode="r", allow_pickle=False) for s in splits}
    y = {s: np.load(data / f"{s}_y.npy", allow_pickle=False) for s in splits}
    return PreparedData(classes, x, y, digest.hexdigest()[:16])


def resolved_config(experiment: Experiment) -> dict[str, Any]:
    """Everything that decides the trained model, as plain data (for training.json and MLflow)."""
    dataset = experiment.dataset
    return {
        "experiment": experiment.name,
        "suite": experiment.suite,
        "dataset": experiment.dataset_name,
        "backbone": experiment.backbone_name,
        "image_size": dataset.image_size,
        "channels": dataset.channels,
        "augmentation": dataclasses.asdict(dataset.augmentation),
        "model": dataclasses.asdict(experiment.backbone),
        "training": dataclasses.asdict(experiment.training),
    }


def make_optimizer(name: str, learning_rate: float) -> Any:
    import keras

    optimizers = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}
    return optimizers[name](learning_rate=learning_rate)


def epoch_logger(run_id: str) -> Any:
    """A Keras callback sending each epoch's metrics to the MLflow run."""
    import keras
    from mlflow.entities import Metric

    client = tracking.mlflow_client().tracking.MlflowClient()

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            now = int(time.time() * 1000)
            metrics = [Metric(key, float(value), now, epoch) for key, value in (logs or {}).items()]
            client.log_batch(run_id, metrics=metrics)

    return MlflowEpochLogger()


def train(experiment_name: str, params_path: str, data_dir: Path, out: Path) -> dict[str, Any]:
    experiment = load_params(params_path).experiment(experiment_name)
    training = experiment.training
    data = load_prepared(data_dir)
    if len(data.x["train"]) == 0 or len(data.x["val"]) == 0:
        raise UserError(f"{data_dir}: the train or val split is empty; check split@{experiment.dataset_name}")

    import keras

    from stages.backbones import build_model

    keras.utils.set_random_seed(training.seed)
    model = build_model(
        experiment.backbone,
        image_size=experiment.dataset.image_size,
        channels=experiment.dataset.channels,
        num_classes=len(data.classes),
        augmentation=experiment.dataset.augmentation,
        seed=training.seed,
    )
    model.compile(
        optimizer=make_optimizer(training.optimizer, training.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    config = resolved_config(experiment)
    params_hash = tracking.stable_hash(config)
    run_key = tracking.stable_hash({"params": params_hash, "data": data.version})
    run_id = tracking.start_fresh_run(
        experiment.dataset_name,
        run_name=experiment.backbone_name,
        run_key=run_key,
        tags={
            "dataset": experiment.dataset_name,
            "backbone": experiment.backbone_name,
            "suite": experiment.suite,
            "experiment": experiment.name,
            "params_hash": params_hash,
            "data_version": data.version,
            "keras_backend": keras.backend.backend(),
        },
    )
    client = tracking.mlflow_client().tracking.MlflowClient()
    from mlflow.entities import Param

    flat = tracking.flatten({k: v for k, v in config.items() if k != "experiment"})
    client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(flat.items())])

    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=training.early_stopping_patience, restore_best_weights=True
        ),
        epoch_logger(run_id),
    ]
    started = time.perf_counter()
    history = model.fit(
        np.asarray(data.x["train"]),
        data.y["train"],
        validation_data=(np.asarray(data.x["val"]), data.y["val"]),
        epochs=training.epochs,
        batch_size=training.batch_size,
        callbacks=callbacks,
        shuffle=True,
        verbose=2,
    )
    seconds = time.perf_counter() - started
    client.set_terminated(run_id)

    epochs_run = len(history.history["loss"])
    best_epoch = int(np.argmin(history.history["val_loss"]))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.keras") as temporary:
        model.save(temporary)
    columns = ["epoch", *history.history]
    lines = [",".join(columns)]
    for epoch in range(epochs_run):
        lines.append(",".join([str(epoch)] + [f"{history.history[k][epoch]:.6f}" for k in history.history]))
    write_text_atomic(out / "history.csv", "\n".join(lines) + "\n")
    record = {
        "experiment": experiment.name,
        "run_id": run_id,
        "run_key": run_key,
        "params_hash": params_hash,
        "data_version": data.version,
        "tracking_uri": tracking.tracking_uri(),
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 2),
        "train_images_per_second": round(epochs_run * len(data.x["train"]) / seconds, 1),
        "parameters": int(model.count_params()),
        "config": config,
    }
    write_json_atomic(out / "training.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="an experiment name from params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="prepared data folder (split's output)")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    record = train(args.experiment, args.params, args.data, args.out)
    print(
        f"train@{args.experiment}: {record['epochs_run']} epochs in {record['train_seconds']} s "
        f"(best epoch {record['best_epoch']}); model in {args.out}; MLflow run {record['run_id']}"
    )


if __name__ == "__main__":
    run_stage(main)
