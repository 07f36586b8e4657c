"""Layouts against miniatures of each course dataset's real on-disk layout, then end to end.

Each miniature reproduces the real folder structure, file names and CSV columns with a few tiny
images of seeded noise (distinct content per image). For each, the layout is run directly (labels,
splits, groups, reasons, every file exactly once), then through `build_manifest` and
`assign_splits` (and, for pixel CSVs, `write_arrays`).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages import layouts
from stages.config import ConfigError, DatasetConfig
from stages.errors import UserError
from stages.split import assign_splits, write_arrays
from stages.validate import COLUMNS, build_manifest
from tests.toy import toy_config

SEED = iter(range(1, 1_000_000))


def write_image(path: Path, size: tuple[int, int] = (10, 8), mode: str = "RGB") -> Path:
    """A small image of seeded noise, distinct from every other one this module writes; the
    format follows the suffix (PNG, JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    shape = (height, width) if mode == "L" else (height, width, 3)
    pixels = np.random.default_rng(next(SEED)).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def config(layout: dict[str, Any], classes: list[str], image_size: int = 8, channels: int = 3) -> DatasetConfig:
    """A DatasetConfig through the real strict params parser."""
    return toy_config(classes, layout=layout, image_size=image_size, channels=channels)


def run_layout(cfg: DatasetConfig, raw: Path) -> dict[str, layouts.Candidate]:
    """The layout's candidates keyed by path, after checking the accounting: every real file
    exactly once, plus extra rows named `<csv>::<row>`, all paths unique."""
    candidates = layouts.get_layout(cfg.layout.kind).candidates(cfg.layout.options, raw)
    paths = [c.path for c in candidates]
    assert len(paths) == len(set(paths)), [p for p, n in Counter(paths).items() if n > 1]
    assert sorted(p for p in paths if "::" not in p) == layouts.all_files(raw)
    return {c.path: c for c in candidates}


def manifest_rows(cfg: DatasetConfig, raw: Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    manifest = build_manifest(raw, cfg)
    assert list(manifest.columns) == COLUMNS
    assert manifest["path"].is_unique
    files = layouts.all_files(raw)
    real = manifest[~manifest["path"].str.contains("::", regex=False)]
    assert sorted(real["path"]) == files
    return manifest, {row["path"]: row for row in manifest.to_dict("records")}


def ok_paths(manifest: pd.DataFrame) -> set[str]:
    return set(manifest.loc[manifest["status"] == "ok", "path"])


# --------------------------------------------------------------------------------------------
# GTSRB: Train/<id>/*.png, Test/*.png, Train.csv and Test.csv naming them, Meta.csv and Meta/.

GTSRB_COLUMNS = ["Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path"]
GTSRB_NAMES = {0: "speed_limit_20", 1: "speed_limit_30", 2: "speed_limit_50"}
GTSRB_LAYOUT = {
    "kind": "csv",
    "files": [{"file": "Train.csv", "split": "train"}, {"file": "Test.csv", "split": "test"}],
    "path_column": "Path",
    "label_column": "ClassId",
    "group_pattern": r"^Train/(?P<group>\d+/\d+_\d+)_",
    "class_map": GTSRB_NAMES,
}


@pytest.fixture
def gtsrb(tmp_path) -> Path:
    raw = tmp_path / "gtsrb"
    train_rows = []
    for class_id in GTSRB_NAMES:
        for track in range(2):
            for frame in range(2):
                rel = f"Train/{class_id}/{class_id:05d}_{track:05d}_{frame:05d}.png"
                write_image(raw / rel, (12, 11))
                train_rows.append([12, 11, 1, 1, 10, 9, class_id, rel])
    test_rows = []
    for index, class_id in enumerate([0, 1, 2, 2]):
        rel = f"Test/{index:05d}.png"
        write_image(raw / rel, (9, 10))
        test_rows.append([9, 10, 1, 1, 8, 9, class_id, rel])
    write_csv(raw / "Train.csv", GTSRB_COLUMNS, train_rows)
    write_csv(raw / "Test.csv", GTSRB_COLUMNS, test_rows)
    write_csv(raw / "Meta.csv", ["Path", "ClassId", "ShapeId", "ColorId", "SignId"],
              [[f"Meta/{i}.png", i, 1, 0, f"3.{i}"] for i in GTSRB_NAMES])
    for class_id in GTSRB_NAMES:
        write_image(raw / "Meta" / f"{class_id}.png", (8, 8))
    # An image in a class folder that Train.csv does not name.
    write_image(raw / "Train" / "1" / "00001_00009_00000.png")
    return raw


def test_gtsrb_csv_layout_reads_train_and_test_csv(gtsrb):
    """Train.csv rows are train, Test.csv rows test, ClassId mapped to names, tracks as groups;
    the CSVs, Meta.csv, Meta/ icons and an unlisted image are each set aside with why."""
    cfg = config(GTSRB_LAYOUT, list(GTSRB_NAMES.values()))
    found = run_layout(cfg, gtsrb)

    image = found["Train/2/00002_00001_00000.png"]
    assert (image.label, image.source_split, image.reason) == ("speed_limit_50", "train", "")
    assert image.group == "2/00002_00001"
    assert found["Test/00003.png"].label == "speed_limit_50"
    assert found["Test/00003.png"].source_split == "test" and found["Test/00003.png"].group is None
    assert found["Train.csv"].reason == found["Test.csv"].reason == "label file (read by the layout)"
    assert found["Meta.csv"].reason == "not an image file ('.csv')"
    assert found["Meta/0.png"].reason == "not listed in Train.csv or Test.csv"
    assert found["Train/1/00001_00009_00000.png"].reason == "not listed in Train.csv or Test.csv"
    used = [c for c in found.values() if not c.reason]
    assert len(used) == 12 + 4
    assert Counter(c.source_split for c in used) == {"train": 12, "test": 4}
    assert all(c.pixels is None for c in found.values())


def test_gtsrb_manifest_keeps_test_and_tracks_together(gtsrb):
    """End to end: 16 images ok, Test.csv rows in test, and each track in a single split."""
    cfg = config(GTSRB_LAYOUT, list(GTSRB_NAMES.values()))
    manifest, rows = manifest_rows(cfg, gtsrb)

    assert len(manifest) == len(layouts.all_files(gtsrb))  # no extra rows: nothing missing
    assert len(ok_paths(manifest)) == 16
    assert rows["Meta/1.png"]["status"] == "set_aside"
    assert rows["Meta/1.png"]["reason"] == "not listed in Train.csv or Test.csv"
    assert rows["Train/0/00000_00000_00001.png"]["width"] == 12
    assert rows["Train/0/00000_00000_00001.png"]["height"] == 11
    split = assign_splits(manifest, cfg.split)
    assert set(split.loc[split["path"].str.startswith("Test/"), "split"]) == {"test"}
    assert set(split.loc[split["path"].str.startswith("Train/"), "split"]) <= {"train", "val"}
    per_track = split[split["group"].notna()].groupby("group")["split"].nunique()
    assert len(per_track) == 6 and (per_track == 1).all()


# --------------------------------------------------------------------------------------------
# HAM10000: two image part folders, HAM10000_metadata.csv with lesion_id, image_id, dx.

HAM_NAMES = {"nv": "melanocytic_nevus", "mel": "melanoma", "bkl": "benign_keratosis"}
HAM_LAYOUT = {
    "kind": "csv",
    "file": "HAM10000_metadata.csv",
    "path_template": "{image_id}.jpg",
    "search": ["HAM10000_images_part_1", "HAM10000_images_part_2"],
    "label_column": "dx",
    "group_column": "lesion_id",
    "class_map": HAM_NAMES,
}


@pytest.fixture
def ham10000(tmp_path) -> Path:
    raw = tmp_path / "ham10000"
    rows = []
    lesions = [("HAM_0000118", "bkl", 2), ("HAM_0002730", "bkl", 1), ("HAM_0001466", "nv", 3),
               ("HAM_0002761", "mel", 2), ("HAM_0005132", "nv", 1), ("HAM_0001396", "mel", 1)]
    number = 27419
    for lesion, dx, images in lesions:
        for _ in range(images):
            image_id = f"ISIC_{number:07d}"
            # The two part folders split the images by number, not by lesion.
            part = 1 if number % 2 else 2
            write_image(raw / f"HAM10000_images_part_{part}" / f"{image_id}.jpg", (12, 9))
            rows.append([lesion, image_id, dx, "histo", 80.0, "male", "scalp"])
            number += 1
    # A row listed twice, the same in both: the second is an extra row set aside.
    rows.append(rows[0])
    write_csv(raw / "HAM10000_metadata.csv",
              ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], rows)
    write_csv(raw / "hmnist_8_8_L.csv", [f"pixel{i:04d}" for i in range(64)] + ["label"], [[0] * 64 + [2]])
    return raw


def test_ham10000_csv_layout_finds_images_in_either_part_and_groups_by_lesion(ham10000):
    cfg = config(HAM_LAYOUT, list(HAM_NAMES.values()))
    found = run_layout(cfg, ham10000)

    first = found["HAM10000_images_part_2/ISIC_0027420.jpg"]
    assert (first.label, first.group, first.source_split, first.reason) == ("benign_keratosis", "HAM_0000118", None, "")
    second = found["HAM10000_images_part_1/ISIC_0027419.jpg"]
    assert (second.label, second.group) == ("benign_keratosis", "HAM_0000118")
    assert found["HAM10000_images_part_1/ISIC_0027421.jpg"].group == "HAM_0002730"
    assert found["hmnist_8_8_L.csv"].reason == "not an image file ('.csv')"
    assert found["HAM10000_metadata.csv"].reason == "label file (read by the layout)"
    duplicate = found["HAM10000_metadata.csv::12"]
    assert duplicate.reason == (
        "duplicate row: HAM10000_images_part_1/ISIC_0027419.jpg is already listed in HAM10000_metadata.csv row 2"
    )
    assert Counter(c.label for c in found.values() if not c.reason) == {
        "melanocytic_nevus": 4, "melanoma": 3, "benign_keratosis": 3,
    }


def test_ham10000_manifest_keeps_each_lesion_in_one_split(ham10000):
    cfg = config(HAM_LAYOUT, list(HAM_NAMES.values()))
    manifest, rows = manifest_rows(cfg, ham10000)

    # One extra row beyond the files: the duplicate CSV row, recorded and set aside.
    assert len(manifest) == len(layouts.all_files(ham10000)) + 1
    extra = rows["HAM10000_metadata.csv::12"]
    assert extra["status"] == "set_aside" and extra["reason"].startswith("duplicate row: ")
    assert extra["bytes"] == 0 and pd.isna(extra["width"])
    assert len(ok_paths(manifest)) == 10
    split = assign_splits(manifest, cfg.split)
    assert split.groupby("group")["split"].nunique().max() == 1
    assert set(split["group"]) == {
        "HAM_0000118", "HAM_0002730", "HAM_0001466", "HAM_0002761", "HAM_0005132", "HAM_0001396",
    }


# --------------------------------------------------------------------------------------------
# covid-chest-xray: images/ + metadata.csv with finding and filename; some rows name files that
# are not there, some are CT scans.

COVID_LAYOUT = {
    "kind": "csv",
    "file": "metadata.csv",
    "path_column": "filename",
    "search": ["images"],
    "label_column": "finding",
    "group_column": "patientid",
    "filter": {"modality": ["X-ray"]},
    "class_map": {"COVID-19": "covid19", "No Finding": "normal", "Streptococcus": "bacterial"},
}


@pytest.fixture
def covid19(tmp_path) -> Path:
    raw = tmp_path / "covid19"
    header = ["patientid", "offset", "sex", "age", "finding", "survival", "view", "modality", "date",
              "location", "filename", "doi", "url", "license", "clinical notes", "other notes"]
    rows = []
    vietnam = "2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"
    entries = [
        ("2", "COVID-19", "PA", "X-ray", f"auntminnie-a-{vietnam}", True),
        ("2", "COVID-19", "PA", "X-ray", f"auntminnie-b-{vietnam}", True),
        ("4", "COVID-19", "PA", "X-ray", "lancet-case2a.jpg", False),  # listed, not downloaded
        ("5", "Streptococcus", "PA", "X-ray", "streptococcus-pneumoniae-pneumonia-1.jpg", True),
        ("6", "SARS", "AP", "X-ray", "SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg", True),
        ("7", "No Finding", "PA", "X-ray", "nejmc2001573_f1a.jpeg", True),
        ("7", "No Finding", "PA", "X-ray", "nejmc2001573_f1b.jpeg", True),
        ("8", "COVID-19", "Axial", "CT", "covid-19-pneumonia-ct-1.png", True),
        ("9", "COVID-19", "Axial", "CT", "ct-scan-never-downloaded.png", False),
    ]
    for patient, finding, view, modality, filename, present in entries:
        if present:
            write_image(raw / "images" / filename, (14, 12), mode="L")
        rows.append([patient, 0, "M", 65, finding, "", view, modality, "2020", "", filename, "", "", "", "", ""])
    write_csv(raw / "metadata.csv", header, rows)
    write_image(raw / "images" / "not-in-metadata.jpg", (14, 12), mode="L")
    (raw / "README.md").write_text("COVID-19 image data collection", encoding="utf-8")
    return raw


def test_covid19_csv_layout_reports_missing_files_and_filtered_rows(covid19):
    cfg = config(COVID_LAYOUT, ["covid19", "normal", "bacterial"])
    found = run_layout(cfg, covid19)

    image = found["images/nejmc2001573_f1b.jpeg"]
    assert (image.label, image.group, image.reason) == ("normal", "7", "")
    missing = found["metadata.csv::4"]
    assert missing.reason == "missing: listed in metadata.csv row 4 but not found (looked for images/lancet-case2a.jpg)"
    assert (missing.label, missing.group) == ("covid19", "4")
    assert found["images/covid-19-pneumonia-ct-1.png"].reason == (
        "filtered out: metadata.csv row 9 has modality 'CT', not one of layout.filter.modality"
    )
    # A filtered-out row naming a missing file is not part of the dataset: no row for it.
    assert "metadata.csv::10" not in found
    # A raw label the class map does not name stays as it is.
    assert found["images/SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg"].label == "SARS"
    assert found["images/not-in-metadata.jpg"].reason == "not listed in metadata.csv"
    assert found["README.md"].reason == "not an image file ('.md')"


def test_covid19_manifest_records_the_missing_file_as_an_extra_row(covid19):
    cfg = config(COVID_LAYOUT, ["covid19", "normal", "bacterial"])
    manifest, rows = manifest_rows(cfg, covid19)

    files = layouts.all_files(covid19)
    assert len(manifest) == len(files) + 1
    missing = rows["metadata.csv::4"]
    assert missing["status"] == "set_aside" and missing["reason"].startswith("missing: listed in metadata.csv row 4")
    assert missing["bytes"] == 0 and pd.isna(missing["width"]) and missing["mode"] is None
    assert rows["images/SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg"]["reason"] == (
        "label 'SARS' is not among the declared classes"
    )
    assert ok_paths(manifest) == {
        "images/auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg",
        "images/auntminnie-b-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg",
        "images/streptococcus-pneumoniae-pneumonia-1.jpg",
        "images/nejmc2001573_f1a.jpeg",
        "images/nejmc2001573_f1b.jpeg",
    }
    # Files in = accepted + set aside over the real files; the missing row is extra.
    real = manifest[manifest["path"].isin(files)]
    assert len(real) == (real["status"] == "ok").sum() + (real["status"] == "set_aside").sum() == len(files)
    split = assign_splits(manifest, cfg.split)
    assert split.groupby("group")["split"].nunique().max() == 1


# --------------------------------------------------------------------------------------------
# AICUP mango: C1-P1_Train/ and C1-P1_Dev/ with train.csv and dev.csv (image_id,label).

MANGO_LAYOUT = {
    "kind": "csv",
    "files": [
        {"file": "train.csv", "split": "train", "search": ["C1-P1_Train"]},
        {"file": "dev.csv", "split": "test", "search": ["C1-P1_Dev"]},
    ],
    "path_column": "image_id",
    "label_column": "label",
}


@pytest.fixture
def mango(tmp_path) -> Path:
    raw = tmp_path / "mango"
    train = [(f"{n:05d}.jpg", grade) for n, grade in zip(range(2, 11), "ABCABCABC")]
    dev = [(f"{n:05d}.jpg", grade) for n, grade in zip(range(11, 14), "ABC")]
    for name, _ in train:
        write_image(raw / "C1-P1_Train" / name, (16, 12))
    for name, _ in dev:
        write_image(raw / "C1-P1_Dev" / name, (16, 12))
    # The same file name in both folders: each CSV looks only in its own folder.
    write_image(raw / "C1-P1_Dev" / "00002.jpg", (16, 12))
    dev.append(("00002.jpg", "B"))
    write_csv(raw / "train.csv", ["image_id", "label"], train)
    write_csv(raw / "dev.csv", ["image_id", "label"], dev)
    return raw


def test_mango_csv_layout_reads_each_csv_in_its_own_folder(mango):
    cfg = config(MANGO_LAYOUT, ["A", "B", "C"])
    found = run_layout(cfg, mango)

    assert (found["C1-P1_Train/00002.jpg"].label, found["C1-P1_Train/00002.jpg"].source_split) == ("A", "train")
    assert (found["C1-P1_Dev/00002.jpg"].label, found["C1-P1_Dev/00002.jpg"].source_split) == ("B", "test")
    assert (found["C1-P1_Dev/00013.jpg"].label, found["C1-P1_Dev/00013.jpg"].source_split) == ("C", "test")
    assert found["train.csv"].reason == found["dev.csv"].reason == "label file (read by the layout)"
    assert not any(c.reason for c in found.values() if c.path.endswith(".jpg"))


def test_mango_manifest_honours_the_dev_split(mango):
    cfg = config(MANGO_LAYOUT, ["A", "B", "C"])
    manifest, _ = manifest_rows(cfg, mango)

    assert len(ok_paths(manifest)) == 13
    split = assign_splits(manifest, cfg.split)
    assert set(split.loc[split["path"].str.startswith("C1-P1_Dev/"), "split"]) == {"test"}
    assert set(split.loc[split["path"].str.startswith("C1-P1_Train/"), "split"]) <= {"train", "val"}


# --------------------------------------------------------------------------------------------
# csv: rows naming one file several times, split columns, and user errors.


def test_rows_naming_one_file_under_two_labels_are_all_ambiguous(tmp_path):
    raw = tmp_path / "raw"
    for name in ("a.png", "b.png", "c.png"):
        write_image(raw / "img" / name)
    write_csv(raw / "labels.csv", ["file", "label", "fold"],
              [["a.png", "cat", "train"], ["b.png", "dog", "test"], ["a.png", "dog", "train"],
               ["c.png", "cat", "holdout"], ["", "cat", "train"]])
    layout = {"kind": "csv", "file": "labels.csv", "path_column": "file", "search": ["img"],
              "label_column": "label", "split_column": "fold"}
    cfg = config(layout, ["cat", "dog"])
    found = run_layout(cfg, raw)

    ambiguous = "ambiguous: img/a.png is listed under labels cat, dog (labels.csv row 2, labels.csv row 4)"
    assert found["img/a.png"].reason == found["labels.csv::4"].reason == ambiguous
    assert (found["img/b.png"].label, found["img/b.png"].source_split, found["img/b.png"].reason) == ("dog", "test", "")
    assert found["img/c.png"].reason.startswith("unknown split: fold 'holdout' is not in the splits")
    assert found["labels.csv::6"].reason == "no file: labels.csv row 6 has an empty column 'file'"

    manifest, rows = manifest_rows(cfg, raw)
    assert ok_paths(manifest) == {"img/b.png"}
    assert rows["img/a.png"]["reason"] == ambiguous and rows["labels.csv::4"]["status"] == "set_aside"


def test_csv_split_map_maps_raw_split_values(tmp_path):
    raw = tmp_path / "raw"
    rows = []
    for index, usage in enumerate(["Training", "PublicTest", "PrivateTest"]):
        write_image(raw / f"{index}.png")
        rows.append([f"{index}.png", "x", usage])
    write_csv(raw / "list.csv", ["name", "y", "Usage"], rows)
    layout = {"kind": "csv", "file": "list.csv", "path_column": "name", "label_column": "y", "split_column": "Usage",
              "split_map": {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}}
    found = run_layout(config(layout, ["x"]), raw)

    assert [found[f"{i}.png"].source_split for i in range(3)] == ["train", "val", "test"]


def test_csv_paths_are_relative_to_the_csv_folder_and_its_search_folders(tmp_path):
    """A CSV in a subfolder names files relative to its own folder; search folders are tried in
    order; a file the CSV names that is not an image is set aside as such."""
    raw = tmp_path / "raw"
    write_image(raw / "covid-chest-xray" / "images" / "a.png")
    write_image(raw / "covid-chest-xray" / "more" / "b.png")
    (raw / "covid-chest-xray" / "volumes").mkdir()
    (raw / "covid-chest-xray" / "volumes" / "c.nii.gz").write_bytes(b"\x1f\x8b")
    write_csv(raw / "covid-chest-xray" / "metadata.csv", ["filename", "finding"],
              [["a.png", "x"], ["b.png", "x"], ["../volumes/c.nii.gz", "x"]])
    layout = {"kind": "csv", "file": "covid-chest-xray/metadata.csv", "path_column": "filename",
              "search": ["images", "more"], "label_column": "finding"}
    found = run_layout(config(layout, ["x"]), raw)

    assert found["covid-chest-xray/images/a.png"].reason == ""
    assert found["covid-chest-xray/more/b.png"].reason == ""
    assert found["covid-chest-xray/volumes/c.nii.gz"].reason == "not an image file ('.gz')"
    assert found["covid-chest-xray/volumes/c.nii.gz"].label == "x"


def test_csv_with_a_delimiter_ending_each_line_reads_its_columns_in_place(tmp_path):
    """`a.png,dog,` (a trailing comma on every line, as some exports write): the columns stay in
    place. Before, pandas took the first column for the row index and every label was shifted."""
    raw = tmp_path / "raw"
    for name in ("0.png", "1.png"):
        write_image(raw / name)
    (raw / "labels.csv").write_text("file,label\n0.png,dog,\n1.png,cat,\n", encoding="utf-8")
    layout = {"kind": "csv", "file": "labels.csv", "path_column": "file", "label_column": "label"}

    found = run_layout(config(layout, ["cat", "dog"]), raw)

    assert (found["0.png"].label, found["1.png"].label) == ("dog", "cat")
    assert found["0.png"].reason == found["1.png"].reason == ""


def test_csv_line_with_more_fields_than_the_header_is_one_line_naming_it(tmp_path):
    """An unquoted comma inside a field shifts that row's columns; pandas would drop the extra
    field with a warning. It is one line naming the file and the row instead."""
    raw = tmp_path / "raw"
    write_image(raw / "0.png")
    layout = {"kind": "csv", "file": "labels.csv", "path_column": "file", "label_column": "label"}
    # The long line first (pandas warns and drops a field), or later (pandas fails to tokenize).
    for text, row in (("file,label\nimg,2.png,cat\n0.png,dog\n", 2), ("file,label\n0.png,dog\nimg,2.png,cat\n", 3)):
        (raw / "labels.csv").write_text(text, encoding="utf-8")

        with pytest.raises(UserError) as caught:
            run_layout(config(layout, ["cat", "dog"]), raw)

        assert str(caught.value) == (
            f"{raw / 'labels.csv'}: row {row} has 3 fields, the header 2 (a comma inside an unquoted field?); "
            "quote that field or fix the line, then fetch again"
        )


def test_a_long_row_below_blank_lines_and_a_quoted_line_break_is_named_by_row_and_line(tmp_path):
    """Rows are named as a spreadsheet numbers them, as in every other message; where a quoted
    cell holding a line break sits above, the line a text editor shows differs, so it is named
    too: the line where the long row starts."""
    raw = tmp_path / "raw"
    write_image(raw / "0.png")
    (raw / "labels.csv").write_text('file,label\r\n\r\n"0\r\n.png",dog\r\n"img,2\r\n.png",cat,x\r\n', encoding="utf-8")
    layout = {"kind": "csv", "file": "labels.csv", "path_column": "file", "label_column": "label"}

    with pytest.raises(UserError) as caught:
        run_layout(config(layout, ["cat", "dog"]), raw)

    assert str(caught.value) == (
        f"{raw / 'labels.csv'}: row 4 (line 5) has 3 fields, the header 2 (a comma inside an unquoted field?); "
        "quote that field or fix the line, then fetch again"
    )


# The rows below as a spreadsheet shows them: a blank line and a line of spaces are rows there,
# and a quoted cell holding a line break is one row (4, over lines 4 and 5 of the file).
BLANK_LINES_CSV = [
    "file,label,notes",  # row 1
    "a.png,cat,",  # row 2
    "",  # row 3
    'b.png,dog,"two',  # row 4
    'lines"',
    "   ",  # row 5
    "gone.png,cat,",  # row 6
    "a.png,cat,",  # row 7
    ",cat,",  # row 8
]


@pytest.mark.parametrize("newline, bom", [("\n", ""), ("\r\n", ""), ("\r\n", "\ufeff")], ids=["lf", "crlf", "bom-crlf"])
def test_csv_rows_are_numbered_as_a_spreadsheet_shows_them_blank_lines_included(tmp_path, newline, bom):
    """Blank lines are skipped by the CSV reader but are rows in a spreadsheet (and lines in an
    editor): a message and a `<csv>::<row>` path name the row the user sees. Before, every row
    below a blank line was named one too high per blank line above it."""
    raw = tmp_path / "raw"
    for name in ("a.png", "b.png"):
        write_image(raw / name)
    (raw / "labels.csv").write_bytes((bom + newline.join(BLANK_LINES_CSV) + newline).encode("utf-8"))
    layout = {"kind": "csv", "file": "labels.csv", "path_column": "file", "label_column": "label"}
    found = run_layout(config(layout, ["cat", "dog"]), raw)

    assert (found["a.png"].label, found["b.png"].label) == ("cat", "dog")
    assert found["labels.csv::6"].reason == "missing: listed in labels.csv row 6 but not found (looked for gone.png)"
    assert found["labels.csv::7"].reason == "duplicate row: a.png is already listed in labels.csv row 2"
    assert found["labels.csv::8"].reason == "no file: labels.csv row 8 has an empty column 'file'"
    assert {path for path in found if "::" in path} == {"labels.csv::6", "labels.csv::7", "labels.csv::8"}


# Line endings a file may mix, each with a blank line above `gone.png`, which a spreadsheet shows
# as row 4 (or 5): a cell holding a bare carriage return stays in its row; a line ending in a bare
# one (an old Mac's, in an otherwise LF file) is a row of its own for pandas, Arrow and a
# spreadsheet alike.
MIXED_ENDINGS = {
    "quoted-cr": (b'file,label,pixels,notes\nb.png,dog,1 2 3 4,"one\rcell"\n\ngone.png,cat,1 2 3,\n', 4),
    "crlf-and-lf": (b"file,label,pixels,notes\r\nb.png,dog,1 2 3 4,\n\r\ngone.png,cat,1 2 3,\r\n", 4),
    "unquoted-cr": (b"file,label,pixels,notes\na.png,cat,1 2 3 4,\rb.png,dog,1 2 3 4,\n\ngone.png,cat,1 2 3,\n", 5),
    "all-three": (
        b'file,label,pixels,notes\na.png,cat,1 2 3 4,\rb.png,dog,1 2 3 4,"one\rcell"\r\n\ngone.png,cat,1 2 3,\n', 5
    ),
}


@pytest.mark.parametrize("kind", ["csv", "pixels_csv"])
@pytest.mark.parametrize("name", list(MIXED_ENDINGS))
def test_rows_are_numbered_right_whatever_line_endings_a_csv_mixes(tmp_path, name, kind):
    """Rows are numbered by counting line feeds where that is safe, not by parsing the file again.
    A line ending in a bare carriage return adds a record without a line feed: with a blank line
    elsewhere, the count came out as for a file of neither, and every row below the blank line
    was named one too high."""
    content, row = MIXED_ENDINGS[name]
    raw = tmp_path / "raw"
    for image in ("a.png", "b.png"):
        write_image(raw / image)
    (raw / "labels.csv").write_bytes(content)
    if kind == "csv":
        layout = {"kind": kind, "file": "labels.csv", "path_column": "file", "label_column": "label"}
        expected = f"missing: listed in labels.csv row {row} but not found (looked for gone.png)"
    else:
        layout = {"kind": kind, "file": "labels.csv", "label_column": "label", "pixels_column": "pixels", "width": 2,
                  "height": 2}
        expected = "undecodable: 3 pixel values, expected 4 (2x2)"

    found = run_layout(config(layout, ["cat", "dog"], image_size=2, channels=1), raw)

    assert found[f"labels.csv::{row}"].reason == expected


def test_csv_names_find_files_whose_names_are_decomposed_on_disk(tmp_path):
    """A zip made on macOS holds `café.png` decomposed (NFD); the CSV names it composed (NFC).
    The row finds the file, which keeps its name on disk."""
    import unicodedata

    raw = tmp_path / "raw"
    on_disk = unicodedata.normalize("NFD", "café.png")
    write_image(raw / on_disk)
    write_csv(raw / "labels.csv", ["file", "label"], [[unicodedata.normalize("NFC", "café.png"), "dog"]])
    layout = {"kind": "csv", "file": "labels.csv", "path_column": "file", "label_column": "label"}

    found = run_layout(config(layout, ["dog"]), raw)

    assert found[on_disk].label == "dog" and found[on_disk].reason == ""
    assert not any(path.startswith("labels.csv::") for path in found)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"label_column": "classid"}, "no column 'classid' (named by layout.label_column)"),
        ({"path_column": "path"}, "no column 'path' (named by layout.path_column)"),
        ({"path_column": "", "path_template": "{image}/{Path}"}, "no column 'image' (named by layout.path_template)"),
        ({"group_column": "lesion"}, "no column 'lesion' (named by layout.group_column)"),
        ({"filter": {"view": ["PA"]}}, "no column 'view' (named by layout.filter.view)"),
    ],
)
def test_csv_missing_column_is_one_line_naming_file_and_column(tmp_path, change, expected):
    raw = tmp_path / "raw"
    write_image(raw / "0.png")
    write_csv(raw / "Train.csv", ["ClassId", "Path"], [[0, "0.png"]])
    layout = {"kind": "csv", "file": "Train.csv", "path_column": "Path", "label_column": "ClassId", **change}
    cfg = config(layout, ["0"])

    with pytest.raises(UserError) as caught:
        layouts.get_layout("csv").candidates(cfg.layout.options, raw)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{raw / 'Train.csv'}: {expected}")
    assert "ClassId, Path" in message


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({"file": "absent.csv", "path_column": "Path"}, "absent.csv: the layout's CSV file does not exist"),
        ({"file": "broken.csv", "path_column": "Path"}, "broken.csv: cannot be read as a CSV file"),
    ],
)
def test_csv_file_errors_are_one_line(tmp_path, layout, expected):
    raw = tmp_path / "raw"
    write_image(raw / "0.png")
    write_csv(raw / "Train.csv", ["ClassId", "Path"], [[0, "0.png"]])
    (raw / "broken.csv").write_bytes(b'ClassId,Path\n0,"0.png\n1,1.png\n')  # a quote never closed
    cfg = config({"kind": "csv", "label_column": "ClassId", **layout}, ["0"])

    with pytest.raises(UserError) as caught:
        layouts.get_layout("csv").candidates(cfg.layout.options, raw)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kind", "layout", "rows"),
    [
        ("csv", {"path_column": "file"}, 5000),
        ("pixels_csv", {"pixels_column": "pixels"}, 5000),  # past the header: Arrow finds it
        ("pixels_csv", {"pixels_column": "pixels"}, 0),  # in the first block: the header's reader finds it
    ],
)
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_a_label_csv_saved_in_windows_1252_is_one_line_saying_to_save_it_as_utf8(tmp_path, kind, layout, rows, newline):
    """Excel on Windows saves "CSV" in Windows-1252: `crème` is one byte 0xe8, not UTF-8. The
    line names the file, the line holding the byte, and to save it as UTF-8 (before: it said to
    check layout.file in params.yaml, which names the file rightly). Lines end as the file ends
    them, an old Mac's in a bare carriage return too (before: counted by line feeds, line 1)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    filler = [f"{n}.png,1 2 3 4,bread" for n in range(rows)]
    lines = ["file,pixels,label", *filler, "crème.png,1 2 3 4,crème"]
    (raw / "labels.csv").write_bytes((newline.join(lines) + newline).encode("cp1252"))
    cfg = config({"kind": kind, "file": "labels.csv", "label_column": "label", **layout}, ["bread"], channels=1)

    with pytest.raises(UserError) as caught:
        layouts.get_layout(kind).candidates(cfg.layout.options, raw)
    message = str(caught.value)
    assert f"labels.csv: not UTF-8 text (line {rows + 2} holds the byte 0xe8" in message, message
    assert "save it as UTF-8" in message and "check layout.file" not in message
    assert "\n" not in message


# Mistakes that need no data are found as params.yaml is read (`python -m stages.config`, and
# every stage), naming the dataset's key; the toy dataset is `toy`.
@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (
            {"file": "Train.csv", "path_column": "Path", "path_template": "{Path}"},
            "datasets.toy.layout: set exactly one of datasets.toy.layout.path_column and "
            "datasets.toy.layout.path_template",
        ),
        ({"file": "Train.csv"}, "exactly one of datasets.toy.layout.path_column and datasets.toy.layout.path_template"),
        ({"path_column": "Path"}, "exactly one of datasets.toy.layout.file (one CSV) and datasets.toy.layout.files"),
        (
            {"file": "Train.csv", "path_column": "Path", "search": []},
            "datasets.toy.layout.search: list at least one folder where Train.csv's images are",
        ),
        (
            {"files": [{"file": "Train.csv", "search": []}, {"file": "Test.csv"}], "path_column": "Path"},
            "datasets.toy.layout.files[0].search: list at least one folder where Train.csv's images are",
        ),
        (
            {"file": "Train.csv", "files": [{"file": "Test.csv"}], "path_column": "Path"},
            "exactly one of datasets.toy.layout.file (one CSV) and datasets.toy.layout.files",
        ),
        (
            {"files": [{"file": "Train.csv", "split": "training"}], "path_column": "Path"},
            "datasets.toy.layout.files[0].split: 'training' is not a split",
        ),
        (
            {"files": [{"file": "../Train.csv"}], "path_column": "Path"},
            "datasets.toy.layout.files[0].file: '../Train.csv' is not a file inside the raw folder",
        ),
        (
            {"file": "Train.csv", "path_column": "Path", "split_map": {"x": "dev"}},
            "datasets.toy.layout.split_map.x: 'dev' is not a split",
        ),
        ({"file": "Train.csv", "path_template": "{Path:>5}"}, "datasets.toy.layout.path_template: '{Path:>5}': write "
         "plain {column} placeholders"),
        (
            # Every row would be "missing": the names are looked for under the raw folder only.
            {"file": "Train.csv", "path_column": "Path", "search": ["/data/gtsrb/images"]},
            "datasets.toy.layout.search[0]: '/data/gtsrb/images' is not a folder inside the raw folder",
        ),
        (
            {"files": [{"file": "meta/Train.csv", "search": ["../images", "../../images"]}], "path_column": "Path"},
            "datasets.toy.layout.files[0].search[1]: '../../images' is not a folder inside the raw folder",
        ),
        (
            # Without the column the map is never read: the source's own test rows would be split
            # by the fractions, into train too.
            {"file": "Train.csv", "path_column": "Path", "split_map": {"Testing": "test"}},
            "datasets.toy.layout.split_map: given without datasets.toy.layout.split_column",
        ),
        (
            # An empty list keeps no row: every image filtered out, then min_per_class failing.
            {"file": "Train.csv", "path_column": "Path", "filter": {"modality": []}},
            "datasets.toy.layout.filter.modality: an empty list keeps no row",
        ),
        (
            {"file": "Train.csv", "path_column": "Path", "group_pattern": "(\\d+)"},
            "datasets.toy.layout.group_pattern: '(\\\\d+)' has no named group",
        ),
        (
            {"file": "Train.csv", "path_column": "Path", "group_pattern": "(?P<group>x)", "group_column": "g"},
            "take the group from datasets.toy.layout.group_column or datasets.toy.layout.group_pattern, not both",
        ),
    ],
)
def test_csv_option_errors_are_found_as_params_are_read(layout, expected):
    with pytest.raises(ConfigError) as caught:
        config({"kind": "csv", "label_column": "ClassId", **layout}, ["0"])
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_layout_given_options_directly_checks_them_too(tmp_path):
    """`candidates` runs the same checks for options that never went through params.yaml,
    naming the key `layout`."""
    raw = tmp_path / "raw"
    write_image(raw / "0.png")
    options = layouts.CsvOptions(label_column="ClassId", file="Train.csv")

    with pytest.raises(UserError, match=r"^layout: set exactly one of layout.path_column and layout.path_template"):
        layouts.get_layout("csv").candidates(options, raw)


# --------------------------------------------------------------------------------------------
# FER-2013 original: fer2013.csv with emotion, pixels (2,304 space-separated values), Usage.

FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
FER_LAYOUT = {
    "kind": "pixels_csv",
    "file": "fer2013.csv",
    "label_column": "emotion",
    "pixels_column": "pixels",
    "split_column": "Usage",
    "split_map": {"Training": "train", "PublicTest": "val", "PrivateTest": "test"},
    "class_map": {str(i): name for i, name in enumerate(FER_CLASSES)},
}


@pytest.fixture
def fer2013(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    raw = tmp_path / "fer2013"
    raw.mkdir()
    rng = np.random.default_rng(2013)
    faces = {}
    rows = []
    usage = ["Training"] * 7 + ["PublicTest"] * 3 + ["PrivateTest"] * 3
    for index, split in enumerate(usage):
        face = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        faces[f"fer2013.csv::{index + 2}"] = face
        rows.append([index % 7, " ".join(map(str, face.ravel().tolist())), split])
    short = rng.integers(0, 256, 2303, dtype=np.uint8)
    rows.append([3, " ".join(map(str, short.tolist())), "Training"])  # row 15: one value short
    rows.append([3, " ".join(["256"] + ["7"] * 2303), "Training"])  # row 16: out of range
    rows.append([3, " ".join(["12"] * 2303 + ["x"]), "Training"])  # row 17: not a number
    rows.append([3, "", "Training"])  # row 18: no pixels at all
    write_csv(raw / "fer2013.csv", ["emotion", "pixels", "Usage"], rows)
    (raw / "README").write_text("Challenges in Representation Learning", encoding="utf-8")
    return raw, faces


def test_fer2013_pixels_csv_layout_decodes_rows_and_sets_bad_ones_aside(fer2013):
    raw, faces = fer2013
    cfg = config(FER_LAYOUT, FER_CLASSES, image_size=48, channels=1)
    assert layouts.get_layout("pixels_csv").in_memory
    found = run_layout(cfg, raw)

    for path, face in faces.items():
        assert found[path].pixels.shape == (48, 48) and found[path].pixels.dtype == np.uint8
        np.testing.assert_array_equal(found[path].pixels, face)
    assert (found["fer2013.csv::2"].label, found["fer2013.csv::2"].source_split) == ("angry", "train")
    assert (found["fer2013.csv::8"].label, found["fer2013.csv::8"].source_split) == ("neutral", "train")
    assert (found["fer2013.csv::9"].label, found["fer2013.csv::9"].source_split) == ("angry", "val")
    assert found["fer2013.csv::14"].source_split == "test"
    assert found["fer2013.csv::15"].reason == "undecodable: 2303 pixel values, expected 2304 (48x48)"
    assert found["fer2013.csv::16"].reason == "undecodable: pixel values that are not integers in 0..255"
    assert found["fer2013.csv::17"].reason == "undecodable: pixel values that are not integers in 0..255"
    assert found["fer2013.csv::18"].reason == "undecodable: 0 pixel values, expected 2304 (48x48)"
    assert found["fer2013.csv"].reason == "label file (read by the layout)"
    assert found["README"].reason == "not an image file ('README')"


def test_fer2013_manifest_and_arrays_hold_the_csv_pixels(fer2013, tmp_path):
    """End to end: 13 ok rows, 4 undecodable, and write_arrays puts each face's exact pixels in
    its split's array."""
    raw, faces = fer2013
    cfg = config(FER_LAYOUT, FER_CLASSES, image_size=48, channels=1)
    manifest, rows = manifest_rows(cfg, raw)

    assert ok_paths(manifest) == set(faces)
    assert rows["fer2013.csv::2"]["width"] == 48 and rows["fer2013.csv::2"]["mode"] == "L"
    assert rows["fer2013.csv::2"]["bytes"] == 2304
    bad = manifest[manifest["path"].isin([f"fer2013.csv::{n}" for n in (15, 16, 17, 18)])]
    assert (bad["status"] == "set_aside").all() and bad["reason"].str.startswith("undecodable: ").all()
    split = assign_splits(manifest, cfg.split)
    assert Counter(split["split"]) == {"train": 7, "val": 3, "test": 3}

    out = tmp_path / "arrays"
    out.mkdir()
    counts, _ = write_arrays(split, raw, out, cfg)
    assert counts == {"train": 7, "val": 3, "test": 3}
    for name in ("train", "val", "test"):
        images = np.load(out / f"{name}_x.npy")
        labels = np.load(out / f"{name}_y.npy")
        part = split[split["split"] == name].reset_index(drop=True)
        assert images.shape == (len(part), 48, 48, 1)
        for i, path in enumerate(part["path"]):
            np.testing.assert_array_equal(images[i, ..., 0], faces[path])
            assert FER_CLASSES[labels[i]] == part.loc[i, "label"]


