"""Stable hash-based splits, honoured source splits, and the split stage's arrays."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages.config import SplitPolicy
from stages.errors import UserError
from stages.images import load_image
from tests.toy import toy_params
from stages.split import assign_splits, check_splits, empty_cells, split, unit_hash
from stages.validate import COLUMNS, build_manifest

POLICY = SplitPolicy(val=0.15, test=0.15, seed=42)
TEN_CLASSES = [str(i) for i in range(10)]


def synthetic_manifest(per_class: int, classes: list[str] = TEN_CLASSES, tag: str = "", **columns: Any) -> pd.DataFrame:
    """`per_class` ok rows per class with distinct sha256s; `columns` overrides whole columns."""
    rows = []
    for label in classes:
        for index in range(per_class):
            key = f"{tag}{label}/{index}"
            rows.append(
                {
                    "path": f"{key}.png",
                    "label": label,
                    "source_split": None,
                    "group": None,
                    "width": 8,
                    "height": 8,
                    "mode": "L",
                    "bytes": 100,
                    "sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "status": "ok",
                    "reason": "",
                }
            )
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for name, value in columns.items():
        frame[name] = value
    return frame


def split_of(rows: pd.DataFrame) -> dict[str, str]:
    """{path: split} of assigned rows."""
    return dict(zip(rows["path"], rows["split"]))


# --------------------------------------------------------------------------------------------
# unit_hash.


def test_unit_hash_is_deterministic_and_in_the_unit_interval():
    """The same key and seed give the same number, always in [0, 1); the seed matters."""
    draws = [unit_hash(f"key{i}", 42) for i in range(2000)]

    assert draws == [unit_hash(f"key{i}", 42) for i in range(2000)]
    assert all(0.0 <= draw < 1.0 for draw in draws)
    assert len(set(draws)) == len(draws)
    assert 0.45 < float(np.mean(draws)) < 0.55
    assert unit_hash("key0", 42) != unit_hash("key0", 43)
    assert unit_hash("k", 1) == int.from_bytes(hashlib.sha256(b"1:k").digest()[:8], "big") / 2**64


# --------------------------------------------------------------------------------------------
# assign_splits.


def test_every_row_gets_a_split_in_the_policy_proportions_per_class():
    """Each class is split close to the policy's fractions (within +/-0.06 on 300 rows)."""
    manifest = synthetic_manifest(300)

    rows = assign_splits(manifest, POLICY)

    assert len(rows) == len(manifest)
    assert set(rows["split"]) == {"train", "val", "test"}
    assert rows["split"].notna().all()
    for label, group in rows.groupby("label"):
        fractions = group["split"].value_counts(normalize=True)
        assert abs(fractions["val"] - 0.15) <= 0.06, (label, fractions.to_dict())
        assert abs(fractions["test"] - 0.15) <= 0.06, (label, fractions.to_dict())
        assert abs(fractions["train"] - 0.70) <= 0.06, (label, fractions.to_dict())


def test_adding_rows_never_moves_existing_ones():
    """After 500 new rows are added, every old row keeps exactly its split."""
    old = synthetic_manifest(300)
    new = synthetic_manifest(50, tag="new-")
    before = split_of(assign_splits(old, POLICY))

    after = split_of(assign_splits(pd.concat([new.iloc[:250], old, new.iloc[250:]], ignore_index=True), POLICY))

    assert len(new) == 500 and len(after) == len(before) + 500
    assert {path: after[path] for path in before} == before


