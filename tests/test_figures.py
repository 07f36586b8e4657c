"""Evaluation and report figures: each writes a readable, reproducible PNG from small inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.figures import (
    confusion_figure,
    curves_figure,
    f1_bars_figure,
    heatmap_figure,
    heatmap_matrix,
    mistakes_figure,
    phase_two_start,
)

CLASSES = ["cat", "dog", "bird"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking it decodes and carries no matplotlib version."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert "Software" not in image.info
        return image.size


def history(phases: list[int] | None = None) -> pd.DataFrame:
    epochs = 6
    frame = pd.DataFrame(
        {
            "epoch": range(epochs),
            "accuracy": np.linspace(0.3, 0.9, epochs),
            "loss": np.linspace(2.0, 0.4, epochs),
            "val_accuracy": np.linspace(0.3, 0.85, epochs),
            "val_loss": np.linspace(2.1, 0.6, epochs),
        }
    )
    if phases is not None:
        frame.insert(1, "phase", phases)
    return frame


def per_class(n: int) -> dict[str, dict[str, float | int]]:
    return {f"class {i}": {"precision": 0.5, "recall": 0.5, "f1": i / n, "support": 10 + i} for i in range(n)}


def results() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "dataset": ["digits", "digits", "flowers"],
            "backbone": ["small_cnn", "mobilenetv2", "mobilenetv2"],
            "accuracy": [0.973, 0.991, 0.88],
        }
    )


@pytest.mark.parametrize("normalise", [False, True])
def test_confusion_figure_writes_a_png(tmp_path: Path, normalise: bool) -> None:
    path = tmp_path / "figures" / "confusion.png"
    confusion_figure(np.array([0, 1, 2, 2, 1]), np.array([0, 1, 1, 2, 1]), CLASSES, path, normalise=normalise)
    width, height = png_size(path)
    assert width > 300 and height > 300
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temporary file left behind


def test_curves_figure_marks_where_fine_tuning_starts(tmp_path: Path) -> None:
    assert phase_two_start(history()) is None
    assert phase_two_start(history([1, 1, 1, 1, 1, 1])) is None
    assert phase_two_start(history([1, 1, 1, 2, 2, 2])) == 2.5
    for name, phases in (("plain.png", None), ("tuned.png", [1, 1, 1, 2, 2, 2])):
        curves_figure(history(phases), tmp_path / name)
        width, height = png_size(tmp_path / name)
        assert width > 800 and height > 300
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "tuned.png").read_bytes()


def test_f1_bars_figure_grows_with_the_number_of_classes(tmp_path: Path) -> None:
    f1_bars_figure(per_class(3), tmp_path / "three.png")
    f1_bars_figure(per_class(30), tmp_path / "thirty.png")
    _, three = png_size(tmp_path / "three.png")
    _, thirty = png_size(tmp_path / "thirty.png")
    assert thirty > 2 * three
    with pytest.raises(ValueError, match="empty"):
        f1_bars_figure({}, tmp_path / "none.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_mistakes_figure_draws_a_grid(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, channels), dtype=np.uint8)
    labels = ["cat", "dog", "bird", "cat", "dog", "bird"]
    mistakes_figure(images, labels, labels[::-1], [0.97, 0.9, 0.8, 0.7, 0.6, 0.5], tmp_path / "grid.png", columns=4)
    mistakes_figure(images[:2], labels[:2], labels[:2], [0.97, 0.9], tmp_path / "row.png", columns=4)
    grid_width, grid_height = png_size(tmp_path / "grid.png")
    row_width, row_height = png_size(tmp_path / "row.png")
    # Four columns in two rows, against two columns in one row.
    assert grid_width > 1.5 * row_width and grid_height > 1.5 * row_height
    with Image.open(tmp_path / "grid.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # the images were drawn, not just titles


def test_mistakes_figure_without_mistakes(tmp_path: Path) -> None:
    mistakes_figure(np.zeros((0, 8, 8, 1), dtype=np.uint8), [], [], [], tmp_path / "none.png")
    width, height = png_size(tmp_path / "none.png")
    assert 100 < width < 600 and 50 < height < 300
    with pytest.raises(ValueError, match="one true label"):
        mistakes_figure(np.zeros((2, 8, 8, 1), dtype=np.uint8), ["a"], ["b"], [0.5], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="1 or 3"):
        mistakes_figure(np.zeros((1, 8, 8, 2), dtype=np.uint8), ["a"], ["b"], [0.5], tmp_path / "bad.png")


def test_heatmap_matrix_keeps_order_and_leaves_missing_pairs_empty() -> None:
    matrix = heatmap_matrix(results(), "accuracy")
    assert list(matrix.index) == ["digits", "flowers"]
    assert list(matrix.columns) == ["small_cnn", "mobilenetv2"]
    assert matrix.loc["digits", "small_cnn"] == 0.973
    assert np.isnan(matrix.loc["flowers", "small_cnn"])


def test_heatmap_matrix_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="macro_f1"):
        heatmap_matrix(results(), "macro_f1")
    with pytest.raises(ValueError, match="more than one row"):
        heatmap_matrix(pd.concat([results(), results().iloc[:1]]), "accuracy")


def test_heatmap_figure_with_a_nan_cell(tmp_path: Path) -> None:
    table = results()
    table.loc[2, "accuracy"] = np.nan
    heatmap_figure(table, "accuracy", tmp_path / "heatmap.png", "Test accuracy")
    small_width, small_height = png_size(tmp_path / "heatmap.png")
    assert small_width > 300 and small_height > 200
    many = pd.DataFrame(
        [{"dataset": f"d{i}", "backbone": f"b{j}", "accuracy": 0.1 * j} for i in range(8) for j in range(6)]
    )
    heatmap_figure(many, "accuracy", tmp_path / "many.png", "Test accuracy")
    width, height = png_size(tmp_path / "many.png")
    assert width > small_width and height > small_height


def test_same_inputs_give_identical_bytes(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    draws = {
        "confusion": lambda path: confusion_figure(np.array([0, 1, 2]), np.array([0, 2, 2]), CLASSES, path, True),
        "curves": lambda path: curves_figure(history([1, 1, 1, 2, 2, 2]), path),
        "f1": lambda path: f1_bars_figure(per_class(4), path),
        "mistakes": lambda path: mistakes_figure(images, CLASSES, CLASSES[::-1], [0.9, 0.8, 0.7], path),
        "heatmap": lambda path: heatmap_figure(results(), "accuracy", path, "Test accuracy"),
    }
    for name, draw in draws.items():
        draw(tmp_path / f"{name}-1.png")
        draw(tmp_path / f"{name}-2.png")
        assert (tmp_path / f"{name}-1.png").read_bytes() == (tmp_path / f"{name}-2.png").read_bytes(), name


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Price-range folders ('$0_$50'): matplotlib reads text between two '$' as mathtext, so
    '$0_$50' stopped evaluate with a mathtext ParseSyntaxException and '$50-$100' lost its dollars
    to italics. Every label is now plain text."""
    import matplotlib.cbook
    from stages import figures

    names = ["$0_$50", "$50-$100", "plain"]
    drawn: list[str] = []
    save = figures._save

    def keep_labels(figure: object, path: Path) -> None:
        for axes in figure.axes:  # type: ignore[attr-defined]
            texts = [axes.title, *axes.get_xticklabels(), *axes.get_yticklabels()]
            drawn.extend(text.get_text() for text in texts if text.get_text())
        save(figure, path)

    monkeypatch.setattr(figures, "_save", keep_labels)
    y = np.array([0, 1, 2, 2])
    confusion_figure(y, np.array([1, 1, 2, 0]), names, tmp_path / "confusion.png", normalise=False)
    f1_bars_figure({name: {"f1": 0.5, "support": 1} for name in names}, tmp_path / "f1.png")
    images = np.zeros((2, 8, 8, 1), dtype=np.uint8)
    mistakes_figure(images, names[:2], names[1::-1], [0.9, 0.8], tmp_path / "mistakes.png")
    for path in ("confusion.png", "f1.png", "mistakes.png"):
        png_size(tmp_path / path)
    assert not [text for text in drawn if matplotlib.cbook.is_math_text(text)], drawn
    for name in names[:2]:
        assert any(name.replace("$", r"\$") in text for text in drawn), (name, drawn)
