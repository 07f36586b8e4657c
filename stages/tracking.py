"""MLflow: where runs go, and how a run is found again.

The tracking URI comes from `MLFLOW_TRACKING_URI`; without it, runs go to `mlflow.db`, a SQLite
file at the repository root, named by absolute path so stages run from any working folder write
to the same place. One MLflow experiment per dataset; one run per (dataset, backbone, resolved
params, data version), found again by the `classmatrix.run_key` tag so that re-running a stage
never leaves two runs for the same thing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN_KEY_TAG = "classmatrix.run_key"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def mlflow_client() -> Any:
    """The mlflow module, pointed at our tracking URI, with its chatty loggers quietened."""
    import mlflow

    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def experiment_id(dataset: str) -> str:
    """The MLflow experiment for `dataset`, created on first use."""
    mlflow = mlflow_client()
    experiment = mlflow.get_experiment_by_name(dataset)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow.tracking.MlflowClient().restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = None
    if "MLFLOW_TRACKING_URI" not in os.environ:
        # Beside the database, not relative to whichever folder the stage ran in.
        artifact_location = (ROOT / "mlartifacts" / dataset).as_uri()
    return mlflow.create_experiment(dataset, artifact_location=artifact_location)


def stable_hash(data: Any) -> str:
    """A short hash of JSON-able data, independent of key order."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def start_fresh_run(dataset: str, run_name: str, run_key: str, tags: dict[str, str]) -> str:
    """Create the run for `run_key`, retiring any earlier run with the same key; return its id.

    A retrain with identical params and data (after a code change, say) replaces the old run
    rather than adding a second one beside it.
    """
    mlflow = mlflow_client()
    client = mlflow.tracking.MlflowClient()
    exp = experiment_id(dataset)
    for old in client.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'"):
        client.delete_run(old.info.run_id)
    run = client.create_run(exp, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    return run.info.run_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as flat `a.b.c` MLflow params."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def run_exists(run_id: str) -> bool:
    """Whether `run_id` is a live run (not deleted) in the tracking store."""
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow_client().tracking.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active"


def reopen_run(run_id: str) -> None:
    """Mark a run that a killed stage left behind as running again, to be continued."""
    mlflow_client().tracking.MlflowClient().update_run(run_id, status="RUNNING")
