r"""validate@<dataset>: account for every raw file, decode every image once, check expectations.

    python -m stages.validate --dataset digits --raw data/raw/digits \
        --manifest data/interim/digits/manifest.parquet \
        --docs reports/validation/digits/docs --summary reports/validation/digits/summary.json

The manifest has one row per file under the raw folder: usable images with status `ok`, and
everything else `set_aside` with the reason. Entries fetch refused to extract (paths escaping the
folder, links, devices, zip bombs), read from its provenance record, get a row too, named
`fetch::<entry>`: the counts cover everything the source held. A Great Expectations suite then
checks the manifest; a failed hard expectation ends the stage with one line (after the manifest,
the Data Docs and the summary are written, so the failure can be inspected).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from stages import expectations
from stages.config import DatasetConfig, load_params
from stages.errors import UserError, run_stage
from stages.fetch import changed_since_fetch
from stages.files import atomic_path, write_json_atomic
from stages.images import check_image, check_pixels, near_probes
from stages.layouts import Candidate, get_layout, map_label
from stages.workers import map_ordered

# The rules' columns, plus `frames`: how many an image file holds (the first is used), so that
# animations and multi-page files are on record.
COLUMNS = list(expectations.MANIFEST_COLUMNS)
COLUMNS.insert(COLUMNS.index("mode") + 1, "frames")
# When identical content sits in several source splits, it is kept in the most held-out one.
SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2, None: 3}


def build_manifest(raw: Path, config: DatasetConfig) -> pd.DataFrame:
    """One row per file under `raw`: where it goes, what it is, and whether it is usable."""
    if not raw.is_dir():
        raise UserError(f"{raw}: the raw dataset folder does not exist; run the fetch stage first")
    layout = get_layout(config.layout.kind)
    candidates = layout.candidates(config.layout.options, raw)
    inspect = functools.partial(_inspect, raw, classes=frozenset(config.classes))
    rows = list(map_ordered(inspect, candidates, desc="decoding"))
    manifest = pd.DataFrame(rows, columns=[*COLUMNS, "dhash_unsure"])
    manifest = set_aside_duplicates(manifest)
    manifest = group_near_duplicates(manifest).drop(columns="dhash_unsure")
    manifest["width"] = manifest["width"].astype("Int64")
    manifest["height"] = manifest["height"].astype("Int64")
    manifest["frames"] = manifest["frames"].astype("Int64")
    manifest["bytes"] = manifest["bytes"].astype("int64")
    return manifest


def shown_name(name: str) -> str:
    """`name` as text the manifest can hold: bytes of a file name that are not UTF-8 (an old tar's
    Latin-1 `caf\xe9.png`, which Python reads as surrogates) written as `\xe9`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


NOT_UTF8 = "unusable name: the file or folder name is not UTF-8; rename it (convmv -f latin1 -t utf8) and fetch again"


def _inspect(raw: Path, candidate: Candidate, classes: frozenset[str]) -> dict:
    if candidate.pixels is not None:
        return _inspect_pixels(candidate, classes)
    path = raw / candidate.path
    exists = path.is_file()
    if not exists and not candidate.reason:
        raise UserError(f"{path}: the layout named a file that does not exist (a layout bug); report it")
    readable_name = shown_name(candidate.path) == candidate.path
    if candidate.label is not None and shown_name(candidate.label) != candidate.label:
        readable_name = False
    row = {
        "path": shown_name(candidate.path),
        "label": None if candidate.label is None else shown_name(candidate.label),
        "source_split": candidate.source_split,
        "group": candidate.group,
        "width": None,
        "height": None,
        "mode": None,
        "frames": None,
        # A row of a label file that names no file here has no content to measure.
        "bytes": path.stat().st_size if exists else 0,
        "sha256": _sha256(path) if exists else "",
        "dhash": "",
        "dhash_unsure": "",
        "near_group": None,
        "status": "set_aside",
        "reason": candidate.reason,
    }
    if not readable_name:
        # Its path could not be written to the manifest, nor found again from it by split.
        row["reason"] = NOT_UTF8
        return row
    if candidate.reason:
        return row
    if row["bytes"] == 0:
        row["reason"] = "undecodable: empty file"
        return row
    check = check_image(path)
    row.update(width=check.width, height=check.height, mode=check.mode, frames=check.frames)
    row["dhash"], row["dhash_unsure"] = check.near
    if check.error:
        row["reason"] = check.error
    elif candidate.label not in classes:
        row["reason"] = f"label {candidate.label!r} is not among the declared classes"
    else:
        row["status"] = "ok"
    return row


