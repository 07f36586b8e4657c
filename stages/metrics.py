"""Scoring a classifier's test predictions: headline metrics, per-class results, calibration, cost.

Everything here works on plain arrays (true class indices, predicted class probabilities) so the
evaluate and report stages can share it and tests can call it without a model. Only numpy and
scikit-learn are imported; keras stays out, and the caller passes `predict` in to time a model.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

SELECTION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
# Above this ratio of the largest to the smallest training class, "auto" selects on balanced
# accuracy: plain accuracy would reward a model for favouring the big classes.
IMBALANCE_RATIO = 1.5


def _check(
    y_true: np.ndarray, probabilities: np.ndarray, classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated copies: integer labels and float64 probabilities whose rows sum to one."""
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be a 2-D array (images, classes), got shape {probabilities.shape}")
    if y_true.ndim != 1 or len(y_true) != len(probabilities):
        raise ValueError(
            f"y_true must be 1-D with one label per row of probabilities: {y_true.shape} vs {probabilities.shape}"
        )
    if classes is not None:
        if probabilities.shape[1] != len(classes):
            raise ValueError(f"probabilities have {probabilities.shape[1]} columns for {len(classes)} classes")
        if len(set(classes)) != len(classes):
            raise ValueError(f"class names must be unique: {classes}")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= probabilities.shape[1]):
        raise ValueError(f"labels must lie in 0..{probabilities.shape[1] - 1}, got {y_true.min()}..{y_true.max()}")
    # float16 softmax outputs miss a row sum of one by up to ~1e-3; rescaling makes the top
    # probability a true confidence for calibration and keeps each row's argmax and ranking.
    probabilities = probabilities.astype(np.float64)
    sums = probabilities.sum(axis=1, keepdims=True)
    if not np.isfinite(probabilities).all() or (sums <= 0).any():
        raise ValueError("probabilities must be finite with a positive sum in every row")
    probabilities = probabilities / sums
    return y_true.astype(np.int64), probabilities


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion `successes / n`; (0.0, 1.0) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small test splits and
    accuracies near 1, which is where most of these experiments land.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1; the formula leaves rounding error there.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error over `bins` equal-width confidence bins.

    Each image falls in the bin holding its top probability (bins are (lo, hi], the first one also
    takes 0); the result is the image-weighted mean of |accuracy - mean confidence| per bin.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    y_true, probabilities = _check(y_true, probabilities)
    if len(y_true) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y_true).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    accuracy_sum = np.bincount(index, weights=correct, minlength=bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    # |sum(correct) - sum(confidence)| per bin is count * |accuracy - mean confidence|.
    return float(np.abs(accuracy_sum - confidence_sum).sum() / len(y_true))


def _roc_auc_ovr(y_true: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC AUC over the classes present in y_true; None with fewer than two.

    With two or more classes present every present class has both positives and negatives; an
    absent class has no positives, so its AUC is undefined and it is left out of the mean.
    """
    from sklearn.metrics import roc_auc_score

    present = np.unique(y_true)
    if len(present) < 2:
        return None
    return float(np.mean([roc_auc_score(y_true == label, probabilities[:, label]) for label in present]))


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in y_true."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        # Predicting a class the test split lacks is an ordinary mistake, not worth a warning.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        # A test split of one class, all predicted right: the recall of that class, as meant.
        warnings.filterwarnings("ignore", message="A single label was found")
        return float(balanced_accuracy_score(y_true, y_pred))


def per_class_scores(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> dict[str, dict[str, float | int]]:
    """{class: {precision, recall, f1, support}} for every class, absent ones with support 0."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }


def classification_report_dict(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """scikit-learn's classification report as a dict (per class, accuracy, macro and weighted).

    Every class has its row, one with no test images too (support 0); the macro average is over
    the classes scored (present or predicted), as `score`'s macro_f1."""
    from sklearn.metrics import classification_report

    report = classification_report(
        y_true, y_pred, labels=list(range(len(classes))), target_names=classes, output_dict=True, zero_division=0
    )
    scored = [classes[i] for i in scored_labels(y_true, y_pred)]
    report["macro avg"] = {
        **{key: float(np.mean([report[name][key] for name in scored])) for key in ("precision", "recall", "f1-score")},
        "support": report["macro avg"]["support"],
    }
    return report


def scored_labels(y_true: np.ndarray, y_pred: np.ndarray) -> list[int]:
    """The classes a macro average is over: those in the test split or predicted. A class with no
    test images that is never predicted has no precision, recall or F1 to average (scikit-learn's
    default without `labels`); counted as 0 it would lower macro F1 for a gap in the data, and
    balanced accuracy leaves it out too."""
    return sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))


def score(
    y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> tuple[dict[str, float | int], dict[str, dict[str, float | int]]]:
    """Headline metrics and per-class scores for predicted class probabilities.

    The headline dict holds accuracy with its 95% Wilson interval (accuracy_ci_low/high),
    balanced_accuracy, macro_f1 (over `scored_labels`), weighted_f1, top_3_accuracy (only with
    five or more classes, where it says more than accuracy does), roc_auc_ovr (omitted when fewer
    than two classes are in the test split), expected_calibration_error, test_images and
    chance_accuracy (the no-information rate: the share of the test split's largest class, what
    always answering that class would score).
    Probabilities are renormalised per row first.
    """
    from sklearn.metrics import f1_score

    y_true, probabilities = _check(y_true, probabilities, classes)
    if len(y_true) == 0:
        raise ValueError("cannot score an empty test split")
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    correct = int((y_pred == y_true).sum())
    low, high = wilson_interval(correct, len(y_true))
    metrics: dict[str, float | int] = {
        "accuracy": correct / len(y_true),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_f1": float(f1_score(y_true, y_pred, labels=scored_labels(y_true, y_pred), average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
    }
    if len(classes) >= 5:
        metrics["top_3_accuracy"] = top_k_accuracy(y_true, probabilities, 3)
    roc_auc = _roc_auc_ovr(y_true, probabilities)
    if roc_auc is not None:
        metrics["roc_auc_ovr"] = roc_auc
    metrics["expected_calibration_error"] = expected_calibration_error(y_true, probabilities)
    metrics["test_images"] = int(len(y_true))
    metrics["chance_accuracy"] = float(np.bincount(y_true, minlength=len(classes)).max() / len(y_true))
    return metrics, per_class_scores(y_true, y_pred, classes)


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """The share of images whose class is among the `k` highest scores, ties broken as argmax
    breaks them (the lower class index first), so that top-1 is the accuracy and top-k never falls
    below it. (sklearn's top_k_accuracy_score breaks ties the other way: with all scores equal it
    gives 0 where argmax is right.)"""
    rows = np.arange(len(y_true))
    own = probabilities[rows, y_true][:, None]
    index = np.arange(probabilities.shape[1])[None, :]
    ahead = (probabilities > own) | ((probabilities == own) & (index < y_true[:, None]))
    return float((ahead.sum(axis=1) < k).mean())


def most_confident_mistakes(y_true: np.ndarray, probabilities: np.ndarray, n: int = 16) -> np.ndarray:
    """Indices of up to `n` wrong predictions, the most confident first (ties: lower index first)."""
    y_true, probabilities = _check(y_true, probabilities)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y_true)
    confidence = probabilities.max(axis=1)[wrong]
    return wrong[np.argsort(-confidence, kind="stable")][: max(n, 0)]


def measure_latency(
    predict: Callable[[np.ndarray], Any], x: np.ndarray, batch_size: int, repeats: int = 5, warmup: int = 1
) -> float:
    """Milliseconds per image: the median over `repeats` timed calls of `predict` on one batch.

    The batch is the first `batch_size` images of x, cycled when x holds fewer. `warmup` untimed
    calls come first, so graph tracing and memory allocation stay out of the number.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    x = np.asarray(x)
    if len(x) == 0:
        raise ValueError("cannot time predictions on no images")
    batch = x[np.arange(batch_size) % len(x)]
    for _ in range(warmup):
        predict(batch)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(batch)
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds) / batch_size


def model_size(model_path: Path, parameters: int) -> dict[str, float | int]:
    """{parameters, size_mb}: the size on disk in megabytes (10^6 bytes) of a file or a folder."""
    model_path = Path(model_path)
    if model_path.is_dir():
        size = sum(path.stat().st_size for path in model_path.rglob("*") if path.is_file())
    else:
        size = model_path.stat().st_size
    return {"parameters": int(parameters), "size_mb": round(size / 1e6, 3)}


def selection_metric(train_counts: np.ndarray, choice: str) -> str:
    """The metric that picks the best model: `choice` itself, or for "auto" one that fits the data.

    "auto" gives "balanced_accuracy" when the training classes are imbalanced (the largest class
    has more than 1.5 times the images of the smallest, or a class has none) and "accuracy"
    otherwise; "accuracy", "balanced_accuracy" and "macro_f1" are returned as they are.
    """
    if choice in SELECTION_METRICS:
        return choice
    if choice != "auto":
        raise ValueError(f"unknown selection metric {choice!r}; choose one of: auto, {', '.join(SELECTION_METRICS)}")
    counts = np.asarray(train_counts)
    if counts.size == 0:
        raise ValueError("train_counts is empty: need one image count per class")
    if counts.min() <= 0 or counts.max() / counts.min() > IMBALANCE_RATIO:
        return "balanced_accuracy"
    return "accuracy"
