"""The `keras` source kind, without network: keras' own loaders read files the test puts in its cache.

Keras reads KERAS_HOME once, when it is imported, so the fetches run in one subprocess started with
KERAS_HOME set to a temporary folder. There the test builds exactly the files keras 3.15.1 looks for
(tiny versions of them):

- fashion_mnist: the four `fashion-mnist/*-ubyte.gz` files. Keras checks only that they exist.
- mnist: `mnist.npz`, and cifar100: `cifar-100-python-target_archive` (a tar.gz). Keras checks these
  against pinned sha256s and downloads again on a mismatch, so a tiny stand-in fails the check.
  The subprocess wraps keras' `file_utils.validate_file` so that it compares with the stand-in's
  sha256 where keras would use the real file's pin; everything else (the existence test, the hash
  computation, the extraction, the loader) is keras' own code. One case runs without the wrapper
  to show the check is real: keras rejects the stand-in and tries to download.
- cifar10 is not built: its loader expects exactly 10,000 images in each of 5 training batches.
  cifar100 goes through the same code (get_file with extract=True, cifar.load_batch).

No download can leave the machine: the subprocess replaces keras' `urlretrieve` with one that records
the URL and then requests a local port nothing listens on (a real "connection refused"), or, in the
case that simulates a successful download, copies a prepared file.

The subprocess imports keras once (with its backend, TensorFlow here: about 10 s) for all the cases.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import keras_datasets
from stages.errors import UserError
from stages.keras_datasets import CLASS_NAMES, KERAS_FILES

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 24, 10

SCRIPT = r"""
import json, shutil, sys
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())

from keras.src.utils import file_utils

attempts = []
real_urlretrieve = file_utils.urlretrieve
serving = {}

def urlretrieve(url, filename, *args, **kwargs):
    attempts.append(url)
    if url in serving:
        shutil.copyfile(serving[url], filename)
        return filename, None
    # No network: the same request, sent to a local port nothing listens on.
    return real_urlretrieve(f"http://127.0.0.1:{spec['closed_port']}/", filename, *args, **kwargs)

file_utils.urlretrieve = urlretrieve
real_validate = file_utils.validate_file

stand_ins = dict(spec["stand_in_sha256"])

def validate_file(fpath, file_hash, algorithm="auto", chunk_size=65535):
    # Compare with the stand-in's sha256 where keras would use the real file's pin.
    return real_validate(fpath, stand_ins.get(file_hash, file_hash), algorithm, chunk_size)

from stages import keras_datasets
from stages.errors import UserError
from stages.sources import KerasOptions

results = {}
for case in spec["cases"]:
    file_utils.validate_file = validate_file if case["stand_in_hashes"] else real_validate
    serving = case.get("serve", {})
    stand_ins.update(case.get("stand_in_sha256", {}))
    for path in case.get("remove", []):
        shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
    for target, source in case.get("replace", {}).items():
        shutil.copyfile(target, target + ".kept")
        shutil.copyfile(source, target)
    dest = Path(case["dest"])
    dest.mkdir(parents=True)
    first = len(attempts)
    result = {}
    try:
        result["details"] = keras_datasets.fetch(KerasOptions(**case["options"]), dest, "ds")
    except UserError as error:
        result["error"] = str(error)
    result["attempts"] = attempts[first:]
    result["cache_files_after"] = sorted(
        p.relative_to(spec["cache"]).as_posix() for p in Path(spec["cache"]).rglob("*") if p.is_file()
    )
    results[case["id"]] = result
    for target in case.get("replace", {}):  # the cache as the other cases left it
        shutil.move(target + ".kept", target)
Path(spec["out"]).write_text(json.dumps(results))
"""


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gray_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": np.arange(N_TRAIN, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(N_TEST, dtype=np.uint8) * 3) % 10,
    }


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format keras reads (it skips the 8- or 16-byte header)."""
    if array.ndim == 1:
        header = (2049).to_bytes(4, "big") + len(array).to_bytes(4, "big")
    else:
        header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def cifar100_arrays(seed: int) -> dict[str, dict]:
    """Per split: images (N, 32, 32, 3), fine and coarse labels."""
    rng = np.random.default_rng(seed)
    result = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        result[split] = {
            "images": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "fine": [int(v) for v in rng.integers(0, 100, n)],
            "coarse": [int(v) for v in rng.integers(0, 20, n)],
        }
    return result


