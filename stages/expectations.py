"""Check a dataset manifest with a Great Expectations suite and render GX Data Docs.

The `validate` stage builds a manifest (one row per candidate image file) and sets bad rows
aside. This module then states what a usable dataset looks like as a real GX 1.x expectation
suite named `<dataset>_manifest`, validates the manifest against it, and writes the Data Docs
site GX renders from that validation to a folder the stage owns.

Some rules are about the files, some about the classes and some about distinct image contents,
so the manifest is turned into one *checks* table holding three kinds of record, told apart by
the `record` column:

- "file": every manifest row, plus derived columns (`undecodable`; `set_aside`, "<path>:
  <reason>" for a file set aside; `near_duplicate`, "<path> ~ <the group's other paths>
  (<where>)" for an ok file with near-duplicates; and `label` with a placeholder for a missing
  label, because GX column-map expectations skip nulls);
- "class": one row per declared class with its number of ok images (`class_images`), so that a
  declared class with no images at all is a row GX can see and fail;
- "content": one row per distinct sha256 among ok rows with its number of distinct labels
  (`sha256_labels`).

Each expectation picks its records with a GX row condition, so the whole check is one suite,
one validation result and one page of Data Docs. GX decides whether each rule holds; the short
`observed` texts that name the offenders are read from the same checks table, because GX's own
result only lists offending values (a count of 3), not which class or file they belong to.
Beside the rules, the suite holds one record that never fails: it lists every file set aside,
with its reason, so that the Data Docs name them as the manifest and set_aside.csv do.
"""

from __future__ import annotations

import html
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pandas as pd

if TYPE_CHECKING:
    from great_expectations.expectations.expectation import Expectation

RULES = (
    "labels_in_class_set",
    "undecodable_fraction",
    "min_per_class",
    "image_size_bounds",
    "no_conflicting_labels",
    "no_near_duplicates",
    "expected_count",
)
"""Our rule names, in the order the report lists them."""

MANIFEST_COLUMNS = (
    "path",
    "label",
    "source_split",
    "group",
    "width",
    "height",
    "mode",
    "bytes",
    "sha256",
    "dhash",  # the perceptual hash (stages.images.near_hash), "" where not taken
    "near_group",  # the first file of its group of near-duplicates (see validate), else null
    "status",
    "reason",
)

NO_LABEL = "<no label>"
"""Stands in for a missing label, so that GX counts it as a value outside the class set."""

EXAMPLES = 5
"""How many offenders an observed text names before it says "and N more"."""

SHA256_PREFIX = 12
"""How much of a sha256 an observed text shows: enough to find the files, short enough to read."""

DOCS_SITE = "classmatrix"
"""The name of the one Data Docs site our GX context knows about."""


@dataclass(frozen=True)
class ExpectationOutcome:
    """How one of our rules fared."""

    name: str  # our short rule name, e.g. "min_per_class"
    expectation: str  # the GX expectation class used, e.g. "ExpectColumnValuesToBeBetween"
    hard: bool  # a failed hard rule must fail the stage
    success: bool
    observed: str  # e.g. "class '7' has 3 images (minimum 10)"


@dataclass(frozen=True)
class ExpectationReport:
    """All rule outcomes of one check and where its Data Docs landed."""

    outcomes: list[ExpectationOutcome]
    docs_index: Path  # the Data Docs index.html that was written

    @property
    def hard_failures(self) -> list[ExpectationOutcome]:
        """The failed rules that must fail the stage."""
        return [outcome for outcome in self.outcomes if outcome.hard and not outcome.success]

    @property
    def success(self) -> bool:
        """Whether every rule held, hard or not."""
        return all(outcome.success for outcome in self.outcomes)

    def to_dict(self) -> dict:
        """A JSON-serialisable summary, shaped for a DVC metrics file."""
        return {
            "success": self.success,
            "rules_failed": sum(not outcome.success for outcome in self.outcomes),
            "hard_failures": [outcome.name for outcome in self.hard_failures],
            "rules": {
                outcome.name: {
                    "expectation": outcome.expectation,
                    "hard": outcome.hard,
                    "success": outcome.success,
                    "observed": outcome.observed,
                }
                for outcome in self.outcomes
            },
            "docs_index": self.docs_index.as_posix(),
        }


