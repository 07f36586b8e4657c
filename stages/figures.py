"""Figures for the evaluate and report stages, written as PNG files.

Each function draws one figure from plain arrays or tables and writes it atomically. matplotlib
is imported inside the functions with the Agg backend, so importing this module opens no display
and costs nothing. The PNGs carry no matplotlib version and no date, so the same inputs give the
same bytes and DVC sees no change when nothing changed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.files import atomic_path

DPI = 110
# Images at most this many pixels a side are shown with square pixels rather than smoothed.
SMALL_IMAGE = 64


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> None:
    """Write `figure` to `path` as a reproducible PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as temporary:
            # Without "Software" the PNG holds only pixels; matplotlib writes no date into PNGs.
            figure.savefig(temporary, dpi=DPI, format="png", metadata={"Software": None})
    finally:
        plt.close(figure)


def _plain(name: str) -> str:
    """A class name as matplotlib text that shows it as written: between two '$' it reads
    mathtext, so '$0_$50' failed to draw and '$50-$100' lost its dollars; '\\$' is a plain '$'."""
    return name.replace("$", r"\$")


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path, normalise: bool) -> None:
    """The confusion matrix in counts, or normalised by true class (each row sums to one)."""
    plt = _pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.45 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_pred,
        labels=list(range(len(classes))),
        display_labels=[_plain(name) for name in classes],
        normalize="true" if normalise else None,
        values_format=".2f" if normalise else "d",
        cmap="Blues",
        colorbar=False,
        ax=axes,
        xticks_rotation=45 if len(classes) > 6 else "horizontal",
    )
    axes.set_title("Confusion matrix" + (" (normalised by true class)" if normalise else " (counts)"))
    figure.tight_layout()
    _save(figure, path)


def phase_two_start(history: pd.DataFrame) -> float | None:
    """Where fine-tuning starts on the epoch axis (half an epoch before its first), or None."""
    if "phase" not in history or not (history["phase"] == 2).any():
        return None
    return float(history.loc[history["phase"] == 2, "epoch"].min()) - 0.5


