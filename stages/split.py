r"""split@<dataset>: a stable train/val/test split, and the images decoded once into arrays.

    python -m stages.split --dataset digits --manifest data/interim/digits/manifest.parquet \
        --raw data/raw/digits --out data/processed/digits

A file's split depends only on its key (its group if the layout gives one, else its content
hash; files sharing a group, content or a near-duplicate group share a key) and the seed: adding files never moves
existing ones (unless a new file joins two groups by their content), identical images always land
together, and every class is split in the same proportions in expectation (per-class counts
differ from the exact fractions by sampling noise, the price of stability). Splits the source
defines are honoured; only the files the source leaves unsplit are divided by the fractions.
One exception: a class none of whose images drew train (a class of one image, say) gets the
image closest to train put there, so that every class can be learnt.

Writes, in `--out`: `splits.parquet` (path, label, split, plus the manifest's columns but the
near-duplicate ones),
`classes.json`, and for each split `<split>_x.npy` (N, size, size, channels) uint8 and
`<split>_y.npy` int32 class indices, ready to be memory-mapped by training. `meta.json` holds the
arrays' sha256 (each split's images, then its labels, in train/val/test order), taken as they are
written: training's data version, so that a change in decoding is a change of data.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from stages.config import SPLITS, DatasetConfig, SplitPolicy, load_params
from stages.errors import UserError, run_stage
from stages.files import write_json_atomic
from stages.images import load_image, load_pixels
from stages.layouts import get_layout
from stages.workers import map_ordered


def unit_hash(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by `key` and `seed` alone."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_keys(rows: pd.DataFrame) -> pd.Series:
    """The key each row's split is drawn from: its group where the layout gives one, else its
    content hash; and rows that share a group, a content hash or a near-duplicate group (validate's
    `near_group`) share one key (the smallest of theirs), so that the same image under two groups
    (two lesion ids of HAM10000), with a group and without, or resized, never lands in two splits.
    A row linked to no other keeps its own key."""
    own = rows["group"].where(rows["group"].notna(), rows["sha256"]).astype(str)
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(node: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    nodes = [("group", str(g)) if pd.notna(g) else ("sha256", str(h)) for g, h in zip(rows["group"], rows["sha256"])]
    # validate's near_group: the same picture resized or re-encoded (other bytes) is linked too.
    near = rows["near_group"] if "near_group" in rows else pd.Series(None, index=rows.index, dtype=object)
    for node, sha, picture in zip(nodes, rows["sha256"].astype(str), near):
        for other in [("sha256", sha)] + ([("near", str(picture))] if isinstance(picture, str) and picture else []):
            a, b = root(node), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    smallest: dict[tuple[str, str], str] = {}
    for node, key in zip(nodes, own):
        top = root(node)
        smallest[top] = min(smallest.get(top, key), key)
    return pd.Series([smallest[root(node)] for node in nodes], index=rows.index, dtype=str)


def assign_splits(manifest: pd.DataFrame, policy: SplitPolicy) -> pd.DataFrame:
    """The usable rows of `manifest` with a `split` column added."""
    rows = manifest[manifest["status"] == "ok"].copy()
    keys = split_keys(rows)
    draws = keys.map(lambda key: unit_hash(key, policy.seed))
    defined = set(rows["source_split"].dropna())
    # A fraction applies only where the source leaves that split open (see SplitPolicy).
    carve_test = "test" not in defined
    carve_val = "val" not in defined
    test_cut = policy.test if carve_test else 0.0
    val_cut = test_cut + (policy.val if carve_val else 0.0)

    def choose(source_split: str | None, draw: float) -> str:
        if source_split in ("test", "val"):
            return source_split
        if draw < test_cut:
            return "test"
        if draw < val_cut:
            return "val"
        return "train"

    rows["split"] = [choose(s if isinstance(s, str) else None, d) for s, d in zip(rows["source_split"], draws)]
    # A class so small that none of its images drew train (a class of one image, say) would
    # leave the model unable to learn it: its unsplit key closest to train goes there instead.
    # Classes with a training image are untouched, so this never moves a file of theirs.
    unsplit = ~rows["source_split"].isin(["test", "val"])
    for label, members in rows[unsplit].groupby("label"):
        if not (rows.loc[rows["label"] == label, "split"] == "train").any():
            closest = keys[members.index][draws[members.index].idxmax()]
            rows.loc[unsplit & (keys == closest), "split"] = "train"
    return rows.reset_index(drop=True)


def check_splits(rows: pd.DataFrame, classes: list[str], dataset: str) -> None:
    for split in SPLITS:
        if not (rows["split"] == split).any():
            advice = (
                f"lower datasets.{dataset}.split.val and .test, or add images"
                if split == "train"
                else f"raise datasets.{dataset}.split.{split}, or add images"
            )
            raise UserError(f"split@{dataset}: the {split} split is empty ({len(rows)} usable images); {advice}")
    stale = sorted(set(rows["label"]) - set(classes))
    if stale:
        raise UserError(
            f"split@{dataset}: the manifest has labels that are not declared classes ({', '.join(map(str, stale[:5]))}); "
            f"rerun validate@{dataset}"
        )
    missing = sorted(set(classes) - set(rows.loc[rows["split"] == "train", "label"]))
    if missing:
        raise UserError(f"split@{dataset}: no training images for classes {', '.join(missing)}")


def empty_cells(rows: pd.DataFrame, classes: list[str], dataset: str) -> list[str]:
    """A line for each class that has no images in val or test: a split by hash is exact only on
    average, and a class of a few dozen images can draw none. Not an error (a source's own test
    split may lack a class), but its scores are missing and the split's figures rest on fewer."""
    counts = pd.crosstab(rows["label"], rows["split"]).reindex(index=classes, columns=list(SPLITS), fill_value=0)
    defined = set(rows["source_split"].dropna())
    notes = []
    for label, row in counts.iterrows():
        for split in ("val", "test"):
            if row[split] == 0:
                advice = (
                    # The fractions and the seed do not touch a split the source defines.
                    f"the source defines the {split} split; add images of {label} to it"
                    if split in defined
                    else f"raise datasets.{dataset}.split.{split}, change its seed, or add images"
                )
                notes.append(
                    f"split@{dataset}: class {label} has no {split} images ({row['train']} train, {row['val']} val, "
                    f"{row['test']} test); {advice}"
                )
    return notes