@dataclass(frozen=True)
class _Rule:
    """One of our rules as GX expectations, plus how to describe what was observed."""

    name: str
    expectations: list[Expectation]
    describe: Callable[[pd.DataFrame], str]  # checks table -> observed text


def check_manifest(
    manifest: pd.DataFrame,
    *,
    dataset: str,
    classes: list[str],
    min_per_class: int,
    max_undecodable_fraction: float,
    min_side: int,
    max_side: int,
    hard: Sequence[str],
    expected_count: int | None = None,
    expected_count_tolerance: float = 0.02,
    docs_dir: Path,
) -> ExpectationReport:
    """Validate `manifest` with the suite `<dataset>_manifest` and write Data Docs to `docs_dir`.

    `hard` names the rules whose failure must fail the stage; an unknown name raises ValueError.
    `docs_dir` is replaced wholesale, so it only ever holds this run's Data Docs.
    """
    hard = _check_hard_names(hard)
    _check_columns(manifest)
    checks = _checks_table(manifest, classes)
    rules = _rules(
        classes=classes,
        min_per_class=min_per_class,
        max_undecodable_fraction=max_undecodable_fraction,
        min_side=min_side,
        max_side=max_side,
        expected_count=expected_count,
        expected_count_tolerance=expected_count_tolerance,
    )
    results = _validate(checks, rules, suite_name=f"{dataset}_manifest", docs_dir=Path(docs_dir))
    outcomes = [_outcome(rule, results, checks, hard) for rule in rules]
    return ExpectationReport(outcomes=outcomes, docs_index=Path(docs_dir) / "index.html")


# --- inputs ---------------------------------------------------------------------------------


def _check_hard_names(hard: Sequence[str]) -> frozenset[str]:
    """Refuse a rule name we do not know, since a typo would silently soften a check."""
    if isinstance(hard, str):
        hard = [hard]  # a lone name, not its letters
    unknown = [name for name in hard if name not in RULES]
    if unknown:
        raise ValueError(
            f"unknown validation rule(s) in hard: {', '.join(map(repr, unknown))}; "
            f"valid rules are: {', '.join(RULES)}"
        )
    return frozenset(hard)


def _check_columns(manifest: pd.DataFrame) -> None:
    """Fail early and plainly on a manifest that lacks columns the rules read."""
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s): {', '.join(missing)}")


# --- the checks table -----------------------------------------------------------------------


