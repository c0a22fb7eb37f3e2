"""Gold tests for the classification metrics: hand-computed values and reference implementations."""
import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from classlab.metrics import (confusion_matrix, expected_calibration_error, negative_log_likelihood,
                              per_class_accuracy, reliability_bins, summarize_classification, top1_accuracy)


def logits_from_probs(p):
    return np.log(np.asarray(p, dtype=np.float64))


def test_top1_and_per_class_by_hand():
    logits = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2], [5, 0, 0]], float)
    labels = np.array([0, 1, 1, 2])
    assert top1_accuracy(logits, labels) == 0.5
    pca = per_class_accuracy(logits, labels, 4)
    assert pca[0] == 1.0 and pca[1] == 0.5 and pca[2] == 0.0 and math.isnan(pca[3])


def test_nll_by_hand():
    probs = [[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]]
    labels = np.array([0, 2])
    expected = -(math.log(0.7) + math.log(0.25)) / 2
    assert negative_log_likelihood(logits_from_probs(probs), labels) == pytest.approx(expected, abs=1e-12)


def test_ece_by_hand_two_bins():
    # confidences 0.9, 0.9 (one right, one wrong) and 0.6 (right) with 2 bins (0,.5], (.5,1]:
    # all three fall in bin 2: acc 2/3, conf 0.8 -> ECE = |2/3 - 0.8| = 0.1333
    probs = [[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]]
    labels = np.array([0, 1, 0])
    assert expected_calibration_error(logits_from_probs(probs), labels, n_bins=2) == pytest.approx(0.8 - 2 / 3)
    # with 10 bins: (0.8,0.9] holds two (acc .5, conf .9), (0.5,0.6] holds one (acc 1, conf .6)
    expected = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6)
    assert expected_calibration_error(logits_from_probs(probs), labels, n_bins=10) == pytest.approx(expected)


def test_bins_are_right_closed():
    # a confidence of exactly 0.6 belongs to bin (0.5, 0.6] with 10 bins, as in Guo et al.
    bins = reliability_bins(logits_from_probs([[0.6, 0.4]]), np.array([0]), n_bins=10)
    assert bins["count"][5] == 1 and bins["count"].sum() == 1


def test_ece_matches_torchmetrics_on_random_predictions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 10)) * 3
    labels = rng.integers(0, 10, 2000)
    ours = expected_calibration_error(logits, labels, 15)
    ref = multiclass_calibration_error(torch.softmax(torch.tensor(logits), 1), torch.tensor(labels),
                                       num_classes=10, n_bins=15, norm="l1").item()
    assert ours == pytest.approx(ref, abs=1e-5)


def test_confusion_matrix_rows_are_true_classes():
    logits = np.eye(3)[[0, 1, 1, 2, 0]]
    labels = np.array([0, 0, 1, 2, 2])
    cm = confusion_matrix(logits, labels, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_summary_is_consistent():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 5))
    labels = rng.integers(0, 5, 300)
    s = summarize_classification(logits, labels, 5)
    assert s["top1"] == top1_accuracy(logits, labels)
    assert s["ece_10_x100"] == pytest.approx(100 * expected_calibration_error(logits, labels, 10))
    assert s["n"] == 300


def test_forgetting_leaves_out_a_task_without_classes():
    """Si-Blurry can give a task with no new class: its accuracy-matrix column is empty, and the
    forgetting and BWT means run over the other tasks only (never NaN)."""
    from classlab.metrics.incremental import backward_transfer, forgetting

    nan = float("nan")
    a = np.array([[0.9, nan, nan],
                  [0.7, nan, nan],
                  [0.5, nan, 0.8]])
    assert forgetting(a) == pytest.approx(0.9 - 0.5)
    assert backward_transfer(a) == pytest.approx(0.5 - 0.9)
    full = np.array([[0.9, nan], [0.6, 0.8]])
    assert forgetting(full) == pytest.approx(0.3)
