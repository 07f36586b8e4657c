"""Miniatures of the course's datasets: the real layout of each, with a few small images.

A miniature reproduces what the dataset's source really delivers (docs/course.md): the folder
structure, the file names, the CSV files with their real columns (and the real header quirks),
and the junk real archives carry (macOS resource forks, a repeated tree, split lists, pixel CSVs
beside the images). Only the number and the size of the images are cut down. Every image is
distinct seeded content (a smooth random field, so larger images stay small as JPEG), at a size
inside the catalog's `min_side`/`max_side` wherever that is cheap (HAM10000 keeps its real
600x450), so those bounds are tested as the catalog states them.

Each builder also says what the catalog entry must make of it: every image it must accept (with
its class, source split, the splits it may end in, its group), every other manifest row with the
reason it must be set aside, and the validation overrides a miniature needs (only `min_per_class`
where the catalog asks for more images than a miniature holds; the test adds `expected_count`).

    mini = MINIATURES["gtsrb"]()
    mini.archive        # the zip to serve as the Kaggle dataset
    mini.tree           # the raw folder as fetch must leave it
    mini.accepted       # raw path -> Expected(label, source_split, splits, group)
    mini.set_aside      # manifest path -> prefix of the reason it must be set aside with

The builders read nothing from params.yaml: the Kaggle references, file names and class folders
are the real ones, so a catalog entry that disagrees with the real dataset fails its test.
"""

from __future__ import annotations

import csv
import io
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

TRAIN_VAL = frozenset({"train", "val"})
ANY_SPLIT = frozenset({"train", "val", "test"})


def only(split: str) -> frozenset[str]:
    return frozenset({split})


@dataclass(frozen=True)
class Expected:
    """An image the catalog entry must accept."""

    label: str  # the declared class it must get
    source_split: str | None  # the split the layout must read from the source
    splits: frozenset[str]  # the splits the split stage may put it in
    group: str | None = None  # the group it must carry (kept in one split)


@dataclass
class Miniature:
    dataset: str  # the catalog name
    # kaggle-dataset, kaggle-competition, local-zip, local-folder or keras
    source: str
    # The Kaggle reference (owner/slug, or the competition slug) the real data lives under.
    ref: str = ""
    # The bytes served: the Kaggle dataset zip, the competition bundle, the local zip, or the
    # keras cache archive (`keras_cache_file`).
    archive: bytes = b""
    # A Kaggle competition's files, served one by one (name -> bytes).
    files: dict[str, bytes] = field(default_factory=dict)
    keras_cache_file: str = ""
    # The raw folder as fetch must leave it: path -> bytes (None: any content, for files the
    # fetch itself writes).
    tree: dict[str, bytes | None] = field(default_factory=dict)
    accepted: dict[str, Expected] = field(default_factory=dict)
    # Manifest path (a file, or `<csv>::<row>` for a row naming no usable file) -> reason prefix.
    set_aside: dict[str, str] = field(default_factory=dict)
    # datasets.<name>.validation keys the miniature cannot satisfy, with the value to use.
    validation: dict[str, Any] = field(default_factory=dict)
    # What the miniature holds and why each override is needed, in words.
    notes: str = ""

    @property
    def manifest_rows(self) -> int:
        return len(self.accepted) + len(self.set_aside)


# --------------------------------------------------------------------------------------------
# Making images and archives.


