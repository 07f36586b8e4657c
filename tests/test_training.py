"""The train stage: loader, class weights, resume after a kill, feature caching, phase 2, backends."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from stages.loader import array_batches, class_weights, epoch_order  # noqa: E402
from local_http import FolderServer  # noqa: E402
from toy import toy_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]


# --------------------------------------------------------------------------------------------
# Fixtures: real images (scikit-learn's digits) as prepared arrays, params, a weights file.


def write_prepared(folder: Path, repeat: int = 1) -> Path:
    """The digits as the split stage writes them: 8x8 grayscale uint8 arrays per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    images, labels = np.concatenate([images] * repeat), np.concatenate([labels] * repeat)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    n = len(labels)
    cuts = {"train": (0, int(0.7 * n)), "val": (int(0.7 * n), int(0.85 * n)), "test": (int(0.85 * n), n)}
    folder.mkdir(parents=True)
    for split, (start, stop) in cuts.items():
        np.save(folder / f"{split}_x.npy", images[start:stop])
        np.save(folder / f"{split}_y.npy", labels[start:stop])
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    (folder / "meta.json").write_text(json.dumps({"image_size": 8, "channels": 1}))
    splits = np.repeat(list(cuts), [b - a for a, b in cuts.values()])
    pd.DataFrame({
        "path": [f"{label}/{i:05d}.png" for i, label in enumerate(labels)],
        "label": [str(label) for label in labels],
        "split": splits,
    }).to_parquet(folder / "splits.parquet", index=False)
    return folder


def write_params(path: Path, backbone: dict[str, Any], train: dict[str, Any], augmentation: dict | None = None) -> Path:
    params = toy_params(CLASSES, image_size=8, augmentation=augmentation or {})
    params["backbones"] = {"net": backbone}
    params["experiments"] = {"toy-net": {"suite": "tests", "dataset": "toy", "backbone": "net", "train": train}}
    params["suites"] = {"tests": {}}
    path.write_text(yaml.safe_dump(params))
    return path


SMALL_CNN = {
    "model": "cnn",
    "options": {"filters": [8, 16], "convs_per_block": 1, "dropout": 0.2},
    "head": {"pool": "flatten", "dense": [32], "dropout": 0.3},
}


@pytest.fixture()
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def make_pretrained(root: Path, backbone: dict[str, Any], base: Any, file_name: str, fresh: bool = True) -> dict[str, Any]:
    """`base`'s weights as a published weights file `file_name`, served on 127.0.0.1 like a weights
    host, and the weights stage's folder for it, made by the real stage. A `fresh` base gets
    BatchNormalization statistics unlike a fresh layer's, so that changing them would show (a
    trained base has its own)."""
    import keras

    from stages import weights

    served = root / "served"
    served.mkdir()
    for layer in base.layers if fresh else []:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.1, "float32"))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 2.0, "float32"))
    # In the published files' format (legacy HDF5), under a published file's name.
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    file = served / file_name
    with h5py.File(file, "w") as handle:
        save_weights_to_hdf5_group(handle, base)
    sha256 = hashlib.sha256(file.read_bytes()).hexdigest()
    server = FolderServer(served)
    backbone = {
        **backbone,
        "weights": "imagenet",
        "weights_url": server.url(file.name),
        "weights_sha256": sha256,
        "freeze": True,
        "head": {"pool": "avg", "dense": [16], "dropout": 0.2},
    }
    params = write_params(root / "params.yaml", backbone, {})
    old = os.environ.get("CLASSMATRIX_DOWNLOADS")
    os.environ["CLASSMATRIX_DOWNLOADS"] = str(root / "downloads")
    try:
        weights.main(["--experiment", "toy-net", "--out", str(root / "weights" / "toy-net"), "--params", str(params)])
    finally:
        server.stop()
        if old is None:
            os.environ.pop("CLASSMATRIX_DOWNLOADS")
        else:
            os.environ["CLASSMATRIX_DOWNLOADS"] = old
    return {
        "backbone": backbone,
        "folder": root / "weights" / "toy-net",
        "values": {w.path: keras.ops.convert_to_numpy(w) for w in base.weights},
    }


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A MobileNetV2 (alpha 0.35, 32x32) weights file and the weights stage's folder for it. The
    base is pretrained for two epochs on the digits, so that its features carry the classes: a
    randomly initialised one shrinks every image to nearly the same features, a head on it stays
    at chance, and phase 2 never wins, which would leave the tests of phase 2 nothing to see."""
    import keras
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(1)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    # The file must carry BatchNormalization statistics that fit the trained weights, since the
    # frozen base runs in inference mode. At MobileNetV2's momentum (0.999) the ~110 steps here
    # move them a tenth of the way: in inference mode every image then gave the same features (a
    # spread of 1e-9 across images, measured), the head stayed at chance, and whether phase 2 beat
    # phase 1 was down to noise, which one machine's numerics lost.
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype("float32")[..., None]
    images = np.repeat(keras.ops.convert_to_numpy(keras.ops.image.resize(images, (32, 32))), 3, axis=-1)
    classifier = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")])
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    classifier.fit(images / 127.5 - 1.0, digits.target, epochs=2, batch_size=32, verbose=0)  # MobileNetV2's [-1, 1]
    return make_pretrained(
        tmp_path_factory.mktemp("pretrained"), {"model": "mobilenetv2", "input_size": 32, "options": {"alpha": 0.35}},
        base, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5", fresh=False,
    )


@pytest.fixture(scope="module")
def pretrained_efficientnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An EfficientNetB0 (32x32) weights file, a base with dropout in its blocks."""
    import keras

    keras.utils.set_random_seed(1)
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    return make_pretrained(
        tmp_path_factory.mktemp("pretrained_efficientnet"), {"model": "efficientnetb0", "input_size": 32},
        base, "efficientnetb0_notop.h5",
    )


def train_toy(tmp_path: Path, name: str, backbone: dict, train: dict, weights_dir: Path | None = None,
              augmentation: dict | None = None) -> tuple[Any, dict]:
    """Train experiment toy-net into tmp_path/name and return (model, training.json)."""
    from stages.backbones import load_saved_model
    from stages.train import train as run_train

    data = tmp_path / "data" if (tmp_path / "data").exists() else write_prepared(tmp_path / "data")
    params = write_params(tmp_path / f"{name}.yaml", backbone, train, augmentation)
    record = run_train("toy-net", str(params), data, tmp_path / name, weights_dir)
    model = load_saved_model(tmp_path / name / "model.keras", name)
    return model, record


# --------------------------------------------------------------------------------------------
# Loader and class weights.


def test_loader_feeds_uint8_batches_in_an_order_fixed_by_seed_and_epoch(tmp_path: Path) -> None:
    data = write_prepared(tmp_path / "data")
    x = np.load(data / "train_x.npy", mmap_mode="r")
    y = np.load(data / "train_y.npy")
    batches = array_batches(x, y, batch_size=100, seed=3, shuffle=True)
    seen = []
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        images, labels = zip(*(batches[i] for i in range(len(batches))))
        assert {batch.dtype for batch in images} == {np.dtype("uint8")}, "images reach the model as uint8"
        seen.append(np.concatenate(labels))
    assert len(seen[0]) == len(y) and np.array_equal(np.sort(seen[0]), np.sort(y)), "every image once per epoch"
    assert not np.array_equal(seen[0], seen[1]), "a new order each epoch"
    again = array_batches(x, y, batch_size=100, seed=3, shuffle=True)
    again.set_epoch(1)
    assert np.array_equal(np.concatenate([again[i][1] for i in range(len(again))]), seen[1])
    assert np.array_equal(epoch_order(10, 3, 1, shuffle=False), np.arange(10))


def test_on_tensorflow_keras_input_feeds_the_same_batches_through_tf_data_with_autotuning_off() -> None:
    """On TensorFlow, train and evaluate hand Keras `keras_input(batches)`: a tf.data pipeline
    with tf.data's autotuning off (Keras's own wrapping of a PyDataset left it on, and a fit then
    could wait ~10 s in the iterator's destructor). It must be the loader's batches exactly, in the
    order of the epoch set last, and train a model exactly as the PyDataset does."""
    import keras

    from stages.loader import keras_input

    if keras.backend.backend() != "tensorflow":
        pytest.skip("keras_input wraps the batches on TensorFlow only")
    x = (np.arange(37 * 4 * 4 * 3) % 251).astype(np.uint8).reshape(37, 4, 4, 3)
    y = np.arange(37) % 5
    weights = np.linspace(0.5, 1.5, 37).astype("float32")
    batches = array_batches(x, y, batch_size=16, seed=5, shuffle=True, sample_weight=weights)
    dataset = keras_input(batches)
    assert dataset.options().autotune.enabled is False
    assert int(dataset.cardinality()) == len(batches) == 3
    for epoch in (0, 3):
        batches.set_epoch(epoch)
        fed = [tuple(np.asarray(part) for part in element) for element in dataset]  # a new iterator, as each fit makes
        expected = [batches[i] for i in range(len(batches))]
        assert len(fed) == len(expected)
        for got, want in zip(fed, expected):
            assert [part.dtype for part in got] == [part.dtype for part in want] and got[0].dtype == np.uint8
            assert all(np.array_equal(a, b) for a, b in zip(got, want)), f"epoch {epoch}: not the loader's batch"
    threaded = array_batches(x, y, batch_size=16, seed=5, shuffle=True, workers=2)
    assert keras_input(threaded) is threaded, "with worker threads Keras turns autotuning off itself"

    trained = []
    for wrap in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4, 4, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                                  keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        fed = keras_input(batches) if wrap else batches
        history = []
        for epoch in range(3):
            batches.set_epoch(epoch)
            history.append(model.fit(fed, validation_data=fed, initial_epoch=epoch, epochs=epoch + 1, shuffle=False,
                                     verbose=0).history)
        trained.append((history, [w.copy() for w in model.get_weights()], model.predict(fed, verbose=0)))
    (history, weights_plain, predicted), (history_wrapped, weights_wrapped, predicted_wrapped) = trained
    assert history == history_wrapped
    assert all(np.array_equal(a, b) for a, b in zip(weights_plain, weights_wrapped))
    assert np.array_equal(predicted, predicted_wrapped)


def torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


ON_DEVICE = """
import sys
import keras, numpy as np
from stages import loader

backend = keras.backend.backend()
host_only = np.zeros((4, 2), np.uint8)
assert loader.device_array(host_only) is host_only, "a CPU is not an accelerator: the array stays"
# Stand the CPU in for a GPU: what a GPU run does, copy once and gather on the device.
if backend == "jax":
    import jax

    loader.device_array = lambda x: jax.device_put(np.asarray(x), jax.devices()[0])
    resident = lambda images: isinstance(images, jax.Array)
else:
    import torch

    # 100-byte slices: two 48-byte images per copy, read from a read-only memory map.
    loader.device_array = lambda x: loader._torch_copy(x, "cpu", slice_bytes=100)
    resident = lambda images: isinstance(images, torch.Tensor)
x = (np.arange(37 * 4 * 4 * 3) % 251).astype(np.uint8).reshape(37, 4, 4, 3)
np.save(sys.argv[1], x)
x = np.load(sys.argv[1], mmap_mode="r")
y = np.arange(37)
# Training shuffles (keep, drop); prediction pads its last batch and keeps the order.
for remainder, multiple, shuffle in (("keep", 1, True), ("drop", 2, True), ("pad", 2, False)):
    host = loader.array_batches(x, y, batch_size=16, seed=5, shuffle=shuffle, multiple=multiple, remainder=remainder)
    device = loader.array_batches(x, y, batch_size=16, seed=5, shuffle=shuffle, multiple=multiple, remainder=remainder,
                                  on_device=True)
    assert device.on_device and not host.on_device and len(device) == len(host)
    for epoch in (0, 3):
        host.set_epoch(epoch)
        device.set_epoch(epoch)
        for i in range(len(host)):
            (hx, hy), (dx, dy) = host[i], device[i]
            assert resident(dx) and str(dx.dtype).endswith("uint8"), "uint8, already on the device"
            assert sorted(hy) == sorted(dy), (remainder, epoch, i)
            assert np.array_equal(np.asarray(dx), x[dy]), "each image with its own label"
# (keras.utils.set_random_seed, below, imports TensorFlow wherever it is installed: the loader must not.)
assert "tensorflow" not in sys.modules, "the loader imported TensorFlow on another backend"
# Keras trains from device batches as from host ones: the same loss (the order within a batch differs).
losses = []
for on_device in (False, True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(37, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=backend == "jax")
    batches = loader.array_batches(x, y, batch_size=16, seed=5, shuffle=True, on_device=on_device)
    losses.append(model.fit(batches, epochs=2, shuffle=False, verbose=0).history["loss"])
assert np.allclose(losses[0], losses[1], rtol=1e-5), losses
print("device path ok")
"""