def _checks_table(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Stack file, class and content records into the one table the suite validates."""
    files = _file_records(manifest)
    ok = files[files["status"] == "ok"]
    parts = [files, _class_records(ok, classes), _content_records(ok)]
    return pd.concat(parts, ignore_index=True)


def _file_records(manifest: pd.DataFrame) -> pd.DataFrame:
    """Every manifest row, with a 0/1 `undecodable` column and no null labels."""
    files = manifest.loc[:, list(MANIFEST_COLUMNS)].copy()
    files.insert(0, "record", "file")
    files["label"] = files["label"].astype("object").where(files["label"].notna(), NO_LABEL)
    # 0/1 rather than bool so that the column's mean is the undecodable fraction.
    reasons = files["reason"].fillna("").astype(str)
    # An image whose pixels cannot be shown (NaN in a float TIFF) counts as undecodable.
    files["undecodable"] = reasons.str.startswith(("undecodable", "unusable pixels")).astype("int64")
    # "<path>: <reason>" for each set-aside file, null for the rest: the Data Docs record that
    # names every file set aside (see _set_aside_record). HTML-escaped: GX puts the values into
    # the page as they are, so a name holding `<`, `>` or `&` would be read as markup.
    aside = files["status"] != "ok"
    named = (files["path"].astype(str) + ": " + reasons).map(html.escape)
    files["set_aside"] = named.where(aside, None).astype("object")
    files["near_duplicate"] = _near_duplicate_texts(files).map(html.escape, na_action="ignore").astype("object")
    # An ok row of unknown size cannot be within bounds; 0 px says so without a null, which
    # column-map expectations would skip.
    for side in ("width", "height"):
        files[side] = files[side].astype("Int64").fillna(0)
    return files.reset_index(drop=True)


def _near_duplicate_texts(files: pd.DataFrame) -> pd.Series:
    """For each ok file in a group of near-duplicates, "<path> ~ <the others> (<where>)"; null
    for the rest."""
    ok = files[(files["status"] == "ok") & files["near_group"].notna()]
    texts = pd.Series(None, index=files.index, dtype="object")
    for _, group in ok.groupby("near_group", sort=False):
        if (where := _near_where(group)) is None:
            continue
        for index, path in zip(group.index, group["path"]):
            others = [other for other in group["path"] if other != path]
            texts[index] = f"{path} ~ {', '.join(others)} ({where})"
    return texts


def _near_where(group: pd.DataFrame) -> str | None:
    """Why a group of near-duplicates matters: the source splits or labels it spans; None for a
    group in one class and one split (or none), which split@ keeps in one split."""
    splits = group["source_split"].dropna().unique()
    if len(splits) > 1 or (len(splits) and group["source_split"].isna().any()):
        return f"in splits {', '.join(sorted(map(str, splits)))}"
    labels = sorted(map(str, group["label"].unique()))
    if len(labels) > 1:
        return f"under labels {', '.join(labels)}"
    return None


def leaky_near_groups(ok: pd.DataFrame) -> int:
    """How many groups of near-duplicates among the ok rows span two source splits or labels."""
    return sum(_near_where(group) is not None for _, group in ok[ok["near_group"].notna()].groupby("near_group"))


def _class_records(ok: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per declared class with its ok image count, zero included."""
    counts = ok["label"].value_counts()
    return pd.DataFrame(
        {
            "record": "class",
            "label": pd.Series(classes, dtype="object"),
            "class_images": pd.Series(
                [int(counts.get(name, 0)) for name in classes], dtype="Int64"
            ),
        }
    )


def _content_records(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct ok image content (sha256) with its number of distinct labels."""
    labels_per_sha = ok.groupby("sha256", sort=True)["label"].nunique()
    return pd.DataFrame(
        {
            "record": "content",
            "sha256": pd.Series(labels_per_sha.index, dtype="object"),
            "sha256_labels": pd.Series(labels_per_sha.to_numpy(), dtype="Int64"),
        }
    )


def _records(checks: pd.DataFrame, kind: str, *, ok_only: bool = False) -> pd.DataFrame:
    """The rows of one record kind, as the matching GX row condition selects them."""
    rows = checks[checks["record"] == kind]
    return rows[rows["status"] == "ok"] if ok_only else rows


# --- the rules ------------------------------------------------------------------------------


def _rules(
    *,
    classes: list[str],
    min_per_class: int,
    max_undecodable_fraction: float,
    min_side: int,
    max_side: int,
    expected_count: int | None,
    expected_count_tolerance: float,
) -> list[_Rule]:
    """Our rules as GX expectations, each tagged with its rule name in `meta`."""
    gxe, Column = _gx_expectations()
    files = Column("record") == "file"
    ok_files = files & (Column("status") == "ok")

    def tag(name: str, note: str) -> dict:
        return {"meta": {"rule": name}, "notes": f"classmatrix rule `{name}`: {note}"}

    rules = [
        _Rule(
            "labels_in_class_set",
            [
                gxe.ExpectColumnValuesToBeInSet(
                    column="label",
                    value_set=list(classes),
                    row_condition=ok_files,
                    **tag("labels_in_class_set", "every ok file has a declared label."),
                )
            ],
            _describe_labels,
        ),
        _Rule(
            "undecodable_fraction",
            [
                gxe.ExpectColumnMeanToBeBetween(
                    column="undecodable",
                    min_value=0,
                    max_value=max_undecodable_fraction,
                    row_condition=files,
                    **tag("undecodable_fraction", "few candidate files fail to decode."),
                )
            ],
            lambda checks: _describe_undecodable(checks, max_undecodable_fraction),
        ),
        _Rule(
            "min_per_class",
            [
                gxe.ExpectColumnValuesToBeBetween(
                    column="class_images",
                    min_value=min_per_class,
                    row_condition=Column("record") == "class",
                    **tag("min_per_class", "every declared class has enough ok images."),
                )
            ],
            lambda checks: _describe_class_counts(checks, min_per_class),
        ),
        _Rule(
            "image_size_bounds",
            [
                gxe.ExpectColumnValuesToBeBetween(
                    column=side,
                    min_value=min_side,
                    max_value=max_side,
                    row_condition=ok_files,
                    **tag("image_size_bounds", f"ok images have a sane {side} in px."),
                )
                for side in ("width", "height")
            ],
            lambda checks: _describe_sizes(checks, min_side, max_side),
        ),
        _Rule(
            "no_conflicting_labels",
            [
                gxe.ExpectColumnValuesToBeBetween(
                    column="sha256_labels",
                    max_value=1,
                    row_condition=Column("record") == "content",
                    **tag("no_conflicting_labels", "one image content, one label."),
                )
            ],
            _describe_conflicts,
        ),
        _Rule(
            "no_near_duplicates",
            [
                gxe.ExpectColumnValuesToBeNull(
                    column="near_duplicate",
                    row_condition=ok_files,
                    **tag(
                        "no_near_duplicates",
                        "no picture is in the dataset twice as different files (resized or "
                        "re-encoded: the same perceptual hash) in two source splits or under two "
                        "labels (copies in one class are kept in one split by split@). Each file "
                        "listed below names its near-duplicates; small or near-uniform images are "
                        "not compared.",
                    ),
                )
            ],
            _describe_near_duplicates,
        ),
    ]
    if expected_count is not None:
        low, high = _count_bounds(expected_count, expected_count_tolerance)
        rules.append(
            _Rule(
                "expected_count",
                [
                    gxe.ExpectTableRowCountToBeBetween(
                        min_value=low,
                        max_value=high,
                        row_condition=files,
                        **tag("expected_count", "the source has as many files as documented."),
                    )
                ],
                lambda checks: _describe_count(
                    checks, expected_count, expected_count_tolerance, low, high
                ),
            )
        )
    return rules


def _set_aside_record() -> Expectation:
    """Not a rule: an expectation that always holds and lists, in the Data Docs, every file set
    aside with its reason (as the manifest and set_aside.csv do), one row per file."""
    gxe, Column = _gx_expectations()
    return gxe.ExpectColumnValuesToBeNull(
        column="set_aside",
        mostly=0.0,
        row_condition=Column("record") == "file",
        meta={"record": "set_aside"},
        notes=(
            "classmatrix record `set_aside`: the files set aside and why, one per row. It never "
            "fails; the rules above decide whether the dataset is usable."
        ),
    )


def _count_bounds(expected: int, tolerance: float) -> tuple[int, int]:
    """The whole file counts within expected*(1±tolerance)."""
    # Rounding first keeps float noise (1000*0.98 = 979.999...) from moving a bound by one.
    low = math.ceil(round(expected * (1 - tolerance), 6))
    high = math.floor(round(expected * (1 + tolerance), 6))
    return low, high


# --- observed texts -------------------------------------------------------------------------


def _describe_labels(checks: pd.DataFrame) -> str:
    """Name the labels of ok files that are not declared classes."""
    declared = set(_records(checks, "class")["label"])
    ok = _records(checks, "file", ok_only=True)
    unknown = ok.loc[~ok["label"].isin(declared), "label"]
    if unknown.empty:
        return f"{_count(len(ok), 'ok file')}, all with a declared label"
    counts = unknown.value_counts()
    counts = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    named = [f"{_label_text(label)} ({count})" for label, count in counts.items()]
    offenders = _count(len(unknown), "ok file")
    return f"{offenders} with a label outside the class set: {_some(named)}"


def _describe_undecodable(checks: pd.DataFrame, maximum: float) -> str:
    """Say what fraction of all candidate files could not be decoded."""
    files = _records(checks, "file")
    if files.empty:
        # GX fails a mean over no rows; there is no fraction to quote.
        return f"no candidate files, so no undecodable fraction (max {_percent(maximum)})"
    bad = int(files["undecodable"].sum())
    # The files themselves, the first few: which to replace is what a failure must say.
    named = f": {_some(list(files.loc[files['undecodable'] == 1, 'path']))}" if bad else ""
    return (
        f"{_percent(bad / len(files))} undecodable ({bad} of {_count(len(files), 'file')}; "
        f"max {_percent(maximum)}){named}"
    )


def _describe_class_counts(checks: pd.DataFrame, minimum: int) -> str:
    """Name the declared classes with fewer ok images than `minimum`."""
    counts = _records(checks, "class")[["label", "class_images"]]
    short = counts[counts["class_images"] < minimum]
    if short.empty:
        if counts.empty:
            return "no classes declared"
        fewest = counts.loc[counts["class_images"].astype("int64").idxmin()]
        return (
            f"every class has at least {_count(minimum, 'image')} "
            f"(fewest: {_label_text(fewest['label'])} with {fewest['class_images']})"
        )
    short = short.sort_values("class_images", kind="stable")
    named = [
        f"class {_label_text(label)} has {_count(count, 'image')}"
        for label, count in zip(short["label"], short["class_images"])
    ]
    return f"{_some(named)} (minimum {minimum})"


def _describe_sizes(checks: pd.DataFrame, low: int, high: int) -> str:
    """Name the ok files whose width or height falls outside [low, high]."""
    ok = _records(checks, "file", ok_only=True)
    outside = ok[~(ok["width"].between(low, high) & ok["height"].between(low, high))]
    if outside.empty:
        return f"{_count(len(ok), 'ok image')}, all within [{low}, {high}] px"
    named = [
        f"{path} {_size_text(width, height)}"
        for path, width, height in zip(outside["path"], outside["width"], outside["height"])
    ]
    return f"{_count(len(outside), 'ok image')} outside [{low}, {high}] px: {_some(named)}"


def _describe_conflicts(checks: pd.DataFrame) -> str:
    """Name the image contents (sha256 prefixes) found under more than one label."""
    contents = _records(checks, "content")
    conflicting = contents.loc[contents["sha256_labels"] > 1, "sha256"]
    if conflicting.empty:
        return f"no conflicting labels among {_count(len(contents), 'distinct ok image')}"
    ok = _records(checks, "file", ok_only=True)
    labels = ok[ok["sha256"].isin(conflicting)].groupby("sha256", sort=True)["label"].unique()
    named = [
        f"{sha256[:SHA256_PREFIX]} ({', '.join(map(_label_text, sorted(names)))})"
        for sha256, names in labels.items()
    ]
    return f"{_count(len(conflicting), 'sha256')} under several labels: {_some(named)}"


def _describe_near_duplicates(checks: pd.DataFrame) -> str:
    """Name the groups of near-duplicate files, with where they sit."""
    ok = _records(checks, "file", ok_only=True)
    compared = f"{int((ok['dhash'] != '').sum())} of {_count(len(ok), 'ok image')} compared (the rest too small or too uniform)"
    groups = [group for _, group in ok[ok["near_group"].notna()].groupby("near_group", sort=False)]
    named = [f"{' ~ '.join(group['path'])} ({where})" for group in groups if (where := _near_where(group))]
    together = len(groups) - len(named)
    kept = f"{_count(together, 'group')} in one class kept in one split by split@; " if together else ""
    if not named:
        return f"no near-duplicates in two splits or under two labels; {kept}{compared}"
    return (f"{_count(len(named), 'group')} of near-duplicate images (the same picture resized or re-encoded): "
            f"{_some(named)}; {kept}{compared}")


def _describe_count(
    checks: pd.DataFrame, expected: int, tolerance: float, low: int, high: int
) -> str:
    """Compare the number of candidate files with the documented count."""
    count = len(_records(checks, "file"))
    expected_text = f"expected {expected} +/- {_percent(tolerance)}: {low}..{high}"
    return f"{_count(count, 'file')} ({expected_text})"


def _some(items: list[str]) -> str:
    """The first few items, then how many more there are."""
    shown = ", ".join(items[:EXAMPLES])
    rest = len(items) - EXAMPLES
    return f"{shown} and {rest} more" if rest > 0 else shown


def _count(number: int, noun: str) -> str:
    """'1 file', '3 files': a number with its noun, plural when it needs one."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _label_text(label: str) -> str:
    """A label quoted, except the missing-label placeholder, which is not a label."""
    return label if label == NO_LABEL else repr(str(label))


def _size_text(width: int, height: int) -> str:
    """WxH, or a plain word where the size was never read (stored as 0)."""
    return "of unknown size" if width == 0 or height == 0 else f"{width}x{height}"


def _percent(fraction: float) -> str:
    """0.004 -> '0.4%', 0.05 -> '5%': short, without trailing zeros."""
    text = f"{fraction * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


# --- running GX -----------------------------------------------------------------------------


def _gx_expectations():
    """The GX expectations module and the row-condition `Column`, imported on first use.

    GX takes seconds to import, so only a stage that really validates pays for it.
    """
    _import_gx()
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    return gxe, Column


def _import_gx():
    """Import great_expectations with usage statistics off: there is no network here."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx

    return gx


def _validate(
    checks: pd.DataFrame, rules: list[_Rule], *, suite_name: str, docs_dir: Path
) -> list[Any]:
    """Run the suite on the checks table through a checkpoint that writes Data Docs.

    Returns GX's ExpectationValidationResult for every expectation, in suite order.
    """
    gx = _import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction

    # The stage owns docs_dir: clear it so that no earlier run's pages linger in the index.
    if docs_dir.exists():
        shutil.rmtree(docs_dir)
    context = _context(docs_dir.resolve())
    batch = (
        context.data_sources.add_pandas("classmatrix")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole manifest")
    )
    expectations = [expectation for rule in rules for expectation in rule.expectations]
    expectations.append(_set_aside_record())
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite_name,
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
            # Every unexpected value listed, not GX's default 20: the set-aside record names
            # each file set aside.
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": max(20, len(checks))},
        )
    )
    result = checkpoint.run(
        batch_parameters={"dataframe": checks},
        run_id=gx.RunIdentifier(run_name=suite_name),
    )
    (validation,) = result.run_results.values()
    return list(validation.results)


def _context(docs_dir: Path):
    """An in-memory GX context whose only Data Docs site is `docs_dir`.

    Being ephemeral, it writes no `gx/` project folder anywhere; only the site hits the disk.
    """
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    gx = _import_gx()
    site = {
        "class_name": "SiteBuilder",
        # The how-to buttons point at GX setup guides, which mean nothing to our readers.
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(docs_dir),
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={DOCS_SITE: site},
        analytics_enabled=False,
        # tqdm bars on stderr would clutter the stage's one-line error contract.
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _outcome(
    rule: _Rule, results: list[Any], checks: pd.DataFrame, hard: frozenset[str]
) -> ExpectationOutcome:
    """Fold the GX results of one rule's expectations into our outcome."""
    own = [result for result in results if result.expectation_config.meta.get("rule") == rule.name]
    if len(own) != len(rule.expectations):
        raise RuntimeError(f"GX returned {len(own)} results for rule {rule.name!r}")
    kinds = sorted({type(expectation).__name__ for expectation in rule.expectations})
    return ExpectationOutcome(
        name=rule.name,
        expectation="+".join(kinds),
        hard=rule.name in hard,
        success=all(result.success for result in own),
        observed=rule.describe(checks),
    )
