"""Every dataset of the course catalog, end to end on a miniature of the real dataset.

For each catalog entry in params.yaml (all but digits, which test_pipeline runs for real), the
miniature built by tests/miniatures.py (the real folders, file names and CSV columns, a few small
images, the junk the real archive carries) is served the way the catalog says the data comes:

- a Kaggle dataset or competition: through tests/fake_kaggle.py, under the real reference and the
  catalog's pinned version, fetched by the real `kaggle` client;
- a local download: the zip or folder put where the catalog's `source.path` says, in a temporary
  project folder that is the working folder of the stages;
- keras: the archive keras caches, in a temporary keras home (keras itself stands aside, see
  `fake_keras`).

Then fetch, validate and split run as functions on a copy of params.yaml in which only what a
miniature cannot satisfy is changed: `validation.min_per_class` (the miniature's own count, given
by each builder) and `validation.expected_count` (the miniature's exact number of manifest rows,
tolerance 0). Source, layout, classes, image size, channels, the split policy and the image size
bounds are the catalog's own: that is what is tested. The checks: the provenance names the real
source and the archive's sha256, the raw folder is the archive's content, every file is accepted
with its class, source split and group or set aside with the reason it deserves, every expectation
holds, and the split keeps the source's splits (carving only what the catalog says), keeps each
group in one split, and writes (N, image_size, image_size, channels) arrays for the catalog's classes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import os
import pickle
import subprocess
import sys
import tarfile
import types
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
import yaml

from fake_kaggle import FakeKaggle
from miniatures import MINIATURES, Miniature

from stages.fetch import fetch
from stages.split import split
from stages.validate import validate

REPO = Path(__file__).resolve().parents[1]
CATALOG = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
# digits is the embedded demo (scikit-learn's own data): test_pipeline runs it for real.
COURSE = sorted(
    name
    for name, entry in CATALOG["datasets"].items()
    # Open Images entries are run through fetch, validate and split against a fake bucket in
    # tests/test_openimages.py (test_the_catalogs_open_images_entry_fetches_validates_and_splits).
    if name != "digits" and entry["source"]["kind"] != "openimages"
)
SPLITS = ("train", "val", "test")

# Catalog entries that cannot pass on a miniature of the real data: a catalog (or code) problem,
# reported with the change that fixes it. strict: the fix makes the test pass and must drop the mark.
KNOWN_PROBLEMS: dict[str, str] = {}


def course_params() -> list[Any]:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_PROBLEMS[name]))
        if name in KNOWN_PROBLEMS
        else name
        for name in COURSE
    ]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def write_tree(root: Path, tree: dict[str, bytes | None]) -> None:
    for name, data in tree.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data or b"")


def text_or_none(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def write_params(project: Path, name: str, mini: Miniature, **validation: Any) -> Path:
    """params.yaml copied into `project`, with only the miniature's validation overrides."""
    params = copy.deepcopy(CATALOG)
    rules = params["datasets"][name]["validation"]
    rules.update(mini.validation)
    if "expected_count" in rules:
        # The catalog documents the real archive's count; the miniature's is exact.
        rules["expected_count"] = mini.manifest_rows
        rules["expected_count_tolerance"] = 0.0
    rules.update(validation)
    project.mkdir(parents=True, exist_ok=True)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Serving a miniature the way its catalog source obtains the data.