def curves_figure(history: pd.DataFrame, path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, with a dashed line where fine-tuning starts.

    `history` is train's history.csv: an `epoch` column, metric columns (`loss`, `val_loss`, ...)
    and optionally `phase` (1 or 2).
    """
    plt = _pyplot()
    fine_tuning = phase_two_start(history)
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for name, axes in (("loss", loss), ("accuracy", accuracy)):
        for prefix in ("", "val_"):
            if prefix + name in history:
                axes.plot(history["epoch"], history[prefix + name], label=(prefix or "train_").rstrip("_"))
        if fine_tuning is not None:
            axes.axvline(fine_tuning, color="grey", linestyle="--", linewidth=1, label="fine-tuning")
        axes.set_xlabel("epoch")
        axes.set_title(name)
        axes.legend()
    figure.tight_layout()
    _save(figure, path)


def f1_bars_figure(per_class: dict[str, dict[str, Any]], path: Path) -> None:
    """Per-class F1 as horizontal bars, the lowest at the top, each class labelled with its support.

    `per_class` is the second value of `stages.metrics.score`: {class: {f1, support, ...}}.
    """
    if not per_class:
        raise ValueError("per_class is empty: no classes to draw")
    plt = _pyplot()
    rows = sorted(per_class.items(), key=lambda item: (item[1]["f1"], item[0]))
    scores = [float(values["f1"]) for _, values in rows]
    labels = [f"{_plain(name)} (n={int(values['support'])})" for name, values in rows]
    figure, axes = plt.subplots(figsize=(7, max(2.5, 0.3 * len(rows) + 1.2)))
    positions = np.arange(len(rows))
    axes.barh(positions, scores, color="tab:blue")
    for position, value in zip(positions, scores):
        axes.text(value + 0.01, position, f"{value:.2f}", va="center", fontsize=8)
    axes.set_yticks(positions, labels)
    # Ascending from the top: the classes that need attention are read first.
    axes.invert_yaxis()
    axes.set_xlim(0, 1.1)
    axes.set_xlabel("F1")
    axes.set_title("F1 per class (test split)")
    figure.tight_layout()
    _save(figure, path)


def mistakes_figure(
    images: np.ndarray,
    true_labels: list[str],
    predicted_labels: list[str],
    confidences: list[float],
    path: Path,
    columns: int = 4,
) -> None:
    """A grid of misclassified images, each titled with its true and predicted class and confidence.

    `images` is uint8 (n, height, width, channels) with 1 or 3 channels (or (n, height, width));
    pass them in the order to show, e.g. from `stages.metrics.most_confident_mistakes`. With no
    images the figure says there were no mistakes.
    """
    images = np.asarray(images)
    n = len(images)
    if not len(true_labels) == len(predicted_labels) == len(confidences) == n:
        raise ValueError(
            f"need one true label, predicted label and confidence per image: {n} images, "
            f"{len(true_labels)}, {len(predicted_labels)}, {len(confidences)}"
        )
    if n and not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise ValueError(f"images must be (n, height, width) or (n, height, width, 1 or 3), got {images.shape}")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    plt = _pyplot()
    if n == 0:
        figure, axes = plt.subplots(figsize=(4, 1.5))
        axes.text(0.5, 0.5, "No mistakes on the test split", ha="center", va="center", fontsize=11)
        axes.axis("off")
        _save(figure, path)
        return
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.7 * rows + 0.4), squeeze=False)
    interpolation = "nearest" if max(images.shape[1:3]) <= SMALL_IMAGE else "antialiased"
    for index, axes in enumerate(grid.flat):
        axes.axis("off")
        if index >= n:
            continue
        image = images[index]
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            axes.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation=interpolation)
        else:
            axes.imshow(image, interpolation=interpolation)
        true, predicted = _plain(true_labels[index]), _plain(predicted_labels[index])
        axes.set_title(f"true: {true}\npred: {predicted} ({confidences[index]:.0%})", fontsize=8)
    figure.suptitle("Most confident mistakes")
    figure.tight_layout()
    _save(figure, path)


def heatmap_matrix(table: pd.DataFrame, value: str) -> pd.DataFrame:
    """`table`'s `value` as datasets x backbones, in order of first appearance; missing pairs NaN."""
    missing = [column for column in ("dataset", "backbone", value) if column not in table]
    if missing:
        raise ValueError(f"the table lacks column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("the table is empty: nothing to draw")
    duplicated = table.duplicated(["dataset", "backbone"])
    if duplicated.any():
        pairs = table.loc[duplicated, ["dataset", "backbone"]].to_records(index=False).tolist()
        raise ValueError(f"more than one row for dataset/backbone pair(s) {pairs}")
    matrix = table.pivot(index="dataset", columns="backbone", values=value)
    return matrix.reindex(index=pd.unique(table["dataset"]), columns=pd.unique(table["backbone"])).astype(float)


def heatmap_figure(table: pd.DataFrame, value: str, path: Path, title: str) -> None:
    """Datasets (rows) x backbones (columns) coloured by `value` in [0, 1], each cell labelled in percent.

    `table` has one row per experiment with columns `dataset`, `backbone` and `value`; pairs with
    no row, or a NaN value, are left grey and blank.
    """
    matrix = heatmap_matrix(table, value)
    plt = _pyplot()
    rows, columns = matrix.shape
    figure, axes = plt.subplots(figsize=(max(4.0, 1.1 * columns + 3), max(2.5, 0.5 * rows + 1.8)))
    colour_map = plt.get_cmap("viridis").copy()
    colour_map.set_bad("lightgrey")
    values = np.ma.masked_invalid(matrix.to_numpy())
    image = axes.imshow(values, cmap=colour_map, vmin=0, vmax=1, aspect="auto")
    for row in range(rows):
        for column in range(columns):
            cell = matrix.iat[row, column]
            if np.isnan(cell):
                continue
            # Light text on viridis's dark low end, dark text on its light high end.
            colour = "white" if cell < 0.6 else "black"
            axes.text(column, row, f"{100 * cell:.1f}", ha="center", va="center", fontsize=9, color=colour)
    crowded = columns > 3
    axes.set_xticks(range(columns), matrix.columns, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    axes.set_yticks(range(rows), matrix.index)
    axes.set_xlabel("backbone")
    axes.set_ylabel("dataset")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    _save(figure, path)
