r"""train@<dataset>-<backbone>: fit one experiment's model on the prepared arrays.

    python -m stages.train --experiment digits-small_cnn --data data/processed/digits \
        --weights data/weights/digits-small_cnn --out models/digits/small_cnn

Reads the uint8 arrays written by split (memory-mapped, no decoding), builds the classifier from
the backbone registry (a pretrained base loads the file the weights stage pinned) and trains it
with Keras 3 `model.fit`, on whichever backend KERAS_BACKEND names:

- phase 1 trains the whole model from scratch, or the head on a frozen pretrained base; with a
  frozen base and no augmentation, the base's features are computed once and the head trains on
  them (`training.feature_cache`);
- phase 2 (`training.fine_tune`), for a pretrained base only, unfreezes the base's top blocks,
  keeps BatchNormalization frozen and in inference mode, recompiles at a low learning rate and
  trains on.

Each phase stops early on validation loss and keeps its best weights; phase 2 keeps phase 1's
weights unless it beats them. After every epoch the whole training state (weights, optimizer,
random generators, early-stopping state, history) is written to `<out>/checkpoint.npz` (a frozen
base's variables once per phase, beside it: see Checkpoint), so a killed run resumes from its
last completed epoch and ends with the weights an uninterrupted run would have had: only a run
of the same params, prepared arrays, weights file, backend, dtype policy and number of
data-parallel devices, code (CODE_MODULES) and library versions resumes; any other starts over.
On a GPU it trains in mixed precision with XLA.

Writes into `--out`: `model.keras`, `history.csv` (one row per epoch, a DVC plot) and
`training.json` (the resolved configuration, the MLflow run id, phases, timings; phase 2's
record says what it trained: base_layers_trained, trained_from). Params and per-epoch metrics go
to MLflow as the run trains; what phase 2 trained, as tags when it ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from stages import tracking
from stages.config import Experiment, load_params
from stages.errors import UserError, run_stage
from stages.files import atomic_path, write_json_atomic, write_text_atomic
from stages.loader import PreparedData, check_prepared, load_prepared

CHECKPOINT = "checkpoint.npz"
# The modules whose code decides the weights training ends with: train's `stages/` deps in
# dvc.yaml (a test checks they agree). A checkpoint resumes only under the same code.
CODE_MODULES = ("train", "augmentation", "backbones", "config", "loader", "runtime", "tracking", "weights")
# The libraries under it, by Keras backend.
LIBRARIES = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib"), "torch": ("torch",)}
# Cached features may take this many bytes; beyond it the frozen base runs every epoch.
FEATURE_CACHE_BYTES = 4 << 30


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


@dataclasses.dataclass(frozen=True)
class Phase:
    number: int  # 1 or 2
    epochs: int
    learning_rate: float
    unfreeze: int | None  # phase 2: the base's top layers to train (0: all)


def plan_phases(experiment: Experiment) -> list[Phase]:
    training = experiment.training
    phases = [Phase(1, training.epochs, training.learning_rate, None)]
    tune = training.fine_tune
    if tune.epochs and is_frozen(experiment):
        phases.append(Phase(2, tune.epochs, tune.learning_rate, tune.unfreeze))
    return phases


def is_frozen(experiment: Experiment) -> bool:
    return bool(experiment.backbone.weights) and experiment.backbone.freeze


# --------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue after the last completed epoch, in one file.


@dataclasses.dataclass
class TrainingState:
    run_key: str
    run_id: str  # "" until the tracking server has created the run
    phase_index: int = 0  # index into plan_phases
    phase_epoch: int = 0  # epochs completed in this phase
    epoch: int = 0  # epochs completed in all
    best_loss: float = float("inf")  # this phase's best validation loss (phase 2 starts from phase 1's)
    best_epoch: int = -1
    wait: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    phases: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    phase_seconds: float = 0.0
    done: bool = False  # this phase stopped (early or at its last epoch)
    logged_epochs: int = 0  # rows of `history` the MLflow run has
    setup: str = ""  # the Keras backend, dtype policy and data-parallel devices: a checkpoint resumes on the same
    code: str = ""  # code_version() of the process that wrote it: a checkpoint resumes under the same


def code_version(backend: str) -> str:
    """A hash of the code that trains (CODE_MODULES' source) and the versions of the libraries it
    trains with. A checkpoint written under other code would go on under this code's rules (a
    changed preprocessing, say) and end as a model neither would make."""
    digest = hashlib.sha256()
    for name in CODE_MODULES:
        digest.update((Path(__file__).with_name(f"{name}.py")).read_bytes())
    for library in ("keras", "numpy", "efficientnet", *LIBRARIES.get(backend, ())):
        try:
            digest.update(f"{library}=={importlib.metadata.version(library)};".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{library} absent;".encode())
    return digest.hexdigest()[:16]


def _numpy(variable: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename: a power cut leaves the old file, not an empty one


class Checkpoint:
    """`<out>/checkpoint.npz`: everything needed to go on after the last completed epoch.

    Variables that cannot change in the current phase go to a file of their own,
    `checkpoint.static-<token>.npz`, written once per phase and named by checkpoint.npz: those of
    a frozen pretrained base, which runs in inference mode (all of its variables in phase 1, its
    non-trainable ones in phase 2). Each epoch then writes the head, phase 2's unfrozen top and
    the optimizer, not the whole network and its best weights again: 513 MB an epoch for a frozen
    EfficientNetB7, whose head epochs on cached features take a fraction of a second.
    Every file is written atomically and a static file is never rewritten in place, so whatever
    moment the process dies, checkpoint.npz and the static file it names are complete.
    """

    STATIC = "checkpoint.static-"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._static: tuple[str, frozenset[int]] | None = None  # (file name, model indices) written by this process
        # The run of a checkpoint read() could not use but whose state it read (its static file
        # gone): the stopped process left it RUNNING, and the caller closes it as a discarded one.
        self.abandoned_run = ""

    def save(self, state: TrainingState, model: Any, optimizer: Any, best: list[np.ndarray], static: Any = ()) -> None:
        variables = model.variables
        index = {id(variable): i for i, variable in enumerate(variables)}
        fixed = frozenset(index[id(variable)] for variable in static)
        if fixed and not (self._static and fixed <= self._static[1]):
            name = f"{self.STATIC}{os.urandom(6).hex()}.npz"
            _write_npz(self.path.with_name(name), {f"model_{i}": _numpy(variables[i]) for i in sorted(fixed)})
            self._static = (name, fixed)
        arrays = {"state": np.array(json.dumps(dataclasses.asdict(state)))}
        for i, variable in enumerate(variables):
            if i not in fixed:
                arrays[f"model_{i}"] = _numpy(variable)
        for i, variable in enumerate(optimizer.variables if optimizer is not None else []):
            arrays[f"optimizer_{i}"] = _numpy(variable)
        # `best` is model.get_weights(): in the order of model.weights, whose static entries are
        # the static variables' values (they cannot have changed since the best epoch either).
        from_static = []
        for j, (weight, value) in enumerate(zip(model.weights, best, strict=True)):
            i = index.get(id(weight))
            if i in fixed:
                from_static.append([j, i])
            else:
                arrays[f"best_{j}"] = value
        if fixed:
            arrays["static"] = np.array(json.dumps({"file": self._static[0], "model": sorted(fixed), "best": from_static}))
        _write_npz(self.path, arrays)
        self._remove_static(keep=self._static[0] if fixed else None)

    def read(self) -> tuple[TrainingState, dict[str, np.ndarray]] | None:
        if not self.path.exists():
            return None
        state = None
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            state = TrainingState(**json.loads(str(arrays.pop("state"))))
            if "static" in arrays:
                static = json.loads(str(arrays.pop("static")))
                with np.load(self.path.with_name(Path(static["file"]).name), allow_pickle=False) as archive:
                    for i in static["model"]:
                        arrays[f"model_{i}"] = archive[f"model_{i}"]
                    for j, i in static["best"]:
                        arrays[f"best_{j}"] = archive[f"model_{i}"]
        except (OSError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError) as error:
            print(f"train: ignoring unreadable checkpoint {self.path} ({type(error).__name__}: {error}); starting over")
            self.abandoned_run = state.run_id if state is not None else ""
            return None
        return state, arrays

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self._remove_static(keep=None)

    def _remove_static(self, keep: str | None) -> None:
        for path in self.path.parent.glob(f"{self.STATIC}*.npz"):
            if path.name != keep:
                path.unlink(missing_ok=True)
        # What a process killed while writing a checkpoint left (files.atomic_path's temporaries).
        for path in self.path.parent.glob(f".{self.path.stem}*.tmp.npz"):
            path.unlink(missing_ok=True)


def _assign(variables: list[Any], arrays: dict[str, np.ndarray], prefix: str, what: str) -> None:
    values = [arrays[f"{prefix}_{i}"] for i in range(sum(1 for k in arrays if k.startswith(prefix + "_")))]
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        raise UserError(f"checkpoint: the saved {what} does not match this model; delete the checkpoint and train again")
    for variable, value in zip(variables, values):
        variable.assign(value)


# --------------------------------------------------------------------------------------------
# Training.


NOT_METRICS = ("epoch", "phase", "seconds")


class RunLog:
    """The experiment's MLflow run, fed as training goes. If the tracking server does not answer,
    training goes on without it and `finish` logs what was missed; if it still does not answer
    then, the stage fails, keeping the finished training in its checkpoint for the next try."""

    def __init__(self, experiment: Experiment, config: dict, params_hash: str, tags: dict[str, str]) -> None:
        self.experiment, self.config, self.params_hash, self.tags = experiment, config, params_hash, tags
        self.online = True
        # The last epoch the run has: a process killed after logging an epoch but before its
        # checkpoint trains that epoch again, and it is not logged twice.
        self.logged_through = -1

    def _offline(self, error: tracking.TrackingUnavailable) -> None:
        self.online = False
        print(f"warning: {error}")

    def open(self, state: TrainingState) -> None:
        """Find the run to continue, or create it."""
        consequence = "training goes on; the run is logged when training ends"
        try:
            with tracking.unavailable("open the run", consequence):
                if state.run_id and tracking.run_exists(state.run_id):
                    tracking.reopen_run(state.run_id)
                    self.logged_through = self._last_step(state.run_id)
                else:
                    state.run_id, state.logged_epochs = self._create(state.run_key), 0
        except tracking.TrackingUnavailable as error:
            self._offline(error)

    @staticmethod
    def _last_step(run_id: str) -> int:
        history = tracking.mlflow_client().tracking.MlflowClient().get_metric_history(run_id, "loss")
        return max((metric.step for metric in history), default=-1)

    def epoch(self, state: TrainingState) -> None:
        if self.online:
            try:
                with tracking.unavailable("log epoch metrics", "training goes on; they are logged when it ends"):
                    self._log_epochs(state)
            except tracking.TrackingUnavailable as error:
                self._offline(error)

    def finish(self, state: TrainingState, checkpoint: Path) -> None:
        """Log whatever the run lacks and close it; fail in one line if the server is away."""
        consequence = (
            f"the trained model is kept in {checkpoint}: run the stage again when the server answers, "
            "and it logs the run without training again (under the same code)"
        )
        with tracking.unavailable("log the run", consequence):
            if not state.run_id or not tracking.run_exists(state.run_id):
                state.run_id, state.logged_epochs = self._create(state.run_key), 0
                self.logged_through = -1
            elif not self.online:  # the run was there all along: what has it got?
                self.logged_through = self._last_step(state.run_id)
            self._log_epochs(state)
            self._tag_phases(state)
            tracking.mlflow_client().tracking.MlflowClient().set_terminated(state.run_id)

    def _log_epochs(self, state: TrainingState) -> None:
        from mlflow.entities import Metric

        if not state.run_id:
            return
        client = tracking.mlflow_client().tracking.MlflowClient()
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, row["epoch"])
            for row in state.history[state.logged_epochs :]
            if row["epoch"] > self.logged_through
            for key, value in row.items()
            if key not in NOT_METRICS
        ]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
            client.log_batch(state.run_id, metrics=metrics[start : start + 1000])
        state.logged_epochs = len(state.history)

    def _tag_phases(self, state: TrainingState) -> None:
        """What phase 2 trained (its phase record's base_layers_trained and trained_from) as the
        run's tags `phase2_<key>`: tags, not params, as params are the resolved configuration that
        params_hash hashes; and a tag may be set again when a failed finish is retried."""
        from mlflow.entities import RunTag

        tags = [
            RunTag(f"phase{record['phase']}_{key}", "whole base" if record[key] is None else str(record[key]))
            for record in state.phases
            for key in ("base_layers_trained", "trained_from")
            if key in record
        ]
        if tags:
            tracking.mlflow_client().tracking.MlflowClient().log_batch(state.run_id, tags=tags)

    def _create(self, run_key: str) -> str:
        from mlflow.entities import Param

        experiment = self.experiment
        run_id = tracking.start_fresh_run(
            experiment.dataset_name,
            run_name=experiment.backbone_name,
            run_key=run_key,
            tags={
                "dataset": experiment.dataset_name,
                "backbone": experiment.backbone_name,
                "suite": experiment.suite,
                "experiment": experiment.name,
                "params_hash": self.params_hash,
                **self.tags,
            },
        )
        flat = tracking.flatten({k: v for k, v in self.config.items() if k != "experiment"})
        tracking.mlflow_client().tracking.MlflowClient().log_batch(
            run_id, params=[Param(k, v) for k, v in sorted(flat.items())]
        )
        return run_id


def build_before_fit(model: Any, batches: Any) -> None:
    """Build the compiled loss and metrics (and the optimizer) of a just-compiled `model` from the
    shapes of `batches[0]`. Left to fit, Keras takes that first batch from the loader's queue, and
    with worker threads (the GPU path) on JAX and PyTorch the epoch then trains it last: the first
    epoch after each compile, a resumed run's included, would not train in the order that
    (seed, epoch) gives, and a resumed run would not end with the uninterrupted run's weights.
    `_symbolic_build` is what fit itself calls (keras 3.15.1, pinned); nothing is computed."""
    model._symbolic_build(data_batch=batches[0])


def train(
    experiment_name: str,
    params_path: str,
    data_dir: Path,
    out: Path,
    weights_dir: Path | None = None,
) -> dict[str, Any]:
    """Train one experiment into `out` and log it to MLflow; the record written to training.json.

    Keras's dtype policy and TensorFlow's op determinism, which training sets for the process,
    are as they were when it returns."""
    from stages import runtime

    with runtime.settings_kept():
        return _train(experiment_name, params_path, data_dir, out, weights_dir)


def _train(
    experiment_name: str,
    params_path: str,
    data_dir: Path,
    out: Path,
    weights_dir: Path | None,
) -> dict[str, Any]:
    experiment = load_params(params_path).experiment(experiment_name)
    training = experiment.training
    data = load_prepared(data_dir)
    check_prepared(data, data_dir, experiment.dataset_name, experiment.dataset)
    if len(data.x["train"]) == 0 or len(data.x["val"]) == 0:
        raise UserError(f"{data_dir}: the train or val split is empty; check split@{experiment.dataset_name}")
    weights_file = None
    if experiment.backbone.weights:
        from stages.weights import weights_path

        if weights_dir is None:
            raise UserError(f"train@{experiment.name}: a pretrained backbone needs --weights (the weights stage's folder)")
        weights_file = weights_path(weights_dir)
        if weights_file is None:  # the record of an earlier params.yaml, where this backbone trained from scratch
            stage = f"weights@{experiment.name}"
            raise UserError(
                f"{Path(weights_dir) / 'weights.json'}: records no weights file (written for a backbone trained from "
                f"scratch), but backbone {experiment.backbone_name} has weights: {experiment.backbone.weights}; "
                f"run {stage} again (dvc repro {stage})"
            )

    from stages import runtime

    runtime.import_keras_quietly()
    import keras

    from stages.backbones import base_of, build_model, split_at_features, unfreeze_top
    from stages.loader import array_batches, class_weights, keras_input

    runtime.keep_tensorflow_out()
    device = runtime.accelerator()
    policy = runtime.precision_policy(training.mixed_precision, device)
    keras.config.set_dtype_policy(policy)
    runtime.make_deterministic(training.seed, device)
    replicas = runtime.data_parallel(
        training.distribution, f"train@{experiment.name}", experiment.training_key("distribution")
    )
    if training.batch_size % replicas.count:
        raise UserError(
            f"train@{experiment.name}: {experiment.training_key('batch_size')} {training.batch_size} does not split "
            f"evenly over {replicas.count} devices; use a multiple of {replicas.count}"
        )
    if len(data.x["train"]) < replicas.count:  # each batch is trimmed to a multiple of the devices: none is left
        raise UserError(
            f"train@{experiment.name}: the {len(data.x['train'])} training images do not fill a batch over "
            f"{replicas.count} devices; set {experiment.training_key('distribution')} off, or add training images"
        )
    with replicas.scope:
        model = build_model(
            experiment.backbone,
            image_size=experiment.dataset.image_size,
            channels=experiment.dataset.channels,
            num_classes=len(data.classes),
            augmentation=experiment.dataset.augmentation,
            seed=training.seed,
            weights_file=weights_file,
        )

        phases = plan_phases(experiment)
        _check_plan(experiment, phases, base_of(model), len(data.x["train"]))

        config = resolved_config(experiment)
        params_hash = tracking.stable_hash(config)
        weights_digest = json.loads((weights_dir / "weights.json").read_text())["sha256"] if weights_file else None
        code = code_version(keras.backend.backend())
        # The code is part of the key: a retrain under other code (which DVC reruns train@ for) is
        # another run, not a replacement. Reverting the change makes DVC bring the first training's
        # outputs back from its run cache, train@ and evaluate@ alike, without running a stage that
        # could revive a deleted run; the run their training.json names must still be there.
        run_key = tracking.stable_hash(
            {"params": params_hash, "data": data.version, "weights": weights_digest, "code": code}
        )
        checkpoint_path = out / CHECKPOINT
        checkpoint = Checkpoint(checkpoint_path)
        # A data-parallel run's epochs trained on batches trimmed to a multiple of its devices.
        setup = f"{keras.backend.backend()} {policy}" + (f" on {replicas.count} devices" if replicas.count > 1 else "")
        resumed = checkpoint.read()
        discarded = resumed[0].run_id if resumed is not None else checkpoint.abandoned_run
        if resumed is not None and resumed[0].code != code:
            print(f"train@{experiment.name}: the checkpoint was written by other code (the stages/ modules train "
                  "runs) or other versions of Keras and its backend; starting over")
            resumed = None
        if resumed is not None and resumed[0].run_key != run_key:
            print(f"train@{experiment.name}: the checkpoint is for other params or data; starting over")
            resumed = None
        if resumed is not None and resumed[0].setup != setup:
            # Its epochs went another way: going on from them would match neither backend's run.
            print(f"train@{experiment.name}: the checkpoint was written with {resumed[0].setup or 'an older version'}, "
                  f"this run has {setup} (KERAS_BACKEND, training.mixed_precision, the devices data_parallel "
                  "trains on); starting over")
            resumed = None
        if resumed is not None:
            state, arrays = resumed
            if state.phase_index >= len(plan_phases(experiment)):
                print(f"train@{experiment.name}: training finished before ({state.epoch} epochs, in the checkpoint); "
                      "logging it without training again")
            else:
                print(f"train@{experiment.name}: resuming after epoch {state.epoch} (phase {state.phase_index + 1})")
        else:
            arrays = {}
            state = TrainingState(run_key=run_key, run_id="", setup=setup, code=code)
            if discarded:
                # The interrupted training this checkpoint held is not going on: its run, left
                # RUNNING by the process that was stopped, would otherwise stay so for good.
                if problem := tracking.close_abandoned_run(discarded):
                    print(f"warning: {problem}")
        tags = {
            "data_version": data.version,
            "keras_backend": keras.backend.backend(),
            **tracking.provenance_tags(data_dir),
        }
        run_log = RunLog(experiment, config, params_hash, tags)
        run_log.open(state)

        sample_weight = val_weight = None
        if training.class_weight == "balanced":
            weights = class_weights(data.y["train"], len(data.classes))
            sample_weight = weights[data.y["train"]]
            # Validation is weighed the same way, so val_loss, which early stopping and the best
            # epoch follow, is the loss training minimises: unweighted, it would mostly measure
            # the largest class, which the weights exist to stop favouring.
            val_weight = weights[data.y["val"]]
        workers = 4 if device.kind == "gpu" else 1
        jit = runtime.jit_compile(training.jit_compile)
        if jit is True and (refused := runtime.xla_refused(model)):
            print(f"train@{experiment.name}: {experiment.training_key('jit_compile')} on is not applied: {refused}")
            jit = False

        def static(model: Any) -> list[Any]:
            # A frozen base runs in inference mode: what it does not train cannot change.
            return base_of(model).non_trainable_variables if is_frozen(experiment) else []

        best: list[np.ndarray] = [arrays[f"best_{i}"] for i in range(sum(1 for k in arrays if k.startswith("best_")))]
        if arrays and state.phase_index > 0:
            # Phase 1 ended before the checkpoint: the model as it was saved then, its best weights
            # and its random generators (dropout's) where phase 2 goes on from them.
            _assign(model.variables, arrays, "model", "model")
        for phase in phases[: state.phase_index]:
            if phase.number == 2:  # finished before the checkpoint: the model is saved as it trained
                unfreeze_top(model, phase.unfreeze or 0)

        for phase in phases[state.phase_index :]:
            tuned: dict[str, Any] = {}  # what phase 2 trains, for its record in training.json and the run's tags
            if phase.number == 2:
                trainable_layers = unfreeze_top(model, phase.unfreeze or 0)
                layers = base_of(model).layers
                first = next(layer for layer in layers if layer.trainable)
                tuned = {"base_layers_trained": trainable_layers, "trained_from": None if first is layers[0] else first.name}
                if first is layers[0]:  # unfreeze 0, or a cut widened down to the first block: the input layer
                    print(f"train@{experiment.name}: phase 2 fine-tunes the whole base ({trainable_layers} layers with "
                          f"weights; BatchNormalization stays frozen) at lr {phase.learning_rate}")
                else:
                    print(f"train@{experiment.name}: phase 2 fine-tunes {trainable_layers} base layers with weights, "
                          f"whole blocks from {first.name}, at lr {phase.learning_rate}")
            cache = phase.number == 1 and _use_feature_cache(experiment, model, len(data.x["train"]) + len(data.x["val"]))
            if cache:
                features, head = split_at_features(model)
                fit_model = head
                started = time.perf_counter()
                train_x, val_x = _features(features, [data.x["train"], data.x["val"]], training.batch_size, replicas.count)
                cache_seconds = time.perf_counter() - started
            else:
                fit_model, train_x, val_x, cache_seconds = model, data.x["train"], data.x["val"], 0.0
            fit_model.compile(
                optimizer=make_optimizer(training.optimizer, phase.learning_rate),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
                jit_compile=jit,
            )
            batches = array_batches(
                train_x, data.y["train"], batch_size=training.batch_size, seed=training.seed, shuffle=True,
                sample_weight=sample_weight, on_device=not cache and replicas.count == 1, workers=workers,
                multiple=replicas.count, remainder="drop",
            )
            # Over several devices every batch must split evenly: validation pads its last batch
            # and scores the predictions itself (a padded batch would bias Keras's val_loss).
            val_batches = array_batches(
                val_x, data.y["val"], batch_size=training.batch_size, seed=training.seed, shuffle=False, workers=workers,
                sample_weight=val_weight, multiple=replicas.count, remainder="pad",
            )
            fit_batches, fit_val_batches = keras_input(batches), keras_input(val_batches)
            if arrays and state.phase_epoch > 0:
                fit_model.optimizer.build(fit_model.trainable_variables)
                _assign(model.variables, arrays, "model", "model")
                _assign(fit_model.optimizer.variables, arrays, "optimizer", "optimizer state")
            arrays = {}
            build_before_fit(fit_model, batches)
            if not best:
                best = model.get_weights()
            while not state.done and state.phase_epoch < phase.epochs:
                batches.set_epoch(state.epoch)
                started = time.perf_counter()
                # shuffle=False: the loader orders each epoch itself, from (seed, epoch); Keras would
                # shuffle a PyDataset's batches with Python's global `random`, which a resumed
                # process cannot reproduce.
                history = fit_model.fit(
                    fit_batches, validation_data=fit_val_batches if replicas.count == 1 else None,
                    initial_epoch=state.epoch, epochs=state.epoch + 1, shuffle=False, verbose=0,
                )
                logs = {key: float(values[-1]) for key, values in history.history.items()}
                if replicas.count > 1:
                    logs.update(_validate(fit_model, fit_val_batches, data.y["val"], val_weight))
                seconds = time.perf_counter() - started
                state.phase_seconds += seconds
                state.history.append({"epoch": state.epoch, "phase": phase.number, **logs, "seconds": round(seconds, 3)})
                diverged = not (math.isfinite(logs["loss"]) and math.isfinite(logs["val_loss"]))
                improved = not diverged and logs["val_loss"] < state.best_loss
                if improved:
                    state.best_loss, state.best_epoch, state.wait = logs["val_loss"], state.epoch, 0
                    best = model.get_weights()
                else:
                    state.wait += 1
                print(
                    f"epoch {state.epoch + 1} (phase {phase.number}{', cached features' if cache else ''}): "
                    + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                    + f" ({seconds:.1f} s){' *' if improved else ''}"
                )
                state.epoch += 1
                state.phase_epoch += 1
                # As Keras's EarlyStopping: patience 0 stops at the first epoch that does not improve.
                # A loss that is no longer finite stops the phase at once, as Keras's TerminateOnNaN.
                state.done = diverged or (not improved and state.wait >= training.early_stopping_patience)
                if diverged:
                    # With no finite epoch yet, the error below names the key to lower instead.
                    key = experiment.training_key("learning_rate" if phase.number == 1 else "fine_tune.learning_rate")
                    kept = (f", keeping the best weights so far; if it recurs, lower {key} ({phase.learning_rate})"
                            if state.best_epoch >= 0 else "")
                    print(f"train@{experiment.name}: phase {phase.number} diverged at epoch {state.epoch} "
                          f"(loss {logs['loss']}, val_loss {logs['val_loss']}); it stops there{kept}")
                run_log.epoch(state)
                checkpoint.save(state, model, fit_model.optimizer, best, static(model))
            if state.best_epoch < 0:  # phase 1 had no epoch with a finite validation loss
                key = experiment.training_key("learning_rate")
                first = next(row for row in state.history if row["phase"] == phase.number)
                raise UserError(
                    f"train@{experiment.name}: training diverged: no epoch gave a finite val_loss (epoch 1: loss "
                    f"{first['loss']}, val_loss {first['val_loss']}); lower {key} ({phase.learning_rate})"
                )
            # The phase's best weights (phase 2 keeps phase 1's unless it did better).
            model.set_weights(best)
            diverged_at = next((row["epoch"] for row in state.history if row["phase"] == phase.number
                                and not all(math.isfinite(row[k]) for k in ("loss", "val_loss"))), None)
            images = state.phase_epoch * len(data.x["train"])
            state.phases.append({
                "phase": phase.number,
                "epochs_run": state.phase_epoch,
                "learning_rate": phase.learning_rate,
                "feature_cache": bool(cache),
                "diverged_at_epoch": diverged_at,  # the epoch (as in history.csv) whose loss was not finite
                "xla": bool(fit_model.jit_compile),
                "feature_cache_seconds": round(cache_seconds, 2),
                "seconds": round(state.phase_seconds + cache_seconds, 2),
                "images_per_second": round(images / max(state.phase_seconds + cache_seconds, 1e-9), 1),
                **tuned,
            })
            state.phase_index += 1
            state.phase_epoch, state.phase_seconds, state.wait, state.done = 0, 0.0, 0, False
            checkpoint.save(state, model, None, best, static(model))

        # Local outputs first: they are written whether or not the tracking server answers.
        record = _write_outputs(
            experiment, model, state, out, data, config, params_hash, run_key, policy, device, weights_file, replicas
        )
        try:
            run_log.finish(state, checkpoint_path)
        finally:
            checkpoint.save(state, model, None, best, static(model))
    record["run_id"] = state.run_id
    write_json_atomic(out / "training.json", record)
    checkpoint.remove()
    return record


def _check_plan(experiment: Experiment, phases: list[Phase], base: Any, train_images: int) -> None:
    """Fail before training, not after phase 1, on a phase 2 that cannot be what params ask; say
    what params set that does not apply."""
    from stages.backbones import tuned_layers

    training = experiment.training
    name = f"train@{experiment.name}"
    why = "it trains from scratch" if not experiment.backbone.weights else "its base is not frozen"
    if training.fine_tune.epochs and len(phases) == 1:
        print(f"{name}: one phase, as {why} ({experiment.training_key('fine_tune.epochs')}, phase 2, is for a "
              "pretrained frozen base)")
    # Phase 2's other keys, set by the experiment itself, would otherwise go unused without a word.
    unused = [f"fine_tune.{key}" for key in ("learning_rate", "unfreeze") if f"fine_tune.{key}" in experiment.train_overrides]
    if unused and len(phases) == 1:
        why = (f"{experiment.training_key('fine_tune.epochs')} is 0" if is_frozen(experiment)
               else f"{why} (phase 2 is for a pretrained frozen base)")
        print(f"{name}: {', '.join(experiment.training_key(key) for key in unused)} "
              f"{'are' if len(unused) > 1 else 'is'} not applied: there is no phase 2, as {why}")
    if training.batch_size > train_images:
        print(f"{name}: {experiment.training_key('batch_size')} {training.batch_size} is more than the "
              f"{train_images} training images: each epoch is one batch of them all")
    for phase in phases:
        if phase.number != 2 or not phase.unfreeze:
            continue
        key = experiment.training_key("fine_tune.unfreeze")
        layers = base.layers
        if phase.unfreeze > len(layers):
            raise UserError(
                f"{name}: {key}: {phase.unfreeze} is more than the {len(layers)} layers of {experiment.backbone.model}'s "
                f"base; use at most {len(layers)}, or 0 for all of them"
            )
        if not any(layer.weights for layer in tuned_layers(base, phase.unfreeze)):
            raise UserError(
                f"{name}: {key}: the top {phase.unfreeze} layers of {experiment.backbone.model}'s base "
                f"({', '.join(layer.name for layer in layers[-phase.unfreeze:])}) have no weights to train "
                "(BatchNormalization stays frozen); unfreeze more"
            )


def _use_feature_cache(experiment: Experiment, model: Any, images: int) -> bool:
    """Whether phase 1 can train the head on features computed once: the base is frozen, nothing
    random runs before the features, and they fit in FEATURE_CACHE_BYTES."""
    if experiment.training.feature_cache == "off" or not is_frozen(experiment):
        return False
    if any(layer.name == "augmentation" for layer in model.layers):
        return False
    from stages.backbones import FEATURES_LAYER

    size = int(np.prod(model.get_layer(FEATURES_LAYER).output.shape[1:]))
    return images * size * 4 <= FEATURE_CACHE_BYTES


def _features(features: Any, splits: list[np.ndarray], batch_size: int, replicas: int = 1) -> list[np.ndarray]:
    """The frozen base's outputs for each array of images, in inference mode, as float32."""
    import keras

    from stages.loader import array_batches, keras_input

    forward = _constant_forward(features) if keras.backend.backend() == "tensorflow" and replicas == 1 else None
    results = []
    for x in splits:
        batches = array_batches(x, np.zeros(len(x), dtype="int64"), batch_size=batch_size, seed=0, shuffle=False,
                                multiple=replicas, remainder="pad")
        if forward is not None:
            outputs = np.concatenate([np.asarray(forward(batches[i][0])) for i in range(len(batches))])
        else:
            outputs = np.asarray(features.predict(keras_input(batches), verbose=0))
        results.append(outputs.astype("float32", copy=False)[: len(x)])
    return results


def _constant_forward(model: Any) -> Any:
    """`model` in inference mode as one TensorFlow graph holding its weights as constants.

    Nothing in a frozen base changes, so TensorFlow's graph optimizer can fold each
    BatchNormalization into the convolution before it and fuse the rest, which it cannot do
    while the weights are variables (as in predict or fit): one pass over the images cost about a
    quarter less on a CPU (docs/benchmarks.md, feature cache). The outputs are predict's up to
    float rounding (at most 1.2e-5 apart for MobileNetV2's pooled features)."""
    import tensorflow as tf

    trainable = [np.asarray(variable) for variable in model.trainable_variables]
    frozen = [np.asarray(variable) for variable in model.non_trainable_variables]
    spec = model.inputs[0]

    @tf.function(input_signature=[tf.TensorSpec((None, *spec.shape[1:]), spec.dtype)], jit_compile=False)
    def forward(images: Any) -> Any:
        outputs, _ = model.stateless_call(
            [tf.constant(value) for value in trainable], [tf.constant(value) for value in frozen], images, training=False
        )
        return outputs

    return forward


def _validate(model: Any, batches: Any, y: np.ndarray, weight: np.ndarray | None = None) -> dict[str, float]:
    """val_loss and val_accuracy of `model`, as Keras computes them, from padded batches: the
    predictions for the padding are cut off before scoring. With `weight`, the loss is weighted
    as Keras weighs it (the mean of weight x loss); accuracy, a plain metric, is not."""
    probabilities = np.asarray(model.predict(batches, verbose=0), dtype="float64")[: len(y)]
    epsilon = 1e-7  # keras.config.epsilon(): Keras clips probabilities the same way
    picked = np.clip(probabilities[np.arange(len(y)), y], epsilon, 1 - epsilon)
    losses = -np.log(picked) * (1.0 if weight is None else np.asarray(weight, dtype="float64"))
    return {"val_accuracy": float(np.mean(probabilities.argmax(axis=1) == y)), "val_loss": float(losses.mean())}


def _write_outputs(
    experiment: Experiment, model: Any, state: TrainingState, out: Path, data: PreparedData,
    config: dict, params_hash: str, run_key: str, policy: str, device: Any, weights_file: str | None,
    replicas: Any,
) -> dict[str, Any]:
    import keras

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.keras") as temporary:
        model.save(temporary)
    metric_names = [k for k in state.history[0] if k not in ("epoch", "phase", "seconds")] if state.history else []
    columns = ["epoch", "phase", *metric_names, "seconds"]
    lines = [",".join(columns)]
    for row in state.history:
        lines.append(",".join(str(row["epoch"]) if c == "epoch" else str(row[c]) if c == "phase"
                              else f"{row.get(c, float('nan')):.6f}" for c in columns))
    write_text_atomic(out / "history.csv", "\n".join(lines) + "\n")
    seconds = sum(phase["seconds"] for phase in state.phases)
    record = {
        "experiment": experiment.name,
        "run_id": state.run_id,
        "run_key": run_key,
        "params_hash": params_hash,
        "data_version": data.version,
        "tracking_uri": tracking.shown_uri(),
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "phases": state.phases,
        "train_seconds": round(seconds, 2),
        "train_images_per_second": round(state.epoch * len(data.x["train"]) / max(seconds, 1e-9), 1),
        "parameters": int(model.count_params()),
        "keras_backend": keras.backend.backend(),
        "device": dataclasses.asdict(device),
        "dtype_policy": policy,
        "replicas": replicas.count,
        "replica_devices": list(replicas.devices) if replicas.count > 1 else [],
        "weights_file": Path(weights_file).name if weights_file else None,
        "config": config,
    }
    write_json_atomic(out / "training.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="an experiment name from params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="prepared data folder (split's output)")
    parser.add_argument("--weights", type=Path, help="the weights stage's folder (for a pretrained backbone)")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    record = train(args.experiment, args.params, args.data, args.out, args.weights)
    print(
        f"train@{args.experiment}: {record['epochs_run']} epochs in {record['train_seconds']} s "
        f"(best epoch {record['best_epoch'] + 1}, epoch={record['best_epoch']} in history.csv; {record['dtype_policy']} on {record['keras_backend']}/"
        f"{record['device']['kind']}); model in {args.out}; MLflow run {record['run_id']}"
    )


if __name__ == "__main__":
    run_stage(main)