def write_arrays(rows: pd.DataFrame, raw: Path, out: Path, config: DatasetConfig,
                 dataset: str = "<dataset>") -> tuple[dict[str, int], str]:
    """Decode each image once into memory-mapped uint8 arrays, one pair per split; return the
    counts and the arrays' sha256."""
    layout = get_layout(config.layout.kind)
    in_memory = {}
    if layout.in_memory:
        # Images stored as pixel values come from the layout again, not from image files.
        in_memory = {c.path: c.pixels for c in layout.candidates(config.layout.options, raw) if c.pixels is not None}
    index = {name: i for i, name in enumerate(config.classes)}
    shape = (config.image_size, config.image_size, config.channels)
    counts = {}
    digest = hashlib.sha256()
    for split in SPLITS:
        part = rows[rows["split"] == split]
        images = np.lib.format.open_memmap(out / f"{split}_x.npy", mode="w+", dtype=np.uint8, shape=(len(part), *shape))
        if in_memory:
            decoded = (load_pixels(in_memory[p], config.image_size, config.channels) for p in part["path"])
        else:
            decode = functools.partial(_decode_file, raw, size=config.image_size, channels=config.channels,
                                       dataset=dataset)
            decoded = map_ordered(decode, part["path"].to_list(), desc=f"decoding {split}", unit="img")
        for i, image in enumerate(decoded):
            images[i] = image
            digest.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        images.flush()
        del images
        labels = part["label"].map(index).to_numpy(np.dtype("<i4"))
        digest.update(labels.tobytes())
        np.save(out / f"{split}_y.npy", labels, allow_pickle=False)
        counts[split] = int(len(part))
    return counts, digest.hexdigest()


def _decode_file(raw: Path, path: str, size: int, channels: int, dataset: str) -> np.ndarray:
    try:
        return load_image(raw / path, size, channels)
    except MemoryError:
        raise
    except Exception as error:  # validate decoded it: a file changed since, or a decoder's bug
        raise UserError(f"{raw / path}: validate accepted this file, but it cannot be decoded now "
                        f"({type(error).__name__}: {error}); run validate@{dataset} again, or move the file "
                        "out of the source and fetch again") from None


NEAR_COLUMNS = ("dhash", "near_group")


def split(dataset: str, params_path: str, manifest_path: Path, raw: Path, out: Path) -> dict[str, int]:
    config = load_params(params_path).dataset(dataset)
    if not manifest_path.exists():
        raise UserError(f"{manifest_path}: no manifest; run validate@{dataset} first")
    manifest = pd.read_parquet(manifest_path)
    rows = assign_splits(manifest, config.split)
    check_splits(rows, config.classes, dataset)
    for note in empty_cells(rows, config.classes, dataset):
        print(note)
    # Write beside the output and rename, so an interrupted split never looks complete.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        # Validate's near-duplicate bookkeeping stays in the manifest: here, it would make every
        # dataset's splits.parquet new when validate took it up, and retrain models on the same data.
        rows.drop(columns=list(NEAR_COLUMNS), errors="ignore").to_parquet(partial / "splits.parquet", index=False)
        (partial / "classes.json").write_text(json.dumps(config.classes, indent=2) + "\n", encoding="utf-8")
        counts, sha256 = write_arrays(rows, raw, partial, config, dataset)
        write_json_atomic(
            partial / "meta.json",
            {"dataset": dataset, "image_size": config.image_size, "channels": config.channels, "counts": counts,
             "sha256": sha256},
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    counts = split(args.dataset, args.params, args.manifest, args.raw, args.out)
    print(f"split@{args.dataset}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" in {args.out}")


if __name__ == "__main__":
    run_stage(main)
