"""Classify image files with a registered model.

    python -m stages.predict --dataset digits photo.png more/            # the champion
    python -m stages.predict --dataset digits --version 3 photo.png      # a registered version
    python -m stages.predict --dataset digits --run <run id> photo.png   # the model of an MLflow run

Loads the model from the MLflow registry (`models:/<dataset>@<alias>`, champion by default; the
tracking URI is MLFLOW_TRACKING_URI, else the repository's mlflow.db), decodes each image the way
the split stage does (upright, converted to the dataset's channels, resized to its working
resolution) and prints one tab-separated line per file: path, predicted label, confidence. Folders
are searched recursively for images (by suffix; the other files in them are counted and named on
stderr, not classified). A file that cannot be read is reported on stderr with the reason and the
rest are still classified; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages import tracking
from stages.errors import NO_ROOM, UserError, run_stage
from stages.layouts import IMAGE_SUFFIXES, not_an_image

BATCH = 64


@dataclass
class LoadedModel:
    model: Any
    classes: list[str]
    image_size: int
    channels: int
    uri: str


def model_uri(dataset: str, alias: str | None, version: int | None, run_id: str | None) -> str:
    """The registry (or run) URI that names the model to load."""
    if run_id:
        from mlflow.exceptions import MlflowException

        client = tracking.mlflow_client().tracking.MlflowClient()
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            if not tracking.is_gone(error):  # a server that did not answer
                raise
            raise UserError(
                f"cannot load the run {run_id} from {tracking.shown_uri()}: {str(error).strip().splitlines()[0]}; "
                "copy the run's id from the MLflow UI (make ui)"
            ) from None
        # One experiment per dataset: another's run is another dataset's model (its labels, not these).
        experiment = client.get_experiment(run.info.experiment_id).name
        if experiment != dataset:
            raise UserError(
                f"run {run_id} is of the dataset {experiment}, not {dataset}: pass --dataset {experiment}, "
                f"or a run of the {dataset} experiment"
            )
        versions = client.search_model_versions(f"name = '{dataset}' and run_id = '{run_id}'")
        if versions:
            return f"models:/{dataset}/{max(int(v.version) for v in versions)}"
        return f"runs:/{run_id}/model"
    if version is not None:
        return f"models:/{dataset}/{version}"
    return f"models:/{dataset}@{alias or 'champion'}"


def load(uri: str, scratch: Path) -> LoadedModel:
    """Download the MLflow model at `uri` and load its Keras model in safe mode."""
    from mlflow.exceptions import MlflowException

    mlflow = tracking.mlflow_client()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch)))
    except MlflowException as error:
        if tracking.is_unreachable(error) or tracking.refusal(error):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load {uri} from {tracking.shown_uri()}: {first_line}; list the registered models and "
            "aliases in the MLflow UI (make ui), or evaluate and report first (dvc repro)"
        ) from None
    from mlflow.models import Model

    if not (local / "MLmodel").is_file() or not (local / "data" / "model.keras").is_file():
        # A version whose run's artifacts were deleted (`mlflow gc` after a retrain replaced it).
        raise UserError(
            f"cannot load {uri} from {tracking.shown_uri()}: its files are missing from the run's artifacts "
            "(the run was deleted and purged?); choose another version (--version) or evaluate again (dvc repro)"
        )
    metadata = Model.load(str(local / "MLmodel")).metadata or {}
    missing = [key for key in ("classes", "image_size", "channels") if key not in metadata]
    if missing:
        raise UserError(f"{uri}: the model's MLmodel metadata lacks {missing}; it was not logged by evaluate")

    from stages import runtime
    from stages.backbones import load_saved_model

    runtime.import_keras_quietly()
    runtime.keep_tensorflow_out()
    model = load_saved_model(local / "data" / "model.keras", f"predict ({uri})")
    return LoadedModel(model, list(metadata["classes"]), int(metadata["image_size"]), int(metadata["channels"]), uri)


def files_under(folder: Path) -> tuple[list[Path], list[str]]:
    """Every file under `folder`, sorted, links to folders followed (each real folder once, so a
    loop ends); a dangling link too (a git-annex or DVC link whose data is absent): it is tried and
    reported as unreadable, not passed over in silence; a named pipe, socket or device as well, to
    be named as such. And one message per folder that could not be listed (another user's, mode
    700): os.walk would pass over it without a word."""
    found, seen, unlisted = [], set(), []

    def refused(error: OSError) -> None:
        unlisted.append(f"{error.filename}: cannot list this folder ([Errno {error.errno}] {error.strerror}); "
                        "its images were not classified")

    for here, subfolders, names in os.walk(folder, onerror=refused, followlinks=True):
        if (real := os.path.realpath(here)) in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        found += [Path(here) / name for name in names]
    return sorted(found), unlisted


def not_a_file(path: Path) -> str:
    """The message for a named pipe (`<(curl ...)` is one), socket or device: opening a pipe with
    no writer waits for good, and one with a writer is read once, where decoding reads twice."""
    return f"{path}: not a regular file (a named pipe, socket or device), so not read; save what it holds to a file and name that"


def special(path: Path) -> bool:
    return path.exists() and not path.is_file() and not path.is_dir()


def image_files(paths: list[Path]) -> tuple[list[Path], list[str], list[Path]]:
    """The files to classify (named files as given; folders searched for image files, by name as
    validate judges them), each once, one message per path that does not exist or folder with no
    images, and the other files found in the folders (left out: hidden, or not an image suffix)."""
    files, problems, left_out = [], [], []
    for path in paths:
        if path.is_dir():
            found, unlisted = files_under(path)
            problems.extend(unlisted)
            # As validate judges them: by the path within the folder (hidden folders included).
            images = [p for p in found if not not_an_image(p.relative_to(path).as_posix())]
            if not images and not unlisted:
                problems.append(f"{path}: no image files in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
            problems.extend(not_a_file(p) for p in images if special(p))
            files.extend(p for p in images if not special(p))
            left_out.extend(p for p in found if not_an_image(p.relative_to(path).as_posix()))
        elif path.is_file():
            files.append(path)
        elif special(path):
            problems.append(not_a_file(path))
        else:
            problems.append(f"{path}: no such file or folder")
    unique, seen = [], set()
    for file in files:  # a file named and also in a folder given, or in two folders given
        # By its real folder and its own name: two links to one file (a DVC symlink cache's copies
        # of the same bytes) are two images to the user, each with its line.
        if (key := (file.parent.resolve(), file.name)) not in seen:
            seen.add(key)
            unique.append(file)
    return unique, problems, left_out


def left_out_note(left_out: list[Path], shown: int = 3) -> str:
    """One line naming the files of the folders given that were not classified."""
    names = ", ".join(str(p) for p in left_out[:shown]) + (f" and {len(left_out) - shown} more" if len(left_out) > shown else "")
    return (f"predict: left out {len(left_out)} file{'s' if len(left_out) > 1 else ''} of the folders given, not "
            f"images by their name (hidden, or a suffix other than {', '.join(IMAGE_SUFFIXES)}): {names}; name a file to try it anyway")


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """The image as the split stage would store it, or ValueError saying why it cannot be read."""
    from stages.images import check_image, load_image

    check = check_image(path)
    if check.error:
        raise ValueError(check.error)
    return load_image(path, size, channels)


def predict(loaded: LoadedModel, files: list[Path]) -> tuple[list[tuple[Path, str, float]], list[str]]:
    """(path, label, confidence) for each readable file, and one message per unreadable one."""
    results, problems = [], []
    for start in range(0, len(files), BATCH):
        images, kept = [], []
        for path in files[start : start + BATCH]:
            try:
                images.append(decode(path, loaded.image_size, loaded.channels))
                kept.append(path)
            except (OSError, ValueError) as error:
                problems.append(f"{path}: cannot read this image ({error}); skipped")
        if not images:
            continue
        probabilities = np.asarray(loaded.model.predict_on_batch(np.stack(images)), dtype="float64")
        for path, row in zip(kept, probabilities):
            total = row.sum()
            # NaN's argmax is 0: without this the image would be labelled the first class, confidence nan.
            if not (np.isfinite(row).all() and total > 0):
                problems.append(f"{path}: the model's output for this image is not finite (NaN or infinite) or all "
                                f"zero; not classified (the model overflows on it: retrain, or try another version)")
                continue
            row = row / total
            results.append((path, loaded.classes[int(row.argmax())], float(row.max())))
    return results, problems


CONTROL = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def shown(path: Path) -> str:
    """A path for predict's tab-separated line: one holding a tab, newline or carriage return (a
    name a script made) has them written as \\t, \\n, \\r (and its backslashes doubled), as
    `ls --quoting-style=escape` does; else it would break its line into more columns or lines."""
    text = str(path)
    return text.translate(CONTROL) if any(c in text for c in "\t\n\r") else text


def version_number(text: str) -> int:
    """--version's value: a registered version's number, counted from 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a version number (1, 2, ...)")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="the registered model's name: the dataset's key")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", help="a registry alias (default: champion)")
    which.add_argument("--version", type=version_number, help="a registered version number")
    which.add_argument("--run", help="an MLflow run id: that run's registered (or logged) model")
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    files, problems, left_out = image_files(args.paths)
    for problem in problems:  # said first: they stand whether or not the model loads
        print(f"error: {problem}", file=sys.stderr)
    tracking.require_store(f"load the {args.dataset} model")
    with tempfile.TemporaryDirectory(prefix="classmatrix-predict-") as scratch:
        with tracking.unavailable(f"load the {args.dataset} model", "nothing was classified"):
            loaded = load(model_uri(args.dataset, args.alias, args.version, args.run), Path(scratch))
    results, unreadable = predict(loaded, files)
    if hasattr(sys.stdout, "reconfigure"):
        # A name that is not UTF-8 (Latin-1 from a Windows zip) holds its bytes as surrogates, which
        # a UTF-8 locale's stdout refuses: printed as those bytes, as ls and find print it.
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        for path, label, confidence in results:
            print(f"{shown(path)}\t{label}\t{confidence:.4f}")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped early (`predict ... | head`): the rest of the lines go nowhere, as
        # does Python's own flush at exit, which would otherwise fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as error:
        # A full disk under `predict ... > results.tsv`: the file keeps the lines written before,
        # which the stages' "no room" line (nothing half-written left) would deny.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        advice = "make room there and run predict again" if error.errno in NO_ROOM else "run predict again once it can be written"
        raise UserError(
            f"cannot write the results to stdout ([Errno {error.errno}] {error.strerror}): what it goes to holds part "
            f"of them at most; {advice} ({len(results)} of {len(results) + len(unreadable)} files were classified "
            f"with {loaded.uri})"
        ) from None
    for problem in unreadable:
        print(f"error: {problem}", file=sys.stderr)
    missing = f"; {len(problems)} of the paths given, or folders in them, gave no image (named above)" if problems else ""
    if left_out:
        print(left_out_note(left_out), file=sys.stderr)
    print(f"predict: {len(results)} of {len(results) + len(unreadable)} files classified with {loaded.uri}{missing}", file=sys.stderr)
    if problems or unreadable:
        raise SystemExit(1)


if __name__ == "__main__":
    run_stage(main)
