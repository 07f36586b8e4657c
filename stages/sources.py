"""Where datasets come from: a registry of source kinds.

Each kind is a function decorated with `@register_source(name, Options)`. It fills an empty
folder with the dataset exactly as obtained (archives safely extracted) and returns what the
provenance record should say about it (versions, checksums, refused archive entries). The options
dataclass is the schema of the `source:` block in params.yaml for that kind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

from stages import archives
from stages.errors import UserError
from stages.registry import Registry


@dataclass(frozen=True)
class SourceKind:
    name: str
    options: type
    fetch: Callable[[Any, Path, str], dict[str, Any]]
    # The checks that need nothing fetched (a Kaggle reference's form, a sha256's, a URL's), given
    # the options and the params key to name (`datasets.<name>.source`). params.yaml runs them as
    # it is read, so `python -m stages.config` finds these mistakes before any download; `fetch`
    # runs them too.
    check: Callable[[Any, str], Any] = lambda options, key: None


REGISTRY: Registry[SourceKind] = Registry("source kind")


def register_source(name: str, options: type, check: Callable[[Any, str], Any] | None = None) -> Callable:
    def decorate(fetch: Callable[[Any, Path, str], dict[str, Any]]) -> Callable:
        kind = SourceKind(name, options, fetch)
        REGISTRY[name] = replace(kind, check=check) if check else kind
        return fetch

    return decorate


def get_source(name: str) -> SourceKind:
    return REGISTRY.lookup(name)


# --------------------------------------------------------------------------------------------
# sklearn: real image datasets shipped inside scikit-learn, for the demo.


@dataclass(frozen=True)
class SklearnOptions:
    name: Literal["digits"] = "digits"


@register_source("sklearn", SklearnOptions)
def fetch_sklearn(options: SklearnOptions, dest: Path, dataset: str) -> dict[str, Any]:
    """Write scikit-learn's digits (1,797 8x8 images) as PNGs, one folder per class.

    The pixels are 0-16 intensities; they are scaled to 0-255 so the files look like any other
    grayscale image and every later stage treats them as such.
    """
    import numpy as np
    import sklearn
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for index, (image, target) in enumerate(zip(pixels, digits.target)):
        folder = dest / str(digits.target_names[target])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png", optimize=False)
    data_file = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    return {
        "origin": f"sklearn.datasets.load_{options.name} (scikit-learn {sklearn.__version__})",
        "version": sklearn.__version__,
        "archives": [
            {"name": data_file.name, "sha256": archives.sha256_file(data_file), "bytes": data_file.stat().st_size}
        ],
    }


# --------------------------------------------------------------------------------------------
# local: a folder or an archive the user already has (datasets behind a login).


@dataclass(frozen=True)
class LocalOptions:
    # A folder or a .zip/.tar(.gz|.bz2|.xz) archive; a relative path is from the working folder,
    # which under `dvc repro` is the repository root.
    path: str
    # Where to get the data, shown when the path is missing.
    instructions: str = ""
    # Optional pin: the archive's sha256 (`sha256sum`), or the folder's as fetch records it
    # (`python -m stages.fetch --check` prints it). DVC watches params, not the source's files:
    # pinned, a new version is a params change that `dvc repro` and CI's `plan --changed` see, and
    # fetch refuses a source that is not the pinned one.
    sha256: str = ""


def check_local(options: LocalOptions, key: str) -> None:
    if not options.path.strip():
        raise UserError(f"{key}.path: empty; give the dataset's folder or archive (a relative path is from the "
                        "repository root)")
    if options.sha256 and not archives.SHA256.fullmatch(options.sha256.strip()):
        raise UserError(f"{key}.sha256: {options.sha256!r} is not a sha256 (64 hexadecimal characters); give the "
                        "one `python -m stages.fetch --check` prints, or leave it out")


def local_sha256(source: Path) -> str:
    """The checksum a `local` source is pinned by: a folder's (folder_sha256) or an archive's."""
    return folder_sha256(source) if source.is_dir() else archives.sha256_file(source)


def check_pin(options: LocalOptions, dataset: str, now: str) -> None:
    pinned = options.sha256.strip().lower()
    if pinned and now != pinned:
        raise UserError(f"datasets.{dataset}.source.sha256: {options.path} is not the pinned version (its sha256 is "
                        f"{now}); if it is the version to use, set datasets.{dataset}.source.sha256: {now}")


@register_source("local", LocalOptions, check=check_local)
def fetch_local(options: LocalOptions, dest: Path, dataset: str) -> dict[str, Any]:
    """Copy a local folder, or safely extract a local archive, into the raw folder; the archives
    either holds are unpacked in place (archives.unpack_nested)."""
    check_local(options, f"datasets.{dataset}.source")
    source = Path(options.path).expanduser()
    if not source.exists():
        text = options.instructions.strip()
        how = f" {text}{'' if text.endswith(('.', '!', '?')) else '.'}" if text else ""
        raise UserError(
            f"datasets.{dataset}.source.path: {source} does not exist;{how} "
            f"Put the dataset folder or archive there, or change the path in params.yaml"
        )
    if not source.is_dir() and not archives.is_archive(source):
        raise UserError(
            f"datasets.{dataset}.source.path: {source} is neither a folder nor a zip/tar archive"
        )
    checksum = local_sha256(source)
    check_pin(options, dataset, checksum)
    if source.is_dir():
        # The folder's sha256 too: DVC does not watch the folder, so `--check` and validate
        # compare it with the folder as it is now (changed_since_fetch).
        # The archives in it are unpacked as those in an archive are: a download behind a login
        # often comes in parts (train.zip, test.zip), which a folder holds together.
        refused = copy_regular_files(source, dest)
        refused += archives.unpack_nested(
            dest, source=f"local folder {options.path}",
            remedy=f"replace it (or the archive in {options.path} it came from) with a whole copy, or move it out of "
                   "the folder, and run fetch again")
        return {"origin": f"local folder {options.path}", "refused": refused, "folder_sha256": checksum}
    try:
        extraction = archives.extract(source, dest)
    except archives.DamagedArchive as error:  # the user's own file: no download to repeat
        raise UserError(f"datasets.{dataset}.source.path: {options.path} is not a readable archive ({error.detail}); "
                        "replace it with a whole copy, or point the path at one, and run fetch again") from None
    refused = extraction.refused + archives.unpack_nested(
        dest, extraction.bytes, source=f"local archive {options.path}",
        remedy=f"re-pack {options.path} with a whole copy of it (or without it), or unpack it yourself and fetch the "
               "folder as a `local` source")
    return {
        "origin": f"local archive {options.path}",
        "archives": [{"name": source.name, "sha256": checksum, "bytes": source.stat().st_size}],
        "refused": refused,
    }


# --------------------------------------------------------------------------------------------
# Sources with more machinery keep it in their own module; their schema and registration are here.


@dataclass(frozen=True)
class KaggleOptions:
    # Exactly one of `dataset` ("owner/slug") and `competition` (the competition's slug).
    dataset: str | None = None
    competition: str | None = None
    # The dataset version to fetch; recorded in the provenance. Competitions have no versions.
    version: int | None = None
    # Only these files of the dataset or competition (default: all of it).
    files: list[str] = field(default_factory=list)


def check_kaggle(options: KaggleOptions, key: str) -> None:
    from stages import kaggle_api

    kaggle_api.check(options, key)


@register_source("kaggle", KaggleOptions, check=check_kaggle)
def fetch_kaggle(options: KaggleOptions, dest: Path, dataset: str) -> dict[str, Any]:
    """A Kaggle dataset or competition, through the `kaggle` package's API."""
    from stages import kaggle_api

    return kaggle_api.fetch(options, dest, dataset)