def test_a_class_too_small_to_draw_train_still_gets_a_training_image():
    """Forty tiny classes of one or two images: wherever their hash would send them, each class
    ends up with a training image, and classes with enough images are split as before."""
    big = synthetic_manifest(60, classes=["big"])
    tiny = pd.concat([synthetic_manifest(1 + i % 2, classes=[f"tiny{i}"]) for i in range(40)], ignore_index=True)
    plain = split_of(assign_splits(big, POLICY))
    rows = assign_splits(pd.concat([big, tiny], ignore_index=True), POLICY)
    assert {label for label in rows["label"]} == {label for label in rows.loc[rows["split"] == "train", "label"]}
    assert {path: split for path, split in split_of(rows).items() if path.startswith("big/")} == plain
    # The rule was needed: by hash alone some tiny classes had no training image.
    by_hash = tiny.assign(draw=[unit_hash(key, POLICY.seed) for key in tiny["sha256"]])
    alone = by_hash.groupby("label")["draw"].max() < POLICY.test + POLICY.val
    assert alone.any()
    check_splits(rows, sorted(set(rows["label"])), "toy")  # the stage's own check passes


def test_row_order_does_not_matter():
    """Shuffling the manifest changes no row's split."""
    manifest = synthetic_manifest(30)

    shuffled = manifest.sample(frac=1.0, random_state=3).reset_index(drop=True)

    assert split_of(assign_splits(shuffled, POLICY)) == split_of(assign_splits(manifest, POLICY))


def test_changing_the_seed_changes_some_assignments():
    """Another seed reshuffles part of the split, yet keeps the proportions."""
    manifest = synthetic_manifest(100)

    first = split_of(assign_splits(manifest, POLICY))
    second = split_of(assign_splits(manifest, SplitPolicy(val=0.15, test=0.15, seed=7)))

    moved = sum(first[path] != second[path] for path in first)
    assert 0 < moved < len(first)


def test_identical_content_always_shares_a_split():
    """Rows with the same sha256 land in the same split."""
    manifest = synthetic_manifest(40)
    copies = manifest.copy()
    copies["path"] = "copy-" + copies["path"]

    rows = assign_splits(pd.concat([manifest, copies], ignore_index=True), POLICY)

    assigned = split_of(rows)
    assert all(assigned[path] == assigned[f"copy-{path}"] for path in manifest["path"])
    assert rows.groupby("sha256")["split"].nunique().max() == 1


def test_a_group_keeps_all_its_rows_together():
    """All rows sharing a group value get one split, whatever their content."""
    manifest = synthetic_manifest(60)
    manifest["group"] = [f"patient{i // 6}" for i in range(len(manifest))]

    rows = assign_splits(manifest, POLICY)

    assert rows.groupby("group")["split"].nunique().max() == 1
    assert set(rows["split"]) == {"train", "val", "test"}
    # The group decides, not the content: each split follows the draw of the group's name.
    for group, split_name in rows.groupby("group")["split"].first().items():
        draw = unit_hash(group, POLICY.seed)
        assert split_name == ("test" if draw < 0.15 else "val" if draw < 0.30 else "train")


def test_the_same_image_under_two_groups_or_with_and_without_one_lands_in_one_split():
    """HAM10000 can list one image under two lesion ids; a copy may also come without a group.
    Rows sharing a group or a content hash share one split (their smallest key's draw), so no
    identical image straddles train and test. Rows linked to nothing keep their group's draw."""
    manifest = synthetic_manifest(60)
    manifest["group"] = [f"lesion{i}" for i in range(len(manifest))]
    twins = manifest.iloc[:200].copy()
    twins["path"] = "twin-" + twins["path"]
    twins["group"] = [f"other{i}" for i in range(200)]  # the same images under other ids
    loose = manifest.iloc[200:300].copy()
    loose["path"] = "loose-" + loose["path"]
    loose["group"] = None  # the same images without a group
    # A chain: image X in lesion A, image Y in lesions A and B: all three rows together.
    chain = manifest.iloc[[300, 301]].copy()
    chain["path"] = "chain-" + chain["path"]
    chain["group"] = ["lesion300", "lesion300"]
    chain["sha256"] = [manifest.iloc[300]["sha256"], manifest.iloc[301]["sha256"]]
    both = pd.concat([manifest, twins, loose, chain], ignore_index=True)

    rows = assign_splits(both, POLICY)

    assert rows.groupby("sha256")["split"].nunique().max() == 1
    assert rows.groupby(rows["group"].fillna(rows["sha256"]))["split"].nunique().max() == 1
    assert set(rows["split"]) == {"train", "val", "test"}
    assigned = split_of(rows)
    for i in range(302, len(manifest)):  # untouched rows: their own group's draw, as before
        path, group = manifest.iloc[i]["path"], manifest.iloc[i]["group"]
        draw = unit_hash(group, POLICY.seed)
        assert assigned[path] == ("test" if draw < 0.15 else "val" if draw < 0.30 else "train")


