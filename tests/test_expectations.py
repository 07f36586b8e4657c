"""The manifest rules, run through a real Great Expectations suite on small manifests."""

from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stages.expectations import RULES, ExpectationReport, check_manifest

CLASSES = ["cat", "dog"]
REPO = Path(__file__).resolve().parents[1]


def row(path: str, label: str | None, **overrides) -> dict:
    """One manifest row of a decodable 32x32 RGB image, unless overridden."""
    values = {
        "path": path,
        "label": label,
        "source_split": "train",
        "group": None,
        "width": 32,
        "height": 32,
        "mode": "RGB",
        "bytes": 1000,
        # Distinct content per path unless a test says otherwise.
        "sha256": hashlib.sha256(path.encode()).hexdigest(),
        "dhash": "",
        "near_group": None,
        "status": "ok",
        "reason": "",
    }
    values.update(overrides)
    return values


def undecodable(path: str) -> dict:
    """A candidate file the stage could not decode and so set aside."""
    return row(
        path,
        None,
        width=None,
        height=None,
        mode=None,
        status="set_aside",
        reason="undecodable: cannot identify image file",
    )


def manifest(rows: list[dict]) -> pd.DataFrame:
    """A manifest with the stage's column order and dtypes."""
    frame = pd.DataFrame(rows)
    frame["width"] = frame["width"].astype("Int64")
    frame["height"] = frame["height"].astype("Int64")
    frame["bytes"] = frame["bytes"].astype("int64")
    return frame


def clean_rows() -> list[dict]:
    """Three ok images per class and one undecodable file: passes every rule below."""
    rows = [row(f"{label}/{i}.png", label) for label in CLASSES for i in range(3)]
    return rows + [undecodable("broken.png")]


def check(rows: list[dict], tmp_path: Path, **overrides) -> ExpectationReport:
    """Run check_manifest with settings the clean rows satisfy, plus overrides."""
    settings = {
        "dataset": "toy",
        "classes": CLASSES,
        "min_per_class": 3,
        "max_undecodable_fraction": 0.25,
        "min_side": 8,
        "max_side": 64,
        "hard": ["labels_in_class_set", "min_per_class", "no_conflicting_labels"],
        "docs_dir": tmp_path / "docs",
    }
    settings.update(overrides)
    return check_manifest(manifest(rows), **settings)


def outcome(report: ExpectationReport, name: str):
    """The outcome of one rule, by name."""
    (found,) = [outcome for outcome in report.outcomes if outcome.name == name]
    return found


def failed(report: ExpectationReport) -> list[str]:
    """The names of the rules that failed."""
    return [outcome.name for outcome in report.outcomes if not outcome.success]


def validation_page_words(docs: Path) -> str:
    """The words of the one validation page in a Data Docs folder, without markup."""
    (page,) = (docs / "validations").rglob("*.html")
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))).split())


def test_clean_manifest_passes_every_rule_and_writes_data_docs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = check(clean_rows(), tmp_path, expected_count=7)

    assert [outcome.name for outcome in report.outcomes] == list(RULES)
    assert failed(report) == []
    assert report.success and report.hard_failures == []
    assert outcome(report, "min_per_class").expectation == "ExpectColumnValuesToBeBetween"
    assert outcome(report, "labels_in_class_set").expectation == "ExpectColumnValuesToBeInSet"
    assert outcome(report, "undecodable_fraction").observed.startswith("14.29% undecodable")

    assert report.docs_index == tmp_path / "docs" / "index.html"
    index = report.docs_index.read_text()
    assert "<html" in index.lower() and "toy_manifest" in index
    assert (tmp_path / "docs" / "expectations" / "toy_manifest.html").is_file()
    assert list((tmp_path / "docs" / "validations" / "toy_manifest").rglob("*.html"))
    # An ephemeral context leaves no GX project behind in the working directory.
    assert not (tmp_path / "gx").exists()

    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["success"] is True and summary["hard_failures"] == []
    assert set(summary["rules"]) == set(RULES)


def test_rerun_replaces_the_docs_folder(tmp_path):
    stale = tmp_path / "docs" / "validations" / "stale.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("<html>old run</html>")

    report = check(clean_rows(), tmp_path)

    assert report.docs_index.is_file()
    assert not stale.exists()


def test_expected_count_is_only_checked_when_given(tmp_path):
    report = check(clean_rows(), tmp_path)

    assert "expected_count" not in [outcome.name for outcome in report.outcomes]


