"""The loader's device path on KERAS_BACKEND=torch, on a CUDA GPU (benchmarks/device_check.sh).

    KERAS_BACKEND=torch python benchmarks/torch_device.py            # on the borrowed GPU machine
    KERAS_BACKEND=torch .venv/bin/python benchmarks/torch_device.py --cpu   # here: the CPU stands in

stages.loader.device_array copies the uint8 training images to the GPU once; each batch is then
gathered there (torch.index_select), so no images cross the bus per step. This checks, on the
real device, that (1) the copy is a CUDA uint8 tensor equal to the array, (2) every batch of two
epochs (4 worker threads, as train uses on a GPU) is a CUDA uint8 tensor holding the images of its
own labels, (3) a small uint8-input CNN (mixed_bfloat16) trains from those batches as from host
batches: the epoch losses agree to 2 % (the order within a batch differs, and bf16 rounds), and
(4) TensorFlow was never imported. It prints images per second for both feeds (median of the
timed epochs; a small model, so the feed weighs), and exits 1 when a check fails, 0 when torch is
not installed (nothing to check).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="no GPU: stand the CPU in for it (checks the code path)")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs, after one warm-up epoch")
    args = parser.parse_args()
    if os.environ["KERAS_BACKEND"] != "torch":
        print(f"torch_device: KERAS_BACKEND is {os.environ['KERAS_BACKEND']}; run it with KERAS_BACKEND=torch")
        return 2
    try:
        import torch
    except ImportError:
        print("torch_device: skipped, torch is not installed")
        return 0
    import keras

    from stages import loader, runtime

    if args.cpu:
        args.images, args.size, args.epochs = min(args.images, 512), min(args.size, 32), min(args.epochs, 1)
        loader.device_array = lambda x: loader._torch_copy(x, "cpu", slice_bytes=1 << 20)
        expected = "cpu"
    elif not torch.cuda.is_available():
        print("torch_device: no CUDA GPU here (pass --cpu to check the code path on the CPU)")
        return 2
    else:
        expected = "cuda"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.images)
    failures = []

    def check(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    copied = loader.device_array(x)
    check(isinstance(copied, torch.Tensor) and copied.device.type == expected and copied.dtype == torch.uint8,
          f"device_array: a {expected} uint8 tensor ({type(copied).__name__}, {getattr(copied, 'device', 'host')})")
    check(isinstance(copied, torch.Tensor) and np.array_equal(copied.cpu().numpy(), x), "device_array: equal to the array")
    # Labelled with their own row numbers, so that each batch says which images it should hold.
    batches = loader.array_batches(x, np.arange(len(x)), batch_size=args.batch, seed=1, shuffle=True, on_device=True,
                                   workers=4)
    good = batches.on_device
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        for index in range(len(batches)):
            images, rows = batches[index]
            good = good and images.device.type == expected and images.dtype == torch.uint8
            good = good and np.array_equal(images.cpu().numpy(), x[rows])
    check(bool(good), "every batch of two epochs: uint8 on the device, the images of its own labels")
    check("tensorflow" not in sys.modules, "tensorflow not imported (loader)")

    policy = "mixed_bfloat16" if expected == "cuda" else "float32"
    keras.mixed_precision.set_dtype_policy(policy)
    rows = []
    for on_device in (False, True):
        runtime.make_deterministic(0, runtime.accelerator())  # as train seeds (without importing TensorFlow)
        model = keras.Sequential([
            keras.Input((args.size, args.size, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"), keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax", dtype="float32"),
        ])
        model.compile("adam", "sparse_categorical_crossentropy")
        feed = loader.array_batches(x, y, batch_size=args.batch, seed=1, shuffle=True, on_device=on_device, workers=4)
        losses, seconds = [], []
        for epoch in range(1 + args.epochs):
            feed.set_epoch(epoch)
            started = time.perf_counter()
            history = model.fit(feed, initial_epoch=epoch, epochs=epoch + 1, shuffle=False, verbose=0).history
            if expected == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            losses.append(history["loss"][0])
        rows.append((on_device and feed.on_device, losses, args.images / statistics.median(seconds[1:] or seconds)))
    (_, host_losses, host_rate), (resident, device_losses, device_rate) = rows
    check(resident, "the training feed kept its images on the device")
    check(bool(np.allclose(host_losses, device_losses, rtol=0.02)),
          f"same epoch losses from device and host batches: {np.round(device_losses, 4)} vs {np.round(host_losses, 4)}")
    check("tensorflow" not in sys.modules, "tensorflow not imported (fit)")
    print(f"torch {torch.__version__}, keras {keras.__version__}, {expected}"
          + (f" ({torch.cuda.get_device_name()})" if expected == "cuda" else "")
          + f", {policy}, {args.images} images of {args.size}x{args.size}, batch {args.batch}")
    print("| feed | img/s |\n|---|---|")
    print(f"| host uint8 batches | {host_rate:,.0f} |\n| on the device | {device_rate:,.0f} |")
    print("torch_device: " + ("ok" if not failures else f"{len(failures)} check(s) failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
