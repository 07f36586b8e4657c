"""A hostile dataset, end to end through the real fetch, validate and split stages.

One zip and one tar, generated here, hold the bad inputs a web or Kaggle dataset can bring
(issue 8): broken and disguised files, unusual image modes, a decompression bomb, names in
unicode with spaces, one image under two labels, a class of one image, and archive entries that
try to escape, link, or expand to a gigabyte. For each: its outcome (accepted and normalised, or
set aside with a reason), the validation outputs naming it, and counts that reconcile:
files in = accepted + set aside. Nothing is written outside the stages' folders.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages.fetch import fetch
from stages.split import split
from stages.validate import validate
from tests.test_expectations import validation_page_words
from tests.toy import toy_params

CLASSES = ["a", "b", "crème brûlée"]


def png(seed: int, mode: str = "RGB", size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def bomb_png(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def hostile_files() -> dict[str, bytes]:
    """Every file of the dataset, by path, and (in EXPECTED) what must become of it."""
    files = {f"{label}/{i}.png": png(100 * k + i) for k, label in enumerate("ab") for i in range(8)}
    whole = encoded(Image.fromarray(np.random.default_rng(7).integers(0, 256, (48, 48, 3), dtype=np.uint8)), "JPEG")
    rotated = Image.new("RGB", (24, 12), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6
    sixteen = io.BytesIO()
    Image.fromarray(np.full((12, 12), 1000, dtype=np.uint16)).save(sixteen, format="PNG")
    files |= {
        "a/truncated.jpg": whole[: len(whole) // 2],
        "a/empty.png": b"",
        "a/disguised.jpg": b"<html>this is a web page saved as a .jpg</html>",
        "b/notes.txt": b"labelled by hand, 2019",
        "a/cmyk.jpg": encoded(Image.new("CMYK", (12, 12), (0, 255, 255, 0)), "JPEG", quality=95),
        "b/sixteen bit.png": sixteen.getvalue(),
        "a/rgba.png": encoded(Image.new("RGBA", (12, 12), (255, 0, 0, 0)), "PNG"),
        "b/palette.png": encoded(Image.new("RGB", (12, 12), (0, 128, 0)).convert("P"), "PNG"),
        "a/rotated.jpg": encoded(rotated, "JPEG", exif=exif, quality=95),
        "b/gray.png": png(5, mode="L"),
        "b/bomb.png": bomb_png(30_000),
        "crème brûlée/photo 1 – été.png": png(9),  # a class of one image, unicode and spaces
        "a/twin.png": png(42),
        "b/twin.png": png(42),  # the same image under two labels
    }
    return files


# What validate must say of each file (a reason's start), and the files it must accept.
SET_ASIDE = {
    "a/truncated.jpg": "undecodable: image file is truncated",
    "a/empty.png": "undecodable: empty file",
    "a/disguised.jpg": "undecodable: cannot identify image file 'disguised.jpg'",
    "b/notes.txt": "not an image file ('.txt')",
    "b/bomb.png": "too large: ",
    "a/twin.png": "ambiguous: the same image appears under labels a, b",
    "b/twin.png": "ambiguous: the same image appears under labels a, b",
}
ACCEPTED_ODD = ["a/cmyk.jpg", "b/sixteen bit.png", "a/rgba.png", "b/palette.png", "a/rotated.jpg", "b/gray.png",
                "crème brûlée/photo 1 – été.png"]


def write_zip(path: Path, files: dict[str, bytes]) -> dict[str, str]:
    """The dataset as a zip, plus entries fetch must refuse; returns {entry: reason start}."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in files.items():
            handle.writestr(f"data/{name}", data)
        handle.writestr("../escaped.png", png(1))
        handle.writestr("/tmp/absolute-escape.png", png(2))
        link = zipfile.ZipInfo("data/a/link.png")
        link.external_attr = (0o120777 << 16)  # a symbolic link to /etc/passwd
        handle.writestr(link, "/etc/passwd")
        with handle.open("data/b/gigabyte.png", "w", force_zip64=True) as sink:
            for _ in range(64):
                sink.write(b"\0" * (1 << 24))
    return {
        "../escaped.png": "path outside the dataset folder",
        "/tmp/absolute-escape.png": "path outside the dataset folder",
        "data/a/link.png": "symbolic link",
        "data/b/gigabyte.png": "expands to 1,073,741,824 bytes",
    }


