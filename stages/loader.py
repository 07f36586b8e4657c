"""Feeding the prepared uint8 arrays to Keras, on any backend.

The split stage decodes every image once into uint8 `.npy` files; `load_prepared` memory-maps
them (for train and evaluate alike) and batches are read straight from them. Nothing is decoded
per epoch, and images stay uint8 until they are inside the model (which casts them), so a batch
costs a quarter of the float32 bytes to move.

The order of epoch `e` is a permutation drawn from (seed, e) alone, so an interrupted run that
resumes at epoch `e` sees exactly the batches the uninterrupted run saw. Batches may carry sample
weights (class weighting), which works the same on every backend.

On JAX or PyTorch with an accelerator, arrays that fit in a fraction of its memory are copied to
the device once and batches are gathered there: no host-to-device copy per step. On TensorFlow
the batches stay on the host (see `device_array`).

Pass the batches to `model.fit`, `evaluate` and `predict` through `keras_input`: on TensorFlow it
keeps tf.data's autotuning out of the way (see there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import UserError

# Share of an accelerator's memory the training images may take when kept on the device.
DEVICE_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class PreparedData:
    classes: list[str]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    version: str  # a hash of what decides the arrays' content


def load_prepared(data: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> PreparedData:
    """Memory-map the arrays written by the split stage."""
    if data.is_file():  # else "no prepared data; run the split stage", for data that is there
        raise UserError(f"--data {data} is a file; give the split stage's output folder, which holds it: --data {data.parent}")
    if not (data / "classes.json").exists():
        raise UserError(f"{data}: no prepared data; run the split stage for this dataset first")
    again = "run the split stage for this dataset again"

    def read(name: str, **options: Any) -> Any:
        path = data / name
        try:
            if not name.endswith(".npy"):
                return path.read_bytes()
            return np.load(path, allow_pickle=False, **options)
        except FileNotFoundError:
            raise UserError(f"{path}: missing from the prepared data; {again}") from None
        except (OSError, ValueError, EOFError) as error:  # empty, cut short, or not an array file
            # numpy takes what has no .npy header for a pickle, and would advise loading it unsafely.
            why = "not a .npy array (cut short or overwritten)" if "pickle" in str(error) else str(error) or "empty"
            raise UserError(f"{path}: not a readable prepared file ({why}); {again}") from None

    try:
        classes = json.loads(read("classes.json"))
    except ValueError as error:
        raise UserError(f"{data / 'classes.json'}: not JSON ({error}); {again}") from None
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise UserError(f"{data / 'classes.json'}: not a list of class names; {again}")
    digest = hashlib.sha256()
    for name in ("splits.parquet", "meta.json", "classes.json"):
        digest.update(read(name))
    x = {s: read(f"{s}_x.npy", mmap_mode="r") for s in splits}
    y = {s: read(f"{s}_y.npy") for s in splits}
    return PreparedData(classes, x, y, digest.hexdigest()[:16])


def check_prepared(data: PreparedData, data_dir: Path, dataset: str, config: Any) -> None:
    """The prepared arrays are what params.yaml says `dataset` is (its DatasetConfig `config`: the
    classes, working size and channels); else one line says to run its split again. They differ
    when the stage is run by hand, or with `dvc repro --single-item`, after those params changed."""
    classes, image_size, channels = config.classes, config.image_size, config.channels
    rerun = f"run split@{dataset} again (dvc repro split@{dataset})"
    if list(data.classes) != list(classes):
        raise UserError(
            f"{data_dir}: prepared for the classes {data.classes}, but datasets.{dataset}.classes lists {classes}; {rerun}"
        )
    for split, images in data.x.items():
        labels, x_file, y_file = data.y[split], data_dir / f"{split}_x.npy", data_dir / f"{split}_y.npy"
        # What split writes: uint8 images (never float32 ones to the device), one integer label
        # per image, each naming a class.
        if images.dtype != np.uint8 or images.ndim != 4:
            raise UserError(f"{x_file}: {images.dtype} images of shape {images.shape}, where split writes "
                            f"uint8 (count, size, size, channels); {rerun}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(images):
            raise UserError(f"{y_file}: {labels.dtype} labels of shape {labels.shape} for {len(images)} images in "
                            f"{x_file.name}, where split writes one integer label per image; {rerun}")
        outside = labels[(labels < 0) | (labels >= len(data.classes))]
        if outside.size:
            raise UserError(f"{y_file}: labels outside 0..{len(data.classes) - 1}, the {len(data.classes)} classes "
                            f"of classes.json ({outside.size} of them, the first {int(outside[0])}); {rerun}")
        if tuple(images.shape[1:]) != (image_size, image_size, channels):
            found = "x".join(str(n) for n in images.shape[1:])
            raise UserError(
                f"{data_dir}: the {split} images are {found}, but datasets.{dataset}.image_size and channels say "
                f"{image_size}x{image_size}x{channels}; {rerun}"
            )


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of the `count` samples in `epoch`: a function of (seed, epoch) only."""
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng([seed, epoch]).permutation(count)


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced class weights, n / (k * n_c), as scikit-learn's compute_class_weight("balanced");
    a class absent from `y` gets weight 0 (it never occurs)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights


_CLASS: dict[str, type] = {}


def array_batches(
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    sample_weight: np.ndarray | None = None,
    on_device: bool = False,
    workers: int = 1,
    multiple: int = 1,
    remainder: str = "keep",
) -> Any:
    """A keras.utils.PyDataset of (x, y[, w]) batches from arrays (memory-mapped is fine).

    Call `.set_epoch(e)` before each epoch; the batches of an epoch depend only on (seed, e).

    Data-parallel training needs every batch to split evenly over `multiple` devices. The last,
    short batch is then kept (`remainder="keep"`, the default: it must already split evenly),
    trimmed to a multiple (`"drop"`: for training, at most multiple - 1 images of an epoch sit it
    out, different ones each epoch since the order is shuffled), or filled up with repeats of its
    first image (`"pad"`: for prediction, whose extra outputs the caller cuts off).
    """
    if remainder not in ("keep", "drop", "pad"):
        raise ValueError(f"remainder must be keep, drop or pad, not {remainder!r}")
    if "ArrayBatches" not in _CLASS:
        _CLASS["ArrayBatches"] = _define()
    return _CLASS["ArrayBatches"](
        x, y, batch_size=batch_size, seed=seed, shuffle=shuffle, sample_weight=sample_weight,
        on_device=on_device, workers=workers, multiple=multiple, remainder=remainder,
    )


def _define() -> type:
    import keras

    class ArrayBatches(keras.utils.PyDataset):
        def __init__(self, x, y, *, batch_size, seed, shuffle, sample_weight, on_device, workers, multiple, remainder):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=8)
            if len(x) != len(y):
                raise ValueError(f"{len(x)} images but {len(y)} labels")
            self.count = len(x)
            self.batch_size = batch_size
            self.seed = seed
            self.shuffle = shuffle
            self.y = np.asarray(y)
            self.sample_weight = None if sample_weight is None else np.asarray(sample_weight, dtype="float32")
            self.x = device_array(x) if on_device else x
            self.on_device = self.x is not x
            self.order = epoch_order(self.count, seed, 0, shuffle)
            last = self.count % batch_size
            self.last_size = last if remainder == "keep" or multiple == 1 else last - last % multiple
            if remainder == "pad" and self.last_size != last:
                self.last_size += multiple
            self.length = self.count // batch_size + (1 if self.last_size else 0)

        def set_epoch(self, epoch: int) -> None:
            self.order = epoch_order(self.count, self.seed, epoch, self.shuffle)

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, index: int):
            picked = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            short = len(picked) < self.batch_size and len(picked) != self.last_size
            if short and self.last_size < len(picked):  # "drop"
                picked = picked[: self.last_size]
            if not self.on_device:
                # Sorted reads are sequential in the memory map; the order within a batch does
                # not change the batch's gradient (and a prediction's order is sorted already).
                picked = np.sort(picked)
            if short and self.last_size > len(picked):  # "pad", after the real images
                picked = np.concatenate([picked, np.repeat(picked[:1], self.last_size - len(picked))])
            if self.on_device:
                images = _gather(self.x, picked)
            else:
                images = np.asarray(self.x[picked])
            batch = (images, self.y[picked])
            if self.sample_weight is not None:
                batch = (*batch, self.sample_weight[picked])
            return batch

    return ArrayBatches