class RunsCode:
    """Unpickled without restriction, this calls open(path, "w"): code run by loading data."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def cifar100_archive(path: Path, arrays: dict[str, dict], payload: dict[str, object] | None = None) -> None:
    """A tar.gz laid out like cifar-100-python.tar.gz: pickled dicts with bytes keys, pixels stored
    as rows of 3,072 bytes (all red, then green, then blue). `payload`: split -> an object pickled
    in place of that split's batch."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for split, data in arrays.items():
            batch = {
                b"batch_label": split.encode(),
                b"filenames": [f"{i}.png".encode() for i in range(len(data["fine"]))],
                b"fine_labels": data["fine"],
                b"coarse_labels": data["coarse"],
                b"data": data["images"].transpose(0, 3, 1, 2).reshape(len(data["fine"]), 3072).copy(),
            }
            # Protocol 4: bytes and arrays without the globals keras' restricted unpickler refuses.
            raw = pickle.dumps((payload or {}).get(split, batch), protocol=4)
            info = tarfile.TarInfo(f"cifar-100-python/{split}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory):
    """Build a keras cache in a temporary KERAS_HOME and run every fetch case in one subprocess."""
    root = tmp_path_factory.mktemp("keras")
    home = root / "keras_home"
    cache = home / "datasets"
    (cache / "fashion-mnist").mkdir(parents=True)

    mnist = gray_arrays(seed=1)
    np.savez(cache / "mnist.npz", **mnist)

    fashion = gray_arrays(seed=2)
    for cached, key in zip(KERAS_FILES["fashion_mnist"], ["y_train", "x_train", "y_test", "x_test"]):
        write_idx_gz(cache / cached.path, fashion[key])
    fashion_labels = cache / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    served_labels = root / "served-train-labels.gz"
    served_labels.write_bytes(fashion_labels.read_bytes())

    cifar100 = cifar100_arrays(seed=3)
    cifar100_archive(cache / "cifar-100-python-target_archive", cifar100)

    # The same archive with its train batch a pickle that, unpickled freely, writes a marker file.
    marker = root / "code-ran"
    hostile = root / "hostile-cifar-100.tar.gz"
    cifar100_archive(hostile, cifar100, payload={"train": RunsCode(str(marker))})
    [cifar100_pin] = [f.sha256 for f in KERAS_FILES["cifar100"] if f.sha256]

    pins = {f.sha256: f.path for files in KERAS_FILES.values() for f in files if f.sha256}
    stand_ins = {pin: sha256(cache / path) for pin, path in pins.items() if (cache / path).exists()}
    fashion_origin = KERAS_FILES["fashion_mnist"][0].origin

    def case(name: str, options: dict, stand_in_hashes: bool = True, **extra) -> dict:
        dest = str(root / "out" / name)
        return {"id": name, "options": options, "dest": dest, "stand_in_hashes": stand_in_hashes, **extra}

    spec = {
        "cache": str(cache),
        "closed_port": closed_port(),
        "stand_in_sha256": stand_ins,
        "out": str(root / "results.json"),
        "cases": [
            case("mnist", {"name": "mnist"}),
            # Keras checks no hash for these files: the stand-ins pass as they are.
            case("fashion_mnist", {"name": "fashion_mnist"}, stand_in_hashes=False),
            case("cifar100_fine", {"name": "cifar100", "label_mode": "fine"}),
            case("cifar100_coarse", {"name": "cifar100", "label_mode": "coarse"}),
            # A missing file is downloaded (here: copied by the stand-in for urlretrieve).
            case(
                "fashion_downloaded", {"name": "fashion_mnist"}, stand_in_hashes=False,
                remove=[str(fashion_labels)], serve={fashion_origin: str(served_labels)},
            ),
            # A missing file and no network.
            case("fashion_offline", {"name": "fashion_mnist"}, stand_in_hashes=False, remove=[str(fashion_labels)]),
            # keras' real hash check: the stand-in mnist.npz is not the real file, so keras downloads.
            case("mnist_hash_checked", {"name": "mnist"}, stand_in_hashes=False),
            # Last, as it replaces the cached archive: a CIFAR pickle that would run code.
            case(
                "cifar100_hostile", {"name": "cifar100", "label_mode": "fine"},
                remove=[str(cache / "cifar-100-python-target")],
                replace={str(cache / "cifar-100-python-target_archive"): str(hostile)},
                stand_in_sha256={cifar100_pin: sha256(hostile)},
            ),
        ],
    }
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "KERAS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(spec_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return {"results": results, "cache": cache, "mnist": mnist, "fashion": fashion, "cifar100": cifar100, "root": root,
            "marker": marker}


