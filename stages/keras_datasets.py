"""The `keras` source kind: a keras.datasets dataset written out as PNGs in class folders.

Keras' own loader (`keras.datasets.<name>.load_data()`) fetches the data into Keras' cache and
returns arrays; each image is written as `<dest>/train/<class>/<index:05d>.png` or
`<dest>/test/<class>/<index:05d>.png`, which the `folders` layout reads with
`splits: {train: train, test: test}`. Grayscale datasets become mode L PNGs, CIFAR mode RGB.

How keras 3.15.1 decides whether to download (keras/src/utils/file_utils.py, get_file). The cache
folder is `$KERAS_HOME/datasets`, else `~/.keras/datasets` (`/tmp/.keras/datasets` when that is not
writable); KERAS_HOME is read once, when keras is imported. A download happens when the file
below is missing, or, for the files with a pinned sha256, when its sha256 differs (keras then
downloads it again, and deletes it if that download fails):

- mnist: `mnist.npz`, sha256 checked.
- fashion_mnist: `fashion-mnist/{train,t10k}-{labels-idx1,images-idx3}-ubyte.gz`, existence only.
- cifar10: `cifar-10-batches-py-target_archive` (the downloaded cifar-10-python.tar.gz under that
  name), sha256 checked; keras extracts it again on every call into
  `cifar-10-batches-py-target/`, and that extracted folder alone does not spare a download.
- cifar100: `cifar-100-python-target_archive`, likewise, extracted into `cifar-100-python-target/`.

Importing this module is cheap: keras (and with it the backend, TensorFlow by default) is imported
inside `fetch` only.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.errors import NO_ROOM, UserError
from stages.progress import progress

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Fashion-MNIST's names ("T-shirt/top", "Ankle boot") made into folder names.
FASHION_MNIST = [
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
]  # fmt: skip
MNIST = [str(digit) for digit in range(10)]
# CIFAR-100's `fine_label_names` and `coarse_label_names` from the dataset's `meta` file, in label
# index order.
CIFAR100_FINE = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip
CIFAR100_COARSE = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]  # fmt: skip

# Folder names per dataset, in label index order; params.yaml's class lists can be checked here.
CLASS_NAMES: dict[str, list[str]] = {
    "cifar10": CIFAR10,
    "cifar100": CIFAR100_FINE,
    "cifar100_coarse": CIFAR100_COARSE,
    "mnist": MNIST,
    "fashion_mnist": FASHION_MNIST,
}

# Keras downloads with urllib, which waits forever by default; bound each connect and read.
SOCKET_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CacheFile:
    """A file keras keeps under `<keras cache>/datasets/` for a dataset."""

    path: str  # relative to the datasets folder
    origin: str  # the URL keras downloads it from
    sha256: str | None  # what keras checks an existing file against; None: existence only


_GOOGLE = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
_FASHION = [
    "train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
]  # fmt: skip

# What keras 3.15.1's loaders look for (keras/src/datasets/*.py); another keras version may differ.
KERAS_FILES: dict[str, list[CacheFile]] = {
    "mnist": [
        CacheFile(
            "mnist.npz", _GOOGLE + "mnist.npz", "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
        )
    ],
    "fashion_mnist": [CacheFile(f"fashion-mnist/{name}", _GOOGLE + name, None) for name in _FASHION],
    "cifar10": [
        CacheFile(
            "cifar-10-batches-py-target_archive",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        )
    ],
    "cifar100": [
        CacheFile(
            "cifar-100-python-target_archive",
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        )
    ],
}


def class_names(options: Any) -> list[str]:
    """The folder names for `options` (a KerasOptions), in label index order."""
    if options.name == "cifar100" and options.label_mode == "coarse":
        return CLASS_NAMES["cifar100_coarse"]
    return CLASS_NAMES[options.name]


def keras_cache_dir() -> Path:
    """The folder keras' get_file() keeps datasets in, resolved the way get_file() does.

    Imports keras (the home folder is read from KERAS_HOME when keras is imported).
    """
    try:
        from keras.src.backend import config

        home = config.keras_home()
    except (ImportError, AttributeError):  # a keras whose private layout moved
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    base = os.path.expanduser(home)
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return Path(base) / "datasets"


def fetch(options: Any, dest: Path, dataset: str) -> dict[str, Any]:
    """Load the keras dataset, write it as PNGs under `dest`, and return the provenance details."""
    from stages import archives, runtime

    name = options.name
    if name not in KERAS_FILES:
        raise UserError(f"datasets.{dataset}.source.name: {name!r} is not one of {', '.join(KERAS_FILES)}")
    if name == "cifar100" and options.label_mode not in ("fine", "coarse"):
        raise UserError(f"datasets.{dataset}.source.label_mode: {options.label_mode!r} is not fine or coarse")
    # Without TensorFlow's start-up lines below TF_CPP_MIN_LOG_LEVEL, as train and predict.
    runtime.import_keras_quietly()
    import keras
    names = class_names(options)
    cache = keras_cache_dir()
    files = KERAS_FILES[name]
    before = {f.path: _signature(cache / f.path) for f in files}

    module = getattr(keras.datasets, name)
    previous_timeout = socket.getdefaulttimeout()
    if previous_timeout is None:
        socket.setdefaulttimeout(SOCKET_TIMEOUT_S)
    try:
        if name == "cifar100":
            (x_train, y_train), (x_test, y_test) = module.load_data(label_mode=options.label_mode)
        else:
            (x_train, y_train), (x_test, y_test) = module.load_data()
    except Exception as error:
        mapped = keras_error(name, error, cache)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        socket.setdefaulttimeout(previous_timeout)

    # Downloaded: a file keras needs was missing before, or was rewritten (its sha256 did not match).
    downloaded = any(before[f.path] is None or before[f.path] != _signature(cache / f.path) for f in files)
    channels_first = keras.config.image_data_format() == "channels_first"
    counts: dict[str, int] = {}
    class_counts: dict[str, dict[str, int]] = {}
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        if channels_first and images.ndim == 4:
            images = images.transpose(0, 2, 3, 1)
        class_counts[split] = write_pngs(images, labels, names, dest / split, desc=f"{name} {split}")
        counts[split] = int(len(images))

    record: dict[str, Any] = {
        "origin": f"keras.datasets.{name} (keras {keras.__version__})",
        "version": keras.__version__,
        "this_run": {"downloaded": downloaded, "keras_cache": str(cache)},
        "archives": [
            {"name": f.path, "sha256": archives.sha256_file(cache / f.path), "bytes": (cache / f.path).stat().st_size}
            for f in files
            if (cache / f.path).is_file()
        ],
        "counts": counts,
        "class_counts": class_counts,
    }
    if name == "cifar100":
        record["label_mode"] = options.label_mode
    return record


def write_pngs(images: Any, labels: Any, names: list[str], folder: Path, desc: str = "writing PNGs") -> dict[str, int]:
    """Write `images[i]` as `folder/<names[labels[i]]>/<i:05d>.png`; return the count per class.

    uint8 arrays (N, H, W) become mode L PNGs and (N, H, W, 3) mode RGB. compress_level=1: PNGs of
    this size compress barely better at higher levels and write several times slower.
    """
    import numpy as np
    from PIL import Image

    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"labels outside 0..{len(names) - 1}: {labels.min()}..{labels.max()}")
    folders = []
    for class_name in names:
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        folders.append(os.path.join(folder, class_name))
    width = max(5, len(str(len(images) - 1)))
    for index in progress(range(len(images)), desc=desc, unit="img", total=len(images)):
        Image.fromarray(images[index]).save(
            os.path.join(folders[labels[index]], f"{index:0{width}d}.png"), format="PNG", compress_level=1
        )
    counts = np.bincount(labels, minlength=len(names))
    return {class_name: int(count) for class_name, count in zip(names, counts) if count}


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when keras (re)writes a file: inode, size, modification time; None if missing."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def keras_error(name: str, error: BaseException, cache: Path) -> UserError | None:
    """The one-line UserError for a keras loader failure, or None for an error another handler
    words better (a full disk) or an unexpected one (a bug)."""
    import http.client
    import pickle
    import urllib.error
    import tarfile
    import zipfile

    text = " ".join(str(error).split())
    files = KERAS_FILES[name]
    where = f"keras.datasets.{name}"
    if text.startswith("URL fetch failure"):
        missing = [f for f in files if not (cache / f.path).is_file()] or files
        return UserError(f"{where}: keras could not download its data ({text}); {offline_hint(missing, cache)}")
    if isinstance(error, ValueError) and "hash does not match" in text:
        return UserError(
            f"{where}: the file keras downloaded failed its sha256 check (a corrupt or changed download); "
            f"run again, or {offline_hint(files, cache)}"
        )
    if isinstance(error, PermissionError):
        return UserError(f"{where}: no permission for keras' cache ({text}); set KERAS_HOME to a writable folder")
    if isinstance(error, OSError) and error.errno in NO_ROOM:
        return None  # run_stage's "no room left" line says what to do
    if isinstance(error, (TimeoutError, ConnectionError, http.client.HTTPException, urllib.error.URLError)):
        # Keras re-raises what urlretrieve raised, having deleted the partial file.
        missing = [f for f in files if not (cache / f.path).is_file()] or files
        return UserError(
            f"{where}: keras' download was cut off ({type(error).__name__}: {text or 'no detail'}); run again "
            f"(keras starts the file again), or {offline_hint(missing, cache)}"
        )
    unreadable = (EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile, tarfile.TarError, pickle.UnpicklingError)
    if isinstance(error, unreadable):
        paths = ", ".join(str(cache / f.path) for f in files)
        return UserError(
            f"{where}: keras could not read its cached files ({type(error).__name__}: {text}); "
            f"delete {paths} and run again to download them anew"
        )
    return None


def offline_hint(files: list[CacheFile], cache: Path) -> str:
    """Which files to put where in keras' cache so that no download is needed."""
    parts = []
    for f in files:
        checksum = f" (sha256 {f.sha256})" if f.sha256 else ""
        downloaded_name = f.origin.rsplit("/", 1)[-1]
        if downloaded_name == Path(f.path).name:
            parts.append(f"{f.origin}{checksum} at {cache / f.path}")
        else:
            parts.append(f"{f.origin}{checksum} at {cache / f.path} (under that name; keras extracts it itself)")
    return "to work offline, put the file from " + "; the file from ".join(parts)