def test_near_duplicates_validate_grouped_land_in_one_split():
    """validate names the same picture resized or re-encoded (other bytes, so another content
    hash) in `near_group`; such rows share one key, so the copy is not in test while the original
    trains. Rows of no near group keep their own draw."""
    manifest = synthetic_manifest(60)
    manifest["near_group"] = None
    copies = manifest.iloc[:120].copy()
    copies["path"] = "small-" + copies["path"]
    copies["sha256"] = [hashlib.sha256(f"small{i}".encode()).hexdigest() for i in range(120)]
    manifest.loc[:119, "near_group"] = list(manifest["path"].iloc[:120])
    copies["near_group"] = list(manifest["path"].iloc[:120])
    both = pd.concat([manifest, copies], ignore_index=True)

    rows = assign_splits(both, POLICY)

    assert rows.groupby("near_group")["split"].nunique().max() == 1
    assert set(rows.loc[rows["near_group"].notna(), "split"]) == {"train", "val", "test"}
    assigned = split_of(rows)
    for i in range(120, len(manifest)):
        draw = unit_hash(manifest.iloc[i]["sha256"], POLICY.seed)
        assert assigned[manifest.iloc[i]["path"]] == ("test" if draw < 0.15 else "val" if draw < 0.30 else "train")


def test_source_splits_for_all_three_are_kept_as_they_are():
    """When the source defines train, val and test, every row keeps its source split."""
    manifest = synthetic_manifest(30)
    manifest["source_split"] = np.resize(["train", "val", "test"], len(manifest))

    rows = assign_splits(manifest, POLICY)

    assert (rows["split"] == rows["source_split"]).all()


def test_only_train_and_test_defined_carves_val_from_train():
    """With source train/test only: test stays test, val is carved from train, no train row becomes test."""
    manifest = synthetic_manifest(200)
    manifest["source_split"] = np.where(np.arange(len(manifest)) % 5 == 0, "test", "train")

    rows = assign_splits(manifest, POLICY)

    from_test = rows[rows["source_split"] == "test"]
    from_train = rows[rows["source_split"] == "train"]
    assert (from_test["split"] == "test").all()
    assert set(from_train["split"]) == {"train", "val"}
    assert abs((from_train["split"] == "val").mean() - 0.15) <= 0.03


def test_source_val_rows_stay_val_and_test_is_carved():
    """With source train/val only: val stays val, and test is carved from the train rows."""
    manifest = synthetic_manifest(100)
    manifest["source_split"] = np.where(np.arange(len(manifest)) % 4 == 0, "val", "train")

    rows = assign_splits(manifest, POLICY)

    assert (rows.loc[rows["source_split"] == "val", "split"] == "val").all()
    assert set(rows.loc[rows["source_split"] == "train", "split"]) == {"train", "test"}


def test_set_aside_rows_are_excluded():
    """Only ok rows are assigned a split; set-aside rows do not appear at all."""
    manifest = synthetic_manifest(20)
    manifest.loc[::3, "status"] = "set_aside"
    manifest.loc[::3, "reason"] = "undecodable: broken"

    rows = assign_splits(manifest, POLICY)

    kept = set(manifest.loc[manifest["status"] == "ok", "path"])
    assert set(rows["path"]) == kept
    assert (rows["status"] == "ok").all()
    assert list(rows.index) == list(range(len(rows)))


# --------------------------------------------------------------------------------------------
# check_splits.