@pytest.mark.parametrize(
    "backend",
    [
        "jax",
        pytest.param("torch", marks=pytest.mark.skipif(
            not torch_installed(), reason="PyTorch is optional: `make env-torch` installs the CPU build")),
    ],
)
def test_the_device_path_gathers_uint8_batches_there_and_trains_the_same(backend: str, tmp_path: Path) -> None:
    """The GPU path of the loader on JAX and PyTorch (images copied to the device once, each batch
    gathered there), run with the CPU standing in for the GPU: the same images and labels per
    batch as the host path for every remainder policy, uint8, and the same training loss."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run([sys.executable, "-c", ON_DEVICE, str(tmp_path / "x.npy")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "device path ok" in result.stdout, result.stderr[-3000:]


def test_balanced_class_weights_match_scikit_learn_and_ride_in_the_batches() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 80 + [1] * 15 + [2] * 5)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    assert np.allclose(class_weights(y, 3), expected)
    assert class_weights(np.array([0, 0, 2]), 3)[1] == 0.0, "an absent class weighs nothing"
    weights = class_weights(y, 3)[y]
    x = np.zeros((100, 2, 2, 1), np.uint8)
    _, labels, batch_weights = array_batches(x, y, batch_size=100, seed=0, shuffle=True, sample_weight=weights)[0]
    assert np.allclose(batch_weights, class_weights(y, 3)[labels])


# --------------------------------------------------------------------------------------------
# Resume.


def test_with_balanced_class_weights_val_loss_is_the_weighted_loss_training_minimises(tmp_path: Path, tracking: str) -> None:
    """Early stopping and the best epoch follow val_loss. With class_weight balanced it weighs each
    validation image by its class's weight from the training split, as training weighs its loss;
    the plain mean would mostly measure the largest class. Accuracy stays unweighted."""
    data = write_prepared(tmp_path / "data")
    for split in ("train", "val"):  # class 0 keeps every image, classes 1-9 about one in six
        x, y = np.load(data / f"{split}_x.npy"), np.load(data / f"{split}_y.npy")
        keep = (y == 0) | (np.arange(len(y)) % 6 == 0)
        np.save(data / f"{split}_x.npy", x[keep])
        np.save(data / f"{split}_y.npy", y[keep])
    train = {"epochs": 1, "batch_size": 32, "class_weight": "balanced", "fine_tune": {"epochs": 0}}
    model, record = train_toy(tmp_path, "weighted", SMALL_CNN, train)
    logged = pd.read_csv(tmp_path / "weighted" / "history.csv").iloc[0]
    x, y = np.load(data / "val_x.npy"), np.load(data / "val_y.npy")
    weights = class_weights(np.load(data / "train_y.npy"), 10)
    assert weights[0] < 0.5 and weights[1:].min() > 1  # imbalanced enough to tell the two apart
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    weighted, accuracy = model.evaluate(x, y, sample_weight=weights[y], verbose=0)
    plain, _ = model.evaluate(x, y, verbose=0)
    assert logged["val_loss"] == pytest.approx(weighted, rel=1e-3)
    # Apart by far more than the match above allows (after this epoch, 4.8 % on PyTorch, over 5 %
    # on JAX).
    assert logged["val_loss"] != pytest.approx(plain, rel=0.01)
    assert logged["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert record["best_epoch"] == 0


def test_with_balanced_class_weights_the_training_loss_is_weighted(tmp_path: Path, tracking: str) -> None:
    """The weights ride in the batches (above); this shows the backend's fit applies them. One
    step on all the training images at a learning rate too small to move the weights, and nothing
    random in the model: the epoch's loss is the trained model's weighted loss on them."""
    data = write_prepared(tmp_path / "data")
    x, y = np.load(data / "train_x.npy"), np.load(data / "train_y.npy")
    keep = (y == 0) | (np.arange(len(y)) % 6 == 0)
    np.save(data / "train_x.npy", x[keep])
    np.save(data / "train_y.npy", y[keep])
    plain_cnn = {"model": "cnn", "options": {"filters": [8], "convs_per_block": 1, "dropout": 0},
                 "head": {"pool": "flatten", "dense": [], "dropout": 0}}
    train = {"epochs": 1, "batch_size": 5000, "learning_rate": 1e-12, "class_weight": "balanced",
             "fine_tune": {"epochs": 0}}
    model, _ = train_toy(tmp_path, "weighted", plain_cnn, train)
    logged = pd.read_csv(tmp_path / "weighted" / "history.csv").iloc[0]
    x, y = x[keep], y[keep]
    model.compile(loss="sparse_categorical_crossentropy")
    weighted = model.evaluate(x, y, sample_weight=class_weights(y, 10)[y], batch_size=5000, verbose=0)
    plain = model.evaluate(x, y, batch_size=5000, verbose=0)
    assert logged["loss"] == pytest.approx(weighted, rel=1e-4)
    # An untrained model's loss differs little by class, yet the two are far apart for that match
    # (0.27 % on PyTorch here: 2.2977 weighted, 2.2916 plain).
    assert abs(weighted - plain) > 1e-3 * plain


def test_a_killed_train_stage_resumes_and_ends_with_the_uninterrupted_weights(tmp_path: Path, tracking: str) -> None:
    """Kill the stage (SIGKILL) after some epochs, run it again: it resumes from its checkpoint
    and the model, history and best epoch are exactly those of a run that was never killed."""
    data = write_prepared(tmp_path / "data", repeat=3)
    params = write_params(
        tmp_path / "params.yaml", SMALL_CNN, {"epochs": 8, "early_stopping_patience": 20, "batch_size": 32},
        augmentation={"rotation": 8, "zoom": 0.1},
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}

    def command(out: str) -> list[str]:
        return [sys.executable, "-m", "stages.train", "--experiment", "toy-net", "--data", str(data),
                "--out", str(tmp_path / out), "--params", str(params)]

    subprocess.run(command("whole"), cwd=REPO, env=env, check=True, capture_output=True, timeout=900)

    process = subprocess.Popen(command("killed"), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.npz"
    writes, last = 0, None
    while process.poll() is None and writes < 3:
        if checkpoint.exists() and checkpoint.stat().st_mtime_ns != last:
            last, writes = checkpoint.stat().st_mtime_ns, writes + 1
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert writes >= 1 and not (tmp_path / "killed" / "model.keras").exists(), "killed before it finished"

    resumed = subprocess.run(command("killed"), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    assert not checkpoint.exists(), "the checkpoint goes once the model is written"

    from stages.backbones import load_saved_model

    whole = load_saved_model(tmp_path / "whole" / "model.keras", "whole")
    killed = load_saved_model(tmp_path / "killed" / "model.keras", "killed")
    for a, b in zip(whole.get_weights(), killed.get_weights(), strict=True):
        assert np.array_equal(a, b)
    columns = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert pd.read_csv(tmp_path / "whole" / "history.csv")[columns].equals(
        pd.read_csv(tmp_path / "killed" / "history.csv")[columns]
    )
    records = [json.loads((tmp_path / out / "training.json").read_text()) for out in ("whole", "killed")]
    assert records[0]["best_epoch"] == records[1]["best_epoch"] and records[0]["epochs_run"] == records[1]["epochs_run"] == 8

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking).get_run(records[1]["run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(tracking).get_metric_history(run.info.run_id, "val_loss")]
    assert sorted(steps) == list(range(8)), "every epoch logged once into the one run"


def test_an_epoch_logged_before_the_kill_is_not_logged_again(tmp_path: Path, tracking: str, monkeypatch) -> None:
    """The process dies after an epoch reached MLflow but before its checkpoint did: the rerun
    trains that epoch again, and the run still has each epoch once (it had step 1 twice)."""
    from mlflow.tracking import MlflowClient

    from stages import train as train_module

    save = train_module.Checkpoint.save
    writes = []

    def die_before_the_second_save(self, state, model, optimizer, best, static=()):
        writes.append(state.epoch)
        if len(writes) == 2:
            raise Interrupted  # epoch 2 is in MLflow, not in the checkpoint
        save(self, state, model, optimizer, best, static)

    train = {"epochs": 4, "early_stopping_patience": 10, "batch_size": 64}
    monkeypatch.setattr(train_module.Checkpoint, "save", die_before_the_second_save)
    with pytest.raises(Interrupted):
        train_toy(tmp_path, "cut", SMALL_CNN, train)
    monkeypatch.setattr(train_module.Checkpoint, "save", save)
    _, record = train_toy(tmp_path, "cut", SMALL_CNN, train)

    for key in ("loss", "val_loss", "accuracy"):
        steps = [m.step for m in MlflowClient(tracking).get_metric_history(record["run_id"], key)]
        assert sorted(steps) == [0, 1, 2, 3], key


def test_a_checkpoint_written_by_other_code_is_not_resumed(tmp_path: Path, tracking: str, monkeypatch) -> None:
    """A changed module of train's (here a comment in augmentation.py; in life a changed
    preprocessing) reruns train@ in DVC: its checkpoint of the old code starts over rather than
    going on under the new code. The same code resumes it (the other resume tests)."""
    import shutil

    train = {"epochs": 2, "early_stopping_patience": 10, "batch_size": 64}
    cut_after_first_checkpoint(tmp_path, train, monkeypatch)
    assert (tmp_path / "cut" / "checkpoint.npz").exists()

    code = tmp_path / "code"
    shutil.copytree(REPO / "stages", code / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    with open(code / "stages" / "augmentation.py", "a", encoding="utf-8") as module:
        module.write("\n# changed since the checkpoint\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(code)}
    rerun = subprocess.run(
        [sys.executable, "-m", "stages.train", "--experiment", "toy-net", "--data", str(tmp_path / "data"),
         "--out", str(tmp_path / "cut"), "--params", str(tmp_path / "cut.yaml")],
        cwd=code, env=env, capture_output=True, text=True, timeout=900,
    )

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "the checkpoint was written by other code" in rerun.stdout and "resuming" not in rerun.stdout
    assert json.loads((tmp_path / "cut" / "training.json").read_text())["epochs_run"] == 2


class Interrupted(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


@pytest.mark.parametrize("writes", [1, 3, 4], ids=["phase-1-epoch-1", "end-of-phase-1", "phase-2-epoch-1"])
def test_a_frozen_base_is_checkpointed_once_per_phase_and_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, tracking: str, pretrained, monkeypatch, capsys, writes: int
) -> None:
    """With a frozen pretrained base, the base's values go to a static file once per phase and each
    epoch's checkpoint.npz holds only what can change. Cut after the first epoch (phase 1, cached
    features), at the end of phase 1, or after phase 2's first epoch, the re-run resumes and ends
    with the weights, history and best epoch of a run that was never cut."""
    from stages import train as train_module
    from stages.backbones import base_of

    train = {"epochs": 2, "early_stopping_patience": 10, "fine_tune": {"epochs": 2, "learning_rate": 1e-3, "unfreeze": 12}}
    whole, whole_record = train_toy(tmp_path, "whole", pretrained["backbone"], train, pretrained["folder"])
    assert not list((tmp_path / "whole").glob("checkpoint*")), "no checkpoint file outlives the model"

    save = train_module.Checkpoint.save
    files: list[tuple[dict, dict, dict, int, int]] = []

    def save_then_die(self, state, model, optimizer, best, static=()):
        save(self, state, model, optimizer, best, static)
        with np.load(self.path) as archive:
            main = {name: archive[name].shape for name in archive.files}
            reference = json.loads(str(archive["static"]))
        with np.load(self.path.with_name(reference["file"])) as archive:
            fixed = {name: archive[name].shape for name in archive.files}
        files.append((main, reference, fixed, len(base_of(model).variables), self.path.stat().st_size))
        if len(files) == writes:
            raise Interrupted

    monkeypatch.setattr(train_module.Checkpoint, "save", save_then_die)
    with pytest.raises(Interrupted):
        train_toy(tmp_path, "cut", pretrained["backbone"], train, pretrained["folder"])
    monkeypatch.setattr(train_module.Checkpoint, "save", save)
    main, reference, fixed, base_variables, size = files[-1]
    static_files = list((tmp_path / "cut").glob("checkpoint.static-*.npz"))
    assert [path.name for path in static_files] == [reference["file"]], "one static file, the one named"
    assert reference["model"] and not {f"model_{i}" for i in reference["model"]} & main.keys()
    assert {f"model_{i}" for i in reference["model"]} <= fixed.keys(), "what checkpoint.npz leaves out, the static file holds"
    if writes < 4:  # phase 1: the whole base is static; the epoch's file is the head and optimizer
        assert len(reference["model"]) == base_variables
        assert 3 * size < static_files[0].stat().st_size  # the toy head is small beside even a 0.35 MobileNetV2
    else:  # phase 2: the unfrozen top is saved every epoch, BatchNormalization and the rest are not
        assert 0 < len(reference["model"]) < base_variables
    assert all(f"best_{j}" not in main for j, _ in reference["best"])

    capsys.readouterr()
    cut, cut_record = train_toy(tmp_path, "cut", pretrained["backbone"], train, pretrained["folder"])
    assert "resuming after epoch" in capsys.readouterr().out
    assert not list((tmp_path / "cut").glob("checkpoint*")), "no checkpoint file outlives the model"
    for a, b in zip(whole.get_weights(), cut.get_weights(), strict=True):
        assert np.array_equal(a, b)
    columns = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert pd.read_csv(tmp_path / "whole" / "history.csv")[columns].equals(pd.read_csv(tmp_path / "cut" / "history.csv")[columns])
    assert [p["phase"] for p in cut_record["phases"]] == [1, 2] and cut_record["best_epoch"] == whole_record["best_epoch"]


@pytest.mark.parametrize("patience", [0, 1, 2])
def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path: Path, tracking: str, patience: int) -> None:
    """As Keras's EarlyStopping: training stops once `patience` epochs in a row have not improved
    the validation loss (patience 0 and 1 both stop at the first such epoch), and the model keeps
    its best epoch's weights. A learning rate far too high makes the loss stop improving early."""
    train = {"epochs": 12, "early_stopping_patience": patience, "learning_rate": 0.5, "fine_tune": {"epochs": 0}}
    _, record = train_toy(tmp_path, f"patience{patience}", SMALL_CNN, train)
    losses = pd.read_csv(tmp_path / f"patience{patience}" / "history.csv")["val_loss"].tolist()
    best, wait, stop = float("inf"), 0, None
    for epoch, loss in enumerate(losses):
        best, wait = (loss, 0) if loss < best else (best, wait + 1)
        if wait >= max(patience, 1):
            stop = epoch + 1
            break
    # The run went on to the first stall of the right length, and stopped right there.
    assert stop is not None, f"stopped after {len(losses)} epochs without such a stall: {losses}"
    assert record["epochs_run"] == len(losses) == stop < 12
    assert record["best_epoch"] == int(np.argmin(losses))