def test_unknown_label_fails_and_is_named(tmp_path):
    rows = clean_rows() + [row("bird/0.png", "bird")]

    report = check(rows, tmp_path)

    assert failed(report) == ["labels_in_class_set"]
    labels = outcome(report, "labels_in_class_set")
    assert labels.hard is True
    assert "'bird' (1)" in labels.observed
    assert report.hard_failures == [labels] and not report.success


def test_missing_label_on_an_ok_row_counts_as_unknown(tmp_path):
    rows = clean_rows() + [row("loose.png", None)]

    report = check(rows, tmp_path)

    assert failed(report) == ["labels_in_class_set"]
    assert "<no label> (1)" in outcome(report, "labels_in_class_set").observed


def test_many_unknown_labels_are_summarised(tmp_path):
    rows = clean_rows() + [row(f"x/{i}.png", f"stray{i}") for i in range(8)]

    report = check(rows, tmp_path, hard=[])

    labels = outcome(report, "labels_in_class_set")
    assert not labels.success and labels.hard is False
    assert labels.observed.startswith("8 ok files with a label outside the class set")
    assert labels.observed.endswith("and 3 more")


def test_set_aside_rows_are_not_held_to_the_class_set(tmp_path):
    rows = clean_rows() + [row("odd.png", "bird", status="set_aside", reason="unreadable label")]

    report = check(rows, tmp_path)

    assert report.success


def test_data_docs_name_every_file_set_aside_with_its_reason(tmp_path):
    """More than GX's default 20: the validation page lists each set-aside file, and the record
    is not a rule, so it changes no outcome."""
    rows = clean_rows() + [undecodable(f"broken {i}.png") for i in range(24)]
    rows.append(row("cat/twin.png", "cat", status="set_aside", reason="leak: the same image is in the test split"))

    report = check(rows, tmp_path, max_undecodable_fraction=1.0)

    assert report.success and [o.name for o in report.outcomes] == [r for r in RULES if r != "expected_count"]
    text = validation_page_words(tmp_path / "docs")
    assert "values must be null, at least 0 % of the time" in text  # the record: it never fails
    for i in range(24):
        assert f"broken {i}.png: undecodable: cannot identify image file" in text
    assert "broken.png: undecodable: cannot identify image file" in text
    assert "cat/twin.png: leak: the same image is in the test split" in text
    assert "cat/0.png" not in text  # accepted files are not listed


def test_too_many_undecodable_files_fail(tmp_path):
    rows = clean_rows() + [undecodable(f"broken{i}.png") for i in range(3)]

    report = check(rows, tmp_path)

    assert failed(report) == ["undecodable_fraction"]
    fraction = outcome(report, "undecodable_fraction")
    assert fraction.hard is False
    assert fraction.observed == (
        "40% undecodable (4 of 10 files; max 25%): broken.png, broken0.png, broken1.png, broken2.png")
    assert report.hard_failures == []


def test_only_undecodable_reasons_count_towards_the_fraction(tmp_path):
    other = [row(f"dup{i}.png", "cat", status="set_aside", reason="duplicate") for i in range(5)]

    report = check(clean_rows() + other, tmp_path)

    fraction = outcome(report, "undecodable_fraction")
    assert fraction.success and fraction.observed.startswith("8.33% undecodable (1 of 12")


def test_images_with_unusable_pixels_count_as_undecodable(tmp_path):
    """A float TIFF holding NaN decodes but cannot be shown: a source of such files fails the
    fraction as one of broken files does."""
    nan = [row(f"nan{i}.tif", None, width=None, height=None, mode=None, status="set_aside",
               reason="unusable pixels: 1 of 64 pixel values are NaN or infinite") for i in range(3)]

    report = check(clean_rows() + nan, tmp_path)

    assert outcome(report, "undecodable_fraction").observed == (
        "40% undecodable (4 of 10 files; max 25%): broken.png, nan0.tif, nan1.tif, nan2.tif")


@pytest.mark.parametrize(
    ("classes", "drop", "named"),
    [
        (CLASSES + ["bird"], None, ["class 'bird' has 0 images"]),
        (CLASSES, "dog/2.png", ["class 'dog' has 2 images"]),
        (CLASSES + ["bird"], "dog/2.png", ["class 'bird' has 0 images", "class 'dog' has 2"]),
    ],
)
def test_short_classes_fail_and_are_named(tmp_path, classes, drop, named):
    rows = [r for r in clean_rows() if r["path"] != drop]

    report = check(rows, tmp_path, classes=classes)

    assert failed(report) == ["min_per_class"]
    short = outcome(report, "min_per_class")
    assert short.hard is True and report.hard_failures == [short]
    assert short.observed.endswith("(minimum 3)")
    for text in named:
        assert text in short.observed