def rows_with_splits(splits: list[str], labels: list[str]) -> pd.DataFrame:
    """A minimal assigned table: one row per (split, label)."""
    return pd.DataFrame({"split": splits, "label": labels})


def test_check_splits_accepts_three_filled_splits():
    """Three non-empty splits with every class in train pass."""
    check_splits(rows_with_splits(["train", "train", "val", "test"], ["a", "b", "a", "b"]), ["a", "b"], "toy")


@pytest.mark.parametrize("empty", ["train", "val", "test"])
def test_check_splits_refuses_an_empty_split(empty):
    """An empty split is a UserError naming the split and the dataset."""
    splits = [s for s in ["train", "train", "val", "test"] if s != empty]

    with pytest.raises(UserError) as caught:
        check_splits(rows_with_splits(splits, ["a"] * len(splits)), ["a"], "toy")

    message = str(caught.value)
    assert f"the {empty} split is empty" in message and "split@toy" in message


def test_check_splits_refuses_a_class_missing_from_train():
    """A class with no training image is a UserError naming the class."""
    with pytest.raises(UserError, match="no training images for classes b"):
        check_splits(rows_with_splits(["train", "val", "test"], ["a", "b", "b"]), ["a", "b"], "toy")


def test_a_class_without_val_or_test_images_is_named():
    """Twelve images a class (as a course folder of a few dozen might hold) at 15% / 15%: some
    class draws no val or no test image, and each such cell gets its line; a large class none."""
    small = assign_splits(synthetic_manifest(12), POLICY)
    counts = pd.crosstab(small["label"], small["split"])
    holes = [(label, split) for label in TEN_CLASSES for split in ("val", "test") if counts.loc[label].get(split, 0) == 0]
    assert holes, "this seed leaves a class without val or test images"

    notes = empty_cells(small, TEN_CLASSES, "toy")

    assert len(notes) == len(holes)
    label, split = holes[0]
    line = next(note for note in notes if note.startswith(f"split@toy: class {label} has no {split} images"))
    assert f"{counts.loc[label, 'train']} train" in line and f"raise datasets.toy.split.{split}" in line
    assert empty_cells(assign_splits(synthetic_manifest(200), POLICY), TEN_CLASSES, "toy") == []


def test_a_class_missing_from_the_sources_own_test_split_gets_advice_that_applies():
    """The source defines test (a Kaggle train/test layout) without images of one class: the
    fractions and the seed do not touch that split, so the line does not suggest them."""
    train = synthetic_manifest(20, ["a", "b"], source_split="train")
    test = synthetic_manifest(5, ["a"], tag="t", source_split="test")
    rows = assign_splits(pd.concat([train, test], ignore_index=True), POLICY)

    assert empty_cells(rows, ["a", "b"], "toy") == [
        f"split@toy: class b has no test images ({(rows[rows.label == 'b'].split == 'train').sum()} train, "
        f"{(rows[rows.label == 'b'].split == 'val').sum()} val, 0 test); the source defines the test split; "
        "add images of b to it"
    ]


def test_empty_train_split_advice_does_not_say_raise_val():
    """The advice for an empty train split does not tell the user to raise the val fraction."""
    with pytest.raises(UserError) as caught:
        check_splits(rows_with_splits(["val", "test"], ["a", "a"]), ["a"], "toy")

    assert "raise datasets.toy.split.val" not in str(caught.value)


# --------------------------------------------------------------------------------------------
# split, end to end.