def test_train_leaves_the_dtype_policy_and_op_determinism_as_it_found_them(tmp_path: Path, tracking: str) -> None:
    """train() sets both for the process (mixed precision as asked; on a CPU, TensorFlow's op
    determinism, under which Keras turns XLA off): whoever called it gets them back as they were."""
    import keras

    tensorflow = keras.backend.backend() == "tensorflow"
    if tensorflow:
        from tensorflow.python.framework import config

        was_on = config.is_op_determinism_enabled()
        config.disable_op_determinism()
    keras.config.set_dtype_policy("float32")
    try:
        train = {"epochs": 1, "mixed_precision": "bfloat16", "fine_tune": {"epochs": 0}}
        _, record = train_toy(tmp_path, "kept", SMALL_CNN, train)
        assert record["dtype_policy"] == "mixed_bfloat16"  # train ran under the policy asked for
        assert keras.config.dtype_policy().name == "float32"
        if tensorflow:
            assert config.is_op_determinism_enabled() is False
    finally:
        if tensorflow and was_on:
            config.enable_op_determinism()


def test_a_model_trained_in_float16_loads_for_inference_without_warnings(tmp_path: Path, tracking: str) -> None:
    """Under mixed_float16 Keras wraps the optimizer to scale the loss, and model.keras holds the
    wrapper's variables; evaluate and predict load the model without an optimizer, quietly, and
    it still computes in float16 as it trained."""
    import warnings

    import keras

    from stages.backbones import load_saved_model

    train = {"epochs": 1, "mixed_precision": "float16", "fine_tune": {"epochs": 0}}
    trained, record = train_toy(tmp_path, "half", SMALL_CNN, train)
    assert record["dtype_policy"] == "mixed_float16" and keras.config.dtype_policy().name == "float32"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_saved_model(tmp_path / "half" / "model.keras", "evaluate@toy-net")
    assert not [str(w.message) for w in caught if "optimizer" in str(w.message)]
    assert "mixed_float16" in {layer.dtype_policy.name for layer in model.layers if layer.weights}
    x = np.load(tmp_path / "data" / "test_x.npy")[:32]
    np.testing.assert_array_equal(model.predict(x, verbose=0), trained.predict(x, verbose=0))