@dataclass(frozen=True)
class UrlOptions:
    # An HTTP(S) file, usually an archive, and its pinned sha256.
    url: str
    sha256: str
    # Extract a zip/tar archive into the dataset folder (else keep the file as downloaded). An
    # archive is told by its suffix, or by its content when the URL's file name has no suffix or
    # is a server script's (`download.php?id=3`).
    extract: bool = True


def check_url(options: UrlOptions, key: str) -> None:
    from stages import downloads

    downloads.check_url(options, key)


@register_source("url", UrlOptions, check=check_url)
def fetch_url(options: UrlOptions, dest: Path, dataset: str) -> dict[str, Any]:
    """A file from a URL: downloaded with resume, verified against its sha256, extracted safely."""
    from stages import downloads

    return downloads.fetch_url(options, dest, dataset)


@dataclass(frozen=True)
class KerasOptions:
    name: Literal["cifar10", "cifar100", "mnist", "fashion_mnist"]
    # cifar100 only: the 100 fine classes or the 20 coarse superclasses.
    label_mode: Literal["fine", "coarse"] = "fine"


@register_source("keras", KerasOptions)
def fetch_keras(options: KerasOptions, dest: Path, dataset: str) -> dict[str, Any]:
    """A keras.datasets dataset, written out as PNGs in train/ and test/ class folders."""
    from stages import keras_datasets

    return keras_datasets.fetch(options, dest, dataset)


@dataclass(frozen=True)
class OpenImagesOptions:
    # Classes by display name, as in Open Images' class descriptions ("Cat", "Dog", "Horse").
    classes: list[str]
    split: Literal["train", "validation", "test"] = "train"
    # Images per class to sample; a class with fewer gets them all, and a warning.
    per_class: int = 500
    seed: int = 42
    # Leave out images that carry more than one of the chosen classes (single-label data).
    exclusive: bool = True
    # Where the metadata CSVs and the images come from (overridable for mirrors and tests).
    metadata_url: str = "https://storage.googleapis.com/openimages/v7"
    bucket: str = "open-images-dataset"
    # Parallel image downloads.
    workers: int = 16