def write_tar(path: Path, files: dict[str, bytes]) -> dict[str, str]:
    """The dataset as a tar.gz, plus a device, a FIFO, links and an escape."""
    with tarfile.open(path, "w:gz") as handle:
        for name, data in files.items():
            info = tarfile.TarInfo(f"data/{name}")
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
        for name, kind in (("data/a/disk.png", tarfile.CHRTYPE), ("data/a/pipe.png", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.devmajor, info.devminor = 8, 0
            handle.addfile(info)
        for name, kind, target in (("data/b/hard.png", tarfile.LNKTYPE, "data/a/0.png"),
                                   ("data/b/soft.png", tarfile.SYMTYPE, "/etc/shadow")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            handle.addfile(info)
        info = tarfile.TarInfo("../../escaped-from-tar.png")
        data = png(3)
        info.size = len(data)
        handle.addfile(info, io.BytesIO(data))
    return {
        "data/a/disk.png": "device, fifo or other special file",
        "data/a/pipe.png": "device, fifo or other special file",
        "data/b/hard.png": "link",
        "data/b/soft.png": "link",
        "../../escaped-from-tar.png": "path outside the dataset folder",
    }


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_hostile_archive_is_accounted_for_file_by_file(kind: str, tmp_path: Path) -> None:
    work = tmp_path / "project"
    work.mkdir()
    files = hostile_files()
    archive = tmp_path / f"hostile.{'zip' if kind == 'zip' else 'tar.gz'}"
    refused = (write_zip if kind == "zip" else write_tar)(archive, files)
    params = toy_params(
        CLASSES, source={"kind": "local", "path": str(archive)}, layout={"kind": "folders", "root": "data"},
        image_size=16, channels=3, split={"val": 0.2, "test": 0.2, "seed": 1},
        validation={"min_per_class": 1, "max_undecodable_fraction": 0.5},
    )
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    raw, provenance = work / "data/raw/toy", work / "data/raw/toy.provenance.json"

    record = fetch("toy", str(work / "params.yaml"), raw, provenance)
    summary = validate("toy", str(work / "params.yaml"), raw, work / "manifest.parquet", work / "docs",
                       work / "summary.json", provenance)
    counts = split("toy", str(work / "params.yaml"), work / "manifest.parquet", raw, work / "processed")

    # Fetch refused the escapes, links, devices and the bomb, and wrote nothing outside its folder.
    assert {item["entry"]: item["reason"] for item in record["refused"]}.keys() == refused.keys()
    for item in record["refused"]:
        assert item["reason"].startswith(refused[item["entry"]]), item
    assert sorted(p.name for p in tmp_path.iterdir()) == outside_before
    assert not Path("/tmp/absolute-escape.png").exists()
    assert not list(raw.rglob("*gigabyte*")) and not list(raw.rglob("*link*"))
    assert sorted(p.name for p in (work / "data").iterdir()) == ["raw"]
    assert sorted(p.name for p in raw.parent.iterdir()) == ["toy", "toy.provenance.json"]
    assert not list(work.rglob("*escape*"))

    # Every file in the archive is in the manifest: accepted, or set aside with its reason.
    manifest = pd.read_parquet(work / "manifest.parquet")
    # (Paths are relative to the raw folder; the archive keeps the dataset under data/.)
    rows = dict(zip(manifest["path"].str.removeprefix("data/"), zip(manifest["status"], manifest["reason"])))
    assert len(rows) == len(manifest)
    for path, reason in SET_ASIDE.items():
        assert rows[path][0] == "set_aside" and rows[path][1].startswith(reason), (path, rows[path])
    for path in ACCEPTED_ODD:
        assert rows[path] == ("ok", ""), (path, rows[path])
    rotated = manifest[manifest["path"] == "data/a/rotated.jpg"].iloc[0]
    assert (rotated["width"], rotated["height"]) == (12, 24)  # measured upright (stored 24 x 12)
    for entry, reason in refused.items():
        status, text = rows[f"fetch::{entry}"]
        assert status == "set_aside" and text.startswith(f"refused at fetch: {reason}")
    assert set(rows) == set(files) | {f"fetch::{entry}" for entry in refused}
    # ... and the counts reconcile: files in = accepted + set aside.
    assert summary["files"] == len(files) + len(refused) == summary["accepted"] + summary["set_aside"]
    assert summary["refused_at_fetch"] == len(refused)
    assert summary["set_aside"] == len(SET_ASIDE) + len(refused)
    assert json.loads((work / "summary.json").read_text()) == summary
    # The validation outputs name every file set aside, with its reason.
    listed = pd.read_csv(work / "set_aside.csv")
    assert set(listed["path"].str.removeprefix("data/")) == set(SET_ASIDE) | {f"fetch::{entry}" for entry in refused}
    assert (listed["reason"].str.len() > 0).all()
    words = validation_page_words(work / "docs")
    for path, reason in zip(listed["path"], listed["reason"]):
        assert f"{path}: {' '.join(reason.split())}" in words, path  # the Data Docs name it too

    # Split: every accepted image decoded to 16x16x3 uint8; the class of one image is trained on.
    splits = pd.read_parquet(work / "processed" / "splits.parquet")
    splits["path"] = splits["path"].str.removeprefix("data/")
    assert sum(counts.values()) == summary["accepted"] == len(splits)
    assert "crème brûlée" in set(splits.loc[splits["split"] == "train", "label"])
    arrays = {name: np.load(work / "processed" / f"{name}_x.npy", allow_pickle=False) for name in ("train", "val", "test")}
    assert all(a.dtype == np.uint8 and a.shape[1:] == (16, 16, 3) for a in arrays.values())
    position = {(row.split, row.path): i for row in splits.itertuples()
                for i in [int((splits.loc[: row.Index, "split"] == row.split).sum()) - 1]}

    def pixels(path: str) -> np.ndarray:
        [(split_name, index)] = [(s, i) for (s, p), i in position.items() if p == path]
        return arrays[split_name][index].reshape(-1, 3).mean(axis=0)

    red, green, blue = pixels("a/cmyk.jpg")
    assert red > 200 and green < 60 and blue < 60  # CMYK red, as RGB
    assert np.all(pixels("b/sixteen bit.png") == 4)  # 16-bit 1000 of 65535, not stretched to white
    assert np.all(pixels("a/rgba.png") == 255)  # fully transparent: the white background
    r, g, b = pixels("b/palette.png")
    assert g > 100 and r < 30 and b < 30
    r, g, b = pixels("b/gray.png")
    assert r == g == b  # gray spread over three channels
