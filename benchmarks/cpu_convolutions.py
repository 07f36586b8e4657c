"""Why JAX is slow on a CPU for MobileNetV2 and EfficientNet: one depthwise 3x3 convolution and
one 1x1 convolution (the two layers of their blocks) on each Keras backend, on this machine.

    python benchmarks/cpu_convolutions.py [--backends tensorflow jax] [--repeats 5]

Each backend runs in its own process (KERAS_BACKEND is read once, at import). Each layer is a
one-layer keras.Model on float32 input of 64 x 112 x 112 x 96 (MobileNetV2's second block at 224),
called through `predict` once to compile and then `--repeats` times; the median call is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPE = (64, 112, 112, 96)


def child(repeats: int) -> dict[str, float]:
    import keras
    import numpy as np

    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    layers = {
        "depthwise 3x3": keras.layers.DepthwiseConv2D(3, padding="same"),
        "conv 1x1, 96 -> 96": keras.layers.Conv2D(96, 1),
    }
    seconds = {}
    for name, layer in layers.items():
        inputs = keras.Input(SHAPE[1:])
        model = keras.Model(inputs, layer(inputs))
        model.predict(x, batch_size=SHAPE[0], verbose=0)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model.predict(x, batch_size=SHAPE[0], verbose=0)
            times.append(time.perf_counter() - started)
        seconds[name] = statistics.median(times)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"], choices=["tensorflow", "jax", "torch"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    results = {}
    for backend in args.backends:
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
            env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True,
        )
        if done.returncode:
            raise SystemExit(f"{backend} failed:\n{done.stderr[-3000:]}")
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    layers = list(next(iter(results.values())))
    print(f"float32 input {' x '.join(map(str, SHAPE))}, median of {args.repeats} predict calls, "
          f"{len(os.sched_getaffinity(0))} CPU cores")
    print(f"{'layer':<20}" + "".join(f"{backend:>12}" for backend in results))
    for layer in layers:
        print(f"{layer:<20}" + "".join(f"{results[backend][layer]:>11.3f}s" for backend in results))


if __name__ == "__main__":
    main()
