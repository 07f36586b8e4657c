"""Augmentation cost: Keras's RandomRotation + RandomZoom + RandomTranslation against RandomAffine.

    .venv/bin/python benchmarks/augmentation.py --backends tensorflow jax torch

Times, in milliseconds per batch (median of --repeats after one warm-up call), the geometric
augmentation a model holds in training, on float32 batches of random 0-255 images (--size,
default 224; --batch-sizes, default 32 and 128), with rotation 10 degrees, zoom 0.1 and
translation 0.1 (the course's usual settings):

- keras: keras.Sequential([RandomRotation, RandomZoom, RandomTranslation]), three bilinear
  resamplings with reflected borders, as the train stage built it before RandomAffine;
- ours: stages.augmentation's RandomAffine, the same three drawn per image and applied as one.

Each backend runs in its own process, compiled the way training compiles it: on JAX a jax.jit of
the layer's stateless call; on TensorFlow a tf.function, with XLA for ours (`ours XLA`) and
without (Keras's layers cannot be XLA-compiled); on torch, eager. On a CPU this measures the CPU;
the ratio on a GPU is for benchmarks/gpu_throughput.py to show.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {"rotation": 10.0, "zoom": 0.1, "translation": 0.1}


def layers_to_time():
    import keras

    from stages.augmentation import layer_classes

    seed = 42
    theirs = keras.Sequential([
        keras.layers.RandomRotation(SETTINGS["rotation"] / 360.0, seed=seed),
        keras.layers.RandomZoom(SETTINGS["zoom"], seed=seed),
        keras.layers.RandomTranslation(SETTINGS["translation"], SETTINGS["translation"], seed=seed),
    ])
    ours = layer_classes()["RandomAffine"](**SETTINGS, seed=seed)
    return {"keras": theirs, "ours": ours}


def compiled_call(layer, xla: bool):
    """A function images -> augmented images, compiled the way this backend trains."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        state = [v.value for v in layer.non_trainable_variables]
        step = jax.jit(lambda state, x: layer.stateless_call([], state, x, training=True))

        def call(x):
            nonlocal state
            out, state = step(state, x)
            return out.block_until_ready()

        return call
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda x: layer(x, training=True), jit_compile=xla)
        return lambda x: step(x).numpy()
    return lambda x: keras.ops.convert_to_numpy(layer(x, training=True))


def measure(batch_sizes: list[int], size: int, repeats: int) -> list[dict]:
    import keras

    backend = keras.backend.backend()
    variants = [("keras", False), ("ours", False)] + ([("ours", True)] if backend == "tensorflow" else [])
    rows = []
    for batch_size in batch_sizes:
        images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3)).astype("float32")
        x = keras.ops.convert_to_tensor(images)
        for name, xla in variants:
            layer = layers_to_time()[name]
            layer.build((None, size, size, 3))
            call = compiled_call(layer, xla)
            call(x)  # warm-up: tracing and compilation
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                call(x)
                times.append(time.perf_counter() - started)
            ms = statistics.median(times) * 1000
            rows.append({"backend": backend, "batch_size": batch_size, "layers": name, "xla": xla,
                         "ms_per_batch": round(ms, 1), "img_per_s": round(batch_size / ms * 1000)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"], choices=["tensorflow", "jax", "torch"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes {' '.join(map(str, args.batch_sizes))}: each must be at least 1")
    if args.child:
        measure(args.batch_sizes, args.size, args.repeats)
        return

    rows, failed = [], []
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, __file__, "--child", "--size", str(args.size), "--repeats", str(args.repeats),
                   "--batch-sizes", *map(str, args.batch_sizes)]
        finished = subprocess.run(command, env=env, capture_output=True, text=True)
        if finished.returncode:
            print(f"{backend}: failed\n{finished.stderr[-2000:]}")
            failed.append(backend)
            continue
        rows += [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]

    print(f"\n{os.cpu_count()} cores, {args.size}x{args.size}x3 float32, median of {args.repeats}\n")
    print("| backend | batch | Keras's three layers, ms | RandomAffine, ms | RandomAffine with XLA, ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends:
        for batch_size in args.batch_sizes:
            cells = {(r["layers"], r["xla"]): r["ms_per_batch"] for r in rows
                     if r["backend"] == backend and r["batch_size"] == batch_size}
            if not cells:
                continue
            keras_ms, ours_ms, xla_ms = cells.get(("keras", False)), cells.get(("ours", False)), cells.get(("ours", True))
            best = min(v for v in (ours_ms, xla_ms) if v)
            print(f"| {backend} | {batch_size} | {keras_ms:,.1f} | {ours_ms:,.1f} | "
                  f"{f'{xla_ms:,.1f}' if xla_ms else '-'} | {keras_ms / best:.1f}x |")
    if failed:
        raise SystemExit(f"failed on {', '.join(failed)} (above)")


if __name__ == "__main__":
    main()