def keras_input(batches: Any) -> Any:
    """`batches` (from array_batches) as model.fit, evaluate and predict are to take them.

    On TensorFlow, Keras runs a PyDataset through tf.data, with tf.data's autotuning on unless the
    PyDataset has worker threads (Keras turns it off for those). With it on, a fit on this
    project's CPU machine waited about 10 s in the tf.data iterator's destructor after the epoch
    had ended, in about half the fits whose epochs took 10 s (docs/benchmarks.md, "tf.data at the
    end of each fit"); train runs one fit per epoch. So on TensorFlow, for a PyDataset without
    workers, this is a tf.data pipeline over the same batches with autotuning off and a prefetch
    of two batches. Each of its iterators (one per fit or predict) reads `batches[i]` anew, in the
    order of the epoch `batches.set_epoch` chose last. Otherwise `batches` itself.
    """
    import keras

    if keras.backend.backend() != "tensorflow" or batches.workers > 1:
        return batches
    import tensorflow as tf

    count = len(batches)
    signature = tuple(
        tf.TensorSpec((None, *np.shape(part)[1:]), tf.as_dtype(np.asarray(part).dtype)) for part in batches[0]
    )

    def generate():
        for index in range(count):
            yield batches[index]

    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(2)
    return dataset.with_options(options).apply(tf.data.experimental.assert_cardinality(count))


def device_array(x: np.ndarray) -> Any:
    """`x` copied to the accelerator when the backend is JAX or PyTorch, one is present and `x`
    fits in DEVICE_FRACTION of its memory; otherwise `x` itself.

    On TensorFlow `x` stays on the host: Keras feeds a TensorFlow fit through tf.data, whose
    pipelines run on the host, so a batch gathered from a GPU-resident array would be copied back
    and forth. Its batches (uint8, a quarter of the float32 bytes) are copied once per step.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return x
        limit = (device.memory_stats() or {}).get("bytes_limit", 0)
        if not limit or x.nbytes > DEVICE_FRACTION * limit:
            return x
        return jax.device_put(np.asarray(x), device)
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return x
        _, total = torch.cuda.mem_get_info()
        if x.nbytes > DEVICE_FRACTION * total:
            return x
        return _torch_copy(x, "cuda")
    return x


def _torch_copy(x: np.ndarray, device: str, slice_bytes: int = 64 << 20) -> Any:
    """`x` as a torch tensor on `device`, copied in slices of at most `slice_bytes` (or one
    image), so a memory-mapped array is never read into host memory whole."""
    import torch

    copy = torch.empty(x.shape, dtype=getattr(torch, np.dtype(x.dtype).name), device=device)
    step = max(1, slice_bytes // max(1, x[:1].nbytes))
    for start in range(0, len(x), step):
        copy[start : start + step].copy_(torch.from_numpy(np.array(x[start : start + step])))
    return copy


def _gather(x: Any, picked: np.ndarray) -> Any:
    """The rows `picked` of a device array from `device_array`, gathered on its device."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch.index_select(x, 0, torch.from_numpy(picked).to(x.device))
    import jax.numpy as jnp

    return jnp.take(x, picked, axis=0)