def read_png(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


def png_files(dest: Path) -> set[str]:
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}


def expected_files(labels_by_split: dict[str, list[int]], names: list[str]) -> set[str]:
    return {
        f"{split}/{names[label]}/{index:05d}.png"
        for split, labels in labels_by_split.items()
        for index, label in enumerate(labels)
    }


# --------------------------------------------------------------------------------------------
# Reading keras' cache without a download.


@pytest.mark.parametrize("dataset, arrays_key", [("mnist", "mnist"), ("fashion_mnist", "fashion")])
def test_grayscale_datasets_come_from_the_cache_as_mode_l_pngs(keras_run, dataset, arrays_key):
    """Files already in keras' cache: no download attempt, `downloaded` False, and every image
    written as an L PNG in train|test/<class>/ with its exact pixels."""
    result = keras_run["results"][dataset]
    arrays = keras_run[arrays_key]
    dest = keras_run["root"] / "out" / dataset
    names = CLASS_NAMES[dataset]

    assert result["attempts"] == []
    details = result["details"]
    assert details["this_run"]["downloaded"] is False
    assert details["this_run"]["keras_cache"] == str(keras_run["cache"])
    assert re.fullmatch(rf"keras\.datasets\.{dataset} \(keras 3\.\d+\.\d+\)", details["origin"])
    assert details["counts"] == {"train": N_TRAIN, "test": N_TEST}
    labels = {"train": arrays["y_train"].tolist(), "test": arrays["y_test"].tolist()}
    assert png_files(dest) == expected_files(labels, names)
    for split in ("train", "test"):
        per_class = {names[c]: labels[split].count(c) for c in sorted(set(labels[split]))}
        assert details["class_counts"][split] == per_class
        for index, label in enumerate(labels[split]):
            mode, pixels = read_png(dest / split / names[label] / f"{index:05d}.png")
            assert mode == "L"
            np.testing.assert_array_equal(pixels, arrays[f"x_{split}"][index])
    cached = {a["name"] for a in details["archives"]}
    assert cached == {f.path for f in KERAS_FILES[dataset]}


@pytest.mark.parametrize("mode", ["fine", "coarse"])
def test_cifar100_comes_from_the_cached_archive_as_rgb_pngs(keras_run, mode):
    """The sha256-checked archive is used as it is (keras extracts it), labels follow label_mode."""
    result = keras_run["results"][f"cifar100_{mode}"]
    dest = keras_run["root"] / "out" / f"cifar100_{mode}"
    names = CLASS_NAMES["cifar100" if mode == "fine" else "cifar100_coarse"]
    arrays = keras_run["cifar100"]

    assert result["attempts"] == []
    details = result["details"]
    assert details["this_run"]["downloaded"] is False and details["label_mode"] == mode
    archive = keras_run["cache"] / "cifar-100-python-target_archive"
    assert details["archives"] == [
        {"name": archive.name, "sha256": sha256(archive), "bytes": archive.stat().st_size}
    ]
    labels = {split: arrays[split][mode] for split in ("train", "test")}
    assert png_files(dest) == expected_files(labels, names)
    for split in ("train", "test"):
        for index, label in enumerate(labels[split]):
            image_mode, pixels = read_png(dest / split / names[label] / f"{index:05d}.png")
            assert image_mode == "RGB"
            np.testing.assert_array_equal(pixels, arrays[split]["images"][index])