class Painter:
    """Distinct images from one seed: a coarse random field scaled up (smooth, compresses well), of
    at least 4x4 values: 2x2 fields stretched to 16 px were gradients so alike that validate's
    perceptual hash found groups of them under different labels."""

    def __init__(self, name: str) -> None:
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))

    def pixels(self, size: tuple[int, int], mode: str = "RGB") -> np.ndarray:
        width, height = size
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        coarse = self.rng.integers(0, 256, (min(32, max(4, height // 6)), min(32, max(4, width // 6)), channels), dtype=np.uint8)
        image = Image.fromarray(coarse[..., 0] if channels == 1 else coarse)
        return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))

    def image(self, name: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
        """The encoded image, its format taken from the name's suffix."""
        image = Image.fromarray(self.pixels(size, mode))
        buffer = io.BytesIO()
        if name.lower().endswith((".jpg", ".jpeg")):
            image.save(buffer, format="JPEG", quality=90)
        else:
            image.save(buffer, format="PNG")
        return buffer.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as handle:
        for name, data in entries.items():
            handle.writestr(name, data)
    return buffer.getvalue()


def csv_bytes(header: list[str], rows: list[list[Any]], header_line: str | None = None) -> bytes:
    """A CSV as the datasets write them (\\n line ends); `header_line` replaces the header verbatim."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header_line is None:
        writer.writerow(header)
    else:
        buffer.write(header_line + "\n")
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


# What macOS leaves in a zip: a .DS_Store, and an AppleDouble `._name` beside each file in __MACOSX.
DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(2038)
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4070)


# --------------------------------------------------------------------------------------------
# The builders, one per catalog dataset.

MINIATURES: dict[str, Callable[[], Miniature]] = {}


def miniature(name: str) -> Callable[[Callable[[], Miniature]], Callable[[], Miniature]]:
    def register(build: Callable[[], Miniature]) -> Callable[[], Miniature]:
        MINIATURES[name] = build
        return build

    return register


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@miniature("cifar10")
def cifar10() -> Miniature:
    """keras.datasets.cifar10: the archive keras caches (cifar-10-python.tar.gz, kept under the
    name `cifar-10-batches-py-target_archive`), with 5 training batches of 10 images and a test
    batch of 20. Keras' own loader insists on 10,000 images a batch, so the test stands in for
    `keras.datasets.cifar10.load_data` with a reader of this archive; keras_datasets.fetch then
    writes the PNGs under train/<class>/ and test/<class>/ as it does for the real data."""
    rng = np.random.default_rng(zlib.crc32(b"cifar10"))
    batches: dict[str, tuple[np.ndarray, list[int]]] = {}
    for i in range(1, 6):
        labels = [int(v) for v in rng.permutation(10)]  # every class once per batch
        batches[f"data_batch_{i}"] = (rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), labels)
    test_labels = [k % 10 for k in range(20)]
    batches["test_batch"] = (rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), test_labels)

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        meta = {b"num_cases_per_batch": 10, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
        add("batches.meta", pickle.dumps(meta, protocol=2))
        for name, (images, labels) in batches.items():
            batch = {
                b"batch_label": name.encode(),
                b"labels": labels,
                # Rows of 3,072 bytes: all red, then green, then blue, as in the real batches.
                b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072).copy(),
                b"filenames": [f"{name}_{k}.png".encode() for k in range(len(labels))],
            }
            add(name, pickle.dumps(batch, protocol=2))
        add("readme.html", b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; url=http://www.cs.toronto.edu/~kriz/cifar.html\">")

    mini = Miniature("cifar10", "keras", ref="cifar10", archive=buffer.getvalue(),
                     keras_cache_file="cifar-10-batches-py-target_archive")
    train_labels = [label for i in range(1, 6) for label in batches[f"data_batch_{i}"][1]]
    for split, labels in (("train", train_labels), ("test", test_labels)):
        for index, label in enumerate(labels):
            path = f"{split}/{CIFAR10_CLASSES[label]}/{index:05d}.png"
            mini.tree[path] = None
            mini.accepted[path] = Expected(CIFAR10_CLASSES[label], split, TRAIN_VAL if split == "train" else only("test"))
    mini.validation = {"min_per_class": 1}
    mini.notes = "50 train (5 a class) + 20 test 32x32 images; min_per_class 5000 -> 1"
    return mini


@miniature("gtsrb")
def gtsrb() -> Miniature:
    """Kaggle meowmeowmeowmeowmeow/gtsrb-german-traffic-sign: Train/<class>/<class>_<track>_<frame>.png,
    Test/<n>.png, Train.csv and Test.csv (Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path),
    Meta/<class>.png with Meta.csv. 43 classes x 3 tracks x 2 frames, one test image a class."""
    paint = Painter("gtsrb")
    mini = Miniature("gtsrb", "kaggle-dataset", ref="meowmeowmeowmeowmeow/gtsrb-german-traffic-sign")
    header = ["Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path"]
    names = GTSRB_NAMES

    def roi(w: int, h: int) -> list[int]:
        return [max(1, w // 10), max(1, h // 10), w - max(1, w // 10), h - max(1, h // 10)]

    train_rows, test_rows = [], []
    for cls in range(43):
        for track in range(3):
            for frame in range(2):
                # A track is one sign approached: the frames grow.
                width, height = 16 + 5 * frame + 2 * track, 17 + 5 * frame + track
                path = f"Train/{cls}/{cls:05d}_{track:05d}_{frame:05d}.png"
                mini.tree[path] = paint.image(path, (width, height))
                train_rows.append([width, height, *roi(width, height), cls, path])
                mini.accepted[path] = Expected(names[cls], "train", TRAIN_VAL, f"{cls}/{cls:05d}_{track:05d}")
    for index in range(43):
        cls = (index * 7) % 43  # the test set is not ordered by class
        width, height = 20 + index % 9, 19 + index % 7
        path = f"Test/{index:05d}.png"
        mini.tree[path] = paint.image(path, (width, height))
        test_rows.append([width, height, *roi(width, height), cls, path])
        mini.accepted[path] = Expected(names[cls], "test", only("test"))
    mini.tree["Train.csv"] = csv_bytes(header, train_rows)
    mini.tree["Test.csv"] = csv_bytes(header, test_rows)
    meta_rows = []
    for cls in range(43):
        path = f"Meta/{cls}.png"
        mini.tree[path] = paint.image(path, (24, 24), "RGBA")
        meta_rows.append([path, cls, cls % 5, cls % 4, f"{1 + cls / 10:.2f}"])
        mini.set_aside[path] = "not listed in Train.csv or Test.csv"
    mini.tree["Meta.csv"] = csv_bytes(["Path", "ClassId", "ShapeId", "ColorId", "SignId"], meta_rows)
    mini.set_aside.update({
        "Train.csv": "label file (read by the layout)",
        "Test.csv": "label file (read by the layout)",
        "Meta.csv": "not an image file ('.csv')",
    })
    mini.archive = zip_bytes(mini.tree)
    mini.validation = {"min_per_class": 3}
    mini.notes = "258 train (3 tracks x 2 frames a class) + 43 test PNGs, 16-28 px; 43 Meta PNGs and Meta.csv; min_per_class 150 -> 3"
    return mini


GTSRB_NAMES = [
    "speed_limit_20", "speed_limit_30", "speed_limit_50", "speed_limit_60", "speed_limit_70", "speed_limit_80",
    "end_speed_limit_80", "speed_limit_100", "speed_limit_120", "no_passing", "no_passing_over_3_5t",
    "right_of_way_next_intersection", "priority_road", "yield", "stop", "no_vehicles", "over_3_5t_prohibited",
    "no_entry", "general_caution", "dangerous_curve_left", "dangerous_curve_right", "double_curve", "bumpy_road",
    "slippery_road", "road_narrows_right", "road_work", "traffic_signals", "pedestrians", "children_crossing",
    "bicycles_crossing", "beware_ice_snow", "wild_animals_crossing", "end_all_limits", "turn_right_ahead",
    "turn_left_ahead", "ahead_only", "straight_or_right", "straight_or_left", "keep_right", "keep_left",
    "roundabout_mandatory", "end_no_passing", "end_no_passing_over_3_5t",
]  # fmt: skip

FER_CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


@miniature("fer2013")
def fer2013() -> Miniature:
    """Kaggle msambare/fer2013: train/<class>/Training_<id>.jpg and test/<class>/PublicTest_<id>.jpg
    or PrivateTest_<id>.jpg, 48x48 grayscale JPEGs; 7 train and 3 test images a class."""
    paint = Painter("fer2013")
    mini = Miniature("fer2013", "kaggle-dataset", ref="msambare/fer2013")
    serial = 10000000
    for label in FER_CLASSES:
        for k in range(10):
            serial += 7919
            if k < 7:
                path, split = f"train/{label}/Training_{serial}.jpg", "train"
            else:
                usage = "PublicTest" if k % 2 else "PrivateTest"
                path, split = f"test/{label}/{usage}_{serial}.jpg", "test"
            mini.tree[path] = paint.image(path, (48, 48), "L")
            mini.accepted[path] = Expected(label, split, TRAIN_VAL if split == "train" else only("test"))
    mini.archive = zip_bytes(mini.tree)
    mini.validation = {"min_per_class": 10}
    mini.notes = "7 train + 3 test 48x48 gray JPEGs a class; min_per_class 100 -> 10"
    return mini


FER_COMPETITION = "challenges-in-representation-learning-facial-expression-recognition-challenge"
FER_EMOTIONS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]  # emotion 0..6


@miniature("fer2013_csv")
def fer2013_csv() -> Miniature:
    """The Kaggle competition's icml_face_data.csv: header `emotion, Usage, pixels` (with its
    leading spaces), 2,304 space-separated values a row. 4 Training, 2 PublicTest and 2
    PrivateTest rows an emotion, plus one planted truncated row (2,303 values) to be set aside.
    The competition bundle (train.csv, test.csv, example_submission.csv beside it) is served
    too; the catalog asks for the one file."""
    rng = np.random.default_rng(zlib.crc32(b"fer2013_csv"))
    mini = Miniature("fer2013_csv", "kaggle-competition", ref=FER_COMPETITION)
    rows, train_rows, test_rows = [], [], []
    for emotion, label in enumerate(FER_EMOTIONS):
        for k, usage in enumerate(["Training"] * 4 + ["PublicTest"] * 2 + ["PrivateTest"] * 2):
            values = " ".join(str(v) for v in rng.integers(0, 256, 48 * 48))
            rows.append([emotion, usage, values])
            split = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}[usage]
            mini.accepted[f"icml_face_data.csv::{len(rows) + 1}"] = Expected(label, split, only(split))
            if usage == "Training":
                train_rows.append([emotion, values])
            else:
                test_rows.append([values])
    truncated = " ".join(str(v) for v in rng.integers(0, 256, 48 * 48 - 1))
    rows.append([3, "Training", truncated])
    mini.set_aside[f"icml_face_data.csv::{len(rows) + 1}"] = "undecodable: 2303 pixel values, expected 2304 (48x48)"
    data = csv_bytes([], rows, header_line="emotion, Usage, pixels")
    mini.files = {"icml_face_data.csv": data}
    mini.archive = zip_bytes({
        "icml_face_data.csv": data,
        "train.csv": csv_bytes(["emotion", "pixels"], train_rows),
        "test.csv": csv_bytes(["pixels"], test_rows),
        "example_submission.csv": csv_bytes(["Emotion"], [[0]] * len(test_rows)),
    })
    mini.tree = {"icml_face_data.csv": data}
    mini.set_aside["icml_face_data.csv"] = "label file (read by the layout)"
    mini.validation = {"min_per_class": 8}
    mini.notes = "56 rows (4/2/2 Training/PublicTest/PrivateTest an emotion) + 1 truncated row; min_per_class 100 -> 8"
    return mini


@miniature("pneumonia")
def pneumonia() -> Miniature:
    """Kaggle paultimothymooney/chest-xray-pneumonia: chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/
    with the real file names (IM-0115-0001.jpeg, NORMAL2-IM-..., person1_bacteria_1.jpeg,
    person1_virus_6.jpeg), grayscale JPEGs (one RGB, as some real ones are). The real archive
    repeats the tree under chest_xray/chest_xray/ and carries chest_xray/__MACOSX/ resource
    forks and .DS_Store files: all planted, all to be set aside."""
    paint = Painter("pneumonia")
    mini = Miniature("pneumonia", "kaggle-dataset", ref="paultimothymooney/chest-xray-pneumonia")
    counts = {"train": 8, "val": 2, "test": 3}
    images: dict[str, bytes] = {}
    serial = 100
    for split, count in counts.items():
        for folder, label in (("NORMAL", "normal"), ("PNEUMONIA", "pneumonia")):
            for k in range(count):
                serial += 1
                if folder == "NORMAL":
                    name = f"IM-{serial:04d}-0001.jpeg" if k % 2 else f"NORMAL2-IM-{serial:04d}-0001.jpeg"
                else:
                    name = f"person{serial}_{'bacteria' if k % 2 else 'virus'}_{serial * 3}.jpeg"
                path = f"chest_xray/{split}/{folder}/{name}"
                mode = "RGB" if (split, folder, k) == ("train", "PNEUMONIA", 0) else "L"
                images[path] = paint.image(path, (120 + k * 4, 100 + k * 3), mode)
                source = "test" if split == "test" else "train"  # the catalog maps val into train
                mini.accepted[path] = Expected(label, source, only("test") if split == "test" else TRAIN_VAL)
    mini.tree.update(images)
    for path, data in images.items():
        copy = "chest_xray/chest_xray/" + path[len("chest_xray/"):]
        mini.tree[copy] = data
        mini.set_aside[copy] = "stray file: in folder 'chest_xray', not in a split folder"
        folder, name = copy.rsplit("/", 1)
        fork = f"chest_xray/__MACOSX/{folder[len('chest_xray/'):]}/._{name}"
        mini.tree[fork] = APPLE_DOUBLE
        mini.set_aside[fork] = f"hidden file ('._{name}')"  # a system's file wherever it lies, not a stray
    for store in ("chest_xray/.DS_Store", "chest_xray/train/.DS_Store", "chest_xray/train/NORMAL/.DS_Store",
                  "chest_xray/chest_xray/.DS_Store"):
        mini.tree[store] = DS_STORE
        mini.set_aside[store] = "hidden file ('.DS_Store')"
    mini.archive = zip_bytes(mini.tree)
    mini.validation = {"min_per_class": 13}
    mini.notes = ("8/2/3 train/val/test JPEGs a class, 100-150 px, repeated under chest_xray/chest_xray and "
                  "__MACOSX, 4 .DS_Store; min_per_class 500 -> 13")
    return mini


@miniature("covid19")
def covid19() -> Miniature:
    """Kaggle bachrr/covid-chest-xray: images/ and metadata.csv with the early columns (patientid,
    offset, sex, age, finding, survival, view, modality, date, location, filename, doi, url,
    license, clinical notes, other notes, and the unnamed trailing one). Several images per
    patient; findings as written then (COVID-19, "COVID-19, ARDS", SARS, Streptococcus,
    Pneumocystis, ARDS, No Finding). Planted: CT rows (filtered out), a finding the catalog does
    not map (Klebsiella), a row whose image is missing, and an image no row names."""
    paint = Painter("covid19")
    mini = Miniature("covid19", "kaggle-dataset", ref="bachrr/covid-chest-xray")
    header = ["patientid", "offset", "sex", "age", "finding", "survival", "view", "modality", "date", "location",
              "filename", "doi", "url", "license", "clinical notes", "other notes", ""]
    label_of = {"COVID-19": "covid19", "COVID-19, ARDS": "covid19", "SARS": "other_pneumonia",
                "Streptococcus": "other_pneumonia", "Pneumocystis": "other_pneumonia", "ARDS": "other_pneumonia",
                "No Finding": "no_finding"}
    # (patient, finding, view, modality, file name)
    cases = [
        (2, "COVID-19", "PA", "X-ray", "auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"),
        (2, "COVID-19", "PA", "X-ray", "auntminnie-b-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"),
        (2, "COVID-19", "Axial", "CT", "auntminnie-c-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"),
        (3, "COVID-19", "PA", "X-ray", "nejmc2001573_f1a.jpeg"),
        (3, "COVID-19", "PA", "X-ray", "nejmc2001573_f1b.jpeg"),
        (4, "COVID-19", "AP", "X-ray", "lancet-case2a.jpg"),
        (4, "COVID-19", "AP", "X-ray", "lancet-case2b.jpg"),
        (5, "COVID-19", "PA", "X-ray", "ryct.2020200034.fig2.jpeg"),
        (6, "COVID-19", "PA", "X-ray", "covid-19-pneumonia-15-PA.jpg"),
        (7, "COVID-19, ARDS", "AP Supine", "X-ray", "1-s2.0-S0140673620303706-fx1_lrg.jpg"),
        (8, "COVID-19", "PA", "X-ray", "covid-19-pneumonia-7-PA.jpg"),
        (9, "COVID-19", "PA", "X-ray", "covid-19-pneumonia-2.jpg"),
        (9, "COVID-19", "Axial", "CT", "covid-19-pneumonia-2-ct.jpg"),
        (10, "COVID-19", "AP", "X-ray", "covid-19-pneumonia-12.jpg"),
        (11, "COVID-19", "PA", "X-ray", "covid-19-pneumonia-mild.JPG"),
        (40, "SARS", "PA", "X-ray", "SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg"),
        (40, "SARS", "PA", "X-ray", "SARS-10.1148rg.242035193-g04mr34g0-Fig8b-day5.jpeg"),
        (41, "SARS", "PA", "X-ray", "SARS-10.1148rg.242035193-g04mr34g04a-Fig4a-day7.jpeg"),
        (42, "Streptococcus", "PA", "X-ray", "streptococcus-pneumoniae-pneumonia-1.jpg"),
        (43, "Streptococcus", "PA", "X-ray", "streptococcus-pneumoniae-pneumonia-temporal-evolution-1-day0.jpg"),
        (44, "Pneumocystis", "PA", "X-ray", "pneumocystis-pneumonia-1.jpg"),
        (45, "ARDS", "AP", "X-ray", "ards-secondary-to-tiger-snake-bite.png"),
        (46, "Klebsiella", "PA", "X-ray", "klebsiella-pneumonia-1.jpeg"),
        (60, "No Finding", "PA", "X-ray", "right-upper-lobe-pneumonia-9-PA.jpg"),
        (61, "No Finding", "PA", "X-ray", "normal-xray-1.jpeg"),
        (62, "No Finding", "PA", "X-ray", "normal-xray-2.jpeg"),
        (63, "No Finding", "AP", "X-ray", "normal-xray-3.png"),
        (64, "No Finding", "PA", "X-ray", "normal-xray-4.jpeg"),
        (65, "No Finding", "PA", "X-ray", "normal-xray-5.jpeg"),
        (12, "COVID-19", "PA", "X-ray", "covid-19-missing-file.jpeg"),  # listed, but not in images/
    ]
    rows = []
    for row, (patient, finding, view, modality, name) in enumerate(cases, start=2):
        rows.append([patient, row % 5, "M" if row % 2 else "F", 40 + row, finding, "Y" if row % 3 else "",
                     view, modality, "2020", "Wuhan, China", name, "10.1056/NEJMc2001573", "https://example.org/case",
                     "CC BY-NC-SA", "clinical notes", "", ""])
        path = f"images/{name}"
        if name == "covid-19-missing-file.jpeg":
            mini.set_aside[f"metadata.csv::{row}"] = f"missing: listed in metadata.csv row {row}"
            continue
        mini.tree[path] = paint.image(path, (110 + row, 100 + row % 7), "L" if row % 3 else "RGB")
        if modality != "X-ray":
            mini.set_aside[path] = f"filtered out: metadata.csv row {row} has modality 'CT'"
        elif finding not in label_of:
            mini.set_aside[path] = f"label {finding!r} is not among the declared classes"
        else:
            mini.accepted[path] = Expected(label_of[finding], None, ANY_SPLIT, str(patient))
    stray = "images/covid-19-caso-70-1-PA.jpg"  # an image no row names
    mini.tree[stray] = paint.image(stray, (120, 110))
    mini.set_aside[stray] = "not listed in metadata.csv"
    mini.tree["metadata.csv"] = csv_bytes(header, rows)
    mini.set_aside["metadata.csv"] = "label file (read by the layout)"
    mini.archive = zip_bytes(mini.tree)
    mini.notes = ("26 X-ray images of 23 patients (covid19 13, other_pneumonia 7, no_finding 6), 2 CT rows, "
                  "1 Klebsiella row, 1 row with a missing file, 1 unlisted image; 100-140 px; no override")
    return mini


@miniature("facemask")
def facemask() -> Miniature:
    """Kaggle ashishjangra27/face-mask-12k-images-dataset: Face Mask Dataset/{Train,Validation,Test}/
    {WithMask,WithoutMask}/*.png with the real naming (plain numbers, Augmented_<n>_<n>.png)."""
    paint = Painter("facemask")
    mini = Miniature("facemask", "kaggle-dataset", ref="ashishjangra27/face-mask-12k-images-dataset")
    for folder, split, count in (("Train", "train", 6), ("Validation", "val", 2), ("Test", "test", 2)):
        for klass, label in (("WithMask", "with_mask"), ("WithoutMask", "without_mask")):
            for k in range(count):
                name = f"Augmented_{k}_{1000 + 37 * k}.png" if klass == "WithMask" and k % 2 else f"{100 + 13 * k}.png"
                path = f"Face Mask Dataset/{folder}/{klass}/{name}"
                mini.tree[path] = paint.image(path, (24 + 5 * k, 24 + 5 * k))
                mini.accepted[path] = Expected(label, split, only(split))
    mini.archive = zip_bytes(mini.tree)
    mini.validation = {"min_per_class": 10}
    mini.notes = "6/2/2 Train/Validation/Test PNGs a class, 24-49 px; min_per_class 300 -> 10"
    return mini


GARBAGE = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]


@miniature("garbage")
def garbage() -> Miniature:
    """Kaggle asdasdasasdas/garbage-classification: Garbage classification/Garbage classification/
    <class>/<class><n>.jpg (4:3 photos), with the split lists (one-indexed-files*.txt,
    zero-indexed-files.txt) at the top, outside the class folders."""
    paint = Painter("garbage")
    mini = Miniature("garbage", "kaggle-dataset", ref="asdasdasasdas/garbage-classification")
    lines = []
    for number, label in enumerate(GARBAGE, start=1):
        for k in range(1, 11):
            name = f"{label}{k}.jpg"
            path = f"Garbage classification/Garbage classification/{label}/{name}"
            mini.tree[path] = paint.image(path, (136, 102))
            mini.accepted[path] = Expected(label, None, ANY_SPLIT)
            lines.append((name, number))
    lists = {
        "one-indexed-files.txt": lines,
        "one-indexed-files-notrash_train.txt": lines[0::3],
        "one-indexed-files-notrash_val.txt": lines[1::3],
        "one-indexed-files-notrash_test.txt": lines[2::3],
        "zero-indexed-files.txt": [(name, number - 1) for name, number in lines],
    }
    for name, entries in lists.items():
        mini.tree[name] = "".join(f"{file} {number}\n" for file, number in entries).encode()
        mini.set_aside[name] = "outside the layout root 'Garbage classification/Garbage classification'"
    mini.archive = zip_bytes(mini.tree)
    mini.validation = {"min_per_class": 10}
    mini.notes = "10 JPEGs a class at 136x102, 5 split-list .txt files; min_per_class 100 -> 10"
    return mini


FOOD11 = ["bread", "dairy_product", "dessert", "egg", "fried_food", "meat", "noodles_pasta", "rice", "seafood",
          "soup", "vegetable_fruit"]


@miniature("food11")
def food11() -> Miniature:
    """EPFL Food-11.zip (a local download): training/, validation/ and evaluation/ holding
    <classid>_<n>.jpg files, 3/2/2 a class."""
    paint = Painter("food11")
    mini = Miniature("food11", "local-zip", ref="Food-11.zip")
    for folder, split, count in (("training", "train", 3), ("validation", "val", 2), ("evaluation", "test", 2)):
        for classid, label in enumerate(FOOD11):
            for n in range(count):
                path = f"{folder}/{classid}_{n}.jpg"
                mini.tree[path] = paint.image(path, (72 + n * 8, 54 + n * 6))
                mini.accepted[path] = Expected(label, split, only(split))
    mini.archive = zip_bytes(mini.tree)
    mini.validation = {"min_per_class": 7}
    mini.notes = "3/2/2 training/validation/evaluation JPEGs a class, 54-88 px; min_per_class 100 -> 7"
    return mini


@miniature("mango")
def mango() -> Miniature:
    """AICUP mango (a local folder): C1-P1_Train/ and C1-P1_Dev/ with train.csv and dev.csv
    (image_id,label; image_id is the file name, e.g. 00002.jpg). 8 train and 3 dev images a grade."""
    paint = Painter("mango")
    mini = Miniature("mango", "local-folder", ref="aicup_mango")
    tables = {"train.csv": [], "dev.csv": []}
    number = 1
    for grade in ("A", "B", "C"):
        for k in range(11):
            number += 3
            csv_name, folder, split = ("train.csv", "C1-P1_Train", "train") if k < 8 else ("dev.csv", "C1-P1_Dev", "test")
            name = f"{number:05d}.jpg"
            path = f"{folder}/{name}"
            mini.tree[path] = paint.image(path, (160, 120))
            tables[csv_name].append([name, grade])
            mini.accepted[path] = Expected(grade, split, TRAIN_VAL if split == "train" else only("test"))
    for csv_name, rows in tables.items():
        mini.tree[csv_name] = csv_bytes(["image_id", "label"], rows)
        mini.set_aside[csv_name] = "label file (read by the layout)"
    mini.validation = {"min_per_class": 11}
    mini.notes = "8 train + 3 dev JPEGs a grade at 160x120; min_per_class 100 -> 11"
    return mini


def _class_folders(name: str, ref: str, folders: dict[str, str], per_class: int) -> Miniature:
    """A dataset of one folder per class at the top of the archive (folder name -> class)."""
    paint = Painter(name)
    mini = Miniature(name, "kaggle-dataset", ref=ref)
    for folder, label in folders.items():
        for k in range(per_class):
            path = f"{folder}/{folder.replace(' ', '_')}_{k + 1}.jpg"
            mini.tree[path] = paint.image(path, (80 + 4 * k, 60 + 3 * k))
            mini.accepted[path] = Expected(label, None, ANY_SPLIT)
    mini.archive = zip_bytes(mini.tree)
    return mini


@miniature("birds")
def birds() -> Miniature:
    """Kaggle rkuo2000/birds2: a folder per class (blue_tit, pica_pica), 10 JPEGs each."""
    mini = _class_folders("birds", "rkuo2000/birds2", {"blue_tit": "blue_tit", "pica_pica": "pica_pica"}, 10)
    mini.notes = "10 JPEGs a class, 60-116 px; no override (min_per_class is 10)"
    return mini


@miniature("worms")
def worms() -> Miniature:
    """Kaggle rkuo2000/worms4: a folder per class. docs/course.md names the classes "cabbage worm,
    corn earworm, cutworm, fall armyworm" (with spaces, where it writes birds' blue_tit and
    pica_pica with underscores), so the folders here are named with spaces."""
    folders = {"cabbage worm": "cabbage_worm", "corn earworm": "corn_earworm", "cutworm": "cutworm",
               "fall armyworm": "fall_armyworm"}
    mini = _class_folders("worms", "rkuo2000/worms4", folders, 10)
    mini.notes = "10 JPEGs a class in folders named as docs/course.md writes them (spaces); no override"
    return mini


@miniature("railtrack")
def railtrack() -> Miniature:
    """Kaggle salmaneunus/railway-track-fault-detection: Railway Track fault Detection Updated/
    {Train,Validation,Test}/{Defective,Non defective}/*.jpg, 14/3/3 a class."""
    paint = Painter("railtrack")
    mini = Miniature("railtrack", "kaggle-dataset", ref="salmaneunus/railway-track-fault-detection")
    for folder, split, count in (("Train", "train", 14), ("Validation", "val", 3), ("Test", "test", 3)):
        for klass, label in (("Defective", "defective"), ("Non defective", "non_defective")):
            for k in range(count):
                path = f"Railway Track fault Detection Updated/{folder}/{klass}/IMG_2020111{k % 10}_{split}{k}.jpg"
                mini.tree[path] = paint.image(path, (96 + k, 72 + k))
                mini.accepted[path] = Expected(label, split, only(split))
    mini.archive = zip_bytes(mini.tree)
    mini.notes = "14/3/3 Train/Validation/Test JPEGs a class (20 a class), 72-109 px; no override (min_per_class is 20)"
    return mini


HAM_CLASSES = {"akiec": "actinic_keratosis", "bcc": "basal_cell_carcinoma", "bkl": "benign_keratosis",
               "df": "dermatofibroma", "mel": "melanoma", "nv": "melanocytic_nevus", "vasc": "vascular_lesion"}


@miniature("ham10000")
def ham10000() -> Miniature:
    """Kaggle kmader/skin-cancer-mnist-ham10000: HAM10000_images_part_1/ and _part_2/ of
    ISIC_<7 digits>.jpg at the real 600x450, HAM10000_metadata.csv (lesion_id,image_id,dx,dx_type,
    age,sex,localization) where several images share a lesion, and the hmnist_*.csv pixel
    versions beside them. 5 lesions a class, 1-3 images each."""
    paint = Painter("ham10000")
    mini = Miniature("ham10000", "kaggle-dataset", ref="kmader/skin-cancer-mnist-ham10000")
    rows = []
    image_number, lesion_number = 24306, 118
    for dx, label in HAM_CLASSES.items():
        for lesion in range(5):
            lesion_number += 97
            lesion_id = f"HAM_{lesion_number:07d}"
            for _ in range(1 + (lesion_number % 3)):
                image_number += 137
                image_id = f"ISIC_{image_number:07d}"
                # part_1 holds ISIC_0024306..ISIC_0029305, part_2 the rest.
                part = 1 if image_number <= 29305 else 2
                path = f"HAM10000_images_part_{part}/{image_id}.jpg"
                mini.tree[path] = paint.image(path, (600, 450))
                rows.append([lesion_id, image_id, dx, ["histo", "follow_up", "consensus"][lesion % 3],
                             f"{35 + lesion * 5}.0", ["male", "female"][lesion % 2], ["back", "face", "trunk"][lesion % 3]])
                mini.accepted[path] = Expected(label, None, ANY_SPLIT, lesion_id)
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    mini.tree["HAM10000_metadata.csv"] = csv_bytes(header, rows)
    mini.set_aside["HAM10000_metadata.csv"] = "label file (read by the layout)"
    rng = np.random.default_rng(7)
    for side, channels in ((8, 1), (8, 3), (28, 1), (28, 3)):
        columns = [f"pixel{i:04d}" for i in range(side * side * channels)] + ["label"]
        values = [[*rng.integers(0, 256, side * side * channels).tolist(), k % 7] for k in range(3)]
        name = f"hmnist_{side}_{side}_{'L' if channels == 1 else 'RGB'}.csv"
        mini.tree[name] = csv_bytes(columns, values)
        mini.set_aside[name] = "not an image file ('.csv')"
    mini.archive = zip_bytes(mini.tree)
    mini.validation = {"min_per_class": 5}
    mini.notes = "5 lesions a class, 1-3 JPEGs a lesion at the real 600x450, 4 hmnist CSVs; min_per_class 100 -> 5"
    return mini
