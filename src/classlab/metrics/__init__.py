"""Metrics: pure functions over saved predictions (``predictions.npz``)."""
from classlab.metrics.classification import (  # noqa: F401
    confusion_matrix, expected_calibration_error, negative_log_likelihood, per_class_accuracy,
    reliability_bins, shot_group_accuracy, summarize_classification, top1_accuracy, top_k_accuracy,
)