def check_openimages(options: OpenImagesOptions, key: str) -> None:
    from stages import openimages

    openimages.check(options, key)


@register_source("openimages", OpenImagesOptions, check=check_openimages)
def fetch_openimages(options: OpenImagesOptions, dest: Path, dataset: str) -> dict[str, Any]:
    """A class-balanced sample of Open Images' human-verified image-level labels."""
    from stages import openimages

    return openimages.fetch(options, dest, dataset)


NOT_UTF8_FILE = ("unusable name: not UTF-8 (DVC cannot record it); rename it (convmv -r -f latin1 -t utf8 --notest "
                 "<folder>) and fetch again")


def copy_regular_files(source: Path, dest: Path) -> list[dict[str, str]]:
    """Copy the regular files under `source` into `dest`; return the entries refused."""
    entries, refused = regular_files(source)
    for entry in entries:
        (dest / entry).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / entry, dest / entry)
    dest.mkdir(parents=True, exist_ok=True)
    return refused


def regular_files(source: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The regular files under `source` (POSIX paths relative to it, in walk order) and the
    entries refused. Raw data holds only real files: a link could point anywhere on this machine,
    and reading a device or a FIFO could block or never end. And only UTF-8 names: DVC fails on
    any other, at the end of the fetch, in a line that names no file."""
    entries, refused = [], []

    def unreadable(error: OSError) -> None:
        raise UserError(f"{error.filename}: cannot read this folder of the source ({error.strerror}); "
                        "make it readable, or move it out of the source folder") from None

    for folder, subfolders, files in os.walk(source, followlinks=False, onerror=unreadable):
        here = Path(folder)
        subfolders.sort()  # walked in name order, so the refused entries are listed the same everywhere
        for name in subfolders:
            if (here / name).is_symlink():  # os.walk lists a link to a folder here, never enters it
                refused.append({"entry": (here / name).relative_to(source).as_posix(), "reason": "symbolic link"})
        for name in sorted(files):
            path = here / name
            entry = path.relative_to(source).as_posix()
            mode = path.lstat().st_mode
            if not archives.is_utf8(entry):
                refused.append({"entry": entry, "reason": NOT_UTF8_FILE})
            elif stat.S_ISLNK(mode):
                refused.append({"entry": entry, "reason": "symbolic link"})
            elif not stat.S_ISREG(mode):
                refused.append({"entry": entry, "reason": "device, fifo or other special file"})
            else:
                entries.append(entry)
    return entries, refused


def folder_sha256(source: Path) -> str:
    """One sha256 for what fetch takes from a folder: each regular file's path and content, and
    each entry refused, so a file added, removed, renamed or edited gives another."""
    entries, refused = regular_files(source)
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry}\0{archives.sha256_file(source / entry)}\n".encode("utf-8", "surrogateescape"))
    for item in refused:
        digest.update(f"{item['entry']}\0{item['reason']}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def fetched_with(options: LocalOptions, record: dict[str, Any]) -> bool:
    """Whether fetch's provenance `record` is of a fetch with these `local` source params."""
    return record.get("source") == {"kind": "local", **asdict(options)}


def suite_repro(dataset: str) -> str:
    """The command that fetches `dataset` again, as advice: the suite's report, not a bare `dvc
    repro`, which would go on to every dataset of params.yaml, the course's Kaggle downloads and
    manual steps included."""
    return f"`dvc repro report@<suite>`, for a suite that trains on {dataset},"


def changed_since_fetch(dataset: str, options: Any, record: dict[str, Any]) -> str | None:
    """For a `local` source whose params are those `record` (fetch's provenance) was fetched
    with: a line saying its folder or archive has changed since, and what to run. DVC reruns
    fetch@ for a params change, not for this. None when unchanged, or when it cannot tell: the
    source gone (the raw copy is all there is), a record without the checksum."""
    if not isinstance(options, LocalOptions) or not fetched_with(options, record):
        return None
    source = Path(options.path).expanduser()
    if source.is_dir():
        then, now = record.get("folder_sha256"), lambda: folder_sha256(source)
    elif source.is_file() and len(record.get("archives") or []) == 1:
        then, now = record["archives"][0].get("sha256"), lambda: archives.sha256_file(source)
    else:
        return None
    if then is None or (checksum := now()) == then:
        return None
    suite = suite_repro(dataset)
    if options.sha256:
        return (f"{options.path} has changed since fetch@{dataset} copied it, and is not the pinned version; if it "
                f"is the version to use, set datasets.{dataset}.source.sha256: {checksum}, and {suite} fetches it")
    return (f"{options.path} has changed since fetch@{dataset} copied it; run `dvc repro -f -s fetch@{dataset}` "
            f"(DVC watches the source's params, not its files), then {suite.removesuffix(',')}; or pin it, "
            f"datasets.{dataset}.source.sha256: {checksum}, so that DVC and CI see the next change")
