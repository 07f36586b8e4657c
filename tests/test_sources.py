"""Sources (sklearn, local folder or archive), safe archive extraction, and the fetch stage."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import stat
import tarfile
import uuid
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import archives, sources
from stages.errors import UserError
from stages.fetch import fetch
from stages.sources import LocalOptions, SklearnOptions, get_source

REPO = Path(__file__).resolve().parents[1]


def write_png(path: Path, seed: int, size: int = 8) -> Path:
    """A small grayscale PNG of seeded noise at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def class_folder_dataset(root: Path) -> Path:
    """Two classes with two PNGs each under `root`."""
    for label in ("a", "b"):
        for index in range(2):
            write_png(root / label / f"{index}.png", seed=10 * ord(label) + index)
    return root


def reasons_by_entry(refused: list[dict[str, str]]) -> dict[str, str]:
    """Refused archive entries as {entry: reason}."""
    return {item["entry"]: item["reason"] for item in refused}


def files_under(root: Path) -> set[str]:
    """Every regular file under `root`, as POSIX relative paths."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------------------------
# The registry.


def test_registry_lists_sklearn_and_local():
    """Both built-in source kinds are registered with their options schema."""
    assert {"sklearn", "local"} <= set(sources.REGISTRY)
    assert get_source("sklearn").options is SklearnOptions
    assert get_source("local").options is LocalOptions


def test_unknown_source_kind_lists_the_valid_names():
    """get_source on an unregistered name raises a UserError naming the valid kinds."""
    with pytest.raises(UserError) as caught:
        get_source("nope")

    message = str(caught.value)
    assert "'nope'" in message
    assert "local" in message and "sklearn" in message


# --------------------------------------------------------------------------------------------
# sklearn.


def test_sklearn_digits_are_written_as_1797_pngs_in_10_class_folders(tmp_path):
    """The sklearn source writes every digit as an 8x8 'L' PNG scaled to 0..255, by class."""
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("sklearn").fetch(SklearnOptions(name="digits"), dest, "digits")

    folders = sorted(p.name for p in dest.iterdir())
    assert folders == [str(i) for i in range(10)]
    pngs = sorted(dest.rglob("*.png"))
    assert len(pngs) == 1797
    assert len(files_under(dest)) == 1797
    low, high = 255, 0
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (8, 8) and image.mode == "L"
            pixels = np.asarray(image)
        low, high = min(low, int(pixels.min())), max(high, int(pixels.max()))
    assert (low, high) == (0, 255)

    (archive,) = details["archives"]
    assert archive["name"] == "digits.csv.gz"
    import sklearn

    data_file = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    assert archive["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert archive["bytes"] == data_file.stat().st_size
    assert sklearn.__version__ in details["origin"]


# --------------------------------------------------------------------------------------------
# local.


def test_local_missing_path_names_the_path_and_the_instructions(tmp_path):
    """A local source whose path does not exist says which path and how to get the data."""
    missing = tmp_path / "nowhere" / "data.zip"
    options = LocalOptions(path=str(missing), instructions="Download it from the course page")
    dest = tmp_path / "raw"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        get_source("local").fetch(options, dest, "toy")

    message = str(caught.value)
    assert str(missing) in message
    assert "does not exist; Download it from the course page. Put the dataset" in message
    assert "datasets.toy.source.path" in message
    assert "\n" not in message


@pytest.mark.parametrize("instructions", ["Download it from https://example.org/data.zip", "Download it from ...",
                                          "Ask the course team!"])
def test_local_instructions_are_quoted_whole(tmp_path, instructions):
    """The instructions appear as written, ended by one full stop where they end without one."""
    options = LocalOptions(path=str(tmp_path / "nowhere"), instructions=instructions)

    with pytest.raises(UserError) as caught:
        get_source("local").fetch(options, tmp_path, "toy")

    ended = instructions if instructions.endswith((".", "!")) else instructions + "."
    assert f"does not exist; {ended} Put the dataset folder" in str(caught.value)


def test_local_folder_is_copied_without_its_symlinks(tmp_path):
    """A local folder is copied file for file; symlinks inside are removed and reported as refused."""
    source = class_folder_dataset(tmp_path / "source")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the dataset", encoding="utf-8")
    (source / "a" / "link.png").symlink_to(secret)
    (source / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert files_under(dest) == {"a/0.png", "a/1.png", "b/0.png", "b/1.png"}
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert not (dest / "a" / "link.png").exists() and not (dest / "linked_dir").exists()
    assert reasons_by_entry(details["refused"]) == {"a/link.png": "symbolic link", "linked_dir": "symbolic link"}
    assert (dest / "a" / "0.png").read_bytes() == (source / "a" / "0.png").read_bytes()
    # The source folder itself is left as it was.
    assert (source / "a" / "link.png").is_symlink()


def test_local_folder_refuses_a_fifo_without_blocking_on_it(tmp_path):
    """A FIFO in a class folder would block a reader forever; it is refused and reported, and the
    copy goes on. (Device files take the same branch; making one needs root.)"""
    import os

    source = class_folder_dataset(tmp_path / "source")
    os.mkfifo(source / "a" / "pipe.png")
    dest = tmp_path / "raw"

    details = get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert files_under(dest) == {"a/0.png", "a/1.png", "b/0.png", "b/1.png"}
    assert reasons_by_entry(details["refused"]) == {"a/pipe.png": "device, fifo or other special file"}


def test_local_folder_lists_its_refused_entries_in_name_order(tmp_path):
    """The refused entries (and so validate's fetch:: rows) come in name order, whatever order the
    file system lists the folders in: the same data gives the same manifest on every machine."""
    source = tmp_path / "source"
    for name in ("m", "b", "z", "a", "q", "c"):
        (source / name).mkdir(parents=True)
        (source / name / "link.png").symlink_to(tmp_path)

    details = get_source("local").fetch(LocalOptions(path=str(source)), tmp_path / "raw", "toy")

    entries = [item["entry"] for item in details["refused"]]
    assert entries == sorted(entries) and len(entries) == 6


def test_names_that_are_not_utf8_are_refused_at_fetch_so_dvc_can_record_the_rest(tmp_path):
    """An old folder's Latin-1 names (`caf\xe9.png`, a folder `\xe9t\xe9/`): DVC fails on them at
    the end of the fetch, in a line that names no file. They are refused with what to do, and
    `dvc add` of what was copied succeeds."""
    import subprocess
    import sys

    source = class_folder_dataset(tmp_path / "source")
    shutil.copy(source / "a" / "0.png", os.fsencode(source / "a") + b"/caf\xe9.png")
    os.mkdir(os.fsencode(source / "b") + b"/\xe9t\xe9")
    shutil.copy(source / "b" / "0.png", os.fsencode(source / "b") + b"/\xe9t\xe9/0.png")
    project = tmp_path / "project"
    project.mkdir()
    dest = project / "raw"

    details = get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert files_under(dest) == {"a/0.png", "a/1.png", "b/0.png", "b/1.png"}
    reasons = reasons_by_entry(details["refused"])
    assert sorted(reasons) == [os.fsdecode(b"a/caf\xe9.png"), os.fsdecode(b"b/\xe9t\xe9/0.png")]
    assert set(reasons.values()) == {sources.NOT_UTF8_FILE}
    assert sources.NOT_UTF8_FILE.startswith("unusable name: not UTF-8") and "convmv" in sources.NOT_UTF8_FILE
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    added = subprocess.run([*dvc, "add", "raw"], cwd=project, capture_output=True, text=True)
    assert added.returncode == 0, added.stderr


def test_an_unreadable_folder_of_a_local_source_is_one_line_not_skipped(tmp_path, monkeypatch):
    """A subfolder that cannot be listed (permissions) stops the fetch with its name: os.walk
    would otherwise skip it, and its images would be missing without a word."""
    import os

    source = class_folder_dataset(tmp_path / "source")
    real_scandir = os.scandir

    def scandir(path=".", *rest):
        if Path(path) == source / "b":  # root reads anything, so the refusal is the kernel's answer faked
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *rest)

    monkeypatch.setattr(os, "scandir", scandir)

    with pytest.raises(UserError, match=r"source/b: cannot read this folder of the source \(Permission denied\)"):
        get_source("local").fetch(LocalOptions(path=str(source)), tmp_path / "raw", "toy")


def test_local_non_archive_file_is_refused(tmp_path):
    """A local path that is a plain file, not a folder or archive, is a UserError."""
    plain = tmp_path / "data.csv"
    plain.write_text("a,b\n", encoding="utf-8")
    dest = tmp_path / "raw"
    dest.mkdir()

    with pytest.raises(UserError, match="neither a folder nor a zip/tar archive"):
        get_source("local").fetch(LocalOptions(path=str(plain)), dest, "toy")


def zip_of_folder(folder: Path, archive: Path) -> Path:
    """A zip of every file under `folder`, with paths relative to it."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.rglob("*")):
            handle.write(path, path.relative_to(folder).as_posix())
    return archive


def tar_of_folder(folder: Path, archive: Path) -> Path:
    """A gzipped tar of the folder's contents, with paths relative to it."""
    with tarfile.open(archive, "w:gz") as handle:
        for path in sorted(folder.iterdir()):
            handle.add(path, arcname=path.name)
    return archive


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_local_archive_is_extracted_with_its_checksum(tmp_path, kind):
    """A local zip or tar.gz is extracted into the raw folder and its sha256 recorded."""
    folder = class_folder_dataset(tmp_path / "made")
    archive = tmp_path / f"data.{kind}"
    (zip_of_folder if kind == "zip" else tar_of_folder)(folder, archive)
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("local").fetch(LocalOptions(path=str(archive)), dest, "toy")

    assert files_under(dest) == {"a/0.png", "a/1.png", "b/0.png", "b/1.png"}
    assert (dest / "b" / "1.png").read_bytes() == (folder / "b" / "1.png").read_bytes()
    assert details["refused"] == []
    (record,) = details["archives"]
    assert record["name"] == archive.name
    assert record["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert record["bytes"] == archive.stat().st_size


@pytest.mark.parametrize("form", ["archive", "folder"])
def test_archives_inside_a_local_archive_or_folder_are_unpacked_in_place(tmp_path, form):
    """A local source holding `train.zip` and `test.tar.gz` (a login-only download's parts in
    one folder, or one zip of them): the inner archives are unpacked where they lie, as Kaggle's
    are, refused entries tagged with the inner archive's path (before: copied packed, and
    validate set them aside as 'not an image file', leaving no images)."""
    made = tmp_path / "made"
    (made / "parts").mkdir(parents=True)
    class_folder_dataset(tmp_path / "train" / "train")
    class_folder_dataset(tmp_path / "test" / "test")
    zip_of_folder(tmp_path / "train", made / "parts" / "train.zip")
    tar_of_folder(tmp_path / "test", made / "parts" / "test.tar.gz")
    with zipfile.ZipFile(made / "parts" / "train.zip", "a") as handle:
        handle.writestr("../escape.txt", b"x")
    source = made if form == "folder" else zip_of_folder(made, tmp_path / "data.zip")
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert files_under(dest) == {f"parts/{split}/{label}/{i}.png" for split in ("train", "test") for label in "ab"
                                 for i in range(2)}
    assert details["refused"] == [
        {"archive": "parts/train.zip", "entry": "../escape.txt", "reason": "path outside the dataset folder"}]
    assert (made / "parts" / "train.zip").is_file(), "the source folder is left as it is"


def test_a_damaged_local_archive_says_to_replace_it_not_to_download_it(tmp_path):
    """A local source that is a damaged archive is the user's own file: the line names the key and
    says to replace it (before: '<path>: not a readable archive (...); download it again')."""
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip" * 10)
    dest = tmp_path / "raw"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        get_source("local").fetch(LocalOptions(path=str(bad)), dest, "pets")

    assert str(caught.value) == (f"datasets.pets.source.path: {bad} is not a readable archive (File is not a zip "
                                 "file); replace it with a whole copy, or point the path at one, and run fetch again")


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_a_damaged_archive_inside_a_local_source_is_named_in_it_and_a_fixed_source_fetches(tmp_path, form):
    """A local folder (or archive) whose `parts/train.zip` is damaged: the fetch stops in one line
    naming the inner archive by its path in the source and saying the source holds it so (before:
    '<raw>.partial/parts/train.zip: not a readable archive (...); download it again', naming a
    folder the failed fetch deletes, with advice that gives the same bytes). The earlier raw
    folder is kept, and once the source is fixed the fetch runs through."""
    made = tmp_path / "made"
    (made / "parts").mkdir(parents=True)
    class_folder_dataset(tmp_path / "train" / "train")
    whole = zip_of_folder(tmp_path / "train", tmp_path / "train.zip")
    (made / "parts" / "train.zip").write_bytes(b"this is not a zip" * 10)
    source = made if form == "folder" else zip_of_folder(made, tmp_path / "data.zip")
    params = params_with_local_source(tmp_path, source)
    out = tmp_path / "raw" / "digits"
    out.mkdir(parents=True)
    (out / "earlier.png").write_bytes(b"old")
    provenance = tmp_path / "raw" / "digits.provenance.json"

    with pytest.raises(UserError) as caught:
        fetch("digits", str(params), out, provenance)

    message = str(caught.value)
    assert message.startswith(f"parts/train.zip inside local {form} {source}: not a readable archive "
                              "(File is not a zip file); the source itself holds it damaged"), message
    assert "download it again" not in message and ".partial" not in message and "\n" not in message
    assert files_under(out) == {"earlier.png"} and not out.with_name("digits.partial").exists()

    shutil.copyfile(whole, made / "parts" / "train.zip")
    if form == "archive":
        zip_of_folder(made, source)
    fetch("digits", str(params), out, provenance)
    assert files_under(out) == {f"parts/train/{label}/{i}.png" for label in "ab" for i in range(2)}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_inner_archive_whose_folder_is_a_file_already_there_refuses_those_entries(tmp_path, kind):
    """A folder holding a file `train` (notes, no suffix) beside `train.zip` of `train/a/0.png`
    ...: the inner archive's entries under `train/` are refused with the reason, the file kept,
    the rest extracted; and the reverse, an entry `notes` where the folder has a folder `notes/`.
    Before: the fetch stopped with '<raw>.partial/train.zip: entries clash at <raw>.partial/train/a;
    the archive is malformed', blaming an archive that is fine and naming a folder it deletes."""
    made = tmp_path / "made"
    class_folder_dataset(made / "train")
    (made / "notes.txt").write_bytes(b"inner")
    source = tmp_path / "source"
    (source / "notes.txt").mkdir(parents=True)
    (source / "notes.txt" / "kept.txt").write_bytes(b"folder")
    (source / "train").write_bytes(b"a file")
    (zip_of_folder if kind == "zip" else tar_of_folder)(made, source / f"train.{kind}")
    (source / "other").mkdir()
    (source / "other" / "0.png").write_bytes(b"x")
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert files_under(dest) == {"train", "notes.txt/kept.txt", "other/0.png"}
    assert (dest / "train").read_bytes() == b"a file" and (dest / "notes.txt" / "kept.txt").read_bytes() == b"folder"
    # The folder entries (`train/`, `train/a/`) too: the zip's and the tar's name them.
    reasons = {item["entry"].rstrip("/"): item["reason"] for item in details["refused"]}
    assert {item["archive"] for item in details["refused"]} == {f"train.{kind}"}
    under = ("train", "train/a", "train/b", *(f"train/{label}/{i}.png" for label in "ab" for i in range(2)))
    assert reasons == {
        **{entry: "clashes with the file train, already there: a folder cannot take its name; the file is kept"
           for entry in under},
        "notes.txt": "clashes with the folder notes.txt, already there; the folder is kept",
    }


@pytest.mark.parametrize("form", ["archive", "folder"])
def test_macos_metadata_beside_an_inner_archive_is_kept_as_a_file_not_unpacked(tmp_path, form):
    """A zip made by macOS's Finder holds `__MACOSX/parts/._train.zip` (AppleDouble metadata,
    not a zip) beside `parts/train.zip`; a folder copied from a Mac's FAT drive holds
    `parts/._train.zip`. Hidden files are left as they are (validate sets them aside as hidden
    files, as it does `._x.jpg`). Before: taken for a damaged archive, so the fetch stopped."""
    made = tmp_path / "made"
    (made / "parts").mkdir(parents=True)
    class_folder_dataset(tmp_path / "train" / "train")
    zip_of_folder(tmp_path / "train", made / "parts" / "train.zip")
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)
    hidden = "__MACOSX/parts/._train.zip" if form == "archive" else "parts/._train.zip"
    (made / hidden).parent.mkdir(parents=True, exist_ok=True)
    (made / hidden).write_bytes(apple)
    source = made if form == "folder" else zip_of_folder(made, tmp_path / "data.zip")
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert details["refused"] == []
    assert files_under(dest) == {hidden, *(f"parts/train/{label}/{i}.png" for label in "ab" for i in range(2))}
    assert (dest / hidden).read_bytes() == apple


def torch_zip_checkpoint() -> bytes:
    """What `torch.save` (1.6 and later) writes to `model_best.pth.tar`: a zip of its records."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as handle:
        for record in ("data.pkl", ".format_version", "byteorder", "data/0", "version"):
            handle.writestr(f"model_best.pth/{record}", b"\x80\x02}q\x00." if record == "data.pkl" else b"3\n")
    return buffer.getvalue()


@pytest.mark.parametrize("content", ["pickle", "torch zip"])
def test_a_checkpoint_named_tar_in_a_local_folder_is_kept_as_a_file(tmp_path, content):
    """PyTorch's ImageNet example names its checkpoints `checkpoint.pth.tar` and
    `model_best.pth.tar`: a pickle (torch.save before 1.6) or a zip of records, no tar. Such a
    file is left as it is (validate sets it aside as not an image) and the data is fetched.
    Before: a pickle stopped the fetch as 'not a readable archive ... the source itself holds it
    damaged'; a zip was unpacked into `model_best.pth/data.pkl` ... and the checkpoint deleted."""
    source = class_folder_dataset(tmp_path / "source")
    checkpoint = pickle.dumps({"epoch": 90, "state_dict": {}}, protocol=2) if content == "pickle" \
        else torch_zip_checkpoint()
    (source / "model_best.pth.tar").write_bytes(checkpoint)
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert details["refused"] == []
    assert files_under(dest) == {"model_best.pth.tar", *(f"{label}/{i}.png" for label in "ab" for i in range(2))}
    assert (dest / "model_best.pth.tar").read_bytes() == checkpoint


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_a_damaged_tar_inside_a_local_folder_still_stops_the_fetch(tmp_path, kind):
    """The other side of the rule above: a `.tar` (or `.tar.gz`) that is one, cut short or with
    a changed byte, is damaged data, and stops the fetch in one line naming it."""
    packed = tmp_path / f"train.{kind}"
    with tarfile.open(packed, "w" if kind == "tar" else "w:gz") as handle:
        handle.add(write_png(tmp_path / "made" / "0.png", seed=1, size=64), arcname="train/a/0.png")
    damaged = bytearray(packed.read_bytes())
    if kind == "tar":
        damaged = damaged[:2000]  # inside the image's data
    else:
        damaged[len(damaged) // 2] ^= 0xFF
    source = tmp_path / "source"
    source.mkdir()
    (source / f"train.{kind}").write_bytes(bytes(damaged))
    dest = tmp_path / "raw"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert str(caught.value).startswith(f"train.{kind} inside local folder {source}: not a readable archive ("), \
        str(caught.value)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_archive_cut_short_inside_a_local_folder_is_said_to_be(tmp_path, kind):
    """`parts/train.zip` (or `.tar`) copied only in part, as an interrupted copy leaves it: the
    line says it ends before its end (before: '(File is not a zip file)', which reads as a file
    of another kind, and '(unexpected end of data)' for the tar)."""
    made = tmp_path / "made"
    write_png(made / "train" / "a" / "0.png", seed=1, size=64)
    packed = (zip_of_folder if kind == "zip" else plain_tar_of_folder)(made, tmp_path / f"train.{kind}")
    source = tmp_path / "source"
    (source / "parts").mkdir(parents=True)
    (source / "parts" / f"train.{kind}").write_bytes(packed.read_bytes()[:4000])  # inside the image's data
    dest = tmp_path / "raw"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert str(caught.value).startswith(f"parts/train.{kind} inside local folder {source}: not a readable archive "
                                        f"(ends before the {kind} archive's end); the source itself holds it damaged"), \
        str(caught.value)


@pytest.mark.parametrize("where", ["between members", "inside a header"])
@pytest.mark.parametrize("form", ["folder", "archive"])
def test_a_plain_tar_cut_between_members_stops_the_fetch(tmp_path, where, form):
    """A plain tar cut where its last image's header starts (or inside that header): tarfile
    takes it for a whole tar of the images before. Before: those were extracted and the rest
    dropped without a word (a local folder's `parts/train.tar`, or a local `data.tar`)."""
    made = class_folder_dataset(tmp_path / "made")
    packed = plain_tar_of_folder(made, tmp_path / "train.tar")
    with tarfile.open(packed) as handle:
        last = handle.getmembers()[-1].offset
    cut = packed.read_bytes()[:last + (100 if where == "inside a header" else 0)]
    source = tmp_path / "source"
    (source / "parts").mkdir(parents=True)
    (source / "parts" / "train.tar").write_bytes(cut)
    if form == "archive":
        source = tmp_path / "data.tar"
        source.write_bytes(cut)
    dest = tmp_path / "raw"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    named = (f"parts/train.tar inside local folder {source}:" if form == "folder"
             else f"datasets.toy.source.path: {source} is")
    assert str(caught.value).startswith(f"{named} not a readable archive (ends before the tar archive's end)"), \
        str(caught.value)


def plain_tar_of_folder(folder: Path, archive: Path) -> Path:
    """An uncompressed tar of the folder's contents, with paths relative to it."""
    with tarfile.open(archive, "w") as handle:
        for path in sorted(folder.iterdir()):
            handle.add(path, arcname=path.name)
    return archive


@pytest.mark.parametrize("inner", ["images.zip", "IMAGES.ZIP", "images.tar.gz"])
def test_an_archive_holding_an_archive_of_its_own_name_is_unpacked_not_lost(tmp_path, inner):
    """`images.zip` zipped again as `images.zip` (a host or a user re-packing a download): the
    entry lies where its archive lies. Before: refused as a 'duplicate: an earlier entry has the
    same path, and it is kept', then the archive it was kept for was deleted, so the dataset had
    no images and the refusal said they were kept."""
    folder = class_folder_dataset(tmp_path / "made")
    packed = (zip_of_folder if inner.lower().endswith(".zip") else tar_of_folder)(folder, tmp_path / inner)
    source = tmp_path / "source"
    source.mkdir()
    with zipfile.ZipFile(source / inner, "w") as handle:
        handle.write(packed, inner)
    dest = tmp_path / "raw"
    dest.mkdir()

    details = get_source("local").fetch(LocalOptions(path=str(source)), dest, "toy")

    assert details["refused"] == []
    assert files_under(dest) == {"a/0.png", "a/1.png", "b/0.png", "b/1.png"}


def test_archives_nested_past_the_depth_limit_are_left_packed_and_share_one_budget(tmp_path):
    """Unpacking stops NESTED_DEPTH levels down (a zip quine must not loop), and the bytes of every
    inner archive count against the one limit the outer extraction had, so a nest of archives
    cannot pass it archive by archive."""
    inner = b"\0" * 600
    for level in range(archives.NESTED_DEPTH + 1):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as handle:
            handle.writestr(f"level{level}.zip" if level else "a.bin", inner)
        inner = buffer.getvalue()
    dest = tmp_path / "deep"
    dest.mkdir()
    (dest / "top.zip").write_bytes(inner)

    archives.unpack_nested(dest)

    # top.zip, then NESTED_DEPTH - 1 levels inside it, are unpacked; the next stays packed.
    assert files_under(dest) == {"level1.zip"}

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("one.zip", "two.zip"):
        with zipfile.ZipFile(flat / name, "w") as handle:
            handle.writestr(name + ".bin", b"\0" * 600)
    with pytest.raises(UserError, match="1,000-byte limit"):
        archives.unpack_nested(flat, max_bytes=1000)


def test_the_byte_limit_names_the_inner_archive_in_its_source_and_what_the_earlier_ones_wrote(tmp_path):
    """Inner archives share one byte limit: the line names the one that passed it by its path in
    the source, counts what was extracted before it, and gives advice that helps (before:
    '<raw>.partial/two.zip: expands past the 1,000-byte limit; refusing it (a zip bomb, or free
    some space and run again)': a folder the failed fetch deletes, an archive of 600 bytes said
    to pass 1,000 alone, and free space, which does not move a fixed limit)."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("one.zip", "two.zip"):
        with zipfile.ZipFile(flat / name, "w") as handle:
            handle.writestr(name + ".bin", b"\0" * 600)

    with pytest.raises(UserError) as caught:
        archives.unpack_nested(flat, max_bytes=1000, source="local folder data/parts")

    message = str(caught.value)
    assert message.startswith("two.zip inside local folder data/parts: expands past the 1,000-byte limit with the "
                              "600 bytes extracted before it; refusing it"), message
    assert "free some space" not in message and str(flat) not in message


# --------------------------------------------------------------------------------------------
# Archive safety.


def test_zip_refuses_escaping_paths_and_symlinks_and_keeps_good_entries(tmp_path):
    """A hostile zip writes nothing outside the destination; each refused entry has a reason."""
    absolute = f"/classmatrix-test-{uuid.uuid4().hex}.txt"
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("good/one.txt", b"kept")
        handle.writestr("../evil.txt", b"escaped")
        handle.writestr(absolute, b"absolute")
        handle.writestr("..\\backslash_evil.txt", b"escaped on windows")
        link = zipfile.ZipInfo("good/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        handle.writestr(link, "/etc/passwd")
        handle.writestr("good/sub/two.txt", b"kept too")
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)

    result = archives.extract(archive, dest)

    assert files_under(dest) == {"good/one.txt", "good/sub/two.txt"}
    assert (dest / "good" / "one.txt").read_bytes() == b"kept"
    assert result.files == 2 and result.bytes == len(b"kept") + len(b"kept too")
    assert reasons_by_entry(result.refused) == {
        "../evil.txt": "path outside the dataset folder",
        absolute: "path outside the dataset folder",
        "..\\backslash_evil.txt": "path outside the dataset folder",
        "good/link": "symbolic link",
    }
    assert not (tmp_path / "box" / "evil.txt").exists()
    assert not (tmp_path / "box" / "backslash_evil.txt").exists()
    assert not Path(absolute).exists()
    assert files_under(tmp_path / "box") == {"dest/good/one.txt", "dest/good/sub/two.txt"}


def test_an_archive_entry_repeating_a_path_is_refused_and_the_first_kept(tmp_path):
    """Two entries of one path (`a.png`, `./a.png`, `cat//a.png`) would overwrite each other and
    the lost one would be nowhere on record: each repeat is refused with its reason, zip and tar."""
    zip_path, tar_path = tmp_path / "twice.zip", tmp_path / "twice.tar"
    with zipfile.ZipFile(zip_path, "w") as handle:
        handle.writestr("cat/a.png", b"first")
        handle.writestr("./cat/a.png", b"second")
        handle.writestr("cat/b.png", b"other")
    with tarfile.open(tar_path, "w") as handle:
        for name, data in (("cat/a.png", b"first"), ("cat//a.png", b"second"), ("./cat/a.png", b"third")):
            add_tar_member(handle, name, data=data)

    from_zip = archives.extract(zip_path, tmp_path / "z")
    from_tar = archives.extract(tar_path, tmp_path / "t")

    assert (tmp_path / "z" / "cat" / "a.png").read_bytes() == b"first" == (tmp_path / "t" / "cat" / "a.png").read_bytes()
    assert from_zip.files == 2 and from_tar.files == 1
    assert from_zip.refused == [{"entry": "./cat/a.png", "reason": archives.DUPLICATE}]
    assert from_tar.refused == [{"entry": "cat//a.png", "reason": archives.DUPLICATE},
                                {"entry": "./cat/a.png", "reason": archives.DUPLICATE}]


def test_encrypted_and_deflate64_zip_entries_are_refused_with_what_to_do(tmp_path):
    """zipfile cannot read an encrypted entry or Deflate64 (what Windows writes for large zips):
    each such entry is refused with the reason and the remedy, the rest extracted; before, the
    first of them ended the fetch with a traceback."""
    archive = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("cat/plain.png", b"readable")
        handle.writestr("cat/wide.png", b"pretends to be Deflate64")
        handle.writestr("cat/locked.png", b"pretends to be encrypted")
    data = bytearray(archive.read_bytes())
    # Patch the local and central headers: the method of one entry, the encryption flag of another.
    for name, field, value in ((b"cat/wide.png", "method", 9), (b"cat/locked.png", "flags", 0x1)):
        for signature, name_at, flags_at, method_at in ((b"PK\x03\x04", 30, 6, 8), (b"PK\x01\x02", 46, 8, 10)):
            start = 0
            while (start := data.find(signature, start)) != -1:
                if data[start + name_at : start + name_at + len(name)] == name:
                    at = start + (method_at if field == "method" else flags_at)
                    data[at : at + 2] = (int.from_bytes(data[at : at + 2], "little") | value).to_bytes(2, "little")
                start += 4
    archive.write_bytes(bytes(data))

    result = archives.extract(archive, tmp_path / "out")

    assert files_under(tmp_path / "out") == {"cat/plain.png"}
    reasons = reasons_by_entry(result.refused)
    assert reasons["cat/wide.png"].startswith("compressed with method 9 (Deflate64), which Python cannot read")
    assert reasons["cat/locked.png"].startswith("encrypted (the zip needs a password)")


def add_tar_member(handle: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
                   linkname: str = "") -> None:
    """Add one member of the given type to an open tar."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    handle.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_tar_refuses_escapes_links_and_devices_and_keeps_good_entries(tmp_path):
    """A hostile tar writes nothing outside the destination; each refused entry has a reason."""
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as handle:
        add_tar_member(handle, "good", tarfile.DIRTYPE)
        add_tar_member(handle, "good/one.txt", data=b"kept")
        add_tar_member(handle, "../x", data=b"escaped")
        add_tar_member(handle, "good/../../y", data=b"escaped too")
        add_tar_member(handle, "good/symlink", tarfile.SYMTYPE, linkname="/etc/passwd")
        add_tar_member(handle, "good/hardlink", tarfile.LNKTYPE, linkname="good/one.txt")
        add_tar_member(handle, "good/device", tarfile.CHRTYPE)
        add_tar_member(handle, "good/fifo", tarfile.FIFOTYPE)
        add_tar_member(handle, "good/caf\xe9.png", data=b"a Latin-1 name, as an old tar has")
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)

    result = archives.extract(archive, dest)

    assert files_under(dest) == {"good/one.txt"}
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert result.files == 1 and result.bytes == 4
    reasons = reasons_by_entry(result.refused)
    assert reasons == {
        "../x": "path outside the dataset folder",
        "good/../../y": "path outside the dataset folder",
        "good/symlink": "link",
        "good/hardlink": "link",
        "good/device": "device, fifo or other special file",
        "good/fifo": "device, fifo or other special file",
        os.fsdecode(b"good/caf\xe9.png"): archives.NOT_UTF8_ENTRY,
    }
    assert files_under(tmp_path / "box") == {"dest/good/one.txt"}
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_safe_member_path_normalises_or_refuses():
    """Harmless path noise is normalised; absolute, drive and parent paths are refused."""
    assert str(archives.safe_member_path("a/./b//c.png")) == "a/b/c.png"
    assert str(archives.safe_member_path("a\\b.png")) == "a/b.png"
    assert archives.safe_member_path("/etc/passwd") is None
    assert archives.safe_member_path("C:/windows/x") is None
    assert archives.safe_member_path("a/../../b") is None
    assert archives.safe_member_path("") is None


def test_tar_of_current_folder_refuses_nothing(tmp_path):
    """The '.' entry of a `tar -C folder .` archive is the destination itself, not an escape."""
    folder = class_folder_dataset(tmp_path / "made")
    archive = tmp_path / "dot.tar"
    with tarfile.open(archive, "w") as handle:
        handle.add(folder, arcname=".")
    dest = tmp_path / "dest"
    dest.mkdir()

    result = archives.extract(archive, dest)

    assert files_under(dest) == {"a/0.png", "a/1.png", "b/0.png", "b/1.png"}
    assert result.refused == []


def test_zip_larger_than_the_limit_is_refused(tmp_path):
    """A zip whose content passes max_bytes raises a UserError naming the limit."""
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("a.bin", b"\0" * 600)
        handle.writestr("b.bin", b"\0" * 600)
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        archives.extract(archive, dest, max_bytes=1000)

    assert "1,000-byte limit" in str(caught.value)
    assert not (dest / "b.bin").exists()


def test_tar_larger_than_the_limit_is_refused(tmp_path):
    """A tar whose members pass max_bytes raises a UserError."""
    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w") as handle:
        add_tar_member(handle, "a.bin", data=b"\0" * 600)
        add_tar_member(handle, "b.bin", data=b"\0" * 600)
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(UserError, match="limit"):
        archives.extract(archive, dest, max_bytes=1000)


def corrupt_deflate_zip(archive: Path) -> None:
    """A zip whose central directory is fine but whose compressed data is garbled."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("a/x.txt", b"hello world " * 1000)
    data = bytearray(archive.read_bytes())
    start = 30 + len("a/x.txt")  # local file header, then the compressed stream
    for offset in range(start + 2, start + 20):
        data[offset] ^= 0xFF
    archive.write_bytes(bytes(data))


def test_garbage_zip_is_a_user_error(tmp_path):
    """Bytes that are not a zip at all raise a one-line UserError naming the archive."""
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"this is not a zip file" * 10)

    with pytest.raises(UserError) as caught:
        archives.extract(archive, tmp_path / "dest")

    message = str(caught.value)
    assert str(archive) in message and "not a readable archive" in message
    assert "\n" not in message


def test_truncated_tar_gz_is_a_user_error(tmp_path):
    """A tar.gz cut in half raises a one-line UserError naming the archive."""
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        add_tar_member(handle, "a/x.bin", data=np.random.default_rng(0).bytes(100_000))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        archives.extract(archive, dest)

    message = str(caught.value)
    assert str(archive) in message and "\n" not in message


def test_garbage_tar_gz_is_a_one_line_user_error(tmp_path):
    """Bytes that are not a tar.gz raise a UserError whose message is a single line."""
    archive = tmp_path / "data.tar.gz"
    archive.write_bytes(b"this is not a tarball" * 10)

    with pytest.raises(UserError) as caught:
        archives.extract(archive, tmp_path / "dest")

    assert "\n" not in str(caught.value)


def test_zip_with_corrupt_compressed_data_is_a_user_error(tmp_path):
    """A zip whose compressed stream is garbled raises a UserError, not a zlib traceback."""
    archive = tmp_path / "data.zip"
    corrupt_deflate_zip(archive)
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(UserError):
        archives.extract(archive, dest)


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
@pytest.mark.parametrize("where", ["middle", "end"])
def test_a_damaged_compressed_tar_is_a_one_line_user_error_before_anything_is_written(tmp_path, compression, where):
    """A .tar.gz/.bz2/.xz with one byte changed (a bad disk, a copy gone wrong): images barely
    compress, so a byte in the middle often lands in stored data, where only the stream's CRC at
    its very end can tell, and tarfile stops at the tar's end without reading it. The stream is
    read to its end first: one line naming the archive, and nothing extracted (before: the tar.gz
    extracted a changed image without a word; the .xz and .bz2 raised LZMAError or OSError
    tracebacks)."""
    archive = tmp_path / f"data.tar.{compression}"
    with tarfile.open(archive, f"w:{compression}") as handle:
        for index in range(3):
            add_tar_member(handle, f"cat/{index}.png", data=np.random.default_rng(index).bytes(50_000))
    data = bytearray(archive.read_bytes())
    data[len(data) // 2 if where == "middle" else len(data) - 6] ^= 0xFF
    archive.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(UserError) as caught:
        archives.extract(archive, dest)

    message = str(caught.value)
    assert message.startswith(f"{archive}: not a readable archive (") and "\n" not in message, message
    assert [p for p in dest.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("after", [b"junk\n", b"\0" * 1024, b""])
def test_bytes_after_a_whole_gzip_stream_are_ignored_as_gzip_and_tar_do(tmp_path, after):
    """A .tar.gz with bytes after its stream (a server's trailing newline, padding) extracts, as
    with gzip(1) and tar; Python's gzip module refuses them, so the check read to the stream's end
    (against a changed byte) had made such a file 'not a readable archive'. Two members (gzip's
    concatenation) are read as one stream."""
    folder = class_folder_dataset(tmp_path / "shapes")
    archive = tar_of_folder(folder, tmp_path / "data.tar.gz")
    archive.write_bytes(archive.read_bytes() + after)
    assert archives.stream_fault(archive) is None and archives.cut_short(archive) is None
    dest = tmp_path / "dest"
    archives.extract(archive, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png")) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))

    import gzip

    two = tmp_path / "two.gz"
    two.write_bytes(gzip.compress(b"a" * 100_000) + gzip.compress(b"b" * 10))
    assert archives.stream_fault(two) is None
    two.write_bytes(gzip.compress(b"a" * 100_000) + gzip.compress(b"b" * 10)[:-3])
    assert archives.stream_fault(two) == "ends before the gzip stream's end"


@pytest.mark.parametrize("named, made", [("data.tar.gz", "zip"), ("data.zip", "tar.gz"), ("data.zip", "tar")])
def test_an_archive_named_as_the_other_kind_is_extracted_as_what_it_holds(tmp_path, named, made):
    """A zip saved under a .tar.gz name (or the reverse, or a plain tar as .zip) is what its first
    bytes say; before, it was a long tarfile (or zipfile) error ending 'download it again', which
    would give the same file."""
    folder = class_folder_dataset(tmp_path / "shapes")
    archive = tmp_path / named
    if made == "tar":
        with tarfile.open(archive, "w") as handle:
            for path in sorted(folder.iterdir()):
                handle.add(path, arcname=path.name)
    else:
        (zip_of_folder if made == "zip" else tar_of_folder)(folder, archive)
    dest = tmp_path / "dest"
    archives.extract(archive, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png")) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


# --------------------------------------------------------------------------------------------
# The fetch stage, end to end.


def params_with_local_source(tmp_path: Path, folder: Path) -> Path:
    """The repository's params.yaml with digits read from a local folder, written to tmp_path."""
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")))
    raw["datasets"]["digits"]["source"] = {"kind": "local", "path": str(folder)}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_fetch_fills_the_raw_folder_and_writes_provenance(tmp_path):
    """fetch() copies a local folder into `out`, leaves no .partial, and records provenance."""
    folder = class_folder_dataset(tmp_path / "source")
    (folder / "a" / "link.png").symlink_to(folder / "a" / "0.png")
    params = params_with_local_source(tmp_path, folder)
    out = tmp_path / "data" / "raw" / "digits"
    provenance = tmp_path / "data" / "raw" / "digits.provenance.json"

    record = fetch("digits", str(params), out, provenance)

    assert files_under(out) == {"a/0.png", "a/1.png", "b/0.png", "b/1.png"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits", "digits.provenance.json"]
    assert not out.with_name("digits.partial").exists()
    written = json.loads(provenance.read_text(encoding="utf-8"))
    assert written == record
    assert written["dataset"] == "digits"
    assert written["files"] == 4
    assert written["bytes"] == sum((out / f).stat().st_size for f in files_under(out))
    assert written["source"] == {"kind": "local", "path": str(folder), "instructions": "", "sha256": ""}
    assert written["archives"] == []
    assert written["refused"] == [{"entry": "a/link.png", "reason": "symbolic link"}]
    assert written["origin"] == f"local folder {folder}"


def test_fetch_replaces_an_earlier_output(tmp_path):
    """A second fetch replaces the folder's contents rather than merging with stale files."""
    folder = class_folder_dataset(tmp_path / "source")
    params = params_with_local_source(tmp_path, folder)
    out = tmp_path / "raw" / "digits"
    out.mkdir(parents=True)
    (out / "stale.png").write_bytes(b"old")

    fetch("digits", str(params), out, tmp_path / "raw" / "provenance.json")

    assert files_under(out) == {"a/0.png", "a/1.png", "b/0.png", "b/1.png"}
    assert not out.with_name("digits.partial").exists()
    assert sorted(os.listdir(out.parent)) == ["digits", "provenance.json"]


def test_a_zip_entry_that_expands_to_a_gigabyte_is_refused_before_it_is_written(tmp_path):
    """One GiB of zeros deflates to about a megabyte: refused on its declared ratio, nothing of it
    written, and the archive's real images still extracted."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("a/0.png", b"\x89PNG not really")
        with handle.open("b/huge.png", "w", force_zip64=True) as sink:
            block = b"\0" * (1 << 24)
            for _ in range(64):
                sink.write(block)
    assert archive.stat().st_size < 4 * 1024**2
    dest = tmp_path / "dest"

    result = archives.extract(archive, dest)

    assert files_under(dest) == {"a/0.png"}
    [refused] = result.refused
    assert refused["entry"] == "b/huge.png"
    assert refused["reason"].startswith("expands to 1,073,741,824 bytes from ") and "a zip bomb's ratio" in refused["reason"]


def test_extraction_stops_before_the_disk_is_full(tmp_path, monkeypatch):
    """Whatever the limit, an archive may fill the disk only up to a margin: with 1 GiB + 1,000
    bytes free, 1,200 bytes of entries are refused with a line naming the free space."""
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("a.bin", b"\1" * 600)
        handle.writestr("b.bin", b"\2" * 600)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda path: usage._replace(free=archives.FREE_MARGIN_BYTES + 1000))
    dest = tmp_path / "dest"

    with pytest.raises(UserError) as caught:
        archives.extract(archive, dest)

    assert f"expands past the free space on {mount_point(dest)} (1,000 bytes, keeping 1 GiB free)" in str(caught.value)
    assert not (dest / "b.bin").exists()


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path`, as `df` names it."""
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def test_the_free_space_line_names_the_file_system_not_the_folder_fetch_deletes(tmp_path, monkeypatch):
    """A local folder whose `parts/train.zip` passes the free space: the line names the file
    system to free space on (before: '... expands past the free space on
    <raw>.partial/parts (...)', a folder the failed fetch deletes)."""
    source = tmp_path / "source"
    (source / "parts").mkdir(parents=True)
    with zipfile.ZipFile(source / "parts" / "train.zip", "w") as handle:
        handle.writestr("a/0.bin", b"\1" * 600)
        handle.writestr("b/0.bin", b"\2" * 600)
    params = params_with_local_source(tmp_path, source)
    out = tmp_path / "raw" / "digits"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda path: usage._replace(free=archives.FREE_MARGIN_BYTES + 1000))

    with pytest.raises(UserError) as caught:
        fetch("digits", str(params), out, tmp_path / "raw" / "digits.provenance.json")

    message = str(caught.value)
    assert message.startswith(f"parts/train.zip inside local folder {source}: expands past the free space on "
                              f"{mount_point(out.parent)} (1,000 bytes, keeping 1 GiB free); refusing it: free some "
                              "space there and run again"), message
    assert ".partial" not in message


# --------------------------------------------------------------------------------------------
# What README says about a local folder changed in place, through DVC.


def local_folder_project(tmp_path: Path) -> tuple[Path, Path, dict, dict[str, str]]:
    """A DVC project (this dvc.yaml and stages/) whose dataset toy is a local folder of classes a
    and b: the project, the folder, its params and the environment that finds this venv's dvc."""
    import sys

    from tests.toy import toy_params

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    source = class_folder_dataset(tmp_path / "source")
    params = toy_params(["a", "b"], source={"kind": "local", "path": str(source)})
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    return project, source, params, env


def test_a_local_folder_changed_in_place_is_fetched_again_as_the_readme_says(tmp_path):
    """DVC watches params, not the folder a `local` source names: an image added there leaves the
    pipeline up to date, and `dvc repro -f -s fetch@<dataset>` then `dvc repro` bring it in,
    as README.md says."""
    import subprocess

    project, source, _, env = local_folder_project(tmp_path)

    def dvc(*args: str) -> str:
        result = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def rows() -> int:
        import pandas as pd

        return len(pd.read_parquet(project / "data/interim/toy/manifest.parquet"))

    dvc("init", "--no-scm", "-q")
    dvc("repro", "validate@toy")
    assert rows() == 4

    write_png(source / "a" / "new.png", seed=99)
    assert "up to date" in dvc("status", "validate@toy")  # the limitation README states
    dvc("repro", "-f", "-s", "fetch@toy")
    assert "validate@toy" in dvc("status", "validate@toy")  # its input changed
    dvc("repro", "validate@toy")
    assert rows() == 5
    assert "up to date" in dvc("status", "validate@toy")


def test_a_local_folder_changed_since_its_fetch_is_said_with_what_to_run(tmp_path):
    """DVC cannot watch the folder itself (a `foreach` stage cannot name a path only some datasets
    have, and a missing path fails before fetch can say where to get the data), so fetch records
    the folder's sha256: `python -m stages.fetch --check` names a changed source and the command
    to run, and validate, run again for a params change (the class just added to the folder,
    declared), says its manifest is of the copy fetched before."""
    import subprocess
    import sys

    project, source, params, env = local_folder_project(tmp_path)

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)

    check = (sys.executable, "-m", "stages.fetch", "--check")
    assert run("dvc", "init", "--no-scm", "-q").returncode == 0
    fetched = run("dvc", "repro", "fetch@toy")
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    same = run(*check)
    assert same.returncode == 0, same.stdout + same.stderr
    checksum = json.loads((project / "data/raw/toy.provenance.json").read_text())["folder_sha256"]
    assert same.stdout.strip() == (f"fetch: the local source of toy is as fetched; pin it (datasets.toy.source.sha256: "
                                   f"{checksum}) so that DVC and CI see a new version")

    for index in range(2):
        write_png(source / "c" / f"{index}.png", seed=300 + index)
    params["datasets"]["toy"]["classes"] = ["a", "b", "c"]
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    advice = f"{source} has changed since fetch@toy copied it; run `dvc repro -f -s fetch@toy`"
    changed = run(*check)
    assert changed.returncode == 1 and changed.stdout.strip().startswith(f"fetch@toy: {advice}"), changed.stdout + changed.stderr

    stale = run("dvc", "repro", "validate@toy")  # validate reruns (classes), fetch@ does not
    assert f"validate@toy: note: {advice}" in stale.stdout, stale.stdout + stale.stderr

    refetched = run("dvc", "repro", "-f", "-s", "fetch@toy")
    assert refetched.returncode == 0, refetched.stdout + refetched.stderr
    assert run(*check).returncode == 0


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_changed_since_fetch_sees_a_renamed_image_and_a_replaced_archive(tmp_path, form):
    """The provenance's checksum covers names and contents: an image renamed in the folder, or the
    archive replaced by one with one more image, is a change; the same source fetched again is not."""
    folder = class_folder_dataset(tmp_path / "shapes")
    source = folder if form == "folder" else zip_of_folder(folder, tmp_path / "shapes.zip")
    options = LocalOptions(path=str(source))
    record = json.loads(json.dumps({"source": {"kind": "local", **vars(options)},
                                     **get_source("local").fetch(options, tmp_path / "raw", "toy")}))
    assert sources.changed_since_fetch("toy", options, record) is None

    if form == "folder":
        (folder / "a" / "0.png").rename(folder / "a" / "renamed.png")
    else:
        write_png(folder / "b" / "2.png", seed=7)
        zip_of_folder(folder, source)

    line = sources.changed_since_fetch("toy", options, record)
    assert line and line.startswith(f"{source} has changed since fetch@toy copied it; run `dvc repro -f -s fetch@toy`")
    # What to run next is the suite's report: a bare `dvc repro` would go on to every dataset of
    # params.yaml, the course's Kaggle downloads included.
    assert "then `dvc repro report@<suite>`, for a suite that trains on toy;" in line
    assert "`dvc repro` again" not in line


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_a_pinned_local_source_is_fetched_only_as_the_pinned_version(tmp_path, form):
    """A `sha256` pin makes a new version of a local source a params change, which DVC and CI's
    `plan --changed` see: fetch takes the pinned version, and refuses another before copying
    anything, in one line giving the checksum to pin if it is the one to use."""
    folder = class_folder_dataset(tmp_path / "shapes")
    source = folder if form == "folder" else zip_of_folder(folder, tmp_path / "shapes.zip")
    checksum = sources.local_sha256(source)
    assert checksum == (sources.folder_sha256(folder) if form == "folder" else archives.sha256_file(source))
    pinned = LocalOptions(path=str(source), sha256=checksum.upper())
    record = get_source("local").fetch(pinned, tmp_path / "raw", "toy")
    assert (record.get("folder_sha256") or record["archives"][0]["sha256"]) == checksum

    write_png(folder / "b" / "2.png", seed=7)
    if form == "zip":
        zip_of_folder(folder, source)
    changed = sources.local_sha256(source)
    with pytest.raises(UserError) as error:
        get_source("local").fetch(pinned, tmp_path / "again", "toy")
    assert str(error.value) == (f"datasets.toy.source.sha256: {source} is not the pinned version (its sha256 is "
                                f"{changed}); if it is the version to use, set datasets.toy.source.sha256: {changed}")
    assert not (tmp_path / "again").exists()
    record = json.loads(json.dumps({"source": {"kind": "local", **vars(pinned)}, **record}))
    line = sources.changed_since_fetch("toy", pinned, record)
    assert line and line.endswith(f"set datasets.toy.source.sha256: {changed}, and `dvc repro report@<suite>`, for a "
                                  "suite that trains on toy, fetches it")


def test_a_local_pin_that_is_not_a_sha256_is_refused_when_params_are_read():
    with pytest.raises(UserError, match=r"^datasets\.toy\.source\.sha256: 'abc' is not a sha256 \(64 hexadecimal "):
        sources.check_local(LocalOptions(path="data/external/x.zip", sha256="abc"), "datasets.toy.source")


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_check_gives_the_checksum_to_pin_for_a_local_source_not_yet_fetched(tmp_path, monkeypatch, form):
    """params.yaml says: once you have the file, pin it with the value `python -m stages.fetch
    --check` prints. Before the first fetch there is no provenance to compare with, but the source
    is there, and its checksum is what fetch would record."""
    from stages.fetch import check
    from tests.toy import toy_params

    folder = class_folder_dataset(tmp_path / "shapes")
    source = folder if form == "folder" else zip_of_folder(folder, tmp_path / "shapes.zip")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(toy_params(["a", "b"], source={"kind": "local", "path": str(source)})),
                                          encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert check("params.yaml", []) == [
        f"fetch: toy has not been fetched here (data/raw/toy.provenance.json is missing); to pin its local source: "
        f"datasets.toy.source.sha256: {sources.local_sha256(source)}"
    ]
    # Pinned already: no pin to give; pinned to another version: the one fetch would refuse, said so.
    for pin, tail in ((sources.local_sha256(source), "; its local source is the pinned version"),
                      ("0" * 64, "; its local source is not the pinned version, which fetch refuses: if it is the "
                                 f"version to use, set datasets.toy.source.sha256: {sources.local_sha256(source)}")):
        pinned = toy_params(["a", "b"], source={"kind": "local", "path": str(source), "sha256": pin})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(pinned), encoding="utf-8")
        assert check("params.yaml", []) == [
            f"fetch: toy has not been fetched here (data/raw/toy.provenance.json is missing){tail}"]


def test_check_from_a_sub_folder_reads_the_paths_from_the_repository_root(tmp_path, monkeypatch, capsys):
    """Run from a sub-folder, --check asks for --params; given it (../params.yaml), the provenance
    under data/raw/ and a relative source path are read from the params file's folder, as DVC runs
    fetch@; before, from the sub-folder, a changed source was 'not fetched here', exit status 0."""
    from stages.fetch import main
    from tests.toy import toy_params

    class_folder_dataset(tmp_path / "data/external/shapes")
    params = toy_params(["a", "b"], source={"kind": "local", "path": "data/external/shapes"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    fetch("toy", "params.yaml", Path("data/raw/toy"), Path("data/raw/toy.provenance.json"))
    write_png(tmp_path / "data/external/shapes/a/new.png", seed=5)
    capsys.readouterr()

    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_status:
        main(["--check", "--params", "../params.yaml"])
    assert exit_status.value.code == 1
    assert capsys.readouterr().out.startswith("fetch@toy: data/external/shapes has changed since fetch@toy copied it;")