def test_set_aside_rows_do_not_count_towards_a_class(tmp_path):
    rows = clean_rows()
    rows[0] = row(rows[0]["path"], "cat", status="set_aside", reason="too small")

    report = check(rows, tmp_path)

    assert failed(report) == ["min_per_class"]
    assert "class 'cat' has 2 images" in outcome(report, "min_per_class").observed


def test_out_of_bounds_image_size_fails_and_is_named(tmp_path):
    rows = clean_rows() + [row("cat/wide.png", "cat", width=100, height=20)]
    # A set-aside file is out of scope however large it is.
    rows.append(row("dog/huge.png", "dog", width=5000, status="set_aside", reason="too large"))

    report = check(rows, tmp_path)

    assert failed(report) == ["image_size_bounds"]
    sizes = outcome(report, "image_size_bounds")
    assert sizes.hard is False
    assert sizes.observed == "1 ok image outside [8, 64] px: cat/wide.png 100x20"


def test_too_small_height_alone_fails(tmp_path):
    rows = clean_rows() + [row("dog/flat.png", "dog", height=4)]

    report = check(rows, tmp_path, hard=["image_size_bounds"])

    sizes = outcome(report, "image_size_bounds")
    assert not sizes.success and sizes.hard is True
    assert "dog/flat.png 32x4" in sizes.observed


def test_same_content_under_two_labels_fails_and_is_named(tmp_path):
    shared = "ab" * 32
    rows = clean_rows() + [
        row("cat/copy.png", "cat", sha256=shared),
        row("dog/copy.png", "dog", sha256=shared),
    ]

    report = check(rows, tmp_path)

    assert failed(report) == ["no_conflicting_labels"]
    conflict = outcome(report, "no_conflicting_labels")
    assert conflict.hard is True
    assert conflict.observed == f"1 sha256 under several labels: {shared[:12]} ('cat', 'dog')"


def test_same_content_under_one_label_is_no_conflict(tmp_path):
    shared = "cd" * 32
    rows = clean_rows() + [
        row("cat/a.png", "cat", sha256=shared),
        row("cat/b.png", "cat", sha256=shared),
    ]

    report = check(rows, tmp_path)

    assert outcome(report, "no_conflicting_labels").success


def test_expected_count_off_fails(tmp_path):
    report = check(clean_rows(), tmp_path, expected_count=100, hard=["expected_count"])

    assert failed(report) == ["expected_count"]
    count = outcome(report, "expected_count")
    assert count.hard is True
    assert count.expectation == "ExpectTableRowCountToBeBetween"
    assert count.observed == "7 files (expected 100 +/- 2%: 98..102)"


def test_expected_count_within_tolerance_passes(tmp_path):
    report = check(clean_rows(), tmp_path, expected_count=8, expected_count_tolerance=0.2)

    assert outcome(report, "expected_count").success


def test_unknown_hard_rule_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="min_per_clas'") as error:
        check(clean_rows(), tmp_path, hard=["min_per_clas"])

    for name in RULES:
        assert name in str(error.value)
    assert not (tmp_path / "docs").exists()


def test_importing_the_module_is_quiet_and_does_not_load_gx():
    code = (
        "import sys, stages.expectations; "
        "assert 'great_expectations' not in sys.modules, 'GX imported eagerly'"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_data_docs_show_a_set_aside_name_holding_markup_as_text(tmp_path):
    """A file name is data: one holding `<`, `>` or `&` (an archive's `<img src=x onerror=...>.txt`)
    is shown as written on the validation page, never read as HTML that runs in the browser."""
    names = ["cat/<img src=x onerror=alert(1)>.txt", "cat/fish &amp; chips.txt", "cat/$column <b>x</b>.txt"]
    rows = clean_rows() + [row(name, "cat", status="set_aside", reason="not an image file ('.txt')") for name in names]

    check(rows, tmp_path)

    (page,) = (tmp_path / "docs" / "validations").rglob("*.html")
    markup = page.read_text(encoding="utf-8")
    assert "<img src=x" not in markup and "<b>x</b>" not in markup
    text = validation_page_words(tmp_path / "docs")
    for name in names:
        assert f"{name}: not an image file ('.txt')" in text