def cut_after_first_checkpoint(tmp_path: Path, train: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train the toy experiment into tmp_path/cut, stopped (Interrupted) just after its first
    checkpoint is written, as Ctrl-C there would; saving works again afterwards."""
    from stages import train as train_module

    save = train_module.Checkpoint.save

    def save_then_die(self, state, model, optimizer, best, static=()):
        save(self, state, model, optimizer, best, static)
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(train_module.Checkpoint, "save", save_then_die)
        with pytest.raises(Interrupted):
            train_toy(tmp_path, "cut", SMALL_CNN, train)


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, state=np.array("{}"), model_0=np.zeros(1000))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "error"),
    [(b"not a checkpoint", "ValueError"), (b"", "EOFError"), (_npz_bytes()[:600], "BadZipFile")],
    ids=["garbage", "empty", "truncated"],
)
def test_an_unreadable_checkpoint_is_ignored(tmp_path: Path, tracking: str, capsys, content: bytes, error: str) -> None:
    """Whatever a crash or a full disk left, the rerun starts over; and the temporaries of a write
    that was killed are cleaned up."""
    from stages.train import CHECKPOINT

    data = write_prepared(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(content)
    leftover = out / f".{CHECKPOINT}.k1ll3d.tmp.npz"
    leftover.write_bytes(_npz_bytes()[:600])
    _, record = train_toy(tmp_path, "out", SMALL_CNN, {"epochs": 1})
    assert f"ignoring unreadable checkpoint {out / CHECKPOINT} ({error}" in capsys.readouterr().out
    assert record["epochs_run"] == 1
    assert data.exists() and not leftover.exists() and not (out / CHECKPOINT).exists()


@pytest.mark.parametrize("written_on", ["another backend", "two devices"])
def test_a_checkpoint_from_another_backend_or_precision_is_not_resumed(
    tmp_path: Path, tracking: str, capsys, monkeypatch: pytest.MonkeyPatch, written_on: str
) -> None:
    """Epochs trained on one Keras backend (or dtype policy, or data-parallel on two devices, whose
    batches were trimmed to an even count) went another way than this run's would: going on from
    them matches no uninterrupted run."""
    import keras

    from stages import train as train_module

    with monkeypatch.context() as patch:  # a finished training whose checkpoint stays, as if killed at the end
        patch.setattr(train_module.Checkpoint, "remove", lambda self: None)
        train_toy(tmp_path, "out", SMALL_CNN, {"epochs": 1, "fine_tune": {"epochs": 0}})
    path = tmp_path / "out" / train_module.CHECKPOINT
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    state = json.loads(str(arrays["state"]))
    assert state["setup"] == f"{keras.backend.backend()} float32"
    other = ("torch" if keras.backend.backend() != "torch" else "jax") + " float32"
    if written_on == "two devices":
        other = f"{keras.backend.backend()} float32 on 2 devices"
    arrays["state"] = np.array(json.dumps({**state, "setup": other}))
    np.savez(path, **arrays)
    capsys.readouterr()

    _, record = train_toy(tmp_path, "out", SMALL_CNN, {"epochs": 1, "fine_tune": {"epochs": 0}})

    said = capsys.readouterr().out
    assert (f"the checkpoint was written with {other}, this run has {keras.backend.backend()} float32 "
            "(KERAS_BACKEND, training.mixed_precision, the devices data_parallel trains on); starting over") in said
    assert "training finished before" not in said
    assert record["epochs_run"] == 1 and len(pd.read_csv(tmp_path / "out" / "history.csv")) == 1


def test_a_run_that_diverges_from_its_first_epoch_fails_in_one_line(tmp_path: Path, tracking: str) -> None:
    """No epoch with a finite validation loss: there is no model worth writing."""
    from stages.errors import UserError

    train = {"epochs": 5, "optimizer": "sgd", "learning_rate": 1.0e6, "fine_tune": {"epochs": 0}}
    with pytest.raises(UserError) as raised:
        train_toy(tmp_path, "diverged", SMALL_CNN, train)
    message = str(raised.value)
    assert message.startswith("train@toy-net: training diverged: no epoch gave a finite val_loss (epoch 1: loss ")
    assert message.endswith("lower experiments.toy-net.train.learning_rate (1000000.0)")
    assert not (tmp_path / "diverged" / "model.keras").exists()


# --------------------------------------------------------------------------------------------
# Transfer learning: feature caching and phase 2.


def test_on_tensorflow_the_feature_pass_runs_the_frozen_base_with_its_weights_as_constants() -> None:
    """The cache's one pass over the images: the base's weights are graph constants (so
    TensorFlow folds BatchNormalization into the convolutions), its outputs those of predict up
    to float rounding, for every image (the last batch padded, the padding cut off)."""
    import keras

    from stages.train import _constant_forward, _features

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the constant graph is TensorFlow's; other backends predict")
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    base = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    bn = base.layers[3]
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 2, 8), rng.normal(0, 0.5, 8), rng.normal(0, 0.3, 8), rng.uniform(0.5, 2, 8)])
    base.trainable = False
    images = [rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8) for n in (21, 5)]

    graph = _constant_forward(base).get_concrete_function().graph
    ops = {op.type for op in graph.get_operations()}
    assert "ReadVariableOp" not in ops and not graph.variables, sorted(ops)
    got = _features(base, images, batch_size=8)
    for x, features in zip(images, got):
        assert features.shape == (len(x), 8) and features.dtype == np.float32
        np.testing.assert_allclose(features, base.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", ["pretrained", "pretrained_efficientnet"])
def test_feature_caching_trains_the_same_model_as_running_the_frozen_base(
    tmp_path: Path, tracking: str, weights: str, request: pytest.FixtureRequest
) -> None:
    """MobileNetV2, and EfficientNetB0, whose blocks hold dropout: the frozen base runs as in predict."""
    pretrained = request.getfixturevalue(weights)
    train = {"epochs": 4, "early_stopping_patience": 10, "fine_tune": {"epochs": 0}}
    fast, fast_record = train_toy(tmp_path, "cached", pretrained["backbone"], {**train, "feature_cache": "auto"}, pretrained["folder"])
    slow, slow_record = train_toy(tmp_path, "full", pretrained["backbone"], {**train, "feature_cache": "off"}, pretrained["folder"])
    assert fast_record["phases"][0]["feature_cache"] is True
    assert slow_record["phases"][0]["feature_cache"] is False
    x = np.load(tmp_path / "data" / "test_x.npy")
    fast_p, slow_p = fast.predict(x, verbose=0), slow.predict(x, verbose=0)
    assert np.abs(fast_p - slow_p).max() < 1e-4
    # The head itself: were the base's dropout to run in training (Keras 3 overrides training=False
    # inside a functional model), EfficientNet's would differ here (by up to 7e-3 in dense_1). The
    # features summed in another order (computed once, or in the graph) drift the head by up to
    # 5e-5 over four epochs of a head that learns (measured on MobileNetV2's features).
    for name in ("dense_1", "predictions"):
        for a, b in zip(fast.get_layer(name).get_weights(), slow.get_layer(name).get_weights()):
            np.testing.assert_allclose(a, b, atol=2e-4, err_msg=name)
    assert np.array_equal(fast_p.argmax(1), slow_p.argmax(1))
    assert fast_record["best_epoch"] == slow_record["best_epoch"]


def test_augmentation_turns_feature_caching_off(tmp_path: Path, tracking: str, pretrained) -> None:
    _, record = train_toy(tmp_path, "aug", pretrained["backbone"], {"epochs": 1, "fine_tune": {"epochs": 0}},
                          pretrained["folder"], augmentation={"rotation": 5})
    assert record["phases"][0]["feature_cache"] is False


def test_phase_two_fine_tunes_the_top_of_the_base_with_batch_normalization_frozen(
    tmp_path: Path, tracking: str, pretrained
) -> None:
    import keras

    from stages.backbones import base_of

    from stages.backbones import tuned_layers

    # Phase 1 at a rate too low to learn, so that phase 2 (which keeps phase 1's weights unless it
    # beats them) surely wins and its changes are in the model written.
    model, record = train_toy(
        tmp_path, "tuned", pretrained["backbone"],
        {"epochs": 2, "learning_rate": 1e-9, "early_stopping_patience": 10,
         "fine_tune": {"epochs": 3, "learning_rate": 1e-3, "unfreeze": 12}},
        pretrained["folder"],
    )
    assert [p["phase"] for p in record["phases"]] == [1, 2]
    history = pd.read_csv(tmp_path / "tuned" / "history.csv")
    assert list(history["phase"]) == [1, 1, 2, 2, 2]
    assert record["best_epoch"] >= 2 and history["val_loss"].iloc[2:].min() < history["val_loss"].iloc[:2].min()
    base = base_of(model)
    start = pretrained["values"]
    weights = {w.path: keras.ops.convert_to_numpy(w) for w in base.weights}
    assert weights.keys() == start.keys()
    # The top 12 layers, widened to whole blocks: all of block_15 (the cut fell on its add).
    tuned = tuned_layers(base, 12)
    assert tuned[0].name == "block_15_expand" and len(base.layers) - base.layers.index(tuned[0]) > 12
    top = {w.path for layer in tuned for w in layer.weights}
    batch_norm = {w.path for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization) for w in layer.weights}
    assert top and not top & batch_norm
    for path, value in weights.items():
        if path not in top:
            assert np.array_equal(value, start[path]), f"{path} changed but was frozen"
    unchanged = [path for path in top if np.array_equal(weights[path], start[path])]
    assert not unchanged, f"phase 2 won, so every unfrozen layer of the base must have moved: {unchanged}"
    # What phase 2 trained is recorded, as the printed line says it, in training.json and the run.
    trained = sum(1 for layer in tuned if layer.weights)
    assert {key: record["phases"][1][key] for key in ("base_layers_trained", "trained_from")} == {
        "base_layers_trained": trained, "trained_from": "block_15_expand"}
    assert "trained_from" not in record["phases"][0]
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking).get_run(record["run_id"]).data.tags
    assert (tags["phase2_base_layers_trained"], tags["phase2_trained_from"]) == (str(trained), "block_15_expand")


def test_phase_two_with_unfreeze_0_says_it_trains_the_whole_base(tmp_path: Path, tracking: str, pretrained, capsys) -> None:
    """unfreeze: 0 trains every layer of the base but BatchNormalization; the line says so, not
    "whole blocks from input_layer"."""
    import keras

    from stages.backbones import base_of

    train = {"epochs": 1, "fine_tune": {"epochs": 1, "learning_rate": 1e-4, "unfreeze": 0}}
    model, record = train_toy(tmp_path, "tuned", pretrained["backbone"], train, pretrained["folder"])
    assert [p["phase"] for p in record["phases"]] == [1, 2]
    base = base_of(model)
    with_weights = sum(1 for layer in base.layers if layer.weights and not isinstance(layer, keras.layers.BatchNormalization))
    said = capsys.readouterr().out
    assert (f"train@toy-net: phase 2 fine-tunes the whole base ({with_weights} layers with weights; "
            "BatchNormalization stays frozen) at lr 0.0001\n") in said
    assert "whole blocks from" not in said
    assert (record["phases"][1]["base_layers_trained"], record["phases"][1]["trained_from"]) == (with_weights, None)
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking).get_run(record["run_id"]).data.tags
    assert (tags["phase2_base_layers_trained"], tags["phase2_trained_from"]) == (str(with_weights), "whole base")


def test_a_phase_two_that_diverges_stops_there_and_keeps_phase_ones_weights(
    tmp_path: Path, tracking: str, pretrained, capsys
) -> None:
    # Adam's first steps are about the learning rate itself: weights near float32's largest, then inf.
    train = {"epochs": 2, "fine_tune": {"epochs": 4, "learning_rate": 1.0e38, "unfreeze": 12}}
    model, record = train_toy(tmp_path, "tuned", pretrained["backbone"], train, pretrained["folder"])
    history = pd.read_csv(tmp_path / "tuned" / "history.csv")
    # The line names the key to lower: phase 2's own learning rate, not phase 1's.
    said = [line for line in capsys.readouterr().out.splitlines() if "diverged" in line]
    assert len(said) == 1 and said[0].startswith("train@toy-net: phase 2 diverged at epoch 3 (loss ")
    assert said[0].endswith("; it stops there, keeping the best weights so far; if it recurs, lower "
                            "experiments.toy-net.train.fine_tune.learning_rate (1e+38)")

    assert list(history["phase"]) == [1, 1, 2]  # phase 2 stopped at its first epoch
    assert not np.isfinite(history["loss"].iloc[2]) or not np.isfinite(history["val_loss"].iloc[2])
    assert [phase["diverged_at_epoch"] for phase in record["phases"]] == [None, 2]
    assert record["best_epoch"] in (0, 1)
    # The model written is phase 1's best, whose predictions are finite.
    assert np.isfinite(model.predict(np.zeros((2, 8, 8, 1), "uint8"), verbose=0)).all()


@pytest.mark.parametrize(
    ("unfreeze", "error"),
    [(100000, "100000 is more than the 154 layers of mobilenetv2's base; use at most 154, or 0 for all of them"),
     (2, "the top 2 layers of mobilenetv2's base (Conv_1_bn, out_relu) have no weights to train "
         "(BatchNormalization stays frozen); unfreeze more")],
    ids=["more-than-the-base", "nothing-to-train"],
)
def test_a_phase_two_that_cannot_unfreeze_what_it_asks_fails_before_training(
    tmp_path: Path, tracking: str, pretrained, unfreeze: int, error: str, monkeypatch
) -> None:
    from stages import backbones
    from stages.errors import UserError

    # Params refuse more layers than a base backbones.BASE_LAYERS lists has (tests/test_config.py);
    # train@ checks the built base, for a family the table lacks.
    monkeypatch.delitem(backbones.BASE_LAYERS, "mobilenetv2")
    train = {"epochs": 1, "fine_tune": {"epochs": 1, "unfreeze": unfreeze}}
    with pytest.raises(UserError) as raised:
        train_toy(tmp_path, "tuned", pretrained["backbone"], train, pretrained["folder"])
    assert str(raised.value) == f"train@toy-net: experiments.toy-net.train.fine_tune.unfreeze: {error}"
    assert not (tmp_path / "tuned" / "history.csv").exists()


def test_training_says_which_params_do_not_apply(tmp_path: Path, tracking: str, capsys) -> None:
    """An inherited phase 2 on a base trained from scratch, a batch larger than the training set,
    and XLA asked for where Keras would not use it (TensorFlow on a CPU, deterministic)."""
    import keras

    params = write_params(tmp_path / "params.yaml", SMALL_CNN, {"epochs": 1, "batch_size": 5000})
    content = yaml.safe_load(params.read_text())
    content["training"] = {"fine_tune": {"epochs": 3}, "jit_compile": "on"}
    params.write_text(yaml.safe_dump(content))
    from stages.train import train as run_train

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        record = run_train("toy-net", str(params), write_prepared(tmp_path / "data"), tmp_path / "out")

    said = capsys.readouterr().out
    if keras.backend.backend() == "tensorflow":
        assert ("train@toy-net: training.jit_compile on is not applied: TensorFlow's op determinism, on for every "
                "CPU run so that a resumed run ends with the same weights, excludes XLA") in said
        assert not any("jit_compile" in str(warning.message) for warning in warned)
        assert record["phases"][0]["xla"] is False
    assert ("train@toy-net: one phase, as it trains from scratch (training.fine_tune.epochs, phase 2, is for a "
            "pretrained frozen base)") in said
    assert ("train@toy-net: experiments.toy-net.train.batch_size 5000 is more than the 1257 training images: "
            "each epoch is one batch of them all") in said
    assert [phase["phase"] for phase in record["phases"]] == [1]


def test_phase_two_settings_an_experiment_gives_without_a_phase_two_are_named(tmp_path: Path, tracking: str, capsys) -> None:
    """fine_tune.unfreeze and learning_rate set in an experiment whose base trains from scratch
    (or whose fine_tune.epochs is 0) are not used: the stage says so rather than drop them."""
    train = {"epochs": 1, "fine_tune": {"unfreeze": 4, "learning_rate": 1e-4}}
    _, record = train_toy(tmp_path, "out", SMALL_CNN, train)
    assert [phase["phase"] for phase in record["phases"]] == [1]
    assert ("train@toy-net: experiments.toy-net.train.fine_tune.learning_rate, experiments.toy-net.train."
            "fine_tune.unfreeze are not applied: there is no phase 2, as it trains from scratch (phase 2 is for a "
            "pretrained frozen base)\n") in capsys.readouterr().out

    # A pretrained frozen base whose phase 2 is off: the plan is checked before the model is used.
    from stages.config import load_params
    from stages.train import _check_plan, plan_phases

    backbone = {"model": "mobilenetv2", "weights": "imagenet", "input_size": 32, "options": {"alpha": 0.35}}
    params = write_params(tmp_path / "off.yaml", backbone, {"fine_tune": {"epochs": 0, "unfreeze": 4}})
    experiment = load_params(params).experiment("toy-net")
    _check_plan(experiment, plan_phases(experiment), None, 100)
    assert capsys.readouterr().out == ("train@toy-net: experiments.toy-net.train.fine_tune.unfreeze is not applied: "
                                       "there is no phase 2, as experiments.toy-net.train.fine_tune.epochs is 0\n")


def test_the_pinned_weights_are_what_the_base_starts_from(tmp_path: Path, tracking: str, pretrained) -> None:
    import keras

    from stages.backbones import base_of

    model, _ = train_toy(tmp_path, "frozen", pretrained["backbone"], {"epochs": 1, "fine_tune": {"epochs": 0}}, pretrained["folder"])
    for weight in base_of(model).weights:
        assert np.array_equal(keras.ops.convert_to_numpy(weight), pretrained["values"][weight.path])


def test_a_pretrained_backbone_without_its_weights_folder_fails_in_one_line(tmp_path: Path, tracking: str, pretrained) -> None:
    from stages.errors import UserError

    with pytest.raises(UserError, match="weights.json: not found; run weights@"):
        train_toy(tmp_path, "none", pretrained["backbone"], {"epochs": 1}, tmp_path / "weights" / "toy-net")


def test_a_weights_record_written_for_training_from_scratch_is_one_line_naming_the_stage(tmp_path: Path, tracking: str) -> None:
    """The experiment's backbone became pretrained, and train ran (by hand, or --single-item)
    before its weights stage: weights.json still says weights null. The line names the record and
    the experiment's weights stage (it said `weights@<experiment>`, a placeholder, and no file)."""
    from stages.errors import UserError

    folder = tmp_path / "weights" / "toy-net"
    folder.mkdir(parents=True)
    (folder / "weights.json").write_text(json.dumps({"experiment": "toy-net", "model": "mobilenetv2", "weights": None}))
    backbone = {"model": "mobilenetv2", "input_size": 32, "weights": "imagenet", "options": {"alpha": 0.35}}
    with pytest.raises(UserError) as failure:
        train_toy(tmp_path, "stale", backbone, {"epochs": 1, "fine_tune": {"epochs": 0}}, folder)
    assert str(failure.value) == (
        f"{folder / 'weights.json'}: records no weights file (written for a backbone trained from scratch), but "
        "backbone net has weights: imagenet; run weights@toy-net again (dvc repro weights@toy-net)"
    )


# --------------------------------------------------------------------------------------------
# Backends.

NO_TENSORFLOW = """
import runpy, sys
sys.argv = ["stages.{stage}", *sys.argv[1:]]
try:
    runpy.run_module("stages.{stage}", run_name="__main__")
except SystemExit as exit:
    if exit.code:
        raise
assert "tensorflow" not in sys.modules, "TensorFlow was imported on another backend"
print("no tensorflow")
"""


IMPORTED_LATER = """
import sys
import keras
from keras.src.utils import module_utils
from stages import runtime
runtime.keep_tensorflow_out()
runtime.keep_tensorflow_out()  # twice, as train then evaluate in one process
assert module_utils.tensorflow.available is False and "tensorflow" not in sys.modules
import tensorflow as tf
assert module_utils.tensorflow.available is True
keras.utils.set_random_seed(3)  # seeds TensorFlow too, now that it is there
first = float(tf.random.uniform(()))
keras.utils.set_random_seed(3)
assert float(tf.random.uniform(())) == first, "keras.utils.set_random_seed left TensorFlow unseeded"
print("ok")
"""


def test_keeping_tensorflow_out_on_another_backend_lasts_until_something_imports_it() -> None:
    """The stages tell Keras that TensorFlow is not there (so that Keras does not import it to
    ask); a process of the caller's that imports it afterwards gets Keras's own answer back."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", IMPORTED_LATER], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def train_and_evaluate_arguments(tmp_path: Path, data: Path, params: Path) -> dict[str, list[str]]:
    """The arguments of the toy-net experiment's train and evaluate stages, outputs in tmp_path."""
    common = ["--experiment", "toy-net", "--data", str(data), "--params", str(params)]
    return {
        "train": [*common, "--out", str(tmp_path / "model")],
        "evaluate": [*common, "--model", str(tmp_path / "model"), "--metrics", str(tmp_path / "metrics.json"),
                     "--predictions", str(tmp_path / "predictions.csv"), "--figures", str(tmp_path / "figures"),
                     "--evaluation", str(tmp_path / "evaluation")],
    }


@pytest.mark.parametrize(
    "backend",
    [
        "jax",
        pytest.param("torch", marks=pytest.mark.skipif(
            not torch_installed(), reason="PyTorch is optional: `make env-torch` installs the CPU build")),
    ],
)
def test_train_evaluate_and_predict_on_other_backends_never_import_tensorflow(backend: str, tmp_path: Path, tracking: str) -> None:
    data = write_prepared(tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", SMALL_CNN, {"epochs": 3}, augmentation={"rotation": 8, "zoom": 0.1})
    env = {**os.environ, "KERAS_BACKEND": backend, "MLFLOW_TRACKING_URI": tracking}
    steps = train_and_evaluate_arguments(tmp_path, data, params)
    for stage, args in steps.items():
        result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW.format(stage=stage), *args], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0 and "no tensorflow" in result.stdout, result.stderr[-3000:]
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["keras_backend"] == backend
    if backend == "jax":
        # Keras would turn XLA off for the rotation and zoom layers; on JAX they compile.
        assert record["phases"][0]["xla"] is True
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] > 0.2, "better than chance (0.1)"

    # predict, on the other of the two: the model evaluate registered loads there, without
    # TensorFlow too, and labels the first test images as evaluate did.
    from PIL import Image

    other = {"jax": "torch" if torch_installed() else "jax", "torch": "jax"}[backend]
    files = []
    for i, image in enumerate(np.load(data / "test_x.npy")[:4]):
        files.append(str(tmp_path / f"test{i}.png"))
        Image.fromarray(image[..., 0]).save(files[-1])
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW.format(stage="predict"), "--dataset", "toy",
                             "--version", "1", *files], cwd=REPO, env={**env, "KERAS_BACKEND": other},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "no tensorflow" in result.stdout, result.stderr[-3000:]
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    evaluated = pd.read_csv(tmp_path / "predictions.csv").iloc[:4]
    assert [path for path, _, _ in lines] == files
    assert [label for _, label, _ in lines] == evaluated["predicted"].astype(str).tolist()
    assert [float(confidence) for _, _, confidence in lines] == pytest.approx(evaluated["confidence"].tolist(), abs=1e-4)