def test_the_pngs_are_read_by_the_folders_layout_with_split_folders(keras_run):
    """The written tree is what the `folders` layout with splits train/test expects: nothing set aside."""
    from stages.layouts import FoldersOptions, get_layout

    dest = keras_run["root"] / "out" / "mnist"
    candidates = get_layout("folders").candidates(FoldersOptions(splits={"train": "train", "test": "test"}), dest)

    assert [c for c in candidates if c.reason] == []
    assert sum(c.source_split == "train" for c in candidates) == N_TRAIN
    assert {c.label for c in candidates} <= set(CLASS_NAMES["mnist"])


# --------------------------------------------------------------------------------------------
# Downloads and their failures.


def test_a_missing_cache_file_is_downloaded_and_reported(keras_run):
    """With one fashion-mnist file missing keras fetches that file only, and `downloaded` is True."""
    result = keras_run["results"]["fashion_downloaded"]

    assert result["attempts"] == [KERAS_FILES["fashion_mnist"][0].origin]
    assert result["details"]["this_run"]["downloaded"] is True
    assert result["details"]["counts"] == {"train": N_TRAIN, "test": N_TEST}


def test_a_missing_cache_file_without_network_is_one_line_saying_where_to_put_it(keras_run):
    result = keras_run["results"]["fashion_offline"]
    missing = KERAS_FILES["fashion_mnist"][0]

    message = result["error"]
    assert "\n" not in message
    assert message.startswith("keras.datasets.fashion_mnist: keras could not download its data")
    assert f"to work offline, put the file from {missing.origin} at {keras_run['cache'] / missing.path}" in message
    # Only the missing file is named: the three present ones need nothing.
    assert "train-images-idx3-ubyte.gz" not in message


def test_keras_checks_the_mnist_sha256_and_downloads_on_a_mismatch(keras_run):
    """Without the stand-in hash, keras rejects the stand-in mnist.npz, tries to download it (and
    deletes the file when that fails); the error says which file to put where."""
    result = keras_run["results"]["mnist_hash_checked"]
    mnist = KERAS_FILES["mnist"][0]

    assert result["attempts"] == [mnist.origin]
    assert "mnist.npz" not in result["cache_files_after"]
    message = result["error"]
    assert "\n" not in message
    assert f"put the file from {mnist.origin} (sha256 {mnist.sha256}) at {keras_run['cache'] / 'mnist.npz'}" in message


# --------------------------------------------------------------------------------------------
# In-process checks (no keras import).


def test_importing_the_module_does_not_import_keras():
    code = "import sys, stages.keras_datasets; print(sorted({'keras', 'tensorflow'} & set(sys.modules)))"
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_a_name_keras_lacks_is_refused_before_keras_is_imported_and_keras_comes_in_quietly():
    """A name keras.datasets lacks is one line before Keras (and TensorFlow, ~10 s, with its
    start-up lines) is imported; a good one imports Keras through runtime.import_keras_quietly,
    as train, evaluate and predict do, not bare (the fetch printed abseil's notice and oneDNN's
    and cuda's info lines, twice)."""
    code = (
        "import sys; from types import SimpleNamespace as N; from pathlib import Path\n"
        "from stages import keras_datasets as k, runtime; from stages.errors import UserError\n"
        "try: k.fetch(N(name='nope', label_mode='fine'), Path('unused'), 'd')\n"
        "except UserError as error: print(error)\n"
        "print(sorted({'keras', 'tensorflow'} & set(sys.modules)))\n"
        "runtime.import_keras_quietly = lambda: print('quietly') or sys.exit(0)\n"
        "k.fetch(N(name='mnist', label_mode='fine'), Path('unused'), 'd')\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == [
        "datasets.d.source.name: 'nope' is not one of mnist, fashion_mnist, cifar10, cifar100", "[]", "quietly"]


