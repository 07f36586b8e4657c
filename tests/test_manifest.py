"""The manifest: one row per raw file, bad files set aside with a reason; validate end to end."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests import toy
from stages import layouts
from stages.config import DatasetConfig, SplitPolicy, ValidationRules, parse_params
from stages.errors import UserError
from stages.validate import COLUMNS, build_manifest, validate

CLASSES = ["a", "b", "c"]


def write_png(path: Path, seed: int, size: int = 8, mode: str = "L") -> Path:
    """A small PNG of seeded noise (distinct content per seed) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def toy_params(layout: dict[str, Any] | None = None, classes: list[str] = CLASSES, **dataset: Any) -> dict:
    """A minimal params mapping with one dataset, `toy`, read from a local folder."""
    return toy.toy_params(classes, layout=layout or {"kind": "folders"}, **dataset)


def toy_config(layout: dict[str, Any] | None = None, **dataset: Any) -> DatasetConfig:
    """The `toy` DatasetConfig, parsed through the real params parser."""
    return parse_params(toy_params(layout, **dataset), "test-params.yaml").datasets["toy"]


def by_path(manifest: pd.DataFrame) -> dict[str, dict]:
    """Manifest rows keyed by path."""
    return {row["path"]: row for row in manifest.to_dict("records")}


# --------------------------------------------------------------------------------------------
# A dataset with every kind of bad file, under a train/test splits layout.