WRITES_WHILE_KERAS_LOADS = """
import importlib.abc, os, runpy, sys, warnings


class Noisy(importlib.abc.MetaPathFinder):
    # What must still come through while Keras is imported: a Python warning, and an error line
    # as a native library writes it, straight to stderr's file descriptor.
    def find_spec(self, name, path, target=None):
        if name == "keras":
            warnings.warn("a warning while Keras is imported")
            os.write(2, b"E0000 00:00:1796649244.397629    8474 fake.cc:1] an error logged while Keras is imported\\n")
        return None


sys.meta_path.insert(0, Noisy())
sys.argv = ["stages.{stage}", *sys.argv[1:]]
runpy.run_module("stages.{stage}", run_name="__main__")
"""


def test_train_and_evaluate_leave_out_tensorflows_start_up_lines_but_not_warnings_or_errors(
    tmp_path: Path, tracking: str
) -> None:
    """train and evaluate set TF_CPP_MIN_LOG_LEVEL to 2, but the lines TensorFlow's native
    libraries log while Keras imports them ignore it (abseil/abseil-cpp#1957): abseil's notice,
    oneDNN's and cuda's info lines came twice on every stage's stderr, as predict's did. Now they
    are left out, as predict leaves them out; a Python warning or an error line still comes. So is
    TensorFlow's error that cuInit failed, where the machine has no NVIDIA GPU."""
    from stages.runtime import nvidia_device

    data = write_prepared(tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", SMALL_CNN, {"epochs": 1})
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env |= {"KERAS_BACKEND": "tensorflow", "MLFLOW_TRACKING_URI": tracking}
    steps = train_and_evaluate_arguments(tmp_path, data, params)
    for stage, args in steps.items():
        result = subprocess.run([sys.executable, "-c", WRITES_WHILE_KERAS_LOADS.format(stage=stage), *args], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "a warning while Keras is imported" in result.stderr, result.stderr
        assert "] an error logged while Keras is imported" in result.stderr, result.stderr
        below_errors = [line for line in result.stderr.splitlines() if line[:1] in "IW" and line[1:5].isdigit()]
        assert below_errors == [] and "absl::InitializeLog" not in result.stderr, result.stderr
        if not nvidia_device():  # no GPU: nothing failed (tests/test_runtime.py has the rest)
            assert "failed call to cuInit" not in result.stderr, result.stderr
        assert f"{stage}@toy-net: " in result.stdout


INFERENCE_XLA = """
import sys
from pathlib import Path
from stages import backbones
from stages.evaluate import evaluate
from stages.train import train

loaded = []
load = backbones.load_saved_model
backbones.load_saved_model = lambda *args, **kwargs: loaded.append(load(*args, **kwargs)) or loaded[-1]
params, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
train("toy-net", params, data, out)
evaluate("toy-net", params, data, out, out / "metrics.json", out / "predictions.csv", out / "figures", out / "evaluation")
print("xla", loaded[0].jit_compile)
"""


@pytest.mark.parametrize("setting", ["off", "auto"])
def test_evaluate_predicts_with_xla_only_where_training_used_it(setting: str, tmp_path: Path, tracking: str) -> None:
    """The model is loaded uncompiled, for inference, and Keras's "auto" would turn XLA on (with
    JAX here); with training.jit_compile off it predicts without XLA, as training ran."""
    params = write_params(tmp_path / "params.yaml", SMALL_CNN, {"epochs": 1, "jit_compile": setting})
    env = {**os.environ, "KERAS_BACKEND": "jax", "MLFLOW_TRACKING_URI": tracking}
    result = subprocess.run([sys.executable, "-c", INFERENCE_XLA, str(params), str(write_prepared(tmp_path / "data")),
                             str(tmp_path / "model")], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"xla {setting != 'off'}"


def test_the_efficientnet_package_refuses_other_backends_in_one_line(tmp_path: Path) -> None:
    code = (
        "from stages.backbones import get_backbone\n"
        "from stages.errors import UserError\n"
        "try:\n    get_backbone('efn_b0').build((32, 32, 3), None, {})\n"
        "except UserError as e:\n    print(e)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "runs on the TensorFlow backend only (KERAS_BACKEND is jax)" in result.stdout, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Data parallel (training.distribution), on two CPU devices standing in for two GPUs.


def test_loader_splits_every_batch_evenly_for_data_parallel() -> None:
    x = np.arange(37, dtype=np.uint8).reshape(37, 1, 1, 1)
    y = np.arange(37)
    # Training: the short last batch (5) is trimmed to 4; which image sits out changes per epoch.
    train = array_batches(x, y, batch_size=16, seed=1, shuffle=True, multiple=2, remainder="drop")
    left_out = []
    for epoch in range(3):
        train.set_epoch(epoch)
        sizes = [len(train[i][1]) for i in range(len(train))]
        assert sizes == [16, 16, 4]
        seen = np.concatenate([train[i][1] for i in range(len(train))])
        assert len(set(seen)) == 36
        left_out.append(set(range(37)) - set(seen))
    assert len(set.union(*left_out)) > 1
    # Prediction: the last batch is filled up after the real images, which keep their order.
    predict = array_batches(x, y, batch_size=16, seed=0, shuffle=False, multiple=2, remainder="pad")
    assert [len(predict[i][1]) for i in range(len(predict))] == [16, 16, 6]
    assert list(predict[2][1][:5]) == [32, 33, 34, 35, 36]
    # One device: nothing changes.
    plain = array_batches(x, y, batch_size=16, seed=0, shuffle=False, multiple=1, remainder="drop")
    assert [len(plain[i][1]) for i in range(len(plain))] == [16, 16, 5]


@pytest.mark.parametrize("weighted", [False, True])
def test_validation_scored_from_padded_batches_matches_keras(tmp_path: Path, weighted: bool) -> None:
    import keras

    from stages.train import _validate

    data = write_prepared(tmp_path / "data")
    x, y = np.load(data / "val_x.npy")[:269], np.load(data / "val_y.npy")[:269]
    weight = class_weights(y[y < 5], 10)[y] if weighted else None  # classes 5-9 weigh nothing
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=3, verbose=0)
    padded = array_batches(x, y, batch_size=64, seed=0, shuffle=False, multiple=4, remainder="pad", sample_weight=weight)
    assert len(padded[len(padded) - 1][1]) == 16  # the last 13 images, padded to 16
    ours = _validate(model, padded, y, weight)
    loss, accuracy = model.evaluate(x, y, batch_size=64, verbose=0, sample_weight=weight)
    assert ours["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert ours["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    if weighted:
        assert ours["val_loss"] != pytest.approx(_validate(model, padded, y)["val_loss"], rel=0.05)


TWO_TENSORFLOW_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from stages.errors import run_stage
from stages.train import main
sys.argv = ["stages.train", *sys.argv[1:]]
run_stage(main)
"""


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_data_parallel_trains_the_same_model_as_one_device(backend: str, tmp_path: Path, tracking: str) -> None:
    """Two replicas, each on half of every batch, follow the one-device run's curve: the same
    seed, initial weights and batches, gradients averaged across the replicas."""
    data = write_prepared(tmp_path / "data")
    env = {**os.environ, "KERAS_BACKEND": backend, "MLFLOW_TRACKING_URI": tracking}
    if backend == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    histories = {}
    for distribution in ("off", "data_parallel"):
        params = write_params(tmp_path / f"{distribution}.yaml", SMALL_CNN, {"epochs": 4, "batch_size": 32, "distribution": distribution})
        args = ["--experiment", "toy-net", "--data", str(data), "--params", str(params), "--out", str(tmp_path / distribution)]
        prelude = ["-c", TWO_TENSORFLOW_CPUS] if backend == "tensorflow" else ["-m", "stages.train"]
        result = subprocess.run([sys.executable, *prelude, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((tmp_path / distribution / "training.json").read_text())
        assert record["config"]["training"]["distribution"] == distribution
        histories[distribution] = pd.read_csv(tmp_path / distribution / "history.csv")
    assert record["replicas"] == 2 and len(record["replica_devices"]) == 2
    one, two = histories["off"], histories["data_parallel"]
    assert len(one) == len(two) == 4
    assert two["val_loss"].iloc[-1] < two["val_loss"].iloc[0] - 0.2  # it learns
    # (The two-replica run skips one training image per epoch: 1,257 do not split into pairs.)
    assert np.allclose(two["val_loss"], one["val_loss"], atol=0.05), (one, two)
    # Accuracy moves in steps while the loss falls steeply; MirroredStrategy also draws each
    # replica's dropout masks from its own generator.
    assert np.allclose(two["val_accuracy"], one["val_accuracy"], atol=0.1), (one, two)


def test_data_parallel_refuses_a_batch_that_does_not_split_and_a_backend_without_it(tmp_path: Path, tracking: str) -> None:
    data = write_prepared(tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", SMALL_CNN, {"epochs": 1, "batch_size": 33, "distribution": "data_parallel"})
    args = ["--experiment", "toy-net", "--data", str(data), "--params", str(params), "--out", str(tmp_path / "model")]
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-m", "stages.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    # Both are set in the experiment's train: block, and the line names the key there, not training's.
    assert "experiments.toy-net.train.batch_size 33 does not split evenly over 2 devices; use a multiple of 2" in result.stderr
    assert "Traceback" not in result.stderr
    if torch_installed():
        env = {**os.environ, "KERAS_BACKEND": "torch"}
        result = subprocess.run([sys.executable, "-m", "stages.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 1
        assert "experiments.toy-net.train.distribution: data_parallel needs KERAS_BACKEND tensorflow or jax" in result.stderr
    assert not (tmp_path / "model" / "model.keras").exists()


def test_data_parallel_with_fewer_training_images_than_devices_is_one_line(tmp_path: Path, tracking: str) -> None:
    """Each batch is trimmed to a multiple of the devices: one training image on two devices left
    every epoch without a batch, and Keras's fit failed with an UnboundLocalError traceback."""
    data = write_prepared(tmp_path / "data")
    x, y = np.load(data / "train_x.npy"), np.load(data / "train_y.npy")
    np.save(data / "train_x.npy", x[:1])
    np.save(data / "train_y.npy", y[:1])
    params = write_params(tmp_path / "params.yaml", SMALL_CNN, {"epochs": 1, "batch_size": 2, "distribution": "data_parallel"})
    args = ["--experiment", "toy-net", "--data", str(data), "--params", str(params), "--out", str(tmp_path / "model")]
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "MLFLOW_TRACKING_URI": tracking}
    result = subprocess.run([sys.executable, "-m", "stages.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert ("the 1 training images do not fill a batch over 2 devices; set experiments.toy-net.train.distribution "
            "off, or add training images") in result.stderr
    assert not (tmp_path / "model" / "model.keras").exists()


def test_the_first_epoch_after_compile_trains_in_the_loaders_order_with_workers() -> None:
    """With loader workers (the GPU path), Keras's fit takes the first batch from the queue to
    build the loss and metrics, and on JAX and PyTorch the epoch then trained it last. Built
    beforehand (as train does after every compile), every epoch trains in the loader's order."""
    import keras

    from stages.loader import keras_input
    from stages.train import build_before_fit

    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (8 * 16, 4, 4, 1), dtype=np.uint8)
    y = rng.integers(0, 2, len(x)).astype("int32")
    batches = array_batches(x, y, batch_size=16, seed=3, shuffle=True, workers=4)
    seen: list[int] = []

    class Spy(keras.layers.Layer):
        def call(self, inputs: Any, training: Any = None) -> Any:
            if training:
                seen.append(int(np.asarray(keras.ops.convert_to_numpy(inputs), dtype=np.int64).sum()))
            return inputs

    model = keras.Sequential([keras.Input((4, 4, 1)), Spy(), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"], run_eagerly=True)
    build_before_fit(model, batches)
    for epoch in range(2):
        batches.set_epoch(epoch)
        seen.clear()
        model.fit(keras_input(batches), initial_epoch=epoch, epochs=epoch + 1, shuffle=False, verbose=0)
        assert seen == [int(np.asarray(batches[i][0], dtype=np.int64).sum()) for i in range(len(batches))], epoch


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"image_size": 16}, "the train images are 8x8x1, but datasets.toy.image_size and channels say 16x16x1"),
        ({"image_size": 8, "channels": 3}, "the train images are 8x8x1, but datasets.toy.image_size and channels say 8x8x3"),
        ({"image_size": 8, "classes": CLASSES[::-1]}, "prepared for the classes ['0', '1', "),
    ],
    ids=["size", "channels", "classes"],
)
def test_prepared_data_unlike_params_is_one_line_saying_to_split_again(tmp_path, tracking, dataset, message) -> None:
    """Train run by hand (or with --single-item) on arrays split before params changed: one line
    naming the folder and the split to rerun, not a Keras shape error, nor a model with the wrong
    classes."""
    from stages.errors import UserError
    from stages.train import train as run_train

    data = write_prepared(tmp_path / "data")
    params = toy_params(dataset.pop("classes", CLASSES), **dataset)
    params["backbones"] = {"net": SMALL_CNN}
    params["experiments"] = {"toy-net": {"suite": "tests", "dataset": "toy", "backbone": "net", "train": {"epochs": 1}}}
    params["suites"] = {"tests": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError) as error:
        run_train("toy-net", str(tmp_path / "params.yaml"), data, tmp_path / "out", None)
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{data}: ") and message in text
    assert text.endswith("run split@toy again (dvc repro split@toy)")
    assert not (tmp_path / "out").exists()


def _damage(data: Path, how: str) -> None:
    if how == "a file missing":
        (data / "val_x.npy").unlink()
    elif how == "fewer labels":
        np.save(data / "train_y.npy", np.load(data / "train_y.npy")[:-3])
    elif how == "cut short":
        content = (data / "train_x.npy").read_bytes()
        (data / "train_x.npy").write_bytes(content[: len(content) // 2])
    elif how == "float32 images":
        np.save(data / "train_x.npy", np.load(data / "train_x.npy").astype("float32") / 255)
    elif how == "empty":
        (data / "val_y.npy").write_bytes(b"")
    elif how == "a few bytes left":
        (data / "train_y.npy").write_bytes((data / "train_y.npy").read_bytes()[:4])
    elif how == "classes.json not a list":
        (data / "classes.json").write_text("null")
    elif how.startswith("label"):
        y = np.load(data / "val_y.npy")
        y[5] = 10 if how == "label 10 of 10 classes" else -1
        np.save(data / "val_y.npy", y)


DAMAGED = {
    "a file missing": "val_x.npy: missing from the prepared data; run the split stage for this dataset again",
    "cut short": "train_x.npy: not a readable prepared file (",
    "empty": "val_y.npy: not a readable prepared file (",
    "a few bytes left": "train_y.npy: not a readable prepared file (not a .npy array (cut short or overwritten))",
    "classes.json not a list": "classes.json: not a list of class names; run the split stage for this dataset again",
    "fewer labels": "train_y.npy: int64 labels of shape (1254,) for 1257 images in train_x.npy, where split writes",
    "float32 images": "train_x.npy: float32 images of shape (1257, 8, 8, 1), where split writes uint8",
    "label 10 of 10 classes": "val_y.npy: labels outside 0..9, the 10 classes of classes.json (1 of them, the first 10); run split@toy",
    "label -1": "val_y.npy: labels outside 0..9, the 10 classes of classes.json (1 of them, the first -1); run split@toy",
}


@pytest.mark.parametrize("how", list(DAMAGED))
def test_damaged_prepared_arrays_are_one_line_naming_the_file(tmp_path, tracking, how) -> None:
    """Before, a label outside the classes trained silently on JAX (a traceback on TensorFlow),
    float32 images went to the model as if 0-255, and a missing, short or mismatched array was a
    traceback naming no file. Evaluate reads the same arrays through the same checks."""
    from stages.errors import UserError
    from stages.train import train as run_train

    data = write_prepared(tmp_path / "data")
    _damage(data, how)
    params = write_params(tmp_path / "params.yaml", SMALL_CNN, {"epochs": 1})
    with pytest.raises(UserError) as error:
        run_train("toy-net", str(params), data, tmp_path / "out", None)
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{data}/") and DAMAGED[how] in text, text
    assert "pickle" not in text  # numpy's advice to load a file unsafely is not ours to give
    assert not (tmp_path / "out").exists()


def test_an_array_file_given_for_the_prepared_folder_is_one_line_saying_so(tmp_path) -> None:
    """`--data data/processed/digits/test_x.npy` (a file, where train and evaluate take split's
    folder): before, "test_x.npy: no prepared data; run the split stage for this dataset first",
    advice to split again data that was there. Now the line says to give the folder."""
    from stages.errors import UserError
    from stages.loader import load_prepared

    data = write_prepared(tmp_path / "data")
    with pytest.raises(UserError) as error:
        load_prepared(data / "test_x.npy")
    assert str(error.value) == (f"--data {data / 'test_x.npy'} is a file; give the split stage's output folder, "
                                f"which holds it: --data {data}")


def test_evaluating_a_model_on_data_split_again_since_it_trained_is_refused(tmp_path, tracking) -> None:
    """evaluate run by hand (or with --single-item) after split ran again (a new seed): the test
    split may hold images the model trained on, and the inflated score went to the registry. The
    model's training record names the data version it trained on; evaluate refuses any other."""
    from stages.errors import UserError
    from stages.evaluate import evaluate

    train_toy(tmp_path, "net", SMALL_CNN, {"epochs": 1})
    trained_on = json.loads((tmp_path / "net" / "training.json").read_text())["data_version"]
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    (tmp_path / "data" / "meta.json").write_text(json.dumps({**meta, "sha256": "split again with another seed"}))
    out = tmp_path / "reports"

    with pytest.raises(UserError) as error:
        evaluate("toy-net", str(tmp_path / "net.yaml"), tmp_path / "data", tmp_path / "net", out / "metrics.json",
                 out / "predictions.csv", out / "figures", out / "evaluation")

    text = str(error.value)
    assert "\n" not in text and text.startswith(f"evaluate@toy-net: the model was trained on prepared data {trained_on}, but ")
    assert text.endswith("retrain it first, dvc repro train@toy-net")
    assert not out.exists()


def test_a_retrain_under_other_code_keeps_the_earlier_run(tmp_path: Path, tracking: str, monkeypatch) -> None:
    """A code change reruns train@ with the same params and data; reverting it makes `dvc repro`
    bring the first training's outputs back from DVC's run cache, train@ and evaluate@ both
    ("is cached - skipping run, checking out outputs"), so no stage runs that could revive a run
    the retrain deleted: the workspace's training.json would name a deleted run. A retrain under
    other code must keep the earlier run; under the same code it still replaces it."""
    from mlflow.tracking import MlflowClient

    from stages import train as train_module

    client = MlflowClient(tracking)
    train = {"epochs": 1, "early_stopping_patience": 10, "batch_size": 64}
    _, first = train_toy(tmp_path, "first", SMALL_CNN, train)
    same_code = train_module.code_version
    monkeypatch.setattr(train_module, "code_version", lambda backend: "edited" + same_code(backend)[6:])
    _, edited = train_toy(tmp_path, "edited", SMALL_CNN, train)
    assert edited["run_id"] != first["run_id"]
    assert client.get_run(first["run_id"]).info.lifecycle_stage == "active", "the first code's run was deleted"
    monkeypatch.setattr(train_module, "code_version", same_code)
    _, again = train_toy(tmp_path, "again", SMALL_CNN, train)  # same code, params and data: replaces
    assert client.get_run(first["run_id"]).info.lifecycle_stage == "deleted"
    assert client.get_run(edited["run_id"]).info.lifecycle_stage == "active"


def test_a_run_whose_checkpoint_is_discarded_is_not_left_running(tmp_path: Path, tracking: str, monkeypatch) -> None:
    """Ctrl-C during train@, then a param change: the rerun starts over ("the checkpoint is for other
    params or data") in a new run; the interrupted one, whose process is gone, was left RUNNING
    in MLflow for good."""
    from mlflow.tracking import MlflowClient

    cut_after_first_checkpoint(tmp_path, {"epochs": 3, "early_stopping_patience": 10, "batch_size": 64}, monkeypatch)
    client = MlflowClient(tracking)
    (cut,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert cut.info.status == "RUNNING"
    _, record = train_toy(tmp_path, "cut", SMALL_CNN, {"epochs": 2, "early_stopping_patience": 10, "batch_size": 64})
    assert record["run_id"] != cut.info.run_id
    assert client.get_run(cut.info.run_id).info.status != "RUNNING", "the abandoned run is still RUNNING"


def test_a_run_whose_checkpoint_lost_its_static_file_is_not_left_running(tmp_path: Path, tracking: str, monkeypatch) -> None:
    """checkpoint.npz names a static file (a frozen base's variables) that is gone: the rerun
    ignores the checkpoint as unreadable and starts over, and the interrupted run, whose state it
    could still read, is closed as a discarded one's is; before, it stayed RUNNING for good."""
    from mlflow.tracking import MlflowClient

    from stages import train as train_module

    train = {"epochs": 3, "early_stopping_patience": 10, "batch_size": 64}
    cut_after_first_checkpoint(tmp_path, train, monkeypatch)
    path = tmp_path / "cut" / train_module.CHECKPOINT
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["static"] = np.array(json.dumps({"file": "checkpoint.static-gone.npz", "model": [0], "best": []}))
    np.savez(path, **arrays)
    client = MlflowClient(tracking)
    (cut,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])

    _, record = train_toy(tmp_path, "cut", SMALL_CNN, train)

    assert record["run_id"] != cut.info.run_id and record["epochs_run"] == 3
    assert client.get_run(cut.info.run_id).info.status != "RUNNING", "the abandoned run is still RUNNING"