def read_cifar10_archive(archive: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """What keras.datasets.cifar10.load_data returns for the archive keras caches: its batches
    unpickled as keras' cifar.load_batch does, (N, 32, 32, 3) uint8 images and (N, 1) labels.
    Only keras' fixed 10,000 images a batch is left out."""
    batches = {}
    with tarfile.open(archive) as handle:
        for member in handle:
            name = member.name.rsplit("/", 1)[-1]
            if name.startswith(("data_batch_", "test_batch")):
                batch = pickle.load(handle.extractfile(member), encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                batches[name] = (data.reshape(len(data), 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.uint8))
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    x_train = np.concatenate([x for x, _ in train]).transpose(0, 2, 3, 1)
    y_train = np.concatenate([y for _, y in train]).reshape(-1, 1)
    x_test, y_test = batches["test_batch"]
    return (x_train, y_train), (x_test.transpose(0, 2, 3, 1), y_test.reshape(-1, 1))


def fake_keras(monkeypatch: pytest.MonkeyPatch, home: Path, name: str) -> None:
    """Stand keras aside for keras_datasets.fetch: its cache folder is `home`/datasets and
    `keras.datasets.<name>.load_data` reads the miniature archive cached there.

    Keras' cifar10 loader fills fixed arrays of 5 x 10,000 training images, so a miniature cannot
    pass through it, and 60,000 real-size images would take minutes to write, validate and split;
    tests/test_keras_datasets.py runs keras' own loaders (mnist, fashion_mnist, cifar100, which
    shares cifar10's code) against its cache. Everything after load_data is the stage's own code.
    """
    cache = home / "datasets"

    def load_data() -> Any:
        return read_cifar10_archive(cache / "cifar-10-batches-py-target_archive")

    keras = types.ModuleType("keras")
    keras.__version__ = importlib.metadata.version("keras")
    keras.datasets = types.SimpleNamespace(**{name: types.SimpleNamespace(load_data=load_data)})
    keras.config = types.SimpleNamespace(image_data_format=lambda: "channels_last")
    src = types.ModuleType("keras.src")
    backend = types.ModuleType("keras.src.backend")
    backend.config = types.SimpleNamespace(keras_home=lambda: str(home))
    src.backend = backend
    keras.src = src
    for module_name, module in (("keras", keras), ("keras.src", src), ("keras.src.backend", backend)):
        monkeypatch.setitem(sys.modules, module_name, module)


@contextlib.contextmanager
def served(mini: Miniature, source: dict[str, Any], project: Path, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKaggle | None]:
    if mini.source.startswith("kaggle"):
        with FakeKaggle(tmp_path) as fake:
            fake.apply(monkeypatch)
            if mini.source == "kaggle-dataset":
                fake.add_dataset(mini.ref, mini.archive, version=source.get("version") or 1)
            else:
                fake.add_competition(mini.ref, mini.archive, files=mini.files)
            yield fake
    elif mini.source == "local-zip":
        target = project / source["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(mini.archive)
        yield None
    elif mini.source == "local-folder":
        write_tree(project / source["path"], mini.tree)
        yield None
    elif mini.source == "keras":
        home = tmp_path / "keras_home"
        (home / "datasets").mkdir(parents=True)
        (home / "datasets" / mini.keras_cache_file).write_bytes(mini.archive)
        fake_keras(monkeypatch, home, source["name"])
        yield None
    else:  # pragma: no cover - a builder bug
        raise ValueError(f"unknown miniature source {mini.source!r}")


# --------------------------------------------------------------------------------------------
# The checks.


def check_provenance(record: dict, mini: Miniature, entry: dict, project: Path, fake: FakeKaggle | None) -> None:
    source = entry["source"]
    assert source["kind"] == mini.source.split("-")[0], f"the catalog's source kind is {source['kind']!r}"
    assert record["refused"] == []
    if mini.source == "kaggle-dataset":
        version = source.get("version")
        assert source.get("dataset") == mini.ref, f"the real dataset is kaggle {mini.ref}"
        assert record["origin"] == f"kaggle dataset {mini.ref} version {version}"
        assert record["version"] == version
        slug = mini.ref.split("/")[1]
        assert record["archives"] == [{"name": f"{slug}.zip", "sha256": sha256(mini.archive), "bytes": len(mini.archive)}]
        owner = mini.ref.split("/")[0]
        asked = [(s.body.get("ownerSlug"), s.body.get("datasetSlug"), s.body.get("datasetVersionNumber"))
                 for s in fake.rpc("DownloadDataset")]
        assert asked == [(owner, slug, version)]
    elif mini.source == "kaggle-competition":
        files = source.get("files") or []
        assert source.get("competition") == mini.ref, f"the real competition is {mini.ref}"
        assert record["origin"] == f"kaggle competition {mini.ref}" + (f", files {', '.join(files)}" if files else "")
        expected = [
            {"name": f"files/{name}", "sha256": sha256(mini.files[name]), "bytes": len(mini.files[name])}
            for name in files
        ] or [{"name": f"{mini.ref}.zip", "sha256": sha256(mini.archive), "bytes": len(mini.archive)}]
        assert record["archives"] == expected
    elif mini.source == "local-zip":
        path = (project / source["path"]).resolve()
        assert path.name == mini.ref, f"the real download is named {mini.ref}"
        assert record["origin"] == f"local archive {source['path']}"
        assert record["archives"] == [{"name": path.name, "sha256": sha256(mini.archive), "bytes": len(mini.archive)}]
    elif mini.source == "local-folder":
        path = (project / source["path"]).resolve()
        assert path.name == mini.ref, f"the real folder is named {mini.ref}"
        assert record["origin"] == f"local folder {source['path']}"
        assert record["archives"] == []
    else:
        assert source["name"] == mini.ref
        assert record["origin"] == f"keras.datasets.{mini.ref} (keras {importlib.metadata.version('keras')})"
        assert record["archives"] == [
            {"name": mini.keras_cache_file, "sha256": sha256(mini.archive), "bytes": len(mini.archive)}
        ]
        splits = Counter(path.split("/")[0] for path in mini.tree)
        assert record["counts"] == {"train": splits["train"], "test": splits["test"]}


def check_raw(raw: Path, mini: Miniature, record: dict) -> None:
    found = files_under(raw)
    assert sorted(found) == sorted(mini.tree)
    assert {k: v for k, v in found.items() if mini.tree[k] is not None} == {
        k: v for k, v in mini.tree.items() if v is not None
    }
    assert record["files"] == len(mini.tree)
    assert record["bytes"] == sum(len(v) for v in found.values())


def check_manifest(manifest: pd.DataFrame, summary: dict, mini: Miniature, classes: list[str]) -> None:
    assert manifest["path"].is_unique
    rows = {row.path: row for row in manifest.itertuples(index=False)}
    assert sorted(set(rows) - set(mini.accepted) - set(mini.set_aside)) == [], "manifest rows the miniature does not expect"
    missing = sorted((set(mini.accepted) | set(mini.set_aside)) - set(rows))
    assert missing == [], "files the manifest does not account for"

    wrong = {}
    for path, expected in mini.accepted.items():
        row = rows[path]
        got = (row.status, row.label, text_or_none(row.source_split), text_or_none(row.group))
        want = ("ok", expected.label, expected.source_split, expected.group)
        if got != want:
            wrong[path] = f"{got} (reason {row.reason!r}), expected {want}"
    for path, prefix in mini.set_aside.items():
        row = rows[path]
        if row.status != "set_aside" or not str(row.reason).startswith(prefix):
            wrong[path] = f"{row.status} {row.reason!r}, expected set aside: {prefix!r}..."
    shown = dict(list(wrong.items())[:8])
    assert not wrong, f"{len(wrong)} rows not as expected: {json.dumps(shown, indent=1)}"

    assert summary["files"] == summary["accepted"] + summary["set_aside"] == mini.manifest_rows
    assert summary["accepted"] == len(mini.accepted) and summary["set_aside"] == len(mini.set_aside)
    per_class = Counter(expected.label for expected in mini.accepted.values())
    assert summary["per_class"] == {name: per_class[name] for name in classes}
    assert all(count > 0 for count in summary["per_class"].values()), "every declared class has images"
    assert summary["rules_failed"] == 0, summary


def check_split(out: Path, counts: dict[str, int], mini: Miniature, entry: dict) -> None:
    classes = [str(c) for c in entry["classes"]]
    assert json.loads((out / "classes.json").read_text(encoding="utf-8")) == classes
    frame = pd.read_parquet(out / "splits.parquet")
    assert sorted(frame["path"]) == sorted(mini.accepted)
    misplaced = {
        path: f"{split} (allowed: {sorted(mini.accepted[path].splits)})"
        for path, split in zip(frame["path"], frame["split"])
        if split not in mini.accepted[path].splits
    }
    assert not misplaced, f"{len(misplaced)} images in a split the source does not allow: {dict(list(misplaced.items())[:8])}"
    assert counts == {split: int((frame["split"] == split).sum()) for split in SPLITS}
    assert all(counts[split] > 0 for split in SPLITS), counts
    assert set(frame.loc[frame["split"] == "train", "label"]) == set(classes), "every class is in train"
    grouped = frame[frame["group"].notna()]
    if len(grouped):
        assert grouped.groupby("group")["split"].nunique().max() == 1, "a group spans splits"
    size, channels = entry["image_size"], entry["channels"]
    digest = hashlib.sha256()  # of the arrays, as meta.json records it
    for part in SPLITS:
        images = np.load(out / f"{part}_x.npy", mmap_mode="r")
        labels = np.load(out / f"{part}_y.npy")
        digest.update(np.ascontiguousarray(images).tobytes())
        digest.update(labels.astype("<i4").tobytes())
        assert images.shape == (counts[part], size, size, channels) and images.dtype == np.uint8
        assert labels.tolist() == [classes.index(label) for label in frame.loc[frame["split"] == part, "label"]]
        assert images.max() > 0
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta == {"dataset": mini.dataset, "image_size": size, "channels": channels, "counts": counts,
                    "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------------------------
# The tests.


def test_every_course_dataset_has_a_miniature():
    """A dataset added to the catalog without a miniature (or a miniature left behind) fails here."""
    assert sorted(MINIATURES) == COURSE


@pytest.mark.parametrize("name", course_params())
def test_fetch_validate_split_on_the_miniature(name, tmp_path, monkeypatch):
    assert name in MINIATURES, f"no miniature for datasets.{name}: add a builder to tests/miniatures.py"
    mini = MINIATURES[name]()
    entry = CATALOG["datasets"][name]
    project = tmp_path / "project"
    write_params(project, name, mini)
    monkeypatch.chdir(project)
    raw, provenance = Path("data/raw") / name, Path("data/raw") / f"{name}.provenance.json"
    manifest = Path("data/interim") / name / "manifest.parquet"
    docs, summary_path = Path("reports/validation") / name / "docs", Path("reports/validation") / name / "summary.json"
    out = Path("data/processed") / name

    with served(mini, entry["source"], project, tmp_path, monkeypatch) as fake:
        record = fetch(name, "params.yaml", raw, provenance)
    check_provenance(record, mini, entry, project, fake)
    assert json.loads(provenance.read_text(encoding="utf-8")) == record
    check_raw(raw, mini, record)

    summary = validate(name, "params.yaml", raw, manifest, docs, summary_path)
    check_manifest(pd.read_parquet(manifest), summary, mini, [str(c) for c in entry["classes"]])

    counts = split(name, "params.yaml", manifest, raw, out)
    check_split(out, counts, mini, entry)


def test_fetch_cli_fetches_a_catalog_kaggle_dataset_in_a_subprocess(tmp_path, monkeypatch):
    """`python -m stages.fetch` as dvc.yaml runs it, with the fake reached through the environment
    only (proxy, CA bundle, kaggle.json, downloads folder), on the catalog's birds entry."""
    mini = MINIATURES["birds"]()
    source = CATALOG["datasets"]["birds"]["source"]
    project = tmp_path / "project"
    write_params(project, "birds", mini)
    with FakeKaggle(tmp_path) as fake:
        fake.apply(monkeypatch)
        fake.add_dataset(mini.ref, mini.archive, version=source["version"])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        completed = subprocess.run(
            [sys.executable, "-m", "stages.fetch", "--dataset", "birds", "--out", "data/raw/birds",
             "--provenance", "data/raw/birds.provenance.json"],
            cwd=project, env=env, capture_output=True, text=True, timeout=300,
        )
        downloads = fake.count("GET", f"/kaggle-fake/datasets/{mini.ref}/{source['version']}/birds2.zip")

    assert completed.returncode == 0, completed.stderr[-3000:]
    raw = project / "data" / "raw" / "birds"
    assert files_under(raw) == mini.tree
    size = sum(len(data) for data in mini.tree.values())
    assert completed.stdout.strip() == (
        f"fetch@birds: {len(mini.tree)} files, {size:,} bytes in data/raw/birds; downloaded: True"
    )
    record = json.loads((project / "data" / "raw" / "birds.provenance.json").read_text(encoding="utf-8"))
    assert record["origin"] == f"kaggle dataset rkuo2000/birds2 version {source['version']}"
    assert record["archives"][0]["sha256"] == sha256(mini.archive)
    assert downloads == 1
    assert fake.key not in completed.stdout + completed.stderr
