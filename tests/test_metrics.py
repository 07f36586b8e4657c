"""Test-split scoring: headline metrics, intervals, calibration, mistakes, latency and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stages.metrics import (
    classification_report_dict,
    expected_calibration_error,
    measure_latency,
    model_size,
    most_confident_mistakes,
    score,
    selection_metric,
    wilson_interval,
)


def confident(y: np.ndarray, k: int, top: float = 0.99) -> np.ndarray:
    """Probabilities putting `top` on class y[i] and the rest spread evenly."""
    probabilities = np.full((len(y), k), (1 - top) / (k - 1))
    probabilities[np.arange(len(y)), y] = top
    return probabilities


def random_probabilities(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probabilities


def test_perfect_predictions_score_one_and_are_well_calibrated() -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    metrics, per_class = score(y, confident(y, 3), ["a", "b", "c"])
    assert metrics["accuracy"] == 1.0
    assert metrics["balanced_accuracy"] == metrics["macro_f1"] == metrics["weighted_f1"] == 1.0
    assert metrics["accuracy_ci_high"] == 1.0 and 0.6 < metrics["accuracy_ci_low"] < 1.0
    assert metrics["expected_calibration_error"] == pytest.approx(0.01)
    assert metrics["roc_auc_ovr"] == 1.0
    assert metrics["test_images"] == 10
    assert metrics["chance_accuracy"] == pytest.approx(0.4)
    assert "top_3_accuracy" not in metrics
    assert per_class["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 4}


def test_a_class_with_no_test_images_counts_in_macro_f1_only_when_it_is_predicted() -> None:
    """Never in the test split and never predicted: nothing to score, left out of the macro
    average (as balanced accuracy leaves it out); predicted, it counts, with precision 0."""
    from sklearn.metrics import f1_score

    from stages.metrics import classification_report_dict

    y = np.array([0, 0, 1, 1])
    metrics, per_class = score(y, confident(y, 3), ["a", "b", "c"])
    assert metrics["macro_f1"] == metrics["balanced_accuracy"] == 1.0
    assert per_class["c"]["support"] == 0
    report = classification_report_dict(y, y, ["a", "b", "c"])
    assert report["c"]["support"] == 0 and report["macro avg"]["f1-score"] == 1.0

    predicted = np.array([0, 2, 1, 1])
    metrics, _ = score(y, confident(predicted, 3), ["a", "b", "c"])
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    report = classification_report_dict(y, predicted, ["a", "b", "c"])
    assert report["macro avg"]["f1-score"] == pytest.approx(metrics["macro_f1"])


def test_wilson_interval_known_values_and_width_shrinks_with_more_images() -> None:
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    small_low, small_high = wilson_interval(54, 60)
    large_low, large_high = wilson_interval(540, 600)
    assert small_high - small_low > 2 * (large_high - large_low)
    assert small_low < 0.9 < small_high and large_low < 0.9 < large_high
    # A 99% interval is wider than the 95% one.
    wide_low, wide_high = wilson_interval(50, 100, confidence=0.99)
    assert wide_low < 0.4038 and wide_high > 0.5962
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_top_3_accuracy_only_with_five_classes_or_more() -> None:
    classes = ["a", "b", "c", "d", "e"]
    probabilities = np.array(
        [
            [0.50, 0.20, 0.15, 0.10, 0.05],  # true 0: rank 1
            [0.50, 0.20, 0.15, 0.10, 0.05],  # true 2: rank 3
            [0.50, 0.20, 0.15, 0.10, 0.05],  # true 3: rank 4
            [0.05, 0.10, 0.15, 0.20, 0.50],  # true 0: rank 5
        ]
    )
    metrics, _ = score(np.array([0, 2, 3, 0]), probabilities, classes)
    assert metrics["top_3_accuracy"] == 0.5
    assert metrics["accuracy"] == 0.25
    four, _ = score(np.array([0, 1]), confident(np.array([0, 1]), 4), classes[:4])
    assert "top_3_accuracy" not in four


def test_top_3_accuracy_breaks_ties_as_the_prediction_does() -> None:
    """A model whose scores tie (uniform outputs after divergence): argmax predicts the first
    class, so where that is right top-3 is right too, and a class tied fourth or later is not."""
    classes = ["a", "b", "c", "d", "e"]
    uniform = np.full((5, 5), 0.2)
    metrics, _ = score(np.arange(5), uniform, classes)
    assert metrics["accuracy"] == 0.2
    assert metrics["top_3_accuracy"] == pytest.approx(0.6)  # classes a, b, c: within the first three
    metrics, _ = score(np.array([0, 0, 0, 0, 1]), uniform, classes)
    assert metrics["accuracy"] == 0.8 and metrics["top_3_accuracy"] == 1.0


def test_roc_auc_matches_sklearn_with_every_class_present() -> None:
    y, probabilities = random_probabilities(40, 4)
    metrics, _ = score(y, probabilities, ["a", "b", "c", "d"])
    expected = roc_auc_score(y, probabilities, multi_class="ovr", labels=[0, 1, 2, 3])
    assert metrics["roc_auc_ovr"] == pytest.approx(expected)
    assert 0.5 < metrics["roc_auc_ovr"] < 1.0


def test_roc_auc_averages_over_present_classes_and_is_absent_with_one_class() -> None:
    y, probabilities = random_probabilities(30, 3, seed=1)
    probabilities = np.column_stack([probabilities, np.full(30, 0.05)])
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    metrics, per_class = score(y, probabilities, ["a", "b", "c", "never"])
    expected = np.mean([roc_auc_score(y == label, probabilities[:, label]) for label in range(3)])
    assert metrics["roc_auc_ovr"] == pytest.approx(expected)
    assert per_class["never"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert list(per_class) == ["a", "b", "c", "never"]

    only_one, _ = score(np.zeros(5, dtype=int), probabilities[:5], ["a", "b", "c", "never"])
    assert "roc_auc_ovr" not in only_one


def test_expected_calibration_error_on_a_hand_made_example() -> None:
    # Bin near 0.9: one right, one wrong -> |0.5 - 0.9| over half the images; bin near 0.6: both
    # right -> |1.0 - 0.6| over the other half. ECE = 0.5 * 0.4 + 0.5 * 0.4.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(y, probabilities) == pytest.approx(0.4)
    # With one bin the errors cancel across confidences: |0.75 - 0.75| = 0.
    assert expected_calibration_error(y, probabilities, bins=1) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([], dtype=int), np.zeros((0, 2))) == 0.0


def test_float16_probabilities_that_do_not_sum_to_one_are_renormalised() -> None:
    y, probabilities = random_probabilities(25, 5, seed=2)
    noisy = (probabilities * 1.003).astype(np.float16)
    assert not np.allclose(noisy.astype(np.float64).sum(axis=1), 1.0, atol=1e-4)
    metrics, _ = score(y, noisy, list("abcde"))
    renormalised = noisy.astype(np.float64) / noisy.astype(np.float64).sum(axis=1, keepdims=True)
    assert metrics["roc_auc_ovr"] == pytest.approx(roc_auc_score(y, renormalised, multi_class="ovr"))
    assert metrics["expected_calibration_error"] == pytest.approx(expected_calibration_error(y, renormalised))
    assert 0 <= metrics["top_3_accuracy"] <= 1


def test_score_rejects_mismatched_inputs() -> None:
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="3 classes"):
        score(y, confident(y, 2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="empty"):
        score(np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="finite"):
        score(y, np.array([[np.nan, 1.0], [0.5, 0.5]]), ["a", "b"])


def test_classification_report_dict_names_classes() -> None:
    report = classification_report_dict(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b", "c"])
    assert report["b"]["recall"] == 0.5
    assert report["c"]["support"] == 0
    assert report["accuracy"] == pytest.approx(2 / 3)


def test_most_confident_mistakes_are_ordered_by_confidence() -> None:
    probabilities = np.array(
        [
            [0.6, 0.4],  # wrong, 0.6
            [0.1, 0.9],  # right
            [0.95, 0.05],  # wrong, 0.95
            [0.2, 0.8],  # wrong, 0.8
            [0.7, 0.3],  # right
        ]
    )
    y = np.array([1, 1, 1, 0, 0])
    assert most_confident_mistakes(y, probabilities).tolist() == [2, 3, 0]
    assert most_confident_mistakes(y, probabilities, n=2).tolist() == [2, 3]
    assert most_confident_mistakes(np.array([0, 1]), confident(np.array([0, 1]), 2)).size == 0


@pytest.mark.parametrize(
    ("counts", "choice", "expected"),
    [
        ([100, 100, 100], "auto", "accuracy"),
        ([100, 150], "auto", "accuracy"),
        ([100, 151], "auto", "balanced_accuracy"),
        ([100, 0, 100], "auto", "balanced_accuracy"),
        ([100, 500], "accuracy", "accuracy"),
        ([100, 100], "macro_f1", "macro_f1"),
        ([100, 100], "balanced_accuracy", "balanced_accuracy"),
    ],
)
def test_selection_metric(counts: list[int], choice: str, expected: str) -> None:
    assert selection_metric(np.array(counts), choice) == expected


def test_selection_metric_rejects_unknown_choice() -> None:
    with pytest.raises(ValueError, match="auto, accuracy, balanced_accuracy, macro_f1"):
        selection_metric(np.array([1, 1]), "precision")


def test_measure_latency_calls_predict_on_batches_of_the_requested_size() -> None:
    batches: list[np.ndarray] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        batches.append(batch.copy())
        return np.zeros((len(batch), 2))

    x = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4, 1)
    milliseconds = measure_latency(predict, x, batch_size=8, repeats=3, warmup=2)
    assert milliseconds > 0
    assert len(batches) == 5
    assert all(batch.shape == (8, 4, 4, 1) for batch in batches)
    # Three images cycled to fill a batch of eight.
    np.testing.assert_array_equal(batches[0], x[[0, 1, 2, 0, 1, 2, 0, 1]])

    batches.clear()
    measure_latency(predict, x, batch_size=2, repeats=1, warmup=0)
    assert [batch.shape[0] for batch in batches] == [2]
    with pytest.raises(ValueError, match="no images"):
        measure_latency(predict, x[:0], batch_size=2)


def test_model_size_of_a_file_and_a_folder(tmp_path: Path) -> None:
    model = tmp_path / "model.keras"
    model.write_bytes(b"\0" * 1_234_567)
    assert model_size(model, 42) == {"parameters": 42, "size_mb": 1.235}
    folder = tmp_path / "saved"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"\0" * 500_000)
    (folder / "variables" / "data").write_bytes(b"\0" * 250_000)
    assert model_size(folder, 7)["size_mb"] == 0.75


def test_a_test_split_of_one_class_predicted_right_scores_without_a_warning() -> None:
    """sklearn's confusion matrix warns 'A single label was found' for it (stderr noise in
    evaluate's output); balanced accuracy is that class's recall, as meant."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores, _ = score(np.array([1, 1]), np.array([[0, 1.0, 0], [0, 1.0, 0]]), ["a", "b", "c"])
    assert scores["accuracy"] == scores["balanced_accuracy"] == 1.0