def _inspect_pixels(candidate: Candidate, classes: frozenset[str]) -> dict:
    """An image stored as pixel values inside another file: checked like a file."""
    pixels = np.ascontiguousarray(candidate.pixels)
    check = check_pixels(pixels)
    # The shape is part of the content: the same bytes as 48x48 and as 24x96 are different images.
    digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    reason = candidate.reason or check.error
    if not reason and candidate.label not in classes:
        reason = f"label {candidate.label!r} is not among the declared classes"
    return {
        "path": candidate.path,
        "label": candidate.label,
        "source_split": candidate.source_split,
        "group": candidate.group,
        "width": check.width,
        "height": check.height,
        "mode": check.mode,
        "frames": check.frames,
        "bytes": int(pixels.nbytes),
        "sha256": digest,
        "dhash": check.near[0],
        "dhash_unsure": check.near[1],
        "near_group": None,
        "status": "set_aside" if reason else "ok",
        "reason": reason,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def set_aside_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Identical content under two labels is ambiguous: set all copies aside. Identical content in
    two source splits leaks: keep it only in the most held-out split."""
    manifest = manifest.copy()
    ok = manifest["status"] == "ok"
    for sha, group in manifest[ok].groupby("sha256"):
        if len(group) < 2:
            continue
        labels = sorted(group["label"].unique())
        if len(labels) > 1:
            reason = f"ambiguous: the same image appears under labels {', '.join(labels)}"
            manifest.loc[group.index, ["status", "reason"]] = ["set_aside", reason]
            continue
        splits = group["source_split"].where(group["source_split"].notna(), None)
        if splits.nunique(dropna=False) > 1:
            best = min(splits, key=lambda s: SPLIT_PRIORITY.get(s, 3))
            keeper = group[splits == best].iloc[0]["path"]
            leaking = group.index[(splits != best).to_numpy()]
            reason = f"leak: the same image is in the {best} split as {keeper}"
            manifest.loc[leaking, ["status", "reason"]] = ["set_aside", reason]
    return manifest


def group_near_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Near-duplicates: ok images of other bytes but the same picture (resized, re-encoded), found
    by their perceptual hashes (stages.images.near_hash): each image's hash, and the variants its
    least certain bits allow, looked up among the others' hashes (no comparison of every pair).
    Each member of a group of two or more gets `near_group`, the group's first path: split@ keeps
    a group in one split, and the rule no_near_duplicates names the groups that span two source
    splits or two labels. Nothing is set aside: a hash can match two different pictures."""
    manifest = manifest.copy()
    hashed = manifest[(manifest["status"] == "ok") & (manifest["dhash"] != "")]
    first: dict[str, int] = {}
    for index, value in zip(hashed.index, hashed["dhash"]):
        first.setdefault(value, index)
    parent = {index: index for index in hashed.index}

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for index, value, unsure in zip(hashed.index, hashed["dhash"], hashed["dhash_unsure"]):
        for probe in near_probes(value, unsure):
            if (other := first.get(probe)) is not None and root(other) != root(index):
                a, b = root(other), root(index)
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for index in hashed.index:
        groups.setdefault(root(index), []).append(index)
    for members in groups.values():
        if manifest.loc[members, "sha256"].nunique() > 1:  # exact copies alone share a split key already
            manifest.loc[members, "near_group"] = manifest.loc[members[0], "path"]
    return manifest


REFUSED_PREFIX = "fetch::"


def reason_kind(reason: str) -> str:
    """The kind of a set-aside reason, for counting: the text before its colon, with the
    reasons that name a suffix, a hidden name or a label folded into one kind each."""
    for kind in ("not an image file", "hidden file", "in a hidden folder"):
        if reason.startswith(kind):
            return kind
    if reason.startswith("label '") and reason.endswith("is not among the declared classes"):
        return "undeclared label"
    return reason.split(":")[0]


def refused_rows(provenance: Path | None) -> pd.DataFrame:
    """Manifest rows for the entries fetch refused, from its provenance record."""
    refused = []
    if provenance is not None:
        if not provenance.is_file():
            raise UserError(f"{provenance}: the fetch stage's provenance record is missing; run the fetch stage first")
        refused = json.loads(provenance.read_text(encoding="utf-8")).get("refused", [])
    # An archive may hold one path twice (both refused): the second is `fetch::<entry> #2`, and so
    # on, so that manifest paths stay unique.
    seen: Counter[str] = Counter()
    names = []
    for item in refused:
        seen[item["entry"]] += 1
        names.append(shown_name(item["entry"]) + (f" #{seen[item['entry']]}" if seen[item["entry"]] > 1 else ""))
    rows = [
        {"path": f"{REFUSED_PREFIX}{name}", "label": None, "source_split": None, "group": None,
         "width": None, "height": None, "mode": None, "frames": None, "bytes": 0, "sha256": "", "dhash": "",
         "near_group": None, "status": "set_aside",
         "reason": f"refused at fetch: {item['reason']}"}
        for item, name in zip(refused, names)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def summarise(manifest: pd.DataFrame, config: DatasetConfig, report: expectations.ExpectationReport) -> dict:
    ok = manifest[manifest["status"] == "ok"]
    reasons = Counter(reason_kind(reason) for reason in manifest.loc[manifest["status"] != "ok", "reason"])
    from_fetch = manifest["path"].str.startswith(REFUSED_PREFIX)
    return {
        # Every file under the raw folder, plus rows of label files that name no file there,
        # plus the archive entries fetch refused: files = accepted + set_aside.
        "files": int(len(manifest)),
        "rows_without_file": int(((manifest["sha256"] == "") & ~from_fetch).sum()),
        "refused_at_fetch": int(from_fetch.sum()),
        "accepted": int(len(ok)),
        "set_aside": int((manifest["status"] != "ok").sum()),
        "set_aside_by_reason": dict(sorted(reasons.items())),
        "per_class": {name: int((ok["label"] == name).sum()) for name in config.classes},
        # Accepted files with several frames (animations, multi-page files): the first is used.
        "multi_frame": int((ok["frames"].fillna(1) > 1).sum()),
        # Groups of near-duplicates (the same picture resized or re-encoded) in two source splits
        # or under two labels (the rule no_near_duplicates), and all of them (split@ keeps each
        # in one split).
        "near_duplicate_groups": expectations.leaky_near_groups(ok),
        "near_duplicate_groups_all": int(ok["near_group"].nunique()),
        # Our rules; the Data Docs page counts the Great Expectations expectations they are made of.
        "rules_passed": int(sum(o.success for o in report.outcomes)),
        "rules_failed": int(sum(not o.success for o in report.outcomes)),
    }


def validate(
    dataset: str, params_path: str, raw: Path, manifest_path: Path, docs: Path, summary_path: Path,
    provenance: Path | None = None,
) -> dict:
    config = load_params(params_path).dataset(dataset)
    if provenance is not None and provenance.is_file():
        # Rerun for a params or code change while the source changed too (DVC does not watch a
        # local folder): a new class folder would count none here.
        record = json.loads(provenance.read_text(encoding="utf-8"))
        if line := changed_since_fetch(dataset, config.source.options, record):
            print(f"validate@{dataset}: note: {line}")
    manifest = build_manifest(raw, config)
    refused = refused_rows(provenance)
    if len(refused):
        manifest = pd.concat([manifest, refused.astype(manifest.dtypes.to_dict())], ignore_index=True)
    rules = config.validation
    report = expectations.check_manifest(
        manifest,
        dataset=dataset,
        classes=config.classes,
        min_per_class=rules.min_per_class,
        max_undecodable_fraction=rules.max_undecodable_fraction,
        min_side=rules.min_side,
        max_side=rules.max_side,
        hard=rules.hard,
        expected_count=rules.expected_count,
        expected_count_tolerance=rules.expected_count_tolerance,
        docs_dir=docs,
    )
    with atomic_path(manifest_path) as temporary:
        manifest.to_parquet(temporary, index=False)
    summary = summarise(manifest, config, report)
    # The summary holds numbers (DVC metrics); each expectation's verdict in words sits with the docs.
    write_json_atomic(summary_path, summary)
    # Every file set aside, by name, beside the Data Docs (which count them but list only rules).
    aside = manifest.loc[manifest["status"] != "ok", ["path", "label", "source_split", "reason"]]
    with atomic_path(summary_path.with_name("set_aside.csv")) as temporary:
        aside.to_csv(temporary, index=False)
    write_json_atomic(docs / "expectations.json", report.to_dict())
    # The counts first, failure or not: when a hard rule fails, they say where the images went
    # (every file a stray because of a split folder's case, say).
    aside = ", ".join(f"{n} {r}" for r, n in summary["set_aside_by_reason"].items()) or "none"
    print(
        f"validate@{dataset}: {summary['files']} files = {summary['accepted']} accepted + "
        f"{summary['set_aside']} set aside ({aside}); {summary['rules_passed']} of "
        f"{summary['rules_passed'] + summary['rules_failed']} validation rules passed"
    )
    undeclared = manifest.loc[manifest["reason"].map(reason_kind) == "undeclared label", "label"].value_counts()
    if len(undeclared):
        # Not an error (a source may hold classes this dataset leaves out), but never unsaid:
        # a misspelt class folder loses every image this way.
        named = ", ".join(f"{label} ({count})" for label, count in undeclared.head(5).items())
        more = f" and {len(undeclared) - 5} more" if len(undeclared) > 5 else ""
        advice = (f"if they belong, add them to datasets.{dataset}.classes or map them with "
                  f"datasets.{dataset}.layout.class_map")
        # A folder named in another case than its class (Circle/ for circle): adding it to the
        # classes would make two classes of one, so give the map to write.
        cased = {str(label): name for label in undeclared.index for name in config.classes
                 if str(label) != name and str(label).lower() == name.lower()}
        if cased:
            pairs = ", ".join(f"{label}: {name}" for label, name in cased.items())
            others = "" if len(cased) == len(undeclared) else f"; for the others, {advice}"
            advice = (f"{', '.join(cased)} differ from datasets.{dataset}.classes in case only: map them, "
                      f"datasets.{dataset}.layout.class_map: {{{pairs}}}{others}")
        if found := _folders_above_the_classes(manifest, config):
            root, folders = found
            advice = (f"the class folders sit one level down, in '{root}' (an archive's top folder): set "
                      f"datasets.{dataset}.layout.root: '{root}'")
            if folders:
                splits = ", ".join(f"{folder}: {SPLIT_NAMES.get(folder.lower(), 'train, val or test')}" for folder in folders)
                advice = (f"the class folders sit two levels down, in split folders of '{root}' ({', '.join(folders)}): "
                          f"set datasets.{dataset}.layout.root: '{root}' and datasets.{dataset}.layout.splits: {{{splits}}}")
        print(
            f"validate@{dataset}: note: {int(undeclared.sum())} files are set aside for labels that are not declared "
            f"classes: {named}{more}; {advice}"
        )
    if root := _folder_above_the_splits(manifest, config):
        stray = int((manifest["reason"].map(reason_kind) == "stray file").sum())
        print(
            f"validate@{dataset}: note: {stray} files are set aside as stray, outside the split folders "
            f"({', '.join(config.layout.options.splits)}); the split folders sit one level down, in '{root}' (an "
            f"archive's top folder): set datasets.{dataset}.layout.root: '{root}'"
        )
    if note := _ungrouped_note(manifest, config, dataset):
        print(note)
    if summary["multi_frame"]:
        print(
            f"validate@{dataset}: note: {summary['multi_frame']} accepted image(s) hold several frames "
            f"(an animation, a multi-page TIFF, a camera's MPO JPEG with its preview); the first frame of each is "
            f"used; see the manifest's frames column in {manifest_path}"
        )
    for outcome in report.outcomes:
        if not outcome.success and not outcome.hard:
            print(f"validate@{dataset}: warning: {outcome.name}: {outcome.observed.translate(ONE_LINE)}")
    if report.hard_failures and not len(manifest):
        # Every rule fails on nothing; the rules' remedies (replace the broken files) would mislead.
        raise UserError(
            f"validate@{dataset}: {raw} holds no files; check datasets.{dataset}.source, then run "
            f"fetch@{dataset} again"
        )
    if report.hard_failures:
        failure = report.hard_failures[0]
        more = f" (and {len(report.hard_failures) - 1} more)" if len(report.hard_failures) > 1 else ""
        key = f"datasets.{dataset}"
        remedy = REMEDIES.get(failure.name, "").format(key=key)
        raise UserError(
            f"validate@{dataset}: expectation {failure.name} failed: {failure.observed.translate(ONE_LINE)}{more}; "
            f"{remedy + ', or ' if remedy else ''}take {failure.name} out of {key}.validation.hard to only warn; "
            f"see {report.docs_index} and {manifest_path}"
        )
    return summary


# A file name a script made may hold a newline, a carriage return or a tab: in a rule's text on
# the stage's warning or error line they are written \n, \r, \t, so that the line stays one.
ONE_LINE = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


# What a split folder's usual names mean, for the advice when a layout has no splits.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


def _folders_above_the_classes(manifest: pd.DataFrame, config: DatasetConfig) -> tuple[str, list[str]] | None:
    """For a `folders` layout whose files are set aside under one undeclared label, the folder to
    name as layout.root when the declared class folders sit inside it (a zip of `shapes/<class>/`
    read without a root), with no split folders; or, for a layout without splits, inside split
    folders in it (`flowers/train/<class>/`), with those; else None."""
    if config.layout.kind != "folders" or manifest["label"].isin(config.classes).any():
        return None  # some files are where the classes are: the root is right for them
    undeclared = manifest[manifest["reason"].map(reason_kind) == "undeclared label"]
    if undeclared["label"].nunique() != 1:
        return None
    options = config.layout.options
    root = options.root.strip("/")
    parts = undeclared["path"].str.slice(len(root) + 1 if root else 0).str.split("/")
    declared = set(config.classes)
    label = undeclared["label"].iloc[0]
    for depth in (1, 2) if not options.splits else (1,):  # the class folder's place below the label
        if parts.map(lambda p: len(p) >= depth + 2
                     and unicodedata.normalize("NFC", map_label(p[depth], options.class_map)) in declared).all():
            return (f"{root}/{label}" if root else label), sorted(set(parts.map(lambda p: p[1]))) if depth == 2 else []
    return None


def _folder_above_the_splits(manifest: pd.DataFrame, config: DatasetConfig) -> str:
    """For a `folders` layout with split folders none of whose files was found in one, the folder
    to name as layout.root when the split folders sit inside it (a zip of `flowers/train/<class>/`
    read without a root); else ""."""
    options = config.layout.options
    if config.layout.kind != "folders" or not options.splits or manifest["source_split"].notna().any():
        return ""
    root = options.root.strip("/")
    stray = manifest.loc[manifest["reason"].map(reason_kind) == "stray file", "path"]
    parts = stray.str.slice(len(root) + 1 if root else 0).str.split("/")
    images = parts[parts.map(len) >= 4]  # <folder>/<split>/<class>/<file>
    if images.empty or images.map(lambda p: p[0]).nunique() != 1 or not images.map(lambda p: p[1] in options.splits).all():
        return ""
    folder = images.iloc[0][0]
    return f"{root}/{folder}" if root else folder


def _ungrouped_note(manifest: pd.DataFrame, config: DatasetConfig, dataset: str) -> str:
    """For a layout given a group_column or group_pattern, a note on the images the split stage
    divides (those the source puts in no test or val split) that got no group: each is split on
    its own, apart from its group's other images. A pattern that matches no path, or an empty
    cell, would otherwise leave them so without a word; else ""."""
    options = config.layout.options
    key = next((k for k in ("group_column", "group_pattern") if getattr(options, k, "")), "")
    if not key:
        return ""
    divided = manifest[(manifest["status"] == "ok") & ~manifest["source_split"].isin(["test", "val"])]
    ungrouped = divided[divided["group"].isna()]
    if ungrouped.empty:
        return ""
    why = (f"an empty {options.group_column!r} cell" if key == "group_column"
           else "layout.group_pattern finds no group in their paths")
    return (
        f"validate@{dataset}: note: {len(ungrouped)} of {len(divided)} images the split stage divides have no group "
        f"({why}, e.g. '{ungrouped['path'].iloc[0]}'), so each is split on its own, apart from its group's other "
        f"images; check datasets.{dataset}.layout.{key}"
    )


# What to do when a hard rule fails, beside making it a warning.
REMEDIES = {
    "labels_in_class_set": "declare the labels in {key}.classes or map them with {key}.layout.class_map",
    "undecodable_fraction": "replace the broken files in the source, or raise {key}.validation.max_undecodable_fraction",
    "min_per_class": "add images to the class, or lower {key}.validation.min_per_class",
    "image_size_bounds": "remove those files from the source, or widen {key}.validation.min_side / max_side",
    "no_conflicting_labels": "keep each image under one label in the source",
    "no_near_duplicates": "keep one copy of each picture in the source (the manifest's near_group column names them)",
    "expected_count": "if the source changed, set {key}.validation.expected_count to its new count",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--docs", type=Path, required=True, help="folder for the Great Expectations Data Docs")
    parser.add_argument("--summary", type=Path, required=True, help="summary JSON (DVC metrics)")
    parser.add_argument("--provenance", type=Path, help="fetch's provenance record: its refused entries get rows")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    validate(args.dataset, args.params, args.raw, args.manifest, args.docs, args.summary, args.provenance)


if __name__ == "__main__":
    run_stage(main)
