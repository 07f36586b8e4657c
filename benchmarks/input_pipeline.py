"""Input pipeline: our prepared-array loader against the course's ImageDataGenerator, in img/s.

    python benchmarks/input_pipeline.py --images 2000 --size 224 --workdir /tmp/cm-input

Generates `--images` JPEGs (photo-like: smooth colour gradients, blurred shapes, sensor noise;
quality 90, about 19 KiB each at 224x224) in `--classes` class folders, then decodes each once into a uint8 `.npy` the way
the split stage does (stages.images.load_image over stages.workers.map_ordered into
np.lib.format.open_memmap). Over the SAME images, in the same process and run, at each batch
size it times full passes of

- ours: stages.loader.array_batches over the `.npy` memory-mapped read-only (as train opens it),
  shuffled, batches of uint8 (the model casts them);
- the course's: ImageDataGenerator(rescale=1/255).flow_from_directory(target_size=(size, size),
  batch_size=...), shuffled, batches of float32 in [0, 1] (Keras 3's legacy copy of it).

Both are read by indexing batch after batch (`loader[i]`), which is what Keras's PyDataset
adapter does with one worker (the train stage's setting on a CPU). One warm-up pass of a few
batches first; then `--passes` full passes each, and the median pass is reported. The JPEGs and
the `.npy` are both in the page cache (just written), so neither pays for the disk.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size RGB uint8 image that compresses like a photo, not like noise or a flat field."""
    from PIL import Image, ImageDraw, ImageFilter

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(-1, 1, 2)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.clip(0.5 + 0.5 * (a * xs + b * ys), 0, 1)[..., None]
    image = Image.fromarray((start * (1 - t) + end * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 10, size // 2, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def generate(folder: Path, images: int, classes: int, size: int, seed: int = 0) -> list[str]:
    """Write the JPEGs; return their paths relative to `folder`, in a fixed order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        path = f"class_{i % classes}/{i:06d}.jpg"
        Image.fromarray(photo_like(rng, size)).save(folder / path, quality=90)
        paths.append(path)
    return paths


def build_arrays(folder: Path, paths: list[str], classes: int, size: int, out: Path) -> tuple[Path, Path]:
    """Decode every JPEG once into a memory-mapped uint8 array, as stages.split.write_arrays does."""
    from stages.workers import map_ordered

    out.mkdir(parents=True, exist_ok=True)
    x_path, y_path = out / "train_x.npy", out / "train_y.npy"
    images = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    decode = functools.partial(_decode, folder, size=size)
    for i, image in enumerate(map_ordered(decode, paths, desc="decoding", unit="img")):
        images[i] = image
    images.flush()
    del images
    labels = np.array([int(p.split("/")[0].removeprefix("class_")) for p in paths], dtype=np.int32)
    np.save(y_path, labels, allow_pickle=False)
    assert labels.max() < classes
    return x_path, y_path


def _decode(folder: Path, path: str, size: int) -> np.ndarray:
    from stages.images import load_image

    return load_image(folder / path, size, 3)


def full_pass(loader, warm: bool = False) -> tuple[float, int]:
    """Seconds to read every batch of `loader` once (or a few batches, to warm up), and the images read."""
    batches = min(len(loader), 3) if warm else len(loader)
    seen = 0
    started = time.perf_counter()
    for i in range(batches):
        x = loader[i][0]
        seen += len(x)
    return time.perf_counter() - started, seen


def measure_ours(x_path: Path, y_path: Path, batch_size: int, passes: int) -> tuple[list[float], str]:
    from stages.loader import array_batches

    x = np.load(x_path, mmap_mode="r", allow_pickle=False)
    y = np.load(y_path, allow_pickle=False)
    loader = array_batches(x, y, batch_size=batch_size, seed=42, shuffle=True)
    full_pass(loader, warm=True)
    rates = []
    for epoch in range(passes):
        loader.set_epoch(epoch)
        seconds, seen = full_pass(loader)
        assert seen == len(x)
        rates.append(seen / seconds)
    sample = loader[0][0]
    return rates, f"{sample.dtype} {tuple(sample.shape[1:])}"


def measure_course(folder: Path, size: int, batch_size: int, passes: int, count: int) -> tuple[list[float], str]:
    try:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator
    except ImportError:  # an older Keras: the public tf.keras path
        from tensorflow.keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(rescale=1.0 / 255).flow_from_directory(
        str(folder), target_size=(size, size), batch_size=batch_size, shuffle=True, seed=42
    )
    assert generator.samples == count, (generator.samples, count)
    full_pass(generator, warm=True)
    rates = []
    for _ in range(passes):
        generator.on_epoch_end()  # a fresh shuffle, as fit does between epochs
        seconds, seen = full_pass(generator)
        assert seen == count
        rates.append(seen / seconds)
    sample = generator[0][0]
    return rates, f"{sample.dtype} {tuple(sample.shape[1:])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--passes", type=int, default=3, help="timed full passes per loader and batch size (median reported)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/classmatrix-input"))
    parser.add_argument("--keep", action="store_true", help="keep the generated JPEGs and arrays")
    args = parser.parse_args()
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes {' '.join(map(str, args.batch_sizes))}: each must be at least 1")

    import keras

    folder = args.workdir / f"jpegs-{args.images}-{args.size}"
    arrays = args.workdir / f"arrays-{args.images}-{args.size}"
    for generated in (folder, arrays):  # only what this script writes: --workdir may hold other files
        shutil.rmtree(generated, ignore_errors=True)
    started = time.perf_counter()
    paths = generate(folder, args.images, args.classes, args.size)
    generate_seconds = time.perf_counter() - started
    jpeg_bytes = sum((folder / p).stat().st_size for p in paths)
    started = time.perf_counter()
    x_path, y_path = build_arrays(folder, paths, args.classes, args.size, arrays)
    decode_seconds = time.perf_counter() - started

    rows = []
    for batch_size in args.batch_sizes:
        ours, ours_batch = measure_ours(x_path, y_path, batch_size, args.passes)
        course, course_batch = measure_course(folder, args.size, batch_size, args.passes, args.images)
        rows.append({
            "batch_size": batch_size,
            "ours_img_per_s": round(statistics.median(ours)),
            "course_img_per_s": round(statistics.median(course), 1),
            "ratio": round(statistics.median(ours) / statistics.median(course), 1),
            "ours_passes": [round(r) for r in ours],
            "course_passes": [round(r, 1) for r in course],
            "ours_batch": ours_batch,
            "course_batch": course_batch,
        })

    result = {
        "images": args.images,
        "size": args.size,
        "classes": args.classes,
        "jpeg_mib": round(jpeg_bytes / 2**20, 1),
        "npy_mib": round(x_path.stat().st_size / 2**20, 1),
        "generate_seconds": round(generate_seconds, 1),
        "decode_once_seconds": round(decode_seconds, 1),
        "decode_once_img_per_s": round(args.images / decode_seconds, 1),
        "passes": args.passes,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "cores": len(os.sched_getaffinity(0)),
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"{args.images} JPEGs {args.size}x{args.size} ({result['jpeg_mib']} MiB), median of {args.passes} full passes")
    print(f"{'batch':>5}  {'ours (array_batches) img/s':>27}  {'ImageDataGenerator img/s':>25}  {'ratio':>6}")
    for row in rows:
        print(f"{row['batch_size']:>5}  {row['ours_img_per_s']:>27,}  {row['course_img_per_s']:>25,}  {row['ratio']:>5}x")
    print(f"decoding once into the .npy (split's way): {decode_seconds:.1f} s, {result['decode_once_img_per_s']} img/s")
    if not args.keep:
        for generated in (folder, arrays):
            shutil.rmtree(generated, ignore_errors=True)
        if not any(args.workdir.iterdir()):
            args.workdir.rmdir()


if __name__ == "__main__":
    main()
