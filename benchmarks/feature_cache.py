"""Feature cache: the frozen phase with the base's features computed once, against running the
frozen base every epoch. MobileNetV2 at 224, the real train stage, on this machine.

    python benchmarks/feature_cache.py --train 800 --val 240 --epochs 10 --workdir /tmp/cm-feature-cache

Prepares, in `--workdir`:

- the data: scikit-learn's digits (real 8x8 scans), scaled to 0-255 as the `sklearn` source does
  and upsampled to 224x224 RGB by stages.images.load_pixels (what split does), written in the
  split stage's format (classes.json, meta.json, splits.parquet, {train,val,test}_{x,y}.npy);
- the "pretrained" base: keras.applications.MobileNetV2(include_top=False, weights=None) at 224,
  saved in the published files' legacy HDF5 format, served by a local HTTP server and fetched by
  the real weights stage (`python -m stages.weights`, `weights_url` + `weights_sha256`). No
  network, so not ImageNet's: a stand-in pretrained on the digits left over after train, val and
  test (see make_weights); that changes what the features are worth, not what they cost;
- two params files that differ only in `training.feature_cache` (auto, off): no augmentation,
  `epochs` epochs, early-stopping patience above it (every epoch runs), no fine-tuning.

Then runs stages.train.train() once per mode, each in a fresh process (as `dvc repro` would), and
reports the wall time of the train() call (Keras and MLflow imported before the clock starts; the
process's wall time, imports included, is reported too), training.json's phase-1 seconds (which
include the feature computation), the speed-up, the validation accuracy at the best epoch and at
the last, and how far apart the two runs' per-epoch validation loss and accuracy ever are.
`--weights-file` serves a real ImageNet file instead of the generated one.
MLFLOW_TRACKING_URI points at a SQLite file in `--workdir`; KERAS_BACKEND is left as it is (the
project's default, tensorflow, unless set).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.local_http import FolderServer  # noqa: E402

DATASET = "digits224"
BACKBONE = "mobilenetv2"
EXPERIMENT = f"{DATASET}-{BACKBONE}"
SIZE = 224
# The file keras.applications.MobileNetV2(alpha=1.0, 224, include_top=False) asks for; the
# weights stage stores the download under this name (stages.weights.mobilenetv2_weights).
WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
MODES = ("auto", "off")
# Of the digits outside train, val and test (the stand-in base is trained on them), how many at
# 224 set its BatchNormalization statistics.
CALIBRATION = 64


# --------------------------------------------------------------------------------------------
# Preparing the workdir.

MARKER = ".feature-cache-workdir"


def prepare_data(out: Path, train: int, val: int, test: int, seed: int) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Digits at 224x224x3 uint8 in the split stage's format, a random split; and the digits
    left over (8x8 uint8, with their labels), for the stand-in pretrained base."""
    import pandas as pd
    from sklearn.datasets import load_digits

    from stages.images import load_pixels

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    if train + val + test + CALIBRATION > len(pixels):
        raise SystemExit(f"--train + --val + --test must be at most {len(pixels) - CALIBRATION}")
    order = np.random.default_rng(seed).permutation(len(pixels))
    parts = {"train": order[:train], "val": order[train : train + val], "test": order[train + val : train + val + test]}
    out.mkdir(parents=True, exist_ok=True)
    classes = [str(name) for name in digits.target_names]
    rows = []
    counts = {}
    for split, indices in parts.items():
        images = np.lib.format.open_memmap(out / f"{split}_x.npy", mode="w+", dtype=np.uint8, shape=(len(indices), SIZE, SIZE, 3))
        for i, index in enumerate(indices):
            images[i] = load_pixels(pixels[index], SIZE, 3)
            rows.append({
                "path": f"{digits.target[index]}/{index:04d}.png",
                "label": classes[digits.target[index]],
                "split": split,
                "sha256": hashlib.sha256(pixels[index].tobytes()).hexdigest(),
            })
        images.flush()
        del images
        np.save(out / f"{split}_y.npy", digits.target[indices].astype(np.int32), allow_pickle=False)
        counts[split] = int(len(indices))
    pd.DataFrame(rows).to_parquet(out / "splits.parquet", index=False)
    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n", encoding="utf-8")
    meta = {"dataset": DATASET, "image_size": SIZE, "channels": 3, "counts": counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    left = order[train + val + test :]
    return counts, pixels[left], digits.target[left]


def make_weights(path: Path, spare: np.ndarray, labels: np.ndarray, epochs: int, size: int) -> None:
    """MobileNetV2's no-top weights in the published files' legacy HDF5 format (what
    keras.applications loads from a `.h5` path), standing in for ImageNet's: the base is trained
    for `epochs` epochs (Adam 0.001, batch 32, under a linear softmax head that is then thrown
    away) on `spare` (8x8 uint8 scans, with their `labels`), digits the benchmark neither trains,
    validates nor tests on, upsampled as split does to `size` x `size` (the weights do not depend
    on the input size; a small one keeps this to a couple of minutes on a CPU). Then every
    BatchNormalization's moving statistics are set to those of 64 of them at 224, the size the
    benchmark feeds. `epochs` 0 keeps Keras's random initialisation
    (statistics still calibrated).

    Why: untouched, the random network's pooled features are about 1e-11 (the signal vanishes
    through the 52 convolutions in inference mode) and the head cannot learn; calibrated but
    untrained, they vary little between images and the head stays at chance in 10 epochs. Trained
    on other digits, the base gives features a head learns from, epoch by epoch, as from a real
    pretrained base: a comparison of two training runs' accuracies then means something."""
    np.save(path.with_name("spare_x.npy"), spare)
    np.save(path.with_name("spare_y.npy"), labels)
    code = (
        "import h5py, keras, numpy as np, sys\n"
        "from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group\n"
        "from stages.images import load_pixels\n"
        "keras.utils.set_random_seed(0)\n"
        "x, y = np.load(sys.argv[2]), np.load(sys.argv[3])\n"
        "epochs, size = int(sys.argv[4]), int(sys.argv[5])\n"
        "preprocess = lambda images: images.astype('float32') / 127.5 - 1.0  # MobileNetV2's\n"
        f"model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=({SIZE}, {SIZE}, 3))\n"
        "if epochs:\n"
        "    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3))\n"
        "    net = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation='softmax')])\n"
        "    net.compile(keras.optimizers.Adam(0.001), 'sparse_categorical_crossentropy', metrics=['accuracy'])\n"
        "    small = np.stack([load_pixels(image, size, 3) for image in x])  # as split upsamples\n"
        "    history = net.fit(preprocess(small), y, epochs=epochs, batch_size=32, verbose=0)\n"
        "    print(f'pretrained on {len(x)} spare digits at {size}: accuracy {history.history[\"accuracy\"][-1]:.3f}')\n"
        "    model.set_weights(base.get_weights())\n"
        "for layer in model.layers:\n"
        "    if isinstance(layer, keras.layers.BatchNormalization):\n"
        "        layer.momentum = 0.0  # moving statistics := this batch's\n"
        f"model(preprocess(np.stack([load_pixels(image, {SIZE}, 3) for image in x[:{CALIBRATION}]])), training=True)\n"
        "with h5py.File(sys.argv[1], 'w') as handle:\n"
        "    save_weights_to_hdf5_group(handle, model)\n"
    )
    names = [path.with_name("spare_x.npy"), path.with_name("spare_y.npy")]
    subprocess.run([sys.executable, "-c", code, str(path), *map(str, names), str(epochs), str(size)],
                   check=True, env=child_env(), cwd=REPO)
    for name in names:
        name.unlink()


def write_params(path: Path, mode: str, epochs: int, batch_size: int, url: str, sha256: str) -> None:
    params = {
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": 0.001,
            "optimizer": "adam",
            "early_stopping_patience": epochs + 1,  # every epoch runs
            "seed": 42,
            "fine_tune": {"epochs": 0},
            "feature_cache": mode,
        },
        "datasets": {
            DATASET: {
                "source": {"kind": "sklearn", "name": "digits"},
                "layout": {"kind": "folders"},
                "classes": [str(c) for c in range(10)],
                "image_size": SIZE,
                "channels": 3,
                "split": {},
                "validation": {},
                "augmentation": {},  # none: the condition for the cache
                "reference": {},
                "metric": "auto",
            }
        },
        "backbones": {
            BACKBONE: {
                "model": "mobilenetv2",
                "input_size": SIZE,
                "weights": "imagenet",
                "weights_url": url,
                "weights_sha256": sha256,
                "freeze": True,
                "head": {"pool": "avg", "dense": [128], "dropout": 0.2},  # params.yaml's mobilenetv2 head
            }
        },
        "experiments": {EXPERIMENT: {"suite": "bench", "dataset": DATASET, "backbone": BACKBONE}},
        "suites": {"bench": {}},
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def child_env(workdir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if workdir is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        env["CLASSMATRIX_DOWNLOADS"] = str(workdir / "downloads")
    return env


# --------------------------------------------------------------------------------------------
# One mode, in its own process.


def child(mode: str, workdir: Path) -> None:
    """Train one mode with the real train(); write the call's wall time beside its outputs."""
    import resource

    # Imported before the clock starts: train() would import them itself, at a cost (tens of
    # seconds here) that is the same in both modes; the process's wall time, reported too,
    # includes it.
    import keras  # noqa: F401
    import mlflow  # noqa: F401

    from stages.train import train

    out = workdir / "models" / mode
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    record = train(EXPERIMENT, str(workdir / f"params-{mode}.yaml"), workdir / "data", out, workdir / "weights" / EXPERIMENT)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / "bench.json").write_text(json.dumps({"train_call_seconds": seconds, "peak_rss_bytes": peak, "record_epochs": record["epochs_run"]}))


def run_mode(mode: str, workdir: Path) -> dict:
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--workdir", str(workdir)],
        env=child_env(workdir), cwd=REPO, capture_output=True, text=True,
    )
    process_seconds = time.perf_counter() - started
    (workdir / f"train-{mode}.log").write_text(finished.stdout + finished.stderr)
    if finished.returncode:
        raise SystemExit(f"train ({mode}) failed:\n{(finished.stdout + finished.stderr)[-4000:]}")
    out = workdir / "models" / mode
    bench = json.loads((out / "bench.json").read_text())
    training = json.loads((out / "training.json").read_text())
    with open(out / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    phase = training["phases"][0]
    best = training["best_epoch"]
    best_row = next(row for row in history if int(row["epoch"]) == best)
    return {
        "mode": mode,
        "feature_cache_used": phase["feature_cache"],
        "epochs_run": phase["epochs_run"],
        "train_call_seconds": round(bench["train_call_seconds"], 1),
        "process_seconds": round(process_seconds, 1),
        "phase1_seconds": phase["seconds"],
        "feature_cache_seconds": phase["feature_cache_seconds"],
        "epoch_seconds": [float(row["seconds"]) for row in history],
        "val_loss": [float(row["val_loss"]) for row in history],
        "val_accuracy": [float(row["val_accuracy"]) for row in history],
        "best_epoch": best + 1,
        "val_accuracy_best": float(best_row["val_accuracy"]),
        "val_accuracy_final": float(history[-1]["val_accuracy"]),
        "val_loss_best": float(best_row["val_loss"]),
        "peak_rss_mib": round(bench["peak_rss_bytes"] / 2**20),
        "dtype_policy": training["dtype_policy"],
        "keras_backend": training["keras_backend"],
        "device": training["device"]["kind"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=800, help="training images")
    parser.add_argument("--val", type=int, default=240, help="validation images")
    parser.add_argument("--test", type=int, default=100, help="test images (written, not used by train)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/classmatrix-feature-cache"))
    parser.add_argument("--weights-file", type=Path, help="a real mobilenet_v2 1.0_224 no-top .h5 (ImageNet) to serve instead "
                        "of the generated one")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="epochs the stand-in base trains on the spare digits "
                        "(0: random weights, BatchNormalization calibrated)")
    parser.add_argument("--pretrain-size", type=int, default=96, help="input size the stand-in base trains at")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workdir)
        return

    workdir = args.workdir
    # The run starts from an empty workdir, so it removes the last one's: only a folder this
    # script made (its MARKER), never one holding someone's other files.
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).is_file():
        raise SystemExit(f"error: --workdir {workdir} holds files this benchmark did not make; "
                         "give an empty or new folder")
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "host").mkdir(parents=True)
    (workdir / MARKER).write_text("made by benchmarks/feature_cache.py; removed with the folder by its next run\n")
    counts, spare, spare_labels = prepare_data(workdir / "data", args.train, args.val, args.test, seed=0)
    if args.weights_file:
        shutil.copyfile(args.weights_file, workdir / "host" / WEIGHTS_FILE)
    else:
        make_weights(workdir / "host" / WEIGHTS_FILE, spare, spare_labels, args.pretrain_epochs, args.pretrain_size)
    served = workdir / "host" / WEIGHTS_FILE
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    server = FolderServer(workdir / "host")
    try:
        for mode in MODES:
            write_params(workdir / f"params-{mode}.yaml", mode, args.epochs, args.batch_size, server.url(WEIGHTS_FILE), digest)
        subprocess.run(
            [sys.executable, "-m", "stages.weights", "--experiment", EXPERIMENT,
             "--out", str(workdir / "weights" / EXPERIMENT), "--params", str(workdir / "params-auto.yaml")],
            env=child_env(workdir), cwd=REPO, check=True,
        )
    finally:
        server.stop()

    results = {mode: run_mode(mode, workdir) for mode in args.modes}
    summary = {"counts": counts, "epochs": args.epochs, "batch_size": args.batch_size,
               "weights": str(args.weights_file) if args.weights_file else (
                   f"generated: trained {args.pretrain_epochs} epochs on {len(spare)} spare digits at {args.pretrain_size}, "
                   f"BatchNormalization calibrated at {SIZE}"),
               "cores": len(os.sched_getaffinity(0)), "results": results}
    if set(results) == set(MODES):
        auto, off = results["auto"], results["off"]
        summary["speedup_train_call"] = round(off["train_call_seconds"] / auto["train_call_seconds"], 2)
        summary["speedup_phase1"] = round(off["phase1_seconds"] / auto["phase1_seconds"], 2)
        summary["val_accuracy_best_difference_points"] = round(100 * (auto["val_accuracy_best"] - off["val_accuracy_best"]), 2)
        summary["val_accuracy_final_difference_points"] = round(100 * (auto["val_accuracy_final"] - off["val_accuracy_final"]), 2)
        # The whole validation trace, epoch by epoch: more sensitive than one accuracy.
        summary["max_abs_val_loss_difference"] = float(max(abs(a - b) for a, b in zip(auto["val_loss"], off["val_loss"])))
        summary["max_abs_val_accuracy_difference_points"] = round(
            100 * max(abs(a - b) for a, b in zip(auto["val_accuracy"], off["val_accuracy"])), 2)
        summary["same_best_epoch"] = auto["best_epoch"] == off["best_epoch"]
    print(json.dumps(summary, indent=2))
    print()
    print(f"MobileNetV2 224, frozen, {counts['train']} train / {counts['val']} val digits, {args.epochs} epochs, "
          f"batch {args.batch_size}, {results[args.modes[0]]['keras_backend']} on {summary['cores']} CPU cores")
    print(f"{'feature_cache':>13}  {'train() s':>9}  {'phase 1 s':>9}  {'of which features s':>19}  "
          f"{'val acc best (epoch)':>20}  {'val acc final':>13}")
    for mode, r in results.items():
        print(f"{mode:>13}  {r['train_call_seconds']:>9.1f}  {r['phase1_seconds']:>9.1f}  {r['feature_cache_seconds']:>19.1f}  "
              f"{100 * r['val_accuracy_best']:>13.2f}% ({r['best_epoch']:>2})  {100 * r['val_accuracy_final']:>12.2f}%")
    if "speedup_train_call" in summary:
        print(f"speed-up: {summary['speedup_train_call']}x (train() wall), {summary['speedup_phase1']}x (phase-1 seconds); "
              f"val accuracy auto - off: {summary['val_accuracy_best_difference_points']:+.2f} points at the best epoch, "
              f"{summary['val_accuracy_final_difference_points']:+.2f} at the last")
        print(f"per-epoch validation trace, auto vs off: max |val_loss difference| {summary['max_abs_val_loss_difference']:.2e}, "
              f"max |val_accuracy difference| {summary['max_abs_val_accuracy_difference_points']:.2f} points, "
              f"same best epoch: {summary['same_best_epoch']}")


if __name__ == "__main__":
    main()
