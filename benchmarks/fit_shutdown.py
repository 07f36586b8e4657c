"""tf.data at the end of each fit: Keras's wrapping of a PyDataset against stages.loader.keras_input,
on the TensorFlow backend, on this machine's CPU.

    python benchmarks/fit_shutdown.py --train 800 --val 240 --epochs 8

The train stage calls `model.fit` once per epoch (so that it can checkpoint, stop early and resume
between epochs). Each fit makes a new tf.data iterator over the batches and destroys it when the
fit returns. Handed a PyDataset with one worker, Keras 3 builds that pipeline with tf.data's
autotuning on; `keras_input` builds one over the same batches with autotuning off.

Each mode runs in a fresh process: a frozen MobileNetV2 (weights=None, 224x224, as the feature-cache
benchmark's "off" mode) under a small head, trained on random uint8 images for `--epochs` fits of
one epoch each, with validation, seeded and with TensorFlow's op determinism on, as
stages.runtime.make_deterministic sets a CPU run. A callback notes when each epoch begins and
ends. Reported per fit: the whole fit's wall time, the epoch's own time (first batch to the end of
validation), and what the fit spent after the epoch had ended ("tail": the iterators' shut-down
and Keras's end-of-training work). `--no-determinism` leaves op determinism off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("keras", "ours")


def child(mode: str, args: argparse.Namespace) -> dict:
    import numpy as np
    import keras

    sys.path.insert(0, str(REPO))
    from stages.loader import array_batches, keras_input

    if keras.backend.backend() != "tensorflow":
        raise SystemExit("this benchmark is about the TensorFlow backend: unset KERAS_BACKEND")
    keras.utils.set_random_seed(0)
    if args.determinism:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    size = args.size
    x = rng.integers(0, 256, (args.train, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.train)
    vx = rng.integers(0, 256, (args.val, size, size, 3), dtype=np.uint8)
    vy = rng.integers(0, 10, args.val)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(size, size, 3))
    base.trainable = False
    inputs = keras.Input((size, size, 3), dtype="uint8")
    h = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    h = keras.layers.GlobalAveragePooling2D()(base(h, training=False))
    h = keras.layers.Dropout(0.2)(keras.layers.Dense(128, activation="relu")(h))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train = array_batches(x, y, batch_size=args.batch_size, seed=0, shuffle=True, remainder="drop")
    val = array_batches(vx, vy, batch_size=args.batch_size, seed=0, shuffle=False, remainder="pad")
    fed_train, fed_val = (keras_input(train), keras_input(val)) if mode == "ours" else (train, val)

    marks: dict[str, float] = {}

    class Marks(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            marks["begin"] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            marks["end"] = time.perf_counter()

    fits = []
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        started = time.perf_counter()
        history = model.fit(fed_train, validation_data=fed_val, initial_epoch=epoch, epochs=epoch + 1,
                            shuffle=False, verbose=0, callbacks=[Marks()])
        finished = time.perf_counter()
        fits.append({
            "fit": round(finished - started, 3),
            "epoch": round(marks["end"] - marks["begin"], 3),
            "before": round(marks["begin"] - started, 3),
            "tail": round(finished - marks["end"], 3),
            "val_loss": float(history.history["val_loss"][-1]),
        })
        print(f"{mode} epoch {epoch + 1}: fit {fits[-1]['fit']:.2f} s, epoch {fits[-1]['epoch']:.2f} s, "
              f"tail {fits[-1]['tail']:.2f} s", file=sys.stderr, flush=True)
    return {"mode": mode, "fits": fits, "keras": keras.__version__, "tensorflow": __import__("tensorflow").__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=240)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-determinism", dest="determinism", action="store_false")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    if args.out and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist; create it or name another")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    results = {}
    for mode in args.modes:
        command = [sys.executable, __file__, "--child", mode] + [
            f"--train={args.train}", f"--val={args.val}", f"--size={args.size}", f"--batch-size={args.batch_size}",
            f"--epochs={args.epochs}",
        ] + ([] if args.determinism else ["--no-determinism"])
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
               "cpus": os.cpu_count(), "results": results}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print()
    print(f"{args.train} train / {args.val} val images at {args.size}, batch {args.batch_size}, {args.epochs} fits of one epoch, "
          f"op determinism {'on' if args.determinism else 'off'}, {os.cpu_count()} CPUs")
    print(f"{'mode':>6}  {'fits, s':>8}  {'epochs, s':>9}  {'tail median, s':>14}  {'tail max, s':>11}  {'tails over 1 s':>14}")
    for mode, result in results.items():
        fits = result["fits"]
        tails = [fit["tail"] for fit in fits]
        print(f"{mode:>6}  {sum(f['fit'] for f in fits):8.1f}  {sum(f['epoch'] for f in fits):9.1f}  "
              f"{statistics.median(tails):14.2f}  {max(tails):11.2f}  {sum(t > 1 for t in tails):>14}")
    if len(results) == 2:
        same = [a["val_loss"] == b["val_loss"] for a, b in zip(results["keras"]["fits"], results["ours"]["fits"])]
        print(f"same val_loss in every epoch: {all(same)}")


if __name__ == "__main__":
    main()