def write_png(path: Path, seed: int, mode: str = "L", size: int = 8) -> Path:
    """A PNG of seeded noise in mode L, RGB, RGBA or P at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "L":
        image = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8))
    elif mode == "RGBA":
        pixels = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
        pixels[..., 3] = 255
        pixels[0, 0, 3] = 0  # one transparent pixel
        image = Image.fromarray(pixels)
    else:
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        if mode == "P":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.save(path)
    return path


def toy_params_file(tmp_path: Path, channels: int, classes: list[str]) -> Path:
    """A params file with one `toy` dataset at working size 16."""
    raw = toy_params(classes, image_size=16, channels=channels, split={"val": 0.2, "test": 0.2, "seed": 42})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def run_split(tmp_path: Path, raw: Path, channels: int, classes: list[str]) -> tuple[Path, dict[str, int]]:
    """Validate's manifest, then split() into tmp_path/processed/toy; return the folder and counts."""
    from stages.config import load_params

    params = toy_params_file(tmp_path, channels, classes)
    manifest_path = tmp_path / "interim" / "manifest.parquet"
    manifest_path.parent.mkdir(parents=True)
    build_manifest(raw, load_params(params).dataset("toy")).to_parquet(manifest_path, index=False)
    out = tmp_path / "processed" / "toy"
    counts = split("toy", str(params), manifest_path, raw, out)
    return out, counts


def test_split_writes_uint8_arrays_that_match_splits_parquet(tmp_path):
    """split() writes per-split uint8 image and int32 label arrays consistent with splits.parquet."""
    classes = ["a", "b", "c"]
    raw = tmp_path / "raw"
    seed = 0
    for label in classes:
        for index in range(15):
            seed += 1
            write_png(raw / label / f"{index}.png", seed)
    (raw / "README.txt").write_text("set aside", encoding="utf-8")

    out, counts = run_split(tmp_path, raw, channels=1, classes=classes)

    assert sorted(p.name for p in out.parent.iterdir()) == ["toy"]
    assert not out.with_name("toy.partial").exists()
    assert json.loads((out / "classes.json").read_text(encoding="utf-8")) == classes
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    # The arrays' sha256: each split's images, then its labels, train, val, test.
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        digest.update(np.load(out / f"{name}_x.npy").tobytes())
        digest.update(np.load(out / f"{name}_y.npy").astype("<i4").tobytes())
    assert meta == {"dataset": "toy", "image_size": 16, "channels": 1, "counts": counts, "sha256": digest.hexdigest()}
    table = pd.read_parquet(out / "splits.parquet")
    assert len(table) == 45 and "README.txt" not in set(table["path"])
    # The manifest's columns but validate's near-duplicate ones: a manifest column added is not new data.
    manifest = pd.read_parquet(tmp_path / "interim" / "manifest.parquet")
    assert {"dhash", "near_group"} <= set(manifest.columns)
    assert list(table.columns) == [c for c in manifest.columns if c not in ("dhash", "near_group")] + ["split"]
    assert counts == {s: int((table["split"] == s).sum()) for s in ("train", "val", "test")}
    assert all(n > 0 for n in counts.values())
    for name in ("train", "val", "test"):
        pixels = np.load(out / f"{name}_x.npy", allow_pickle=False)
        labels = np.load(out / f"{name}_y.npy", allow_pickle=False)
        part = table[table["split"] == name].reset_index(drop=True)
        assert pixels.dtype == np.uint8 and pixels.shape == (counts[name], 16, 16, 1)
        assert labels.dtype == np.int32 and labels.shape == (counts[name],)
        assert labels.tolist() == [classes.index(label) for label in part["label"]]
        # Row i of the array is the image of row i of the split's table.
        for i in (0, len(part) - 1):
            np.testing.assert_array_equal(pixels[i], load_image(raw / part.loc[i, "path"], 16, 1))
        assert int(pixels.max()) > 0


