"""Classification metrics over logits or probabilities and integer labels.

Pure numpy functions: they take what ``evaluate`` saved and return numbers, so they can be
recomputed without a model and tested against hand-made examples.
"""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose arg-max class is the label (sample-weighted)."""
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of samples whose label is among the ``k`` highest scores (ties broken by index)."""
    logits = np.asarray(logits)
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())


def shot_group_accuracy(per_class: list, class_counts: list) -> dict:
    """Mean per-class accuracy over the many-, medium- and few-shot classes of a long-tailed
    training set. The classes are ranked by training count and cut in thirds (many: the top
    third, few: the bottom third, medium: the rest); ImageNet-LT's fixed thresholds (>100, <20
    images) assume its scale, thirds carry over to any scale. Ties keep the class order."""
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    third = len(order) // 3
    groups = {"many": order[:third], "medium": order[third:len(order) - third], "few": order[len(order) - third:]}
    out = {}
    for name, classes in groups.items():
        values = [per_class[c] for c in classes if per_class[c] is not None]
        out[f"{name}_shot_top1"] = float(np.mean(values)) if values else None
        out[f"{name}_shot_classes"] = classes
    return out


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class with no samples."""
    pred = np.asarray(logits).argmax(axis=1)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            out[c] = (pred[mask] == c).mean()
    return out


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean of -log softmax(logits)_y (natural log)."""
    return float(-log_softmax(np.asarray(logits, dtype=np.float64))[np.arange(len(labels)), labels].mean())


def reliability_bins(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width bins over max-softmax confidence in (0, 1].

    A confidence c falls in bin b when b/n < c <= (b+1)/n (Guo et al., 2017). Returns per-bin
    counts, mean confidence and accuracy (NaN for empty bins).
    """
    probs = softmax(np.asarray(logits, dtype=np.float64))
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins; the clip puts conf == 0 (impossible for softmax) into the first bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
    return {"edges": edges, "count": counts, "confidence": mean_conf, "accuracy": acc}


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    bins = reliability_bins(logits, labels, n_bins)
    n = bins["count"].sum()
    nonempty = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][nonempty] - bins["confidence"][nonempty])
    return float((bins["count"][nonempty] / n * gaps).sum())


def confusion_matrix(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j] = number of samples of true class i predicted as j."""
    pred = np.asarray(logits).argmax(axis=1)
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summarize_classification(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    pca = per_class_accuracy(logits, labels, num_classes)
    return {
        "top1": top1_accuracy(logits, labels),
        "top5": top_k_accuracy(logits, labels, 5),
        "balanced_top1": float(np.nanmean(pca)),
        "per_class_accuracy": [None if np.isnan(v) else float(v) for v in pca],
        "nll": negative_log_likelihood(logits, labels),
        "ece_15": expected_calibration_error(logits, labels, 15),
        # PS-KD reports ECE with 10 bins, in percent
        "ece_10_x100": 100.0 * expected_calibration_error(logits, labels, 10),
        "n": int(len(labels)),
    }