# --------------------------------------------------------------------------------------------
# label,pixel1..pixelN: sign-language MNIST (sign_mnist_train.csv, sign_mnist_test.csv).

SIGN_LAYOUT = {
    "kind": "pixels_csv",
    "files": [{"file": "sign_mnist_train.csv", "split": "train"}, {"file": "sign_mnist_test.csv", "split": "test"}],
    "label_column": "label",
    "pixel_columns_prefix": "pixel",
    "class_map": {"0": "A", "1": "B", "2": "C"},
}


@pytest.fixture
def sign_mnist(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    raw = tmp_path / "sign_mnist"
    rng = np.random.default_rng(784)
    header = ["label"] + [f"pixel{i}" for i in range(1, 785)]
    hands = {}
    for name, labels in (("sign_mnist_train.csv", [0, 1, 2, 0, 1, 2]), ("sign_mnist_test.csv", [2, 1, 0])):
        rows = []
        for index, label in enumerate(labels):
            hand = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            hands[f"{name}::{index + 2}"] = hand
            rows.append([label] + hand.ravel().tolist())
        write_csv(raw / name, header, rows)
    # A row with an empty cell, and an image file beside the CSVs.
    with open(raw / "sign_mnist_test.csv", "a", encoding="utf-8") as handle:
        handle.write("1," + ",".join(["9"] * 783) + ",\n")
    write_image(raw / "amer_sign2.png")
    return raw, hands


def test_label_pixel_columns_form_infers_a_square(sign_mnist):
    raw, hands = sign_mnist
    cfg = config(SIGN_LAYOUT, ["A", "B", "C"], image_size=28, channels=1)
    found = run_layout(cfg, raw)

    for path, hand in hands.items():
        np.testing.assert_array_equal(found[path].pixels, hand)
    assert (found["sign_mnist_train.csv::3"].label, found["sign_mnist_train.csv::3"].source_split) == ("B", "train")
    assert (found["sign_mnist_test.csv::2"].label, found["sign_mnist_test.csv::2"].source_split) == ("C", "test")
    assert found["sign_mnist_test.csv::5"].reason == "undecodable: pixel values that are not integers in 0..255"
    assert found["amer_sign2.png"].reason == (
        "stray file: the images come from sign_mnist_train.csv and sign_mnist_test.csv"
    )

    manifest, _ = manifest_rows(cfg, raw)
    assert ok_paths(manifest) == set(hands)
    split = assign_splits(manifest, cfg.split)
    assert set(split.loc[split["path"].str.startswith("sign_mnist_test.csv"), "split"]) == {"test"}


def test_pixel_columns_in_rgb_with_a_given_width(tmp_path):
    """HAM10000's hmnist_28_28_RGB.csv form: pixel0000.., channels interleaved, label last."""
    raw = tmp_path / "raw"
    image = np.random.default_rng(3).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    write_csv(raw / "hmnist_2_3_RGB.csv", [f"pixel{i:04d}" for i in range(18)] + ["label"],
              [image.ravel().tolist() + [4]])
    layout = {"kind": "pixels_csv", "file": "hmnist_2_3_RGB.csv", "label_column": "label",
              "pixel_columns_prefix": "pixel", "width": 3, "channels": 3}
    found = run_layout(config(layout, ["4"]), raw)

    np.testing.assert_array_equal(found["hmnist_2_3_RGB.csv::2"].pixels, image)


@pytest.mark.parametrize("newline, bom", [("\n", ""), ("\r\n", ""), ("\r\n", "\ufeff")], ids=["lf", "crlf", "bom-crlf"])
def test_pixel_rows_are_numbered_as_a_spreadsheet_shows_them_blank_lines_included(tmp_path, newline, bom):
    """As for a label CSV: a blank line (empty, or spaces only) is a row in a spreadsheet, so the
    `<csv>::<row>` of every row below it names the row the user sees. Before, they were one too
    high per blank line above, and a line of spaces stopped Arrow's parser."""
    raw = tmp_path / "raw"
    raw.mkdir()
    images = np.random.default_rng(5).integers(0, 256, (3, 2, 2), dtype=np.uint8)
    cells = [" ".join(map(str, image.ravel().tolist())) for image in images]
    lines = ["emotion,pixels", f"0,{cells[0]}", "", f"1,{cells[1]}", "  ", "", "1,1 2 3", f"0,{cells[2]}"]
    (raw / "faces.csv").write_bytes((bom + newline.join(lines) + newline).encode("utf-8"))
    layout = {"kind": "pixels_csv", "file": "faces.csv", "label_column": "emotion", "pixels_column": "pixels"}
    found = run_layout(config(layout, ["0", "1"], image_size=2, channels=1), raw)

    assert {path for path in found if "::" in path} == {"faces.csv::2", "faces.csv::4", "faces.csv::7", "faces.csv::8"}
    for row, image in zip((2, 4, 8), images):
        np.testing.assert_array_equal(found[f"faces.csv::{row}"].pixels, image)
    assert found["faces.csv::7"].reason == "undecodable: 3 pixel values, expected 4 (2x2)"


@pytest.mark.parametrize("line, fields, hint", [
    ("1,1 2 3 4,Training,x", 4, " (a comma inside an unquoted field?); quote that field or fix the line"),
    ("1,1 2 3 4", 2, "; fix the line"),
], ids=["more", "fewer"])
def test_a_pixel_row_with_another_number_of_fields_is_one_line_naming_its_row(tmp_path, line, fields, hint):
    """Arrow refuses a row with more or fewer fields than the header, but its message names no
    row (and quotes 10 KB of pixel values for FER-2013): the row is named as for a label CSV."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "faces.csv").write_text(f"emotion,pixels,Usage\n0,1 2 3 4,Training\n\n{line}\n", encoding="utf-8")
    layout = {"kind": "pixels_csv", "file": "faces.csv", "label_column": "emotion", "pixels_column": "pixels"}

    with pytest.raises(UserError) as caught:
        run_layout(config(layout, ["0", "1"], image_size=2, channels=1), raw)

    assert str(caught.value) == f"{raw / 'faces.csv'}: row 4 has {fields} fields, the header 3{hint}, then fetch again"


def test_a_header_below_a_blank_line_is_the_header_in_both_csv_layouts(tmp_path):
    """pandas skips blank lines before the header, so a label CSV starting with one was read; the
    pixels CSV's header was taken from that blank line (no columns at all). Both read it now, and
    name the rows below as a spreadsheet does: the header is row 2 there."""
    raw = tmp_path / "raw"
    write_image(raw / "a.png")
    (raw / "labels.csv").write_text("\nfile,label\na.png,cat\ngone.png,cat\n", encoding="utf-8")
    (raw / "faces.csv").write_text("  \nemotion,pixels\n0,1 2 3 4\n1,5 6 7 8\n1,1 2 3\n", encoding="utf-8")
    labels = {"kind": "csv", "file": "labels.csv", "path_column": "file", "label_column": "label"}
    pixels = {"kind": "pixels_csv", "file": "faces.csv", "label_column": "emotion", "pixels_column": "pixels"}

    found = run_layout(config(labels, ["cat"]), raw)
    assert found["labels.csv::4"].reason == "missing: listed in labels.csv row 4 but not found (looked for gone.png)"
    assert (found["a.png"].label, found["a.png"].reason) == ("cat", "")

    found = run_layout(config(pixels, ["0", "1"], image_size=2, channels=1), raw)
    np.testing.assert_array_equal(found["faces.csv::3"].pixels, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(found["faces.csv::4"].pixels, [[5, 6], [7, 8]])
    assert found["faces.csv::5"].reason == "undecodable: 3 pixel values, expected 4 (2x2)"


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({"pixels_column": "pixel"}, "fer2013.csv: no column 'pixel' (named by layout.pixels_column)"),
        (
            {"pixels_column": "pixels", "label_column": "label"},
            "fer2013.csv: no column 'label' (named by layout.label_column)",
        ),
        (
            {"pixels_column": "pixels", "split_column": "usage"},
            "fer2013.csv: no column 'usage' (named by layout.split_column)",
        ),
        ({"pixel_columns_prefix": "px"}, "fer2013.csv: no columns named px<number>"),
        ({"pixels_column": "pixels", "width": 5}, "fer2013.csv: 4 pixel values a row do not fit a side of 5"),
        (
            {"pixels_column": "pixels", "channels": 3},
            "fer2013.csv: 4 pixel values a row is not a square image of 3 channel(s)",
        ),
    ],
)
def test_pixels_csv_errors_are_one_line_naming_file_and_column(tmp_path, layout, expected):
    raw = tmp_path / "raw"
    write_csv(raw / "fer2013.csv", ["emotion", "pixels", "Usage"], [[0, "1 2 3 4", "Training"]])
    cfg = config({"kind": "pixels_csv", "file": "fer2013.csv", "label_column": "emotion", **layout}, ["0"])

    with pytest.raises(UserError) as caught:
        layouts.get_layout("pixels_csv").candidates(cfg.layout.options, raw)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (
            {"pixels_column": "pixels", "pixel_columns_prefix": "px"},
            "datasets.toy.layout: set exactly one of datasets.toy.layout.pixels_column and "
            "datasets.toy.layout.pixel_columns_prefix",
        ),
        ({"pixels_column": "pixels", "width": -48}, "datasets.toy.layout.width and datasets.toy.layout.height: give a "
         "positive size, or 0 to infer it"),
        (
            {"pixels_column": "pixels", "split_map": {"PrivateTest": "test"}},
            "datasets.toy.layout.split_map: given without datasets.toy.layout.split_column",
        ),
    ],
)
def test_pixels_csv_option_errors_are_found_as_params_are_read(layout, expected):
    with pytest.raises(ConfigError) as caught:
        config({"kind": "pixels_csv", "file": "fer2013.csv", "label_column": "emotion", **layout}, ["0"])
    assert expected in str(caught.value)


# --------------------------------------------------------------------------------------------
# Food-11, EPFL original: training/, validation/, evaluation/ with <classid>_<n>.jpg.

FOOD_NAMES = {"0": "bread", "1": "dairy_product", "2": "dessert"}
FOOD_LAYOUT = {
    "kind": "filename_pattern",
    "pattern": r"(?P<label>\d+)_\d+\.jpg",
    "splits": {"training": "train", "validation": "val", "evaluation": "test"},
    "class_map": FOOD_NAMES,
}


@pytest.fixture
def food11(tmp_path) -> Path:
    raw = tmp_path / "food11"
    for folder, per_class in (("training", 3), ("validation", 2), ("evaluation", 2)):
        for class_id in FOOD_NAMES:
            for n in range(per_class):
                write_image(raw / folder / f"{class_id}_{n}.jpg", (12, 10))
    write_image(raw / "training" / "IMG_2041.jpg")  # does not follow the naming
    (raw / "training" / "Thumbs.db").write_bytes(b"\x00\x01")
    write_image(raw / "0_9.jpg")  # outside any split folder
    return raw


def test_food11_filename_pattern_layout(food11):
    cfg = config(FOOD_LAYOUT, list(FOOD_NAMES.values()))
    found = run_layout(cfg, food11)

    assert (found["training/1_2.jpg"].label, found["training/1_2.jpg"].source_split) == ("dairy_product", "train")
    assert (found["validation/0_0.jpg"].label, found["validation/0_0.jpg"].source_split) == ("bread", "val")
    assert (found["evaluation/2_1.jpg"].label, found["evaluation/2_1.jpg"].source_split) == ("dessert", "test")
    assert found["training/IMG_2041.jpg"].reason == r"name does not match (?P<label>\d+)_\d+\.jpg"
    assert found["training/Thumbs.db"].reason == "not an image file ('.db')"
    assert found["0_9.jpg"].reason.startswith("stray file: in the layout root, not in a split folder")

    manifest, _ = manifest_rows(cfg, food11)
    assert len(ok_paths(manifest)) == 9 + 6 + 6
    split = assign_splits(manifest, cfg.split)
    assert (split["split"] == split["path"].str.split("/").str[0].map(FOOD_LAYOUT["splits"])).all()


def test_filename_pattern_group_and_bad_patterns(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "cat_17_a.png")
    write_image(raw / "cat_17_b.png")
    layout = {"kind": "filename_pattern", "pattern": r"(?P<label>[a-z]+)_(?P<group>\d+)_\w\.png"}
    found = run_layout(config(layout, ["cat"]), raw)
    assert (found["cat_17_b.png"].label, found["cat_17_b.png"].group) == ("cat", "17")

    bad_patterns = (
        (r"(\d+)_\d+\.jpg", "has no named group for the label"),
        ("(?P<label>[", "is not a regular expression"),
    )
    for pattern, expected in bad_patterns:
        with pytest.raises(ConfigError, match=r"datasets\.toy\.layout\.pattern: .*" + expected):
            config({"kind": "filename_pattern", "pattern": pattern}, ["cat"])
        with pytest.raises(UserError, match=r"^layout\.pattern: .*" + expected):
            layouts.get_layout("filename_pattern").candidates(layouts.FilenamePatternOptions(pattern), raw)


# --------------------------------------------------------------------------------------------
# folders with a class map: facemask's split folders, garbage's nested root.


def test_folders_class_map_renames_class_folders(tmp_path):
    raw = tmp_path / "facemask"
    base = raw / "Face Mask Dataset"
    for folder, count in (("Train", 3), ("Validation", 2), ("Test", 2)):
        for cls in ("WithMask", "WithoutMask"):
            for n in range(count):
                write_image(base / folder / cls / f"{n}.png", (8, 8))
    write_image(base / "Train" / "Unsure" / "0.png", (8, 8))  # a folder the map does not name
    layout = {
        "kind": "folders",
        "root": "Face Mask Dataset",
        "splits": {"Train": "train", "Validation": "val", "Test": "test"},
        "class_map": {"WithMask": "with_mask", "WithoutMask": "without_mask"},
    }
    cfg = config(layout, ["with_mask", "without_mask"])
    found = run_layout(cfg, raw)

    assert found["Face Mask Dataset/Validation/WithoutMask/1.png"].label == "without_mask"
    assert found["Face Mask Dataset/Validation/WithoutMask/1.png"].source_split == "val"
    assert found["Face Mask Dataset/Train/Unsure/0.png"].label == "Unsure"

    manifest, rows = manifest_rows(cfg, raw)
    assert len(ok_paths(manifest)) == 14
    assert rows["Face Mask Dataset/Train/Unsure/0.png"]["reason"] == "label 'Unsure' is not among the declared classes"
    split = assign_splits(manifest, cfg.split)
    assert Counter(split["split"]) == {"train": 6, "val": 4, "test": 4}
    assert set(split["label"]) == {"with_mask", "without_mask"}


def test_a_class_map_names_a_class_folder_spelt_decomposed(tmp_path):
    """A zip made on macOS holds the folder `Pâtes` decomposed (NFD); params.yaml's class_map
    names it composed (NFC). The map applies: the images are `pasta`, not the undeclared `Pâtes`."""
    import unicodedata

    raw = tmp_path / "raw"
    for n in range(2):
        write_image(raw / "train" / unicodedata.normalize("NFD", "Pâtes") / f"{n}.png")
        write_image(raw / "train" / "Pain" / f"{n}.png")
    layout = {"kind": "folders", "splits": {"train": "train"}, "class_map": {"Pâtes": "pasta", "Pain": "bread"}}
    cfg = config(layout, ["pasta", "bread"])

    manifest, _ = manifest_rows(cfg, raw)

    assert (manifest["status"] == "ok").all(), manifest[["path", "reason"]].to_string()
    assert Counter(manifest["label"]) == {"pasta": 2, "bread": 2}


def test_a_root_and_split_folders_spelt_decomposed_are_found(tmp_path):
    """A macOS zip holds `Données/Entraînement/` decomposed (NFD); params.yaml names the root and
    the split folder composed (NFC). Both are found: the images are accepted in train."""
    import unicodedata

    raw = tmp_path / "raw"
    folder = raw / unicodedata.normalize("NFD", "Données")
    for n in range(2):
        write_image(folder / unicodedata.normalize("NFD", "Entraînement") / "chat" / f"{n}.png")
        write_image(folder / "Test" / "chat" / f"{n}.png")
    layout = {"kind": "folders", "root": "Données", "splits": {"Entraînement": "train", "Test": "test"}}
    cfg = config(layout, ["chat"])

    found = run_layout(cfg, raw)

    assert {c.reason for c in found.values()} == {""}
    assert Counter(c.source_split for c in found.values()) == {"train": 2, "test": 2}


def test_a_root_that_is_not_there_names_the_folders_that_are_and_what_to_set(tmp_path):
    """A `local` folder source is copied without its own name, so the README's `root: "flowers"`
    (for a zip) copied onto a folder source finds nothing. Before, the error said only that the root
    does not exist; now it names what the raw folder holds and the fix."""
    raw = tmp_path / "raw"
    for label in ("circle", "square"):
        write_image(raw / label / "0.png")
    cfg = config({"kind": "folders", "root": "shapes"}, ["circle", "square"])

    with pytest.raises(UserError) as error:
        run_layout(cfg, raw)

    assert str(error.value) == (
        f"{raw / 'shapes'}: the layout root does not exist; {raw} holds the folders circle, square: set "
        "layout.root in params.yaml to the folder the class (or split) folders sit in, or remove it if they are "
        "these (a local folder source is copied without its own name)"
    )


def test_every_layout_takes_a_class_map():
    for name, kind in layouts.REGISTRY.items():
        assert "class_map" in kind.options.__dataclass_fields__, name


# --------------------------------------------------------------------------------------------
# The course's layouts as params.yaml states them: each parses through the strict parser.

COURSE_LAYOUTS = """
gtsrb:
  classes: [speed_limit_20, speed_limit_30]
  layout:
    kind: csv
    files:
      - {file: Train.csv, split: train}
      - {file: Test.csv, split: test}
    path_column: Path
    label_column: ClassId
    group_pattern: '^Train/(?P<group>\\d+/\\d+_\\d+)_'
    class_map: {0: speed_limit_20, 1: speed_limit_30}
ham10000:
  classes: [melanocytic_nevus]
  layout:
    kind: csv
    file: HAM10000_metadata.csv
    path_template: '{image_id}.jpg'
    search: [HAM10000_images_part_1, HAM10000_images_part_2]
    label_column: dx
    group_column: lesion_id
    class_map: {nv: melanocytic_nevus}
covid19:
  classes: [covid19, normal]
  layout:
    kind: csv
    file: metadata.csv
    path_column: filename
    search: [images]
    label_column: finding
    group_column: patientid
    filter: {modality: [X-ray], view: [PA, AP, AP Supine]}
    class_map: {COVID-19: covid19, No Finding: normal}
mango:
  classes: [A, B, C]
  layout:
    kind: csv
    files:
      - {file: train.csv, split: train, search: [C1-P1_Train]}
      - {file: dev.csv, split: test, search: [C1-P1_Dev]}
    path_column: image_id
    label_column: label
fer2013_csv:
  classes: [angry, disgust, fear, happy, sad, surprise, neutral]
  layout:
    kind: pixels_csv
    file: fer2013.csv
    label_column: emotion
    pixels_column: pixels
    width: 48
    height: 48
    split_column: Usage
    split_map: {Training: train, PublicTest: val, PrivateTest: test}
    class_map: {0: angry, 1: disgust, 2: fear, 3: happy, 4: sad, 5: surprise, 6: neutral}
food11:
  classes: [bread]
  layout:
    kind: filename_pattern
    pattern: '(?P<label>\\d+)_\\d+\\.jpg'
    splits: {training: train, validation: val, evaluation: test}
    class_map: {0: bread}
garbage:
  classes: [cardboard]
  layout:
    kind: folders
    root: Garbage classification/Garbage classification
"""


@pytest.mark.parametrize("name", list(yaml.safe_load(COURSE_LAYOUTS)))
def test_course_layout_entries_parse(name):
    entry = yaml.safe_load(COURSE_LAYOUTS)[name]
    cfg = config(entry["layout"], entry["classes"])
    assert cfg.layout.kind == entry["layout"]["kind"]
    assert isinstance(cfg.layout.options, layouts.get_layout(cfg.layout.kind).options)
    # YAML's bare numbers in class maps are names, keyed as text like the raw labels.
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.layout.options.class_map.items())


def test_hidden_files_and_files_in_hidden_folders_are_set_aside_as_hidden(tmp_path):
    """A notebook's `.ipynb_checkpoints/` copies were taken as images of the class they sat in;
    macOS's `._x.png` (its metadata beside x.png) was "not an image file ('.png')"."""
    raw = tmp_path / "raw"
    write_image(raw / "a" / "0.png")
    write_image(raw / "a" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (raw / "a" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    write_image(raw / "b" / "0.png")

    found = run_layout(config({"kind": "folders"}, ["a", "b"]), raw)

    assert found["a/.ipynb_checkpoints/0-checkpoint.png"].reason == "in a hidden folder ('.ipynb_checkpoints')"
    assert found["a/._0.png"].reason == "hidden file ('._0.png')"
    assert found["a/0.png"].reason == found["b/0.png"].reason == ""


@pytest.mark.parametrize("splits", [{}, {"train": "train"}])
def test_a_hidden_file_outside_the_class_folders_is_set_aside_as_hidden_not_stray(tmp_path, splits):
    """macOS's `.DS_Store` at the raw folder's top (or beside the split folders) is hidden, as
    docs/reliability.md says of hidden files whatever their place; before, it counted as
    "stray file: not inside a class folder" (or "not in a split folder"), the reason for a real
    image misplaced."""
    raw = tmp_path / "raw"
    top = raw / "train" if splits else raw
    write_image(top / "a" / "0.png")
    write_image(top / "b" / "0.png")
    (raw / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (top / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")

    found = run_layout(config({"kind": "folders", "splits": splits}, ["a", "b"]), raw)

    assert found[".DS_Store"].reason == "hidden file ('.DS_Store')"
    assert found[(top / ".DS_Store").relative_to(raw).as_posix()].reason == "hidden file ('.DS_Store')"


def test_a_split_folder_named_in_another_case_says_so(tmp_path):
    """Facemask's `Train/` under `splits: {train: train}`: every file was a stray, and nothing
    said why but the count; the reason now names the split folder that differs in case only."""
    raw = tmp_path / "raw"
    write_image(raw / "Train" / "a" / "0.png")
    write_image(raw / "test" / "a" / "0.png")

    found = run_layout(config({"kind": "folders", "splits": {"train": "train", "test": "test"}}, ["a"]), raw)

    assert found["Train/a/0.png"].reason == ("stray file: in folder 'Train', not in a split folder (train, test); "
                                             "layout.splits names 'train', which differs in case only: write 'Train'")
    assert found["test/a/0.png"].reason == ""


def test_a_layout_root_may_hold_a_colon(tmp_path):
    """A local folder may hold `Photos: 2019/` (no archive entry may): the root check refuses only
    what leaves the raw folder."""
    raw = tmp_path / "raw"
    write_image(raw / "Photos: 2019" / "cat" / "0.png")
    cfg = config({"kind": "folders", "root": "Photos: 2019"}, ["cat"])

    found = run_layout(cfg, raw)

    assert found["Photos: 2019/cat/0.png"].label == "cat"


def test_a_jpeg_saved_as_jfif_is_an_image(tmp_path):
    """Windows saves a JPEG from a browser as `.jfif` (Pillow's own JPEG suffix, as `.jpe` is):
    a scraped dataset holds many. They were set aside as "not an image file ('.jfif')", and predict
    left them out of a folder."""
    from stages.predict import image_files

    raw = tmp_path / "raw"
    write_image(raw / "a" / "0.jfif")
    write_image(raw / "a" / "1.JPE")
    write_image(raw / "b" / "0.jpg")

    manifest, rows = manifest_rows(config({"kind": "folders"}, ["a", "b"]), raw)

    assert ok_paths(manifest) == {"a/0.jfif", "a/1.JPE", "b/0.jpg"}, manifest[["path", "reason"]].to_dict("records")
    assert image_files([raw / "a"])[0] == [raw / "a" / "0.jfif", raw / "a" / "1.JPE"]