def test_split_to_three_channels_converts_gray_rgba_and_palette_images(tmp_path):
    """With channels 3, grayscale images get three equal channels and RGBA/palette images load as RGB."""
    classes = ["gray", "rgba", "palette"]
    modes = {"gray": "L", "rgba": "RGBA", "palette": "P"}
    raw = tmp_path / "raw"
    seed = 0
    for label in classes:
        for index in range(12):
            seed += 1
            write_png(raw / label / f"{index}.png", seed, mode=modes[label])

    out, counts = run_split(tmp_path, raw, channels=3, classes=classes)

    table = pd.read_parquet(out / "splits.parquet")
    for name in ("train", "val", "test"):
        pixels = np.load(out / f"{name}_x.npy", allow_pickle=False)
        labels = np.load(out / f"{name}_y.npy", allow_pickle=False)
        assert pixels.shape == (counts[name], 16, 16, 3) and pixels.dtype == np.uint8
        gray = pixels[labels == classes.index("gray")]
        assert len(gray) == (table.loc[table["split"] == name, "label"] == "gray").sum()
        np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
        np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
        coloured = pixels[labels != classes.index("gray")]
        assert (coloured[..., 0] != coloured[..., 1]).any()


def test_load_image_flattens_alpha_onto_white_and_expands_palettes(tmp_path):
    """load_image turns RGBA (transparent = white) and palette PNGs into RGB, and gray into 1 channel."""
    rgba = write_png(tmp_path / "rgba.png", 1, mode="RGBA")
    palette = write_png(tmp_path / "palette.png", 2, mode="P")
    gray = write_png(tmp_path / "gray.png", 3, mode="L")

    flattened = load_image(rgba, 8, 3)
    with Image.open(rgba) as image:
        original = np.asarray(image)
    assert flattened.shape == (8, 8, 3) and flattened.dtype == np.uint8
    assert flattened[0, 0].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(flattened[1:, 1:], original[1:, 1:, :3])

    with Image.open(palette) as image:
        expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(load_image(palette, 8, 3), expected)

    one = load_image(gray, 8, 1)
    three = load_image(gray, 8, 3)
    assert one.shape == (8, 8, 1) and three.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(three[..., channel], one[..., 0])
    assert load_image(gray, 16, 1).shape == (16, 16, 1)


def test_split_without_a_manifest_is_a_user_error(tmp_path):
    """split() before validate says which manifest is missing."""
    params = toy_params_file(tmp_path, 1, ["a"])

    with pytest.raises(UserError, match="no manifest; run validate@toy first"):
        split("toy", str(params), tmp_path / "absent.parquet", tmp_path / "raw", tmp_path / "out")


def test_a_file_that_no_longer_decodes_at_split_is_one_line_naming_it(tmp_path: Path) -> None:
    """validate decoded every accepted file; if one fails at split all the same (changed since, or
    a decoder's bug), the stage names it instead of ending in a worker's traceback."""
    from stages.errors import UserError
    from stages.split import _decode_file

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated since validate")

    with pytest.raises(UserError) as caught:
        _decode_file(tmp_path, "a/0.png", size=8, channels=3, dataset="toy")

    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'a' / '0.png'}: validate accepted this file, but it cannot be decoded now (")
    assert message.endswith("; run validate@toy again, or move the file out of the source and fetch again")
    assert "\n" not in message


def test_a_change_in_decoding_alone_is_a_new_data_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same files split the same way, decoded differently (a changed images.py, a new Pillow):
    training's data version changes, so that a checkpoint of the old pixels is not resumed and
    MLflow's data_version tag tells the two apart. It hashed splits.parquet and meta.json only."""
    import stages.split as split_module
    from stages.loader import load_prepared

    raw = tmp_path / "raw"
    for label, seed in (("a", 1), ("a", 2), ("b", 3), ("b", 4), ("c", 5), ("c", 6)):
        write_png(raw / label / f"{seed}.png", seed)
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    before, _ = run_split(tmp_path / "before", raw, channels=1, classes=["a", "b", "c"])
    decode = split_module.load_image
    monkeypatch.setattr(split_module, "load_image", lambda *args, **kwargs: 255 - decode(*args, **kwargs))
    after, _ = run_split(tmp_path / "after", raw, channels=1, classes=["a", "b", "c"])

    assert (before / "splits.parquet").read_bytes() == (after / "splits.parquet").read_bytes()
    assert not np.array_equal(np.load(before / "train_x.npy"), np.load(after / "train_x.npy"))
    assert load_prepared(before).version != load_prepared(after).version