def test_class_names_are_complete_unique_and_safe_as_folder_names():
    assert {name: len(names) for name, names in CLASS_NAMES.items()} == {
        "cifar10": 10, "cifar100": 100, "cifar100_coarse": 20, "mnist": 10, "fashion_mnist": 10,
    }
    for names in CLASS_NAMES.values():
        assert len(set(names)) == len(names)
        assert all(re.fullmatch(r"[A-Za-z0-9_-]+", name) for name in names)
    assert CLASS_NAMES["cifar10"][:3] == ["airplane", "automobile", "bird"]
    assert CLASS_NAMES["fashion_mnist"][0] == "T-shirt_top" and CLASS_NAMES["fashion_mnist"][9] == "Ankle_boot"
    assert CLASS_NAMES["cifar100"][0] == "apple" and CLASS_NAMES["cifar100"][99] == "worm"
    assert CLASS_NAMES["cifar100_coarse"][9] == "large_man-made_outdoor_things"


def test_the_cache_table_matches_the_installed_keras_loaders():
    """Names, origins and pins in KERAS_FILES appear in keras' loader sources (read, not imported)."""
    spec = importlib.util.find_spec("keras")
    folder = Path(spec.submodule_search_locations[0]) / "src" / "datasets"
    sources = {name: (folder / f"{name}.py").read_text() for name in KERAS_FILES}
    for name, files in KERAS_FILES.items():
        for f in files:
            assert f.origin.rsplit("/", 1)[-1] in sources[name]
            if f.sha256:
                assert f.sha256 in sources[name]
            else:
                assert "file_hash" not in sources[name]
    assert '"cifar-10-batches-py-target"' in sources["cifar10"]
    assert '"cifar-100-python-target"' in sources["cifar100"]


def test_other_loader_errors_are_left_alone_as_bugs(tmp_path):
    assert keras_datasets.keras_error("mnist", RuntimeError("boom"), tmp_path) is None
    mapped = keras_datasets.keras_error("cifar10", EOFError("Compressed file ended"), tmp_path)
    assert isinstance(mapped, UserError)
    assert str(tmp_path / "cifar-10-batches-py-target_archive") in str(mapped)


@pytest.mark.parametrize("error", [TimeoutError("timed out"), ConnectionResetError(104, "Connection reset by peer")])
def test_a_download_cut_off_is_not_called_an_unreadable_cache(tmp_path, error):
    """keras re-raises what urlretrieve raised (having deleted the partial file): a cut-off
    download says to run again, or where to put the file, never to delete cached files."""
    mapped = keras_datasets.keras_error("cifar10", error, tmp_path)

    assert str(mapped).startswith(f"keras.datasets.cifar10: keras' download was cut off ({type(error).__name__}: ")
    assert "run again (keras starts the file again), or to work offline, put the file from" in str(mapped)
    assert "delete" not in str(mapped)


def test_a_full_disk_is_left_to_the_no_room_line(tmp_path):
    import errno

    assert keras_datasets.keras_error("mnist", OSError(errno.ENOSPC, "No space left on device"), tmp_path) is None


def test_a_cifar_pickle_that_would_run_code_is_refused_in_one_line(keras_run):
    """keras reads CIFAR's pickles with a restricted unpickler: the payload's call is refused, its
    code never runs, and the stage says which cached files to delete."""
    result = keras_run["results"]["cifar100_hostile"]
    assert "error" in result, result
    message = result["error"]
    assert message.startswith("keras.datasets.cifar100: keras could not read its cached files (UnpicklingError: ")
    assert "Refusing to deserialize `" in message and "open`" in message and "\n" not in message
    assert not keras_run["marker"].exists()
    # Unrestricted, the same bytes would have run the code: the test's payload is real.
    import io as _io

    with tarfile.open(keras_run["root"] / "hostile-cifar-100.tar.gz") as archive:
        raw = archive.extractfile("cifar-100-python/train").read()
    pickle.load(_io.BytesIO(raw)).close()
    assert keras_run["marker"].exists()