@pytest.fixture
def messy_raw(tmp_path) -> Path:
    """train/ and test/ folders of three classes, plus one of every kind of file to set aside."""
    raw = tmp_path / "raw"
    seed = 0
    for split, count in (("train", 3), ("test", 2)):
        for label in CLASSES:
            for index in range(count):
                seed += 1
                write_png(raw / split / label / f"{index}.png", seed)
    # Undecodable: a real PNG cut short, and an empty file.
    good = write_png(tmp_path / "whole.png", seed=900, size=32)
    (raw / "train" / "a" / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (raw / "train" / "a" / "empty.png").write_bytes(b"")
    # Files no class folder holds, and a file that is not an image.
    (raw / "README.txt").write_text("about this dataset", encoding="utf-8")
    (raw / "train" / "loose.png").write_bytes((raw / "train" / "a" / "0.png").read_bytes())
    (raw / "train" / "b" / "notes.txt").write_text("taken on a Tuesday", encoding="utf-8")
    # A class folder the params do not declare.
    write_png(raw / "train" / "zebra" / "0.png", seed=901)
    # One content under two labels.
    write_png(raw / "train" / "a" / "twin.png", seed=902)
    shutil.copyfile(raw / "train" / "a" / "twin.png", raw / "train" / "b" / "twin.png")
    # One content in both train and test, same label.
    write_png(raw / "test" / "c" / "shared.png", seed=903)
    shutil.copyfile(raw / "test" / "c" / "shared.png", raw / "train" / "c" / "shared.png")
    return raw


SPLITS_LAYOUT = {"kind": "folders", "splits": {"train": "train", "test": "test"}}


def test_manifest_accounts_for_every_file_with_the_stage_columns(messy_raw):
    """One row per file under raw, in the stage's column order, each ok or set aside."""
    manifest = build_manifest(messy_raw, toy_config(SPLITS_LAYOUT))

    assert list(manifest.columns) == COLUMNS
    files = layouts.all_files(messy_raw)
    assert sorted(manifest["path"]) == files
    assert manifest["path"].is_unique
    assert set(manifest["status"]) == {"ok", "set_aside"}
    ok = int((manifest["status"] == "ok").sum())
    aside = int((manifest["status"] == "set_aside").sum())
    assert len(files) == ok + aside == len(manifest)
    assert (manifest.loc[manifest["status"] == "set_aside", "reason"].str.len() > 0).all()
    assert (manifest.loc[manifest["status"] == "ok", "reason"] == "").all()


def test_each_bad_file_is_set_aside_with_its_reason(messy_raw):
    """Every bad file is set aside, with a reason saying what is wrong with it."""
    rows = by_path(build_manifest(messy_raw, toy_config(SPLITS_LAYOUT)))

    def reason(path: str) -> str:
        assert rows[path]["status"] == "set_aside", path
        return rows[path]["reason"]

    assert reason("train/a/truncated.png").startswith("undecodable: ")
    assert reason("train/a/empty.png") == "undecodable: empty file"
    assert reason("README.txt").startswith("stray file: in the layout root, not in a split folder")
    assert reason("train/loose.png") == "stray file: not inside a class folder"
    assert reason("train/b/notes.txt") == "not an image file ('.txt')"
    assert reason("train/zebra/0.png") == "label 'zebra' is not among the declared classes"
    assert reason("train/a/twin.png") == "ambiguous: the same image appears under labels a, b"
    assert reason("train/b/twin.png") == "ambiguous: the same image appears under labels a, b"
    assert reason("train/c/shared.png") == "leak: the same image is in the test split as test/c/shared.png"
    # The held-out copy of the leaked image is the one kept.
    assert rows["test/c/shared.png"]["status"] == "ok"
    # Labels and source splits are still recorded for files inside a class folder.
    assert rows["train/b/notes.txt"]["label"] == "b"
    assert rows["train/c/shared.png"]["source_split"] == "train"


def test_good_files_are_ok_with_size_mode_and_checksum(messy_raw):
    """Usable images are ok with label, source split, width, height, mode, bytes and sha256."""
    manifest = build_manifest(messy_raw, toy_config(SPLITS_LAYOUT))
    ok = manifest[manifest["status"] == "ok"]

    expected_ok = {f"{split}/{label}/{i}.png" for split, count in (("train", 3), ("test", 2))
                   for label in CLASSES for i in range(count)} | {"test/c/shared.png"}
    assert set(ok["path"]) == expected_ok
    assert set(ok["label"]) == set(CLASSES)
    assert (ok["label"] == ok["path"].str.split("/").str[1]).all()
    assert (ok["source_split"] == ok["path"].str.split("/").str[0]).all()
    assert (ok["width"] == 8).all() and (ok["height"] == 8).all()
    assert (ok["mode"] == "L").all()
    assert ok["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert ok["sha256"].is_unique
    assert (ok["bytes"] > 0).all()
    assert str(manifest["width"].dtype) == "Int64" and str(manifest["bytes"].dtype) == "int64"
    row = by_path(manifest)["train/a/0.png"]
    assert row["bytes"] == (messy_raw / "train" / "a" / "0.png").stat().st_size


def test_without_split_folders_a_top_level_file_is_stray(tmp_path):
    """With the plain folders layout, a file at the top is stray and files carry no source split."""
    raw = tmp_path / "raw"
    write_png(raw / "a" / "0.png", 1)
    write_png(raw / "b" / "0.png", 2)
    (raw / "README.txt").write_text("hello", encoding="utf-8")

    rows = by_path(build_manifest(raw, toy_config()))

    assert rows["README.txt"]["status"] == "set_aside"
    assert rows["README.txt"]["reason"] == "stray file: not inside a class folder"
    assert rows["a/0.png"]["status"] == "ok" and rows["a/0.png"]["source_split"] is None


def test_layout_root_and_files_outside_it(tmp_path):
    """A layout root moves where class folders start; files outside it are set aside."""
    raw = tmp_path / "raw"
    write_png(raw / "nested" / "data" / "a" / "0.png", 1)
    write_png(raw / "other" / "a" / "0.png", 2)

    rows = by_path(build_manifest(raw, toy_config({"kind": "folders", "root": "nested/data"})))

    assert rows["nested/data/a/0.png"]["status"] == "ok" and rows["nested/data/a/0.png"]["label"] == "a"
    assert rows["other/a/0.png"]["reason"] == "outside the layout root 'nested/data'"


def test_missing_layout_root_and_bad_split_name_are_user_errors(tmp_path):
    """A layout root that does not exist, or a split folder mapped to no split, is a UserError."""
    raw = tmp_path / "raw"
    write_png(raw / "a" / "0.png", 1)

    with pytest.raises(UserError, match="layout root does not exist"):
        build_manifest(raw, toy_config({"kind": "folders", "root": "missing"}))
    with pytest.raises(UserError, match="'holdout' is not a split"):
        build_manifest(raw, toy_config({"kind": "folders", "splits": {"train": "holdout"}}))


def test_missing_raw_folder_is_a_user_error(tmp_path):
    """build_manifest on a folder that does not exist says to run fetch first."""
    with pytest.raises(UserError, match="run the fetch stage first"):
        build_manifest(tmp_path / "absent", toy_config())


# --------------------------------------------------------------------------------------------
# validate, end to end.


def write_params(tmp_path: Path, **dataset: Any) -> Path:
    """A params file for the toy dataset, written into tmp_path."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(toy_params(**dataset)), encoding="utf-8")
    return path


def clean_raw(root: Path, per_class: dict[str, int]) -> Path:
    """Folders of distinct 8x8 PNGs, `per_class[label]` of each, plus one README."""
    seed = 0
    for label, count in per_class.items():
        for index in range(count):
            seed += 1
            write_png(root / label / f"{index}.png", seed)
    (root / "README.txt").write_text("about", encoding="utf-8")
    return root


def run_validate(tmp_path: Path, raw: Path, params: Path) -> tuple[Path, Path, Path, Any]:
    """Run validate() with every output under tmp_path/out; return the paths and the result."""
    out = tmp_path / "out"
    manifest, docs, summary = out / "manifest.parquet", out / "docs", out / "summary.json"
    try:
        result = validate("toy", str(params), raw, manifest, docs, summary)
    except UserError as error:
        result = error
    return manifest, docs, summary, result


def test_validate_writes_manifest_summary_and_data_docs(tmp_path):
    """On a clean dataset, validate writes a manifest, Data Docs and a summary that reconciles."""
    raw = clean_raw(tmp_path / "raw", {"a": 3, "b": 3, "c": 4})
    params = write_params(
        tmp_path,
        validation={"min_per_class": 3, "min_side": 8, "max_side": 8, "expected_count": 11,
                    "expected_count_tolerance": 0.0},
    )

    manifest_path, docs, summary_path, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    written = json.loads(summary_path.read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(summary))
    assert written["files"] == 11
    assert written["accepted"] == 10 and written["set_aside"] == 1
    assert written["files"] == written["accepted"] + written["set_aside"]
    assert written["set_aside_by_reason"] == {"stray file": 1}
    assert written["per_class"] == {"a": 3, "b": 3, "c": 4}
    assert sum(written["per_class"].values()) == written["accepted"]
    assert written["rules_failed"] == 0 and written["rules_passed"] == 7
    assert (docs / "index.html").is_file()
    manifest = pd.read_parquet(manifest_path)
    assert list(manifest.columns) == COLUMNS and len(manifest) == 11
    assert not list(manifest_path.parent.glob(".*.tmp*"))


def test_validate_hard_rule_failure_names_rule_and_class_and_still_writes(tmp_path, capsys):
    """A class below min_per_class fails the stage with the rule and class named, outputs kept;
    the counts line comes first, failure or not, saying where the files went."""
    raw = clean_raw(tmp_path / "raw", {"a": 3, "b": 3, "c": 1})
    params = write_params(tmp_path, validation={"min_per_class": 3})

    manifest_path, docs, summary_path, error = run_validate(tmp_path, raw, params)

    assert capsys.readouterr().out.startswith(
        "validate@toy: 8 files = 7 accepted + 1 set aside (1 stray file); 5 of 6 validation rules passed"
    )

    assert isinstance(error, UserError)
    message = str(error)
    assert "\n" not in message
    assert "min_per_class" in message
    assert "class 'c' has 1 image" in message
    assert "'a'" not in message and "'b'" not in message
    # What to do: the key to change, or the rule to make a warning.
    assert ("add images to the class, or lower datasets.toy.validation.min_per_class, or take min_per_class out "
            "of datasets.toy.validation.hard to only warn") in message
    assert manifest_path.is_file() and summary_path.is_file()
    assert (docs / "index.html").is_file()
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["per_class"] == {"a": 3, "b": 3, "c": 1}
    assert summary["rules_failed"] == 1
    assert len(pd.read_parquet(manifest_path)) == 8


def test_unicode_and_spaces_in_names_and_a_class_folder_spelt_decomposed(tmp_path: Path) -> None:
    """Class "crème brûlée" is declared composed (NFC); its folder comes decomposed (NFD, as macOS
    and some zips write names), with spaces and accents in the file names too: all accepted under
    the declared class, and the paths kept exactly as they are on disk."""
    import unicodedata

    declared = ["crème brûlée", "日本 茶"]
    folder = unicodedata.normalize("NFD", declared[0])
    assert folder != declared[0]
    for i in range(3):
        write_png(tmp_path / folder / f"photo {i} – été.png", seed=i)
        write_png(tmp_path / declared[1] / f"写真 {i}.png", seed=10 + i)
    config = parse_params(toy_params(classes=[unicodedata.normalize("NFD", declared[0]), declared[1]]), "params.yaml")
    assert config.datasets["toy"].classes == declared  # declared either way, compared composed
    rows = build_manifest(tmp_path, config.datasets["toy"])
    assert (rows["status"] == "ok").all(), rows[["path", "reason"]]
    assert sorted(set(rows["label"])) == sorted(declared)
    assert all((tmp_path / path).is_file() for path in rows["path"])  # on-disk spelling kept


def test_validate_counts_and_names_images_with_several_frames(tmp_path, capsys):
    """An animated GIF is accepted as its first frame, and the manifest, the summary and the
    stage's output say so: nothing is used partly without a word."""
    raw = clean_raw(tmp_path / "raw", {"a": 3, "b": 3, "c": 3})
    frames = [Image.new("L", (8, 8), value) for value in (10, 128, 250)]
    frames[0].save(raw / "b" / "moving.gif", save_all=True, append_images=frames[1:])
    params = write_params(tmp_path, validation={"min_per_class": 3, "min_side": 8, "max_side": 8})

    manifest_path, _, _, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    assert summary["multi_frame"] == 1 and summary["accepted"] == 10
    rows = by_path(pd.read_parquet(manifest_path))
    assert rows["b/moving.gif"]["status"] == "ok" and rows["b/moving.gif"]["frames"] == 3
    assert rows["a/0.png"]["frames"] == 1 and pd.isna(rows["README.txt"]["frames"])
    assert "1 accepted image(s) hold several frames" in capsys.readouterr().out


def test_a_file_name_that_is_not_utf8_is_set_aside_with_its_name_escaped(tmp_path):
    """An old tar's Latin-1 names (`café.png` as the byte e9) cannot go into the manifest as
    they are: the file is set aside, named with the byte escaped, and validate still finishes.
    Before, Great Expectations failed with a UnicodeEncodeError traceback."""
    raw = clean_raw(tmp_path / "raw", {"a": 3, "b": 3, "c": 3})
    latin = os.fsdecode(b"caf\xe9.png")  # as the file system reads it back: with a surrogate
    write_png(raw / "a" / latin, seed=77)
    write_png(raw / os.fsdecode(b"cr\xe8me") / "0.png", seed=78)  # a class folder in Latin-1
    params = write_params(tmp_path, validation={"min_per_class": 3, "min_side": 8, "max_side": 8})

    manifest_path, _, summary_path, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    rows = by_path(pd.read_parquet(manifest_path))
    assert rows["a/caf\\xe9.png"]["status"] == "set_aside"
    assert rows["a/caf\\xe9.png"]["reason"].startswith("unusable name: the file or folder name is not UTF-8; rename it")
    assert rows["cr\\xe8me/0.png"]["label"] == "cr\\xe8me" and rows["cr\\xe8me/0.png"]["status"] == "set_aside"
    assert summary["set_aside_by_reason"]["unusable name"] == 2
    assert summary["files"] == summary["accepted"] + summary["set_aside"] == 12


def test_refused_entries_of_one_path_get_unique_manifest_rows(tmp_path):
    """An archive holding `../evil.png` twice: both refused, both on record, paths still unique."""
    from stages.validate import refused_rows

    provenance = tmp_path / "provenance.json"
    provenance.write_text(json.dumps({"refused": [
        {"entry": "../evil.png", "reason": "path outside the dataset folder"},
        {"entry": "../evil.png", "reason": "path outside the dataset folder"},
        {"entry": os.fsdecode(b"../caf\xe9.png"), "reason": "path outside the dataset folder"},
    ]}), encoding="utf-8")

    rows = refused_rows(provenance)

    assert list(rows["path"]) == ["fetch::../evil.png", "fetch::../evil.png #2", "fetch::../caf\\xe9.png"]


def test_validate_names_the_undeclared_labels_it_set_aside(tmp_path, capsys):
    """A class folder params does not declare (misspelt, or left out on purpose) is set aside,
    and validate says so in one line naming it and the keys that would take it in."""
    raw = clean_raw(tmp_path / "raw", {"a": 3, "b": 3, "c": 3, "zebra": 2})
    params = write_params(tmp_path, validation={"min_per_class": 3, "min_side": 8, "max_side": 8})

    _, _, _, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    assert summary["set_aside_by_reason"]["undeclared label"] == 2
    assert ("validate@toy: note: 2 files are set aside for labels that are not declared classes: zebra (2); if they "
            "belong, add them to datasets.toy.classes or map them with datasets.toy.layout.class_map") in capsys.readouterr().out


def test_every_rule_a_dataset_can_make_hard_says_what_to_do() -> None:
    """A hard failure's line names a remedy for each rule there is (and a rule added later must too)."""
    from stages.expectations import RULES
    from stages.validate import REMEDIES

    assert set(REMEDIES) == set(RULES)


def test_hidden_files_are_counted_as_one_kind_in_the_summary(tmp_path):
    """`._x.png` beside every image of a macOS tar: one "hidden file" count in the summary (a
    DVC metric) and validate's line, not one key per file name."""
    raw = clean_raw(tmp_path / "raw", {"a": 2, "b": 2, "c": 2})
    for name in ("a/._0.png", "a/._1.png", "b/._0.png"):
        (raw / name).write_bytes(b"\0\5\26\7 AppleDouble")
    write_png(raw / "a" / ".ipynb_checkpoints" / "0-checkpoint.png", seed=99)
    params = write_params(tmp_path, validation={"min_per_class": 2})

    _, _, summary_path, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    written = json.loads(summary_path.read_text(encoding="utf-8"))
    assert written["set_aside_by_reason"] == {"hidden file": 3, "in a hidden folder": 1, "stray file": 1}


@pytest.mark.parametrize(
    ("folders", "layout", "note"),
    [
        # A zip of `shapes/<class>/...` read without layout.root: every file is under the
        # undeclared label 'shapes', and the note said to declare it as a class.
        ({"shapes": {"a": 3, "b": 3, "c": 3}}, None,
         "9 files are set aside for labels that are not declared classes: shapes (9); the class folders sit one "
         "level down, in 'shapes' (an archive's top folder): set datasets.toy.layout.root: 'shapes'"),
        # The README's flowers.zip (`flowers/train/daisy/...`) with its splits but without its root:
        # every file was a "stray file" and validate said nothing of the root.
        ({"flowers/train": {"a": 3, "b": 3, "c": 3}, "flowers/test": {"a": 1, "b": 1, "c": 1}},
         {"kind": "folders", "splits": {"test": "test", "train": "train"}},
         "14 files are set aside as stray, outside the split folders (test, train); the split folders sit one level "
         "down, in 'flowers' (an archive's top folder): set datasets.toy.layout.root: 'flowers'"),
        # The same with neither root nor splits: every file under the undeclared label 'flowers',
        # and the note advised declaring it a class.
        ({"flowers/Training": {"a": 3, "b": 3, "c": 3}, "flowers/Testing": {"a": 1, "b": 1, "c": 1}}, None,
         "12 files are set aside for labels that are not declared classes: flowers (12); the class folders sit two "
         "levels down, in split folders of 'flowers' (Testing, Training): set datasets.toy.layout.root: 'flowers' and "
         "datasets.toy.layout.splits: {Testing: test, Training: train}"),
    ],
    ids=["classes one level down", "splits one level down", "splits and classes two levels down"],
)
def test_folders_below_an_archives_top_folder_get_the_layout_to_set_as_the_advice(tmp_path, capsys, folders, layout, note):
    for folder, counts in folders.items():
        clean_raw(tmp_path / "raw" / folder, counts)
    params = write_params(tmp_path, **({"layout": layout} if layout else {}), validation={"min_per_class": 0})

    _, _, _, summary = run_validate(tmp_path, tmp_path / "raw", params)

    assert not isinstance(summary, Exception), summary
    out = capsys.readouterr().out
    assert f"validate@toy: note: {note}" in out, out
    assert "add them to datasets.toy.classes" not in out


def test_the_root_advice_is_not_given_when_some_class_folders_are_already_in_place(tmp_path, capsys):
    """cat/ and dog/ where they belong, and a copy under backup/: a root of 'backup' would lose
    the good ones, so the note keeps its usual advice."""
    clean_raw(tmp_path / "raw", {"a": 3, "b": 3, "c": 3})
    clean_raw(tmp_path / "raw" / "backup", {"a": 1})

    _, _, _, summary = run_validate(tmp_path, tmp_path / "raw", write_params(tmp_path, validation={"min_per_class": 0}))

    assert not isinstance(summary, Exception), summary
    out = capsys.readouterr().out
    assert "backup (1); if they belong, add them to datasets.toy.classes" in out and "layout.root" not in out


def test_class_folders_named_in_another_case_get_the_class_map_to_set_as_the_advice(tmp_path, capsys):
    """Circle/ for the class circle: every image was set aside as an undeclared label and the note
    said to add 'Circle' to the classes, which would make circle and Circle two classes."""
    clean_raw(tmp_path / "raw", {"A": 3, "B": 3, "c": 3, "extra": 1})

    _, _, _, summary = run_validate(tmp_path, tmp_path / "raw", write_params(tmp_path, validation={"min_per_class": 0}))

    assert not isinstance(summary, Exception), summary
    out = capsys.readouterr().out
    assert ("A (3), B (3), extra (1); A, B differ from datasets.toy.classes in case only: map them, "
            "datasets.toy.layout.class_map: {A: a, B: b}; for the others, if they belong, add them to "
            "datasets.toy.classes") in out, out


@pytest.mark.parametrize(
    ("grouping", "why"),
    [
        # The patients' folders are P1/, P2/: a pattern written for p1/ finds no group anywhere.
        ({"group_pattern": "^images/(?P<group>p\\d+)/"}, "layout.group_pattern finds no group in their paths"),
        ({"group_column": "patient"}, "an empty 'patient' cell"),
    ],
)
def test_images_a_csv_layout_leaves_without_a_group_are_named(tmp_path, capsys, grouping, why):
    """A group_pattern that matches no path, or a group column with empty cells, left those
    images ungrouped without a word: each was split on its own, a patient's images across train
    and test. Validate now names how many of the images split divides have no group."""
    raw = tmp_path / "raw"
    rows = []
    for i in range(9):
        label = CLASSES[i % 3]
        write_png(raw / "images" / f"P{i // 3}" / f"{i}.png", seed=i + 1)
        patient = f"P{i // 3}" if i % 2 else ""
        rows.append(f"images/P{i // 3}/{i}.png,{label},{patient},{'Test' if i == 8 else 'Train'}")
    (raw / "labels.csv").write_text("path,label,patient,usage\n" + "\n".join(rows) + "\n", encoding="utf-8")
    layout = {"kind": "csv", "file": "labels.csv", "path_column": "path", "label_column": "label",
              "split_column": "usage", "split_map": {"Train": "train", "Test": "test"}, **grouping}
    params = write_params(tmp_path, layout=layout, validation={"min_per_class": 0})

    _, _, _, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    out = capsys.readouterr().out
    ungrouped = 8 if "group_pattern" in grouping else 4  # of the 8 images split divides (not the source's test one)
    assert (f"validate@toy: note: {ungrouped} of 8 images the split stage divides have no group ({why}, e.g. "
            f"'images/P0/0.png'), so each is split on its own") in out


def test_no_group_note_when_every_image_split_divides_has_one(tmp_path, capsys):
    """GTSRB's pattern names only Train/ paths; its Test/ images keep the source's test split, so
    their having no group is no news."""
    raw = tmp_path / "raw"
    rows = []
    for i in range(6):
        folder = "Train" if i < 4 else "Test"
        write_png(raw / folder / f"{i}.png", seed=i + 1)
        rows.append(f"{folder}/{i}.png,{CLASSES[i % 3]},{folder.lower()}")
    (raw / "labels.csv").write_text("path,label,usage\n" + "\n".join(rows) + "\n", encoding="utf-8")
    layout = {"kind": "csv", "file": "labels.csv", "path_column": "path", "label_column": "label",
              "split_column": "usage", "group_pattern": "^Train/(?P<group>\\d)"}
    params = write_params(tmp_path, layout=layout, validation={"min_per_class": 0})

    _, _, _, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    assert "no group" not in capsys.readouterr().out


def test_an_empty_raw_folder_is_named_as_empty_not_as_broken_files(tmp_path):
    """A raw folder holding no file at all (a source that gave nothing) fails in one line saying
    so; before, it was 'undecodable_fraction failed ... replace the broken files in the source'."""
    raw = tmp_path / "raw"
    raw.mkdir()
    params = write_params(tmp_path)

    manifest_path, docs, summary_path, error = run_validate(tmp_path, raw, params)

    assert isinstance(error, UserError)
    assert str(error).startswith(f"validate@toy: {raw} holds no files;")
    assert "datasets.toy.source" in str(error) and "fetch@toy" in str(error)
    assert "broken files" not in str(error)
    assert json.loads(summary_path.read_text(encoding="utf-8"))["files"] == 0  # still written


# --------------------------------------------------------------------------------------------
# Near-duplicates: the same picture in other bytes (resized, re-encoded).


def write_picture(path: Path, seed: int, size: int = 128, quality: int | None = None) -> Path:
    """A seeded picture of smooth light and shade (as a photo looks at thumbnail scale), resized
    from one 256 px original to `size` px: a PNG, or a JPEG of `quality`. Two files of one seed
    are the same picture in other bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    field = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    original = Image.fromarray(field).resize((256, 256), Image.Resampling.BICUBIC)
    picture = original.resize((size, size), Image.Resampling.LANCZOS)
    picture.save(path, **({"quality": quality} if quality else {}))
    return path


def near_duplicates_raw(raw: Path) -> Path:
    """train/ and test/ folders of classes a and b: distinct pictures, plus a picture in train
    at 128 px (PNG) and again in test at 64 px (JPEG quality 70), and one in train as JPEG quality
    95 and in test as JPEG quality 70, both 128 px."""
    for seed in range(12):
        write_picture(raw / ("train", "test")[seed % 2] / "ab"[seed // 6 % 2] / f"{seed}.png", seed)
    write_picture(raw / "train" / "a" / "cat.png", 100, size=128)
    write_picture(raw / "test" / "a" / "cat_small.jpg", 100, size=64, quality=70)
    write_picture(raw / "train" / "b" / "dog.jpg", 101, quality=95)
    write_picture(raw / "test" / "b" / "dog.jpg", 101, quality=70)
    return raw


def test_a_resized_or_re_encoded_copy_in_another_split_is_reported_not_set_aside(tmp_path, capsys):
    """The same picture in train and test as other bytes (resized, re-encoded) is a leak the
    sha256 cannot see: validate names both groups, with their files, in its output, the Data Docs
    and the manifest's near_group column, and sets nothing aside (a soft rule by default).
    Before, nothing was said and the test split held copies of training images."""
    raw = near_duplicates_raw(tmp_path / "raw")
    params = write_params(tmp_path, layout=SPLITS_LAYOUT, classes=["a", "b"])

    manifest_path, docs, _, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    assert summary["accepted"] == 16 and summary["near_duplicate_groups"] == 2
    out = capsys.readouterr().out
    assert ("validate@toy: warning: no_near_duplicates: 2 groups of near-duplicate images (the same picture resized "
            "or re-encoded): test/a/cat_small.jpg ~ train/a/cat.png (in splits test, train), test/b/dog.jpg ~ "
            "train/b/dog.jpg (in splits test, train); 16 of 16 ok images compared") in out
    rows = by_path(pd.read_parquet(manifest_path))
    grouped = {path: row["near_group"] for path, row in rows.items() if row["near_group"] is not None}
    assert grouped == {"train/a/cat.png": "test/a/cat_small.jpg", "test/a/cat_small.jpg": "test/a/cat_small.jpg",
                       "train/b/dog.jpg": "test/b/dog.jpg", "test/b/dog.jpg": "test/b/dog.jpg"}
    assert all(len(row["dhash"]) == 32 for row in rows.values())
    (page,) = (docs / "validations").rglob("*.html")
    words = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))).split())
    assert "train/a/cat.png ~ test/a/cat_small.jpg (in splits test, train)" in words


def test_near_duplicates_fail_the_stage_when_params_make_the_rule_hard(tmp_path):
    raw = near_duplicates_raw(tmp_path / "raw")
    params = write_params(tmp_path, layout=SPLITS_LAYOUT, classes=["a", "b"],
                          validation={"hard": ["no_near_duplicates"]})

    _, _, _, error = run_validate(tmp_path, raw, params)

    assert isinstance(error, UserError)
    assert str(error).startswith("validate@toy: expectation no_near_duplicates failed: 2 groups of near-duplicate")
    assert "test/a/cat_small.jpg ~ train/a/cat.png" in str(error)
    assert ("keep one copy of each picture in the source (the manifest's near_group column names them), or take "
            "no_near_duplicates out of datasets.toy.validation.hard to only warn") in str(error)


def test_copies_in_one_class_folder_are_grouped_for_the_split_not_reported_as_a_leak(tmp_path, capsys):
    """Without source splits, two copies of a picture in one class folder have their own sha256s,
    so their own split keys: validate groups them in near_group, which split@ keeps in one split,
    and the rule's text counts the group without a warning. Distinct pictures, and exact copies
    (one split key already), are not grouped."""
    from stages.split import assign_splits

    raw = tmp_path / "raw"
    for seed in range(8):
        write_picture(raw / "ab"[seed % 2] / f"{seed}.png", seed)
    write_picture(raw / "a" / "big.png", 100, size=128)
    write_picture(raw / "a" / "small.jpg", 100, size=64, quality=70)
    shutil.copyfile(raw / "b" / "1.png", raw / "b" / "1 copy.png")
    params = write_params(tmp_path, classes=["a", "b"])

    manifest, docs, _, summary = run_validate(tmp_path, raw, params)

    assert summary["near_duplicate_groups"] == 0 and summary["near_duplicate_groups_all"] == 1
    assert "no_near_duplicates" not in capsys.readouterr().out
    rule = json.loads((docs / "expectations.json").read_text(encoding="utf-8"))["rules"]["no_near_duplicates"]
    assert rule["success"] and rule["observed"] == (
        "no near-duplicates in two splits or under two labels; 1 group in one class kept in one split by split@; "
        "11 of 11 ok images compared (the rest too small or too uniform)")
    frame = pd.read_parquet(manifest)
    grouped = frame[frame["near_group"].notna()]
    assert sorted(grouped["path"]) == ["a/big.png", "a/small.jpg"]
    for seed in range(50):  # whatever the seed draws, the two copies share a split
        splits = assign_splits(frame, SplitPolicy(val=0.3, test=0.3, seed=seed))
        assert splits.loc[splits["near_group"].notna(), "split"].nunique() == 1


def test_digits_and_blank_images_are_not_compared_so_they_cannot_flood_the_report(tmp_path, capsys):
    """The demo's 8x8 digits (sklearn's load_digits, 1,797 of them, written as fetch writes them)
    and blank scans hash too coarsely to tell apart: they are not compared, and validate says so
    in the rule's text, not as a warning."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = tmp_path / "raw"
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        (raw / str(target)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(raw / str(target) / f"{index}.png")
    rng = np.random.default_rng(0)
    for index in range(20):  # near-white 64 px pages, a little noise on each
        noise = rng.normal(0, 2, (64, 64))
        Image.fromarray(np.clip(250 + noise, 0, 255).astype(np.uint8)).save(raw / "0" / f"blank{index}.png")
    params = write_params(tmp_path, classes=[str(n) for n in range(10)])

    _, docs, _, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception), summary
    assert summary["near_duplicate_groups"] == 0
    assert "no_near_duplicates" not in capsys.readouterr().out
    rule = json.loads((docs / "expectations.json").read_text(encoding="utf-8"))["rules"]["no_near_duplicates"]
    assert rule["success"] and rule["observed"] == (
        "no near-duplicates in two splits or under two labels; 0 of 1817 ok images compared (the rest too small or "
        "too uniform)")


def test_a_file_name_holding_a_newline_keeps_the_failure_and_warnings_on_one_line(tmp_path, capsys):
    """A file name a script made with a newline (or a carriage return, a tab) in it, named by a
    failing rule: the stage's error and its warnings stay one line each, the characters written
    `\\n`, `\\r`, `\\t` (before: the error went on a second line at the name's newline)."""
    raw = clean_raw(tmp_path / "raw", {"a": 3, "b": 3, "c": 3})
    write_png(raw / "a" / "tiny\nsecond line.png", seed=50, size=4)
    write_png(raw / "b" / "tiny\rback\tand tab.png", seed=51, size=4)
    hard = write_params(tmp_path, validation={"min_side": 8})
    (tmp_path / "soft").mkdir()
    soft = write_params(tmp_path / "soft", validation={"min_side": 8, "hard": []})

    _, _, _, error = run_validate(tmp_path, raw, hard)
    capsys.readouterr()
    _, _, _, summary = run_validate(tmp_path / "soft", raw, soft)

    assert isinstance(error, UserError)
    assert "\n" not in str(error) and "\r" not in str(error) and "\t" not in str(error)
    assert "a/tiny\\nsecond line.png 4x4" in str(error) and "b/tiny\\rback\\tand tab.png 4x4" in str(error)
    assert not isinstance(summary, Exception), summary
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warning.startswith("validate@toy: warning: image_size_bounds: 2 ok images outside [8, 20000] px: ")
    assert "a/tiny\\nsecond line.png 4x4" in warning and "\r" not in warning


def test_too_many_undecodable_files_fail_the_stage_in_a_line_naming_them(tmp_path):
    """The README's promise: a hard rule's failure is one line naming the files. The fraction of
    undecodable files gave only a count (before: '33.33% undecodable (2 of 6 files; max 5%)'), and
    which files to replace was left to the manifest."""
    raw = clean_raw(tmp_path / "raw", {"a": 1, "b": 1, "c": 1})
    (raw / "a" / "broken.png").write_bytes(b"not a png")
    (raw / "b" / "empty.jpg").write_bytes(b"")
    params = write_params(tmp_path)

    _, _, _, error = run_validate(tmp_path, raw, params)

    assert isinstance(error, UserError)
    assert str(error).startswith(
        "validate@toy: expectation undecodable_fraction failed: 33.33% undecodable (2 of 6 files; max 5%): "
        "a/broken.png, b/empty.jpg; replace the broken files in the source")


def test_a_hard_list_replaces_the_default_one_as_the_readme_says(tmp_path):
    """`hard: [no_near_duplicates]`, the README's "add it to validation.hard" done literally on a
    params.yaml with no `hard` key, replaces the default list: a class short of min_per_class is
    then only a warning. The README says so and names the default list to keep (before: it said
    only "add it", and the default rules went soft without a word)."""
    raw = clean_raw(tmp_path / "raw", {"a": 3, "b": 3, "c": 1})
    params = write_params(tmp_path, validation={"min_per_class": 3, "hard": ["no_near_duplicates"]})

    _, _, _, summary = run_validate(tmp_path, raw, params)

    assert not isinstance(summary, Exception) and summary["rules_failed"] == 1
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8").split())
    default = ", ".join(ValidationRules().hard)
    assert f"a list given there replaces the default one, `[{default}]`" in readme
